"""Unet(..., checkpointing=None | "selective" | "full" | False): the same outputs and gradients in every mode.

False keeps every activation the backward needs; the default (None) recomputes each ResnetBlock's first
activation and the attention layers' norms and cores in the backward; "selective" the attention layers' to_qkv
convolutions too; "full" each ResnetBlock from its input. Recomputation runs the same deterministic ops on the same
inputs, so the results match to fp32 rounding of a different accumulation order of the gradients at most.
"""

import functools

import pytest
import torch

import fastunet
from tolerances import assert_close

CONFIG = dict(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=16, resnet_block_groups=4)


@functools.lru_cache(maxsize=None)  # each checkpointing=False result serves every other mode
def gradients(checkpointing, backend, block_norm, device):
    torch.manual_seed(0)
    model = fastunet.Unet(**CONFIG, block_norm=block_norm, checkpointing=checkpointing).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    time = torch.tensor([10, 700], device=device)
    with fastunet.use_backend(backend):
        out = model(x, time)
        out.square().mean().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


# Every mode on the reference path; on the Triton path (interpreted on CPU, slow) one block norm per mode.
@pytest.mark.parametrize("checkpointing, backend, block_norm", [
    (None, "reference", "group"), ("selective", "reference", "group"), ("full", "reference", "group"),
    (None, "triton", "group"), ("selective", "triton", "group"), ("full", "triton", "rms"),
])
def test_gradients_equal_keeping_everything(checkpointing, backend, block_norm, device):
    expected_out, expected = gradients(False, backend, block_norm, device)
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
        model.checkpointing = False
        plain = model(x, time)
    assert_close(checkpointed, plain, atol=0, rtol=0)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=r"expected checkpointing in \(None, 'selective', 'full', False\), got 'some'"):
        fastunet.Unet(dim=8, checkpointing="some")


def test_recomputation_runs_on_the_forwards_backend(device, monkeypatch):
    # The default mode recomputes fused ops in the backward. They run on the backend of the forward, whatever
    # use_backend() is in force where backward() is called: otherwise a gradient would mix two implementations.
    torch.manual_seed(0)
    model = fastunet.Unet(**CONFIG).to(device)
    x, time = torch.randn(2, 3, 8, 8, device=device), torch.tensor([10, 700], device=device)
    reference_calls = []
    for name in ("group_norm_act", "rms_norm_act", "packed_attention", "packed_linear_attention"):
        original = getattr(fastunet.reference, name)
        monkeypatch.setattr(fastunet.reference, name, functools.partial(
            lambda original, name, *args, **kwargs: reference_calls.append(name) or original(*args, **kwargs),
            original, name))
    grads = []
    for backward_backend in ("triton", "reference"):
        model.zero_grad(set_to_none=True)
        with fastunet.use_backend("triton"):
            loss = model(x, time).square().mean()
        with fastunet.use_backend(backward_backend):
            loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert not reference_calls, f"the backward recomputed on the reference backend: {reference_calls}"
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, what=f"grad {name}", atol=0, rtol=0)


def test_hooks_around_the_model_still_see_what_it_keeps(device):
    # The default mode's recipes (fastunet.recompute) replace only the recomputed activations; every other saved
    # tensor still goes to the saved-tensor hooks in force (a user's save_on_cpu, say), and gradients are unchanged.
    torch.manual_seed(0)
    x, time = torch.randn(2, 3, 8, 8, device=device), torch.tensor([10, 700], device=device)
    seen, grads = {}, {}
    for mode in (False, None):
        torch.manual_seed(0)
        model = fastunet.Unet(**CONFIG, checkpointing=mode).to(device)
        packed = seen[mode] = []
        with fastunet.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(
                lambda t: packed.append(t.shape) or ("outer", t), lambda packed_: packed_[1]):
            loss = model(x, time).square().mean()
        with fastunet.use_backend("triton"):
            loss.backward()
        grads[mode] = {name: p.grad for name, p in model.named_parameters()}
    # One activation per ResnetBlock (11) and two per attention layer (2 linear, 3 full) are recomputed instead.
    assert len(seen[False]) - len(seen[None]) == 11 + 2 * 5, (len(seen[False]), len(seen[None]))
    for name, grad in grads[False].items():
        assert_close(grads[None][name], grad, what=f"grad {name}", atol=0, rtol=0)


def test_double_backward_reaches_through_a_recomputed_activation(device):
    # create_graph=True (a gradient penalty, say) differentiates the backward itself: block1's recomputed
    # activation, which the gradient of block2's convolution weight is made of, must then stand in the graph where
    # the kept one stood, reaching back to block1. Reference path: the Triton kernels' backward is not
    # differentiable again.
    from fastunet.layers import ResnetBlock

    torch.manual_seed(0)
    block = ResnetBlock(8, 16, time_emb_dim=None, groups=4).to(device)
    x = torch.randn(2, 8, 6, 6, device=device)
    results = []
    for recompute in (False, True):
        block.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        with fastunet.use_backend("reference"):
            out = block(inputs, recompute=recompute)
            (grad_weight,) = torch.autograd.grad(out.square().sum(), block.block2.proj.weight, create_graph=True)
            grad_weight.square().sum().backward()
        results.append({name: p.grad for name, p in block.named_parameters()})
    for name, grad in results[0].items():
        assert_close(results[1][name], grad, what=f"second-order grad {name}", atol=0, rtol=0)
