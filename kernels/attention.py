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
# batch * heads is the second grid axis (queries or keys are the first, so that the programs of one head run
# together and share its keys/values in L2); CUDA allows 65535 there.
MAX_BATCH_HEADS = 65535


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
    HEADS,  # number of heads: program_id(1) is batch * HEADS + head
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
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    HEADS,  # number of heads: program_id(1) is batch * HEADS + head
    N_CTX,  # N
    HEAD_DIM: tl.constexpr,  # d
    BLOCK_M: tl.constexpr,  # rows per program
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    HEADS,  # number of heads: program_id(1) is batch * HEADS + head
    N_CTX,  # N
    qk_scale,  # softmax scale (d^-0.5) * log2(e)
    sm_scale,  # softmax scale, d^-0.5
    HEAD_DIM: tl.constexpr,  # d, one of HEAD_DIMS
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # image keys per program
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (interpreter only)
):
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    HEADS,  # number of heads: program_id(1) is batch * HEADS + head
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
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    HEADS,  # number of heads: program_id(1) is batch * HEADS + head
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
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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

# One configuration per (kernel, dot precision, head dim) on the GPU, chosen ahead of time so that the tests compile
# every one of them (gpu_compile_configs) for sm_80 and sm_90 and check shared memory, tensor cores and register
# spills. The compile there sees no 16-byte alignment (as a launch with N not a multiple of 16 does), so loads are
# not vectorized, the worst case for registers. Dot precision: "16" for fp16/bf16, "tf32" for fp32.
# Values: (BLOCK_M, BLOCK_N, num_warps, num_stages); for "dkdv" BLOCK_M is the query step and BLOCK_N the keys of
# one program; for "memory" BLOCK_M is the query step and BLOCK_N the memory slots of one program (BLOCK_MEM).
# - d <= 32, 16-bit (the Unet's attention, the performance target): the FlashAttention-2 shapes, 128 queries x 64
#   keys per forward step (4 warps: one warpgroup, wgmma takes 64 rows per warpgroup), 128 keys per dk/dv
#   program and 128 queries per dq program (8 warps), 3-stage pipelines.
# - Larger head dims and fp32 (TF32 operands are twice the size of 16-bit ones): on sm_80, mma.sync keeps the
#   loop-invariant left operand of the dots (q in the forward and dq, k and v in dk/dv) in registers, 16 rows x d
#   per warp, so tiles shrink as d grows; at d=128 the backward takes 16x16 tiles. Compiled for sm_90 with
#   alignment, larger tiles fit (e.g. 16-bit dk/dv 64x64 at d=128 with 248 registers): a per-architecture table
#   is the next step once the compile check can tell which architecture a configuration is for.
# - fp32 at d=128 spills a few bytes on sm_80 with every tile tried (forward 24 B, dk/dv 16 B, dq ~500 B); those
#   three are listed in SM80_SPILLS_ALLOWED and exempted from the sm_80 spill check (none spills on sm_90).
_GPU_CONFIGS = {
    "forward": {
        "16": {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 2)},
        "tf32": {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 32, 8, 2), 128: (128, 16, 8, 1)},
    },
    "dkdv": {
        "16": {16: (64, 128, 8, 3), 32: (64, 128, 8, 3), 64: (16, 128, 8, 2), 128: (16, 16, 4, 1)},
        "tf32": {16: (64, 64, 8, 2), 32: (32, 64, 8, 2), 64: (16, 64, 8, 1), 128: (16, 16, 8, 1)},
    },
    "dq": {
        "16": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 32, 8, 2), 128: (16, 16, 4, 1)},
        "tf32": {16: (64, 64, 8, 2), 32: (64, 64, 8, 2), 64: (128, 16, 8, 1), 128: (128, 16, 8, 1)},
    },
    "memory": {
        "16": {16: (64, 16, 4, 2), 32: (64, 16, 4, 2), 64: (32, 16, 4, 2), 128: (32, 16, 4, 1)},
        "tf32": {16: (64, 16, 4, 2), 32: (64, 16, 4, 2), 64: (32, 16, 4, 2), 128: (32, 16, 4, 1)},
    },
}
# (kernel, dot precision, head dim) whose sm_80 build spills registers (see above); the tests exempt exactly these.
SM80_SPILLS_ALLOWED = {("forward", "tf32", 128), ("dkdv", "tf32", 128), ("dq", "tf32", 128)}
# The delta preprocess is a bandwidth-bound row reduction: 4096 elements of each operand per program.
_DELTA_ELEMENTS = 4096
# The interpreter runs one configuration; its cost is per program and per operation, so tiles are large. 32x32
# still takes several query blocks and a masked last key block at the test shapes (N = 35, 64, 100).
_INTERPRETER_CONFIG = (32, 32, 1, 1)


def _dot_precision(dtype):
    """How dots of this input dtype run: "16" (fp16/bf16 operands) or "tf32" (fp32 operands, see the module doc)."""
    return "tf32" if dtype == torch.float32 else "16"


def _config(kernel, dtype, head_dim):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernel` for inputs of `dtype` and head dim `head_dim`."""
    if INTERPRETING:
        block_m, block_n, num_warps, num_stages = _INTERPRETER_CONFIG
        return block_m, BLOCK_MEM if kernel == "memory" else block_n, num_warps, num_stages
    return _GPU_CONFIGS[kernel][_dot_precision(dtype)][head_dim]


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


def _forward(q, k, v, mem_k, mem_v, scale):
    batch, heads, n, d = q.shape
    out = _empty_like_output(q)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    m = mem_k.shape[1]
    mem_k, mem_v = _mem_or_standin(mem_k, k), _mem_or_standin(mem_v, v)
    block_m, block_n, num_warps, num_stages = _config("forward", q.dtype, d)
    grid = (triton.cdiv(n, block_m), batch * heads)
    _attention_forward_kernel[grid](
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
        _attention_backward_delta_kernel[(triton.cdiv(n, delta_block), batch * heads)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n, HEAD_DIM=d, BLOCK_M=delta_block,
            num_warps=1 if INTERPRETING else 4,
        )

        block_m, block_n, num_warps, num_stages = _config("dkdv", q.dtype, d)
        _attention_backward_dkdv_kernel[(triton.cdiv(n, block_n), batch * heads)](
            q, k, v, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), heads, n, *scales,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_FP32=INTERPRETING, num_warps=num_warps,
            num_stages=num_stages,
        )

        if m > 0:
            block_m, block_mem, num_warps, num_stages = _config("memory", q.dtype, d)
            _attention_backward_memory_kernel[(triton.cdiv(m, block_mem), batch * heads)](
                q, mem_k, mem_v, grad_out, lse, delta, dmem_k_partial, dmem_v_partial,
                *q.stride(), *mem_k.stride(), *mem_v.stride(), *grad_out.stride(), heads, n, m, *scales,
                HEAD_DIM=d, BLOCK_M=block_m, BLOCK_MEM=block_mem, DOT_FP32=INTERPRETING, num_warps=num_warps,
                num_stages=num_stages,
            )

        mem_k_in, mem_v_in = _mem_or_standin(mem_k, k), _mem_or_standin(mem_v, v)
        block_m, block_n, num_warps, num_stages = _config("dq", q.dtype, d)
        _attention_backward_dq_kernel[(triton.cdiv(n, block_m), batch * heads)](
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
    if q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        return f"batch * heads = {q.shape[0] * q.shape[1]} exceeds the kernels' {MAX_BATCH_HEADS}"
    return None


def attention(q, k, v, mem_k, mem_v):
    """`softmax(q [mem_k; k]^T * d^-0.5) [mem_v; v]`, non-causal (fastunet.reference.attention), differentiable.

    q, k, v: (B, heads, N, d), one dtype among fp32/fp16/bf16, any strides, d <= 128.
    mem_k, mem_v: (heads, M, d), M >= 0, any float dtype (fp32 parameters under autocast); cast to q's dtype.
    B * heads <= 65535 (MAX_BATCH_HEADS).
    Returns (B, heads, N, d) in q.dtype with strides (heads*d*N, d*N, 1, N): the memory of a contiguous
    (B, heads*d, H, W) tensor, which to_out reads without a copy. Head dims outside HEAD_DIMS are zero-padded to
    the next one (their result is then a slice of the padded output); head dims above 128 raise ValueError.
    """
    batch, heads, _, d = q.shape
    padded = next((h for h in HEAD_DIMS if h >= d), None)
    if padded is None:
        raise ValueError(f"attention: the Triton kernel takes head dims up to {HEAD_DIMS[-1]}, got {d}")
    if batch * heads > MAX_BATCH_HEADS:
        raise ValueError(f"attention: batch * heads = {batch * heads} exceeds the {MAX_BATCH_HEADS} programs a CUDA "
                         "grid's second axis holds")
    if padded != d:
        # Zero dims add nothing to q.k and give zero output columns, sliced off.
        q, k, v, mem_k, mem_v = (torch.nn.functional.pad(t, (0, padded - d)) for t in (q, k, v, mem_k, mem_v))
    out, _ = attention_forward(q, k, v, mem_k, mem_v, d**-0.5)
    return out if padded == d else out[..., :d]


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (tests/gpu_compile.py)
# ----------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Strides equal to 1 in the Unet's layout, which Triton specializes as constants at launch: positions are
# contiguous in q, k, v (views of the to_qkv output), grad_out and every (B, heads, N, d) tensor the kernels
# allocate; the memory slots (heads, M, d) are contiguous parameters.
_UNIT_STRIDES = {"stride_qn", "stride_kn", "stride_vn", "stride_on", "stride_gn", "stride_dkn", "stride_dvn",
                 "stride_dqn", "stride_mkd", "stride_mvd"}
# Pointer arguments: those of the first set are fp32 whatever the input dtype; the others have q's dtype.
_FP32_POINTERS = {"LSE", "DELTA", "DMEM_K", "DMEM_V"}
_POINTERS = _FP32_POINTERS | {"Q", "K", "V", "MEM_K", "MEM_V", "OUT", "GRAD_OUT", "DQ", "DK", "DV"}


def _signature(kernel, dtype, constexprs):
    """Argument types of `kernel` as a GPU launch with inputs of `dtype` in the Unet's layout specializes them."""
    signature, constants = {}, dict(constexprs)
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constants[name] = 1
        elif name in _POINTERS:
            signature[name] = "*fp32" if name in _FP32_POINTERS else "*" + _TRITON_DTYPES[dtype]
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, constants


def gpu_compile_configs():
    """Every (kernel, signature, constexprs, options) a GPU launch can select: for fp16, bf16 and fp32, each head dim of
    HEAD_DIMS, and the five kernels, in the Unet's layout (positions contiguous) with the memory slots in q's dtype
    (fp32 memory slots under autocast change only the cast after their load)."""
    kernels = {"forward": _attention_forward_kernel, "dkdv": _attention_backward_dkdv_kernel,
               "memory": _attention_backward_memory_kernel, "dq": _attention_backward_dq_kernel}
    configs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in HEAD_DIMS:
            for name, kernel in kernels.items():
                block_m, block_n, num_warps, num_stages = _GPU_CONFIGS[name][_dot_precision(dtype)][head_dim]
                constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, DOT_FP32=False)
                if name == "memory":
                    constexprs["BLOCK_MEM"] = block_n
                else:
                    constexprs["BLOCK_N"] = block_n
                if name in ("forward", "dq"):
                    constexprs["BLOCK_MEM"] = BLOCK_MEM
                signature, constants = _signature(kernel, dtype, constexprs)
                configs.append((kernel, signature, constants, dict(num_warps=num_warps, num_stages=num_stages)))
            signature, constants = _signature(_attention_backward_delta_kernel, dtype,
                                              dict(HEAD_DIM=head_dim, BLOCK_M=_DELTA_ELEMENTS // head_dim))
            configs.append((_attention_backward_delta_kernel, signature, constants, dict(num_warps=4)))
    return configs
