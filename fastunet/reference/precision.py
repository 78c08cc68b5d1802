"""The precision the reference computes in: at least fp32, and float64 for float64 input."""

import torch


def upcast(t):
    """`t` in fp32 if it is fp16/bf16/fp32 (statistics in fp32, as in the kernels); float64 stays float64, so that
    a `model.double()` (gradcheck, debugging) computes in float64 all the way through."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
