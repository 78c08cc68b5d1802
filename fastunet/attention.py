"""Upstream's Attention and LinearAttention with the same parameters, their cores run through fastunet.functional.

Both take the to_qkv convolution's output whole (fastunet.functional.packed_attention / packed_linear_attention):
the kernels read q, k, v through its strides and write its gradient as one tensor, so autograd splits and joins
nothing. forward(x, residual=None, *, recompute=None): `residual`, when given, is added to the layer's output
(the Unet's `attn(x) + x`), fused into LinearAttention's output norm where the norm op takes it; `recompute` says
what the backward recomputes instead of keeping it (recompute_in_backward).
"""

import torch
from torch import nn

from fastunet import functional
from fastunet.checks import check_module_input
from fastunet.layers import RMSNorm
from fastunet.recompute import draws_random_numbers, keep_only_convolutions, recompute_when_saved, saving_recipes


class LinearAttention(nn.Module):
    """Pre-norm linear attention with learned memory key/values: (B, dim, H, W) -> (B, dim, H, W), no residual.

    mem_kv: (2, heads, dim_head, num_mem_kv), transposed relative to Attention's, as upstream.
    """

    def __init__(self, dim, heads=4, dim_head=32, num_mem_kv=4):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden_dim = dim_head * heads
        self.norm = RMSNorm(dim)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, dim_head, num_mem_kv))
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1), RMSNorm(dim))

    def forward(self, x, residual=None, *, recompute=None):
        """x (B, dim, H, W) -> (B, dim, H, W); plus `residual` (B, dim, H, W) when given. recompute: see
        recompute_in_backward."""
        check_module_input(type(self).__name__, x, self.to_qkv.weight)
        projection, norm = self.to_out
        out = recompute_in_backward(self, x, recompute, projection)
        if residual is None:
            return norm(out)
        if residual.dtype == out.dtype and residual.shape == out.shape:
            return norm(out, residual=residual)  # added inside the norm's kernel: one launch and pass fewer
        return norm(out) + residual

    def _project(self, x, recompute=False):
        """to_out's convolution of the attention of norm(x): (B, dim, H, W) -> (B, dim, H, W), before to_out's norm."""
        return _attend_and_project(self, x, functional.packed_linear_attention, self.to_out[0], recompute)


class Attend(nn.Module):
    """Upstream's Attend, the attention core of Attention, with its attributes (it has no parameters).

    flash: compute with torch's scaled_dot_product_attention on the reference backend (any SDPA backend, so fp32
        works too); the Triton kernel is a flash kernel either way.
    dropout (flash) / attn_dropout.p (otherwise), in training: dropout on the attention weights, as upstream.
        The Triton kernels have none: the "auto" backend then runs the reference, "triton" raises.
    scale: the softmax scale, dim_head**-0.5 when None; with flash, upstream multiplies q by scale / dim_head
        before SDPA's own dim_head**-0.5, and so does this.

    Unlike upstream's forward(q, k, v), forward takes the to_qkv output (B, 3*heads*dim_head, H, W), the memory
    key/values (2, heads, M, dim_head) and the number of heads, and returns (B, heads*dim_head, H, W).
    """

    def __init__(self, dropout=0.0, flash=False, scale=None):
        super().__init__()
        self.dropout = dropout
        self.scale = scale
        self.attn_dropout = nn.Dropout(dropout)
        self.flash = flash

    def forward(self, qkv, mem_kv, heads):
        dim_head = qkv.shape[1] // (3 * heads)
        if self.flash:
            dropout = self.dropout if self.training else 0.0
            scale = None if self.scale is None else self.scale / dim_head * dim_head**-0.5
        else:
            dropout = self.attn_dropout.p if self.attn_dropout.training else 0.0
            scale = self.scale
        return functional.packed_attention(qkv, mem_kv, heads, sdpa=self.flash, dropout=dropout, scale=scale)


class Attention(nn.Module):
    """Pre-norm full attention over learned memory key/values then the H*W positions: (B, dim, H, W) -> same.

    mem_kv: (2, heads, num_mem_kv, dim_head). flash: sets `attend.flash` (see Attend).
    """

    def __init__(self, dim, heads=4, dim_head=32, num_mem_kv=4, flash=False):
        super().__init__()
        self.heads = heads
        hidden_dim = dim_head * heads
        self.norm = RMSNorm(dim)
        self.attend = Attend(flash=flash)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head))
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    @property
    def flash(self):
        """Whether the reference backend computes with SDPA: `attend.flash`, as upstream keeps it."""
        return self.attend.flash

    @flash.setter
    def flash(self, value):
        self.attend.flash = value

    def forward(self, x, residual=None, *, recompute=None):
        """x (B, dim, H, W) -> (B, dim, H, W); plus `residual` (B, dim, H, W) when given. recompute: see
        recompute_in_backward."""
        check_module_input(type(self).__name__, x, self.to_qkv.weight)
        out = recompute_in_backward(self, x, recompute, self.to_out)
        return out if residual is None else out + residual

    def _project(self, x, recompute=False):
        """to_out of the attention of norm(x): (B, dim, H, W) -> (B, dim, H, W)."""
        return _attend_and_project(self, x, self.attend, self.to_out, recompute)


def _attend_and_project(layer, x, core, projection, recompute=False):
    """projection(core(to_qkv(norm(x)), mem_kv, heads)) of either attention layer: (B, dim, H, W) -> (B, dim, H, W).
    recompute: mark the norm's and (without dropout) the core's outputs for recomputation (recompute_in_backward)."""
    normed = layer.norm(x)
    qkv = layer.to_qkv(recompute_when_saved(normed, layer.norm, x) if recompute else normed)
    out = core(qkv, layer.mem_kv, layer.heads)
    if recompute and not draws_random_numbers(layer):
        recompute_when_saved(out, core, qkv, layer.mem_kv, layer.heads)
    return projection(out)


RECOMPUTE = (None, "core", "layer")


def recompute_in_backward(layer, x, recompute, projection):
    """layer._project(x) (norm, to_qkv, attention core, the `projection` out), keeping for the backward:
    - recompute=None: everything its backward needs;
    - "core": x and both convolutions' outputs; the norm and the attention core are recomputed (memory-bound, or
      for full attention small at the Unet's sizes). In eager execution by recipes, under torch.compile by a
      selective-checkpoint region (fastunet.recompute);
    - "layer": x and the projection's output; the to_qkv convolution is recomputed too.
    Same values and gradients (fastunet.recompute)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"{type(layer).__name__}: expected recompute in {RECOMPUTE}, got {recompute!r}")
    if recompute is None:
        return layer._project(x)
    if recompute == "core" and not torch.compiler.is_compiling():
        with saving_recipes():
            return layer._project(x, recompute=True)
    kept, others = ((layer.to_qkv, projection), ()) if recompute == "core" else ((projection,), (layer.to_qkv,))
    return keep_only_convolutions(layer._project, x, kept=kept, others=others, random=draws_random_numbers(layer))
