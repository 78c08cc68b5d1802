"""Unet(..., checkpointing=None | "selective" | "full"): the same outputs and gradients as without checkpointing.

"selective" keeps the convolution outputs and recomputes the fused norms, activations and attention in the
backward; "full" recomputes each ResnetBlock from its input. Recomputation runs the same deterministic ops on
the same inputs, so the results match to fp32 rounding of a different accumulation order of the gradients at most.
"""

import functools

import pytest
import torch

import fastunet
from tolerances import assert_close

CONFIG = dict(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=16, resnet_block_groups=4)


@functools.lru_cache(maxsize=None)  # each default-mode result serves both checkpointing modes
def gradients(checkpointing, backend, block_norm, device):
    torch.manual_seed(0)
    model = fastunet.Unet(**CONFIG, block_norm=block_norm, checkpointing=checkpointing).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    time = torch.tensor([10, 700], device=device)
    with fastunet.use_backend(backend):
        out = model(x, time)
        out.square().mean().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


# Every mode on the reference path; on the Triton path (interpreted on CPU, slow) one mode per block norm.
@pytest.mark.parametrize("checkpointing, backend, block_norm", [
    ("selective", "reference", "group"), ("full", "reference", "group"),
    ("selective", "triton", "group"), ("full", "triton", "rms"),
])
def test_gradients_equal_the_default_mode(checkpointing, backend, block_norm, device):
    expected_out, expected = gradients(None, backend, block_norm, device)
    out, actual = gradients(checkpointing, backend, block_norm, device)
    what = f"checkpointing={checkpointing!r}, {backend} {block_norm}"
    assert_close(out, expected_out, what=f"{what} output", atol=0, rtol=0)
    assert expected.keys() == actual.keys()
    for name, grad in expected.items():
        assert actual[name] is not None, f"{what}: no gradient for {name}"
        assert_close(actual[name], grad, what=f"{what} grad {name}", atol=1e-6 * max(1.0, grad.abs().max().item()),
                     rtol=1e-5)


def test_no_grad_forward_is_not_checkpointed(device):
    # Sampling (no grad) takes the plain path: same output, nothing recomputed or kept.
    torch.manual_seed(0)
    model = fastunet.Unet(**CONFIG, checkpointing="selective").to(device)
    x, time = torch.randn(1, 3, 8, 8, device=device), torch.tensor([5], device=device)
    with torch.no_grad():
        checkpointed = model(x, time)
        model.checkpointing = None
        plain = model(x, time)
    assert_close(checkpointed, plain, atol=0, rtol=0)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=r"expected checkpointing in \(None, 'selective', 'full'\), got 'some'"):
        fastunet.Unet(dim=8, checkpointing="some")
