"""A float64 model (`model.double()`, for gradcheck and debugging) runs on the reference backend in float64 all the
way through: "auto" picks the reference for float64 tensors, "triton" refuses them by name."""

import pytest
import torch

import fastunet
from fastunet import functional
from upstream import upstream_2

# Both models compute in float64 (53 significant bits) and differ only in summation order and in fused vs separate
# multiply-adds: ~1e-15 relative per op, far below this bound even after a whole Unet.
FLOAT64_ATOL = 1e-10


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("options", [{}, dict(full_attn=True, flash_attn=True, self_condition=True)],
                         ids=["default", "full_attn_flash_self_cond"])
def test_float64_model_matches_upstream_float64(options):
    upstream = upstream_2()
    config = dict(dim=8, dim_mults=(1, 2), **options)
    torch.manual_seed(0)
    theirs = upstream.Unet(**config).double()
    ours = fastunet.Unet(**config, block_norm="rms").double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    time = torch.tensor([3.0, 700.0], dtype=torch.float64)  # upstream's float64 model needs a float64 time
    self_cond = torch.randn_like(x) if options.get("self_condition") else None
    expected = theirs(x, time, self_cond)
    with fastunet.use_backend("auto"):  # the interpreter is on in the tests: "auto" would pick Triton for fp32
        actual = ours(x, time.long(), self_cond)  # any time dtype: cast to the MLP's float64
    assert actual.dtype == torch.float64
    assert max_error(actual, expected) < FLOAT64_ATOL, f"output error {max_error(actual, expected):.3g}"
    expected.square().sum().backward()
    actual.square().sum().backward()
    ours_params = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        error = max_error(ours_params[name].grad, param.grad)
        assert error < FLOAT64_ATOL * max(1.0, param.grad.abs().max().item()), f"grad {name}: error {error:.3g}"


def test_tiny_unet_passes_gradcheck():
    """Analytic against finite-difference gradients of the output with respect to x, in float64 (eps 1e-6)."""
    torch.manual_seed(0)
    model = fastunet.Unet(8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, block_norm="rms").double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    time = torch.tensor([5])
    assert torch.autograd.gradcheck(lambda image: model(image, time), (x,), eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=True)


def test_tiny_group_norm_unet_passes_gradcheck():
    torch.manual_seed(0)
    model = fastunet.Unet(8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, resnet_block_groups=4).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda image: model(image, torch.tensor([5])), (x,), eps=1e-6, atol=1e-5,
                                    rtol=1e-4, fast_mode=True)


FLOAT64_OPS = {
    "group_norm_act": lambda: functional.group_norm_act(torch.randn(2, 4, 3, 3, dtype=torch.float64), None, None, 2),
    "rms_norm_act": lambda: functional.rms_norm_act(torch.randn(2, 4, 3, 3, dtype=torch.float64),
                                                    torch.ones(4, dtype=torch.float64)),
    "attention": lambda: functional.attention(*torch.randn(3, 1, 2, 5, 8, dtype=torch.float64),
                                              *torch.randn(2, 2, 4, 8, dtype=torch.float64)),
    "linear_attention": lambda: functional.linear_attention(*torch.randn(3, 1, 2, 8, 5, dtype=torch.float64),
                                                            *torch.randn(2, 2, 8, 4, dtype=torch.float64)),
}


@pytest.mark.parametrize("op", FLOAT64_OPS)
def test_triton_backend_names_float64(op):
    with fastunet.use_backend("triton"), pytest.raises(RuntimeError, match=rf"'triton' was requested for {op}, but "
                                                       r"the Triton kernels take float32, float16 and bfloat16, got "
                                                       r"float64 tensors \(.*\) float64"):
        FLOAT64_OPS[op]()


@pytest.mark.parametrize("op", FLOAT64_OPS)
def test_auto_runs_float64_on_the_reference_in_float64(op, monkeypatch):
    calls = []
    original = getattr(functional.reference, op)
    monkeypatch.setattr(functional.reference, op, lambda *a, **k: calls.append(op) or original(*a, **k))
    with fastunet.use_backend("auto"):
        out = FLOAT64_OPS[op]()
    assert calls == [op], f"auto did not run the reference for float64 {op}"
    assert out.dtype == torch.float64


def test_reference_ops_compute_in_float64():
    """A float64 rms_norm_act matches the float64 formula to float64 precision (an fp32 computation inside would be
    off by ~1e-7)."""
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    g = torch.rand(16, dtype=torch.float64)
    scale, shift = torch.randn(2, 2, 16, dtype=torch.float64)
    expected = x / x.norm(dim=1, keepdim=True) * 16**0.5 * g[:, None, None] * (scale[..., None, None] + 1)
    expected = expected + shift[..., None, None]
    with fastunet.use_backend("reference"):
        actual = functional.rms_norm_act(x, g, scale, shift)
    assert max_error(actual, expected) < 1e-13, max_error(actual, expected)


def test_float64_unet_on_the_triton_backend_raises_before_computing(monkeypatch):
    model = fastunet.Unet(8, dim_mults=(1, 2), block_norm="rms").double()
    convolutions = []
    monkeypatch.setattr(model.init_conv, "forward", lambda x: convolutions.append(x) or x)
    with fastunet.use_backend("triton"), pytest.raises(RuntimeError, match=r"backend 'triton' was requested, but the "
                                                       r"Triton kernels take float32, float16 and bfloat16, got a "
                                                       r"float64 model"):
        model(torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.tensor([5]))
    assert not convolutions, "the model computed before refusing float64"
