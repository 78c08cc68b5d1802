"""The epilogue shared by both fused norms: `act(y * (scale + 1) + shift)`."""

import torch.nn.functional as F


def scale_shift_act(y, scale, shift, silu):
    """y (B, C, H, W) fp32; scale, shift (B, C) or None; returns fp32 of y's shape."""
    if scale is not None:
        y = y * (scale.float()[:, :, None, None] + 1)
    if shift is not None:
        y = y + shift.float()[:, :, None, None]
    if silu:
        y = F.silu(y)
    return y
