"""Flash attention over the layer's learned memory key/values followed by the image positions, in Triton.

    out = softmax(q [mem_k; k]^T * d^-0.5) [mem_v; v]        (non-causal; fastunet.reference.attention)

Forward: one program per (block of BLOCK_M queries, batch*head). It streams the keys/values through an online
softmax (FlashAttention-2) in two loops that read from two pointers: first the M memory slots (heads, M, d) in
blocks of BLOCK_MEM=16 (the smallest tile a tensor-core dot accepts; M=4 in the Unet), masked, then the N image
positions in blocks of BLOCK_N, whose full blocks run unmasked and whose last partial block (N not a multiple of
BLOCK_N) runs masked. The concatenation [mem; k] is never materialized. It saves the base-2 logsumexp of each
query row (fp32) for the backward.

Backward (FlashAttention-2, deterministic, no atomics), two launches and no other kernel (no zero-fill, sum or cast):
1. dq: one program per block of queries, looping over memory slots then image keys as the forward does, twice:
   first for delta = rowsum(p * dp) / rowsum(p) (fp32) of its rows, FlashAttention's preprocess, which it stores
   (2 more dots per key block than rowsum(dO * O), whose 16-bit roundings of p and O do not cancel where the
   softmax is sharp: see the dq kernel), then for dq; from the p and dS of the memory slots it has then, it
   writes its query block's share of d mem_k and d mem_v as an fp32 partial (B * heads * query blocks, 2, M, d),
   each element written by exactly one program;
2. dk/dv of the image keys: one program per block of BLOCK_N keys, looping over all query blocks; the same launch
   begins with 2 * heads * cdiv(M, 16) programs that sum the partials over the batch and query blocks in a fixed
   order and store d mem_k, d mem_v in the memory slots' own dtype.

Precision: dots take q's dtype (memory slots are cast to it on load) and accumulate in fp32; softmax statistics,
logsumexp, delta and all accumulators are fp32. fp16/bf16 dots run on tensor cores (every dot passes
`input_precision="tf32"`, which only fp32 operands heed). fp32 inputs run TF32 tensor-core dots (10-bit mantissa,
Triton's default and what torch's cuDNN convolutions already do to fp32 by default): relative errors of ~1e-3
against the fp32 reference on a GPU, tested against a reference whose dot operands are truncated to TF32. Exact
IEEE fp32 dots were rejected: they run on the FMA units (H100: ~67 TFLOP/s against ~490 for TF32) and their
backward tiles spill registers from head dim 16 on; TF32x3 (three TF32 products, near-fp32 accuracy) spills at
head dims >= 64. Under the Triton interpreter every dot operand is upcast to fp32 after rounding to its dtype
(bf16 `tl.dot` returns garbage there, triton issue 11584; fp32 dots are exact there), while the GPU path keeps
16-bit tensor-core dots.

Layouts: q, k, v, grad_out may have any strides. In the Unet they are views of the to_qkv 1x1-conv output
(B, 3*heads*d, H, W), i.e. the positions are contiguous (stride 1 along N); `packed_attention` takes that output
itself and returns d qkv as one tensor of its shape (the kernels write dq, dk, dv into its three channel chunks,
so autograd joins nothing), and mem_kv (2, heads, M, d) whole with one gradient. Tiles are indexed with both strides,
and Triton specializes a stride equal to 1 at compile time, so loads coalesce along N there (and along d for
contiguous or channels_last inputs). The output, dq, dk and dv are allocated with the memory of a contiguous
(B, heads, d, N) tensor, i.e. (B, heads*d, H, W) NCHW, exactly what to_out reads: the returned (B, heads, N, d)
tensors have strides (heads*d*N, d*N, 1, N). They are fresh tensors made by `torch.empty_strided`, not views,
which a torch.library custom op may return (its fake implementation makes the same strides).

Hopper (sm_90). Every dot is a wgmma; the forward waits once per key block, for q k^T, whose scores the softmax
needs at once, while the p v dots of a block stay in flight until the next block's scores are waited for
(bench/static_report.py counts the waits). Two designs were compiled for sm_90 and read the same way (triton 3.8,
bf16, d = 32, the 128x64 tile) and not taken, because each executes more per key block and overlaps nothing more:
- k and v through TMA descriptors (3-D, over the to_qkv output) instead of 16-byte cp.async: 282 SASS instructions
  per block against 258 (two cp.async per thread give way to mbarrier waits, elections and two more barriers),
  92 registers against 90 (the 128x128 candidate: 429 instructions against 421). With triton 3.6 (the GPU
  machines' version) 284 against 253, and the 128x128 candidate waits after every one of its 10 dots. At d = 32
  the loads are 2 instructions of a block's 258; its exp2, max and sum over the 128x64 scores are most of the rest.
- the next block's q k^T issued before this block's softmax (FlashAttention-3's overlap within a warpgroup): the
  compiler still waits for that dot at once (wait_group 0 right after it), at 128 registers and 280 instructions
  (triton 3.6: 141 registers, one program per SM). Two resident 8-warp programs per SM interleave one program's
  softmax with the other's dots instead.

Head dims 16, 32, 64 and 128 run directly; other head dims up to 128 are zero-padded to the next of those by
`attention` (an extra copy of q, k, v; the scale stays d^-0.5); larger ones raise ValueError.
"""

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRETING, tuning
from .scale_shift_act import empty_output

LOG2E = 1.4426950408889634
# Memory slots go through the kernels in blocks of this many; 16 is the smallest dot dimension the GPU
# compiler accepts, and the Unet's M=4 fits in one block.
BLOCK_MEM = 16
HEAD_DIMS = (16, 32, 64, 128)
# Programs of one launch: each kernel's grid is one axis (see _program_block), which CUDA allows 2**31 - 1 long.
# Blocks along N have at least 16 positions (the smallest dot tile), so a launch has at most B * heads *
# cdiv(N, 16) programs: passing the limit takes q with over 2**35 elements (64 GiB in bf16).
MAX_PROGRAMS = 2**31 - 1


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _operand(x, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """x rounded to the data dtype, then upcast to fp32 when the interpreter cannot multiply 16-bit floats."""
    x = x.to(DTYPE)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _program_block(pid, n_items, BLOCK: tl.constexpr):
    """(block, batch * heads + head) of program `pid` of a one-axis grid of cdiv(n_items, BLOCK) * batch * heads
    programs (at most 2**31 - 1, MAX_PROGRAMS), the blocks of one (batch, head) consecutive: programs that run
    together share that head's keys/values in L2, as with blocks on the first axis of a 2-D grid, but without the
    65535 limit of the second axis on batch * heads."""
    n_blocks = tl.cdiv(n_items, BLOCK)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _forward_block(
    acc, m_i, l_i, q,  # running output (BLOCK_M, HEAD_DIM) fp32, row max and row sum (BLOCK_M,) fp32, q tile
    K, V,  # key/value base pointers of this (batch, head), or of this head's memory slots
    stride_kn, stride_kd, stride_vn, stride_vd,  # their strides along positions and head dim
    start, n_keys,  # first key of this block; number of keys behind K/V
    qk_scale,  # d^-0.5 * log2(e): scores go to base 2 so the softmax uses exp2
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # whether this block may run past n_keys
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # k is read transposed, (HEAD_DIM, BLOCK_N), so that it is the dot's right operand without a shuffle.
    k_ptrs = K + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASK_KEYS:
        valid = offs_n < n_keys
        k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, _operand(k, DTYPE, DOT_FP32), input_precision="tf32")
    if MASK_KEYS:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    # The scale multiplies the fp32 scores (fused with the max subtraction into one FMA) rather than q, which
    # would round q once more in its 16-bit dtype.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(_operand(p, DTYPE, DOT_FP32), _operand(v, DTYPE, DOT_FP32), acc, input_precision="tf32")
    return acc, m_new, l_i


@triton.jit
def _attention_forward_kernel(
    Q, K, V,  # (B, heads, N, HEAD_DIM) pointers, one dtype, any strides
    MEM_K, MEM_V,  # (heads, M, HEAD_DIM) memory slots, any float dtype (cast to Q's on load)
    OUT,  # (B, heads, N, HEAD_DIM) output in Q's dtype
    LSE,  # (B, heads, N) fp32, contiguous: base-2 logsumexp of the scaled scores of each query row
    stride_qb, stride_qh, stride_qn, stride_qd,  # strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # strides of V
    stride_mkh, stride_mkm, stride_mkd,  # strides of MEM_K
    stride_mvh, stride_mvm, stride_mvd,  # strides of MEM_V
    stride_ob, stride_oh, stride_on, stride_od,  # strides of OUT
    HEADS,  # number of heads (the grid runs batch * HEADS + head major, see _program_block)
    N_CTX,  # N, the number of image positions (queries, and keys after the memory slots)
    M_MEM,  # M, the number of memory slots (may be 0)
    qk_scale,  # softmax scale (d^-0.5) * log2(e), fp32
    HEAD_DIM: tl.constexpr,  # d, one of HEAD_DIMS
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # image keys per inner step
    BLOCK_MEM: tl.constexpr,  # memory slots per inner step
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (interpreter only)
):
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_m, pid_bh = _program_block(tl.program_id(0), N_CTX, BLOCK_M)
    # int64 base offsets: B * 3*heads*d * N passes 2**31 elements for large batches at high resolution.
    off_b = (pid_bh // HEADS).to(tl.int64)
    off_h = (pid_bh % HEADS).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    OUT += off_b * stride_ob + off_h * stride_oh
    MEM_K += off_h * stride_mkh
    MEM_V += off_h * stride_mvh
    LSE += pid_bh.to(tl.int64) * N_CTX

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < N_CTX
    # Rows past N load as zeros: their scores are finite and their results are never stored.
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_valid[:, None], other=0.0)
    q = _operand(q, DTYPE, DOT_FP32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Memory slots first (they come before the image keys; the order does not change the softmax). Every block
    # holds at least one valid key, so the running max is finite after it.
    for start in range(0, M_MEM, BLOCK_MEM):
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, MEM_K, MEM_V, stride_mkm, stride_mkd, stride_mvm, stride_mvd,
                                       start, M_MEM, qk_scale, HEAD_DIM, BLOCK_MEM, True, DTYPE, DOT_FP32)
    # Full blocks of image keys without masks, then the partial last one with masks.
    n_full = (N_CTX // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, start,
                                       N_CTX, qk_scale, HEAD_DIM, BLOCK_N, False, DTYPE, DOT_FP32)
    if n_full < N_CTX:
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, n_full,
                                       N_CTX, qk_scale, HEAD_DIM, BLOCK_N, True, DTYPE, DOT_FP32)

    acc = acc / l_i[:, None]
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=row_valid)
    tl.store(OUT + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, acc.to(OUT.dtype.element_ty),
             mask=row_valid[:, None])


@triton.jit
def _dkdv_step(
    dk, dv, k, v,  # fp32 accumulators (BLOCK_N, HEAD_DIM); this program's key and value tiles (dot operands)
    Q, GRAD_OUT, LSE, DELTA,  # this (batch, head)'s base pointers
    stride_qn, stride_qd, stride_gn, stride_gd,  # strides of Q and GRAD_OUT along positions and head dim
    start_m, N_CTX, qk_scale,  # first query of this step; N; d^-0.5 * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK_QUERIES: tl.constexpr,  # whether this block of queries may run past N
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # q is read transposed, (HEAD_DIM, BLOCK_M): the scores are computed transposed, keys along rows, so that the
    # program's keys are the left operand of both dots and the gradients accumulate along the keys.
    q_ptrs = Q + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qn
    g_ptrs = GRAD_OUT + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd
    if MASK_QUERIES:
        valid = offs_m < N_CTX
        qT = tl.load(q_ptrs, mask=valid[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=valid[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=valid, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=valid, other=0.0)
    else:
        qT = tl.load(q_ptrs)
        g = tl.load(g_ptrs)
        lse = tl.load(LSE + offs_m)
        delta = tl.load(DELTA + offs_m)
    qT = _operand(qT, DTYPE, DOT_FP32)
    g = _operand(g, DTYPE, DOT_FP32)
    pT = tl.math.exp2(tl.dot(k, qT, input_precision="tf32") * qk_scale - lse[None, :])
    if MASK_QUERIES:
        pT = tl.where(valid[None, :], pT, 0.0)
    dv = tl.dot(_operand(pT, DTYPE, DOT_FP32), g, dv, input_precision="tf32")
    dpT = tl.dot(v, tl.trans(g), input_precision="tf32")
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(_operand(dsT, DTYPE, DOT_FP32), tl.trans(qT), dk, input_precision="tf32")
    return dk, dv


@triton.jit
def _dkdv_program(
    pid,  # this program's index among the dk/dv programs
    Q, K, V, GRAD_OUT, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    HEADS, N_CTX, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """dk, dv of BLOCK_N image keys of one (batch, head), looping over all its queries."""
    pid_n, pid_bh = _program_block(pid, N_CTX, BLOCK_N)
    off_b = (pid_bh // HEADS).to(tl.int64)
    off_h = (pid_bh % HEADS).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    GRAD_OUT += off_b * stride_gb + off_h * stride_gh
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    LSE += pid_bh.to(tl.int64) * N_CTX
    DELTA += pid_bh.to(tl.int64) * N_CTX

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_valid = offs_n < N_CTX
    # Keys past N load as zeros: their scores are finite and their gradients are never stored.
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=key_valid[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=key_valid[:, None], other=0.0)
    k = _operand(k, DTYPE, DOT_FP32)
    v = _operand(v, DTYPE, DOT_FP32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    m_full = (N_CTX // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, stride_qn, stride_qd, stride_gn, stride_gd, start_m,
                            N_CTX, qk_scale, HEAD_DIM, BLOCK_M, False, DTYPE, DOT_FP32)
    if m_full < N_CTX:
        dk, dv = _dkdv_step(dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, stride_qn, stride_qd, stride_gn, stride_gd, m_full,
                            N_CTX, qk_scale, HEAD_DIM, BLOCK_M, True, DTYPE, DOT_FP32)
    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=key_valid[:, None])
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=key_valid[:, None])


@triton.jit
def _memory_reduce_program(
    pid,  # this program's index among the reduction programs: (head, memory block, k or v), v fastest
    DMEM_PARTIAL,  # (B * heads * n_query_blocks, 2, M, HEAD_DIM) fp32, contiguous: see the dq kernel
    DMEM_K, DMEM_V,  # (heads, M, HEAD_DIM) gradients of the memory slots, in their own dtype
    stride_dmh, stride_dmm, stride_dmd,  # strides of DMEM_K and DMEM_V (the same)
    BATCH, HEADS, M_MEM, N_QUERY_BLOCKS, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_MEM: tl.constexpr,
):
    """Sum of the per-query-block partial gradients of BLOCK_MEM memory slots over the batch and the query blocks,
    in a fixed order (deterministic, no atomics), stored in the slots' dtype: the torch sum and cast it replaces
    were two more kernels."""
    is_value = pid % 2
    slot_block = (pid // 2) % tl.cdiv(M_MEM, BLOCK_MEM)
    head = pid // 2 // tl.cdiv(M_MEM, BLOCK_MEM)
    offs_s = slot_block * BLOCK_MEM + tl.arange(0, BLOCK_MEM)
    offs_d = tl.arange(0, HEAD_DIM)
    slot_valid = offs_s < M_MEM
    tile = is_value * M_MEM * HEAD_DIM + offs_s[:, None] * HEAD_DIM + offs_d[None, :]
    acc = tl.zeros([BLOCK_MEM, HEAD_DIM], dtype=tl.float32)
    part_stride = 2 * M_MEM * HEAD_DIM
    for b in range(0, BATCH):
        base = DMEM_PARTIAL + ((b * HEADS + head) * N_QUERY_BLOCKS).to(tl.int64) * part_stride
        for query_block in range(0, N_QUERY_BLOCKS):
            acc += tl.load(base + query_block * part_stride + tile, mask=slot_valid[:, None], other=0.0)
    out = head.to(tl.int64) * stride_dmh + offs_s[:, None] * stride_dmm + offs_d[None, :] * stride_dmd
    if is_value == 1:
        tl.store(DMEM_V + out, acc.to(DMEM_V.dtype.element_ty), mask=slot_valid[:, None])
    else:
        tl.store(DMEM_K + out, (acc * sm_scale).to(DMEM_K.dtype.element_ty), mask=slot_valid[:, None])


@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V,  # (B, heads, N, HEAD_DIM) forward inputs, one dtype, any strides
    GRAD_OUT,  # (B, heads, N, HEAD_DIM) gradient of the output, Q's dtype, any strides
    LSE, DELTA,  # (B, heads, N) fp32, contiguous: forward base-2 logsumexp; rowsum(p * dp) / rowsum(p) (dq kernel)
    DK, DV,  # (B, heads, N, HEAD_DIM) gradients of K and V, Q's dtype
    DMEM_PARTIAL,  # (B * heads * N_QUERY_BLOCKS, 2, M, HEAD_DIM) fp32: memory-slot partials of the dq kernel
    DMEM_K, DMEM_V,  # (heads, M, HEAD_DIM) gradients of the memory slots, in the slots' dtype
    stride_qb, stride_qh, stride_qn, stride_qd,  # strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # strides of V
    stride_gb, stride_gh, stride_gn, stride_gd,  # strides of GRAD_OUT
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # strides of DK
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,  # strides of DV
    stride_dmh, stride_dmm, stride_dmd,  # strides of DMEM_K and DMEM_V
    BATCH,  # B
    HEADS,  # number of heads (the grid runs batch * HEADS + head major, see _program_block)
    N_CTX,  # N
    M_MEM,  # M (may be 0: no reduction programs)
    N_QUERY_BLOCKS,  # query blocks of the dq kernel per (batch, head)
    N_REDUCE,  # reduction programs: 2 * heads * cdiv(M, BLOCK_MEM), the first ones of the grid
    qk_scale,  # softmax scale (d^-0.5) * log2(e)
    sm_scale,  # softmax scale, d^-0.5
    HEAD_DIM: tl.constexpr,  # d, one of HEAD_DIMS
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # image keys per program
    BLOCK_MEM: tl.constexpr,  # memory slots per reduction program
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (interpreter only)
):
    """The last backward launch: the N_REDUCE memory-slot reductions first (each loops over B * N_QUERY_BLOCKS
    partials, the longest programs, so they start in the first wave), then one dk/dv program per BLOCK_N keys of
    each (batch, head). One launch instead of three (dk/dv, a torch sum, a cast)."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid = tl.program_id(0)
    if pid < N_REDUCE:
        _memory_reduce_program(pid, DMEM_PARTIAL, DMEM_K, DMEM_V, stride_dmh, stride_dmm, stride_dmd, BATCH, HEADS,
                               M_MEM, N_QUERY_BLOCKS, sm_scale, HEAD_DIM, BLOCK_MEM)
    else:
        _dkdv_program(pid - N_REDUCE, Q, K, V, GRAD_OUT, LSE, DELTA, DK, DV,
                      stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd, stride_gb, stride_gh, stride_gn, stride_gd,
                      stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                      HEADS, N_CTX, qk_scale, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, DTYPE, DOT_FP32)


@triton.jit
def _weights_block(
    q, g, lse,  # q, grad-out tiles (BLOCK_M, HEAD_DIM) (dot operands); row base-2 logsumexp (BLOCK_M,)
    K, V,  # key/value base pointers of this (batch, head), or of this head's memory slots
    stride_kn, stride_kd, stride_vn, stride_vd,  # their strides along positions and head dim
    start, n_keys, qk_scale,  # first key of this block; number of keys behind K/V; d^-0.5 * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # whether this block may run past n_keys
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """p (the softmax weights) and dp = dO v^T of one block of keys, (BLOCK_M, BLOCK_N) fp32, zero past n_keys,
    and the block's k^T (HEAD_DIM, BLOCK_N) dot operand. The dq kernel's delta pass and its dq pass both take them
    from here, so delta is formed from the very p and dp that dS is (see _attention_backward_dq_kernel)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = K + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_ptrs = V + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn
    if MASK_KEYS:
        valid = offs_n < n_keys
        kT = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        vT = tl.load(v_ptrs, mask=valid[None, :], other=0.0)
    else:
        kT = tl.load(k_ptrs)
        vT = tl.load(v_ptrs)
    kT = _operand(kT, DTYPE, DOT_FP32)
    vT = _operand(vT, DTYPE, DOT_FP32)
    p = tl.math.exp2(tl.dot(q, kT, input_precision="tf32") * qk_scale - lse[:, None])
    if MASK_KEYS:
        p = tl.where(valid[None, :], p, 0.0)
    dp = tl.dot(g, vT, input_precision="tf32")
    return p, dp, kT


@triton.jit
def _dq_block(
    dq, q, g, lse, delta,  # fp32 accumulator (BLOCK_M, HEAD_DIM); q, grad-out tiles (dot operands); row stats
    K, V, stride_kn, stride_kd, stride_vn, stride_vd, start, n_keys, qk_scale,  # as _weights_block's
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, DTYPE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """dq += dS K for one block of keys; also returns p and dS (BLOCK_M, BLOCK_N), which the memory slots use."""
    p, dp, kT = _weights_block(q, g, lse, K, V, stride_kn, stride_kd, stride_vn, stride_vd, start, n_keys, qk_scale,
                               HEAD_DIM, BLOCK_N, MASK_KEYS, DTYPE, DOT_FP32)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(_operand(ds, DTYPE, DOT_FP32), tl.trans(kT), dq, input_precision="tf32")
    return dq, p, ds


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V,  # (B, heads, N, HEAD_DIM) forward inputs, one dtype, any strides
    MEM_K, MEM_V,  # (heads, M, HEAD_DIM) memory slots, any float dtype (cast to Q's on load)
    GRAD_OUT,  # (B, heads, N, HEAD_DIM) gradient of the output, Q's dtype, any strides
    LSE,  # (B, heads, N) fp32, contiguous: forward base-2 logsumexp
    DELTA,  # out: (B, heads, N) fp32, contiguous: rowsum(p * dp) / rowsum(p) (see below), for dk/dv
    DQ,  # out: (B, heads, N, HEAD_DIM) gradient of Q, Q's dtype
    DMEM_PARTIAL,  # out: (B * heads * cdiv(N, BLOCK_M), 2, M, HEAD_DIM) fp32 contiguous: this query block's share
                   # of d mem_k / d^-0.5 ([.., 0, ..]) and d mem_v ([.., 1, ..])
    stride_qb, stride_qh, stride_qn, stride_qd,  # strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # strides of V
    stride_mkh, stride_mkm, stride_mkd,  # strides of MEM_K
    stride_mvh, stride_mvm, stride_mvd,  # strides of MEM_V
    stride_gb, stride_gh, stride_gn, stride_gd,  # strides of GRAD_OUT
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,  # strides of DQ
    HEADS,  # number of heads (the grid runs batch * HEADS + head major, see _program_block)
    N_CTX,  # N
    M_MEM,  # M (may be 0)
    qk_scale,  # softmax scale (d^-0.5) * log2(e)
    sm_scale,  # softmax scale, d^-0.5
    HEAD_DIM: tl.constexpr,  # d, one of HEAD_DIMS
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # image keys per inner step
    BLOCK_MEM: tl.constexpr,  # memory slots per inner step
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (interpreter only)
):
    """The first backward launch: per block of queries, a first pass over the memory slots and image keys for
    delta = rowsum(p * dp) / rowsum(p) (FlashAttention's preprocess, here with no launch of its own: this program
    holds the rows; see below for why not rowsum(dO * O)), then dq over the memory slots and the image keys, and
    this block's partial gradients of the memory slots (p^T dO and dS^T q, from the p and dS dq needs anyway)."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_m, pid_bh = _program_block(tl.program_id(0), N_CTX, BLOCK_M)
    off_b = (pid_bh // HEADS).to(tl.int64)
    off_h = (pid_bh % HEADS).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    GRAD_OUT += off_b * stride_gb + off_h * stride_gh
    DQ += off_b * stride_dqb + off_h * stride_dqh
    MEM_K += off_h * stride_mkh
    MEM_V += off_h * stride_mvh
    LSE += pid_bh.to(tl.int64) * N_CTX
    DELTA += pid_bh.to(tl.int64) * N_CTX

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < N_CTX
    # Rows past N load as zeros: their results are finite and never stored, and (g = 0, so dp = 0 and delta = 0)
    # their p^T g and dS^T q are zero, so they add nothing to the memory-slot partials.
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_valid[:, None], other=0.0)
    g = tl.load(GRAD_OUT + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd, mask=row_valid[:, None],
                other=0.0)
    q = _operand(q, DTYPE, DOT_FP32)
    g = _operand(g, DTYPE, DOT_FP32)
    lse = tl.load(LSE + offs_m, mask=row_valid, other=0.0)
    n_full = (N_CTX // BLOCK_N) * BLOCK_N

    # delta = rowsum(p * dp) / rowsum(p) makes every row's dS = p (dp - delta) sum to zero up to fp32 rounding:
    # - FlashAttention's rowsum(dO * O) equals it only in exact arithmetic: O went through p rounded to the 16-bit
    #   dtype for the PV dot and was stored in it, and where the softmax is sharp (one weight near 1, dp of the
    #   order of |dO| |v|) those roundings left 0.1-0.3 of error in dq, against the 0.005 of PyTorch's own bf16
    #   attention (tests/test_edges.py);
    # - dividing by rowsum(p) takes out the error common to a row's p: lse is rounded in fp32 at the magnitude of
    #   the largest logit, so with logits of ~1e3 rowsum(p) is 1 only to ~1e-4.
    # The image keys' products accumulate per lane, (BLOCK_M, BLOCK_N), and are reduced across lanes once: a row
    # reduction per block would add shuffles to every step of the pass.
    pdp = tl.zeros([BLOCK_M], dtype=tl.float32)
    psum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, M_MEM, BLOCK_MEM):
        p, dp, _ = _weights_block(q, g, lse, MEM_K, MEM_V, stride_mkm, stride_mkd, stride_mvm, stride_mvd, start,
                                  M_MEM, qk_scale, HEAD_DIM, BLOCK_MEM, True, DTYPE, DOT_FP32)
        pdp += tl.sum(p * dp, 1)
        psum += tl.sum(p, 1)
    pdp_lanes = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    psum_lanes = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_full, BLOCK_N):
        p, dp, _ = _weights_block(q, g, lse, K, V, stride_kn, stride_kd, stride_vn, stride_vd, start, N_CTX,
                                  qk_scale, HEAD_DIM, BLOCK_N, False, DTYPE, DOT_FP32)
        pdp_lanes += p * dp
        psum_lanes += p
    if n_full < N_CTX:
        p, dp, _ = _weights_block(q, g, lse, K, V, stride_kn, stride_kd, stride_vn, stride_vd, n_full, N_CTX,
                                  qk_scale, HEAD_DIM, BLOCK_N, True, DTYPE, DOT_FP32)
        pdp_lanes += p * dp
        psum_lanes += p
    # rowsum(p) >= 1 up to rounding: the largest logit's p is 1 (rows past N: q = 0, every valid key's p is 1).
    delta = (pdp + tl.sum(pdp_lanes, 1)) / (psum + tl.sum(psum_lanes, 1))
    tl.store(DELTA + offs_m, delta, mask=row_valid)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # int64: B * heads * cdiv(N, BLOCK_M) * 2 * M * d passes 2**31 for large batches at high resolution.
    partial = DMEM_PARTIAL + tl.program_id(0).to(tl.int64) * 2 * M_MEM * HEAD_DIM
    for start in range(0, M_MEM, BLOCK_MEM):
        dq, p, ds = _dq_block(dq, q, g, lse, delta, MEM_K, MEM_V, stride_mkm, stride_mkd, stride_mvm, stride_mvd,
                              start, M_MEM, qk_scale, HEAD_DIM, BLOCK_MEM, True, DTYPE, DOT_FP32)
        # (BLOCK_MEM, HEAD_DIM) shares of this query block; slots past M are zero and not stored.
        dmem_v = tl.dot(tl.trans(_operand(p, DTYPE, DOT_FP32)), g, input_precision="tf32")
        dmem_k = tl.dot(tl.trans(_operand(ds, DTYPE, DOT_FP32)), q, input_precision="tf32")
        offs_s = start + tl.arange(0, BLOCK_MEM)
        tile = offs_s[:, None] * HEAD_DIM + offs_d[None, :]
        slot_valid = offs_s[:, None] < M_MEM
        tl.store(partial + tile, dmem_k, mask=slot_valid)
        tl.store(partial + M_MEM * HEAD_DIM + tile, dmem_v, mask=slot_valid)
    for start in range(0, n_full, BLOCK_N):
        dq, p, ds = _dq_block(dq, q, g, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, start, N_CTX,
                              qk_scale, HEAD_DIM, BLOCK_N, False, DTYPE, DOT_FP32)
    if n_full < N_CTX:
        dq, p, ds = _dq_block(dq, q, g, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, n_full, N_CTX,
                              qk_scale, HEAD_DIM, BLOCK_N, True, DTYPE, DOT_FP32)
    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_valid[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------

# One configuration per (GPU architecture, kernel, dot precision, head dim), chosen ahead of time so that the tests
# compile every one of them (gpu_compile_configs) for its architecture and check shared memory, tensor cores and
# register spills, with triton 3.6 (the GPU machines') and 3.8 alike. Each is compiled twice: without alignment
# hints (a launch with N not a multiple of 16: loads are not vectorized, every element of a tile keeps its own
# 64-bit address, the worst case for registers) and with the 16-divisibility Triton specializes for the Unet's
# shapes (H*W a multiple of 16 from 4x4 up, see _divisibility), which vectorizes the loads, pipelines them through
# cp.async and needs far fewer registers. "16": fp16/bf16 dots; "tf32": fp32 inputs (TF32 dots, see the module doc).
# Values: (BLOCK_M, BLOCK_N, num_warps, num_stages); for "dkdv" BLOCK_M is the query step and BLOCK_N the keys of
# one program (whose launch also runs the memory-slot reductions, see _attention_backward_dkdv_kernel).
# _table_arch picks the table: sm_90's (wgmma, 228 KiB of shared memory) on Hopper and datacenter Blackwell,
# sm_80's (mma.sync) elsewhere.
# - d <= 32, 16-bit (the Unet's attention, the performance target): FlashAttention-2 shapes with 16 query (or key)
#   rows per warp, 8 warps for 128-row tiles (wgmma: two warpgroups of 64 rows), so that two or three programs
#   share an SM. Registers of the bf16 d=32 builds, aligned / unaligned, triton 3.8 (3.6 within a few, except sm_80
#   dk/dv unaligned 254 and dq unaligned 170); programs per SM that the registers allow, aligned:
#     sm_90: forward 128 queries x 64 keys, 3 stages, 90/128 (2 x 8 warps); dk/dv 128 keys x 32-query steps,
#            119/108 (2 x 8 warps); dq 128 queries x 32 keys, 74/95 (3 x 8 warps).
#     sm_80: forward 128 x 32, 102/127 (2 x 8 warps; 128 x 64 took 140/175, one program); dk/dv 64 keys x
#            32 queries on 4 warps, 164/242 (3 x 4 warps); dq 128 x 32, 124/158 (2 x 8 warps).
#   The former forward, 128 x 64 on 4 warps, took 255 registers unaligned (spilling 4 bytes on sm_80 with 3.6),
#   170/218 aligned on sm_90/sm_80: two 4-warp programs per SM; the former dk/dv (64 x 128 keys, 8 warps) 162 to
#   255: one program.
# - Larger head dims and fp32 (TF32 operands are twice the size of 16-bit ones): on sm_80, mma.sync keeps the
#   loop-invariant left operand of the dots (q in the forward and dq, k and v in dk/dv) and the whole right operand
#   of each step in registers, so tiles shrink as d grows; at d=128 the backward takes 16x16 tiles. sm_90's wgmma
#   reads its right operand from shared memory, so larger tiles fit there (16-bit dk/dv 64 keys, dq 128 queries at
#   d=128). The memory-slot kernel runs 8 warps: with 4, its unaligned q and grad-out tiles spilled at d=128.
# - fp32 at d=128 on sm_80 spills unaligned with every tile tried (forward 28/52 bytes with triton 3.8/3.6, dk/dv
#   16/48, dq 52/76), not aligned: SPILLS_ALLOWED[80] lists exactly those three, exempt from the spill check.
# - fp32 dq at d=128 on sm_90: since the dq kernel also forms the memory-slot partials (p^T dO, dS^T q: q and dO
#   again as transposed wgmma operands), 128 x 16 tiles need 286720 bytes of shared memory (over the 232448) and
#   spill 4 bytes; 64 x 16 spill 56 (4 warps: 228), 32 x 16 on 4 warps 1180; 16 x 16 on 8 warps (sm_80's tile)
#   fit in 49152 bytes and spill 68 (triton 3.8), listed in SPILLS_ALLOWED[90]. fp32 at d=128 is neither the
#   Unet's head dim nor its training precision under autocast.
# - fp32 dq at d=64 on sm_80: with the memory-slot partials, 128 x 16 needed 147456 bytes of shared memory (over
#   the 99 KB of sm_86/89/120); 64 x 16 take 73728 and 252 registers without spills.
_SM80_CONFIGS = {
    "forward": {
        "16": {16: (128, 64, 8, 3), 32: (128, 32, 8, 3), 64: (128, 32, 8, 3), 128: (128, 16, 8, 2)},
        "tf32": {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 32, 8, 2), 128: (128, 16, 8, 1)},
    },
    "dkdv": {
        "16": {16: (32, 64, 4, 3), 32: (32, 64, 4, 3), 64: (16, 128, 8, 2), 128: (16, 16, 8, 1)},
        "tf32": {16: (64, 64, 8, 2), 32: (32, 64, 8, 2), 64: (16, 32, 8, 1), 128: (16, 16, 8, 1)},
    },
    "dq": {
        "16": {16: (128, 32, 8, 3), 32: (128, 32, 8, 3), 64: (128, 32, 8, 2), 128: (16, 16, 8, 1)},
        "tf32": {16: (64, 64, 8, 2), 32: (64, 32, 8, 2), 64: (64, 16, 8, 1), 128: (16, 16, 8, 1)},
    },
}
_SM90_CONFIGS = {
    "forward": {
        "16": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 2)},
        "tf32": {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 32, 8, 2), 128: (128, 16, 8, 1)},
    },
    "dkdv": {
        "16": {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (16, 128, 8, 2), 128: (16, 64, 8, 2)},
        "tf32": {16: (64, 64, 8, 2), 32: (32, 64, 8, 2), 64: (16, 64, 8, 1), 128: (16, 16, 8, 1)},
    },
    "dq": {
        "16": {16: (128, 32, 8, 3), 32: (128, 32, 8, 3), 64: (128, 32, 8, 2), 128: (128, 16, 8, 2)},
        "tf32": {16: (64, 64, 8, 2), 32: (64, 64, 8, 2), 64: (128, 16, 8, 1), 128: (16, 16, 8, 1)},
    },
}
_GPU_CONFIGS = {80: _SM80_CONFIGS, 90: _SM90_CONFIGS}
# Per table, (kernel, dot precision, head dim, aligned) whose build spills registers (see above): fp32 at d=128
# with N not a multiple of 16. The tests exempt exactly these, and fail if one stops spilling.
SPILLS_ALLOWED = {80: {("forward", "tf32", 128, False), ("dkdv", "tf32", 128, False), ("dq", "tf32", 128, False)},
                  90: {("dq", "tf32", 128, False)}}
# The interpreter runs one configuration; its cost is per program and per operation, so tiles are large. 32x32
# still takes several query blocks and a masked last key block at the test shapes (N = 35, 64, 100).
_INTERPRETER_CONFIG = (32, 32, 1, 1)


def _dot_precision(dtype):
    """How dots of this input dtype run: "16" (fp16/bf16 operands) or "tf32" (fp32 operands, see the module doc)."""
    return "tf32" if dtype == torch.float32 else "16"


# Largest shared memory per block (opt-in), bytes, of the architectures the tables are checked for, as
# torch.cuda.get_device_properties(...).shared_memory_per_block_optin reports it (tests/gpu_compile.py checks every
# build against the same numbers); other architectures are read from the device.
SHARED_MEMORY_OPTIN = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# The sm_90 table is compiled against H100's 232448 bytes (its largest build, fp16/bf16 dq at d=128, takes 155648).
SM90_TABLE_SHARED_MEMORY = 232448


def _table_arch(arch, shared_memory=None):
    """The configuration table for compute capability `arch` (80, 86, 89, 90, 100, 120, ...) with `shared_memory`
    bytes per block (default: SHARED_MEMORY_OPTIN's): sm_90's for Hopper-class parts (wgmma, the full 228 KiB of
    shared memory, as on the datacenter Blackwells), sm_80's for the others, e.g. the 99 KB of sm_86, sm_89 and
    sm_120, which the sm_80 table fits (the tests check it) and the sm_90 one does not."""
    if shared_memory is None:
        shared_memory = SHARED_MEMORY_OPTIN.get(arch, 0)
    return 90 if arch >= 90 and shared_memory >= SM90_TABLE_SHARED_MEMORY else 80


@functools.lru_cache(maxsize=None)
def _device_table(index):
    """The table of CUDA device `index`, from its compute capability and shared memory per block."""
    properties = torch.cuda.get_device_properties(index)
    arch = 10 * properties.major + properties.minor
    shared_memory = getattr(properties, "shared_memory_per_block_optin", SHARED_MEMORY_OPTIN.get(arch, 0))
    return _GPU_CONFIGS[_table_arch(arch, shared_memory)]


def _config(kernel, dtype, head_dim, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernel` for inputs of `dtype` and head dim `head_dim` on
    `device`."""
    if INTERPRETING:
        return _INTERPRETER_CONFIG
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_table(index)[kernel][_dot_precision(dtype)][head_dim]


# A small autotune space on Hopper-class GPUs (the sm_90 table), 16-bit inputs at the Unet's head dims: the table's
# entry first (used until the timing ran, and whenever timing is impossible), then FlashAttention-3-like
# candidates, BLOCK_N 128 for the forward and 64-query steps for dk/dv. Compiled for sm_90 without spills
# (triton 3.8, aligned, fp32 slots): forward 128x128 3 stages 156 registers, 2 stages 155; dk/dv 64x128 2 stages
# 167, 3 stages 170 (one 8-warp program an SM, against two for the table's), so which wins depends on N and is
# measured. Every candidate is in gpu_compile_configs.
_SM90_CANDIDATES = {
    ("forward", "16", 16): [(128, 128, 8, 2)], ("forward", "16", 32): [(128, 128, 8, 2)],
    ("dkdv", "16", 16): [(64, 128, 8, 2)], ("dkdv", "16", 32): [(64, 128, 8, 2)],
}


def _candidates(table_arch, kernel, dtype, head_dim):
    """Every (BLOCK_M, BLOCK_N, num_warps, num_stages) the tuner may pick, the table's first."""
    table = _GPU_CONFIGS[table_arch]
    first = table[kernel][_dot_precision(dtype)][head_dim]
    extra = _SM90_CANDIDATES.get((kernel, _dot_precision(dtype), head_dim), []) if table_arch == 90 else []
    return [first] + extra


def _tuned_config(kernel, dtype, head_dim, n, device, launch):
    """The configuration of `kernel` for this launch: under the interpreter the one fixed config; on the GPU the
    table's, or, where _SM90_CANDIDATES lists more, the fastest of them for (device, dtype, head dim, N rounded up
    to a power of two), timed once by running `launch(config)` (kernels/tuning.py; the kernels only write their
    outputs, so reruns are harmless). While a CUDA graph is captured or torch.compile traces, an untimed key takes
    the table's entry, and under torch.use_deterministic_algorithms(True) every key does (the candidates' results
    differ in their last bits)."""
    if INTERPRETING:
        return _INTERPRETER_CONFIG
    index = device.index if device.index is not None else torch.cuda.current_device()
    table_arch = 90 if _device_table(index) is _SM90_CONFIGS else 80
    candidates = _candidates(table_arch, kernel, dtype, head_dim)
    # The tiles sum the softmax and the gradients in other orders: results agree to rounding, not bitwise.
    return tuning.fastest(("attention", kernel, index, dtype, head_dim, triton.next_power_of_2(n)), candidates,
                          launch, same_bits=False)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _empty_like_output(q, dtype=None):
    """(B, heads, N, d) tensor with the memory of a contiguous (B, heads, d, N) one: the layout to_out reads."""
    batch, heads, n, d = q.shape
    return torch.empty_strided((batch, heads, n, d), (heads * d * n, d * n, 1, n), dtype=dtype or q.dtype,
                               device=q.device)


def _standin(mem, like):
    # With no memory slots nothing is read from or written to them; an empty tensor may have no valid data
    # pointer, so the kernels get a (heads, N, d) slice of a non-empty one (never dereferenced since M = 0).
    return mem if mem.shape[1] > 0 else like[0]


def _grid(n_items, block, batch_heads, extra=0):
    """The one-axis grid of a kernel with cdiv(n_items, block) programs per (batch, head) (see _program_block),
    after `extra` programs of another kind."""
    programs = triton.cdiv(n_items, block) * batch_heads + extra
    if programs > MAX_PROGRAMS:
        raise ValueError(f"attention: {programs} programs exceed the {MAX_PROGRAMS} of a CUDA grid axis")
    return (programs,)


def _forward(q, k, v, mem_k, mem_v, scale, out):
    """Writes the attention into `out` (B, heads, N, d), any strides; returns lse (B, heads, N) fp32."""
    batch, heads, n, d = q.shape
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return lse
    m = mem_k.shape[1]
    mem_k, mem_v = _standin(mem_k, k), _standin(mem_v, v)

    def launch(tiles):
        block_m, block_n, num_warps, num_stages = tiles
        _attention_forward_kernel[_grid(n, block_m, batch * heads)](
            q, k, v, mem_k, mem_v, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *mem_k.stride(), *mem_v.stride(), *out.stride(),
            heads, n, m, scale * LOG2E,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_MEM=BLOCK_MEM, DOT_FP32=INTERPRETING,
            num_warps=num_warps, num_stages=num_stages,
        )

    launch(_tuned_config("forward", q.dtype, d, n, q.device, launch))
    return lse


def _backward(grad_out, q, k, v, mem_k, mem_v, lse, scale, dq, dk, dv, dmem_k, dmem_v):
    """Writes the gradients into dq, dk, dv (B, heads, N, d) and dmem_k, dmem_v (heads, M, d) (any strides, the
    latter two the same ones), in two launches and no other kernel: the dq kernel (with delta and the memory-slot
    partials), then the dk/dv kernel (with the memory-slot reductions)."""
    batch, heads, n, d = q.shape
    m = mem_k.shape[1]
    if q.numel() == 0:
        dmem_k.zero_()  # no queries: the memory slots get no gradient
        dmem_v.zero_()
        return
    grad_out = grad_out.to(q.dtype)
    scales = (scale * LOG2E, scale)
    delta = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    block_m, block_n, num_warps, num_stages = _config("dq", q.dtype, d, q.device)
    query_blocks = triton.cdiv(n, block_m)
    # Every element written by exactly one dq program, read by one reduction program: no zero-fill.
    dmem_partial = torch.empty((batch * heads * query_blocks, 2, m, d), dtype=torch.float32, device=q.device)
    mem_k_in, mem_v_in = _standin(mem_k, k), _standin(mem_v, v)
    _attention_backward_dq_kernel[_grid(n, block_m, batch * heads)](
        q, k, v, mem_k_in, mem_v_in, grad_out, lse, delta, dq, dmem_partial if m > 0 else lse,
        *q.stride(), *k.stride(), *v.stride(), *mem_k_in.stride(), *mem_v_in.stride(), *grad_out.stride(),
        *dq.stride(), heads, n, m, *scales,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_MEM=BLOCK_MEM, DOT_FP32=INTERPRETING,
        num_warps=num_warps, num_stages=num_stages,
    )
    n_reduce = 2 * heads * triton.cdiv(m, BLOCK_MEM)
    dmem_k_out, dmem_v_out = _standin(dmem_k, dk), _standin(dmem_v, dv)

    def launch(tiles):
        block_m, block_n, num_warps, num_stages = tiles
        _attention_backward_dkdv_kernel[_grid(n, block_n, batch * heads, n_reduce)](
            q, k, v, grad_out, lse, delta, dk, dv, dmem_partial if m > 0 else lse, dmem_k_out, dmem_v_out,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            *dmem_k_out.stride(), batch, heads, n, m, query_blocks, n_reduce, *scales,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_MEM=BLOCK_MEM, DOT_FP32=INTERPRETING,
            num_warps=num_warps, num_stages=num_stages,
        )

    launch(_tuned_config("dkdv", q.dtype, d, n, q.device, launch))


def _qkv_views(qkv, heads):
    """q, k, v (B, heads, N, d) views of a (B, 3*heads*d, H, W) tensor, positions along N (a copy only for strides
    that cannot merge H and W)."""
    batch, channels = qkv.shape[:2]
    d = channels // (3 * heads)
    return qkv.flatten(2).unflatten(1, (3, heads, d)).transpose(-1, -2).unbind(1)


def _image_view(image, heads):
    """(B, heads, N, d) view of a (B, heads*d, H, W) tensor (the output and its gradient)."""
    return image.flatten(2).unflatten(1, (heads, -1)).transpose(-1, -2)


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (autograd, opcheck and torch.compile see them as opaque operators)
# ----------------------------------------------------------------------------------------------------------------


def _check_head_dim(where, d):
    if d not in HEAD_DIMS:
        raise ValueError(f"{where}: the kernels take head dims {HEAD_DIMS}, got {d} "
                         "(fastunet.kernels.attention.attention pads other head dims up to 128)")


@torch.library.custom_op("fastunet::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel. q, k, v (B, heads, N, d) one float dtype, any strides, d in HEAD_DIMS; mem_k, mem_v
    (heads, M, d) any float dtype; scale: the softmax scale (d^-0.5 of the unpadded head dim).

    Returns out (B, heads, N, d) in q.dtype with strides (heads*d*N, d*N, 1, N), and lse (B, heads, N) fp32
    contiguous, the base-2 logsumexp of each query row's scores times scale * log2(e).
    """
    _check_head_dim("attention_forward", q.shape[-1])
    out = _empty_like_output(q)
    return out, _forward(q, k, v, mem_k, mem_v, scale, out)


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, mem_k, mem_v, scale):
    return _empty_like_output(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastunet::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mem_k: torch.Tensor, mem_v: torch.Tensor, lse: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels. grad_out (B, heads, N, d) any strides; the rest as attention_forward's inputs and its lse
    (the output itself is not needed: see the dq kernel's delta).

    Returns dq, dk, dv (B, heads, N, d) in q.dtype with strides (heads*d*N, d*N, 1, N), and d mem_k, d mem_v
    (heads, M, d) contiguous in the dtypes of mem_k and mem_v.
    """
    _check_head_dim("attention_backward", q.shape[-1])
    dq, dk, dv = _empty_like_output(q), _empty_like_output(q), _empty_like_output(q)
    dmem_k = torch.empty(mem_k.shape, dtype=mem_k.dtype, device=mem_k.device)
    dmem_v = torch.empty(mem_v.shape, dtype=mem_v.dtype, device=mem_v.device)
    _backward(grad_out, q, k, v, mem_k, mem_v, lse, scale, dq, dk, dv, dmem_k, dmem_v)
    return dq, dk, dv, dmem_k, dmem_v


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, mem_k, mem_v, lse, scale):
    return (_empty_like_output(q), _empty_like_output(q), _empty_like_output(q), mem_k.new_empty(mem_k.shape),
            mem_v.new_empty(mem_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, mem_k, mem_v, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    # No zero tensor for lse's (absent) gradient: that would be one more kernel per backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, mem_k, mem_v, lse)
    ctx.scale = scale


def _backward_rule(ctx, grad_out, grad_lse):
    if grad_out is None:
        return None, None, None, None, None, None
    q, k, v, mem_k, mem_v, lse = ctx.saved_tensors
    grads = torch.ops.fastunet.attention_backward(grad_out, q, k, v, mem_k, mem_v, lse, ctx.scale)
    return (*grads, None)


attention_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def _packed_shapes(qkv, mem_kv, heads):
    batch, channels, height, width = qkv.shape
    return (batch, channels // 3, height, width)


@torch.library.custom_op("fastunet::packed_attention_forward", mutates_args=())
def packed_attention_forward(qkv: torch.Tensor, mem_kv: torch.Tensor, heads: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel on the to_qkv output. qkv (B, 3*heads*d, H, W) one float dtype, any strides, d in HEAD_DIMS;
    mem_kv (2, heads, M, d) any float dtype. Returns out (B, heads*d, H, W) in qkv.dtype and layout (to_out's
    input, see empty_output) and lse (B, heads, H*W) fp32 (see attention_forward)."""
    q, k, v = _qkv_views(qkv, heads)
    _check_head_dim("packed_attention_forward", q.shape[-1])
    out = empty_output(qkv, shape=_packed_shapes(qkv, mem_kv, heads))
    return out, _forward(q, k, v, mem_kv[0], mem_kv[1], scale, _image_view(out, heads))


@packed_attention_forward.register_fake
def _packed_attention_forward_fake(qkv, mem_kv, heads, scale):
    batch, _, height, width = qkv.shape
    return (empty_output(qkv, shape=_packed_shapes(qkv, mem_kv, heads)),
            qkv.new_empty((batch, heads, height * width), dtype=torch.float32))


@torch.library.custom_op("fastunet::packed_attention_backward", mutates_args=())
def packed_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, mem_kv: torch.Tensor,
                              lse: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward kernels on the to_qkv output. grad_out (B, heads*d, H, W) any strides. Returns d qkv
    (B, 3*heads*d, H, W) in qkv.dtype and layout (empty_output), one tensor (autograd joins nothing), and d mem_kv
    (2, heads, M, d) in mem_kv's dtype and strides (after model.to(memory_format=torch.channels_last) the 4-D
    parameter is channels_last, and a gradient of other strides would be copied by autograd's accumulation)."""
    q, k, v = _qkv_views(qkv, heads)
    _check_head_dim("packed_attention_backward", q.shape[-1])
    dqkv = empty_output(qkv)
    dmem_kv = torch.empty_like(mem_kv)
    dq, dk, dv = _qkv_views(dqkv, heads)
    _backward(_image_view(grad_out, heads), q, k, v, mem_kv[0], mem_kv[1], lse, scale, dq, dk, dv, dmem_kv[0],
              dmem_kv[1])
    return dqkv, dmem_kv


@packed_attention_backward.register_fake
def _packed_attention_backward_fake(grad_out, qkv, mem_kv, lse, heads, scale):
    return empty_output(qkv), torch.empty_like(mem_kv)


def _packed_setup_context(ctx, inputs, output):
    qkv, mem_kv, heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(qkv, mem_kv, lse)
    ctx.heads, ctx.scale = heads, scale


def _packed_backward_rule(ctx, grad_out, grad_lse):
    if grad_out is None:
        return None, None, None, None
    qkv, mem_kv, lse = ctx.saved_tensors
    dqkv, dmem_kv = torch.ops.fastunet.packed_attention_backward(grad_out, qkv, mem_kv, lse, ctx.heads,
                                                                 ctx.scale)
    return dqkv, dmem_kv, None, None


packed_attention_forward.register_autograd(_packed_backward_rule, setup_context=_packed_setup_context)


def unsupported_reason(*args):
    """Why the kernels cannot take these inputs (the dispatcher then uses the reference), or None. The module's
    two ops share it: `attention`'s arguments (q, k, v, mem_k, mem_v) and `packed_attention`'s (qkv, mem_kv,
    heads, sdpa, dropout, scale), told apart by the int `heads`."""
    if isinstance(args[2], int):
        qkv, mem_kv, heads, _, dropout, _ = args
        if dropout > 0:
            return f"the attention kernels have no dropout on the attention weights, got dropout {dropout}"
        batch, channels, height, width = qkv.shape
        shape = (batch, heads, height * width, channels // (3 * heads))
    else:
        shape = tuple(args[0].shape)
    if shape[-1] > HEAD_DIMS[-1]:
        return f"the attention kernels take head dims up to {HEAD_DIMS[-1]}, got {shape[-1]}"
    if shape[0] * shape[1] * triton.cdiv(shape[2], 16) > MAX_PROGRAMS:
        return f"q of shape {shape} needs more than the {MAX_PROGRAMS} programs of a CUDA grid axis"
    return None


def attention(q, k, v, mem_k, mem_v, scale=None):
    """`softmax(q [mem_k; k]^T * scale) [mem_v; v]`, non-causal (fastunet.reference.attention), differentiable.

    q, k, v: (B, heads, N, d), one dtype among fp32/fp16/bf16, any strides, d <= 128.
    mem_k, mem_v: (heads, M, d), M >= 0, any float dtype (fp32 parameters under autocast); cast to q's dtype.
    scale: the softmax scale, d^-0.5 when None. B * heads * cdiv(N, 16) <= 2**31 - 1 (MAX_PROGRAMS).
    Returns (B, heads, N, d) in q.dtype with strides (heads*d*N, d*N, 1, N): the memory of a contiguous
    (B, heads*d, H, W) tensor, which to_out reads without a copy. Head dims outside HEAD_DIMS are zero-padded to
    the next one (their result is then a slice of the padded output); head dims above 128 raise ValueError.
    """
    batch, heads, _, d = q.shape
    padded = next((h for h in HEAD_DIMS if h >= d), None)
    if padded is None:
        raise ValueError(f"attention: the Triton kernel takes head dims up to {HEAD_DIMS[-1]}, got {d}")
    if padded != d:
        # Zero dims add nothing to q.k and give zero output columns, sliced off.
        q, k, v, mem_k, mem_v = (torch.nn.functional.pad(t, (0, padded - d)) for t in (q, k, v, mem_k, mem_v))
    out, _ = attention_forward(q, k, v, mem_k, mem_v, d**-0.5 if scale is None else scale)
    return out if padded == d else out[..., :d]


def packed_attention(qkv, mem_kv, heads, sdpa=False, dropout=0.0, scale=None):
    """`attention` on the to_qkv output, differentiable, with one gradient tensor for qkv and one for mem_kv.

    qkv: (B, 3*heads*d, H, W) fp32/fp16/bf16, any strides: q, k, v are its three channel chunks, each
        (heads, d) major to minor, positions H*W (upstream's rearrange); d <= 128.
    mem_kv: (2, heads, M, d), M >= 0, any float dtype: memory keys then values.
    sdpa: ignored (this is a flash kernel already; the reference uses it). dropout: must be 0 (unsupported_reason
    sends other values to the reference). scale: the softmax scale, d^-0.5 when None.
    Returns (B, heads*d, H, W) contiguous in qkv.dtype. Head dims outside HEAD_DIMS go through `attention`'s
    zero-padding (copies of q, k, v); the others read qkv in place.
    """
    if dropout > 0:
        raise ValueError(f"packed_attention: the Triton kernels have no attention dropout, got dropout {dropout}")
    d = qkv.shape[1] // (3 * heads)
    if d not in HEAD_DIMS:
        q, k, v = _qkv_views(qkv, heads)
        out = attention(q, k, v, mem_kv[0], mem_kv[1], scale)
        return out.transpose(-1, -2).reshape(_packed_shapes(qkv, mem_kv, heads))
    return packed_attention_forward(qkv, mem_kv, heads, d**-0.5 if scale is None else scale)[0]


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (tests/gpu_compile.py)
# ----------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_KERNELS = {"forward": _attention_forward_kernel, "dkdv": _attention_backward_dkdv_kernel,
            "dq": _attention_backward_dq_kernel}
# Strides equal to 1 in the Unet's layout, which Triton specializes as constants at launch: positions are
# contiguous in q, k, v (views of the to_qkv output), grad_out and every (B, heads, N, d) tensor the kernels
# allocate; the memory slots (heads, M, d) and their gradients are contiguous.
_UNIT_STRIDES = {"stride_qn", "stride_kn", "stride_vn", "stride_on", "stride_gn", "stride_dkn", "stride_dvn",
                 "stride_dqn", "stride_mkd", "stride_mvd", "stride_dmd"}
# Pointer arguments: those of the first set are fp32 whatever the input dtype; the memory slots have their own
# dtype (fp32 parameters under autocast), and so have their gradients; the others have q's dtype.
_FP32_POINTERS = {"LSE", "DELTA", "DMEM_PARTIAL"}
_MEM_POINTERS = {"MEM_K", "MEM_V", "DMEM_K", "DMEM_V"}
_POINTERS = _FP32_POINTERS | _MEM_POINTERS | {"Q", "K", "V", "OUT", "GRAD_OUT", "DQ", "DK", "DV"}
# Integer arguments that are multiples of 16 in the Unet's layout whenever N is (H*W at every resolution from 4x4
# up): the non-unit strides of the (B, heads, N, d) tensors (3*heads*d*N, d*N, N for to_qkv views; heads*d*N,
# d*N, N for the tensors the kernels allocate), N itself, and the memory slots' strides (M*d, d, with d >= 16).
# Not HEADS nor M_MEM (4 in the Unet). With 16-byte aligned pointers (PyTorch's allocator, and the to_qkv chunks
# begin heads*d*N elements apart) Triton's launch marks exactly these tt.divisibility=16.
_DIVISIBLE_INTS = {"N_CTX"} | {f"stride_{t}{a}" for t in ("q", "k", "v", "o", "g", "dk", "dv", "dq")
                              for a in ("b", "h", "d")} | {f"stride_{t}{a}" for t in ("mk", "mv", "dm") for a in ("h", "m")}


def _signature(kernel, dtype, constexprs, mem_dtype=None):
    """Argument types of `kernel` as a GPU launch with inputs of `dtype` (memory slots of `mem_dtype`, default
    `dtype`) in the Unet's layout specializes them."""
    signature, constants = {}, dict(constexprs)
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constants[name] = 1
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in _MEM_POINTERS:
            signature[name] = "*" + _TRITON_DTYPES[mem_dtype or dtype]
        elif name in _POINTERS:
            signature[name] = "*" + _TRITON_DTYPES[dtype]
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, constants


def _divisibility(kernel, signature):
    """Triton's `attrs` for a launch in the Unet's layout with N a multiple of 16: every pointer and every argument
    of _DIVISIBLE_INTS divisible by 16, keyed by argument index as ASTSource takes them (triton 3.6 to 3.8)."""
    return {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names)
            if signature[name] != "constexpr" and (signature[name].startswith("*") or name in _DIVISIBLE_INTS)}


def _compile_entry(name, dtype, head_dim, tiles, aligned=False, mem_dtype=None):
    """(kernel, signature, constexprs, options[, attrs]) of kernel `name` launched with `tiles` (BLOCK_M, BLOCK_N,
    num_warps, num_stages) on inputs of `dtype`, memory slots of `mem_dtype`, in the Unet's layout; `aligned`: with
    N a multiple of 16 (the divisibility Triton then specializes), else the worst case (no hints)."""
    kernel = _KERNELS[name]
    block_m, block_n, num_warps, num_stages = tiles
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_MEM=BLOCK_MEM, DOT_FP32=False)
    signature, constants = _signature(kernel, dtype, constexprs, mem_dtype)
    options = {k: v for k, v in dict(num_warps=num_warps, num_stages=num_stages).items() if v is not None}
    if not aligned:
        return kernel, signature, constants, options
    return kernel, signature, constants, options, _divisibility(kernel, signature)


def gpu_compile_configs(arch=None):
    """Every (kernel, signature, constexprs, options[, attrs]) a GPU launch on sm_`arch` can select (arch 80 or 90:
    that architecture's table, see _table_arch; None: both tables), in the Unet's layout (positions contiguous):
    for fp16, bf16 and fp32, each head dim of HEAD_DIMS and the three kernels, memory slots in q's dtype, without
    alignment hints (N not a multiple of 16, the worst case for registers: 4-tuples); for fp16 and bf16 also
    aligned (N a multiple of 16, as in the Unet at every resolution from 4x4: `attrs` with the divisibility Triton
    specializes) and, both ways, the autocast case (fp32 memory slots; every kernel reads or writes them).
    fp32 has no aligned builds: it is not the Unet's training precision, and they would add 12 builds per
    architecture to the compile test (when the tables were chosen, no fp32 configuration spilled aligned)."""
    if arch is not None and arch not in _GPU_CONFIGS:
        return _consumer_compile_configs(arch)
    configs = []
    for table_arch in (80, 90) if arch is None else (_table_arch(arch),):
        table = _GPU_CONFIGS[table_arch]
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for head_dim in HEAD_DIMS:
                for name in _KERNELS:
                    for tiles in _candidates(table_arch, name, dtype, head_dim):
                        for aligned in (False, True) if dtype != torch.float32 else (False,):
                            configs.append(_compile_entry(name, dtype, head_dim, tiles, aligned))
                            if dtype != torch.float32:
                                configs.append(_compile_entry(name, dtype, head_dim, tiles, aligned, torch.float32))
    return configs


def _consumer_compile_configs(arch):
    """The configurations compiled for sm_`arch` other than 80 and 90 (sm_86, sm_89, sm_120: 99 KB of shared
    memory). They run sm_80's table, whose every build (compiled for sm_80) the tests already hold to 99 KB, with
    the same instructions (mma.sync, cp.async); compiling each of them again per architecture would triple the
    compile test's time. These builds check that each target's ptxas takes the kernels, within its shared memory
    and without spills, for the configurations the Unet trains with: bf16 and fp16, each head dim and kernel, N a
    multiple of 16 with fp32 memory slots (autocast), and bf16 with N unaligned."""
    table = _GPU_CONFIGS[_table_arch(arch)]
    configs = []
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in HEAD_DIMS:
            for name in _KERNELS:
                tiles = table[name][_dot_precision(dtype)][head_dim]
                configs.append(_compile_entry(name, dtype, head_dim, tiles, True, torch.float32))
                if dtype == torch.bfloat16:
                    configs.append(_compile_entry(name, dtype, head_dim, tiles, False))
    return configs
