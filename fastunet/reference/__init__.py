"""Pure-PyTorch definitions of fastunet's fused ops. Each Triton kernel in fastunet.kernels must match these."""

from fastunet.reference.attention import attention, packed_attention
from fastunet.reference.group_norm import group_norm_act
from fastunet.reference.linear_attention import linear_attention, packed_linear_attention
from fastunet.reference.rms_norm import rms_norm_act

__all__ = ["attention", "group_norm_act", "linear_attention", "packed_attention", "packed_linear_attention",
           "rms_norm_act"]
