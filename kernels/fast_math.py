"""The GPU's fast exp, division and reciprocal for the kernels, with exact forms under the interpreter.

On a GPU, `exp` is ex2.approx.ftz of x * log2(e) (libdevice's exp2: an FMUL and one special-function op),
`reciprocal` is rcp.approx.ftz (one special-function op) and `divide` is div.approx.ftz (a reciprocal and a
multiply). tl.exp and a division take their full-range forms instead: a range test and two rescaling multiplies
around every ex2, range tests and rescaling around every rcp (bench/static_report.py counts them). Each fast form is within 2 ulp in fp32; what it flushes to zero lies below
1e-38. The interpreter has no libdevice: it evaluates the exact forms.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastunet.kernels import INTERPRETING

FAST_MATH = tl.constexpr(not INTERPRETING)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def exp(x):
    """e^x, fp32 (FAST_MATH: ex2.approx.ftz of x * log2(e); results below 2^-126 flush to 0)."""
    if FAST_MATH:
        return libdevice.exp2(x * LOG2E)
    return tl.exp(x)


@triton.jit
def divide(numerator, denominator):
    """numerator / denominator, fp32 (FAST_MATH: div.approx.ftz, a reciprocal and a multiply)."""
    if FAST_MATH:
        return libdevice.fast_dividef(numerator, denominator)
    return numerator / denominator


@triton.jit
def reciprocal(denominator):
    """1 / denominator, fp32 (FAST_MATH: rcp.approx.ftz, one special-function op; div.approx.ftz of 1 by the same
    denominator costs it a flush-to-zero add besides)."""
    if FAST_MATH:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [denominator], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return 1.0 / denominator
