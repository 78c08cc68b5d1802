"""Fused GroupNorm + time scale/shift + SiLU in Triton, forward and backward, as torch.library custom ops.

Computes `act(group_norm(x) * (scale + 1) + shift)` exactly as fastunet.reference.group_norm_act defines it.

Design. x (B, C, H, W) is read as B*C rows of H*W pixels (kernels/scale_shift_act.py: NCHW and channels_last in
place). A program owns a *pack*: `groups_per_pack` consecutive groups of one batch (their rows are consecutive
channels), and walks it in [BLOCK_ROWS, BLOCK_PIXELS] tiles:
- phase A: per-row mean and M2 over the pixels, kept per lane across the tiles (Welford/Chan on 16-byte runs,
  _row_statistics) and reduced once per row block, then per-group statistics from the rows of the pack (Chan
  again, lanes of one group reduced in the same order, so every row of a group holds bitwise-equal statistics);
- phase B: `y = act(x * alpha + beta)` with per-row alpha = rstd * weight * (1 + scale) and
  beta = (bias - mean * rstd * weight) * (1 + scale) + shift, walking the tiles in reverse order so that the
  most recently read ones, still in L2, come first (phase A reads with evict_last, phase B with evict_first).
The backward is the same walk: phase A sums du * xhat and du per row (du = dL/d(pre-activation)), per lane
across the tiles as the forward's statistics (_row_gradient_sums), phase B writes
dx = rstd * (gamma * du - mean_group(gamma * du) - xhat * mean_group(gamma * du * xhat)) with
gamma = weight * (1 + scale), folded into three per-row coefficients; the parameter gradients come from the
per-row sums (parameter_grads).

Three regimes, chosen by `plan_group_norm` from the shape (only a persistent grid's program count may be timed):
- many big groups: one program per SM or so, each looping over packs (a persistent grid) in balanced rounds: the
  groups being read at any time (programs x group bytes) stay within L2 where that leaves no SM idle, so phase B
  reads hit L2 and x comes from HBM once. Where they do not (the backward at 128x128, batch 32, keeps 64 MB in
  flight), the first call on a GPU times the plan against the same packs in more rounds of fewer programs, toward
  one within L2 (plan_candidates, kernels/tuning.py), and keeps the fastest;
- few big groups (B * G < SMs / 2, e.g. batch 1 at 128x128): each pack's pixels are split into chunks across
  programs, in two launches: MODE_STATS writes per-(chunk, row) statistics, MODE_APPLY combines them in chunk
  order (deterministic) and normalizes its chunk;
- small groups (8x8 maps, groups of one channel): `groups_per_pack` groups share one tile.
Everything is computed in fp32 and written in x.dtype; mean and rstd are saved in fp32 for the backward. No
atomics: the backward's parameter gradients are per-(batch, channel) sums reduced over the batch by torch.sum.
"""

import itertools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from fastunet.kernels import tuning
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
    load_parameter,
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

# What a launch of the kernels does (a runtime argument, so that one compiled kernel serves all three).
MODE_FUSED = tl.constexpr(0)  # statistics and normalization of whole packs, one launch
MODE_STATS = tl.constexpr(1)  # split path, launch 1: per-row statistics of one pixel chunk
MODE_APPLY = tl.constexpr(2)  # split path, launch 2: combine the chunks' statistics, normalize one chunk

# ---------------------------------------------------------------------------------------------------------------
# Device code


@triton.jit
def _chan_combine(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge (count, mean, sum of squared deviations) of two disjoint sets (Chan et al.); count_b > 0."""
    count = count_a + count_b
    fraction_b = count_b / count
    delta = mean_b - mean_a
    return count, mean_a + delta * fraction_b, m2_a + m2_b + delta * delta * (count_a * fraction_b)


@triton.jit
def _tile(batch, channel, valid, pixel_block, pixels, batch_stride, line_stride, BLOCK_PIXELS: tl.constexpr,
          CHANNELS_LAST: tl.constexpr):
    """The tile at `pixel_block` of one row block: (pixel, mask, offsets), its (pixels,) indices, the
    [rows, pixels] mask of valid rows and pixels, and its element offsets (tile_offsets)."""
    pixel = pixel_block * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
    mask = valid[:, None] & (pixel < pixels)[None, :]
    return pixel, mask, tile_offsets(batch, channel, pixel, batch_stride, line_stride, CHANNELS_LAST)


@triton.jit
def _vector_statistics(x, BLOCK_ROWS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, VECTOR: tl.constexpr):
    """(mean, m2) of each run of VECTOR consecutive pixels of a [rows, pixels] tile: [rows, pixels / VECTOR] each,
    in two passes over the run, in registers (run_sums)."""
    if VECTOR == 1:
        return x, tl.zeros_like(x)
    mean = run_sums(x, BLOCK_ROWS, BLOCK_PIXELS, VECTOR) * (1.0 / VECTOR)
    runs = tl.reshape(x, [BLOCK_ROWS, BLOCK_PIXELS // VECTOR, VECTOR])
    deviation = runs - mean[:, :, None]
    return mean, tl.sum(deviation * deviation, 2)


@triton.jit
def _row_statistics(x_ptr, batch, channel, valid, first_block, end_block, pixels, batch_stride, line_stride,
                    BLOCK_ROWS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    ALIGN: tl.constexpr):
    """(count, mean, m2) of each of BLOCK_ROWS rows over pixel blocks [first_block, end_block); count a scalar.

    Each lane keeps its own statistics across the tiles, and the lanes of a row are merged once at the end (two
    block-wide sums), where a reduction per tile cost 2 block-wide reductions (64 shuffles and 4 barriers per
    thread per tile). A lane is a run of VECTOR pixels of a row, one 16-byte vector in one thread in the aligned
    NCHW tiles (8 pixels), else one pixel: its statistics take each tile's run (_vector_statistics) by Chan's
    combine, with a weight 1 / (tiles so far) that is a scalar, about 3.5 FP32 instructions per element and 2
    registers per run. The full tiles take no mask in the combine; the last, partial one (at most one) does. Lanes
    that hold no element (count 0, mean 0, m2 0) add nothing to the merge."""
    VECTOR: tl.constexpr = ALIGN if not CHANNELS_LAST else 1
    LANES: tl.constexpr = BLOCK_PIXELS // VECTOR
    full_end = tl.maximum(tl.minimum(end_block, pixels // BLOCK_PIXELS), first_block)
    lane_mean = tl.zeros([BLOCK_ROWS, LANES], tl.float32)
    lane_m2 = tl.zeros([BLOCK_ROWS, LANES], tl.float32)
    lane_count = tl.zeros([LANES], tl.float32)
    for pixel_block in range(first_block, end_block):
        _, mask, offsets = _tile(batch, channel, valid, pixel_block, pixels, batch_stride, line_stride,
                                 BLOCK_PIXELS, CHANNELS_LAST)
        # Phase B reads this tile again: ask L2 to keep it.
        x = to_float32(tl.load(tile_pointers(x_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask, other=0.0,
                               eviction_policy="evict_last"))
        run_mean, run_m2 = _vector_statistics(x, BLOCK_ROWS, BLOCK_PIXELS, VECTOR)
        # Runs of a tile are whole (ALIGN divides the pixels) or empty (x = 0 there: run_m2 = 0).
        tiles_before = (pixel_block - first_block).to(tl.float32)
        delta = run_mean - lane_mean
        if pixel_block >= full_end:  # the partial last tile: empty runs keep their statistics
            run_valid = pixel_block * BLOCK_PIXELS + tl.arange(0, LANES) * VECTOR < pixels
            delta = tl.where(run_valid[None, :], delta, 0.0)
            lane_count += run_valid.to(tl.float32) * VECTOR
        else:
            lane_count += VECTOR
        fraction = 1.0 / (tiles_before + 1.0)
        lane_mean += delta * fraction
        lane_m2 += run_m2 + delta * delta * (VECTOR * tiles_before * fraction)
    # The lanes of a row merged (Chan's formula for many sets, in two passes over the lanes in registers).
    count = (tl.minimum(end_block * BLOCK_PIXELS, pixels) - first_block * BLOCK_PIXELS).to(tl.float32)
    mean = tl.sum(lane_count[None, :] * lane_mean, 1) / count
    deviation = lane_mean - mean[:, None]
    return count, mean, tl.sum(lane_m2 + lane_count[None, :] * deviation * deviation, 1)


@triton.jit
def _aligned_runs(pack_rows, pixels, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """(pack_rows, pixels), the one along the contiguous axis rewritten as a multiple of ALIGN (which the host
    guarantees it is) so that the compiler knows masks are constant over each 16-byte vector."""
    if CHANNELS_LAST:
        pack_rows = pack_rows // ALIGN * ALIGN
    else:
        pixels = pixels // ALIGN * ALIGN
    return pack_rows, pixels


@triton.jit
def _program_extent(pixels, channels_per_group, groups, num_packs, groups_per_pack, pixel_blocks_per_chunk,
                    BLOCK_ROWS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    ALIGN: tl.constexpr):
    """What a program of either kernel walks: (chunk, first_block, end_block, packs_per_batch, pack_rows, pixels,
    row_blocks, all_rows): its pixel chunk (program_id 1) as pixel blocks [first_block, end_block), the rows of
    a pack and `pixels` as _aligned_runs rewrites them, the row blocks of a pack, and B * C (the row stride of
    the split path's per-chunk statistics)."""
    chunk = tl.program_id(1)
    pixel_blocks = tl.cdiv(pixels, BLOCK_PIXELS)
    first_block = chunk * pixel_blocks_per_chunk
    end_block = tl.minimum(first_block + pixel_blocks_per_chunk, pixel_blocks)
    pack_rows, pixels = _aligned_runs(groups_per_pack * channels_per_group, pixels, CHANNELS_LAST, ALIGN)
    return (chunk, first_block, end_block, groups // groups_per_pack, pack_rows, pixels,
            tl.cdiv(pack_rows, BLOCK_ROWS), num_packs * pack_rows)


@triton.jit
def _pack_rows(row_block, first_channel, pack_rows, channels_per_group, BLOCK_ROWS: tl.constexpr):
    """Lanes of one row block of a pack: (channel, valid, group slot of the lane within the pack).

    Lanes past the pack's rows take the slot of its last row, so that in a pack of one group every lane of
    every row block refers to that group (the running statistics of all lanes stay those of the group).
    """
    local_row = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    valid = local_row < pack_rows
    slot = tl.minimum(local_row, pack_rows - 1) // channels_per_group
    return first_channel + local_row, valid, slot


@triton.jit
def _merge_rows_into_groups(slot, valid, groups_per_pack, row_count, row_mean, row_m2):
    """Statistics (count, mean, m2) of each lane's group over the valid rows of one row block, from per-row
    statistics (row_count pixels each). One scalar per group, broadcast to its lanes, so all lanes of a group
    hold the same bits. A loop over the pack's groups rather than a [lanes, lanes] mask keeps registers low; in
    the common pack of one group it runs once."""
    count = tl.zeros_like(row_mean)
    mean = tl.zeros_like(row_mean)
    m2 = tl.zeros_like(row_mean)
    for group in range(groups_per_pack):
        lane_in_group = slot == group
        in_group = valid & lane_in_group
        group_rows = tl.sum(in_group.to(tl.float32), 0)
        group_mean = tl.sum(tl.where(in_group, row_mean, 0.0), 0) / group_rows
        deviation = row_mean - group_mean
        group_m2 = tl.sum(tl.where(in_group, row_m2 + row_count * deviation * deviation, 0.0), 0)
        count = tl.where(lane_in_group, group_rows * row_count, count)
        mean = tl.where(lane_in_group, group_mean, mean)
        m2 = tl.where(lane_in_group, group_m2, m2)
    return count, mean, m2


@triton.jit
def _sum_rows_by_group(slot, valid, groups_per_pack, value):
    """Per lane, the sum of `value` over the valid rows of its group in one row block (same bits per group)."""
    total = tl.zeros_like(value)
    for group in range(groups_per_pack):
        lane_in_group = slot == group
        total = tl.where(lane_in_group, tl.sum(tl.where(valid & lane_in_group, value, 0.0), 0), total)
    return total


@triton.jit
def _row_coefficients(weight_ptr, bias_ptr, scale_ptr, shift_ptr, batch, channel, valid, mean, rstd,
                      scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
                      dtype_codes, has_weight, has_bias, has_scale, has_shift):
    """Per row: (alpha, beta) with pre-activation u = x * alpha + beta, and gamma = weight * (1 + scale)."""
    weight = load_parameter(weight_ptr, channel, valid, has_weight, dtype_code_of(dtype_codes, 0), 1.0)
    bias = load_parameter(bias_ptr, channel, valid, has_bias, dtype_code_of(dtype_codes, 1), 0.0)
    one_plus_scale, shift = load_scale_shift(scale_ptr, shift_ptr, batch, channel, valid,
                                             scale_batch_stride, scale_channel_stride,
                                             shift_batch_stride, shift_channel_stride, has_scale, has_shift,
                                             dtype_code_of(dtype_codes, 2), dtype_code_of(dtype_codes, 3))
    gamma = weight * one_plus_scale
    alpha = rstd * gamma
    beta = (bias - mean * rstd * weight) * one_plus_scale + shift
    return alpha, beta, gamma


@triton.jit
def _gradient_tile(grad_y_ptr, x_ptr, batch, channel, valid, pixel_block, pixels, batch_stride, line_stride,
                   grad_batch_stride, grad_line_stride, alpha, beta, silu, eviction_policy: tl.constexpr,
                   BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
                   GRAD_STRIDES: tl.constexpr):
    """One backward tile: (x, du, offsets, mask), x and du = dL/d(pre-activation) [rows, pixels] fp32 (0 where
    masked), from x and grad_y read with `eviction_policy`."""
    pixel, mask, offsets = _tile(batch, channel, valid, pixel_block, pixels, batch_stride, line_stride,
                                 BLOCK_PIXELS, CHANNELS_LAST)
    x = to_float32(tl.load(tile_pointers(x_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask, other=0.0,
                           eviction_policy=eviction_policy))
    grad_pointers = gradient_tile_pointers(grad_y_ptr, offsets, batch, pixel, batch_stride, line_stride,
                                           grad_batch_stride, grad_line_stride, CHANNELS_LAST, ALIGN, GRAD_STRIDES)
    grad_y = to_float32(tl.load(grad_pointers, mask=mask, other=0.0, eviction_policy=eviction_policy))
    return x, activation_backward(grad_y, x * alpha[:, None] + beta[:, None], silu), offsets, mask


@triton.jit
def _row_gradient_sums(grad_y_ptr, x_ptr, batch, channel, valid, first_block, end_block, pixels, batch_stride,
                       line_stride, grad_batch_stride, grad_line_stride, alpha, beta, mean, silu,
                       BLOCK_ROWS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                       ALIGN: tl.constexpr, GRAD_STRIDES: tl.constexpr):
    """Per row over pixel blocks [first_block, end_block): (sum of du * (x - mean), sum of du), [rows] each.

    As in _row_statistics, each lane (a 16-byte run of a row in the NCHW tiles, one pixel in the unaligned ones)
    keeps its sums across the tiles, and the lanes of a row are summed once at the end, where a block-wide sum per
    tile costs shuffles and barriers in every tile. channels_last tiles still sum each tile's rows: their lanes
    would be single elements (a channel's pixels lie in different threads), and two sums per element spilled 4-28
    bytes on sm_80 and sm_120. Masked elements have du = 0 and add nothing."""
    VECTOR: tl.constexpr = ALIGN if not CHANNELS_LAST else BLOCK_PIXELS
    LANES: tl.constexpr = BLOCK_PIXELS // VECTOR
    lane_du_centered = tl.zeros([BLOCK_ROWS, LANES], tl.float32)
    lane_du = tl.zeros([BLOCK_ROWS, LANES], tl.float32)
    for pixel_block in range(first_block, end_block):
        # Phase B reads this tile again: ask L2 to keep it.
        x, du, _, _ = _gradient_tile(grad_y_ptr, x_ptr, batch, channel, valid, pixel_block, pixels, batch_stride,
                                     line_stride, grad_batch_stride, grad_line_stride, alpha, beta, silu,
                                     "evict_last", BLOCK_PIXELS, CHANNELS_LAST, ALIGN, GRAD_STRIDES)
        lane_du_centered += run_sums(du * (x - mean[:, None]), BLOCK_ROWS, BLOCK_PIXELS, VECTOR)
        lane_du += run_sums(du, BLOCK_ROWS, BLOCK_PIXELS, VECTOR)
    return tl.sum(lane_du_centered, 1), tl.sum(lane_du, 1)


@triton.jit
def _group_norm_forward_kernel(
    x_ptr, y_ptr,  # (B, C, H, W) in x.dtype, both contiguous in the layout CHANNELS_LAST says
    residual_ptr,  # (B, C, H, W) in x.dtype and x's layout, added to y; read only when has_residual
    weight_ptr, bias_ptr,  # (C,) raw bytes of any float dtype, unit stride, read only when has_weight / has_bias
    scale_ptr, shift_ptr,  # (B, C) raw bytes of any float dtype, strided, read only when has_scale / has_shift
    mean_ptr, rstd_ptr,  # (B * G,) fp32 outputs, statistics of each (batch, group)
    partial_mean_ptr, partial_m2_ptr,  # (chunks, B * C) fp32: split path, per-row statistics of each chunk
    batch_stride, line_stride,  # of x and y: C*H*W, and H*W (NCHW) or C (channels_last)
    scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
    channels, pixels, channels_per_group, groups,  # groups per batch
    num_packs,  # B * G / groups_per_pack
    groups_per_pack,  # consecutive groups of one batch in one pack; divides groups
    pixel_blocks_per_chunk,  # pixel blocks of one chunk (all of them in MODE_FUSED)
    eps,
    dtype_codes,  # pack_dtype_codes(weight, bias, scale, shift): their runtime dtypes
    has_weight, has_bias, has_scale, has_shift, silu, has_residual,
    mode,  # MODE_FUSED, MODE_STATS or MODE_APPLY
    BLOCK_ROWS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
):
    chunk, first_block, end_block, packs_per_batch, pack_rows, pixels, row_blocks, all_rows = _program_extent(
        pixels, channels_per_group, groups, num_packs, groups_per_pack, pixel_blocks_per_chunk, BLOCK_ROWS,
        BLOCK_PIXELS, CHANNELS_LAST, ALIGN)
    lane = tl.arange(0, BLOCK_ROWS)
    for pack in range(tl.program_id(0), num_packs, tl.num_programs(0)):
        batch = pack // packs_per_batch
        first_channel = (pack % packs_per_batch) * pack_rows
        # Phase A: statistics of each lane's group, over this chunk's pixels (MODE_STATS) or all of them.
        group_count = tl.zeros([BLOCK_ROWS], tl.float32)
        group_mean = tl.zeros([BLOCK_ROWS], tl.float32)
        group_m2 = tl.zeros([BLOCK_ROWS], tl.float32)
        for row_block in range(row_blocks):
            channel, valid, slot = _pack_rows(row_block, first_channel, pack_rows, channels_per_group, BLOCK_ROWS)
            row = batch * channels + channel
            row_count = tl.zeros([], tl.float32)
            row_mean = tl.zeros([BLOCK_ROWS], tl.float32)
            row_m2 = tl.zeros([BLOCK_ROWS], tl.float32)
            if mode == MODE_APPLY:
                for other_chunk in range(tl.num_programs(1)):  # in chunk order: deterministic
                    chunk_begin = other_chunk * pixel_blocks_per_chunk * BLOCK_PIXELS
                    chunk_count = (tl.minimum(chunk_begin + pixel_blocks_per_chunk * BLOCK_PIXELS, pixels)
                                   - chunk_begin).to(tl.float32)
                    chunk_mean = tl.load(partial_mean_ptr + other_chunk * all_rows + row, mask=valid, other=0.0)
                    chunk_m2 = tl.load(partial_m2_ptr + other_chunk * all_rows + row, mask=valid, other=0.0)
                    row_count, row_mean, row_m2 = _chan_combine(row_count, row_mean, row_m2,
                                                                chunk_count, chunk_mean, chunk_m2)
            else:
                row_count, row_mean, row_m2 = _row_statistics(
                    x_ptr, batch, channel, valid, first_block, end_block, pixels, batch_stride, line_stride,
                    BLOCK_ROWS, BLOCK_PIXELS, CHANNELS_LAST, ALIGN)
            if mode == MODE_STATS:
                tl.store(partial_mean_ptr + chunk * all_rows + row, row_mean, mask=valid)
                tl.store(partial_m2_ptr + chunk * all_rows + row, row_m2, mask=valid)
            else:
                block_count, block_mean, block_m2 = _merge_rows_into_groups(slot, valid, groups_per_pack,
                                                                            row_count, row_mean, row_m2)
                group_count, group_mean, group_m2 = _chan_combine(group_count, group_mean, group_m2,
                                                                  block_count, block_mean, block_m2)
        if mode != MODE_STATS:
            rstd = 1.0 / tl.sqrt(group_m2 / group_count + eps)
            # Lane j holds the statistics of the pack's group j // channels_per_group (of all its lanes when
            # the pack is one group).
            first_row_of_group = (lane % channels_per_group == 0) & (lane < pack_rows) & (chunk == 0)
            group = pack * groups_per_pack + lane // channels_per_group
            tl.store(mean_ptr + group, group_mean, mask=first_row_of_group)
            tl.store(rstd_ptr + group, rstd, mask=first_row_of_group)
            # Phase B, last tile first: those were read last and are the likeliest to be in L2.
            for reversed_row_block in range(row_blocks):
                row_block = row_blocks - 1 - reversed_row_block
                channel, valid, slot = _pack_rows(row_block, first_channel, pack_rows, channels_per_group,
                                                  BLOCK_ROWS)
                alpha, beta, gamma = _row_coefficients(
                    weight_ptr, bias_ptr, scale_ptr, shift_ptr, batch, channel, valid, group_mean, rstd,
                    scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
                    dtype_codes, has_weight, has_bias, has_scale, has_shift)
                for reversed_pixel_block in range(first_block, end_block):
                    pixel_block = end_block - 1 - (reversed_pixel_block - first_block)
                    _, mask, offsets = _tile(batch, channel, valid, pixel_block, pixels, batch_stride, line_stride,
                                             BLOCK_PIXELS, CHANNELS_LAST)
                    x = tl.load(tile_pointers(x_ptr, offsets, CHANNELS_LAST, ALIGN), mask=mask, other=0.0,
                                eviction_policy="evict_first")
                    y = activation(to_float32(x) * alpha[:, None] + beta[:, None], silu)
                    if has_residual:
                        y += to_float32(tl.load(tile_pointers(residual_ptr, offsets, CHANNELS_LAST, ALIGN),
                                                mask=mask, other=0.0, eviction_policy="evict_first"))
                    tl.store(tile_pointers(y_ptr, offsets, CHANNELS_LAST, ALIGN), y.to(y_ptr.dtype.element_ty),
                             mask=mask, eviction_policy="evict_first")


@triton.jit
def _group_norm_backward_kernel(
    grad_y_ptr, x_ptr, grad_x_ptr,  # (B, C, H, W) in x.dtype, in the layout CHANNELS_LAST says (strides below)
    weight_ptr, bias_ptr,  # (C,) raw bytes of any float dtype, unit stride, read only when has_weight / has_bias
    scale_ptr, shift_ptr,  # (B, C) raw bytes of any float dtype, strided, read only when has_scale / has_shift
    mean_ptr, rstd_ptr,  # (B * G,) fp32 statistics saved by the forward
    sum_du_xhat_ptr, sum_du_ptr,  # (B * C,) fp32 outputs: per row, sums over pixels of du * xhat and du
    partial_du_xhat_ptr, partial_du_ptr,  # (chunks, B * C) fp32: split path, the same sums per chunk
    batch_stride, line_stride,  # of x and grad_x
    grad_batch_stride, grad_line_stride,  # of grad_y: its own under GRAD_STRIDES, else x's
    scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
    channels, pixels, channels_per_group, groups, num_packs, groups_per_pack, pixel_blocks_per_chunk,
    dtype_codes,  # pack_dtype_codes(weight, bias, scale, shift)
    has_weight, has_bias, has_scale, has_shift, silu,
    compute_grad_x,  # False: only the sums (for parameter gradients)
    mode,
    BLOCK_ROWS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    GRAD_STRIDES: tl.constexpr,  # grad_y has strides of its own (gradient_rows): read through them
):
    chunk, first_block, end_block, packs_per_batch, pack_rows, pixels, row_blocks, all_rows = _program_extent(
        pixels, channels_per_group, groups, num_packs, groups_per_pack, pixel_blocks_per_chunk, BLOCK_ROWS,
        BLOCK_PIXELS, CHANNELS_LAST, ALIGN)
    group_size = (channels_per_group * pixels).to(tl.float32)
    for pack in range(tl.program_id(0), num_packs, tl.num_programs(0)):
        batch = pack // packs_per_batch
        first_channel = (pack % packs_per_batch) * pack_rows
        first_group = pack * groups_per_pack
        # Phase A: per row, sums of du * xhat and du; per group, of gamma * du * xhat and gamma * du.
        group_sum_dxhat_xhat = tl.zeros([BLOCK_ROWS], tl.float32)
        group_sum_dxhat = tl.zeros([BLOCK_ROWS], tl.float32)
        for row_block in range(row_blocks):
            channel, valid, slot = _pack_rows(row_block, first_channel, pack_rows, channels_per_group, BLOCK_ROWS)
            row = batch * channels + channel
            mean = tl.load(mean_ptr + first_group + slot)
            rstd = tl.load(rstd_ptr + first_group + slot)
            alpha, beta, gamma = _row_coefficients(
                weight_ptr, bias_ptr, scale_ptr, shift_ptr, batch, channel, valid, mean, rstd,
                scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
                dtype_codes, has_weight, has_bias, has_scale, has_shift)
            sum_du_xhat = tl.zeros([BLOCK_ROWS], tl.float32)
            sum_du = tl.zeros([BLOCK_ROWS], tl.float32)
            if mode == MODE_APPLY:
                for other_chunk in range(tl.num_programs(1)):  # in chunk order: deterministic
                    sum_du_xhat += tl.load(partial_du_xhat_ptr + other_chunk * all_rows + row, mask=valid, other=0.0)
                    sum_du += tl.load(partial_du_ptr + other_chunk * all_rows + row, mask=valid, other=0.0)
            else:
                sum_du_centered, sum_du = _row_gradient_sums(
                    grad_y_ptr, x_ptr, batch, channel, valid, first_block, end_block, pixels, batch_stride,
                    line_stride, grad_batch_stride, grad_line_stride, alpha, beta, mean, silu,
                    BLOCK_ROWS, BLOCK_PIXELS, CHANNELS_LAST, ALIGN, GRAD_STRIDES)
                sum_du_xhat = sum_du_centered * rstd
            if mode == MODE_STATS:
                tl.store(partial_du_xhat_ptr + chunk * all_rows + row, sum_du_xhat, mask=valid)
                tl.store(partial_du_ptr + chunk * all_rows + row, sum_du, mask=valid)
            else:
                tl.store(sum_du_xhat_ptr + row, sum_du_xhat, mask=valid & (chunk == 0))
                tl.store(sum_du_ptr + row, sum_du, mask=valid & (chunk == 0))
                group_sum_dxhat_xhat += _sum_rows_by_group(slot, valid, groups_per_pack, gamma * sum_du_xhat)
                group_sum_dxhat += _sum_rows_by_group(slot, valid, groups_per_pack, gamma * sum_du)
        if (mode != MODE_STATS) & compute_grad_x:
            # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over the group, dxhat = gamma * du,
            # xhat = (x - mean) * rstd.
            mean_dxhat = group_sum_dxhat / group_size
            mean_dxhat_xhat = group_sum_dxhat_xhat / group_size
            for reversed_row_block in range(row_blocks):
                row_block = row_blocks - 1 - reversed_row_block
                channel, valid, slot = _pack_rows(row_block, first_channel, pack_rows, channels_per_group,
                                                  BLOCK_ROWS)
                mean = tl.load(mean_ptr + first_group + slot)
                rstd = tl.load(rstd_ptr + first_group + slot)
                alpha, beta, gamma = _row_coefficients(
                    weight_ptr, bias_ptr, scale_ptr, shift_ptr, batch, channel, valid, mean, rstd,
                    scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
                    dtype_codes, has_weight, has_bias, has_scale, has_shift)
                # The same per row as dx = du * du_coefficient + (x * x_coefficient + offset): 2 instructions per
                # element where the formula takes 6. x enters affinely as it does in the forward's x * alpha + beta
                # (the mean folded into the offset, rounded once per element). A group of one element normalizes
                # to 0 whatever x is: its gradient is exactly 0 (the formula's terms cancel only up to rounding).
                several = group_size > 1.0
                du_coefficient = tl.where(several, alpha, 0.0)  # alpha = rstd * gamma
                x_coefficient = tl.where(several, -rstd * rstd * mean_dxhat_xhat, 0.0)
                offset = tl.where(several, -rstd * mean_dxhat - mean * x_coefficient, 0.0)
                for reversed_pixel_block in range(first_block, end_block):
                    pixel_block = end_block - 1 - (reversed_pixel_block - first_block)
                    x, du, offsets, mask = _gradient_tile(
                        grad_y_ptr, x_ptr, batch, channel, valid, pixel_block, pixels, batch_stride, line_stride,
                        grad_batch_stride, grad_line_stride, alpha, beta, silu, "evict_first", BLOCK_PIXELS,
                        CHANNELS_LAST, ALIGN, GRAD_STRIDES)
                    grad_x = du * du_coefficient[:, None] + (x * x_coefficient[:, None] + offset[:, None])
                    tl.store(tile_pointers(grad_x_ptr, offsets, CHANNELS_LAST, ALIGN),
                             grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask, eviction_policy="evict_first")


# ---------------------------------------------------------------------------------------------------------------
# Launch plans


@dataclass(frozen=True)
class Tile:
    """One compiled shape of a kernel: [rows, pixels] per step, in one layout."""

    rows: int
    pixels: int
    num_warps: int
    channels_last: bool
    align: int = VECTOR_ELEMENTS  # the ALIGN constexpr: 8 needs vector_aligned() inputs, 1 takes any
    # ptxas's .maxnreg. Without it ptxas caps registers on its own to raise occupancy and spills (cold) below
    # that cap; 128 leaves 4 programs of 4 warps (2 of 8, 1 of 16) per SM.
    max_registers: int = 128


# The only tiles a plan may use (gpu_compile_configs compiles each for every dtype), per direction and layout,
# under the same names; few, since each costs a compile per dtype, direction and arch in the tests. Tiles of
# 4096 elements (8 KB of bf16) run several programs per SM; the "big" one of the forward holds 16384 (32 KB in
# flight per step, enough with one program per SM, which the persistent grid of big groups uses). 16-32
# elements per thread in the forward, 8-16 in the backward (x, dy and their products live).
FORWARD_TILES = {
    False: {  # NCHW
        # Maps up to 16x16: 64 channels (one group, or several packed) of 64 pixels (128 bytes of bf16) per step.
        "small_maps": Tile(64, 64, 8, False),
        # Up to 64x64 maps, and the pixel chunks of the split path: 512 pixels (1 KB of bf16) per row, small
        # enough that batch 1 at 128x128 splits into 32 chunks per group, 256 programs.
        "rows": Tile(8, 512, 4, False),
        "big": Tile(8, 2048, 16, False),  # bigger maps, tensors beyond L2: persistent programs
        # H*W or the data not aligned to 8 elements (7x5 maps, offset views): scalar accesses, so few rows
        # per thread (each row costs registers for its coefficients in every thread holding it).
        "unaligned": Tile(4, 512, 8, False, align=1),
    },
    True: {  # channels_last: 16 elements per thread, where NCHW takes 32 (its statistics keep one lane per
        # 16-byte run of a row, _row_statistics; here a lane per element, whose statistics spilled at 32 on sm_80)
        "small_maps": Tile(64, 64, 8, True),
        "rows": Tile(8, 512, 8, True),
        "big": Tile(8, 1024, 16, True),
        "unaligned": Tile(16, 128, 8, True, align=1),  # packs of a channel count not a multiple of 8 (C=12, G=4)
    },
}
BACKWARD_TILES = {
    channels_last: {name: replace(tile, num_warps=8) if tile.num_warps < 16 else replace(tile, pixels=1024)
                    for name, tile in tiles.items()}
    for channels_last, tiles in FORWARD_TILES.items()
}


def tile_for(name, backward, channels_last, element_size):
    """The Tile a plan's tile name means for one direction, layout and element size. fp32 doubles the vectors
    (and their pointers) per element: its backward, the heaviest kernel, takes half the pixels per step."""
    tile = (BACKWARD_TILES if backward else FORWARD_TILES)[channels_last][name]
    if backward and element_size == 4:
        tile = replace(tile, pixels=tile.pixels // 2)
    return tile


@dataclass(frozen=True)
class GroupNormPlan:
    """How one call is launched: its tile (a name in FORWARD_TILES / BACKWARD_TILES), packs, pixel chunks and
    persistent programs."""

    tile: str
    groups_per_pack: int  # divides G; more than 1 only when the pack's channels fit one row block
    chunks: int  # pixel chunks per pack: 1 is the fused single launch, more the two-launch split path
    programs: int  # programs along the packs (fused path: fewer than the packs makes each loop over several)


def _contiguous_run(channels_last, pixels, pack_rows):
    """Elements one program reads contiguously: a pack's channels of a pixel, or a row's pixels."""
    return pack_rows if channels_last else pixels


def _pack_sizes(tile, groups, channels_per_group, pixels, channels_last):
    """The groups per pack a tile can run: divisors of G whose channels fit one row block (any when 1), cut in
    contiguous runs the tile's ALIGN allows."""
    return [size for size in range(1, groups + 1)
            if groups % size == 0 and (size == 1 or size * channels_per_group <= tile.rows)
            and _contiguous_run(channels_last, pixels, size * channels_per_group) % tile.align == 0]


def _l2_budget(l2_bytes):
    """Bytes of L2 a launch may count on keeping between two passes: 3/4 of it (the rest for everything else)."""
    return 3 * l2_bytes // 4


def plan_group_norm(batch, channels, pixels, groups, channels_last, aligned, element_size, num_sms, l2_bytes,
                    backward=False):
    """The launch plan for x (batch, channels, H, W), H*W = pixels, from the shape alone (no autotuning).

    aligned: whether vector_aligned() holds for runs of H*W (NCHW) or C (channels_last) elements.
    """
    channels_per_group = channels // groups
    all_groups = batch * groups
    # Fewer groups than SMs leave SMs idle: split their pixels across programs (two launches, deterministic). The
    # second launch re-reads x (and dy): from L2 when they fit the L2 budget, else from HBM, which only pays off
    # when most SMs would be idle (fewer groups than half the SMs).
    streamed_bytes = batch * channels * pixels * element_size * (2 if backward else 1)
    split = pixels > 1024 and (all_groups < num_sms // 2
                               or (all_groups < num_sms and streamed_bytes <= _l2_budget(l2_bytes)))
    if not aligned:
        name = "unaligned"
    elif pixels <= 256:
        name = "small_maps"
    elif split or pixels <= 4096:
        name = "rows"
    else:
        name = "big"
    pack_sizes = _pack_sizes(tile_for(name, backward, channels_last, element_size), groups, channels_per_group,
                             pixels, channels_last)
    if not pack_sizes:  # channels_last groups whose channels no pack cuts in multiples of 8 (C=24, G=8, 3 rows)
        name = "unaligned"
        pack_sizes = _pack_sizes(tile_for(name, backward, channels_last, element_size), groups, channels_per_group,
                                 pixels, channels_last)
    # The largest pack that keeps two programs per SM (when there are that many groups), else the smallest.
    keep_programs = [size for size in pack_sizes if size <= max(1, all_groups // (2 * num_sms))]
    groups_per_pack = max(keep_programs) if keep_programs else min(pack_sizes)
    num_packs = all_groups // groups_per_pack
    if split:
        pixel_blocks = -(-pixels // tile_for(name, backward, channels_last, element_size).pixels)
        return GroupNormPlan(name, groups_per_pack, min(pixel_blocks, -(-2 * num_sms // num_packs)), num_packs)
    # Persistent grid: the packs in flight (x, and dy in the backward) should fit the L2 budget, so that phase B
    # finds its tiles there; but this plan never takes fewer programs than SMs, which would leave SMs without
    # work: at 128x128, batch 32, bf16, the backward's 512 KB packs allow 75 programs, four rounds of its 256
    # packs, and its issue floor, 0.60x the HBM floor in two rounds on 128 SMs in bench/static_report.py, would be
    # ~1.2x in four, against a modelled 1.15x the minimum bytes in two rounds; three rounds (86 programs, all in
    # L2, issue ~0.9x) fall between. Only a GPU can weigh the two, so plan_candidates lists the L2-resident rounds
    # beside this plan and the first call of the shape on a GPU times them (kernels/tuning.py).
    # Then the fewest programs that take as many rounds of packs: the same time, fewer bytes in flight (256 packs
    # on 132 SMs take two rounds either way; 128 programs hold 3% fewer packs than 132).
    pack_bytes = _pack_bytes(groups_per_pack, channels_per_group, pixels, element_size, backward)
    programs = min(num_packs, max(num_sms, _l2_budget(l2_bytes) // pack_bytes))
    rounds = -(-num_packs // programs)
    return GroupNormPlan(name, groups_per_pack, 1, -(-num_packs // rounds))


def _pack_bytes(groups_per_pack, channels_per_group, pixels, element_size, backward):
    """Bytes a persistent program holds between its two passes over a pack: x, and dy in the backward."""
    return groups_per_pack * channels_per_group * pixels * element_size * (2 if backward else 1)


def plan_candidates(batch, channels, pixels, groups, channels_last, aligned, element_size, num_sms, l2_bytes,
                    backward=False):
    """The plans a call on the GPU chooses from by timing them (kernels/tuning.py): plan_group_norm's first, then,
    while the last one's persistent programs hold more than the L2 budget between their passes, the same packs in
    one more round (fewer programs, fewer bytes in flight), as long as that keeps at least half the SMs busy (below
    that the issue time per SM doubles: a sure loss). At 128x128, batch 32, bf16, on an H100 the backward's 128
    programs (64 MB in flight against 50 MB of L2) are timed against 86 (3 rounds, 43 MB): fewer bytes from HBM
    against fewer busy SMs, which bench/static_report.py cannot weigh. A pack is computed by one program whatever
    their number, so every candidate gives the same bits."""
    plan = plan_group_norm(batch, channels, pixels, groups, channels_last, aligned, element_size, num_sms, l2_bytes,
                           backward)
    candidates = [plan]
    if plan.chunks > 1:
        return candidates
    num_packs = batch * groups // plan.groups_per_pack
    pack_bytes = _pack_bytes(plan.groups_per_pack, channels // groups, pixels, element_size, backward)
    rounds = -(-num_packs // plan.programs)
    while candidates[-1].programs * pack_bytes > _l2_budget(l2_bytes):
        rounds += 1
        programs = -(-num_packs // rounds)
        if 2 * programs < num_sms:
            break
        if programs < candidates[-1].programs:  # a round that changes nothing (more rounds than packs) is skipped
            candidates.append(replace(plan, programs=programs))
    return candidates


def _prepare_launch(plan, tensors, groups, backward, strides=()):
    """Check (or choose) the plan for (B, C, H, W) tensors of one layout (x first; `strides`: a gradient's own, see
    gradient_rows, when they are not x's). Returns the plans to choose from (the forced one, or plan_candidates'),
    each with its chunks normalized, the shape arguments of the kernels and their launch metadata (the same for
    every candidate: they differ in their programs only)."""
    x = tensors[0]
    batch, channels, height, width = x.shape
    pixels, channels_per_group = height * width, channels // groups
    channels_last = kernel_memory_format(x) == torch.channels_last
    if plan is None:
        num_sms, l2_bytes = device_limits(x.device)
        aligned = vector_aligned(tensors, _contiguous_run(channels_last, pixels, channels), strides)
        candidates = plan_candidates(batch, channels, pixels, groups, channels_last, aligned, x.element_size(),
                                     num_sms, l2_bytes, backward)
        plan, alternatives = candidates[0], candidates[1:]
    else:
        alternatives = []
    if backward and strides and plan.tile == "big":
        # Its 16 warps cap ptxas at 128 registers, where the shifts of a gradient's own strides spill 8-24 bytes
        # (see _max_registers): the same 8-row programs on the "rows" tile instead.
        plan = replace(plan, tile="rows")
        alternatives = [replace(alternative, tile="rows") for alternative in alternatives]
    pack_rows = plan.groups_per_pack * channels_per_group
    tile = tile_for(plan.tile, backward, channels_last, x.element_size())
    if groups % plan.groups_per_pack or (plan.groups_per_pack > 1 and pack_rows > tile.rows):
        raise ValueError(f"group_norm_act: {plan.groups_per_pack} groups per pack do not divide {groups} groups "
                         f"or do not fit {tile.rows} rows")
    if tile.align > 1 and not vector_aligned(tensors, _contiguous_run(channels_last, pixels, pack_rows), strides):
        raise ValueError(f"group_norm_act: tile {plan.tile!r} needs vector-aligned inputs")
    if plan.chunks < 1 or plan.programs < 1:
        raise ValueError(f"group_norm_act: chunks and programs must be positive, got {plan}")
    # Equal chunks covering the pixel blocks exactly (none starts past the end).
    pixel_blocks = -(-pixels // tile.pixels)
    blocks_per_chunk = -(-pixel_blocks // min(plan.chunks, pixel_blocks))
    plan = replace(plan, chunks=-(-pixel_blocks // blocks_per_chunk))
    num_packs = batch * groups // plan.groups_per_pack
    shape_args = (channels, pixels, channels_per_group, groups, num_packs, plan.groups_per_pack, blocks_per_chunk)
    meta = dict(BLOCK_ROWS=tile.rows, BLOCK_PIXELS=tile.pixels, CHANNELS_LAST=channels_last, ALIGN=tile.align,
                num_warps=tile.num_warps, maxnreg=_max_registers(tile, bool(strides)))
    if backward:
        meta.update(GRAD_STRIDES=bool(strides))
    return [plan] + [replace(alternative, chunks=plan.chunks) for alternative in alternatives], shape_args, meta


def _max_registers(tile, grad_strides):
    """ptxas's register cap of a tile. With a gradient of strides of its own (GRAD_STRIDES, backward), the shift of
    its pointer pushed the aligned 16-bit tiles past the 128 of Tile.max_registers (12-28 bytes of spills on
    sm_80), and without a cap ptxas limited itself to 64 on sm_90 and spilled 20: 255, which ptxas uses as needed
    (sm_80: 96-128 for NCHW, up to 228 for channels_last), fewer programs per SM on that path only. Its tiles
    have at most 8 warps (the 16 of "big" could not exceed 128 registers: _prepare_launch avoids it)."""
    return 255 if grad_strides else tile.max_registers


def _launch(kernel, plan, num_packs, args, meta):
    """One fused launch, or the two launches of the split path (MODE_STATS, then MODE_APPLY)."""
    if plan.chunks == 1:
        kernel[(plan.programs, 1)](*args, MODE_FUSED.value, **meta)
    else:
        for mode in (MODE_STATS, MODE_APPLY):
            kernel[(num_packs, plan.chunks)](*args, mode.value, **meta)


def _launch_fastest(kernel, plans, x, groups, num_packs, args, meta):
    """_launch with the fastest of `plans` for this shape, dtype and layout on x's device (kernels/tuning.py: timed
    at the first such call where there are several; their kernels only write outputs, the same bits each)."""
    plan = plans[0]
    if len(plans) > 1:  # the key only where there is a choice: most calls have one plan, and launch cost matters
        key = ("group_norm", kernel.__name__, x.device.index, tuple(x.shape), groups, x.dtype, tuple(x.stride()),
               tuple(meta.items()))
        plan = tuning.fastest(key, plans, lambda plan: _launch(kernel, plan, num_packs, args, meta), same_bits=True)
    _launch(kernel, plan, num_packs, args, meta)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (also called directly by the tests, with explicit plans)


def _contiguous_parameter(t):
    """A (C,) parameter as the kernels index it (unit stride): itself for any nn.Module parameter or view of one."""
    return t if t is None or t.stride(0) == 1 else t.contiguous()


def group_norm_forward(x, weight, bias, groups, scale, shift, silu, eps, plan=None, scale_shift=None,
                       residual=None):
    """Forward launcher. x (B, C, H, W); weight, bias (C,) or None; scale, shift (B, C) or None, or scale_shift
    (B, 2C) whose halves are (scale, shift); residual: x's shape and dtype, or None, added after the activation.

    Returns y (x's shape and dtype, in kernel_memory_format(x)), mean and rstd ((B, G) fp32).
    plan: a GroupNormPlan to force (tests); by default plan_group_norm's.
    """
    memory_format = kernel_memory_format(x)
    x = in_memory_format(x, memory_format)
    residual = None if residual is None else in_memory_format(residual, memory_format)
    y = empty_output(x)
    plans, shape_args, meta = _prepare_launch(plan, (x, y) if residual is None else (x, y, residual), groups,
                                              backward=False)
    chunks = plans[0].chunks
    weight, bias = _contiguous_parameter(weight), _contiguous_parameter(bias)
    scale, shift = split_scale_shift(scale, shift, scale_shift)
    batch, channels = x.shape[:2]
    mean = torch.empty(batch, groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    partial_mean, partial_m2 = torch.empty(2, chunks if chunks > 1 else 0, batch * channels, device=x.device,
                                           dtype=torch.float32)
    parameter_pointers, scale_shift_strides, dtype_codes = parameter_arguments(mean, (weight, bias), (scale, shift))
    args = (
        x, y, x if residual is None else residual, *parameter_pointers,
        mean, rstd, partial_mean, partial_m2,
        *row_strides(x.shape, memory_format), *scale_shift_strides, *shape_args,
        float(eps), dtype_codes, *runtime_flags(weight is not None, bias is not None, scale is not None, shift is not None, silu,
                                   residual is not None),
    )
    _launch_fastest(_group_norm_forward_kernel, plans, x, groups, shape_args[4], args, meta)
    return y, mean, rstd


def group_norm_backward(grad_y, x, weight, bias, groups, scale, shift, silu, mean, rstd, needs, plan=None,
                        scale_shift=None):
    """Backward launcher: gradients of group_norm_forward's y (a residual's gradient is grad_y itself).

    grad_y, x (B, C, H, W); mean, rstd (B, G) fp32 from the forward. needs: which of (x, weight, bias, scale,
    shift, scale_shift) want a gradient. Returns (dx, d_weight, d_bias, d_scale, d_shift, d_scale_shift), each in
    its input's dtype (dx in kernel_memory_format(x)), None where not needed. Two launches: dx and per-row sums,
    then the parameter gradients (parameter_grads).
    """
    need_x, *need_parameters = needs
    memory_format = kernel_memory_format(x)
    x = in_memory_format(x, memory_format)
    grad_y, *grad_strides = gradient_rows(grad_y, memory_format)
    own_strides = tuple(grad_strides) != row_strides(x.shape, memory_format)
    grad_x = empty_output(x) if need_x else None
    plans, shape_args, meta = _prepare_launch(plan, (x, grad_y) if grad_x is None else (x, grad_y, grad_x), groups,
                                              backward=True, strides=tuple(grad_strides) if own_strides else ())
    chunks = plans[0].chunks
    weight, bias = _contiguous_parameter(weight), _contiguous_parameter(bias)
    scale_half, shift_half = split_scale_shift(scale, shift, scale_shift)
    batch, channels = x.shape[:2]
    # Per-row sums of du * xhat and du, the (2, B, 1, C) partial sums of parameter_grads.
    row_sums = torch.empty(2, batch, 1, channels, device=x.device, dtype=torch.float32)
    sum_du_xhat, sum_du = row_sums
    partial_du_xhat, partial_du = torch.empty(2, chunks if chunks > 1 else 0, batch * channels, device=x.device,
                                              dtype=torch.float32)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    parameter_pointers, scale_shift_strides, dtype_codes = parameter_arguments(mean, (weight, bias),
                                                                              (scale_half, shift_half))
    args = (
        grad_y, x, x if grad_x is None else grad_x, *parameter_pointers,
        mean, rstd, sum_du_xhat, sum_du, partial_du_xhat, partial_du,
        *row_strides(x.shape, memory_format), *grad_strides, *scale_shift_strides, *shape_args, dtype_codes,
        *runtime_flags(weight is not None, bias is not None, scale_half is not None, shift_half is not None, silu,
                       need_x),
    )
    _launch_fastest(_group_norm_backward_kernel, plans, x, groups, shape_args[4], args, meta)
    parameter_grads_ = parameter_grads(row_sums, weight, bias, scale, shift, scale_shift, need_parameters)
    return (grad_x, *parameter_grads_)


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops: autograd, opcheck and torch.compile see two opaque operators.


@torch.library.custom_op("fastunet::group_norm_act", mutates_args=())
def group_norm_act_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], groups: int,
                      scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                      scale_shift: Optional[torch.Tensor], residual: Optional[torch.Tensor], silu: bool,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): y as group_norm_act, mean and rstd (B, G) fp32 for the backward. scale_shift (B, 2C), when
    given, holds (scale, shift) as its two halves and scale, shift are None."""
    return group_norm_forward(x, weight, bias, groups, scale, shift, silu, eps, scale_shift=scale_shift,
                              residual=residual)


@group_norm_act_op.register_fake
def _(x, weight, bias, groups, scale, shift, scale_shift, residual, silu, eps):
    mean = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return empty_output(x), mean, torch.empty_like(mean)


@torch.library.custom_op("fastunet::group_norm_act_backward", mutates_args=())
def group_norm_act_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], groups: int,
    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], scale_shift: Optional[torch.Tensor], silu: bool,
    mean: torch.Tensor, rstd: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_weight, d_bias, d_scale, d_shift, d_scale_shift); a gradient not in `needs` (x, weight, bias, scale,
    shift, scale_shift) is an empty placeholder."""
    grads = group_norm_backward(grad_y, x, weight, bias, groups, scale, shift, silu, mean, rstd, needs,
                                scale_shift=scale_shift)
    return tuple(gradient_or_empty(grad, x) for grad in grads)


@group_norm_act_backward_op.register_fake
def _(grad_y, x, weight, bias, groups, scale, shift, scale_shift, silu, mean, rstd, needs):
    like = (x, weight, bias, scale, shift, scale_shift)
    return tuple(
        (empty_output(x) if i == 0 else x.new_empty(t.shape, dtype=t.dtype)) if need else x.new_empty(0)
        for i, (t, need) in enumerate(zip(like, needs))
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, scale, shift, scale_shift, residual, silu, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, scale_shift, mean, rstd)
    ctx.groups, ctx.silu = groups, silu
    ctx.mark_non_differentiable(mean, rstd)
    # Autograd would otherwise fill the unused gradients of mean and rstd with zeros: two kernels per backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, scale, shift, scale_shift, mean, rstd = ctx.saved_tensors
    need_x, need_weight, need_bias, _, need_scale, need_shift, need_scale_shift, need_residual = \
        ctx.needs_input_grad[:8]
    needs = [need_x, need_weight and weight is not None, need_bias and bias is not None,
             need_scale and scale is not None, need_shift and shift is not None,
             need_scale_shift and scale_shift is not None]
    grads = [None] * 6
    if grad_y is None:  # y unused (gradients are not materialized)
        return (None,) * 10
    if any(needs):
        grads = torch.ops.fastunet.group_norm_act_backward(grad_y, x, weight, bias, ctx.groups, scale, shift,
                                                           scale_shift, ctx.silu, mean, rstd, needs)
        grads = [grad if need else None for grad, need in zip(grads, needs)]
    grad_x, d_weight, d_bias, d_scale, d_shift, d_scale_shift = grads
    # d y / d residual is the identity.
    return (grad_x, d_weight, d_bias, None, d_scale, d_shift, d_scale_shift, grad_y if need_residual else None,
            None, None)


group_norm_act_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm_act(x, weight, bias, groups, scale=None, shift=None, silu=True, eps=1e-5, residual=None):
    """`silu?(group_norm(x) * (scale + 1) + shift) + residual`, statistics in fp32, returned in x.dtype.

    x: (B, C, H, W) fp32/fp16/bf16, any strides (NCHW and channels_last read in place; the result keeps
    channels_last, everything else comes back NCHW-contiguous). weight, bias: (C,) or None, any float dtype.
    groups: divides C. scale, shift: (B, C) or None, any float dtype and strides; when they are the two halves of
    one (B, 2C) tensor (time_mlp(t).chunk(2, dim=1)), that tensor is read and differentiated whole. residual: x's
    shape and dtype, or None. Differentiable in x, weight, bias, scale, shift and residual (gradients in each
    one's dtype); deterministic.
    """
    scale_shift = halves_of_one(scale, shift)
    if scale_shift is not None:
        scale = shift = None
    return torch.ops.fastunet.group_norm_act(x, weight, bias, groups, scale, shift, scale_shift, residual, silu,
                                             eps)[0]


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (tests/gpu_compile.py)


def gpu_compile_configs():
    """Every (kernel, signature, constexprs, options) a GPU run can launch: each tile of FORWARD_TILES and
    BACKWARD_TILES (the only ones plan_group_norm and _prepare_launch allow) for each input dtype, and the
    parameter-gradient kernel; the aligned NCHW tiles with the specialization a Unet launch gets (16-divisible
    pointers, sizes and strides, unit scale/shift strides: unet_launch_specialization), the others without. The same
    list serves every architecture: the tiles need at most 1 KB of shared memory, far below the 99 KB of sm_86/89/120. Parameters reach the kernels as raw bytes with runtime dtype codes and optional
    inputs are runtime flags, so nothing else varies."""
    kernels = (
        (_group_norm_forward_kernel, ("x_ptr", "y_ptr", "residual_ptr"),
         ("has_weight", "has_bias", "has_scale", "has_shift", "silu", "has_residual")),
        (_group_norm_backward_kernel, ("grad_y_ptr", "x_ptr", "grad_x_ptr"),
         ("has_weight", "has_bias", "has_scale", "has_shift", "silu", "compute_grad_x")),
    )
    for (kernel, x_pointers, flags), backward in zip(kernels, (False, True)):
        for channels_last, names in FORWARD_TILES.items():
            for name, dtype in itertools.product(names, FUSED_NORM_DTYPES):
                tile = tile_for(name, backward, channels_last, dtype.itemsize)
                constexprs = dict(BLOCK_ROWS=tile.rows, BLOCK_PIXELS=tile.pixels, CHANNELS_LAST=channels_last,
                                  ALIGN=tile.align)
                # The backward in both forms: a gradient in x's strides, and one with its own (GRAD_STRIDES; never
                # on the "big" tile, see _prepare_launch).
                for grad_strides in (False, True) if backward else (None,):
                    if grad_strides and name == "big":
                        continue
                    if grad_strides is not None:
                        constexprs = dict(constexprs, GRAD_STRIDES=grad_strides)
                    signature = compile_signature(kernel, constexprs, dtype, x_pointers, flags)
                    options = dict(num_warps=tile.num_warps, maxnreg=_max_registers(tile, grad_strides))
                    # The Unet's layout (NCHW) with the specialization its launches get; channels_last and odd
                    # shapes without (with it, channels_last backward tiles spilled 12-24 bytes on sm_80/86: not
                    # yet refit).
                    if tile.align == 1 or channels_last:
                        yield kernel, signature, constexprs, options
                    else:
                        signature, constexprs_, attrs = unet_launch_specialization(kernel, signature, constexprs)
                        yield kernel, signature, constexprs_, options, attrs
    yield from parameter_grads_compile_configs()
