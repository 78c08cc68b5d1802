"""fastunet.Unet: denoising-diffusion-pytorch's Unet, same constructor, names and forward, fused hot paths."""

from functools import partial

import torch
from torch import nn

from fastunet.attention import Attention, LinearAttention
from fastunet.backend import requested_backend, use_triton
from fastunet.checks import check_finite, describe, dtype_name
from fastunet.recompute import draws_random_numbers, keep_only_convolutions
from fastunet.layers import (
    BLOCK_NORMS,
    time_mlp_scale_shifts,
    Downsample,
    RandomOrLearnedSinusoidalPosEmb,
    ResnetBlock,
    SinusoidalPosEmb,
    Upsample,
)


# The nn.Module method that converts a model to the dtype of an input, named in the dtype-mix error.
_CONVERSIONS = {torch.float16: "half()", torch.bfloat16: "bfloat16()", torch.float32: "float()", torch.float64: "double()"}


CHECKPOINTING = (None, "selective", "full", False)
# What each mode recomputes in the backward (fastunet.recompute): the ResnetBlocks' `recompute` (block1's
# activation), the attention layers' `recompute` (fastunet.attention.recompute_in_backward), and whether each
# ResnetBlock is recomputed whole from its input. The default mode recomputes on the Triton path only: there each
# recomputed op is one memory-bound kernel, while on the reference path it is several ATen ops, and the CPU
# training step would be slower than upstream's (measured 1.26x with it, at bench/bench_unet.py's CPU size).
_RECOMPUTE = {
    None: (True, "core", False),
    "selective": (True, "layer", False),
    "full": (False, "layer", True),
    False: (False, None, False),
}


def _per_stage(value, num_stages, name):
    values = value if isinstance(value, tuple) else (value,) * num_stages
    if len(values) != num_stages:
        raise ValueError(f"expected {name} to be one value or a tuple of {num_stages} (one per stage), got {value!r}")
    return values


class Unet(nn.Module):
    """Drop-in for `denoising_diffusion_pytorch.Unet` (2.3.4 constructor, same positional order).

    Extra keyword-only arguments:
    - resnet_block_groups: GroupNorm groups of each Block (block_norm="group"), as upstream <= 1.11.1.
    - block_norm: "group" (default; GroupNorm, loads upstream 1.9-1.11.1 checkpoints) or "rms" (channel RMSNorm,
      exactly upstream 2.x; loads 2.x checkpoints).
    - checkpointing: what the backward recomputes instead of keeping it from the forward (fastunet.recompute),
      with the same values and gradients in every mode, and only while gradients are enabled:
      - None (default): on the Triton path, the memory-bound ops between convolutions whose outputs only a
        convolution's backward reads: each ResnetBlock's first norm + scale/shift + SiLU, and the attention
        layers' pre-norms and attention cores. No convolution is recomputed. The reference path recomputes
        nothing by default (see _RECOMPUTE).
      - "selective": that, and the attention layers' to_qkv convolutions: every ResnetBlock convolution's output
        is kept, the attention layers keep only their input and output.
      - "full": each ResnetBlock recomputed from its input, and the attention layers as in "selective".
      - False: nothing; every activation the backward needs is kept (the most memory, the least backward work).

    forward(x, time, x_self_cond=None): x (B, channels, H, W) in the model's dtype (any float dtype under
    autocast), H and W divisible by downsample_factor; time (B,), (1,) or () of any int or float dtype, finite;
    x_self_cond like x (only with self_condition). Returns (B, out_dim, H, W). A float64 model (model.double())
    runs on the reference backend.
    """

    def __init__(
        self,
        dim,
        init_dim=None,
        out_dim=None,
        dim_mults=(1, 2, 4, 8),
        channels=3,
        self_condition=False,
        learned_variance=False,
        learned_sinusoidal_cond=False,
        random_fourier_features=False,
        learned_sinusoidal_dim=16,
        sinusoidal_pos_emb_theta=10000,
        dropout=0.0,
        attn_dim_head=32,
        attn_heads=4,
        full_attn=None,  # falsy: full attention only in the innermost stage
        flash_attn=False,
        *,
        resnet_block_groups=8,
        block_norm="group",
        checkpointing=None,
    ):
        super().__init__()
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"expected checkpointing in {CHECKPOINTING}, got {checkpointing!r}")
        self.checkpointing = checkpointing
        if block_norm not in BLOCK_NORMS:
            raise ValueError(f"expected block_norm in {BLOCK_NORMS}, got {block_norm!r}")
        self.block_norm = block_norm

        self.channels = channels
        self.self_condition = self_condition
        input_channels = channels * (2 if self_condition else 1)

        init_dim = dim if init_dim is None else init_dim
        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        if block_norm == "group":
            widths = sorted({*dims, *(d for d, _ in in_out)})
            bad = [w for w in widths if w % resnet_block_groups]
            if bad:
                raise ValueError(
                    f"expected resnet_block_groups={resnet_block_groups} to divide every block width {widths}, "
                    f"got widths {bad} that it does not divide"
                )

        self.init_conv = nn.Conv2d(input_channels, init_dim, 7, padding=3)

        time_dim = dim * 4
        self.random_or_learned_sinusoidal_cond = learned_sinusoidal_cond or random_fourier_features
        if self.random_or_learned_sinusoidal_cond:
            position_embedding = RandomOrLearnedSinusoidalPosEmb(learned_sinusoidal_dim, random_fourier_features)
            fourier_dim = learned_sinusoidal_dim + 1
        else:
            position_embedding = SinusoidalPosEmb(dim, theta=sinusoidal_pos_emb_theta)
            fourier_dim = dim
        self.time_mlp = nn.Sequential(
            position_embedding, nn.Linear(fourier_dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )

        num_stages = len(dim_mults)
        if not full_attn:
            full_attn = (*((False,) * (num_stages - 1)), True)
        full_attn = _per_stage(full_attn, num_stages, "full_attn")
        attn_heads = _per_stage(attn_heads, num_stages, "attn_heads")
        attn_dim_head = _per_stage(attn_dim_head, num_stages, "attn_dim_head")

        full_attention = partial(Attention, flash=flash_attn)
        resnet_block = partial(
            ResnetBlock, time_emb_dim=time_dim, dropout=dropout, groups=resnet_block_groups, block_norm=block_norm
        )

        # Built in upstream's order, so that the same seed gives the same initial weights (mem_kv uses randn).
        self.downs = nn.ModuleList([])
        self.ups = nn.ModuleList([])
        stages = list(zip(in_out, full_attn, attn_heads, attn_dim_head))
        for index, ((dim_in, dim_out), layer_full_attn, heads, dim_head) in enumerate(stages):
            is_last = index == num_stages - 1
            attention_class = full_attention if layer_full_attn else LinearAttention
            self.downs.append(nn.ModuleList([
                resnet_block(dim_in, dim_in),
                resnet_block(dim_in, dim_in),
                attention_class(dim_in, dim_head=dim_head, heads=heads),
                Downsample(dim_in, dim_out) if not is_last else nn.Conv2d(dim_in, dim_out, 3, padding=1),
            ]))

        mid_dim = dims[-1]
        self.mid_block1 = resnet_block(mid_dim, mid_dim)
        self.mid_attn = full_attention(mid_dim, heads=attn_heads[-1], dim_head=attn_dim_head[-1])
        self.mid_block2 = resnet_block(mid_dim, mid_dim)

        for index, ((dim_in, dim_out), layer_full_attn, heads, dim_head) in enumerate(reversed(stages)):
            is_last = index == num_stages - 1
            attention_class = full_attention if layer_full_attn else LinearAttention
            self.ups.append(nn.ModuleList([
                resnet_block(dim_out + dim_in, dim_out),
                resnet_block(dim_out + dim_in, dim_out),
                attention_class(dim_out, dim_head=dim_head, heads=heads),
                Upsample(dim_out, dim_in) if not is_last else nn.Conv2d(dim_out, dim_in, 3, padding=1),
            ]))

        self.out_dim = out_dim if out_dim is not None else channels * (2 if learned_variance else 1)
        self.final_res_block = resnet_block(init_dim * 2, init_dim)
        self.final_conv = nn.Conv2d(init_dim, self.out_dim, 1)

    @property
    def downsample_factor(self):
        return 2 ** (len(self.downs) - 1)

    def _check_inputs(self, x, time, x_self_cond):
        """Raise TypeError/ValueError, naming what was expected and what came, before anything is computed.

        Returns `time` ready for the time MLP: shape (B,) (a time of shape (1,) or () is broadcast over the batch, as
        upstream's (1, C) scale/shift broadcast does) in the MLP's dtype, and at least fp32: upstream's int times
        up to 1000 are not exact in bf16.
        """
        parameter = self.init_conv.weight
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise TypeError(f"Unet: expected x as a 4-D float tensor (batch, {self.channels}, H, W), got {describe(x)}")
        batch, channels, height, width = x.shape
        if channels != self.channels:
            raise ValueError(f"Unet: expected x with {self.channels} channels, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"Unet: expected a batch of at least one image of at least one pixel, got x of shape "
                             f"{tuple(x.shape)}")
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"Unet: expected H and W divisible by downsample_factor={factor}, got {height}x{width}")
        if x.device != parameter.device:
            raise ValueError(f"Unet: expected x on the model's device {parameter.device}, got {describe(x)}; "
                             f"move one of them, e.g. x.to({str(parameter.device)!r})")
        if x.dtype != parameter.dtype and not torch.is_autocast_enabled(x.device.type):
            wanted, got = dtype_name(parameter.dtype), dtype_name(x.dtype)
            convert = _CONVERSIONS.get(x.dtype, f"to(torch.{got})")
            raise TypeError(
                f"Unet: expected x of the model's dtype {wanted} outside autocast, got {describe(x)}; either convert "
                f"the model with model.{convert} or keep it in {wanted} and run it under "
                f"torch.autocast({x.device.type!r}, dtype=torch.{got})"
            )
        if x.dtype == torch.float64 and requested_backend() == "triton" and not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError("Unet: fastunet backend 'triton' was requested, but the Triton kernels take float32, "
                               "float16 and bfloat16, got a float64 model and x; float64 runs on the reference backend "
                               "(use_backend('auto') or 'reference')")
        if not isinstance(time, torch.Tensor) or time.dtype == torch.bool or time.is_complex():
            raise TypeError(f"Unet: expected time as an int or float tensor of shape ({batch},), got {describe(time)}")
        if time.shape not in ((batch,), (1,), ()):
            raise ValueError(f"Unet: expected time of shape ({batch},) for a batch of {batch} (or (1,) or () for one "
                             f"time for all), got {tuple(time.shape)}")
        if time.device != x.device:
            raise ValueError(f"Unet: expected time on x's device {x.device}, got {describe(time)}")
        check_finite("Unet", "time", time)
        if x_self_cond is not None:
            if not self.self_condition:
                raise ValueError("Unet: got x_self_cond, but the model was built with self_condition=False")
            if not isinstance(x_self_cond, torch.Tensor) or x_self_cond.shape != x.shape:
                raise ValueError(f"Unet: expected x_self_cond of x's shape {tuple(x.shape)}, got {describe(x_self_cond)}")
            if x_self_cond.dtype != x.dtype or x_self_cond.device != x.device:
                raise TypeError(f"Unet: expected x_self_cond of x's dtype and device ({describe(x)}), got "
                                f"{describe(x_self_cond)}")
        mlp_dtype = torch.promote_types(self.time_mlp[1].weight.dtype, torch.float32)
        return time.reshape(-1).expand(batch).to(mlp_dtype)

    def _embed_time(self, time):
        """(B,) time in at least fp32 -> (B, 4 * dim): the position features are computed in time's precision, then
        cast to the MLP's dtype (a model.half() has fp16 Linears; under autocast the cast is a no-op)."""
        if time.dtype == self.time_mlp[1].weight.dtype:
            # fp32 and float64 models: the Sequential as upstream calls it, so that hooks registered on it still run.
            return self.time_mlp(time)
        position_embedding, *mlp = self.time_mlp
        embedding = position_embedding(time).to(mlp[0].weight.dtype)
        for layer in mlp:
            embedding = layer(embedding)
        return embedding

    def forward(self, x, time, x_self_cond=None):
        time = self._check_inputs(x, time, x_self_cond)
        if self.self_condition:
            if x_self_cond is None:
                x_self_cond = torch.zeros_like(x)
            x = torch.cat((x_self_cond, x), dim=1)

        x = self.init_conv(x)
        r = x  # upstream clones here; nothing modifies x in place, so the copy is not needed
        t = self._embed_time(time)
        # Every ResnetBlock's time MLP (SiLU + Linear) as one GEMM, in the order the blocks run below.
        scale_shifts = iter(time_mlp_scale_shifts(self.resnet_blocks(), t))
        plan = self._recompute(x)
        block = partial(self._run_block, plan=plan)
        attend = partial(self._run_attention, plan=plan)

        skips = []
        for block1, block2, attn, downsample in self.downs:
            x = block(block1, x, next(scale_shifts))
            skips.append(x)
            x = block(block2, x, next(scale_shifts))
            x = attend(attn, x)
            skips.append(x)
            x = downsample(x)

        x = block(self.mid_block1, x, next(scale_shifts))
        x = attend(self.mid_attn, x)
        x = block(self.mid_block2, x, next(scale_shifts))

        for block1, block2, attn, upsample in self.ups:
            x = block(block1, torch.cat((x, skips.pop()), dim=1), next(scale_shifts))
            x = block(block2, torch.cat((x, skips.pop()), dim=1), next(scale_shifts))
            x = attend(attn, x)
            x = upsample(x)

        x = block(self.final_res_block, torch.cat((x, r), dim=1), next(scale_shifts))
        return self.final_conv(x)

    def resnet_blocks(self):
        """The ResnetBlocks in the order forward runs them."""
        blocks = [block for block1, block2, _, _ in self.downs for block in (block1, block2)]
        blocks += [self.mid_block1, self.mid_block2]
        blocks += [block for block1, block2, _, _ in self.ups for block in (block1, block2)]
        return blocks + [self.final_res_block]

    def _recompute(self, x):
        """This forward's plan, (ResnetBlock recompute, attention recompute, whole blocks), for input x."""
        block, attention, whole = _RECOMPUTE[self.checkpointing]
        if self.checkpointing is None and not use_triton("Unet", x.device):
            return False, None, False
        return block, attention, whole

    def _run_block(self, block, x, scale_shift, plan):
        recompute, _, whole = plan
        if whole:
            return keep_only_convolutions(block, x, kept=None, random=draws_random_numbers(block),
                                          scale_shift=scale_shift)
        return block(x, scale_shift=scale_shift, recompute=recompute)

    def _run_attention(self, attn, x, plan):
        """attn(x) + x, the addition fused into the layer's last kernel where it has one (LinearAttention's output
        norm)."""
        _, recompute, _ = plan
        return attn(x, residual=x, recompute=recompute)
