"""Fused linear attention with memory key/values (upstream LinearAttention's core), forward and backward in Triton.

Math (fastunet.reference.linear_attention defines it), per (batch b, head h), with K = [mem_k, k] and
V = [mem_v, v] along the M + N positions j, and d features c, e:

    p[c, n]      = softmax over c of q[:, n]                  (queries: feature softmax, per position)
    ks[c, j]     = exp(K[c, j] - lse[c]),  lse[c] = log sum_j exp(K[c, j])   (keys: position softmax, per row)
    context[c,e] = sum_j ks[c, j] V[e, j]                      (d x d)
    out[e, n]    = d^-0.5 sum_c context[c, e] p[c, n]

Forward, three launches (no float atomics anywhere, so every result is bitwise reproducible):
  1. `_context_partial_kernel`, grid (B*heads, splits): each program streams k and v over its split of the
     positions, keeping an online per-row max, sum of exp and unnormalized d x d context relative to that max.
  2. `_context_combine_kernel`, grid (B*heads, d / 16): folds in the M memory slots (a few fp32 columns, read
     here so that no concatenated copy is made and the streaming kernels never see them) and then the splits in
     index order, each rescaled by exp(max_split - max_all), into the normalized context and lse (fp32; saved
     for the backward).
  3. `_output_kernel`, grid (B*heads, programs): out = (d^-0.5 context)^T softmax(q), a tile of positions at a time.
Backward, three launches:
  1. `_query_grad_kernel`, grid (B*heads, splits): dq through the feature softmax, and per-split partials of
     dcontext = d^-0.5 p dout^T.
  2. `_context_grad_combine_kernel`, grid (B*heads, d / 16): dcontext = sum of the partials in split order, and
     the per-row sum_j ks[c, j] dks[c, j] of the position-softmax backward, which equals
     sum_e dcontext[c, e] context[c, e] (substitute dks = dcontext V and context = ks V^T), so it costs no extra
     pass over k and v; also the memory slots' gradients per batch element, which torch sums over the batch.
  3. `_key_value_grad_kernel`, grid (B*heads, programs): dks = dcontext V, dk = ks (dks - rowsum),
     dv = dcontext^T ks.
Each pass reads its inputs once: the forward reads q, k, v and writes out; the backward reads q, k, v, dout and
writes dq, dk, dv (plus d x d fp32 partials per split, ~1% at the benchmark shape). Statistics and
accumulations are fp32. Products: fp16/bf16 inputs round the operands to the input dtype for the tensor cores
(fp32 accumulation); fp32 inputs are exact (see _dot).
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastunet.kernels import INTERPRETING
from fastunet.kernels.fast_math import exp, reciprocal
from fastunet.kernels.scale_shift_act import empty_output

HEAD_DIMS = (16, 32, 64, 128)
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

# Memory slots per tile in the combine kernels: the smallest dot dimension the GPU compiler accepts (M is 4 by
# default); their products are exact fp32.
MEMORY_BLOCK = 16
# Rows of the d x d context one combine program handles: a (16, d) fp32 tile stays in registers even at d = 128.
COMBINE_ROWS = 16
# Programs the heuristic aims at per SM: the streaming programs (4-8 warps, 60-130 registers at the 16-bit
# configurations) fit 2-6 to an SM, so this is a few waves with loads in flight to cover HBM latency, and a small
# tail when the last wave is partial.
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
    """a @ b with fp32 accumulation. 16-bit DOT_DTYPE (the input dtype): operands rounded to it, tensor cores.
    fp32: exact FMA products, or for (128 x 128) outputs three fp16 products (see _dot_fp16x3).

    UPCAST (the interpreter): its 16-bit tl.dot multiplies raw bit patterns, so rounded operands are widened to
    fp32 and multiplied exactly, which is what the tensor cores compute.
    """
    if DOT_DTYPE == tl.float32:
        if a.shape[0] * b.shape[1] >= 128 * 128:
            return _dot_fp16x3(a, b, UPCAST)
        # tf32 would cost ~1e-3 relative error; the op is memory-bound, so exact fp32 is affordable.
        return _dot_ieee(a, b)
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _power_of_two_scale(x):
    """The smallest power of two >= max |x| (1 for an all-zero x): dividing by it is exact."""
    scale = tl.exp2(tl.ceil(tl.log2(tl.max(tl.max(tl.abs(x), axis=1), axis=0))))
    return tl.where(scale > 0, scale, 1.0)


@triton.jit
def _dot_fp16x3(a, b, UPCAST: tl.constexpr):
    """fp32 a @ b as hi*hi + hi*lo + lo*hi of fp16 halves: 22 significant bits, ~2^-22 relative to max |a| max |b|.

    A (128 x 128) fp32 product (the d = 128 contexts) spills registers as FMA at any warp count, and as tf32x3 on
    sm_80; 16-bit operands take half the registers. Each operand is first divided by a power of two so that it
    lies in [-1, 1], inside fp16's range.
    """
    a_scale = _power_of_two_scale(a)
    b_scale = _power_of_two_scale(b)
    a = a / a_scale
    b = b / b_scale
    a_hi = a.to(tl.float16)
    a_lo = (a - a_hi.to(tl.float32)).to(tl.float16)
    b_hi = b.to(tl.float16)
    b_lo = (b - b_hi.to(tl.float32)).to(tl.float16)
    if UPCAST:
        a_hi, a_lo, b_hi, b_lo = a_hi.to(tl.float32), a_lo.to(tl.float32), b_hi.to(tl.float32), b_lo.to(tl.float32)
        acc = tl.dot(a_lo, b_hi, input_precision="ieee")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="ieee")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="ieee")
    else:
        acc = tl.dot(a_lo, b_hi)
        acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_hi, b_hi, acc)
    return acc * (a_scale * b_scale)


@triton.jit
def _split_k(a, b):
    """(a[:, :K/2], a[:, K/2:], b[:K/2], b[K/2:]) of a (M, K) and b (K, N)."""
    M: tl.constexpr = a.shape[0]
    K: tl.constexpr = a.shape[1]
    N: tl.constexpr = b.shape[1]
    a0, a1 = tl.split(tl.permute(tl.reshape(a, (M, 2, K // 2)), (0, 2, 1)))
    b0, b1 = tl.split(tl.permute(tl.reshape(b, (2, K // 2, N)), (1, 2, 0)))
    return a0, a1, b0, b1


@triton.jit
def _dot_ieee(a, b):
    """Exact fp32 a @ b, as a sum over K-slices of 16 (K a power of two). The FMA lowering keeps a thread's rows of
    a and columns of b over the whole K in registers, which spills at K = 64 and 128."""
    if a.shape[1] > 16:
        a0, a1, b0, b1 = _split_k(a, b)
        return _dot_ieee(a0, b0) + _dot_ieee(a1, b1)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _hi_lo(x, DOT_DTYPE: tl.constexpr):
    """x (fp32) as hi + lo in DOT_DTYPE: 16 (bf16) or 22 (fp16) significant bits instead of 8 or 11."""
    hi = x.to(DOT_DTYPE)
    return hi, (x - hi.to(tl.float32)).to(DOT_DTYPE)


@triton.jit
def _dot_hi_lo(a_hi, a_lo, b, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """(a_hi + a_lo) @ b (see _hi_lo; for fp32, a_hi is a and a_lo is unused).

    For a computed fp32 matrix a (context, dcontext) times an input tile b (exact in its dtype) whose product is
    then differenced in a softmax backward (dp - sum p dp, dks - sum ks dks): rounding a to 8 (bf16) or 11 (fp16)
    bits there costs
    several ulps of dk and dq where the difference cancels; one more tensor-core product removes that.
    """
    if DOT_DTYPE == tl.float32:
        return _dot(a_hi, b, DOT_DTYPE, UPCAST)
    return _dot(a_lo, b, DOT_DTYPE, UPCAST) + _dot(a_hi, b, DOT_DTYPE, UPCAST)


@triton.jit
def _feature_softmax(q):
    """softmax of q (D, BLOCK_N) fp32 over its feature axis 0, per position; normalized in q's layout, where a
    normalization after the output kernel's product would take the BLOCK_N reciprocals through shared memory (a
    layout conversion and its barriers every tile)."""
    q_exp = exp(q - tl.max(q, axis=0)[None, :])
    return q_exp * reciprocal(tl.sum(q_exp, axis=0))[None, :]


@triton.jit
def _accumulate_context(keys, values, row_max, row_sum, context, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one tile of positions into the online key softmax and the unnormalized context.

    keys: (D, BLOCK_N) fp32, -inf at positions outside the sequence; values: (D, BLOCK_N), 0 there.
    row_max, row_sum: (D,) fp32; context: (D, D) fp32, all relative to row_max.
    """
    new_max = tl.maximum(row_max, tl.max(keys, axis=1))
    # Every tile holds at least one real position, so new_max is finite and neither exp sees (-inf) - (-inf).
    rescale = exp(row_max - new_max)
    weights = exp(keys - new_max[:, None])
    row_sum = row_sum * rescale + tl.sum(weights, axis=1)
    context = context * rescale[:, None] + _dot(weights, tl.trans(values), DOT_DTYPE, UPCAST)
    return new_max, row_sum, context


@triton.jit
def _context_partial_kernel(
    k_ptr,  # (B, heads, D, N) keys, q's dtype, strides stride_k*
    v_ptr,  # (B, heads, D, N) values, q's dtype, strides stride_v*
    max_ptr,  # out: (B*heads, splits, D) fp32 per-row max of the split's keys
    sum_ptr,  # out: (B*heads, splits, D) fp32 per-row sum of exp(key - max)
    partial_ptr,  # out: (B*heads, splits, D, D) fp32 sum over the split of exp(key[c] - max[c]) value[e], at [c, e]
    heads,  # number of heads (program axis 0 enumerates b * heads + h)
    N,  # positions in k and v
    tiles_per_split,  # BLOCK_N-tiles of positions per program along axis 1
    stride_kb, stride_kh, stride_kd, stride_kn,  # k strides in elements
    stride_vb, stride_vh, stride_vd, stride_vn,  # v strides in elements
    D: tl.constexpr,  # head dim, a power of two in [16, 128]
    BLOCK_N: tl.constexpr,  # positions per tile
    UPCAST: tl.constexpr,  # interpreting: compute 16-bit dots in fp32 (see _dot)
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    batch = pid_bh // heads
    head = pid_bh % heads
    DOT_DTYPE: tl.constexpr = k_ptr.dtype.element_ty
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    # int64 (b, head) offsets: B * heads * D * N can pass 2^31 elements; offsets inside one head cannot.
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh + offs_d[:, None] * stride_vd

    row_max = tl.full([D], float("-inf"), tl.float32)
    row_sum = tl.zeros([D], tl.float32)
    context = tl.zeros([D, D], tl.float32)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for tile in range(first_tile, last_tile):
        pos = tile * BLOCK_N + offs_n
        in_seq = pos[None, :] < N
        keys = tl.load(k_base + pos[None, :] * stride_kn, mask=in_seq, other=float("-inf")).to(tl.float32)
        values = tl.load(v_base + pos[None, :] * stride_vn, mask=in_seq, other=0.0)
        row_max, row_sum, context = _accumulate_context(keys, values, row_max, row_sum, context, DOT_DTYPE, UPCAST)

    part = pid_bh.to(tl.int64) * tl.num_programs(1) + split
    tl.store(max_ptr + part * D + offs_d, row_max)
    tl.store(sum_ptr + part * D + offs_d, row_sum)
    tl.store(partial_ptr + part * D * D + offs_d[:, None] * D + offs_d[None, :], context)


@triton.jit
def _context_combine_kernel(
    max_ptr,  # (B*heads, splits, D) fp32 per-split row max
    sum_ptr,  # (B*heads, splits, D) fp32 per-split row sum of exp, relative to its max
    partial_ptr,  # (B*heads, splits, D, D) fp32 per-split unnormalized context, relative to its max
    mem_k_ptr,  # (heads, D, M) memory keys, any float dtype (read as fp32), strides stride_mk*
    mem_v_ptr,  # (heads, D, M) memory values, any float dtype (read as fp32), strides stride_mv*
    context_ptr,  # out: (B*heads, D, D) fp32 normalized context[c, e]
    lse_ptr,  # out: (B*heads, D) fp32 log-sum-exp of each key row over all M + N positions
    heads,  # number of heads
    splits,  # number of splits
    M,  # memory slots, >= 0
    stride_mkh, stride_mkd, stride_mkm,  # mem_k strides in elements
    stride_mvh, stride_mvd, stride_mvm,  # mem_v strides in elements
    D: tl.constexpr,  # head dim
    ROWS: tl.constexpr,  # context rows per program (program axis 1 enumerates blocks of rows)
    BLOCK_M: tl.constexpr,  # memory slots per tile
    UPCAST: tl.constexpr,  # interpreting (see _dot)
):
    pid_bh = tl.program_id(0)
    head = pid_bh % heads
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    offs_m = tl.arange(0, BLOCK_M)
    row_max = tl.full([ROWS], float("-inf"), tl.float32)
    row_sum = tl.zeros([ROWS], tl.float32)
    context = tl.zeros([ROWS, D], tl.float32)
    # The memory slots are positions 0..M-1 of the key softmax. Taking them here, a few (ROWS x BLOCK_M) tiles
    # per program, keeps them out of the streaming kernels (whose k tiles stay BLOCK_N-aligned and whose
    # registers stay free of fp32 products) and needs no concatenated copy. fp32 products: the slots are fp32.
    for tile in range(0, tl.cdiv(M, BLOCK_M)):
        pos = tile * BLOCK_M + offs_m
        keys = tl.load(mem_k_ptr + head * stride_mkh + rows[:, None] * stride_mkd + pos[None, :] * stride_mkm,
                       mask=pos[None, :] < M, other=float("-inf")).to(tl.float32)
        values = tl.load(mem_v_ptr + head * stride_mvh + cols[:, None] * stride_mvd + pos[None, :] * stride_mvm,
                         mask=pos[None, :] < M, other=0.0).to(tl.float32)
        row_max, row_sum, context = _accumulate_context(keys, values, row_max, row_sum, context, tl.float32, UPCAST)
    # Fixed split order: the result does not depend on which program finished first.
    for split in range(0, splits):
        part = pid_bh.to(tl.int64) * splits + split
        split_max = tl.load(max_ptr + part * D + rows)
        new_max = tl.maximum(row_max, split_max)
        old_scale = tl.exp(row_max - new_max)
        split_scale = tl.exp(split_max - new_max)
        row_sum = row_sum * old_scale + tl.load(sum_ptr + part * D + rows) * split_scale
        partial = tl.load(partial_ptr + part * D * D + rows[:, None] * D + cols[None, :])
        context = context * old_scale[:, None] + partial * split_scale[:, None]
        row_max = new_max
    tl.store(context_ptr + pid_bh.to(tl.int64) * D * D + rows[:, None] * D + cols[None, :], context / row_sum[:, None])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * D + rows, row_max + tl.log(row_sum))


@triton.jit
def _output_kernel(
    q_ptr,  # (B, heads, D, N) queries, strides stride_q*
    context_ptr,  # (B*heads, D, D) fp32 normalized context[c, e]
    out_ptr,  # out: (B, heads, D, N) q's dtype, strides stride_out*
    heads,  # number of heads
    N,  # positions
    tiles_per_program,  # BLOCK_N-tiles of positions per program along axis 1
    scale,  # D ** -0.5, applied to the query softmax
    stride_qb, stride_qh, stride_qd, stride_qn,  # q strides in elements
    stride_outb, stride_outh, stride_outd, stride_outn,  # out strides in elements
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
    out_base = (out_ptr + batch.to(tl.int64) * stride_outb + head.to(tl.int64) * stride_outh
                + offs_d[:, None] * stride_outd)
    # [e, c], scaled once here rather than per position, and rounded once for the products.
    context = tl.load(context_ptr + pid_bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_d[None, :])
    context_t = (tl.trans(context) * scale).to(DOT_DTYPE)

    first_tile = tl.program_id(1) * tiles_per_program
    last_tile = tl.minimum(first_tile + tiles_per_program, tl.cdiv(N, BLOCK_N))
    for tile in range(first_tile, last_tile):
        pos = tile * BLOCK_N + offs_n
        in_seq = pos[None, :] < N
        q = tl.load(q_base + pos[None, :] * stride_qn, mask=in_seq, other=0.0).to(tl.float32)
        out = _dot(context_t, _feature_softmax(q), DOT_DTYPE, UPCAST)
        tl.store(out_base + pos[None, :] * stride_outn, out.to(out_ptr.dtype.element_ty), mask=in_seq)


@triton.jit
def _query_grad_kernel(
    q_ptr,  # (B, heads, D, N) queries, strides stride_q*
    dout_ptr,  # (B, heads, D, N) gradient of out, q's dtype, strides stride_o*
    context_ptr,  # (B*heads, D, D) fp32 normalized context[c, e] from the forward
    dq_ptr,  # out: (B, heads, D, N) q's dtype, strides stride_dq*
    dpartial_ptr,  # out: (B*heads, splits, D, D) fp32 the split's part of dcontext[c, e]
    heads,  # number of heads
    N,  # positions
    tiles_per_split,  # BLOCK_N-tiles of positions per program along axis 1
    scale,  # D ** -0.5
    stride_qb, stride_qh, stride_qd, stride_qn,  # q strides in elements
    stride_ob, stride_oh, stride_od, stride_on,  # dout strides in elements
    stride_dqb, stride_dqh, stride_dqd, stride_dqn,  # dq strides in elements
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
    dq_base = dq_ptr + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh + offs_d[:, None] * stride_dqd
    # d(scaled query softmax)[c, n] = scale * sum_e context[c, e] dout[e, n]; the context (a weighted average of
    # values) is as bounded as they are, so it rounds to 16 bits without overflow.
    context_t = tl.load(context_ptr + pid_bh.to(tl.int64) * D * D + offs_d[None, :] * D + offs_d[:, None])
    context_hi, context_lo = _hi_lo(tl.trans(context_t) * scale, DOT_DTYPE)
    dcontext = tl.zeros([D, D], tl.float32)

    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for tile in range(first_tile, last_tile):
        pos = tile * BLOCK_N + offs_n
        in_seq = pos[None, :] < N
        q = tl.load(q_base + pos[None, :] * stride_qn, mask=in_seq, other=0.0).to(tl.float32)
        # Zero outside the sequence, so those columns add nothing to dcontext.
        dout = tl.load(dout_base + pos[None, :] * stride_on, mask=in_seq, other=0.0)
        probs = _feature_softmax(q)
        dcontext += _dot(probs, tl.trans(dout), DOT_DTYPE, UPCAST)
        dprobs = _dot_hi_lo(context_hi, context_lo, dout, DOT_DTYPE, UPCAST)
        # Softmax backward over the feature axis.
        dq = probs * (dprobs - tl.sum(probs * dprobs, axis=0)[None, :])
        tl.store(dq_base + pos[None, :] * stride_dqn, dq.to(dq_ptr.dtype.element_ty), mask=in_seq)

    part = pid_bh.to(tl.int64) * tl.num_programs(1) + split
    tl.store(dpartial_ptr + part * D * D + offs_d[:, None] * D + offs_d[None, :], dcontext * scale)


@triton.jit
def _context_grad_combine_kernel(
    dpartial_ptr,  # (B*heads, splits, D, D) fp32 per-split parts of dcontext
    context_ptr,  # (B*heads, D, D) fp32 normalized context from the forward
    lse_ptr,  # (B*heads, D) fp32 key log-sum-exp from the forward
    mem_k_ptr,  # (heads, D, M) memory keys, any float dtype (read as fp32), strides stride_mk*
    mem_v_ptr,  # (heads, D, M) memory values, any float dtype (read as fp32), strides stride_mv*
    dcontext_ptr,  # out: (B*heads, D, D) fp32 dcontext[c, e]
    rowdot_ptr,  # out: (B*heads, D) fp32 sum_e dcontext[c, e] context[c, e] = sum_j ks[c, j] dks[c, j]
    dmem_k_ptr,  # out: (B*heads, D, M) fp32 memory-key gradient of each batch element
    dmem_v_ptr,  # out: (B*heads, D / ROWS, D, M) fp32 memory-value gradient of each batch element and row block
    heads,  # number of heads
    splits,  # number of splits
    M,  # memory slots, >= 0
    stride_mkh, stride_mkd, stride_mkm,  # mem_k strides in elements
    stride_mvh, stride_mvd, stride_mvm,  # mem_v strides in elements
    D: tl.constexpr,  # head dim
    ROWS: tl.constexpr,  # rows per program (program axis 1 enumerates blocks of rows)
    BLOCK_M: tl.constexpr,  # memory slots per tile
    UPCAST: tl.constexpr,  # interpreting (see _dot)
):
    pid_bh = tl.program_id(0)
    row_block = tl.program_id(1)
    head = pid_bh % heads
    rows = row_block * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    offs_m = tl.arange(0, BLOCK_M)
    offsets = rows[:, None] * D + cols[None, :]
    dcontext = tl.zeros([ROWS, D], tl.float32)
    for split in range(0, splits):  # fixed order: deterministic
        dcontext += tl.load(dpartial_ptr + (pid_bh.to(tl.int64) * splits + split) * D * D + offsets)
    rowdot = tl.sum(dcontext * tl.load(context_ptr + pid_bh.to(tl.int64) * D * D + offsets), axis=1)
    tl.store(dcontext_ptr + pid_bh.to(tl.int64) * D * D + offsets, dcontext)
    tl.store(rowdot_ptr + pid_bh.to(tl.int64) * D + rows, rowdot)

    # Memory slots: the gradients of _key_value_grad_kernel, on fp32 (ROWS x BLOCK_M) tiles. dmem_v sums over
    # all D rows, so each row block writes its own part; torch adds them with the batch, in a fixed order.
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * D + rows)
    for tile in range(0, tl.cdiv(M, BLOCK_M)):
        pos = tile * BLOCK_M + offs_m
        in_mem = pos[None, :] < M
        keys = tl.load(mem_k_ptr + head * stride_mkh + rows[:, None] * stride_mkd + pos[None, :] * stride_mkm,
                       mask=in_mem, other=float("-inf")).to(tl.float32)
        values = tl.load(mem_v_ptr + head * stride_mvh + cols[:, None] * stride_mvd + pos[None, :] * stride_mvm,
                         mask=in_mem, other=0.0).to(tl.float32)
        key_probs = tl.exp(keys - lse[:, None])
        dkeys = key_probs * (_dot(dcontext, values, tl.float32, UPCAST) - rowdot[:, None])
        dvalues = _dot(tl.trans(dcontext), key_probs, tl.float32, UPCAST)
        tl.store(dmem_k_ptr + pid_bh.to(tl.int64) * D * M + rows[:, None] * M + pos[None, :], dkeys, mask=in_mem)
        dmem_v_block = dmem_v_ptr + (pid_bh.to(tl.int64) * (D // ROWS) + row_block) * D * M
        tl.store(dmem_v_block + cols[:, None] * M + pos[None, :], dvalues, mask=in_mem)


@triton.jit
def _key_value_grad_program(
    pid_bh, row_part, k_ptr, v_ptr, lse_ptr, dcontext_ptr, rowdot_ptr, dk_ptr, dv_ptr, heads, N, tiles_per_program,
    stride_kb, stride_kh, stride_kd, stride_kn, stride_vb, stride_vh, stride_vd, stride_vn,
    stride_dkb, stride_dkh, stride_dkd, stride_dkn,
    D: tl.constexpr, BLOCK_N: tl.constexpr, ROW_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    """dk, dv of rows [row_part * D / ROW_SPLIT, +D / ROW_SPLIT) of the tiles of program (pid_bh, program_id(1)).

    The loop-invariant d x d operands (dcontext rows, dcontext^T rows, and for 16-bit their hi/lo halves) stay in
    shared memory through the loop: at D = 128 that is 96 KiB (16-bit) or 128 KiB (fp32), over the 99 KB of
    sm_86/89/120. ROW_SPLIT = 2 gives each program half the rows of those operands (and of dk, dv), at the cost
    of reading the k and v tiles twice."""
    batch = pid_bh // heads
    head = pid_bh % heads
    DOT_DTYPE: tl.constexpr = k_ptr.dtype.element_ty
    ROWS_OUT: tl.constexpr = D // ROW_SPLIT
    offs_d = tl.arange(0, D)
    rows = row_part * ROWS_OUT + tl.arange(0, ROWS_OUT)
    offs_n = tl.arange(0, BLOCK_N)
    head_offset = batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    k_base = k_ptr + head_offset + offs_d[:, None] * stride_kd
    k_rows_base = k_ptr + head_offset + rows[:, None] * stride_kd
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh + offs_d[:, None] * stride_vd
    grad_offset = batch.to(tl.int64) * stride_dkb + head.to(tl.int64) * stride_dkh + rows[:, None] * stride_dkd
    dk_base = dk_ptr + grad_offset
    dv_base = dv_ptr + grad_offset
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * D + offs_d)
    lse_rows = tl.load(lse_ptr + pid_bh.to(tl.int64) * D + rows)
    rowdot = tl.load(rowdot_ptr + pid_bh.to(tl.int64) * D + rows)
    dcontext_base = dcontext_ptr + pid_bh.to(tl.int64) * D * D
    dcontext = tl.load(dcontext_base + rows[:, None] * D + offs_d[None, :])  # [c, e], this program's rows c
    dcontext_t = tl.load(dcontext_base + offs_d[None, :] * D + rows[:, None])  # [e, c], this program's rows e
    # Rounded once for the loop's products, after division by a power of two at least its largest magnitude:
    # dcontext sums dout over all positions and can pass fp16's 65504 under loss scaling while dk and dv do not.
    dscale = _power_of_two_scale(dcontext)
    dscale_t = _power_of_two_scale(dcontext_t)
    dcontext_t = (dcontext_t / dscale_t).to(DOT_DTYPE)
    dcontext_hi, dcontext_lo = _hi_lo(dcontext / dscale, DOT_DTYPE)

    first_tile = tl.program_id(1) * tiles_per_program
    last_tile = tl.minimum(first_tile + tiles_per_program, tl.cdiv(N, BLOCK_N))
    for tile in range(first_tile, last_tile):
        pos = tile * BLOCK_N + offs_n
        in_seq = pos[None, :] < N
        keys = tl.load(k_base + pos[None, :] * stride_kn, mask=in_seq, other=float("-inf")).to(tl.float32)
        values = tl.load(v_base + pos[None, :] * stride_vn, mask=in_seq, other=0.0)
        # Position-softmax backward: dks = dcontext V, dk = ks (dks - sum_j ks dks), dv = dcontext^T ks.
        key_probs = exp(keys - lse[:, None])
        if ROW_SPLIT == 1:
            key_probs_rows = key_probs
        else:  # this program's rows of ks, from a second (cached) load of those rows of the tile
            keys_rows = tl.load(k_rows_base + pos[None, :] * stride_kn, mask=in_seq, other=float("-inf"))
            key_probs_rows = exp(keys_rows.to(tl.float32) - lse_rows[:, None])
        dkey_probs = _dot_hi_lo(dcontext_hi, dcontext_lo, values, DOT_DTYPE, UPCAST) * dscale
        dkeys = key_probs_rows * (dkey_probs - rowdot[:, None])
        dvalues = _dot(dcontext_t, key_probs, DOT_DTYPE, UPCAST) * dscale_t
        tl.store(dk_base + pos[None, :] * stride_dkn, dkeys.to(dk_ptr.dtype.element_ty), mask=in_seq)
        tl.store(dv_base + pos[None, :] * stride_dkn, dvalues.to(dv_ptr.dtype.element_ty), mask=in_seq)


@triton.jit
def _memory_grad_reduce_program(
    head, dmem_k_part_ptr, dmem_v_part_ptr, dmem_k_ptr, dmem_v_ptr, batch_size, heads, M,
    stride_dmh, stride_dmd, stride_dmm,
    D: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """d mem_k, d mem_v of one head: the per-batch (and, for values, per-row-block) partials of
    _context_grad_combine_kernel summed in a fixed order (deterministic), stored in the slots' dtype. The programs
    along axis 1 share the row blocks."""
    cols = tl.arange(0, D)
    offs_m = tl.arange(0, BLOCK_M)
    for row_block in range(tl.program_id(1), D // ROWS, tl.num_programs(1)):
        rows = row_block * ROWS + tl.arange(0, ROWS)
        for tile in range(0, tl.cdiv(M, BLOCK_M)):
            pos = tile * BLOCK_M + offs_m
            in_mem = pos[None, :] < M
            dkeys = tl.zeros([ROWS, BLOCK_M], tl.float32)
            dvalues = tl.zeros([ROWS, BLOCK_M], tl.float32)
            for b in range(0, batch_size):
                pid_bh = (b * heads + head).to(tl.int64)
                dkeys += tl.load(dmem_k_part_ptr + pid_bh * D * M + rows[:, None] * M + pos[None, :], mask=in_mem,
                                 other=0.0)
                for part in range(0, D // ROWS):
                    dvalues += tl.load(dmem_v_part_ptr + (pid_bh * (D // ROWS) + part) * D * M + rows[:, None] * M
                                       + pos[None, :], mask=in_mem, other=0.0)
            out = head.to(tl.int64) * stride_dmh + rows[:, None] * stride_dmd + pos[None, :] * stride_dmm
            tl.store(dmem_k_ptr + out, dkeys.to(dmem_k_ptr.dtype.element_ty), mask=in_mem)
            tl.store(dmem_v_ptr + out, dvalues.to(dmem_v_ptr.dtype.element_ty), mask=in_mem)


@triton.jit
def _key_value_grad_kernel(
    k_ptr,  # (B, heads, D, N) keys, strides stride_k*
    v_ptr,  # (B, heads, D, N) values, strides stride_v*
    lse_ptr,  # (B*heads, D) fp32 key log-sum-exp from the forward
    dcontext_ptr,  # (B*heads, D, D) fp32 dcontext[c, e]
    rowdot_ptr,  # (B*heads, D) fp32 per-row sum_j ks dks
    dk_ptr,  # out: (B, heads, D, N) q's dtype, strides stride_dk*
    dv_ptr,  # out: (B, heads, D, N) q's dtype, dk's strides
    dmem_k_part_ptr,  # (B*heads, D, M) fp32 memory-key gradient of each batch element
    dmem_v_part_ptr,  # (B*heads, D / ROWS, D, M) fp32 memory-value gradient of each batch element and row block
    dmem_k_ptr,  # out: (heads, D, M) memory-key gradient in the slots' dtype, strides stride_dm*
    dmem_v_ptr,  # out: (heads, D, M) memory-value gradient in the slots' dtype, dmem_k's strides
    batch_size,  # B
    heads,  # number of heads (program axis 0 enumerates (b * heads + h) * ROW_SPLIT + row part, then one
            # reduction row per head if M > 0)
    N,  # positions in k and v
    M,  # memory slots, >= 0
    tiles_per_program,  # BLOCK_N-tiles of positions per program along axis 1
    stride_kb, stride_kh, stride_kd, stride_kn,  # k strides in elements
    stride_vb, stride_vh, stride_vd, stride_vn,  # v strides in elements
    stride_dkb, stride_dkh, stride_dkd, stride_dkn,  # dk and dv strides in elements (the same for both)
    stride_dmh, stride_dmd, stride_dmm,  # dmem_k and dmem_v strides in elements
    D: tl.constexpr,  # head dim
    BLOCK_N: tl.constexpr,  # positions per tile
    ROWS: tl.constexpr,  # rows per combine program (the row blocks of dmem_v_part)
    BLOCK_M: tl.constexpr,  # memory slots per tile
    ROW_SPLIT: tl.constexpr,  # programs per (b, head) and tile, each with D / ROW_SPLIT rows (1 or 2)
    UPCAST: tl.constexpr,  # interpreting: compute 16-bit dots in fp32 (see _dot)
):
    """The backward's last launch: dk, dv of every (b, head), and after them, one program row per head that
    reduces the memory-slot gradients (the torch sums and casts this replaces were four kernels)."""
    pid = tl.program_id(0)
    if pid < batch_size * heads * ROW_SPLIT:
        _key_value_grad_program(pid // ROW_SPLIT, pid % ROW_SPLIT, k_ptr, v_ptr, lse_ptr, dcontext_ptr, rowdot_ptr, dk_ptr, dv_ptr, heads, N,
                                tiles_per_program, stride_kb, stride_kh, stride_kd, stride_kn,
                                stride_vb, stride_vh, stride_vd, stride_vn, stride_dkb, stride_dkh, stride_dkd,
                                stride_dkn, D, BLOCK_N,
                                ROW_SPLIT, UPCAST)
    else:
        _memory_grad_reduce_program(pid - batch_size * heads * ROW_SPLIT, dmem_k_part_ptr, dmem_v_part_ptr, dmem_k_ptr,
                                    dmem_v_ptr, batch_size, heads, M, stride_dmh, stride_dmd, stride_dmm, D, ROWS,
                                    BLOCK_M)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    block_n: int  # positions per tile
    num_warps: int
    num_stages: int
    row_split: int = 1  # key/value-gradient programs per (b, head) and tile, each with D / row_split rows


# Largest shared memory per block (opt-in) of the architectures the tables are checked for, in bytes, as
# torch.cuda.get_device_properties(...).shared_memory_per_block_optin reports it: A100, RTX 30xx / 40xx, H100,
# RTX 50xx. The compile tests (tests/gpu_compile.py) check every configuration against the same limits.
SHARED_MEMORY_OPTIN = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376}
# Shared memory the key/value-gradient kernel needs at D = 128 with the whole d x d operands (one program per
# (b, head) and tile), measured with the compile test: 16-bit 102400 (118784 with the divisibility hints), fp32
# 139264 bytes. Devices with less split the rows between two programs (row_split 2: 48-70 KiB).
KV_GRAD_D128_SHARED_MEMORY = 139264


def _gpu_blocks(head_dim, dtype, shared_memory):
    """Tile shape and launch options on a GPU with `shared_memory` bytes per block (opt-in), for a head dim and
    input dtype.

    16-bit: a (D, BLOCK_N) fp32 tile is ~16 registers a thread, and each feature row of a tile is >= 128
    contiguous bytes of an NCHW tensor. fp32: the exact products run on FMA units, whose operands take
    registers in proportion to the tile, so the tiles shrink as D grows (no spills at any D; see the AOT test).
    """
    if dtype == torch.float32:
        block_n, num_warps, num_stages = {16: (64, 8, 2), 32: (32, 8, 2), 64: (16, 8, 1), 128: (16, 8, 1)}[head_dim]
    else:
        block_n, num_warps, num_stages = {16: (128, 4, 3), 32: (128, 8, 2), 64: (32, 8, 3), 128: (16, 8, 3)}[head_dim]
    row_split = 2 if head_dim == 128 and shared_memory < KV_GRAD_D128_SHARED_MEMORY else 1
    return _Blocks(block_n, num_warps, num_stages, row_split)


@functools.lru_cache(maxsize=None)
def _shared_memory(index):
    """Shared memory per block (opt-in) of CUDA device `index`, in bytes."""
    properties = torch.cuda.get_device_properties(index)
    return getattr(properties, "shared_memory_per_block_optin", SHARED_MEMORY_OPTIN[86])


def _blocks(n, head_dim, dtype, device):
    if INTERPRETING:
        # The interpreter's cost is per op: 128-position tiles take a 64x64 image's attention (as the whole-Unet
        # tests run it) in a quarter of the time of 32-position ones, which small N keep so that the test shapes
        # (N = 35 to 100) still go through the online rescaling over several tiles. D = 128 takes the row split
        # of the 99 KB GPUs, so that the tests run both ways of the key/value kernel.
        return _Blocks(32 if n <= 256 else 128, 4, 1, 2 if head_dim == 128 else 1)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _gpu_blocks(head_dim, dtype, _shared_memory(index))


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


# CUDA's limit on grid axis 1, which enumerates the programs of one (b, head).
MAX_GRID_Y = 65535


def _split(tiles, tiles_per_program):
    """(tiles per program, programs per (b, head)): every program gets at least one tile, and there are at most
    MAX_GRID_Y programs (more tiles per program past 65535 * tiles_per_program tiles, N above ~8M at d = 128)."""
    tiles_per_program = max(1, min(tiles_per_program, tiles), -(-tiles // MAX_GRID_Y))
    return tiles_per_program, max(1, -(-tiles // tiles_per_program))


def _plans(batch_heads, n, head_dim, dtype, device, num_splits):
    """Blocks, and (tiles per program, programs per (b, head)) for the reduction and for the map passes.

    num_splits > 0 forces the number of reduction splits (at most one a tile), e.g. to test their combination.
    """
    blocks = _blocks(n, head_dim, dtype, device)
    tiles = -(-n // blocks.block_n)
    if INTERPRETING:
        # The interpreter's cost is per program: one per (b, head).
        reduce_tiles = map_tiles = tiles
    else:
        # B * heads * programs ~ PROGRAMS_PER_SM per SM, within each pass's bounds on the tiles per program.
        index = device.index if device.index is not None else torch.cuda.current_device()
        per_program = -(-batch_heads * tiles // (_sm_count(index) * PROGRAMS_PER_SM))
        reduce_tiles = max(per_program, MIN_TILES_PER_SPLIT)
        map_tiles = min(per_program, MAX_TILES_PER_PROGRAM)
    if num_splits > 0:
        reduce_tiles = -(-tiles // num_splits)
    return blocks, _split(tiles, reduce_tiles), _split(tiles, map_tiles)


def _check_head_dim(head_dim):
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"linear_attention: the Triton kernel supports head dims {HEAD_DIMS}, got {head_dim}")


def _memory_or_standin(mem, standin):
    """The memory slots, read in their own dtype; with M = 0, `standin`, a valid tensor that is never read (an
    empty tensor may have no valid data pointer)."""
    return mem if mem.shape[-1] > 0 else standin


def _qkv_views(qkv, heads):
    """q, k, v (B, heads, d, N) views of a (B, 3*heads*d, H, W) tensor (a copy only for strides that cannot merge
    H and W)."""
    channels = qkv.shape[1]
    return qkv.flatten(2).unflatten(1, (3, heads, channels // (3 * heads))).unbind(1)


def _forward(q, k, v, mem_k, mem_v, num_splits, out):
    """Writes the attention into `out` (B, heads, d, N), any strides; returns (context, lse)."""
    batch, heads, head_dim, n = q.shape
    _check_head_dim(head_dim)
    context = torch.empty((batch, heads, head_dim, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads, head_dim), dtype=torch.float32, device=q.device)
    batch_heads = batch * heads
    if batch_heads == 0:
        return context, lse
    blocks, (tiles_per_split, splits), (tiles_per_program, programs) = _plans(
        batch_heads, n, head_dim, q.dtype, q.device, num_splits
    )
    options = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    stats = torch.empty((2, batch_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    partial = torch.empty((batch_heads, splits, head_dim, head_dim), dtype=torch.float32, device=q.device)
    _context_partial_kernel[(batch_heads, splits)](
        k, v, stats[0], stats[1], partial, heads, n, tiles_per_split, *k.stride(), *v.stride(),
        D=head_dim, BLOCK_N=blocks.block_n, UPCAST=INTERPRETING, **options,
    )  # fmt: skip
    mem_k_in, mem_v_in = _memory_or_standin(mem_k, lse), _memory_or_standin(mem_v, lse)
    _context_combine_kernel[(batch_heads, head_dim // COMBINE_ROWS)](
        stats[0], stats[1], partial, mem_k_in, mem_v_in, context, lse, heads, splits, mem_k.shape[-1],
        *mem_k_in.stride(), *mem_v_in.stride(), D=head_dim, ROWS=COMBINE_ROWS, BLOCK_M=MEMORY_BLOCK,
        UPCAST=INTERPRETING,
    )  # fmt: skip
    if n > 0:
        _output_kernel[(batch_heads, programs)](
            q, context, out, heads, n, tiles_per_program, head_dim**-0.5, *q.stride(), *out.stride(),
            D=head_dim, BLOCK_N=blocks.block_n, UPCAST=INTERPRETING, **options,
        )  # fmt: skip
    return context, lse


def _backward(dout, q, k, v, mem_k, mem_v, context, lse, num_splits, dq, dk, dv, dmem_k, dmem_v):
    """Writes dq, dk, dv (B, heads, d, N; any strides, dk's and dv's the same) and dmem_k, dmem_v (heads, d, M;
    the same strides) in three launches and no other kernel."""
    batch, heads, head_dim, n = q.shape
    m = mem_k.shape[-1]
    batch_heads = batch * heads
    if batch_heads == 0:
        dmem_k.zero_()  # an empty batch gives the memory slots no gradient
        dmem_v.zero_()
        return
    row_blocks = head_dim // COMBINE_ROWS
    # Memory-slot gradients of each batch element (and, for dmem_v, each row block), summed by the last launch.
    dmem_k_part = torch.empty((batch, heads, head_dim, m), dtype=torch.float32, device=q.device)
    dmem_v_part = torch.empty((batch, heads, row_blocks, head_dim, m), dtype=torch.float32, device=q.device)
    blocks, (tiles_per_split, splits), (tiles_per_program, programs) = _plans(
        batch_heads, n, head_dim, q.dtype, q.device, num_splits
    )
    options = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    dpartial = torch.empty((batch_heads, splits, head_dim, head_dim), dtype=torch.float32, device=q.device)
    _query_grad_kernel[(batch_heads, splits)](
        q, dout, context, dq, dpartial, heads, n, tiles_per_split, head_dim**-0.5, *q.stride(), *dout.stride(),
        *dq.stride(), D=head_dim, BLOCK_N=blocks.block_n, UPCAST=INTERPRETING, **options,
    )  # fmt: skip
    dcontext = torch.empty((batch_heads, head_dim, head_dim), dtype=torch.float32, device=q.device)
    rowdot = torch.empty((batch_heads, head_dim), dtype=torch.float32, device=q.device)
    mem_k_in, mem_v_in = _memory_or_standin(mem_k, lse), _memory_or_standin(mem_v, lse)
    dmem_k_part_in, dmem_v_part_in = (_memory_or_standin(t, rowdot) for t in (dmem_k_part, dmem_v_part))
    _context_grad_combine_kernel[(batch_heads, row_blocks)](
        dpartial, context, lse, mem_k_in, mem_v_in, dcontext, rowdot, dmem_k_part_in, dmem_v_part_in,
        heads, splits, m, *mem_k_in.stride(), *mem_v_in.stride(),
        D=head_dim, ROWS=COMBINE_ROWS, BLOCK_M=MEMORY_BLOCK, UPCAST=INTERPRETING,
    )  # fmt: skip
    dmem_k_out, dmem_v_out = _memory_or_standin(dmem_k, dk[0]), _memory_or_standin(dmem_v, dv[0])
    # One extra program row per head when there are memory slots: the reductions of their gradients.
    _key_value_grad_kernel[(batch_heads * blocks.row_split + (heads if m > 0 else 0), programs)](
        k, v, lse, dcontext, rowdot, dk, dv, dmem_k_part_in, dmem_v_part_in, dmem_k_out, dmem_v_out,
        batch, heads, n, m, tiles_per_program, *k.stride(), *v.stride(), *dk.stride(),
        *dmem_k_out.stride(),
        D=head_dim, BLOCK_N=blocks.block_n, ROWS=COMBINE_ROWS, BLOCK_M=MEMORY_BLOCK, ROW_SPLIT=blocks.row_split,
        UPCAST=INTERPRETING, **options,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastunet::linear_attention_forward", mutates_args=())
def linear_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, context, lse): out (B, heads, d, N) contiguous in q.dtype; context (B, heads, d, d) fp32 [c, e];
    lse (B, heads, d) fp32 log-sum-exp of each key row over the M + N positions. See linear_attention."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return (out, *_forward(q, k, v, mem_k, mem_v, num_splits, out))


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
    (heads, d, M) contiguous in mem_k's and mem_v's dtypes. dout (B, heads, d, N) any strides; context, lse from
    the forward."""
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    dmem_k = torch.empty(mem_k.shape, dtype=mem_k.dtype, device=mem_k.device)
    dmem_v = torch.empty(mem_v.shape, dtype=mem_v.dtype, device=mem_v.device)
    _backward(dout, q, k, v, mem_k, mem_v, context, lse, num_splits, dq, dk, dv, dmem_k, dmem_v)
    return dq, dk, dv, dmem_k, dmem_v


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
    # No zero tensors for the (absent) gradients of context and lse: two kernels per backward.
    ctx.set_materialize_grads(False)


def _backward_rule(ctx, dout, _dcontext, _dlse):
    if dout is None:
        return (None,) * 6
    q, k, v, mem_k, mem_v, context, lse = ctx.saved_tensors
    grads = linear_attention_backward(dout, q, k, v, mem_k, mem_v, context, lse, ctx.num_splits)
    return (*grads, None)


linear_attention_forward.register_autograd(_backward_rule, setup_context=_setup_context)


@torch.library.custom_op("fastunet::packed_linear_attention_forward", mutates_args=())
def packed_linear_attention_forward(
    qkv: torch.Tensor, mem_kv: torch.Tensor, heads: int, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, context, lse) on the to_qkv output: qkv (B, 3*heads*d, H, W) any strides, mem_kv (2, heads, d, M) any
    float dtype; out (B, heads*d, H, W) in qkv.dtype and layout (empty_output), context and lse as
    linear_attention_forward's."""
    batch, channels, height, width = qkv.shape
    q, k, v = _qkv_views(qkv, heads)
    out = empty_output(qkv, shape=(batch, channels // 3, height, width))
    return (out, *_forward(q, k, v, mem_kv[0], mem_kv[1], num_splits, out.flatten(2).unflatten(1, q.shape[1:3])))


@packed_linear_attention_forward.register_fake
def _(qkv, mem_kv, heads, num_splits):
    batch, channels, height, width = qkv.shape
    head_dim = channels // (3 * heads)
    return (
        empty_output(qkv, shape=(batch, channels // 3, height, width)),
        qkv.new_empty((batch, heads, head_dim, head_dim), dtype=torch.float32),
        qkv.new_empty((batch, heads, head_dim), dtype=torch.float32),
    )


@torch.library.custom_op("fastunet::packed_linear_attention_backward", mutates_args=())
def packed_linear_attention_backward(
    dout: torch.Tensor, qkv: torch.Tensor, mem_kv: torch.Tensor, context: torch.Tensor, lse: torch.Tensor,
    heads: int, num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d qkv, d mem_kv): d qkv (B, 3*heads*d, H, W) in qkv.dtype and layout (empty_output), one tensor (autograd
    joins nothing); d mem_kv (2, heads, d, M) in mem_kv's dtype and strides (channels_last after
    model.to(memory_format=torch.channels_last): other strides would make autograd's accumulation copy it).
    dout (B, heads*d, H, W) any strides."""
    q, k, v = _qkv_views(qkv, heads)
    dqkv = empty_output(qkv)
    dmem_kv = torch.empty_like(mem_kv)
    dq, dk, dv = _qkv_views(dqkv, heads)
    dout = dout.flatten(2).unflatten(1, q.shape[1:3])
    _backward(dout, q, k, v, mem_kv[0], mem_kv[1], context, lse, num_splits, dq, dk, dv, dmem_kv[0], dmem_kv[1])
    return dqkv, dmem_kv


@packed_linear_attention_backward.register_fake
def _(dout, qkv, mem_kv, context, lse, heads, num_splits):
    return empty_output(qkv), torch.empty_like(mem_kv)


def _packed_setup_context(ctx, inputs, output):
    qkv, mem_kv, heads, num_splits = inputs
    _, context, lse = output
    ctx.save_for_backward(qkv, mem_kv, context, lse)
    ctx.heads, ctx.num_splits = heads, num_splits
    ctx.mark_non_differentiable(context, lse)
    ctx.set_materialize_grads(False)


def _packed_backward_rule(ctx, dout, _dcontext, _dlse):
    if dout is None:
        return (None,) * 4
    qkv, mem_kv, context, lse = ctx.saved_tensors
    dqkv, dmem_kv = packed_linear_attention_backward(dout, qkv, mem_kv, context, lse, ctx.heads, ctx.num_splits)
    return dqkv, dmem_kv, None, None


packed_linear_attention_forward.register_autograd(_packed_backward_rule, setup_context=_packed_setup_context)


def unsupported_reason(*args):
    """Why the kernels cannot take these inputs (the dispatcher then uses the reference), or None. Shared by the
    module's two ops: `linear_attention`'s arguments (q, k, v, mem_k, mem_v) and `packed_linear_attention`'s
    (qkv, mem_kv, heads), told apart by their number."""
    if len(args) == 3:
        qkv, _, heads = args
        head_dim = qkv.shape[1] // (3 * heads)
    else:
        head_dim = args[0].shape[2]
    if head_dim not in HEAD_DIMS:
        return f"the linear attention kernels take head dims {HEAD_DIMS}, got {head_dim}"
    return None


def linear_attention(q, k, v, mem_k, mem_v, *, num_splits=0):
    """Upstream's linear attention with memory key/values (fastunet.reference.linear_attention), in Triton.

    q, k, v: (B, heads, d, N), one dtype of fp32/fp16/bf16, any strides (e.g. views of the to_qkv conv output);
    d in HEAD_DIMS. mem_k, mem_v: (heads, d, M), M >= 0, any float dtype (fp32 under autocast is fine).
    num_splits: 0 picks the split of the position reduction from the device; > 0 forces it (tests).
    Returns (B, heads, d, N) contiguous in q.dtype, i.e. the NCHW (B, heads * d, H, W) tensor the next 1x1 conv
    reads. Differentiable in all five tensors; gradients come back in each input's dtype.
    """
    return linear_attention_forward(q, k, v, mem_k, mem_v, num_splits)[0]


def packed_linear_attention(qkv, mem_kv, heads, *, num_splits=0):
    """`linear_attention` on the to_qkv output, with one gradient tensor for qkv and one for mem_kv.

    qkv: (B, 3*heads*d, H, W) fp32/fp16/bf16, any strides: q, k, v are its channel chunks, each (heads, d) major
    to minor; d in HEAD_DIMS. mem_kv: (2, heads, d, M), M >= 0, any float dtype, read in place.
    Returns (B, heads*d, H, W) contiguous in qkv.dtype (what to_out reads).
    """
    return packed_linear_attention_forward(qkv, mem_kv, heads, num_splits)[0]


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (tests/gpu_compile.py)
# ---------------------------------------------------------------------------------------------------------------


# Pointers to tensors of the input dtype; to the memory slots and their gradients (fp32 parameters under autocast,
# the input dtype in a model converted with .half() / .bfloat16()); every other pointer is fp32.
_INPUT_DTYPE_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "out_ptr", "dout_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
_MEMORY_POINTERS = {"mem_k_ptr", "mem_v_ptr", "dmem_k_ptr", "dmem_v_ptr"}
# Integer arguments that are multiples of 16 in the Unet's layout whenever N = H*W is (every resolution from 4x4 up):
# N, the batch, head and feature strides of the (B, heads, d, N) views of to_qkv (3*heads*d*N, d*N, N) and of the
# tensors the kernels allocate, and the head strides of the memory slots (d*M, d >= 16). With PyTorch's 16-byte
# aligned allocations (the to_qkv chunks and the mem_kv halves start a multiple of 16 bytes apart), a launch
# marks exactly these and every pointer tt.divisibility=16.
_DIVISIBLE_INTS = {"N", "stride_mkh", "stride_mvh", "stride_dmh"} | {
    f"stride_{t}{a}" for t in ("q", "k", "v", "o", "out", "dq", "dk") for a in "bhd"}


def _signature(kernel, pointer_type, constexprs, memory_type="*fp32"):
    """Triton signature of `kernel` with inputs of `pointer_type` and memory slots of `memory_type`, `constexprs`
    fixed (strides of 1 included)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = (pointer_type if name in _INPUT_DTYPE_POINTERS else
                               memory_type if name in _MEMORY_POINTERS else "*fp32")
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return signature


def _divisibility(kernel, signature):
    """The `attrs` of a launch in the Unet's layout with N a multiple of 16: every pointer and _DIVISIBLE_INTS."""
    return {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names)
            if signature[name] != "constexpr" and (signature[name].startswith("*") or name in _DIVISIBLE_INTS)}


def gpu_compile_configs(arch=None):
    """Every (kernel, signature, constexprs, options, attrs) a GPU launch on sm_`arch` can select (its shared memory
    from SHARED_MEMORY_OPTIN decides the key/value kernel's row split; None: every architecture's), per input
    dtype and head dim.

    Strides along positions are given as 1: Triton specializes them so for NCHW inputs (the Unet's layout). The
    streaming kernels compile without hints (attrs None: N not a multiple of 16, the worst case for registers)
    and, for fp16/bf16, with the divisibility a launch at the Unet's shapes gets (vector loads); the key/value
    kernel, which also writes the memory slots' gradients, with fp32 slots (autocast) and, aligned, with slots of
    the input dtype (a .half()/.bfloat16() model). The combines, whose loads do not depend on N, compile aligned
    (their pointers always are) for fp32, fp16 and bf16 memory slots.
    """
    if arch in _CONSUMER_ARCHS:
        return _consumer_compile_configs(arch)
    limits = sorted(set(SHARED_MEMORY_OPTIN.values())) if arch is None else [SHARED_MEMORY_OPTIN[arch]]
    configs = []
    for dtype, pointer_type in _POINTER_TYPES.items():
        for head_dim in HEAD_DIMS:
            variants = list(dict.fromkeys(_gpu_blocks(head_dim, dtype, limit) for limit in limits))
            for index, blocks in enumerate(variants):
                configs += _streaming_configs(dtype, pointer_type, head_dim, blocks, only_key_value=index > 0)
    for head_dim in HEAD_DIMS:
        constexprs = {"D": head_dim, "ROWS": COMBINE_ROWS, "BLOCK_M": MEMORY_BLOCK, "UPCAST": False,
                      "stride_mkm": 1, "stride_mvm": 1}
        for memory_type in _POINTER_TYPES.values():
            for kernel in (_context_combine_kernel, _context_grad_combine_kernel):
                signature = _signature(kernel, "*fp32", constexprs, memory_type)
                configs.append((kernel, signature, constexprs, {"num_warps": 4}, _divisibility(kernel, signature)))
    return configs


def _streaming_configs(dtype, pointer_type, head_dim, blocks, only_key_value=False):
    """The streaming kernels' entries of gpu_compile_configs for one dtype, head dim and _Blocks (only the
    key/value kernel's, the one that row_split changes, with `only_key_value`)."""
    configs = []
    options = {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
    tile = {"D": head_dim, "BLOCK_N": blocks.block_n, "UPCAST": False}
    for kernel, unit_strides in (
        (_context_partial_kernel, ("stride_kn", "stride_vn")),
        (_output_kernel, ("stride_qn", "stride_outn")),
        (_query_grad_kernel, ("stride_qn", "stride_on", "stride_dqn")),
        (_key_value_grad_kernel, ("stride_kn", "stride_vn", "stride_dkn", "stride_dmm")),
    ):
        if only_key_value and kernel is not _key_value_grad_kernel:
            continue
        constexprs = {**dict.fromkeys(unit_strides, 1), **tile}
        if kernel is _key_value_grad_kernel:
            constexprs.update(ROWS=COMBINE_ROWS, BLOCK_M=MEMORY_BLOCK, ROW_SPLIT=blocks.row_split)
        memory_types = ["*fp32"]
        if kernel is _key_value_grad_kernel and dtype != torch.float32:
            memory_types.append(pointer_type)
        for aligned in (False, True) if dtype != torch.float32 else (False,):
            for memory_type in memory_types if aligned else memory_types[:1]:
                signature = _signature(kernel, pointer_type, constexprs, memory_type)
                attrs = _divisibility(kernel, signature) if aligned else None
                configs.append((kernel, signature, constexprs, options, attrs))
    return configs


# Architectures with sm_80's instructions (mma.sync, cp.async) and 99 KB of shared memory.
_CONSUMER_ARCHS = (86, 89, 120)


def _consumer_compile_configs(arch):
    """The configurations compiled for sm_86 / sm_89 / sm_120. Their tiles are sm_80's but for the key/value
    kernel's row split at D = 128, and sm_80's compile holds every build to the registers and spills; compiling
    them all again per architecture would triple the compile test. These check each target's ptxas and its 99 KB
    on the builds the Unet trains with (fp16/bf16 with the launch's divisibility, fp32 memory slots) and on every
    build of the key/value kernel at D = 128, the one that needs the split (fp32 included)."""
    configs = []
    for dtype, pointer_type in _POINTER_TYPES.items():
        for head_dim in HEAD_DIMS:
            blocks = _gpu_blocks(head_dim, dtype, SHARED_MEMORY_OPTIN[arch])
            for config in _streaming_configs(dtype, pointer_type, head_dim, blocks):
                kernel, signature, _, _, attrs = config
                key_value_128 = kernel is _key_value_grad_kernel and head_dim == 128
                autocast = dtype != torch.float32 and attrs is not None and signature.get("dmem_k_ptr") != pointer_type
                if key_value_128 or autocast:
                    configs.append(config)
    for head_dim in HEAD_DIMS:
        constexprs = {"D": head_dim, "ROWS": COMBINE_ROWS, "BLOCK_M": MEMORY_BLOCK, "UPCAST": False,
                      "stride_mkm": 1, "stride_mvm": 1}
        for kernel in (_context_combine_kernel, _context_grad_combine_kernel):
            signature = _signature(kernel, "*fp32", constexprs, "*fp32")
            configs.append((kernel, signature, constexprs, {"num_warps": 4}, _divisibility(kernel, signature)))
    return configs
