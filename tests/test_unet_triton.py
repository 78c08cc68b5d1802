"""The whole Unet on the Triton backend matches the reference backend: outputs and every parameter's gradient.

Without a GPU the kernels run under the Triton interpreter, so the model is tiny; every kernel is still used:
group or RMS norms in each Block, RMS pre-norms, linear attention in the outer stage, full attention inside.
"""

import pytest
import torch

import fastunet
from fastunet import functional
from tolerances import assert_close

CONFIG = dict(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=16, resnet_block_groups=4)


@pytest.mark.parametrize("block_norm", ["group", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_reference(block_norm, dtype, device):
    missing = {"group_norm_act", "rms_norm_act", "attention", "linear_attention"} - set(functional.TRITON_KERNELS)
    assert not missing, f"ops without a registered Triton kernel: {sorted(missing)}"
    torch.manual_seed(0)
    model = fastunet.Unet(**CONFIG, block_norm=block_norm).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    time = torch.tensor([10, 700], device=device)

    def run(backend):
        model.zero_grad(set_to_none=True)
        with fastunet.use_backend(backend), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, time)
        out.float().square().mean().backward()
        return out.detach().float(), {name: p.grad.clone() for name, p in model.named_parameters()}

    expected, expected_grads = run("reference")
    actual, actual_grads = run("triton")
    # fp32: both paths compute in fp32, differing in summation order only; through ~30 layers that stays ~1e-5.
    # bf16 (autocast): the paths round activations to bf16 at different points; a few bf16 ulps of the output.
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    assert_close(actual, expected, what=f"{block_norm} {dtype} output", **tol)
    for name, grad in expected_grads.items():
        scale = grad.abs().max().item()
        assert_close(actual_grads[name], grad, what=f"{block_norm} {dtype} grad {name}",
                     atol=tol["atol"] * max(scale, 1) * (1 if dtype == torch.float32 else 4), rtol=tol["rtol"] * 4)
