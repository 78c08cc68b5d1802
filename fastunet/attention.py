"""Upstream's Attention and LinearAttention with the same parameters, their cores run through fastunet.functional."""

import torch
from einops import rearrange
from torch import nn

from fastunet import functional
from fastunet.layers import RMSNorm


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

    def forward(self, x):
        height = x.shape[-2]
        qkv = self.to_qkv(self.norm(x))
        # (B, heads, dim_head, H*W) views of the conv output: no copies, the kernels read strides.
        q, k, v = rearrange(qkv, "b (qkv h d) x y -> qkv b h d (x y)", qkv=3, h=self.heads)
        mem_k, mem_v = self.mem_kv
        out = functional.linear_attention(q, k, v, mem_k, mem_v)
        return self.to_out(rearrange(out, "b h d (x y) -> b (h d) x y", x=height))


class Attention(nn.Module):
    """Pre-norm full attention over learned memory key/values then the H*W positions: (B, dim, H, W) -> same.

    mem_kv: (2, heads, num_mem_kv, dim_head). flash: on the reference backend, compute with torch's
    scaled_dot_product_attention (any backend, so fp32 works, unlike upstream); the Triton kernel is a flash
    kernel either way.
    """

    def __init__(self, dim, heads=4, dim_head=32, num_mem_kv=4, flash=False):
        super().__init__()
        self.heads = heads
        self.flash = flash
        hidden_dim = dim_head * heads
        self.norm = RMSNorm(dim)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head))
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        height = x.shape[-2]
        qkv = self.to_qkv(self.norm(x))
        # (B, heads, H*W, dim_head) views of the conv output: no copies, the kernels read strides.
        q, k, v = rearrange(qkv, "b (qkv h d) x y -> qkv b h (x y) d", qkv=3, h=self.heads)
        mem_k, mem_v = self.mem_kv
        out = functional.attention(q, k, v, mem_k, mem_v, sdpa=self.flash)
        return self.to_out(rearrange(out, "b h (x y) d -> b (h d) x y", x=height))
