"""Per-dtype tolerances, written once, and a comparison whose failure says where and by how much.

Outputs of the fused ops are rounded once to the input dtype after fp32 math, so the tolerances are a few
units in the last place of that dtype: fp16 has 11 significant bits (ulp 9.8e-4 relative), bf16 8 bits
(ulp 7.8e-3; the interpreter truncates instead of rounding, so two ulps). fp32 allows reduction-order
differences of long sums.
"""

import torch

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual, expected, dtype=None, what="result", atol=None, rtol=None):
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, reporting the worst element."""
    tol = dict(TOLERANCES[dtype or expected.dtype])
    if atol is not None:
        tol["atol"] = atol
    if rtol is not None:
        tol["rtol"] = rtol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(e)
    excess = ((a - e).abs() - (tol["atol"] + tol["rtol"] * e.abs())).masked_fill(both_nan, 0).nan_to_num(nan=float("inf"))
    if (excess > 0).any():
        worst = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        count = int((excess > 0).sum())
        raise AssertionError(
            f"{what}: {count} of {e.numel()} elements out of tolerance (atol={tol['atol']}, rtol={tol['rtol']}); "
            f"worst at {worst}: got {a[worst].item():.6g}, expected {e[worst].item():.6g}, "
            f"max abs error {(a - e).abs().nan_to_num(nan=float('inf')).max().item():.3g}"
        )


def assert_sum_close(actual, expected, summed, what):
    """Parameter gradients are sums over `summed` (batch, pixel) terms of O(1) size, accumulated in fp32 in
    different orders by the kernel and by PyTorch: their rounding errors have random signs and grow like
    sqrt(summed), so the absolute tolerance of the gradient's dtype is scaled by sqrt(summed)."""
    atol = TOLERANCES[expected.dtype]["atol"] * max(1.0, summed ** 0.5)
    assert_close(actual, expected, what=what, atol=atol)
