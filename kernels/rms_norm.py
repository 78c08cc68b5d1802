"""Fused channel RMSNorm + time scale/shift + SiLU in Triton, forward and backward, as torch.library custom ops.

Computes `act(x / max(||x||_2 over C, eps) * sqrt(C) * g * (scale + 1) + shift)` per pixel, exactly as
fastunet.reference.rms_norm_act defines it (upstream 2.x's RMSNorm, fused with the Block's epilogue).

Design. x (B, C, H, W) is read as rows (batch, channel) of pixels, NCHW or channels_last in place
(kernels/scale_shift_act.py), in [BLOCK_CHANNELS, BLOCK_PIXELS] tiles. One program owns a chunk of one batch's
blocks of BLOCK_PIXELS pixels (blocks_per_program: the channels' coefficients g * sqrt(C) * (1 + scale) and
shift are loaded once per chunk). Where one tile holds every channel (ONE_BLOCK, the Unet's 64..512), each pixel
block is one pass: x is read once, rinv = 1 / max(||x||, eps) is a sum over the tile's channels (fp32: the
squares of fp16's 6e4 are 3.6e9, far from fp32's range), and `act(x * rinv * coefficient + shift)` is written
from registers. Wider norms step through their channels: pass 1 sums x^2, pass 2 re-reads the tiles pass 1 just
read (L1/L2 hits; x leaves HBM once) and writes. When a gradient will be asked for, the forward saves rinv
(B, H*W) fp32 for the backward from SAVE_RINV_MIN_CHANNELS channels on; narrower norms' backward recomputes it
from x, which it reads anyway.

The backward: with v = x * rinv and a = dL/dv = du * g * sqrt(C) * (1 + scale) (du = dL/d(pre-activation)), the
per-pixel dot(a, v), the per-channel sums of du * v * sqrt(C) and du over the program's pixels (stored per
program, summed over programs by torch.sum for the parameter gradients: deterministic, no atomics), and
dx = rinv * (a - v * dot(a, v)), the second term only where ||x|| >= eps (elsewhere the clamp is constant and so
is its gradient). One pass per pixel block under ONE_BLOCK (x and dy read once, du computed once, the parameter
sums kept per lane across the chunk and summed over lanes once); when stepping, with one pixel block per program,
rinv (unless saved), then dot and the sums, then dx.
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
    device_limits,
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
    run_sums,
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
def _channel_block(g_ptr, scale_ptr, shift_ptr, batch, channel_block, channels, sqrt_channels, scale_batch_stride,
                   scale_channel_stride, shift_batch_stride, shift_channel_stride, dtype_codes, has_scale, has_shift,
                   BLOCK_CHANNELS: tl.constexpr):
    """Channel block `channel_block` of a batch: (channel, channel_valid, coefficient, shift), the (channels,)
    indices, their validity and the per-channel (coefficient, shift) of _channel_coefficients."""
    channel = channel_block * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_valid = channel < channels
    coefficient, shift = _channel_coefficients(
        g_ptr, scale_ptr, shift_ptr, batch, channel, channel_valid, sqrt_channels, scale_batch_stride,
        scale_channel_stride, shift_batch_stride, shift_channel_stride, dtype_codes, has_scale, has_shift)
    return channel, channel_valid, coefficient, shift


@triton.jit
def _pixel_tile(batch, channel, channel_valid, pixel_block, pixels, batch_stride, line_stride,
                BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """The tile of `channel` over pixel block `pixel_block`: (pixel, pixel_valid, mask, offsets), the
    (pixels,) indices and validity, the [channels, pixels] mask and element offsets."""
    pixel = pixel_block * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
    pixel_valid = pixel < pixels
    mask = channel_valid[:, None] & pixel_valid[None, :]
    offsets = tile_offsets(batch, channel, pixel, batch_stride, line_stride, CHANNELS_LAST)
    return pixel, pixel_valid, mask, offsets


@triton.jit
def _stepping_tile(g_ptr, scale_ptr, shift_ptr, batch, channel_block, pixel_block, channels, pixels, sqrt_channels,
                   batch_stride, line_stride, scale_batch_stride, scale_channel_stride, shift_batch_stride,
                   shift_channel_stride, dtype_codes, has_scale, has_shift, BLOCK_CHANNELS: tl.constexpr,
                   BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """A stepping pass's tile, channel block `channel_block` over pixel block `pixel_block`: (channel,
    channel_valid, coefficient, shift) of _channel_block and (mask, offsets) of _pixel_tile."""
    channel, channel_valid, coefficient, shift = _channel_block(
        g_ptr, scale_ptr, shift_ptr, batch, channel_block, channels, sqrt_channels, scale_batch_stride,
        scale_channel_stride, shift_batch_stride, shift_channel_stride, dtype_codes, has_scale, has_shift,
        BLOCK_CHANNELS)
    _, _, mask, offsets = _pixel_tile(batch, channel, channel_valid, pixel_block, pixels, batch_stride, line_stride,
                                      BLOCK_PIXELS, CHANNELS_LAST)
    return channel, channel_valid, coefficient, shift, mask, offsets


@triton.jit
def _program_blocks(pixel_blocks, blocks_per_program):
    """(batch, chunk, first pixel block, end pixel block) of this program: chunk `chunk` of its batch's pixel
    blocks, blocks_per_program of them (fewer in the last chunk)."""
    chunks = tl.cdiv(pixel_blocks, blocks_per_program)
    program = tl.program_id(0)
    batch = program // chunks
    chunk = program % chunks
    first_block = chunk * blocks_per_program
    return batch, chunk, first_block, tl.minimum(first_block + blocks_per_program, pixel_blocks)


@triton.jit
def _load_gradient_inputs(grad_y_ptr, x_ptr, offsets, mask, batch, pixel, batch_stride, line_stride,
                          grad_batch_stride, grad_line_stride, eviction_policy: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """One backward tile's (x, grad_y), [channels, pixels] fp32 (0 where masked), grad_y through its own strides
    (gradient_rows), both read with `eviction_policy`."""
    x = to_float32(tl.load(tile_pointers(x_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask, other=0.0,
                           eviction_policy=eviction_policy))
    grad_pointers = gradient_tile_pointers(grad_y_ptr, offsets, batch, pixel, batch_stride, line_stride,
                                           grad_batch_stride, grad_line_stride, CHANNELS_LAST, ALIGN, True)
    grad_y = to_float32(tl.load(grad_pointers, mask=mask, other=0.0, eviction_policy=eviction_policy))
    return x, grad_y


@triton.jit
def _pre_activation_gradient(x, grad_y, rinv, coefficient, shift, silu):
    """(v, du): v = x * rinv and du = dL/d(pre-activation), [channels, pixels] fp32 (0 where x and grad_y are)."""
    v = x * rinv[None, :]
    return v, activation_backward(grad_y, v * coefficient[:, None] + shift[:, None], silu)


@triton.jit
def _gradient_tile(grad_y_ptr, x_ptr, offsets, mask, batch, pixel, batch_stride, line_stride, grad_batch_stride,
                   grad_line_stride, rinv, coefficient, shift, silu, eviction_policy: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """One backward tile read from memory: (v, du) of _pre_activation_gradient."""
    x, grad_y = _load_gradient_inputs(grad_y_ptr, x_ptr, offsets, mask, batch, pixel, batch_stride, line_stride,
                                      grad_batch_stride, grad_line_stride, eviction_policy, CHANNELS_LAST, ALIGN)
    return _pre_activation_gradient(x, grad_y, rinv, coefficient, shift, silu)


@triton.jit
def _store_output(y_ptr, residual_ptr, x, rinv, coefficient, shift, offsets, mask, silu, has_residual,
                  CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """The forward's output tile: act(x * rinv * coefficient + shift) (+ residual), written in y's dtype."""
    y = activation(x * rinv[None, :] * coefficient[:, None] + shift[:, None], silu)
    if has_residual:
        y += to_float32(tl.load(tile_pointers(residual_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask, other=0.0,
                                eviction_policy="evict_first"))
    tl.store(tile_pointers(y_ptr, offsets, CHANNELS_LAST, ALIGN), y.to(y_ptr.dtype.element_ty), mask=mask,
             eviction_policy="evict_first")


@triton.jit
def _clamped_rinv(norm, eps):
    """(rinv, unclamped) of the pixels' norms ||x|| (pixels,): rinv = 1 / max(||x||, eps), and whether the clamp
    kept ||x|| (where it picked eps, rinv does not depend on x)."""
    return 1.0 / tl.maximum(norm, eps), norm >= eps


@triton.jit
def _store_rinv(rinv_ptr, batch, pixel, pixel_valid, pixels, rinv, unclamped):
    """Save rinv (pixels,) for the backward, negated where the clamp picked eps (_clamped_rinv): rinv > 0, so its
    sign carries that bit at no cost."""
    tl.store(rinv_ptr + batch.to(tl.int64) * pixels + pixel, tl.where(unclamped, rinv, -rinv), mask=pixel_valid)


@triton.jit
def _load_rinv(rinv_ptr, batch, pixel, pixel_valid, pixels):
    """(rinv, unclamped) (pixels,) from what _store_rinv saved."""
    saved = tl.load(rinv_ptr + batch.to(tl.int64) * pixels + pixel, mask=pixel_valid, other=1.0)
    return tl.abs(saved), saved > 0.0


@triton.jit
def _store_grad_x(grad_x_ptr, offsets, mask, rinv, du, coefficient, v, dot, CHANNELS_LAST: tl.constexpr,
                  ALIGN: tl.constexpr):
    """dx = rinv * (a - v * dot(a, v)), a = du * coefficient, written in dx's dtype."""
    grad_x = rinv[None, :] * (du * coefficient[:, None] - v * dot[None, :])
    tl.store(tile_pointers(grad_x_ptr, offsets, CHANNELS_LAST, ALIGN), grad_x.to(grad_x_ptr.dtype.element_ty),
             mask=mask, eviction_policy="evict_first")


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, y_ptr,  # (B, C, H, W) in x.dtype, both contiguous in the layout CHANNELS_LAST says
    residual_ptr,  # (B, C, H, W) in x.dtype and x's layout, added to y; read only when has_residual
    rinv_ptr,  # (B, H*W) fp32 output, written only when save_rinv: rinv, negated where the clamp picked eps
    g_ptr,  # (C,) raw bytes of any float dtype, unit stride
    scale_ptr, shift_ptr,  # (B, C) raw bytes of any float dtype, strided, read only when has_scale / has_shift
    batch_stride, line_stride,  # of x and y: C*H*W, and H*W (NCHW) or C (channels_last)
    scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
    channels, pixels,
    pixel_blocks, blocks_per_program,  # cdiv(H*W, BLOCK_PIXELS), walked in chunks: the grid is B * chunks
    eps, sqrt_channels,
    dtype_codes,  # pack_dtype_codes(g, scale, shift)
    has_scale, has_shift, silu, has_residual, save_rinv,
    BLOCK_CHANNELS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # channels <= BLOCK_CHANNELS: one tile holds a pixel's channels, one pass
):
    batch, _chunk, first_block, end_block = _program_blocks(pixel_blocks, blocks_per_program)
    channels, pixels = _aligned_runs(channels, pixels, CHANNELS_LAST, ALIGN)
    if ONE_BLOCK:
        # Every channel in one tile: their coefficients are loaded once for the chunk, and x is read once and
        # stays in registers.
        channel, channel_valid, coefficient, shift = _channel_block(
            g_ptr, scale_ptr, shift_ptr, batch, 0, channels, sqrt_channels, scale_batch_stride,
            scale_channel_stride, shift_batch_stride, shift_channel_stride, dtype_codes, has_scale, has_shift,
            BLOCK_CHANNELS)
        for pixel_block in range(first_block, end_block):
            pixel, pixel_valid, mask, offsets = _pixel_tile(batch, channel, channel_valid, pixel_block, pixels,
                                                            batch_stride, line_stride, BLOCK_PIXELS, CHANNELS_LAST)
            x = to_float32(tl.load(tile_pointers(x_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask, other=0.0,
                                   eviction_policy="evict_first"))
            rinv, unclamped = _clamped_rinv(tl.sqrt(tl.sum(x * x, 0)), eps)
            if save_rinv:
                _store_rinv(rinv_ptr, batch, pixel, pixel_valid, pixels, rinv, unclamped)
            _store_output(y_ptr, residual_ptr, x, rinv, coefficient, shift, offsets, mask, silu, has_residual,
                          CHANNELS_LAST, ALIGN)
    else:
        # Stepping: one pixel block per program, as blocks_per_program gives it (see the backward's).
        pixel_block = first_block
        pixel = pixel_block * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
        pixel_valid = pixel < pixels
        norm = tl.sqrt(_sum_of_squares(x_ptr, batch, pixel, pixel_valid, channels, batch_stride, line_stride,
                                       BLOCK_CHANNELS, CHANNELS_LAST, ALIGN))
        rinv, unclamped = _clamped_rinv(norm, eps)
        if save_rinv:
            _store_rinv(rinv_ptr, batch, pixel, pixel_valid, pixels, rinv, unclamped)
        for channel_block in range(tl.cdiv(channels, BLOCK_CHANNELS)):
            channel, channel_valid, coefficient, shift, mask, offsets = _stepping_tile(
                g_ptr, scale_ptr, shift_ptr, batch, channel_block, pixel_block, channels, pixels, sqrt_channels,
                batch_stride, line_stride, scale_batch_stride, scale_channel_stride, shift_batch_stride,
                shift_channel_stride, dtype_codes, has_scale, has_shift, BLOCK_CHANNELS, BLOCK_PIXELS,
                CHANNELS_LAST)
            x = to_float32(tl.load(tile_pointers(x_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask, other=0.0,
                                   eviction_policy="evict_first"))
            _store_output(y_ptr, residual_ptr, x, rinv, coefficient, shift, offsets, mask, silu, has_residual,
                          CHANNELS_LAST, ALIGN)


@triton.jit
def _rms_norm_backward_kernel(
    grad_y_ptr, x_ptr, grad_x_ptr,  # (B, C, H, W) in x.dtype, in the layout CHANNELS_LAST says (strides below)
    g_ptr,  # (C,) raw bytes of any float dtype, unit stride
    scale_ptr, shift_ptr,  # (B, C) raw bytes of any float dtype, strided, read only when has_scale / has_shift
    rinv_ptr,  # (B, H*W) fp32: the forward's saved rinv (_store_rinv), read only when has_rinv
    partial_du_xhat_ptr, partial_du_ptr,  # (B, chunks, C) fp32 outputs: sums over this program's pixels
    batch_stride, line_stride,  # of x and grad_x
    grad_batch_stride, grad_line_stride,  # of grad_y (a channel slice of a larger tensor keeps its own: gradient_rows)
    scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
    channels, pixels,
    pixel_blocks, blocks_per_program,  # as the forward's; chunks = cdiv(pixel_blocks, blocks_per_program)
    eps, sqrt_channels,
    dtype_codes,  # pack_dtype_codes(g, scale, shift)
    has_scale, has_shift, silu, has_rinv,
    compute_grad_x,  # False: only the sums (for parameter gradients)
    BLOCK_CHANNELS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # channels <= BLOCK_CHANNELS: x and dy read once, du computed once
):
    batch, chunk, first_block, end_block = _program_blocks(pixel_blocks, blocks_per_program)
    partial_row = (batch * tl.cdiv(pixel_blocks, blocks_per_program) + chunk).to(tl.int64) * channels
    channels, pixels = _aligned_runs(channels, pixels, CHANNELS_LAST, ALIGN)
    if ONE_BLOCK:
        # Every channel in one tile: x and dy are read once, and du (the sigmoid) is computed once. The sums for
        # the parameter gradients stay per lane (a 16-byte run of a channel's pixels in NCHW, one element in
        # channels_last) across the chunk, summed over the lanes once at the end.
        VECTOR: tl.constexpr = 1 if CHANNELS_LAST else ALIGN
        channel, channel_valid, coefficient, shift = _channel_block(
            g_ptr, scale_ptr, shift_ptr, batch, 0, channels, sqrt_channels, scale_batch_stride,
            scale_channel_stride, shift_batch_stride, shift_channel_stride, dtype_codes, has_scale, has_shift,
            BLOCK_CHANNELS)
        lane_du_v = tl.zeros([BLOCK_CHANNELS, BLOCK_PIXELS // VECTOR], tl.float32)
        lane_du = tl.zeros([BLOCK_CHANNELS, BLOCK_PIXELS // VECTOR], tl.float32)
        for pixel_block in range(first_block, end_block):
            pixel, pixel_valid, mask, offsets = _pixel_tile(batch, channel, channel_valid, pixel_block, pixels,
                                                            batch_stride, line_stride, BLOCK_PIXELS, CHANNELS_LAST)
            x, grad_y = _load_gradient_inputs(grad_y_ptr, x_ptr, offsets, mask, batch, pixel, batch_stride,
                                              line_stride, grad_batch_stride, grad_line_stride, "evict_first",
                                              CHANNELS_LAST, ALIGN)
            if has_rinv:
                rinv, unclamped = _load_rinv(rinv_ptr, batch, pixel, pixel_valid, pixels)
            else:
                rinv, unclamped = _clamped_rinv(tl.sqrt(tl.sum(x * x, 0)), eps)
            v, du = _pre_activation_gradient(x, grad_y, rinv, coefficient, shift, silu)
            lane_du_v += run_sums(du * v, BLOCK_CHANNELS, BLOCK_PIXELS, VECTOR)
            lane_du += run_sums(du, BLOCK_CHANNELS, BLOCK_PIXELS, VECTOR)
            if compute_grad_x:
                # Where the clamp max(||x||, eps) picks eps, rinv does not depend on x: no second term.
                dot = tl.where(unclamped, tl.sum(du * coefficient[:, None] * v, 0), 0.0)
                _store_grad_x(grad_x_ptr, offsets, mask, rinv, du, coefficient, v, dot, CHANNELS_LAST, ALIGN)
        tl.store(partial_du_xhat_ptr + partial_row + channel, tl.sum(lane_du_v, 1) * sqrt_channels,
                 mask=channel_valid)
        tl.store(partial_du_ptr + partial_row + channel, tl.sum(lane_du, 1), mask=channel_valid)
    else:
        # Stepping: one pixel block per program (the plan's: these sums over every channel block do not stay in
        # registers across pixel blocks; a loop here also spilled on sm_80).
        pixel_block = first_block
        pixel = pixel_block * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
        pixel_valid = pixel < pixels
        if has_rinv:
            rinv, unclamped = _load_rinv(rinv_ptr, batch, pixel, pixel_valid, pixels)
        else:
            norm = tl.sqrt(_sum_of_squares(x_ptr, batch, pixel, pixel_valid, channels, batch_stride, line_stride,
                                           BLOCK_CHANNELS, CHANNELS_LAST, ALIGN))
            rinv, unclamped = _clamped_rinv(norm, eps)
        # Pass 2: dot(a, v) per pixel (per lane across the channel blocks, summed once after), and this
        # program's per-channel sums for the parameter gradients.
        lane_dot = tl.zeros([BLOCK_CHANNELS, BLOCK_PIXELS], tl.float32)
        for channel_block in range(tl.cdiv(channels, BLOCK_CHANNELS)):
            channel, channel_valid, coefficient, shift, mask, offsets = _stepping_tile(
                g_ptr, scale_ptr, shift_ptr, batch, channel_block, pixel_block, channels, pixels, sqrt_channels,
                batch_stride, line_stride, scale_batch_stride, scale_channel_stride, shift_batch_stride,
                shift_channel_stride, dtype_codes, has_scale, has_shift, BLOCK_CHANNELS, BLOCK_PIXELS,
                CHANNELS_LAST)
            # Pass 3 reads this tile again: ask L2 to keep it.
            v, du = _gradient_tile(grad_y_ptr, x_ptr, offsets, mask, batch, pixel, batch_stride, line_stride,
                                   grad_batch_stride, grad_line_stride, rinv, coefficient, shift, silu,
                                   "evict_last", CHANNELS_LAST, ALIGN)
            lane_dot += du * coefficient[:, None] * v
            tl.store(partial_du_xhat_ptr + partial_row + channel, tl.sum(du * v, 1) * sqrt_channels,
                     mask=channel_valid)
            tl.store(partial_du_ptr + partial_row + channel, tl.sum(du, 1), mask=channel_valid)
        if compute_grad_x:
            dot = tl.where(unclamped, tl.sum(lane_dot, 0), 0.0)
            for channel_block in range(tl.cdiv(channels, BLOCK_CHANNELS)):
                _, _, coefficient, shift, mask, offsets = _stepping_tile(
                    g_ptr, scale_ptr, shift_ptr, batch, channel_block, pixel_block, channels, pixels,
                    sqrt_channels, batch_stride, line_stride, scale_batch_stride, scale_channel_stride,
                    shift_batch_stride, shift_channel_stride, dtype_codes, has_scale, has_shift, BLOCK_CHANNELS,
                    BLOCK_PIXELS, CHANNELS_LAST)
                v, du = _gradient_tile(grad_y_ptr, x_ptr, offsets, mask, batch, pixel, batch_stride,
                                       line_stride, grad_batch_stride, grad_line_stride, rinv, coefficient,
                                       shift, silu, "evict_first", CHANNELS_LAST, ALIGN)
                _store_grad_x(grad_x_ptr, offsets, mask, rinv, du, coefficient, v, dot, CHANNELS_LAST, ALIGN)


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


# The only tiles a plan may use (gpu_compile_configs compiles each for every dtype, direction and layout).
# A pixel's channels are reduced over, so a tile that holds all of them reads x (and dy) once and computes the
# activation's gradient once (ONE_BLOCK), where a tile of fewer channels steps through them in two passes (three
# in the backward), recomputing. The Unet's norms see dim * mult channels (64..512 for dim=64): a tile per power
# of two from 64 to 512 (fewer channels take the 64 one, masked), 4096 elements per step (8 KB of bf16) with rows
# of at least 16 pixels (32 bytes of bf16: a whole sector in NCHW), 8192 for 512 channels. Wider norms step
# through 256 channels at a time. The backward, which keeps x, dy and their products live, runs twice the warps,
# and in fp32 half the pixels. Each tile costs 12 compiles per architecture in the tests: no more of them.
FORWARD_TILES = {
    "channels_64": Tile(64, 64, 4),
    "channels_128": Tile(128, 32, 4),
    "channels_256": Tile(256, 16, 4),
    "channels_512": Tile(512, 16, 8),
    # C (channels_last) or H*W (NCHW) not a multiple of 8, or offset data: scalar accesses, a smaller tile that
    # always steps (odd shapes are not the Unet's; one pass there would cost compiles, not time that matters).
    "unaligned": Tile(16, 64, 4, align=1),
}
# The tile a plan gives more channels than any tile holds.
STEPPING_TILE = "channels_256"


def tile_for(name, backward, element_size):
    """The Tile a plan's tile name means for one direction and element size."""
    tile = FORWARD_TILES[name]
    if backward:
        tile = replace(tile, num_warps=2 * tile.num_warps)
    if element_size == 4:
        # fp32 doubles the registers per element: half the pixels (the channels_last forward at 64x64 spilled).
        tile = replace(tile, pixels=tile.pixels // 2)
    return tile


def one_block(tile_name, channels):
    """Whether the kernels hold every channel of a pixel in one tile (the ONE_BLOCK constexpr)."""
    return tile_name != "unaligned" and channels <= FORWARD_TILES[tile_name].channels


def plan_rms_norm(channels, pixels, channels_last, aligned):
    """The tile name for x (B, channels, H, W) with H*W = pixels (no autotuning): the smallest aligned tile that
    holds every channel, or for more channels than any holds, the stepping tile."""
    if not aligned:
        return "unaligned"
    one_block_tiles = [name for name in FORWARD_TILES if one_block(name, channels)]
    return min(one_block_tiles, key=lambda name: FORWARD_TILES[name].channels) if one_block_tiles else STEPPING_TILE


def blocks_per_program(batch, pixel_blocks, single, num_sms, backward):
    """Pixel blocks one program walks: enough that the channels' coefficients, loaded once per program, and the
    sums for the parameter gradients, summed over lanes once per program, cost little per tile, while about two
    waves of programs (PROGRAMS_PER_SM) keep the waves' tails short. One for the stepping tiles."""
    if not single:
        return 1
    programs = PROGRAMS_PER_SM[backward] * num_sms
    return max(1, min(pixel_blocks, -(-batch * pixel_blocks // programs)))


# Programs per SM (forward, backward): two waves of the 4 (forward, 4 warps) or 2 (backward, 8 warps) programs an
# SM holds at once with the walking kernels' registers (bench/static_report.py). At batch 32 on 132 SMs the
# backward walks 2 pixel blocks per program from 32x32 maps up, the forward from 64x64.
PROGRAMS_PER_SM = (8, 4)


def _prepare_launch(tile_name, tensors, backward, strides=(), blocks=None):
    """(grid, pixel blocks, blocks per program, chunks, launch metadata) for (B, C, H, W) tensors of one layout (x
    first; `strides`: a gradient's own, see gradient_rows), with the tile `tile_name` and `blocks` pixel blocks per
    program, or the planner's."""
    x = tensors[0]
    batch, channels, height, width = x.shape
    channels_last = kernel_memory_format(x) == torch.channels_last
    run = channels if channels_last else height * width
    if tile_name is None:
        tile_name = plan_rms_norm(channels, height * width, channels_last, vector_aligned(tensors, run, strides))
    tile = tile_for(tile_name, backward, x.element_size())
    if tile.align > 1 and not vector_aligned(tensors, run, strides):
        raise ValueError(f"rms_norm_act: tile {tile_name!r} needs vector-aligned inputs")
    single = one_block(tile_name, channels)
    pixel_blocks = -(-(height * width) // tile.pixels)
    if blocks is None:
        blocks = blocks_per_program(batch, pixel_blocks, single, device_limits(x.device)[0], backward)
    elif blocks != 1 and not single:
        raise ValueError(f"rms_norm_act: tile {tile_name!r} steps through {channels} channels: one pixel block "
                         f"per program, not {blocks}")
    chunks = -(-pixel_blocks // blocks)
    meta = dict(BLOCK_CHANNELS=tile.channels, BLOCK_PIXELS=tile.pixels, CHANNELS_LAST=channels_last,
                ALIGN=tile.align, ONE_BLOCK=single, num_warps=tile.num_warps, maxnreg=tile.max_registers)
    return (batch * chunks,), pixel_blocks, blocks, chunks, meta


# ---------------------------------------------------------------------------------------------------------------
# Launchers (also called directly by the tests, with explicit tiles)


def _contiguous_parameter(t):
    """g (C,) as the kernels index it (unit stride): itself for the module's parameter viewed as (C,)."""
    return t if t.stride(0) == 1 else t.contiguous()


def rms_norm_forward(x, g, scale, shift, silu, eps, tile=None, scale_shift=None, residual=None, blocks=None,
                     save_rinv=False):
    """Forward launcher. x (B, C, H, W); g (C,); scale, shift (B, C) or None, or scale_shift (B, 2C) whose halves
    are (scale, shift); residual: x's shape and dtype, or None, added after the activation.

    Returns (y, rinv): y in x's shape and dtype, in kernel_memory_format(x); rinv (B, H*W) fp32, for
    rms_norm_backward, when save_rinv (else None). tile: a name in FORWARD_TILES, blocks: pixel blocks per
    program, to force (tests).
    """
    memory_format = kernel_memory_format(x)
    x = in_memory_format(x, memory_format)
    residual = None if residual is None else in_memory_format(residual, memory_format)
    y = empty_output(x)
    grid, pixel_blocks, blocks, _, meta = _prepare_launch(tile, (x, y) if residual is None else (x, y, residual),
                                                          backward=False, blocks=blocks)
    g = _contiguous_parameter(g)
    scale, shift = split_scale_shift(scale, shift, scale_shift)
    batch, channels, height, width = x.shape
    # Without save_rinv the kernel gets a one-element fp32 placeholder it never touches (the compiled signature's
    # dtype: another tensor's would compile a second variant).
    rinv = torch.empty(batch * height * width if save_rinv else 1, device=x.device, dtype=torch.float32)
    parameter_pointers, scale_shift_strides, dtype_codes = parameter_arguments(x, (g,), (scale, shift))
    _rms_norm_forward_kernel[grid](
        x, y, x if residual is None else residual, rinv, *parameter_pointers,
        *row_strides(x.shape, memory_format), *scale_shift_strides,
        channels, height * width, pixel_blocks, blocks, float(eps), float(channels) ** 0.5, dtype_codes,
        *runtime_flags(scale is not None, shift is not None, silu, residual is not None, save_rinv), **meta)
    return y, (rinv.view(batch, height * width) if save_rinv else None)


def rms_norm_backward(grad_y, x, g, scale, shift, silu, eps, needs, tile=None, scale_shift=None, blocks=None,
                      rinv=None):
    """Backward launcher: gradients of rms_norm_forward's y (a residual's gradient is grad_y itself).

    needs: which of (x, g, scale, shift, scale_shift) want a gradient. Returns (dx, dg, d_scale, d_shift,
    d_scale_shift) in each input's dtype (dx in kernel_memory_format(x)), None where not needed. Two Triton launches:
    dx and per-program sums, then the parameter gradients (parameter_grads, after an ATen sum of the per-program
    sums of each batch where a batch has several programs). tile, blocks: as rms_norm_forward's; rinv: the
    forward's, or None to recompute it from x (a reduction over the channels of every pixel, again).
    """
    need_x, need_g, need_scale, need_shift, need_scale_shift = needs
    memory_format = kernel_memory_format(x)
    x = in_memory_format(x, memory_format)
    grad_y, *grad_strides = gradient_rows(grad_y, memory_format)
    grad_x = empty_output(x) if need_x else None
    grid, pixel_blocks, blocks, chunks, meta = _prepare_launch(
        tile, (x, grad_y) if grad_x is None else (x, grad_y, grad_x), backward=True, strides=grad_strides,
        blocks=blocks)
    g = _contiguous_parameter(g)
    scale_half, shift_half = split_scale_shift(scale, shift, scale_shift)
    batch, channels, height, width = x.shape
    if rinv is not None and (rinv.shape != (batch, height * width) or rinv.dtype != torch.float32
                             or not rinv.is_contiguous()):
        raise ValueError(f"rms_norm_backward: rinv must be the forward's contiguous fp32 "
                         f"{(batch, height * width)}, got {rinv.dtype} {tuple(rinv.shape)}")
    partial_sums = torch.empty(2, batch, chunks, channels, device=x.device, dtype=torch.float32)
    partial_du_xhat, partial_du = partial_sums
    parameter_pointers, scale_shift_strides, dtype_codes = parameter_arguments(x, (g,), (scale_half, shift_half))
    _rms_norm_backward_kernel[grid](
        grad_y, x, x if grad_x is None else grad_x, *parameter_pointers, partial_du if rinv is None else rinv,
        partial_du_xhat, partial_du,
        *row_strides(x.shape, memory_format), *grad_strides, *scale_shift_strides,
        channels, height * width, pixel_blocks, blocks, float(eps), float(channels) ** 0.5, dtype_codes,
        *runtime_flags(scale_half is not None, shift_half is not None, silu, rinv is not None, need_x), **meta)
    # g plays weight (its sums carry the sqrt(C) factor already); there is no bias.
    d_g, _, d_scale, d_shift, d_scale_shift = parameter_grads(
        partial_sums, g, None, scale, shift, scale_shift, (need_g, False, need_scale, need_shift, need_scale_shift))
    return grad_x, d_g, d_scale, d_shift, d_scale_shift


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops: autograd, opcheck and torch.compile see two opaque operators.


@torch.library.custom_op("fastunet::rms_norm_act", mutates_args=())
def rms_norm_act_op(x: torch.Tensor, g: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                    scale_shift: Optional[torch.Tensor], residual: Optional[torch.Tensor], silu: bool, eps: float,
                    save_rinv: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rinv): y as rms_norm_act; rinv (B, H*W) fp32 for the backward when save_rinv, else empty. scale_shift
    (B, 2C), when given, holds (scale, shift) as its halves (scale, shift None)."""
    y, rinv = rms_norm_forward(x, g, scale, shift, silu, eps, scale_shift=scale_shift, residual=residual,
                               save_rinv=save_rinv)
    return y, x.new_empty(0, dtype=torch.float32) if rinv is None else rinv


@rms_norm_act_op.register_fake
def _(x, g, scale, shift, scale_shift, residual, silu, eps, save_rinv):
    batch, _, height, width = x.shape
    return empty_output(x), x.new_empty((batch, height * width) if save_rinv else (0,), dtype=torch.float32)


@torch.library.custom_op("fastunet::rms_norm_act_backward", mutates_args=())
def rms_norm_act_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, g: torch.Tensor, scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], scale_shift: Optional[torch.Tensor], rinv: Optional[torch.Tensor], silu: bool,
    eps: float, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dg, d_scale, d_shift, d_scale_shift); a gradient not in `needs` (x, g, scale, shift, scale_shift) is an
    empty placeholder. rinv: the forward's, or None."""
    grads = rms_norm_backward(grad_y, x, g, scale, shift, silu, eps, needs, scale_shift=scale_shift, rinv=rinv)
    return tuple(gradient_or_empty(grad, x) for grad in grads)


@rms_norm_act_backward_op.register_fake
def _(grad_y, x, g, scale, shift, scale_shift, rinv, silu, eps, needs):
    like = (x, g, scale, shift, scale_shift)
    return tuple(
        (empty_output(x) if i == 0 else x.new_empty(t.shape, dtype=t.dtype)) if need else x.new_empty(0)
        for i, (t, need) in enumerate(zip(like, needs))
    )


def _setup_context(ctx, inputs, output):
    x, g, scale, shift, scale_shift, residual, silu, eps, save_rinv = inputs
    _, rinv = output
    ctx.mark_non_differentiable(rinv)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for rinv (nor a kernel to fill it)
    ctx.save_for_backward(x, g, scale, shift, scale_shift, rinv if save_rinv else None)
    ctx.silu, ctx.eps = silu, eps


def _backward(ctx, grad_y, _grad_rinv):
    if grad_y is None:  # y did not reach the loss (not materialized as zeros: set_materialize_grads above)
        return (None,) * 9
    x, g, scale, shift, scale_shift, rinv = ctx.saved_tensors
    need_x, need_g, need_scale, need_shift, need_scale_shift, need_residual = ctx.needs_input_grad[:6]
    needs = [need_x, need_g, need_scale and scale is not None, need_shift and shift is not None,
             need_scale_shift and scale_shift is not None]
    grads = [None] * 5
    if any(needs):
        grads = torch.ops.fastunet.rms_norm_act_backward(grad_y, x, g, scale, shift, scale_shift, rinv, ctx.silu,
                                                         ctx.eps, needs)
        grads = [grad if need else None for grad, need in zip(grads, needs)]
    # d y / d residual is the identity.
    return (*grads, grad_y if need_residual else None, None, None, None)


rms_norm_act_op.register_autograd(_backward, setup_context=_setup_context)

# The forward saves rinv (B, H*W) fp32 for the backward from this many channels on: 1/C of x's elements, so at most
# 3% of an fp32 x (6% of a 16-bit one) more kept for the backward, which in exchange skips a reduction over every
# pixel's channels (at 64 channels a quarter of its instructions, bench/static_report.py). Narrower norms, whose
# reduction is cheap and whose rinv would cost more memory relative to x, recompute it.
SAVE_RINV_MIN_CHANNELS = 32


def rinv_pays(channels):
    """Whether a training forward of a norm over `channels` saves rinv for its backward."""
    return channels >= SAVE_RINV_MIN_CHANNELS


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
    differentiable = (x, g, scale, shift, scale_shift)
    save_rinv = (rinv_pays(x.shape[1]) and torch.is_grad_enabled()
                 and any(t is not None and t.requires_grad for t in differentiable))
    return torch.ops.fastunet.rms_norm_act(x, g, scale, shift, scale_shift, residual, silu, eps, save_rinv)[0]


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (tests/gpu_compile.py)


def plannable_tiles():
    """(tile name, ONE_BLOCK) of every launch plan_rms_norm can make: each tile at its own width, and the stepping
    tile past it."""
    return [(name, one_block(name, tile.channels)) for name, tile in FORWARD_TILES.items()] + [(STEPPING_TILE, False)]


def gpu_compile_configs():
    """Every (kernel, signature, constexprs, options) a GPU run can launch: each (tile, ONE_BLOCK) of
    plannable_tiles() (the tiles of FORWARD_TILES are the only ones plan_rms_norm and _prepare_launch allow), per
    direction, layout and input dtype, and the parameter-gradient kernel; the aligned tiles with the specialization
    a Unet launch gets (unet_launch_specialization), the unaligned one without. The same list serves every
    architecture (a few KB of shared memory per tile, for the cross-warp sums). Parameters reach the kernels as raw
    bytes with runtime dtype codes and optional inputs are runtime flags, so nothing else varies."""
    kernels = (
        (_rms_norm_forward_kernel, ("x_ptr", "y_ptr", "residual_ptr"), ("has_scale", "has_shift", "silu",
                                                                          "has_residual", "save_rinv")),
        (_rms_norm_backward_kernel, ("grad_y_ptr", "x_ptr", "grad_x_ptr"),
         ("has_scale", "has_shift", "silu", "has_rinv", "compute_grad_x")),
    )
    for (kernel, x_pointers, flags), backward in zip(kernels, (False, True)):
        for (name, single), channels_last, dtype in itertools.product(plannable_tiles(), (False, True),
                                                                      FUSED_NORM_DTYPES):
            tile = tile_for(name, backward, dtype.itemsize)
            constexprs = dict(BLOCK_CHANNELS=tile.channels, BLOCK_PIXELS=tile.pixels, CHANNELS_LAST=channels_last,
                              ALIGN=tile.align, ONE_BLOCK=single)
            signature = compile_signature(kernel, constexprs, dtype, x_pointers, flags,
                                          floats=("eps", "sqrt_channels"))
            options = dict(num_warps=tile.num_warps, maxnreg=tile.max_registers)
            if tile.align == 1:  # odd shapes: no alignment to specialize
                yield kernel, signature, constexprs, options
            else:
                signature, constexprs, attrs = unet_launch_specialization(kernel, signature, constexprs)
                yield kernel, signature, constexprs, options, attrs
    yield from parameter_grads_compile_configs()
