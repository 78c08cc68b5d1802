"""Upstream's building blocks with the same names, parameters and initialisation order, running their norms
through fastunet.functional (Triton or reference, chosen there)."""

import math

import einops.layers.torch
import torch
from torch import nn

from fastunet import functional
from fastunet.checks import check_module_input
from fastunet.recompute import draws_random_numbers, keep_only_convolutions, recompute_when_saved, saving_recipes

BLOCK_NORMS = ("group", "rms")


def Upsample(dim, dim_out=None):
    """Nearest x2 then a 3x3 conv: (B, dim, H, W) -> (B, dim_out, 2H, 2W)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out or dim, 3, padding=1))


PIXEL_UNSHUFFLE = "b c (h p1) (w p2) -> b (c p1 p2) h w"


class Rearrange(einops.layers.torch.Rearrange):
    """einops' Rearrange, the module upstream's Downsample has (same constructor, state and pickling), except that
    its pixel-unshuffle PIXEL_UNSHUFFLE gives a channels_last result for a channels_last input, from the one copy
    the rearrangement makes (einops' reshape writes NCHW, which the 1x1 convolution of a channels_last model would
    convert again)."""

    def forward(self, x):
        """PIXEL_UNSHUFFLE: (B, C, H, W) -> (B, C * p1 * p2, H / p1, W / p2), channel c * p1 * p2 + i * p2 + j from
        pixel (i, j); any other pattern as einops."""
        channels_last = x.dim() == 4 and x.stride(1) == 1 and not x.is_contiguous()
        if self.pattern != PIXEL_UNSHUFFLE or not channels_last:
            return super().forward(x)
        p1, p2 = self.axes_lengths["p1"], self.axes_lengths["p2"]
        batch, channels, height, width = x.shape
        if height % p1 or width % p2:
            return super().forward(x)  # einops' error
        # In memory (B, H/p1, p1, W/p2, p2, C); copied to (B, H/p1, W/p2, C, p1, p2), channels_last of the result.
        pixels = x.permute(0, 2, 3, 1).unflatten(2, (width // p2, p2)).unflatten(1, (height // p1, p1))
        unshuffled = pixels.permute(0, 1, 3, 5, 2, 4).reshape(batch, height // p1, width // p2, -1)
        return unshuffled.permute(0, 3, 1, 2)


def Downsample(dim, dim_out=None):
    """Pixel-unshuffle by 2 then a 1x1 conv: (B, dim, H, W) -> (B, dim_out, H/2, W/2)."""
    return nn.Sequential(Rearrange(PIXEL_UNSHUFFLE, p1=2, p2=2), nn.Conv2d(dim * 4, dim_out or dim, 1))


class RMSNorm(nn.Module):
    """Channel RMSNorm of upstream 2.x: `x / max(||x||_2 over C, 1e-12) * sqrt(C) * g`, per pixel of (B, C, H, W)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = dim**0.5
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x, scale_shift=None, silu=False, residual=None):
        """residual: x's shape and dtype, or None; added after the (optional) SiLU, in the same kernel."""
        check_module_input("RMSNorm", x, self.g)
        scale, shift = scale_shift if scale_shift is not None else (None, None)
        return functional.rms_norm_act(x, self.g.view(-1), scale, shift, silu, residual=residual)


class SinusoidalPosEmb(nn.Module):
    """(B,) times -> (B, dim) fixed sinusoidal features."""

    def __init__(self, dim, theta=10000):
        super().__init__()
        self.dim = dim
        self.theta = theta

    def forward(self, x):
        half_dim = self.dim // 2
        frequencies = torch.exp(torch.arange(half_dim, device=x.device) * -(math.log(self.theta) / (half_dim - 1)))
        angles = x[:, None] * frequencies[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class RandomOrLearnedSinusoidalPosEmb(nn.Module):
    """(B,) times -> (B, dim + 1): the time itself, then random (or learned) Fourier features."""

    def __init__(self, dim, is_random=False):
        super().__init__()
        if dim % 2:
            raise ValueError(f"learned_sinusoidal_dim must be even, got {dim}")
        self.weights = nn.Parameter(torch.randn(dim // 2), requires_grad=not is_random)

    def forward(self, x):
        x = x[:, None]
        angles = x * self.weights[None, :] * 2 * math.pi
        return torch.cat((x, angles.sin(), angles.cos()), dim=-1)


class Block(nn.Module):
    """3x3 conv, norm, `* (scale + 1) + shift`, SiLU, dropout: (B, dim, H, W) -> (B, dim_out, H, W).

    The norm, scale/shift and SiLU run as one fused op. block_norm "group" is nn.GroupNorm(groups, dim_out) as in
    upstream 1.9-1.11.1 (keys norm.weight, norm.bias); "rms" is upstream 2.x's channel RMSNorm (key norm.g).
    """

    def __init__(self, dim, dim_out, dropout=0.0, *, groups=8, block_norm="group"):
        super().__init__()
        if block_norm not in BLOCK_NORMS:
            raise ValueError(f"expected block_norm in {BLOCK_NORMS}, got {block_norm!r}")
        if block_norm == "group" and dim_out % groups:
            raise ValueError(f"expected resnet_block_groups={groups} to divide the block width, got width {dim_out}")
        self.block_norm = block_norm
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out) if block_norm == "group" else RMSNorm(dim_out)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, scale_shift=None, residual=None, *, recompute=False):
        """residual: (B, dim_out, H, W) or None, added to the output (a ResnetBlock's res_conv(x)); fused into the
        norm's kernel unless dropout is active or its dtype differs (then added after, with type promotion).
        recompute: True to have a backward that keeps the output recompute it from the convolution's output
        instead (fastunet.recompute.recompute_when_saved; not while dropout is active)."""
        check_module_input("Block", x, self.proj.weight)
        h = self.proj(x)
        out = self.activate(h, scale_shift, residual)
        if recompute and not draws_random_numbers(self):
            recompute_when_saved(out, self.activate, h, scale_shift, residual)
        return out

    def activate(self, x, scale_shift=None, residual=None):
        """Everything after the convolution: norm, scale/shift, SiLU, dropout, + residual, of x (B, dim_out, H, W)."""
        fused = residual if residual is not None and residual.dtype == x.dtype and not (
            self.training and self.dropout.p > 0) else None
        if self.block_norm == "group":
            scale, shift = scale_shift if scale_shift is not None else (None, None)
            norm = self.norm
            x = functional.group_norm_act(x, norm.weight, norm.bias, norm.num_groups, scale, shift, True, norm.eps,
                                          residual=fused)
        else:
            x = self.norm(x, scale_shift, silu=True, residual=fused)
        x = self.dropout(x)
        return x if residual is None or fused is not None else x + residual

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of the other block norm would otherwise fail later with a list of missing keys, or with
        # strict=False load silently without its norms.
        theirs = "rms" if prefix + "norm.g" in state_dict else "group" if prefix + "norm.weight" in state_dict else None
        if theirs is not None and theirs != self.block_norm:
            keys = {"rms": "'norm.g' (upstream 2.x)", "group": "'norm.weight'/'norm.bias' (upstream 1.9-1.11.1)"}
            norms = {"rms": "an RMSNorm", "group": "a GroupNorm"}
            raise ValueError(
                f"checkpoint at '{prefix}norm' holds {norms[theirs]} block norm, keys {keys[theirs]}; this model was built "
                f"with block_norm={self.block_norm!r}, expecting keys {keys[self.block_norm]}. "
                f"Build the model with block_norm={theirs!r} to load it."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def time_mlp_scale_shifts(blocks, time_emb):
    """Every block's `mlp(time_emb).chunk(2, dim=1)` from one SiLU and one GEMM: [(scale, shift), ...] in the order
    of `blocks` (ResnetBlocks), each a (B, dim_out) view of one (B, sum of 2 * dim_out) result.

    The blocks' own Linear weights are concatenated on each call (one copy of a few hundred KB), so parameters,
    their names and their gradients stay those of each block's `mlp`. time_emb: (B, time_emb_dim).
    """
    linears = [block.mlp[1] for block in blocks]
    weight = torch.cat([linear.weight for linear in linears])
    bias = torch.cat([linear.bias for linear in linears])
    outputs = nn.functional.linear(nn.functional.silu(time_emb), weight, bias)
    return [piece.chunk(2, dim=1) for piece in outputs.split([linear.out_features for linear in linears], dim=1)]


class ResnetBlock(nn.Module):
    """Two Blocks with time-conditioned scale/shift on the first, plus a residual: (B, dim, H, W) -> (B, dim_out, H, W).

    time_emb: (B, time_emb_dim), mapped by `mlp` to a (scale, shift) pair of (B, dim_out) each.
    """

    def __init__(self, dim, dim_out, *, time_emb_dim=None, dropout=0.0, groups=8, block_norm="group"):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2)) if time_emb_dim is not None else None
        self.block1 = Block(dim, dim_out, dropout=dropout, groups=groups, block_norm=block_norm)
        self.block2 = Block(dim_out, dim_out, groups=groups, block_norm=block_norm)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb=None, *, scale_shift=None, recompute=False):
        """scale_shift: this block's (scale, shift), each (B, dim_out), already computed from time_emb by the caller
        (fastunet.Unet runs every block's time MLP as one GEMM, time_mlp_scale_shifts); time_emb is then unused.

        recompute: True to keep the two 3x3 convolutions' outputs for the backward but not block1's activation
        (norm, scale/shift, SiLU), which the backward then recomputes from the first one (fastunet.recompute):
        one activation less kept per block, same values and gradients. fastunet.Unet sets it by default on its
        Triton path, and with checkpointing="selective".
        """
        if scale_shift is None and self.mlp is not None and time_emb is not None:
            check_module_input("ResnetBlock", time_emb, self.mlp[1].weight, ndim=2)
            # Views of the (B, 2 * dim_out) MLP output; the fused op reads them through their strides.
            scale_shift = self.mlp(time_emb).chunk(2, dim=1)
        if recompute and torch.compiler.is_compiling():
            # The same saving as a region for torch.compile, which cannot carry the eager recipes. block2's norm
            # stays outside the region: its output is the block's, which the next layer keeps anyway.
            h = keep_only_convolutions(self._convolutions, x, scale_shift, kept=(self.block1.proj, self.block2.proj),
                                       random=draws_random_numbers(self.block1))
            return self.block2.activate(h, residual=self.res_conv(x))
        with saving_recipes(enabled=recompute):
            h = self.block1(x, scale_shift=scale_shift, recompute=recompute)
            return self.block2(h, residual=self.res_conv(x))

    def _convolutions(self, x, scale_shift):
        """block1, then block2's convolution: (B, dim, H, W) -> (B, dim_out, H, W), before block2's norm."""
        return self.block2.proj(self.block1(x, scale_shift=scale_shift))
