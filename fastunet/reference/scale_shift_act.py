"""The epilogue shared by both fused norms: `silu?(y * multiplier + shift)`."""

import torch
import torch.nn.functional as F

from fastunet.reference.precision import upcast


def per_channel(t):
    """(B, C) or (C,) -> fp32, broadcastable against (B, C, H, W)."""
    return upcast(t)[..., None, None]


def scale_shift_act(y, multiplier, shift, silu):
    """y (B, C, H, W) fp32; multiplier, shift broadcastable per (B, C) or None; returns fp32 of y's shape.

    One fused multiply-add instead of separate passes: the reference path is also the CPU path, and upstream's
    `x * (scale + 1) + shift` costs two passes over the activation and two more in backward.
    """
    if multiplier is not None and shift is not None:
        y = torch.addcmul(shift, y, multiplier)
    elif multiplier is not None:
        y = y * multiplier
    elif shift is not None:
        y = y + shift
    return F.silu(y) if silu else y


def add_residual(y, residual):
    """y + residual in y's precision (fp32, or float64), or y when residual is None."""
    return y if residual is None else y + residual.to(y.dtype)
