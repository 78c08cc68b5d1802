"""The fused norms' shared epilogue (kernels/scale_shift_act.py): SiLU and its derivative, as the kernels compute
them (on CPU through the interpreter, on CUDA with the fast exp2 and reciprocal), against float64 over the whole
fp32 range, saturation included."""

import pytest
import torch
import triton
import triton.language as tl

from fastunet.kernels.scale_shift_act import activation, activation_backward
from tolerances import assert_close


@triton.jit
def _epilogue_kernel(u_ptr, grad_ptr, out_ptr, grad_u_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, activation(u, True), mask=mask)
    tl.store(grad_u_ptr + offsets, activation_backward(grad, u, True), mask=mask)


def _pre_activations(device):
    """Every decade of |u| from 1e-30 to 1e30 both signs, zero, a dense sweep of [-30, 30] where the derivative
    moves, and the points where exp(-u) overflows fp32 (u < -88.7)."""
    decades = torch.logspace(-30, 30, 61, dtype=torch.float64)
    sweep = torch.linspace(-30, 30, 6001, dtype=torch.float64)
    edges = torch.tensor([0.0, -88.0, -88.8, -89.0, -100.0, -1e5, 1e5, 88.8], dtype=torch.float64)
    return torch.cat([decades, -decades, sweep, edges]).to(device, torch.float32)


def test_silu_and_its_derivative_across_the_fp32_range(device):
    """y = u * sigmoid(u) and dy/du = sigmoid(u) * (1 + u * (1 - sigmoid(u))) as the kernels compute them (its
    derivative in the two-multiply-add form sig + sig * (u - u * sig)), against float64: within fp32's tolerance
    plus 4 ulps of the result (the fast exp2 and reciprocal are each within 2 ulps), finite everywhere, exactly 0
    and 1 where the sigmoid saturates."""
    u = _pre_activations(device)
    grad = torch.full_like(u, 1.0)
    out, grad_u = torch.empty_like(u), torch.empty_like(u)
    _epilogue_kernel[(triton.cdiv(u.numel(), 1024),)](u, grad, out, grad_u, u.numel(), BLOCK=1024)
    exact = u.double()
    sigmoid = torch.sigmoid(exact)
    expected_out = exact * sigmoid
    expected_grad = sigmoid * (1 + exact * (1 - sigmoid))
    ulps = 4 * torch.finfo(torch.float32).eps
    assert torch.isfinite(out).all() and torch.isfinite(grad_u).all()
    assert_close(out.double(), expected_out, torch.float32, what="silu(u)", rtol=1e-5 + ulps)
    assert_close(grad_u.double(), expected_grad, torch.float32, what="silu'(u)", rtol=1e-5 + ulps)
    saturated_low, saturated_high = u < -100, u > 100
    assert (grad_u[saturated_low] == 0).all(), "the derivative must be exactly 0 where the sigmoid is 0"
    assert (grad_u[saturated_high] == 1).all(), "the derivative must be exactly 1 where the sigmoid is 1"


@pytest.mark.parametrize("scale", [0.5, -3.0])
def test_derivative_scales_the_incoming_gradient(device, scale):
    """activation_backward multiplies the incoming gradient by the derivative (and passes 0 through as 0)."""
    u = _pre_activations(device)
    out, grad_u = torch.empty_like(u), torch.empty_like(u)
    ones, scaled = torch.ones_like(u), torch.full_like(u, scale)
    _epilogue_kernel[(triton.cdiv(u.numel(), 1024),)](u, ones, out, grad_u, u.numel(), BLOCK=1024)
    unit = grad_u.clone()
    _epilogue_kernel[(triton.cdiv(u.numel(), 1024),)](u, scaled, out, grad_u, u.numel(), BLOCK=1024)
    assert_close(grad_u, unit * scale, torch.float32, what="scaled derivative", atol=0.0, rtol=1e-6)
    _epilogue_kernel[(triton.cdiv(u.numel(), 1024),)](u, torch.zeros_like(u), out, grad_u, u.numel(), BLOCK=1024)
    assert (grad_u == 0).all()
