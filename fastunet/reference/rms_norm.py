"""Reference for the channel RMSNorm of upstream 2.x, fused with time scale/shift and an optional SiLU."""

import torch

from fastunet.reference.precision import upcast
from fastunet.reference.scale_shift_act import add_residual, per_channel, scale_shift_act


def rms_norm_act(x, g, scale=None, shift=None, silu=False, eps=1e-12, residual=None):
    """`silu?(x / max(||x||_2 over C, eps) * sqrt(C) * g * (scale + 1) + shift) + residual`, per pixel.

    Computed in fp32, returned in x.dtype (rounded once, after the residual is added).
    x: (B, C, H, W) fp32/fp16/bf16, any strides.
    g: (C,) gain, any float dtype.
    scale, shift: (B, C) or None.
    residual: x's shape, or None (e.g. the input of an attention block, `to_out(...) + x`).
    """
    x_float = upcast(x)
    inverse_norm = torch.linalg.vector_norm(x_float, dim=1, keepdim=True).clamp_min(eps).reciprocal()
    # The per-channel factors fold into one (B or 1, C, 1, 1) multiplier: two passes over x instead of five.
    multiplier = per_channel(g) * x.shape[1] ** 0.5
    if scale is not None:
        multiplier = multiplier * (per_channel(scale) + 1)
    y = scale_shift_act(x_float * inverse_norm, multiplier, None if shift is None else per_channel(shift), silu)
    return add_residual(y, residual).to(x.dtype)
