"""Fused channel RMSNorm + time scale/shift + SiLU in Triton, forward and backward, as torch.library custom ops.

Computes `act(x / max(||x||_2 over C, eps) * sqrt(C) * g * (scale + 1) + shift)` per pixel, exactly as
fastunet.reference.rms_norm_act defines it (upstream 2.x's RMSNorm, fused with the Block's epilogue).

Design. x (B, C, H, W) is read as rows (batch, channel) of pixels, NCHW or channels_last in place
(kernels/scale_shift_act.py). One program owns one batch's block of BLOCK_PIXELS pixels and walks its channels
in [BLOCK_CHANNELS, BLOCK_PIXELS] tiles: pass 1 sums x^2 over the channels of each pixel (fp32: the squares of
fp16's 6e4 are 3.6e9, far from fp32's range), pass 2 writes
`act(x * rinv * g * sqrt(C) * (1 + scale) + shift)`, rinv = 1 / max(||x||, eps). Pass 2 re-reads tiles that
pass 1 just read (L1/L2 hits; x leaves HBM once). No statistics are saved: the backward recomputes rinv from x,
which it reads anyway.

The backward (three passes over the program's channels): rinv; then, with v = x * rinv and
a = dL/dv = du * g * sqrt(C) * (1 + scale) (du = dL/d(pre-activation)), the per-pixel dot(a, v) and per-channel
sums of du * v * sqrt(C) and du over the program's pixels (stored per program, summed over programs by torch.sum
for the parameter gradients: deterministic, no atomics); then dx = rinv * (a - v * dot(a, v)), the second term
only where ||x|| >= eps (elsewhere the clamp is constant and so is its gradient).
"""

import itertools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from fastunet.kernels.scale_shift_act import (
    FUSED_NORM_DTYPES,
    VECTOR_ELEMENTS,
    activation,
    activation_backward,
    compile_signature,
    empty_output,
    gradient_or_empty,
    gradient_rows,
    gradient_tile_pointers,
    halves_of_one,
    in_memory_format,
    kernel_memory_format,
    dtype_code_of,
    load_as_fp32,
    load_scale_shift,
    parameter_arguments,
    parameter_grads,
    parameter_grads_compile_configs,
    row_strides,
    runtime_flags,
    split_scale_shift,
    tile_offsets,
    tile_pointers,
    to_float32,
    unet_launch_specialization,
    vector_aligned,
)

# ---------------------------------------------------------------------------------------------------------------
# Device code


@triton.jit
def _aligned_runs(channels, pixels, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """(channels, pixels), the one along the contiguous axis rewritten as a multiple of ALIGN (which the host
    guarantees it is) so that the compiler knows masks are constant over each 16-byte vector."""
    if CHANNELS_LAST:
        channels = channels // ALIGN * ALIGN
    else:
        pixels = pixels // ALIGN * ALIGN
    return channels, pixels


@triton.jit
def _sum_of_squares(x_ptr, batch, pixel, pixel_valid, channels, batch_stride, line_stride,
                    BLOCK_CHANNELS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """Per pixel of the block, the sum over channels of x^2 in fp32 (pass 1 of both directions): per lane of the
    [channels, pixels] tile across the channel blocks, the lanes of a pixel summed once at the end (a sum per
    tile cost a cross-warp reduction, shared memory and barriers, per tile)."""
    lane_squares = tl.zeros([BLOCK_CHANNELS, pixel.shape[0]], tl.float32)
    for channel_block in range(tl.cdiv(channels, BLOCK_CHANNELS)):
        channel = channel_block * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
        mask = (channel < channels)[:, None] & pixel_valid[None, :]
        offsets = tile_offsets(batch, channel, pixel, batch_stride, line_stride, CHANNELS_LAST)
        # The next pass reads this tile again: ask L2 to keep it.
        x = to_float32(tl.load(tile_pointers(x_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask, other=0.0,
                               eviction_policy="evict_last"))
        lane_squares += x * x
    return tl.sum(lane_squares, 0)


@triton.jit
def _channel_coefficients(g_ptr, scale_ptr, shift_ptr, batch, channel, valid, sqrt_channels,
                          scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
                          dtype_codes, has_scale, has_shift):
    """Per channel: (coefficient, shift) with pre-activation u = x * rinv * coefficient + shift."""
    g = load_as_fp32(g_ptr, channel, valid, dtype_code_of(dtype_codes, 0), 0.0)
    one_plus_scale, shift = load_scale_shift(scale_ptr, shift_ptr, batch, channel, valid,
                                             scale_batch_stride, scale_channel_stride,
                                             shift_batch_stride, shift_channel_stride, has_scale, has_shift,
                                             dtype_code_of(dtype_codes, 1), dtype_code_of(dtype_codes, 2))
    return g * sqrt_channels * one_plus_scale, shift


@triton.jit
def _channel_block(g_ptr, scale_ptr, shift_ptr, batch, channel_block, pixel, pixel_valid, channels, sqrt_channels,
                   batch_stride, line_stride, scale_batch_stride, scale_channel_stride, shift_batch_stride,
                   shift_channel_stride, dtype_codes, has_scale, has_shift, BLOCK_CHANNELS: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr):
    """The tile of channel block `channel_block` over the program's pixels: (channel, channel_valid, mask,
    offsets, coefficient, shift), the (channels,) indices and validity, the [channels, pixels] mask and element
    offsets, and the per-channel (coefficient, shift) of _channel_coefficients."""
    channel = channel_block * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_valid = channel < channels
    coefficient, shift = _channel_coefficients(
        g_ptr, scale_ptr, shift_ptr, batch, channel, channel_valid, sqrt_channels, scale_batch_stride,
        scale_channel_stride, shift_batch_stride, shift_channel_stride, dtype_codes, has_scale, has_shift)
    mask = channel_valid[:, None] & pixel_valid[None, :]
    offsets = tile_offsets(batch, channel, pixel, batch_stride, line_stride, CHANNELS_LAST)
    return channel, channel_valid, mask, offsets, coefficient, shift


@triton.jit
def _gradient_tile(grad_y_ptr, x_ptr, offsets, mask, batch, pixel, batch_stride, line_stride, grad_batch_stride,
                   grad_line_stride, rinv, coefficient, shift, silu, eviction_policy: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """One backward tile: (v, du), v = x * rinv and du = dL/d(pre-activation), [channels, pixels] fp32 (0 where
    masked), from x and grad_y (through its own strides, gradient_rows) read with `eviction_policy`."""
    x = to_float32(tl.load(tile_pointers(x_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask, other=0.0,
                           eviction_policy=eviction_policy))
    grad_pointers = gradient_tile_pointers(grad_y_ptr, offsets, batch, pixel, batch_stride, line_stride,
                                           grad_batch_stride, grad_line_stride, CHANNELS_LAST, ALIGN, True)
    grad_y = to_float32(tl.load(grad_pointers, mask=mask, other=0.0, eviction_policy=eviction_policy))
    v = x * rinv[None, :]
    return v, activation_backward(grad_y, v * coefficient[:, None] + shift[:, None], silu)


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, y_ptr,  # (B, C, H, W) in x.dtype, both contiguous in the layout CHANNELS_LAST says
    residual_ptr,  # (B, C, H, W) in x.dtype and x's layout, added to y; read only when has_residual
    g_ptr,  # (C,) raw bytes of any float dtype, unit stride
    scale_ptr, shift_ptr,  # (B, C) raw bytes of any float dtype, strided, read only when has_scale / has_shift
    batch_stride, line_stride,  # of x and y: C*H*W, and H*W (NCHW) or C (channels_last)
    scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
    channels, pixels, pixel_blocks,  # pixel_blocks = cdiv(H*W, BLOCK_PIXELS); the grid is B * pixel_blocks
    eps, sqrt_channels,
    dtype_codes,  # pack_dtype_codes(g, scale, shift)
    has_scale, has_shift, silu, has_residual,
    BLOCK_CHANNELS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
):
    program = tl.program_id(0)
    batch = program // pixel_blocks
    channels, pixels = _aligned_runs(channels, pixels, CHANNELS_LAST, ALIGN)
    pixel = (program % pixel_blocks) * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
    pixel_valid = pixel < pixels
    sum_of_squares = _sum_of_squares(x_ptr, batch, pixel, pixel_valid, channels, batch_stride, line_stride,
                                     BLOCK_CHANNELS, CHANNELS_LAST, ALIGN)
    rinv = 1.0 / tl.maximum(tl.sqrt(sum_of_squares), eps)
    for channel_block in range(tl.cdiv(channels, BLOCK_CHANNELS)):
        _, _, mask, offsets, coefficient, shift = _channel_block(
            g_ptr, scale_ptr, shift_ptr, batch, channel_block, pixel, pixel_valid, channels, sqrt_channels,
            batch_stride, line_stride, scale_batch_stride, scale_channel_stride, shift_batch_stride,
            shift_channel_stride, dtype_codes, has_scale, has_shift, BLOCK_CHANNELS, CHANNELS_LAST)
        x = to_float32(tl.load(tile_pointers(x_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask, other=0.0,
                               eviction_policy="evict_first"))
        y = activation(x * rinv[None, :] * coefficient[:, None] + shift[:, None], silu)
        if has_residual:
            y += to_float32(tl.load(tile_pointers(residual_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask,
                                    other=0.0, eviction_policy="evict_first"))
        tl.store(tile_pointers(y_ptr, offsets, CHANNELS_LAST, ALIGN), y.to(y_ptr.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")


@triton.jit
def _rms_norm_backward_kernel(
    grad_y_ptr, x_ptr, grad_x_ptr,  # (B, C, H, W) in x.dtype, in the layout CHANNELS_LAST says (strides below)
    g_ptr,  # (C,) raw bytes of any float dtype, unit stride
    scale_ptr, shift_ptr,  # (B, C) raw bytes of any float dtype, strided, read only when has_scale / has_shift
    partial_du_xhat_ptr, partial_du_ptr,  # (B, pixel_blocks, C) fp32 outputs: sums over this program's pixels
    batch_stride, line_stride,  # of x and grad_x
    grad_batch_stride, grad_line_stride,  # of grad_y (a channel slice of a larger tensor keeps its own: gradient_rows)
    scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
    channels, pixels, pixel_blocks,
    eps, sqrt_channels,
    dtype_codes,  # pack_dtype_codes(g, scale, shift)
    has_scale, has_shift, silu,
    compute_grad_x,  # False: only the sums (for parameter gradients)
    BLOCK_CHANNELS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
):
    program = tl.program_id(0)
    batch = program // pixel_blocks
    all_channels = channels  # row stride of the partial sums
    channels, pixels = _aligned_runs(channels, pixels, CHANNELS_LAST, ALIGN)
    pixel = (program % pixel_blocks) * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
    pixel_valid = pixel < pixels
    norm = tl.sqrt(_sum_of_squares(x_ptr, batch, pixel, pixel_valid, channels, batch_stride, line_stride,
                                   BLOCK_CHANNELS, CHANNELS_LAST, ALIGN))
    rinv = 1.0 / tl.maximum(norm, eps)
    # Pass 2: dot(a, v) per pixel (per lane across the channel blocks, summed once after), and this program's
    # per-channel sums for the parameter gradients.
    lane_dot = tl.zeros([BLOCK_CHANNELS, BLOCK_PIXELS], tl.float32)
    for channel_block in range(tl.cdiv(channels, BLOCK_CHANNELS)):
        channel, channel_valid, mask, offsets, coefficient, shift = _channel_block(
            g_ptr, scale_ptr, shift_ptr, batch, channel_block, pixel, pixel_valid, channels, sqrt_channels,
            batch_stride, line_stride, scale_batch_stride, scale_channel_stride, shift_batch_stride,
            shift_channel_stride, dtype_codes, has_scale, has_shift, BLOCK_CHANNELS, CHANNELS_LAST)
        # Pass 3 reads this tile again: ask L2 to keep it.
        v, du = _gradient_tile(grad_y_ptr, x_ptr, offsets, mask, batch, pixel, batch_stride, line_stride,
                               grad_batch_stride, grad_line_stride, rinv, coefficient, shift, silu, "evict_last",
                               CHANNELS_LAST, ALIGN)
        lane_dot += du * coefficient[:, None] * v
        partial = (batch * pixel_blocks + program % pixel_blocks).to(tl.int64) * all_channels + channel
        tl.store(partial_du_xhat_ptr + partial, tl.sum(du * v, 1) * sqrt_channels, mask=channel_valid)
        tl.store(partial_du_ptr + partial, tl.sum(du, 1), mask=channel_valid)
    dot = tl.sum(lane_dot, 0)
    if compute_grad_x:
        # Where the clamp max(||x||, eps) picks eps, rinv does not depend on x: no second term.
        dot = tl.where(norm >= eps, dot, 0.0)
        for channel_block in range(tl.cdiv(channels, BLOCK_CHANNELS)):
            _, _, mask, offsets, coefficient, shift = _channel_block(
                g_ptr, scale_ptr, shift_ptr, batch, channel_block, pixel, pixel_valid, channels, sqrt_channels,
                batch_stride, line_stride, scale_batch_stride, scale_channel_stride, shift_batch_stride,
                shift_channel_stride, dtype_codes, has_scale, has_shift, BLOCK_CHANNELS, CHANNELS_LAST)
            v, du = _gradient_tile(grad_y_ptr, x_ptr, offsets, mask, batch, pixel, batch_stride, line_stride,
                                   grad_batch_stride, grad_line_stride, rinv, coefficient, shift, silu,
                                   "evict_first", CHANNELS_LAST, ALIGN)
            grad_x = rinv[None, :] * (du * coefficient[:, None] - v * dot[None, :])
            tl.store(tile_pointers(grad_x_ptr, offsets, CHANNELS_LAST, ALIGN), grad_x.to(grad_x_ptr.dtype.element_ty),
                     mask=mask, eviction_policy="evict_first")


# ---------------------------------------------------------------------------------------------------------------
# Launch plans


@dataclass(frozen=True)
class Tile:
    """One compiled shape of a kernel: [channels, pixels] per step."""

    channels: int
    pixels: int
    num_warps: int
    align: int = VECTOR_ELEMENTS  # the ALIGN constexpr: 8 needs vector_aligned() inputs, 1 takes any
    max_registers: int = 128  # ptxas's .maxnreg; see kernels/group_norm.py's Tile


# The only tiles a plan may use (gpu_compile_configs compiles each for every dtype, direction and layout):
# 4096 elements per step, 8 KB of bf16, many programs per SM. A pixel's channels are reduced in steps of
# `channels`, so the tile is chosen to waste the fewest masked channels (Unet's 64..768 channels are multiples
# of 64). The backward, which keeps x, dy and their products live, runs twice the warps, and in fp32 half the
# pixels.
FORWARD_TILES = {
    "channels_64": Tile(64, 64, 4),
    "channels_256": Tile(256, 16, 4),
    # C (channels_last) or H*W (NCHW) not a multiple of 8, or offset data: scalar accesses, a smaller tile.
    "unaligned": Tile(16, 64, 4, align=1),
}


def tile_for(name, backward, element_size):
    """The Tile a plan's tile name means for one direction and element size."""
    tile = FORWARD_TILES[name]
    if backward:
        tile = replace(tile, num_warps=2 * tile.num_warps)
    if element_size == 4:
        # fp32 doubles the registers per element: half the pixels (the channels_last forward at 64x64 spilled).
        tile = replace(tile, pixels=tile.pixels // 2)
    return tile


def plan_rms_norm(channels, pixels, channels_last, aligned):
    """The tile name for x (B, channels, H, W) with H*W = pixels (no autotuning): the aligned tile with the
    fewest padded channels, then the one with fewer channel steps."""
    if not aligned:
        return "unaligned"
    return min(("channels_64", "channels_256"),
               key=lambda name: (-(-channels // FORWARD_TILES[name].channels) * FORWARD_TILES[name].channels,
                                 -FORWARD_TILES[name].channels))


def _prepare_launch(tile_name, tensors, backward, strides=()):
    """(grid, pixel blocks, launch metadata) for (B, C, H, W) tensors of one layout (x first; `strides`: a
    gradient's own, see gradient_rows), with the tile `tile_name` or the planner's."""
    x = tensors[0]
    batch, channels, height, width = x.shape
    channels_last = kernel_memory_format(x) == torch.channels_last
    run = channels if channels_last else height * width
    if tile_name is None:
        tile_name = plan_rms_norm(channels, height * width, channels_last, vector_aligned(tensors, run, strides))
    tile = tile_for(tile_name, backward, x.element_size())
    if tile.align > 1 and not vector_aligned(tensors, run, strides):
        raise ValueError(f"rms_norm_act: tile {tile_name!r} needs vector-aligned inputs")
    pixel_blocks = -(-(height * width) // tile.pixels)
    meta = dict(BLOCK_CHANNELS=tile.channels, BLOCK_PIXELS=tile.pixels, CHANNELS_LAST=channels_last,
                ALIGN=tile.align, num_warps=tile.num_warps, maxnreg=tile.max_registers)
    return (batch * pixel_blocks,), pixel_blocks, meta


# ---------------------------------------------------------------------------------------------------------------
# Launchers (also called directly by the tests, with explicit tiles)


def _contiguous_parameter(t):
    """g (C,) as the kernels index it (unit stride): itself for the module's parameter viewed as (C,)."""
    return t if t.stride(0) == 1 else t.contiguous()


def rms_norm_forward(x, g, scale, shift, silu, eps, tile=None, scale_shift=None, residual=None):
    """Forward launcher. x (B, C, H, W); g (C,); scale, shift (B, C) or None, or scale_shift (B, 2C) whose halves
    are (scale, shift); residual: x's shape and dtype, or None, added after the activation.

    Returns y: x's shape and dtype, in kernel_memory_format(x). tile: a name in FORWARD_TILES to force (tests).
    """
    memory_format = kernel_memory_format(x)
    x = in_memory_format(x, memory_format)
    residual = None if residual is None else in_memory_format(residual, memory_format)
    y = empty_output(x)
    grid, pixel_blocks, meta = _prepare_launch(tile, (x, y) if residual is None else (x, y, residual),
                                               backward=False)
    g = _contiguous_parameter(g)
    scale, shift = split_scale_shift(scale, shift, scale_shift)
    channels, height, width = x.shape[1:]
    parameter_pointers, scale_shift_strides, dtype_codes = parameter_arguments(x, (g,), (scale, shift))
    _rms_norm_forward_kernel[grid](
        x, y, x if residual is None else residual, *parameter_pointers,
        *row_strides(x.shape, memory_format), *scale_shift_strides,
        channels, height * width, pixel_blocks, float(eps), float(channels) ** 0.5, dtype_codes,
        *runtime_flags(scale is not None, shift is not None, silu, residual is not None), **meta)
    return y


def rms_norm_backward(grad_y, x, g, scale, shift, silu, eps, needs, tile=None, scale_shift=None):
    """Backward launcher: gradients of rms_norm_forward's y (a residual's gradient is grad_y itself).

    needs: which of (x, g, scale, shift, scale_shift) want a gradient. Returns (dx, dg, d_scale, d_shift,
    d_scale_shift) in each input's dtype (dx in kernel_memory_format(x)), None where not needed. Two Triton launches:
    dx and per-program sums, then the parameter gradients (parameter_grads, after an ATen sum of the per-program
    sums of each batch).
    """
    need_x, need_g, need_scale, need_shift, need_scale_shift = needs
    memory_format = kernel_memory_format(x)
    x = in_memory_format(x, memory_format)
    grad_y, *grad_strides = gradient_rows(grad_y, memory_format)
    grad_x = empty_output(x) if need_x else None
    grid, pixel_blocks, meta = _prepare_launch(tile, (x, grad_y) if grad_x is None else (x, grad_y, grad_x),
                                               backward=True, strides=grad_strides)
    g = _contiguous_parameter(g)
    scale_half, shift_half = split_scale_shift(scale, shift, scale_shift)
    batch, channels, height, width = x.shape
    partial_sums = torch.empty(2, batch, pixel_blocks, channels, device=x.device, dtype=torch.float32)
    partial_du_xhat, partial_du = partial_sums
    parameter_pointers, scale_shift_strides, dtype_codes = parameter_arguments(x, (g,), (scale_half, shift_half))
    _rms_norm_backward_kernel[grid](
        grad_y, x, x if grad_x is None else grad_x, *parameter_pointers, partial_du_xhat, partial_du,
        *row_strides(x.shape, memory_format), *grad_strides, *scale_shift_strides,
        channels, height * width, pixel_blocks, float(eps), float(channels) ** 0.5, dtype_codes,
        *runtime_flags(scale_half is not None, shift_half is not None, silu, need_x), **meta)
    # g plays weight (its sums carry the sqrt(C) factor already); there is no bias.
    d_g, _, d_scale, d_shift, d_scale_shift = parameter_grads(
        partial_sums, g, None, scale, shift, scale_shift, (need_g, False, need_scale, need_shift, need_scale_shift))
    return grad_x, d_g, d_scale, d_shift, d_scale_shift


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops: autograd, opcheck and torch.compile see two opaque operators.


@torch.library.custom_op("fastunet::rms_norm_act", mutates_args=())
def rms_norm_act_op(x: torch.Tensor, g: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                    scale_shift: Optional[torch.Tensor], residual: Optional[torch.Tensor], silu: bool,
                    eps: float) -> torch.Tensor:
    """y as rms_norm_act; scale_shift (B, 2C), when given, holds (scale, shift) as its halves (scale, shift None)."""
    return rms_norm_forward(x, g, scale, shift, silu, eps, scale_shift=scale_shift, residual=residual)


@rms_norm_act_op.register_fake
def _(x, g, scale, shift, scale_shift, residual, silu, eps):
    return empty_output(x)


@torch.library.custom_op("fastunet::rms_norm_act_backward", mutates_args=())
def rms_norm_act_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, g: torch.Tensor, scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], scale_shift: Optional[torch.Tensor], silu: bool, eps: float, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dg, d_scale, d_shift, d_scale_shift); a gradient not in `needs` (x, g, scale, shift, scale_shift) is an
    empty placeholder."""
    grads = rms_norm_backward(grad_y, x, g, scale, shift, silu, eps, needs, scale_shift=scale_shift)
    return tuple(gradient_or_empty(grad, x) for grad in grads)


@rms_norm_act_backward_op.register_fake
def _(grad_y, x, g, scale, shift, scale_shift, silu, eps, needs):
    like = (x, g, scale, shift, scale_shift)
    return tuple(
        (empty_output(x) if i == 0 else x.new_empty(t.shape, dtype=t.dtype)) if need else x.new_empty(0)
        for i, (t, need) in enumerate(zip(like, needs))
    )


def _setup_context(ctx, inputs, output):
    x, g, scale, shift, scale_shift, residual, silu, eps = inputs
    ctx.save_for_backward(x, g, scale, shift, scale_shift)
    ctx.silu, ctx.eps = silu, eps


def _backward(ctx, grad_y):
    x, g, scale, shift, scale_shift = ctx.saved_tensors
    need_x, need_g, need_scale, need_shift, need_scale_shift, need_residual = ctx.needs_input_grad[:6]
    needs = [need_x, need_g, need_scale and scale is not None, need_shift and shift is not None,
             need_scale_shift and scale_shift is not None]
    grads = [None] * 5
    if any(needs):
        grads = torch.ops.fastunet.rms_norm_act_backward(grad_y, x, g, scale, shift, scale_shift, ctx.silu, ctx.eps,
                                                         needs)
        grads = [grad if need else None for grad, need in zip(grads, needs)]
    # d y / d residual is the identity.
    return (*grads, grad_y if need_residual else None, None, None)


rms_norm_act_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_act(x, g, scale=None, shift=None, silu=False, eps=1e-12, residual=None):
    """`silu?(x / max(||x||_2 over C, eps) * sqrt(C) * g * (scale + 1) + shift) + residual` per pixel, in x.dtype.

    x: (B, C, H, W) fp32/fp16/bf16, any strides (NCHW and channels_last read in place; the result keeps
    channels_last, everything else comes back NCHW-contiguous). g: (C,), any float dtype. scale, shift: (B, C)
    or None, any float dtype and strides; when they are the two halves of one (B, 2C) tensor, that tensor is read
    and differentiated whole. residual: x's shape and dtype, or None. Differentiable in x, g, scale, shift and
    residual (gradients in each one's dtype); deterministic.
    """
    scale_shift = halves_of_one(scale, shift)
    if scale_shift is not None:
        scale = shift = None
    return torch.ops.fastunet.rms_norm_act(x, g, scale, shift, scale_shift, residual, silu, eps)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (tests/gpu_compile.py)


def gpu_compile_configs():
    """Every (kernel, signature, constexprs, options) a GPU run can launch: each tile of FORWARD_TILES (the only
    ones plan_rms_norm and _prepare_launch allow), per direction, layout and input dtype, and the parameter-gradient
    kernel; the aligned tiles with the specialization a Unet launch gets (unet_launch_specialization), the
    unaligned one without. The same list serves every architecture (at most 1 KB of shared memory per tile). Parameters reach the kernels as raw bytes with runtime dtype codes and optional inputs are runtime
    flags, so nothing else varies."""
    kernels = (
        (_rms_norm_forward_kernel, ("x_ptr", "y_ptr", "residual_ptr"), ("has_scale", "has_shift", "silu",
                                                                          "has_residual")),
        (_rms_norm_backward_kernel, ("grad_y_ptr", "x_ptr", "grad_x_ptr"),
         ("has_scale", "has_shift", "silu", "compute_grad_x")),
    )
    for (kernel, x_pointers, flags), backward in zip(kernels, (False, True)):
        for name, channels_last, dtype in itertools.product(FORWARD_TILES, (False, True), FUSED_NORM_DTYPES):
            tile = tile_for(name, backward, dtype.itemsize)
            constexprs = dict(BLOCK_CHANNELS=tile.channels, BLOCK_PIXELS=tile.pixels, CHANNELS_LAST=channels_last,
                              ALIGN=tile.align)
            signature = compile_signature(kernel, constexprs, dtype, x_pointers, flags,
                                          floats=("eps", "sqrt_channels"))
            options = dict(num_warps=tile.num_warps, maxnreg=tile.max_registers)
            if tile.align == 1:  # odd shapes: no alignment to specialize
                yield kernel, signature, constexprs, options
            else:
                signature, constexprs, attrs = unet_launch_specialization(kernel, signature, constexprs)
                yield kernel, signature, constexprs, options, attrs
    yield from parameter_grads_compile_configs()
