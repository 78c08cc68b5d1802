"""Fused linear attention with memory key/values (upstream LinearAttention's core), forward and backward in Triton.

Math (fastunet.reference.linear_attention defines it), per (batch b, head h), with K = [mem_k, k] and
V = [mem_v, v] along the M + N positions j, and d features c, e:

    p[c, n]      = softmax over c of q[:, n]                  (queries: feature softmax, per position)
    ks[c, j]     = exp(K[c, j] - lse[c]),  lse[c] = log sum_j exp(K[c, j])   (keys: position softmax, per row)
    context[c,e] = sum_j ks[c, j] V[e, j]                      (d x d)
    out[e, n]    = d^-0.5 sum_c context[c, e] p[c, n]

Forward, three launches (no float atomics, so every result is bitwise reproducible):
  1. `_context_partial_kernel`, grid (B*heads, splits): each program streams k and v over its split of the
     positions (the first split also reads the M memory slots) and keeps an online per-row max, sum of exp and
     unnormalized d x d context relative to that max.
  2. `_context_combine_kernel`, grid (B*heads, d / ROWS): combines the splits in index order, rescaling each by
     exp(max_split - max_all), into the normalized context and lse (both fp32, saved for the backward).
  3. `_output_kernel`, grid (B*heads, programs): out = (d^-0.5 context)^T softmax(q), a tile of positions at a time.
Backward, three launches:
  1. `_query_grad_kernel`, grid (B*heads, splits): dq through the feature softmax, and per-split partials of
     dcontext = d^-0.5 p dout^T.
  2. `_context_grad_combine_kernel`: dcontext = sum of the partials in split order, and the per-row
     sum_j ks[c, j] dks[c, j] of the position-softmax backward, which equals sum_e dcontext[c, e] context[c, e]
     (substitute dks = dcontext V and context = ks V^T), so it costs no extra pass over k and v.
  3. `_key_value_grad_kernel`: dks = dcontext V, dk = ks (dks - rowsum), dv = dcontext^T ks; the first program of
     each (b, head) writes the memory slots' gradients per batch, which torch sums over the batch.
Minimum traffic, each pass reading its inputs once: forward reads q, k, v and writes out; backward reads q, k,
v, dout and writes dq, dk, dv. All statistics and accumulations are fp32. Matrix products take 16-bit operands
(tensor cores, fp32 accumulation) for fp16/bf16 inputs and exact fp32 ("ieee") for fp32 inputs.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastunet.kernels import INTERPRETING

HEAD_DIMS = (16, 32, 64, 128)
_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

# Rows of the d x d context one combine program handles: a (16, d) fp32 tile stays in registers even at d = 128.
COMBINE_ROWS = 16
# The interpreter's cost is per program and per op, so it runs one program per (b, head) over 32-position tiles:
# small enough that the test shapes (N = 35, 64, 100) still take several tiles through the online rescaling.
INTERPRETER_BLOCK_N = 32
# Programs the heuristic aims at per SM: 4-warp programs using ~100-170 registers fit 2-4 to an SM, so this is a
# few waves, enough loads in flight to cover HBM latency and a small tail when the last wave is partial.
PROGRAMS_PER_SM = 8
# A reduction split spans at least this many tiles, so its (d x d) fp32 partial is <= 1/8 of the bytes it reads
# (d = 32, 128 positions a tile: 4 tiles read 64 KiB of bf16 k and v, the partial is 4 KiB).
MIN_TILES_PER_SPLIT = 4
# A map program (output, key/value grads) loads a d x d matrix before its loop; it spans at most this many tiles
# (fewer when that leaves the GPU underfilled) so the matrix load stays under ~1/8 of its traffic while the
# programs stay small enough for the last wave not to matter.
MAX_TILES_PER_PROGRAM = 4


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation, operands rounded to DOT_DTYPE (the input dtype: tensor cores for 16-bit).

    UPCAST (the interpreter): its 16-bit tl.dot multiplies raw bit patterns, so the rounded operands are widened
    to fp32 and multiplied exactly, which is what the tensor cores compute.
    """
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_DTYPE == tl.float32:
        # tf32 would cost ~1e-3 relative error; the op is memory-bound, so exact fp32 is affordable.
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _accumulate_context(keys, values, row_max, row_sum, context, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one tile of positions into the online key softmax and the unnormalized context.

    keys: (D, BLOCK_N) fp32, -inf at positions outside the sequence; values: (D, BLOCK_N), 0 there.
    row_max, row_sum: (D,) fp32; context: (D, D) fp32, all relative to row_max.
    """
    new_max = tl.maximum(row_max, tl.max(keys, axis=1))
    # Every tile holds at least one real position, so new_max is finite and neither exp sees (-inf) - (-inf).
    rescale = tl.exp(row_max - new_max)
    weights = tl.exp(keys - new_max[:, None])
    row_sum = row_sum * rescale + tl.sum(weights, axis=1)
    context = context * rescale[:, None] + _dot(weights, tl.trans(values), DOT_DTYPE, UPCAST)
    return new_max, row_sum, context


@triton.jit
def _context_partial_kernel(
    k_ptr,  # (B, heads, D, N) keys, q's dtype, strides stride_k*
    v_ptr,  # (B, heads, D, N) values, q's dtype, strides stride_v*
    mem_k_ptr,  # (heads, D, M) fp32 memory keys, strides stride_mk*
    mem_v_ptr,  # (heads, D, M) fp32 memory values, strides stride_mv*
    max_ptr,  # out: (B*heads, splits, D) fp32 per-row max of the split's keys
    sum_ptr,  # out: (B*heads, splits, D) fp32 per-row sum of exp(key - max)
    partial_ptr,  # out: (B*heads, splits, D, D) fp32 sum over the split of exp(key[c] - max[c]) value[e], at [c, e]
    heads,  # number of heads (program axis 0 enumerates b * heads + h)
    N,  # positions in k and v
    M,  # memory slots, >= 0
    tiles_per_split,  # BLOCK_N-tiles of positions per program along axis 1
    stride_kb, stride_kh, stride_kd, stride_kn,  # k strides in elements
    stride_vb, stride_vh, stride_vd, stride_vn,  # v strides in elements
    stride_mkh, stride_mkd, stride_mkm,  # mem_k strides in elements
    stride_mvh, stride_mvd, stride_mvm,  # mem_v strides in elements
    D: tl.constexpr,  # head dim, a power of two in [16, 128]
    BLOCK_N: tl.constexpr,  # positions per tile
    UPCAST: tl.constexpr,  # interpreting: compute 16-bit dots in fp32 (see _dot)
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    batch = pid_bh // heads
    head = pid_bh % heads
    DOT_DTYPE: tl.constexpr = k_ptr.dtype.element_ty
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    # int64 (b, head) offsets: B * heads * D * N can pass 2^31 elements; offsets inside one head cannot.
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh + offs_d[:, None] * stride_vd
    mem_k_base = mem_k_ptr + head * stride_mkh + offs_d[:, None] * stride_mkd
    mem_v_base = mem_v_ptr + head * stride_mvh + offs_d[:, None] * stride_mvd

    row_max = tl.full([D], float("-inf"), tl.float32)
    row_sum = tl.zeros([D], tl.float32)
    context = tl.zeros([D, D], tl.float32)
    # The memory slots are positions 0..M-1 of the key softmax; the first split takes them (M is a handful), which
    # keeps every tile of k aligned to BLOCK_N for wide loads and needs no concatenated copy.
    mem_tiles = tl.where(split == 0, tl.cdiv(M, BLOCK_N), 0)
    for tile in range(0, mem_tiles):
        pos = tile * BLOCK_N + offs_n
        in_mem = pos[None, :] < M
        keys = tl.load(mem_k_base + pos[None, :] * stride_mkm, mask=in_mem, other=float("-inf"))
        values = tl.load(mem_v_base + pos[None, :] * stride_mvm, mask=in_mem, other=0.0)
        # fp32 products: one tile per (b, head), and the fp32 memory slots keep their precision.
        row_max, row_sum, context = _accumulate_context(keys, values, row_max, row_sum, context, tl.float32, UPCAST)

    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for tile in range(first_tile, last_tile):
        pos = tile * BLOCK_N + offs_n
        in_seq = pos[None, :] < N
        keys = tl.load(k_base + pos[None, :] * stride_kn, mask=in_seq, other=float("-inf")).to(tl.float32)
        values = tl.load(v_base + pos[None, :] * stride_vn, mask=in_seq, other=0.0)
        row_max, row_sum, context = _accumulate_context(keys, values, row_max, row_sum, context, DOT_DTYPE, UPCAST)

    part = pid_bh * splits + split
    tl.store(max_ptr + part * D + offs_d, row_max)
    tl.store(sum_ptr + part * D + offs_d, row_sum)
    tl.store(partial_ptr + part * D * D + offs_d[:, None] * D + offs_d[None, :], context)


@triton.jit
def _context_combine_kernel(
    max_ptr,  # (B*heads, splits, D) fp32 per-split row max
    sum_ptr,  # (B*heads, splits, D) fp32 per-split row sum of exp, relative to its max
    partial_ptr,  # (B*heads, splits, D, D) fp32 per-split unnormalized context, relative to its max
    context_ptr,  # out: (B*heads, D, D) fp32 normalized context[c, e]
    lse_ptr,  # out: (B*heads, D) fp32 log-sum-exp of each key row over all M + N positions
    splits,  # number of splits
    D: tl.constexpr,  # head dim
    ROWS: tl.constexpr,  # context rows per program (program axis 1 enumerates blocks of rows)
):
    pid_bh = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    row_max = tl.full([ROWS], float("-inf"), tl.float32)
    row_sum = tl.zeros([ROWS], tl.float32)
    context = tl.zeros([ROWS, D], tl.float32)
    # Fixed split order: the result does not depend on which program finished first.
    for split in range(0, splits):
        part = pid_bh * splits + split
        split_max = tl.load(max_ptr + part * D + rows)
        new_max = tl.maximum(row_max, split_max)
        old_scale = tl.exp(row_max - new_max)
        split_scale = tl.exp(split_max - new_max)
        row_sum = row_sum * old_scale + tl.load(sum_ptr + part * D + rows) * split_scale
        partial = tl.load(partial_ptr + part * D * D + rows[:, None] * D + cols[None, :])
        context = context * old_scale[:, None] + partial * split_scale[:, None]
        row_max = new_max
    tl.store(context_ptr + pid_bh * D * D + rows[:, None] * D + cols[None, :], context / row_sum[:, None])
    tl.store(lse_ptr + pid_bh * D + rows, row_max + tl.log(row_sum))


@triton.jit
def _output_kernel(
    q_ptr,  # (B, heads, D, N) queries, strides stride_q*
    context_ptr,  # (B*heads, D, D) fp32 normalized context[c, e]
    out_ptr,  # out: (B, heads, D, N) contiguous, q's dtype
    heads,  # number of heads
    N,  # positions
    tiles_per_program,  # BLOCK_N-tiles of positions per program along axis 1
    scale,  # D ** -0.5, applied to the query softmax
    stride_qb, stride_qh, stride_qd, stride_qn,  # q strides in elements
    D: tl.constexpr,  # head dim
    BLOCK_N: tl.constexpr,  # positions per tile
    UPCAST: tl.constexpr,  # interpreting: compute 16-bit dots in fp32 (see _dot)
):
    pid_bh = tl.program_id(0)
    batch = pid_bh // heads
    head = pid_bh % heads
    DOT_DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + offs_d[:, None] * stride_qd
    out_base = out_ptr + pid_bh.to(tl.int64) * D * N + offs_d[:, None] * N
    # Loaded transposed, [e, c], scaled once here rather than per position, and rounded once for the dots.
    context_t = tl.load(context_ptr + pid_bh * D * D + offs_d[None, :] * D + offs_d[:, None]) * scale
    context_t = context_t.to(DOT_DTYPE)

    first_tile = tl.program_id(1) * tiles_per_program
    last_tile = tl.minimum(first_tile + tiles_per_program, tl.cdiv(N, BLOCK_N))
    for tile in range(first_tile, last_tile):
        pos = tile * BLOCK_N + offs_n
        in_seq = pos[None, :] < N
        q = tl.load(q_base + pos[None, :] * stride_qn, mask=in_seq, other=0.0).to(tl.float32)
        # Feature softmax per position; its normalization is applied after the product (BLOCK_N divisions, not
        # D * BLOCK_N), on exp values in (0, 1] that round well to 16 bits.
        q_exp = tl.exp(q - tl.max(q, axis=0)[None, :])
        out = _dot(context_t, q_exp, DOT_DTYPE, UPCAST) * (1.0 / tl.sum(q_exp, axis=0))[None, :]
        tl.store(out_base + pos[None, :], out.to(out_ptr.dtype.element_ty), mask=in_seq)


@triton.jit
def _query_grad_kernel(
    q_ptr,  # (B, heads, D, N) queries, strides stride_q*
    dout_ptr,  # (B, heads, D, N) gradient of out, q's dtype, strides stride_o*
    context_ptr,  # (B*heads, D, D) fp32 normalized context[c, e] from the forward
    dq_ptr,  # out: (B, heads, D, N) contiguous, q's dtype
    dpartial_ptr,  # out: (B*heads, splits, D, D) fp32 the split's part of dcontext[c, e]
    heads,  # number of heads
    N,  # positions
    tiles_per_split,  # BLOCK_N-tiles of positions per program along axis 1
    scale,  # D ** -0.5
    stride_qb, stride_qh, stride_qd, stride_qn,  # q strides in elements
    stride_ob, stride_oh, stride_od, stride_on,  # dout strides in elements
    D: tl.constexpr,  # head dim
    BLOCK_N: tl.constexpr,  # positions per tile
    UPCAST: tl.constexpr,  # interpreting: compute 16-bit dots in fp32 (see _dot)
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    batch = pid_bh // heads
    head = pid_bh % heads
    DOT_DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + offs_d[:, None] * stride_qd
    dout_base = dout_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + offs_d[:, None] * stride_od
    dq_base = dq_ptr + pid_bh.to(tl.int64) * D * N + offs_d[:, None] * N
    # d(scaled query softmax)[c, n] = scale * sum_e context[c, e] dout[e, n]
    context = (tl.load(context_ptr + pid_bh * D * D + offs_d[:, None] * D + offs_d[None, :]) * scale).to(DOT_DTYPE)
    dcontext = tl.zeros([D, D], tl.float32)

    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for tile in range(first_tile, last_tile):
        pos = tile * BLOCK_N + offs_n
        in_seq = pos[None, :] < N
        q = tl.load(q_base + pos[None, :] * stride_qn, mask=in_seq, other=0.0).to(tl.float32)
        # Zero outside the sequence, so those columns add nothing to dcontext.
        dout = tl.load(dout_base + pos[None, :] * stride_on, mask=in_seq, other=0.0)
        q_exp = tl.exp(q - tl.max(q, axis=0)[None, :])
        probs = q_exp * (1.0 / tl.sum(q_exp, axis=0))[None, :]
        dcontext += _dot(probs, tl.trans(dout), DOT_DTYPE, UPCAST)
        dprobs = _dot(context, dout, DOT_DTYPE, UPCAST)
        # Softmax backward over the feature axis.
        dq = probs * (dprobs - tl.sum(probs * dprobs, axis=0)[None, :])
        tl.store(dq_base + pos[None, :], dq.to(dq_ptr.dtype.element_ty), mask=in_seq)

    part = pid_bh * tl.num_programs(1) + split
    tl.store(dpartial_ptr + part * D * D + offs_d[:, None] * D + offs_d[None, :], dcontext * scale)


@triton.jit
def _context_grad_combine_kernel(
    dpartial_ptr,  # (B*heads, splits, D, D) fp32 per-split parts of dcontext
    context_ptr,  # (B*heads, D, D) fp32 normalized context from the forward
    dcontext_ptr,  # out: (B*heads, D, D) fp32 dcontext[c, e]
    rowdot_ptr,  # out: (B*heads, D) fp32 sum_e dcontext[c, e] context[c, e] = sum_j ks[c, j] dks[c, j]
    splits,  # number of splits
    D: tl.constexpr,  # head dim
    ROWS: tl.constexpr,  # rows per program (program axis 1 enumerates blocks of rows)
):
    pid_bh = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    offsets = rows[:, None] * D + cols[None, :]
    dcontext = tl.zeros([ROWS, D], tl.float32)
    for split in range(0, splits):  # fixed order: deterministic
        dcontext += tl.load(dpartial_ptr + (pid_bh * splits + split) * D * D + offsets)
    context = tl.load(context_ptr + pid_bh * D * D + offsets)
    tl.store(dcontext_ptr + pid_bh * D * D + offsets, dcontext)
    tl.store(rowdot_ptr + pid_bh * D + rows, tl.sum(dcontext * context, axis=1))


@triton.jit
def _key_value_grads(
    keys, values, lse, rowdot, dcontext, dcontext_t, dscale, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr
):
    """dkeys, dvalues (D, BLOCK_N) fp32 of one tile; keys -inf and values 0 outside the sequence.

    dcontext, dcontext_t: (D, D) dcontext[c, e] and its transpose, divided by the scalar dscale.
    """
    key_probs = tl.exp(keys - lse[:, None])
    dkey_probs = _dot(dcontext, values, DOT_DTYPE, UPCAST) * dscale
    dkeys = key_probs * (dkey_probs - rowdot[:, None])
    dvalues = _dot(dcontext_t, key_probs, DOT_DTYPE, UPCAST) * dscale
    return dkeys, dvalues


@triton.jit
def _key_value_grad_kernel(
    k_ptr,  # (B, heads, D, N) keys, strides stride_k*
    v_ptr,  # (B, heads, D, N) values, strides stride_v*
    mem_k_ptr,  # (heads, D, M) fp32 memory keys, strides stride_mk*
    mem_v_ptr,  # (heads, D, M) fp32 memory values, strides stride_mv*
    lse_ptr,  # (B*heads, D) fp32 key log-sum-exp from the forward
    dcontext_ptr,  # (B*heads, D, D) fp32 dcontext[c, e]
    rowdot_ptr,  # (B*heads, D) fp32 per-row sum_j ks dks
    dk_ptr,  # out: (B, heads, D, N) contiguous, q's dtype
    dv_ptr,  # out: (B, heads, D, N) contiguous, q's dtype
    dmem_k_ptr,  # out: (B, heads, D, M) contiguous fp32, per-batch memory-key gradient
    dmem_v_ptr,  # out: (B, heads, D, M) contiguous fp32, per-batch memory-value gradient
    heads,  # number of heads
    N,  # positions in k and v
    M,  # memory slots, >= 0
    tiles_per_program,  # BLOCK_N-tiles of positions per program along axis 1
    stride_kb, stride_kh, stride_kd, stride_kn,  # k strides in elements
    stride_vb, stride_vh, stride_vd, stride_vn,  # v strides in elements
    stride_mkh, stride_mkd, stride_mkm,  # mem_k strides in elements
    stride_mvh, stride_mvd, stride_mvm,  # mem_v strides in elements
    D: tl.constexpr,  # head dim
    BLOCK_N: tl.constexpr,  # positions per tile
    UPCAST: tl.constexpr,  # interpreting: compute 16-bit dots in fp32 (see _dot)
):
    pid_bh = tl.program_id(0)
    program = tl.program_id(1)
    batch = pid_bh // heads
    head = pid_bh % heads
    DOT_DTYPE: tl.constexpr = k_ptr.dtype.element_ty
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh + offs_d[:, None] * stride_vd
    dk_base = dk_ptr + pid_bh.to(tl.int64) * D * N + offs_d[:, None] * N
    dv_base = dv_ptr + pid_bh.to(tl.int64) * D * N + offs_d[:, None] * N
    lse = tl.load(lse_ptr + pid_bh * D + offs_d)
    rowdot = tl.load(rowdot_ptr + pid_bh * D + offs_d)
    dcontext = tl.load(dcontext_ptr + pid_bh * D * D + offs_d[:, None] * D + offs_d[None, :])
    dcontext_t = tl.trans(dcontext)

    # Memory slots, by the first program of each (b, head): gradients per batch, summed over it by the caller.
    mem_k_base = mem_k_ptr + head * stride_mkh + offs_d[:, None] * stride_mkd
    mem_v_base = mem_v_ptr + head * stride_mvh + offs_d[:, None] * stride_mvd
    dmem_offset = pid_bh * D * M + offs_d[:, None] * M
    mem_tiles = tl.where(program == 0, tl.cdiv(M, BLOCK_N), 0)
    for tile in range(0, mem_tiles):
        pos = tile * BLOCK_N + offs_n
        in_mem = pos[None, :] < M
        keys = tl.load(mem_k_base + pos[None, :] * stride_mkm, mask=in_mem, other=float("-inf"))
        values = tl.load(mem_v_base + pos[None, :] * stride_mvm, mask=in_mem, other=0.0)
        # fp32 products, as in the forward: the memory slots' gradients are fp32 and their key probabilities can
        # be far below fp16's smallest normal.
        dkeys, dvalues = _key_value_grads(keys, values, lse, rowdot, dcontext, dcontext_t, 1.0, tl.float32, UPCAST)
        tl.store(dmem_k_ptr + dmem_offset + pos[None, :], dkeys, mask=in_mem)
        tl.store(dmem_v_ptr + dmem_offset + pos[None, :], dvalues, mask=in_mem)

    # Rounded once for the loop's products, after division by a power of two at least its largest magnitude:
    # dcontext sums dout over all positions and can pass fp16's 65504 under loss scaling while dk and dv do not.
    dscale = tl.exp2(tl.ceil(tl.log2(tl.max(tl.max(tl.abs(dcontext), axis=1), axis=0))))
    dscale = tl.where(dscale > 0, dscale, 1.0)
    dcontext = (dcontext / dscale).to(DOT_DTYPE)
    dcontext_t = (dcontext_t / dscale).to(DOT_DTYPE)
    first_tile = program * tiles_per_program
    last_tile = tl.minimum(first_tile + tiles_per_program, tl.cdiv(N, BLOCK_N))
    for tile in range(first_tile, last_tile):
        pos = tile * BLOCK_N + offs_n
        in_seq = pos[None, :] < N
        keys = tl.load(k_base + pos[None, :] * stride_kn, mask=in_seq, other=float("-inf")).to(tl.float32)
        values = tl.load(v_base + pos[None, :] * stride_vn, mask=in_seq, other=0.0)
        dkeys, dvalues = _key_value_grads(keys, values, lse, rowdot, dcontext, dcontext_t, dscale, DOT_DTYPE, UPCAST)
        tl.store(dk_base + pos[None, :], dkeys.to(dk_ptr.dtype.element_ty), mask=in_seq)
        tl.store(dv_base + pos[None, :], dvalues.to(dv_ptr.dtype.element_ty), mask=in_seq)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    block_n: int  # positions per tile
    num_warps: int
    num_stages: int


def _gpu_blocks(head_dim, dtype):
    """Tile shape and launch options on the GPU for a head dim and input dtype (the only thing they depend on).

    A (D, BLOCK_N) fp32 tile is kept at ~32 registers a thread (4096 elements on 4 warps, 8192 on 8); BLOCK_N
    stays >= 64 so each feature row of a tile is >= 128 contiguous bytes of a 16-bit NCHW tensor.
    """
    block_n = {16: 256, 32: 128, 64: 128, 128: 64}[head_dim]
    num_warps = 4 if head_dim <= 32 else 8
    # Two stages of loads in flight; fp32 at D >= 64 would need > 128 KiB of shared memory for three.
    num_stages = 2 if dtype == torch.float32 and head_dim >= 64 else 3
    return _Blocks(block_n, num_warps, num_stages)


def _blocks(head_dim, dtype):
    if INTERPRETING:
        return _Blocks(INTERPRETER_BLOCK_N, 4, 1)
    return _gpu_blocks(head_dim, dtype)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device):
    """Programs that fill the device a few waves deep; 1 under the interpreter (cost is per program)."""
    if INTERPRETING or device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * PROGRAMS_PER_SM


def _tiles_per_program(batch_heads, tiles, target_programs, lower, upper):
    """Tiles each program spans so that batch_heads * programs is about target_programs, within [lower, upper]."""
    per_program = -(-(batch_heads * tiles) // max(target_programs, 1))
    return max(1, min(max(per_program, lower), upper, tiles))


def _split(tiles, tiles_per_program):
    """(tiles per program, programs per (b, head)), with every program given at least one tile."""
    tiles_per_program = max(1, min(tiles_per_program, tiles))
    return tiles_per_program, max(1, -(-tiles // tiles_per_program))


def _plans(batch_heads, n, head_dim, dtype, device, num_splits):
    """Blocks, and (tiles per program, programs per (b, head)) for the reduction and the map passes.

    num_splits > 0 forces the reduction split count (capped at the tile count), e.g. to test the combine.
    """
    blocks = _blocks(head_dim, dtype)
    tiles = -(-n // blocks.block_n)
    target = _target_programs(device)
    if num_splits > 0:
        reduce = _split(tiles, -(-tiles // num_splits))
    else:
        reduce = _split(tiles, _tiles_per_program(batch_heads, tiles, target, MIN_TILES_PER_SPLIT, tiles))
    mapping = _split(tiles, _tiles_per_program(batch_heads, tiles, target, 1, MAX_TILES_PER_PROGRAM))
    if INTERPRETING:
        mapping = _split(tiles, tiles)
    return blocks, reduce, mapping


def _check_head_dim(head_dim):
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"linear_attention: the Triton kernel supports head dims {HEAD_DIMS}, got {head_dim}")


def _float_memory(mem, dummy):
    """fp32 memory slots (a no-op when they are fp32 already); with M = 0, `dummy`, a valid fp32 3-d tensor that
    is never read, so the kernel signature (and its compiled variant) stays the same."""
    return mem.float() if mem.shape[-1] > 0 else dummy


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastunet::linear_attention_forward", mutates_args=())
def linear_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, context, lse): out (B, heads, d, N) contiguous in q.dtype; context (B, heads, d, d) fp32 [c, e];
    lse (B, heads, d) fp32 log-sum-exp of each key row over the M + N positions. See linear_attention."""
    batch, heads, head_dim, n = q.shape
    m = mem_k.shape[-1]
    _check_head_dim(head_dim)
    out = torch.empty((batch, heads, head_dim, n), dtype=q.dtype, device=q.device)
    context = torch.empty((batch, heads, head_dim, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads, head_dim), dtype=torch.float32, device=q.device)
    batch_heads = batch * heads
    if batch_heads == 0:
        return out, context, lse
    blocks, (tiles_per_split, splits), (tiles_per_program, programs) = _plans(
        batch_heads, n, head_dim, q.dtype, q.device, num_splits
    )
    mem_k32, mem_v32 = _float_memory(mem_k, lse), _float_memory(mem_v, lse)
    stats = torch.empty((2, batch_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    partial = torch.empty((batch_heads, splits, head_dim, head_dim), dtype=torch.float32, device=q.device)
    options = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    _context_partial_kernel[(batch_heads, splits)](
        k, v, mem_k32, mem_v32, stats[0], stats[1], partial, heads, n, m, tiles_per_split,
        *k.stride(), *v.stride(), *mem_k32.stride(), *mem_v32.stride(),
        D=head_dim, BLOCK_N=blocks.block_n, UPCAST=INTERPRETING, **options,
    )  # fmt: skip
    _context_combine_kernel[(batch_heads, head_dim // COMBINE_ROWS)](
        stats[0], stats[1], partial, context, lse, splits, D=head_dim, ROWS=COMBINE_ROWS
    )
    if n > 0:
        _output_kernel[(batch_heads, programs)](
            q, context, out, heads, n, tiles_per_program, head_dim**-0.5, *q.stride(),
            D=head_dim, BLOCK_N=blocks.block_n, UPCAST=INTERPRETING, **options,
        )  # fmt: skip
    return out, context, lse


@linear_attention_forward.register_fake
def _(q, k, v, mem_k, mem_v, num_splits):
    batch, heads, head_dim, n = q.shape
    return (
        q.new_empty((batch, heads, head_dim, n)),
        q.new_empty((batch, heads, head_dim, head_dim), dtype=torch.float32),
        q.new_empty((batch, heads, head_dim), dtype=torch.float32),
    )


@torch.library.custom_op("fastunet::linear_attention_backward", mutates_args=())
def linear_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: torch.Tensor,
    mem_v: torch.Tensor,
    context: torch.Tensor,
    lse: torch.Tensor,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmem_k, dmem_v): dq, dk, dv (B, heads, d, N) contiguous in q.dtype; dmem_k, dmem_v
    (heads, d, M) in mem_k's and mem_v's dtypes. dout (B, heads, d, N) any strides; context, lse from the forward."""
    batch, heads, head_dim, n = q.shape
    m = mem_k.shape[-1]
    dq, dk, dv = (torch.empty((batch, heads, head_dim, n), dtype=q.dtype, device=q.device) for _ in range(3))
    # Every (b, head)'s first key/value program writes all M slots of its row.
    dmem = torch.empty((2, batch, heads, head_dim, m), dtype=torch.float32, device=q.device)
    batch_heads = batch * heads
    if batch_heads == 0:
        return dq, dk, dv, dmem[0].sum(0).to(mem_k.dtype), dmem[1].sum(0).to(mem_v.dtype)
    blocks, (tiles_per_split, splits), (tiles_per_program, programs) = _plans(
        batch_heads, n, head_dim, q.dtype, q.device, num_splits
    )
    mem_k32, mem_v32 = _float_memory(mem_k, lse), _float_memory(mem_v, lse)
    options = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    dpartial = torch.empty((batch_heads, splits, head_dim, head_dim), dtype=torch.float32, device=q.device)
    if n > 0:
        _query_grad_kernel[(batch_heads, splits)](
            q, dout, context, dq, dpartial, heads, n, tiles_per_split, head_dim**-0.5, *q.stride(), *dout.stride(),
            D=head_dim, BLOCK_N=blocks.block_n, UPCAST=INTERPRETING, **options,
        )  # fmt: skip
    else:
        dpartial.zero_()
    dcontext = torch.empty((batch_heads, head_dim, head_dim), dtype=torch.float32, device=q.device)
    rowdot = torch.empty((batch_heads, head_dim), dtype=torch.float32, device=q.device)
    _context_grad_combine_kernel[(batch_heads, head_dim // COMBINE_ROWS)](
        dpartial, context, dcontext, rowdot, splits, D=head_dim, ROWS=COMBINE_ROWS
    )
    dmem_k, dmem_v = (dmem[0], dmem[1]) if m > 0 else (rowdot, rowdot)  # never written when M = 0
    _key_value_grad_kernel[(batch_heads, programs)](
        k, v, mem_k32, mem_v32, lse, dcontext, rowdot, dk, dv, dmem_k, dmem_v, heads, n, m, tiles_per_program,
        *k.stride(), *v.stride(), *mem_k32.stride(), *mem_v32.stride(),
        D=head_dim, BLOCK_N=blocks.block_n, UPCAST=INTERPRETING, **options,
    )  # fmt: skip
    # Memory slots are shared by the batch: a fixed-order torch sum of per-batch gradients, no atomics.
    return dq, dk, dv, dmem[0].sum(0).to(mem_k.dtype), dmem[1].sum(0).to(mem_v.dtype)


@linear_attention_backward.register_fake
def _(dout, q, k, v, mem_k, mem_v, context, lse, num_splits):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(mem_k, memory_format=torch.contiguous_format),
        torch.empty_like(mem_v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, mem_k, mem_v, num_splits = inputs
    _, context, lse = output
    ctx.save_for_backward(q, k, v, mem_k, mem_v, context, lse)
    ctx.num_splits = num_splits
    ctx.mark_non_differentiable(context, lse)


def _backward(ctx, dout, _dcontext, _dlse):
    q, k, v, mem_k, mem_v, context, lse = ctx.saved_tensors
    grads = linear_attention_backward(dout, q, k, v, mem_k, mem_v, context, lse, ctx.num_splits)
    return (*grads, None)


linear_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def linear_attention(q, k, v, mem_k, mem_v, *, num_splits=0):
    """Upstream's linear attention with memory key/values (fastunet.reference.linear_attention), in Triton.

    q, k, v: (B, heads, d, N), one dtype of fp32/fp16/bf16, any strides (e.g. views of the to_qkv conv output);
    d in HEAD_DIMS. mem_k, mem_v: (heads, d, M), M >= 0, any float dtype (fp32 under autocast is fine).
    num_splits: 0 picks the split of the position reduction from the device; > 0 forces it (tests).
    Returns (B, heads, d, N) contiguous in q.dtype, i.e. the NCHW (B, heads * d, H, W) tensor the next 1x1 conv
    reads. Differentiable in all five tensors; gradients come back in each input's dtype.
    """
    return linear_attention_forward(q, k, v, mem_k, mem_v, num_splits)[0]


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (tests/gpu_compile.py)
# ---------------------------------------------------------------------------------------------------------------


def gpu_compile_configs():
    """Every (kernel, signature, constexprs, options) a GPU launch can select: per input dtype and head dim.

    Strides along positions are given as 1, as Triton specializes them for NCHW inputs (the Unet's layout).
    """
    configs = []
    for dtype, pointer in _POINTER_TYPES.items():
        for head_dim in HEAD_DIMS:
            blocks = _gpu_blocks(head_dim, dtype)
            options = {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
            tile = {"D": head_dim, "BLOCK_N": blocks.block_n, "UPCAST": False}
            f32 = "*fp32"
            qkv_strides = lambda name: {f"stride_{name}{a}": "i32" for a in "bhd"}  # noqa: E731
            mem_strides = {f"stride_m{t}{a}": "i32" for t in "kv" for a in "hdm"}
            positions_unit = lambda *names: {f"stride_{name}n": 1 for name in names}  # noqa: E731
            configs.append((
                _context_partial_kernel,
                {"k_ptr": pointer, "v_ptr": pointer, "mem_k_ptr": f32, "mem_v_ptr": f32, "max_ptr": f32,
                 "sum_ptr": f32, "partial_ptr": f32, "heads": "i32", "N": "i32", "M": "i32",
                 "tiles_per_split": "i32", **qkv_strides("k"), "stride_kn": "constexpr", **qkv_strides("v"),
                 "stride_vn": "constexpr", **mem_strides, **{name: "constexpr" for name in tile}},
                {**positions_unit("k", "v"), **tile},
                options,
            ))  # fmt: skip
            configs.append((
                _output_kernel,
                {"q_ptr": pointer, "context_ptr": f32, "out_ptr": pointer, "heads": "i32", "N": "i32",
                 "tiles_per_program": "i32", "scale": "fp32", **qkv_strides("q"), "stride_qn": "constexpr",
                 **{name: "constexpr" for name in tile}},
                {**positions_unit("q"), **tile},
                options,
            ))  # fmt: skip
            configs.append((
                _query_grad_kernel,
                {"q_ptr": pointer, "dout_ptr": pointer, "context_ptr": f32, "dq_ptr": pointer, "dpartial_ptr": f32,
                 "heads": "i32", "N": "i32", "tiles_per_split": "i32", "scale": "fp32", **qkv_strides("q"),
                 "stride_qn": "constexpr", **qkv_strides("o"), "stride_on": "constexpr",
                 **{name: "constexpr" for name in tile}},
                {**positions_unit("q", "o"), **tile},
                options,
            ))  # fmt: skip
            configs.append((
                _key_value_grad_kernel,
                {"k_ptr": pointer, "v_ptr": pointer, "mem_k_ptr": f32, "mem_v_ptr": f32, "lse_ptr": f32,
                 "dcontext_ptr": f32, "rowdot_ptr": f32, "dk_ptr": pointer, "dv_ptr": pointer, "dmem_k_ptr": f32,
                 "dmem_v_ptr": f32, "heads": "i32", "N": "i32", "M": "i32", "tiles_per_program": "i32",
                 **qkv_strides("k"), "stride_kn": "constexpr", **qkv_strides("v"), "stride_vn": "constexpr",
                 **mem_strides, **{name: "constexpr" for name in tile}},
                {**positions_unit("k", "v"), **tile},
                options,
            ))  # fmt: skip
    for head_dim in HEAD_DIMS:  # the combines read and write fp32 only
        rows = {"D": head_dim, "ROWS": COMBINE_ROWS}
        configs.append((
            _context_combine_kernel,
            {"max_ptr": "*fp32", "sum_ptr": "*fp32", "partial_ptr": "*fp32", "context_ptr": "*fp32",
             "lse_ptr": "*fp32", "splits": "i32", "D": "constexpr", "ROWS": "constexpr"},
            rows,
            {"num_warps": 4},
        ))  # fmt: skip
        configs.append((
            _context_grad_combine_kernel,
            {"dpartial_ptr": "*fp32", "context_ptr": "*fp32", "dcontext_ptr": "*fp32", "rowdot_ptr": "*fp32",
             "splits": "i32", "D": "constexpr", "ROWS": "constexpr"},
            rows,
            {"num_warps": 4},
        ))  # fmt: skip
    return configs
