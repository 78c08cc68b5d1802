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


def run(model, x, time, backend, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with fastunet.use_backend(backend), torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32,
                                                       enabled=autocast_dtype is not None):
        out = model(x, time)
    out.float().square().mean().backward()
    return out.detach().float(), {name: p.grad.clone() for name, p in model.named_parameters()}


def build(block_norm, device):
    torch.manual_seed(0)
    model = fastunet.Unet(**CONFIG, block_norm=block_norm).to(device)
    return model, torch.randn(2, 3, 8, 8, device=device), torch.tensor([10, 700], device=device)


def test_every_op_has_a_kernel():
    missing = {"group_norm_act", "rms_norm_act", "attention", "linear_attention"} - set(functional.TRITON_KERNELS)
    assert not missing, f"ops without a registered Triton kernel: {sorted(missing)}"


def assert_fp32_triton_matches_reference(model, x, time, what):
    """The model's output and every parameter gradient, Triton path against reference path, both fp32."""
    expected, expected_grads = run(model, x, time, "reference")
    actual, actual_grads = run(model, x, time, "triton")
    # Both compute in fp32 and differ in summation order only (measured: 1e-6 of the output, 5e-6 of each gradient's
    # largest entry); on a GPU the attention kernels' TF32 dots add ~1e-3 relative error.
    assert_close(actual, expected, what=f"{what} fp32 output", atol=2e-3, rtol=2e-3)
    for name, grad in expected_grads.items():
        assert_close(actual_grads[name], grad, what=f"{what} fp32 grad {name}",
                     atol=5e-3 * grad.abs().max().item(), rtol=0)


@pytest.mark.parametrize("block_norm", ["group", "rms"])
def test_fp32_matches_reference(block_norm, device):
    assert_fp32_triton_matches_reference(*build(block_norm, device), block_norm)


def test_fp32_matches_reference_with_wide_rms_norms(device):
    """32 channels and more: the RMSNorm forward saves rinv for its backward (SAVE_RINV_MIN_CHANNELS), through the
    ResnetBlocks' recomputation and the attention layers' norms, against the reference."""
    from fastunet.kernels.rms_norm import SAVE_RINV_MIN_CHANNELS

    torch.manual_seed(0)
    model = fastunet.Unet(dim=SAVE_RINV_MIN_CHANNELS, dim_mults=(1,), attn_heads=2, attn_dim_head=16,
                          block_norm="rms").to(device)
    x, time = torch.randn(2, 3, 4, 4, device=device), torch.tensor([10, 700], device=device)
    assert_fp32_triton_matches_reference(model, x, time, "rms")


@pytest.mark.parametrize("block_norm", ["group", "rms"])
def test_bf16_autocast_error_is_comparable_to_the_reference(block_norm, device):
    """Under bf16 autocast both paths round activations, at different places (the fused ops return bf16 and run
    their dots on bf16 operands; the reference returns bf16 after fp32 math), so neither is the truth: both are
    measured against the fp32 model. The Triton path's error must stay within a small multiple of the reference
    path's (measured up to 5.3x on one of 100 gradients, 2-4x typically), plus a floor of 0.2% of each tensor's
    largest entry for tensors the reference happens to get almost exactly right."""
    model, x, time = build(block_norm, device)
    truth, truth_grads = run(model, x, time, "reference")
    reference_out, reference_grads = run(model, x, time, "reference", torch.bfloat16)
    triton_out, triton_grads = run(model, x, time, "triton", torch.bfloat16)

    def error(a, b):
        return (a - b).abs().max().item()

    bound = 8 * error(reference_out, truth) + 2e-3 * truth.abs().max().item()
    assert error(triton_out, truth) <= bound, f"output error {error(triton_out, truth):.3g} > {bound:.3g}"
    for name, grad in truth_grads.items():
        bound = 8 * error(reference_grads[name], grad) + 2e-3 * grad.abs().max().item()
        actual = error(triton_grads[name], grad)
        assert actual <= bound, f"grad {name}: Triton bf16 error {actual:.3g} > bound {bound:.3g} (scale {grad.abs().max():.3g})"
