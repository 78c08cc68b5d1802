"""Reference for the channel RMSNorm of upstream 2.x, fused with time scale/shift and an optional SiLU."""

import torch.nn.functional as F

from fastunet.reference.scale_shift_act import scale_shift_act


def rms_norm_act(x, g, scale=None, shift=None, silu=False, eps=1e-12):
    """`silu?(x / max(||x||_2 over C, eps) * sqrt(C) * g * (scale + 1) + shift)`, per pixel.

    Computed in fp32, returned in x.dtype.
    x: (B, C, H, W) fp32/fp16/bf16, any strides.
    g: (C,) gain, any float dtype.
    scale, shift: (B, C) or None.
    """
    channels = x.shape[1]
    # Same operation order as upstream's RMSNorm (normalize, times g, times sqrt(C)) so that fp32 results agree
    # to the last bit where the kernels of PyTorch agree.
    y = F.normalize(x.float(), dim=1, eps=eps) * g.float()[None, :, None, None] * (channels**0.5)
    return scale_shift_act(y, scale, shift, silu).to(x.dtype)
