"""Reference for the fused GroupNorm + time scale/shift + SiLU of every ResnetBlock (block_norm="group")."""

import torch.nn.functional as F

from fastunet.reference.precision import upcast
from fastunet.reference.scale_shift_act import add_residual, per_channel, scale_shift_act


def group_norm_act(x, weight, bias, groups, scale=None, shift=None, silu=True, eps=1e-5, residual=None):
    """`silu?(group_norm(x) * (scale + 1) + shift) + residual`, computed in fp32 (float64 for float64 x), returned
    in x.dtype (rounded once, after the residual is added).

    x: (B, C, H, W) fp32/fp16/bf16, any strides.
    weight, bias: (C,) or None (GroupNorm affine parameters, any float dtype).
    groups: number of groups G, dividing C. Statistics are over (C/G, H, W) for each (batch, group).
    scale, shift: (B, C) or None, any float dtype (the time MLP's output; fp32 under autocast is fine).
    residual: x's shape, or None (a ResnetBlock's `res_conv(x)`).
    """
    x_up = upcast(x)
    y = F.group_norm(
        x_up,
        groups,
        None if weight is None else weight.to(x_up.dtype),
        None if bias is None else bias.to(x_up.dtype),
        eps,
    )
    multiplier = None if scale is None else per_channel(scale) + 1
    y = scale_shift_act(y, multiplier, None if shift is None else per_channel(shift), silu)
    return add_residual(y, residual).to(x.dtype)
