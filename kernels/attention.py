"""Flash attention over the layer's learned memory key/values followed by the image positions, in Triton.

    out = softmax(q [mem_k; k]^T * d^-0.5) [mem_v; v]        (non-causal; fastunet.reference.attention)

Forward: one program per (block of BLOCK_M queries, batch*head). It streams the keys/values through an online
softmax (FlashAttention-2) in two loops that read from two pointers: first the M memory slots (heads, M, d) in
blocks of BLOCK_MEM=16 (the smallest tile a tensor-core dot accepts; M=4 in the Unet), masked, then the N image
positions in blocks of BLOCK_N, whose full blocks run unmasked and whose last partial block (N not a multiple of
BLOCK_N) runs masked. The concatenation [mem; k] is never materialized. It saves the base-2 logsumexp of each
query row (fp32) for the backward.

Backward (FlashAttention-2, deterministic, no atomics):
1. delta = rowsum(dO * O) (fp32), one program per block of queries;
2. dk/dv of the image keys: one program per block of BLOCK_N keys, looping over all query blocks;
3. d mem_k, d mem_v: one program per (block of 16 memory slots, batch*head), looping over all query blocks; each
   writes its batch element's share as an fp32 partial (B, heads, M, d), and the partials are summed over the
   batch afterwards in torch (a fixed-order reduction);
4. dq: one program per block of queries, looping over memory slots then image keys, as the forward does.

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
(B, 3*heads*d, H, W), i.e. the positions are contiguous (stride 1 along N); tiles are indexed with both strides,
and Triton specializes a stride equal to 1 at compile time, so loads coalesce along N there (and along d for
contiguous or channels_last inputs). The output, dq, dk and dv are allocated with the memory of a contiguous
(B, heads, d, N) tensor, i.e. (B, heads*d, H, W) NCHW, exactly what to_out reads: the returned (B, heads, N, d)
tensors have strides (heads*d*N, d*N, 1, N). They are fresh tensors made by `torch.empty_strided`, not views,
which a torch.library custom op may return (its fake implementation makes the same strides).

Head dims 16, 32, 64 and 128 run directly; other head dims up to 128 are zero-padded to the next of those by
`attention` (an extra copy of q, k, v; the scale stays d^-0.5); larger ones raise ValueError.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRETING

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
def _program_block(n_items, BLOCK: tl.constexpr):
    """(block, batch * heads + head) of this program. The grid has one axis of cdiv(n_items, BLOCK) * batch * heads
    programs (at most 2**31 - 1, MAX_PROGRAMS), the blocks of one (batch, head) consecutive: programs that run
    together share that head's keys/values in L2, as with blocks on the first axis of a 2-D grid, but without the
    65535 limit of the second axis on batch * heads."""
    n_blocks = tl.cdiv(n_items, BLOCK)
    pid = tl.program_id(0)
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
    pid_m, pid_bh = _program_block(N_CTX, BLOCK_M)
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
def _attention_backward_delta_kernel(
    OUT, GRAD_OUT,  # (B, heads, N, HEAD_DIM) forward output and its gradient, any strides
    DELTA,  # (B, heads, N) fp32, contiguous: rowsum(GRAD_OUT * OUT)
    stride_ob, stride_oh, stride_on, stride_od,  # strides of OUT
    stride_gb, stride_gh, stride_gn, stride_gd,  # strides of GRAD_OUT
    HEADS,  # number of heads (the grid runs batch * HEADS + head major, see _program_block)
    N_CTX,  # N
    HEAD_DIM: tl.constexpr,  # d
    BLOCK_M: tl.constexpr,  # rows per program
):
    pid_m, pid_bh = _program_block(N_CTX, BLOCK_M)
    off_b = (pid_bh // HEADS).to(tl.int64)
    off_h = (pid_bh % HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < N_CTX
    out = tl.load(OUT + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on
                  + offs_d[None, :] * stride_od, mask=row_valid[:, None], other=0.0)
    grad = tl.load(GRAD_OUT + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gn
                   + offs_d[None, :] * stride_gd, mask=row_valid[:, None], other=0.0)
    delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_CTX + offs_m, delta, mask=row_valid)


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
def _attention_backward_dkdv_kernel(
    Q, K, V,  # (B, heads, N, HEAD_DIM) forward inputs, one dtype, any strides
    GRAD_OUT,  # (B, heads, N, HEAD_DIM) gradient of the output, Q's dtype, any strides
    LSE, DELTA,  # (B, heads, N) fp32, contiguous: forward base-2 logsumexp; rowsum(GRAD_OUT * OUT)
    DK, DV,  # (B, heads, N, HEAD_DIM) gradients of K and V, Q's dtype
    stride_qb, stride_qh, stride_qn, stride_qd,  # strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # strides of V
    stride_gb, stride_gh, stride_gn, stride_gd,  # strides of GRAD_OUT
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # strides of DK
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,  # strides of DV
    HEADS,  # number of heads (the grid runs batch * HEADS + head major, see _program_block)
    N_CTX,  # N
    qk_scale,  # softmax scale (d^-0.5) * log2(e)
    sm_scale,  # softmax scale, d^-0.5
    HEAD_DIM: tl.constexpr,  # d, one of HEAD_DIMS
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # image keys per program
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (interpreter only)
):
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_n, pid_bh = _program_block(N_CTX, BLOCK_N)
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
def _memory_step(
    dmem_k, dmem_v, kT, vT,  # fp32 accumulators (BLOCK_MEM, HEAD_DIM); memory keys, values (HEAD_DIM, BLOCK_MEM)
    Q, GRAD_OUT, LSE, DELTA,  # this (batch, head)'s base pointers
    stride_qn, stride_qd, stride_gn, stride_gd,  # strides of Q and GRAD_OUT along positions and head dim
    start_m, N_CTX, qk_scale,  # first query of this step; N; d^-0.5 * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK_QUERIES: tl.constexpr,  # whether this block of queries may run past N
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    g_ptrs = GRAD_OUT + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd
    if MASK_QUERIES:
        valid = offs_m < N_CTX
        q = tl.load(q_ptrs, mask=valid[:, None], other=0.0)
        g = tl.load(g_ptrs, mask=valid[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=valid, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=valid, other=0.0)
    else:
        q = tl.load(q_ptrs)
        g = tl.load(g_ptrs)
        lse = tl.load(LSE + offs_m)
        delta = tl.load(DELTA + offs_m)
    q = _operand(q, DTYPE, DOT_FP32)
    g = _operand(g, DTYPE, DOT_FP32)
    p = tl.math.exp2(tl.dot(q, kT, input_precision="tf32") * qk_scale - lse[:, None])
    if MASK_QUERIES:
        p = tl.where(valid[:, None], p, 0.0)
    ds = p * (tl.dot(g, vT, input_precision="tf32") - delta[:, None])
    dmem_v = tl.dot(tl.trans(_operand(p, DTYPE, DOT_FP32)), g, dmem_v, input_precision="tf32")
    dmem_k = tl.dot(tl.trans(_operand(ds, DTYPE, DOT_FP32)), q, dmem_k, input_precision="tf32")
    return dmem_k, dmem_v


@triton.jit
def _attention_backward_memory_kernel(
    Q,  # (B, heads, N, HEAD_DIM) forward queries, any strides
    MEM_K, MEM_V,  # (heads, M, HEAD_DIM) memory slots, any float dtype (cast to Q's on load)
    GRAD_OUT,  # (B, heads, N, HEAD_DIM) gradient of the output, Q's dtype, any strides
    LSE, DELTA,  # (B, heads, N) fp32, contiguous: forward base-2 logsumexp; rowsum(GRAD_OUT * OUT)
    DMEM_K, DMEM_V,  # (B, heads, M, HEAD_DIM) fp32, contiguous: per-batch partial gradients of the memory slots
    stride_qb, stride_qh, stride_qn, stride_qd,  # strides of Q
    stride_mkh, stride_mkm, stride_mkd,  # strides of MEM_K
    stride_mvh, stride_mvm, stride_mvd,  # strides of MEM_V
    stride_gb, stride_gh, stride_gn, stride_gd,  # strides of GRAD_OUT
    HEADS,  # number of heads (the grid runs batch * HEADS + head major, see _program_block)
    N_CTX,  # N
    M_MEM,  # M (> 0: the kernel is not launched without memory slots)
    qk_scale,  # softmax scale (d^-0.5) * log2(e)
    sm_scale,  # softmax scale, d^-0.5
    HEAD_DIM: tl.constexpr,  # d, one of HEAD_DIMS
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_MEM: tl.constexpr,  # memory slots per program
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (interpreter only)
):
    """Gradients of BLOCK_MEM memory slots from the N queries of one batch element.

    Every batch element attends to the same memory slots; this program owns batch off_b's share and writes it
    alone, so the sum over the batch (in torch, afterwards) needs no atomics. Unlike the image-key programs, the
    slots are the right operand of the score dots: a 16-row left operand would be replicated in every warp."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_n, pid_bh = _program_block(M_MEM, BLOCK_MEM)
    off_b = (pid_bh // HEADS).to(tl.int64)
    off_h = (pid_bh % HEADS).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    GRAD_OUT += off_b * stride_gb + off_h * stride_gh
    MEM_K += off_h * stride_mkh
    MEM_V += off_h * stride_mvh
    LSE += pid_bh.to(tl.int64) * N_CTX
    DELTA += pid_bh.to(tl.int64) * N_CTX

    offs_n = pid_n * BLOCK_MEM + tl.arange(0, BLOCK_MEM)
    offs_d = tl.arange(0, HEAD_DIM)
    slot_valid = offs_n < M_MEM
    # Slots past M load as zeros: their gradients are computed from finite values and never stored.
    kT = tl.load(MEM_K + offs_d[:, None] * stride_mkd + offs_n[None, :] * stride_mkm, mask=slot_valid[None, :],
                 other=0.0)
    vT = tl.load(MEM_V + offs_d[:, None] * stride_mvd + offs_n[None, :] * stride_mvm, mask=slot_valid[None, :],
                 other=0.0)
    kT = _operand(kT, DTYPE, DOT_FP32)
    vT = _operand(vT, DTYPE, DOT_FP32)
    dmem_k = tl.zeros([BLOCK_MEM, HEAD_DIM], dtype=tl.float32)
    dmem_v = tl.zeros([BLOCK_MEM, HEAD_DIM], dtype=tl.float32)
    m_full = (N_CTX // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dmem_k, dmem_v = _memory_step(dmem_k, dmem_v, kT, vT, Q, GRAD_OUT, LSE, DELTA, stride_qn, stride_qd, stride_gn,
                                      stride_gd, start_m, N_CTX, qk_scale, HEAD_DIM, BLOCK_M, False, DTYPE, DOT_FP32)
    if m_full < N_CTX:
        dmem_k, dmem_v = _memory_step(dmem_k, dmem_v, kT, vT, Q, GRAD_OUT, LSE, DELTA, stride_qn, stride_qd, stride_gn,
                                      stride_gd, m_full, N_CTX, qk_scale, HEAD_DIM, BLOCK_M, True, DTYPE, DOT_FP32)
    dmem_k = dmem_k * sm_scale
    partial = offs_n[:, None] * HEAD_DIM + offs_d[None, :] + pid_bh.to(tl.int64) * M_MEM * HEAD_DIM
    tl.store(DMEM_K + partial, dmem_k, mask=slot_valid[:, None])
    tl.store(DMEM_V + partial, dmem_v, mask=slot_valid[:, None])


@triton.jit
def _dq_block(
    dq, q, g, lse, delta,  # fp32 accumulator (BLOCK_M, HEAD_DIM); q, grad-out tiles (dot operands); row stats
    K, V,  # key/value base pointers of this (batch, head), or of this head's memory slots
    stride_kn, stride_kd, stride_vn, stride_vd,  # their strides along positions and head dim
    start, n_keys, qk_scale,  # first key of this block; number of keys behind K/V; d^-0.5 * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # whether this block may run past n_keys
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
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
    ds = p * (dp - delta[:, None])
    dq = tl.dot(_operand(ds, DTYPE, DOT_FP32), tl.trans(kT), dq, input_precision="tf32")
    return dq


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V,  # (B, heads, N, HEAD_DIM) forward inputs, one dtype, any strides
    MEM_K, MEM_V,  # (heads, M, HEAD_DIM) memory slots, any float dtype (cast to Q's on load)
    GRAD_OUT,  # (B, heads, N, HEAD_DIM) gradient of the output, Q's dtype, any strides
    LSE, DELTA,  # (B, heads, N) fp32, contiguous: forward base-2 logsumexp; rowsum(GRAD_OUT * OUT)
    DQ,  # (B, heads, N, HEAD_DIM) gradient of Q, Q's dtype
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
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_m, pid_bh = _program_block(N_CTX, BLOCK_M)
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
    # Rows past N load as zeros: their results are finite and never stored.
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_valid[:, None], other=0.0)
    g = tl.load(GRAD_OUT + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd, mask=row_valid[:, None],
                other=0.0)
    q = _operand(q, DTYPE, DOT_FP32)
    g = _operand(g, DTYPE, DOT_FP32)
    lse = tl.load(LSE + offs_m, mask=row_valid, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_valid, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, M_MEM, BLOCK_MEM):
        dq = _dq_block(dq, q, g, lse, delta, MEM_K, MEM_V, stride_mkm, stride_mkd, stride_mvm, stride_mvd, start,
                       M_MEM, qk_scale, HEAD_DIM, BLOCK_MEM, True, DTYPE, DOT_FP32)
    n_full = (N_CTX // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, g, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, start, N_CTX, qk_scale,
                       HEAD_DIM, BLOCK_N, False, DTYPE, DOT_FP32)
    if n_full < N_CTX:
        dq = _dq_block(dq, q, g, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, n_full, N_CTX,
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
# one program; for "memory" BLOCK_M is the query step and BLOCK_N the memory slots of one program (BLOCK_MEM).
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
#   16/48, dq 52/76), not aligned: SM80_SPILLS_ALLOWED lists exactly those three, exempt from the spill check.
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
        "tf32": {16: (64, 64, 8, 2), 32: (64, 32, 8, 2), 64: (128, 16, 8, 1), 128: (16, 16, 8, 1)},
    },
    "memory": {
        "16": {16: (64, 16, 8, 2), 32: (64, 16, 8, 2), 64: (32, 16, 8, 2), 128: (32, 16, 8, 1)},
        "tf32": {16: (64, 16, 8, 2), 32: (64, 16, 8, 2), 64: (32, 16, 8, 1), 128: (32, 16, 8, 1)},
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
        "tf32": {16: (64, 64, 8, 2), 32: (64, 64, 8, 2), 64: (128, 16, 8, 1), 128: (128, 16, 8, 1)},
    },
    "memory": {
        "16": {16: (128, 16, 8, 2), 32: (128, 16, 8, 2), 64: (32, 16, 8, 2), 128: (32, 16, 8, 1)},
        "tf32": {16: (64, 16, 8, 2), 32: (64, 16, 8, 2), 64: (32, 16, 8, 1), 128: (32, 16, 8, 1)},
    },
}
_GPU_CONFIGS = {80: _SM80_CONFIGS, 90: _SM90_CONFIGS}
# (kernel, dot precision, head dim, aligned) whose sm_80 build spills registers, with triton 3.6 and 3.8 (see
# above): fp32 at d=128 with N not a multiple of 16. The tests exempt exactly these, and fail if one stops spilling.
SM80_SPILLS_ALLOWED = {("forward", "tf32", 128, False), ("dkdv", "tf32", 128, False), ("dq", "tf32", 128, False)}
# The delta preprocess is a bandwidth-bound row reduction: 4096 elements of each operand per program.
_DELTA_ELEMENTS = 4096
# The interpreter runs one configuration; its cost is per program and per operation, so tiles are large. 32x32
# still takes several query blocks and a masked last key block at the test shapes (N = 35, 64, 100).
_INTERPRETER_CONFIG = (32, 32, 1, 1)


def _dot_precision(dtype):
    """How dots of this input dtype run: "16" (fp16/bf16 operands) or "tf32" (fp32 operands, see the module doc)."""
    return "tf32" if dtype == torch.float32 else "16"


def _table_arch(arch):
    """The configuration table for compute capability `arch` (80, 86, 89, 90, 100, 120, ...): sm_90's for Hopper and
    the datacenter Blackwells (228 KiB of shared memory), sm_80's for the others. sm_86, sm_89 and sm_120 have
    99 KiB per block, which the sm_80 table fits (the tests check it) and the sm_90 one does not."""
    return 90 if 90 <= arch < 120 else 80


def _config(kernel, dtype, head_dim, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernel` for inputs of `dtype` and head dim `head_dim` on
    `device`."""
    if INTERPRETING:
        block_m, block_n, num_warps, num_stages = _INTERPRETER_CONFIG
        return block_m, BLOCK_MEM if kernel == "memory" else block_n, num_warps, num_stages
    major, minor = torch.cuda.get_device_capability(device)
    return _GPU_CONFIGS[_table_arch(10 * major + minor)][kernel][_dot_precision(dtype)][head_dim]


def _delta_block(head_dim):
    return 32 if INTERPRETING else _DELTA_ELEMENTS // head_dim


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _empty_like_output(q, dtype=None):
    """(B, heads, N, d) tensor with the memory of a contiguous (B, heads, d, N) one: the layout to_out reads."""
    batch, heads, n, d = q.shape
    return torch.empty_strided((batch, heads, n, d), (heads * d * n, d * n, 1, n), dtype=dtype or q.dtype,
                               device=q.device)


def _mem_or_standin(mem, like):
    # With no memory slots nothing is read from them; an empty tensor may have no valid data pointer, so the
    # kernels get a (heads, N, d) slice of a non-empty one (never dereferenced since M = 0).
    return mem if mem.shape[1] > 0 else like[0]


def _grid(n_items, block, batch_heads):
    """The one-axis grid of a kernel with cdiv(n_items, block) programs per (batch, head) (see _program_block)."""
    programs = triton.cdiv(n_items, block) * batch_heads
    if programs > MAX_PROGRAMS:
        raise ValueError(f"attention: {programs} programs exceed the {MAX_PROGRAMS} of a CUDA grid axis")
    return (programs,)


def _forward(q, k, v, mem_k, mem_v, scale):
    batch, heads, n, d = q.shape
    out = _empty_like_output(q)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    m = mem_k.shape[1]
    mem_k, mem_v = _mem_or_standin(mem_k, k), _mem_or_standin(mem_v, v)
    block_m, block_n, num_warps, num_stages = _config("forward", q.dtype, d, q.device)
    _attention_forward_kernel[_grid(n, block_m, batch * heads)](
        q, k, v, mem_k, mem_v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *mem_k.stride(), *mem_v.stride(), *out.stride(),
        heads, n, m, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_MEM=BLOCK_MEM, DOT_FP32=INTERPRETING,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def _backward(grad_out, q, k, v, mem_k, mem_v, out, lse, scale):
    batch, heads, n, d = q.shape
    m = mem_k.shape[1]
    dq, dk, dv = _empty_like_output(q), _empty_like_output(q), _empty_like_output(q)
    # Per-batch partial gradients of the memory slots, each element written by exactly one program.
    dmem_k_partial = torch.zeros((batch, heads, m, d), dtype=torch.float32, device=q.device)
    dmem_v_partial = torch.zeros_like(dmem_k_partial)
    if q.numel() > 0:
        grad_out = grad_out.to(q.dtype)
        scales = (scale * LOG2E, scale)
        delta = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
        delta_block = _delta_block(d)
        _attention_backward_delta_kernel[_grid(n, delta_block, batch * heads)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n, HEAD_DIM=d, BLOCK_M=delta_block,
            num_warps=1 if INTERPRETING else 4,
        )

        block_m, block_n, num_warps, num_stages = _config("dkdv", q.dtype, d, q.device)
        _attention_backward_dkdv_kernel[_grid(n, block_n, batch * heads)](
            q, k, v, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), heads, n, *scales,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_FP32=INTERPRETING, num_warps=num_warps,
            num_stages=num_stages,
        )

        if m > 0:
            block_m, block_mem, num_warps, num_stages = _config("memory", q.dtype, d, q.device)
            _attention_backward_memory_kernel[_grid(m, block_mem, batch * heads)](
                q, mem_k, mem_v, grad_out, lse, delta, dmem_k_partial, dmem_v_partial,
                *q.stride(), *mem_k.stride(), *mem_v.stride(), *grad_out.stride(), heads, n, m, *scales,
                HEAD_DIM=d, BLOCK_M=block_m, BLOCK_MEM=block_mem, DOT_FP32=INTERPRETING, num_warps=num_warps,
                num_stages=num_stages,
            )

        mem_k_in, mem_v_in = _mem_or_standin(mem_k, k), _mem_or_standin(mem_v, v)
        block_m, block_n, num_warps, num_stages = _config("dq", q.dtype, d, q.device)
        _attention_backward_dq_kernel[_grid(n, block_m, batch * heads)](
            q, k, v, mem_k_in, mem_v_in, grad_out, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *mem_k_in.stride(), *mem_v_in.stride(), *grad_out.stride(),
            *dq.stride(), heads, n, m, *scales,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_MEM=BLOCK_MEM, DOT_FP32=INTERPRETING,
            num_warps=num_warps, num_stages=num_stages,
        )
    # Sum of the per-batch partials: a torch reduction over one dimension, in a fixed order (deterministic).
    return dq, dk, dv, dmem_k_partial.sum(0).to(mem_k.dtype), dmem_v_partial.sum(0).to(mem_v.dtype)


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (autograd, opcheck and torch.compile see them as opaque operators)
# ----------------------------------------------------------------------------------------------------------------


def _check_head_dim(where, q):
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{where}: the kernels take head dims {HEAD_DIMS}, got {q.shape[-1]} "
                         "(fastunet.kernels.attention.attention pads other head dims up to 128)")


@torch.library.custom_op("fastunet::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel. q, k, v (B, heads, N, d) one float dtype, any strides, d in HEAD_DIMS; mem_k, mem_v
    (heads, M, d) any float dtype; scale: the softmax scale (d^-0.5 of the unpadded head dim).

    Returns out (B, heads, N, d) in q.dtype with strides (heads*d*N, d*N, 1, N), and lse (B, heads, N) fp32
    contiguous, the base-2 logsumexp of each query row's scores times scale * log2(e).
    """
    _check_head_dim("attention_forward", q)
    return _forward(q, k, v, mem_k, mem_v, scale)


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, mem_k, mem_v, scale):
    return _empty_like_output(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastunet::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mem_k: torch.Tensor, mem_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels. grad_out (B, heads, N, d) any strides; the rest as attention_forward's inputs and outputs.

    Returns dq, dk, dv (B, heads, N, d) in q.dtype with strides (heads*d*N, d*N, 1, N), and d mem_k, d mem_v
    (heads, M, d) contiguous in the dtypes of mem_k and mem_v.
    """
    _check_head_dim("attention_backward", q)
    return _backward(grad_out, q, k, v, mem_k, mem_v, out, lse, scale)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, mem_k, mem_v, out, lse, scale):
    return (_empty_like_output(q), _empty_like_output(q), _empty_like_output(q), mem_k.new_empty(mem_k.shape),
            mem_v.new_empty(mem_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, mem_k, mem_v, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, mem_k, mem_v, out, lse)
    ctx.scale = scale


def _backward_rule(ctx, grad_out, grad_lse):
    q, k, v, mem_k, mem_v, out, lse = ctx.saved_tensors
    grads = torch.ops.fastunet.attention_backward(grad_out, q, k, v, mem_k, mem_v, out, lse, ctx.scale)
    return (*grads, None)


attention_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def unsupported_reason(q, k, v, mem_k, mem_v):
    """Why the kernels cannot take these inputs (the dispatcher then uses the reference), or None."""
    if q.shape[-1] > HEAD_DIMS[-1]:
        return f"the attention kernels take head dims up to {HEAD_DIMS[-1]}, got {q.shape[-1]}"
    if q.shape[0] * q.shape[1] * triton.cdiv(q.shape[2], 16) > MAX_PROGRAMS:
        return f"q of shape {tuple(q.shape)} needs more than the {MAX_PROGRAMS} programs of a CUDA grid axis"
    return None


def attention(q, k, v, mem_k, mem_v):
    """`softmax(q [mem_k; k]^T * d^-0.5) [mem_v; v]`, non-causal (fastunet.reference.attention), differentiable.

    q, k, v: (B, heads, N, d), one dtype among fp32/fp16/bf16, any strides, d <= 128.
    mem_k, mem_v: (heads, M, d), M >= 0, any float dtype (fp32 parameters under autocast); cast to q's dtype.
    B * heads * cdiv(N, 16) <= 2**31 - 1 (MAX_PROGRAMS).
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
    out, _ = attention_forward(q, k, v, mem_k, mem_v, d**-0.5)
    return out if padded == d else out[..., :d]


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (tests/gpu_compile.py)
# ----------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_KERNELS = {"forward": _attention_forward_kernel, "delta": _attention_backward_delta_kernel,
            "dkdv": _attention_backward_dkdv_kernel, "memory": _attention_backward_memory_kernel,
            "dq": _attention_backward_dq_kernel}
# Strides equal to 1 in the Unet's layout, which Triton specializes as constants at launch: positions are
# contiguous in q, k, v (views of the to_qkv output), grad_out and every (B, heads, N, d) tensor the kernels
# allocate; the memory slots (heads, M, d) are contiguous parameters.
_UNIT_STRIDES = {"stride_qn", "stride_kn", "stride_vn", "stride_on", "stride_gn", "stride_dkn", "stride_dvn",
                 "stride_dqn", "stride_mkd", "stride_mvd"}
# Pointer arguments: those of the first set are fp32 whatever the input dtype; the memory slots have their own
# dtype (fp32 parameters under autocast); the others have q's dtype.
_FP32_POINTERS = {"LSE", "DELTA", "DMEM_K", "DMEM_V"}
_MEM_POINTERS = {"MEM_K", "MEM_V"}
_POINTERS = _FP32_POINTERS | _MEM_POINTERS | {"Q", "K", "V", "OUT", "GRAD_OUT", "DQ", "DK", "DV"}
# Integer arguments that are multiples of 16 in the Unet's layout whenever N is (H*W at every resolution from 4x4
# up): the non-unit strides of the (B, heads, N, d) tensors (3*heads*d*N, d*N, N for to_qkv views; heads*d*N,
# d*N, N for the tensors the kernels allocate), N itself, and the memory slots' strides (M*d, d, with d >= 16).
# Not HEADS nor M_MEM (4 in the Unet). With 16-byte aligned pointers (PyTorch's allocator, and the to_qkv chunks
# begin heads*d*N elements apart) Triton's launch marks exactly these tt.divisibility=16.
_DIVISIBLE_INTS = {"N_CTX"} | {f"stride_{t}{a}" for t in ("q", "k", "v", "o", "g", "dk", "dv", "dq")
                              for a in ("b", "h", "d")} | {f"stride_{t}{a}" for t in ("mk", "mv") for a in ("h", "m")}


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
    if name == "delta":
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m)
    else:
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, DOT_FP32=False)
        constexprs["BLOCK_MEM" if name == "memory" else "BLOCK_N"] = block_n
        if name in ("forward", "dq"):
            constexprs["BLOCK_MEM"] = BLOCK_MEM
    signature, constants = _signature(kernel, dtype, constexprs, mem_dtype)
    options = {k: v for k, v in dict(num_warps=num_warps, num_stages=num_stages).items() if v is not None}
    if not aligned:
        return kernel, signature, constants, options
    return kernel, signature, constants, options, _divisibility(kernel, signature)


def gpu_compile_configs(arch=None):
    """Every (kernel, signature, constexprs, options[, attrs]) a GPU launch on sm_`arch` can select (arch 80 or 90:
    that architecture's table, see _table_arch; None: both tables), in the Unet's layout (positions contiguous):
    for fp16, bf16 and fp32, each head dim of HEAD_DIMS and the five kernels, memory slots in q's dtype, without
    alignment hints (N not a multiple of 16, the worst case for registers: 4-tuples); for fp16 and bf16 also
    aligned (N a multiple of 16, as in the Unet at every resolution from 4x4: `attrs` with the divisibility Triton
    specializes) and, both ways, the autocast case (fp32 memory slots) of the three kernels that read the slots.
    fp32 has no aligned builds: it is not the Unet's training precision, and they would add 20 builds per
    architecture to the compile test (when the tables were chosen, no fp32 configuration spilled aligned)."""
    configs = []
    for table_arch in (80, 90) if arch is None else (_table_arch(arch),):
        table = _GPU_CONFIGS[table_arch]
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for head_dim in HEAD_DIMS:
                for name in ("forward", "delta", "dkdv", "memory", "dq"):
                    tiles = (_DELTA_ELEMENTS // head_dim, None, 4, None) if name == "delta" else \
                        table[name][_dot_precision(dtype)][head_dim]
                    for aligned in (False, True) if dtype != torch.float32 else (False,):
                        configs.append(_compile_entry(name, dtype, head_dim, tiles, aligned))
                        if dtype != torch.float32 and name in ("forward", "memory", "dq"):
                            configs.append(_compile_entry(name, dtype, head_dim, tiles, aligned, torch.float32))
    return configs
