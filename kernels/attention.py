"""Flash attention over the layer's learned memory key/values followed by the image positions, in Triton.

    out = softmax(q [mem_k; k]^T * d^-0.5) [mem_v; v]        (non-causal; fastunet.reference.attention)

Forward: one program per (block of BLOCK_M queries, batch*head). It streams the keys/values through an online
softmax (FlashAttention-2) in two loops that read from two pointers: first the M memory slots (heads, M, d) in
blocks of BLOCK_MEM=16 (the smallest tile a tensor-core dot accepts; M=4 in the Unet), then the N image
positions in blocks of BLOCK_N, whose full blocks run unmasked and whose last partial block (N not a multiple of
BLOCK_N) runs masked. The concatenation [mem; k] is never materialized. It saves the base-2 logsumexp of each
query row (fp32) for the backward.

Backward (FlashAttention-2, deterministic, no atomics):
1. `delta = rowsum(dO * O)` (fp32), one program per block of queries;
2. dk/dv: one program per block of keys, looping over all query blocks. The first cdiv(M, BLOCK_MEM) programs of
   each batch*head own the memory slots and write their gradients as per-batch fp32 partials (B, heads, M, d),
   summed over the batch afterwards in torch (a fixed-order reduction); the others own BLOCK_N image keys;
3. dq: one program per block of queries, looping over memory slots then image keys, as the forward does.

Precision: dots take q's dtype (memory slots are cast to it on load) and accumulate in fp32; softmax statistics,
logsumexp, delta and all accumulators are fp32. fp16/bf16 run on tensor cores. fp32 inputs follow torch's own
matmul switch: with `torch.get_float32_matmul_precision() == "highest"` (torch's default) the dots are IEEE fp32
(`input_precision="ieee"`, no tensor cores) and match the fp32 reference to ~1e-5; with "high" or "medium"
(the user opted into TF32 for matmuls) they are TF32 on tensor cores, with errors of ~1e-3 relative, like
torch's own TF32 matmuls. Under the Triton interpreter every dot operand is upcast to fp32 after rounding to its
dtype (bf16 `tl.dot` returns garbage there, triton issue 11584); the GPU path keeps 16-bit tensor-core dots.

Layouts: q, k, v, grad_out may have any strides. In the Unet they are views of the to_qkv 1x1-conv output
(B, 3*heads*d, H, W), i.e. the positions are contiguous (stride 1 along N); tiles are therefore indexed with
both strides, and Triton specializes a stride equal to 1 at compile time, so loads coalesce along N there
(and along d for contiguous or channels_last inputs). The output, dq, dk and dv are allocated with the memory
of a contiguous (B, heads, d, N) tensor, i.e. (B, heads*d, H, W) NCHW, exactly what to_out reads: the returned
(B, heads, N, d) tensors have strides (heads*d*N, d*N, 1, N). They are fresh tensors created with
`torch.empty_strided`, not views, which is what a torch.library custom op may return.

Head dims 16, 32, 64 and 128 run directly; other head dims up to 128 are zero-padded to the next of those
(an extra copy of q, k, v; the scale stays d^-0.5), larger ones are rejected.
"""

import math

import torch
import triton
import triton.language as tl

from . import INTERPRETING

LOG2E = 1.4426950408889634
# Memory slots go through the kernels in blocks of this many; 16 is the smallest dot dimension the GPU
# compiler accepts, and the Unet's M=4 fits in one block.
BLOCK_MEM = 16
HEAD_DIMS = (16, 32, 64, 128)


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
    K, V,  # key/value base pointers of this (batch, head) or of this head's memory slots
    stride_kn, stride_kd, stride_vn, stride_vd,  # strides of K and V along positions and head dim
    start, n_keys,  # first key of this block; number of keys behind K/V
    qk_scale,  # d^-0.5 * log2(e): scores go to base 2 so the softmax uses exp2
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # whether this block may run past n_keys
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
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
    qk = tl.dot(q, _operand(k, DTYPE, DOT_FP32), input_precision=FP32_PRECISION)
    if MASK_KEYS:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    # The scale multiplies the fp32 scores (fused with the max subtraction into one FMA) rather than q, which
    # would round q once more in its 16-bit dtype.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(_operand(p, DTYPE, DOT_FP32), _operand(v, DTYPE, DOT_FP32), acc, input_precision=FP32_PRECISION)
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
    qk_scale,  # d^-0.5 * log2(e), fp32
    HEAD_DIM: tl.constexpr,  # d, a power of two >= 16
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # image keys per inner step
    BLOCK_MEM: tl.constexpr,  # memory slots per inner step
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (interpreter only)
    FP32_PRECISION: tl.constexpr,  # "ieee" or "tf32": how dots of fp32 inputs run (ignored for 16-bit)
):
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 base offsets: B * 3*heads*d * N can pass 2**31 elements for large batches at 128x128.
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
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_valid[:, None], other=0.0)
    q = _operand(q, DTYPE, DOT_FP32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Memory slots first (they come before the image keys; the order does not change the softmax).
    for start in range(0, M_MEM, BLOCK_MEM):
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, MEM_K, MEM_V, stride_mkm, stride_mkd, stride_mvm, stride_mvd,
                                       start, M_MEM, qk_scale, HEAD_DIM, BLOCK_MEM, True, DTYPE, DOT_FP32,
                                       FP32_PRECISION)
    # Full blocks of image keys without masks, then the partial last one with masks.
    n_full = (N_CTX // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, start,
                                       N_CTX, qk_scale, HEAD_DIM, BLOCK_N, False, DTYPE, DOT_FP32, FP32_PRECISION)
    if n_full < N_CTX:
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, n_full,
                                       N_CTX, qk_scale, HEAD_DIM, BLOCK_N, True, DTYPE, DOT_FP32, FP32_PRECISION)

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
    out = tl.load(OUT + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                  mask=row_valid[:, None], other=0.0)
    grad = tl.load(GRAD_OUT + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gn
                   + offs_d[None, :] * stride_gd, mask=row_valid[:, None], other=0.0)
    delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_CTX + offs_m, delta, mask=row_valid)


@triton.jit
def _dkdv_step(
    dk, dv, k, v,  # fp32 accumulators (BLOCK_KEYS, HEAD_DIM); this program's key and value tiles (dot operands)
    Q, GRAD_OUT, LSE, DELTA,  # this (batch, head)'s base pointers
    stride_qn, stride_qd, stride_gn, stride_gd,  # strides of Q and GRAD_OUT along positions and head dim
    start_m, N_CTX, qk_scale,  # first query of this step; N; d^-0.5 * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK_QUERIES: tl.constexpr,  # whether this block of queries may run past N
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # q is read transposed, (HEAD_DIM, BLOCK_M): the scores are computed transposed, keys along rows.
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
    pT = tl.math.exp2(tl.dot(k, qT, input_precision=FP32_PRECISION) * qk_scale - lse[None, :])
    if MASK_QUERIES:
        pT = tl.where(valid[None, :], pT, 0.0)
    dv = tl.dot(_operand(pT, DTYPE, DOT_FP32), g, dv, input_precision=FP32_PRECISION)
    dpT = tl.dot(v, tl.trans(g), input_precision=FP32_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(_operand(dsT, DTYPE, DOT_FP32), tl.trans(qT), dk, input_precision=FP32_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_keys(
    K, V,  # base pointers of this program's keys/values (image positions or memory slots)
    stride_kn, stride_kd, stride_vn, stride_vd,  # their strides along positions and head dim
    DK, DV,  # where this program's key/value gradients go
    stride_dkn, stride_dkd, stride_dvn, stride_dvd,  # their strides along positions and head dim
    start_n, n_keys,  # first key of this program; number of keys behind K/V
    Q, GRAD_OUT, LSE, DELTA,  # this (batch, head)'s base pointers
    stride_qn, stride_qd, stride_gn, stride_gd,  # strides of Q and GRAD_OUT along positions and head dim
    N_CTX, qk_scale, sm_scale,  # N; d^-0.5 * log2(e); d^-0.5
    HEAD_DIM: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_M: tl.constexpr,
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """Gradients of BLOCK_KEYS keys and values from all N queries."""
    offs_n = start_n + tl.arange(0, BLOCK_KEYS)
    offs_d = tl.arange(0, HEAD_DIM)
    key_valid = offs_n < n_keys
    # Keys past n_keys load as zeros: their scores are finite and their gradients are never stored.
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=key_valid[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=key_valid[:, None], other=0.0)
    k = _operand(k, DTYPE, DOT_FP32)
    v = _operand(v, DTYPE, DOT_FP32)
    dk = tl.zeros([BLOCK_KEYS, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_KEYS, HEAD_DIM], dtype=tl.float32)
    m_full = (N_CTX // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, stride_qn, stride_qd, stride_gn, stride_gd, start_m,
                            N_CTX, qk_scale, HEAD_DIM, BLOCK_M, False, DTYPE, DOT_FP32, FP32_PRECISION)
    if m_full < N_CTX:
        dk, dv = _dkdv_step(dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, stride_qn, stride_qd, stride_gn, stride_gd, m_full,
                            N_CTX, qk_scale, HEAD_DIM, BLOCK_M, True, DTYPE, DOT_FP32, FP32_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=key_valid[:, None])
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=key_valid[:, None])


@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V,  # (B, heads, N, HEAD_DIM) forward inputs, one dtype, any strides
    MEM_K, MEM_V,  # (heads, M, HEAD_DIM) memory slots, any float dtype
    GRAD_OUT,  # (B, heads, N, HEAD_DIM) gradient of the output, Q's dtype, any strides
    LSE, DELTA,  # (B, heads, N) fp32, contiguous: forward base-2 logsumexp; rowsum(GRAD_OUT * OUT)
    DK, DV,  # (B, heads, N, HEAD_DIM) gradients of K and V, Q's dtype
    DMEM_K, DMEM_V,  # (B, heads, M, HEAD_DIM) fp32, contiguous: per-batch partial gradients of the memory slots
    stride_qb, stride_qh, stride_qn, stride_qd,  # strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # strides of V
    stride_mkh, stride_mkm, stride_mkd,  # strides of MEM_K
    stride_mvh, stride_mvm, stride_mvd,  # strides of MEM_V
    stride_gb, stride_gh, stride_gn, stride_gd,  # strides of GRAD_OUT
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # strides of DK
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,  # strides of DV
    HEADS,  # number of heads: program_id(1) is batch * HEADS + head
    N_CTX,  # N
    M_MEM,  # M (may be 0)
    qk_scale,  # d^-0.5 * log2(e)
    sm_scale,  # d^-0.5
    HEAD_DIM: tl.constexpr,  # d, a power of two >= 16
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # image keys per program
    BLOCK_MEM: tl.constexpr,  # memory slots per program
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (interpreter only)
    FP32_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 inputs
):
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // HEADS).to(tl.int64)
    off_h = (pid_bh % HEADS).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    GRAD_OUT += off_b * stride_gb + off_h * stride_gh
    LSE += pid_bh.to(tl.int64) * N_CTX
    DELTA += pid_bh.to(tl.int64) * N_CTX
    # The memory programs come first so that they start in the first wave instead of trailing the last.
    n_mem_blocks = tl.cdiv(M_MEM, BLOCK_MEM)
    if pid_n < n_mem_blocks:
        # Memory slots: every batch element contributes; this program writes batch off_b's share, alone.
        partial = pid_bh.to(tl.int64) * M_MEM * HEAD_DIM
        _dkdv_keys(MEM_K + off_h * stride_mkh, MEM_V + off_h * stride_mvh, stride_mkm, stride_mkd, stride_mvm,
                   stride_mvd, DMEM_K + partial, DMEM_V + partial, HEAD_DIM, 1, HEAD_DIM, 1, pid_n * BLOCK_MEM, M_MEM,
                   Q, GRAD_OUT, LSE, DELTA, stride_qn, stride_qd, stride_gn, stride_gd, N_CTX, qk_scale, sm_scale,
                   HEAD_DIM, BLOCK_MEM, BLOCK_M, DTYPE, DOT_FP32, FP32_PRECISION)
    else:
        _dkdv_keys(K + off_b * stride_kb + off_h * stride_kh, V + off_b * stride_vb + off_h * stride_vh, stride_kn,
                   stride_kd, stride_vn, stride_vd, DK + off_b * stride_dkb + off_h * stride_dkh,
                   DV + off_b * stride_dvb + off_h * stride_dvh, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                   (pid_n - n_mem_blocks) * BLOCK_N, N_CTX, Q, GRAD_OUT, LSE, DELTA, stride_qn, stride_qd, stride_gn,
                   stride_gd, N_CTX, qk_scale, sm_scale, HEAD_DIM, BLOCK_N, BLOCK_M, DTYPE, DOT_FP32, FP32_PRECISION)


@triton.jit
def _dq_block(
    dq, q, g, lse, delta,  # fp32 accumulator (BLOCK_M, HEAD_DIM); q, grad-out tiles (dot operands); row stats
    K, V,  # key/value base pointers of this (batch, head) or of this head's memory slots
    stride_kn, stride_kd, stride_vn, stride_vd,  # their strides along positions and head dim
    start, n_keys, qk_scale,  # first key of this block; number of keys behind K/V; d^-0.5 * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # whether this block may run past n_keys
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
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
    p = tl.math.exp2(tl.dot(q, kT, input_precision=FP32_PRECISION) * qk_scale - lse[:, None])
    if MASK_KEYS:
        p = tl.where(valid[None, :], p, 0.0)
    dp = tl.dot(g, vT, input_precision=FP32_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(_operand(ds, DTYPE, DOT_FP32), tl.trans(kT), dq, input_precision=FP32_PRECISION)
    return dq


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V,  # (B, heads, N, HEAD_DIM) forward inputs, one dtype, any strides
    MEM_K, MEM_V,  # (heads, M, HEAD_DIM) memory slots, any float dtype
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
    qk_scale,  # d^-0.5 * log2(e)
    sm_scale,  # d^-0.5
    HEAD_DIM: tl.constexpr,  # d, a power of two >= 16
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # image keys per inner step
    BLOCK_MEM: tl.constexpr,  # memory slots per inner step
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (interpreter only)
    FP32_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 inputs
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
                       M_MEM, qk_scale, HEAD_DIM, BLOCK_MEM, True, DTYPE, DOT_FP32, FP32_PRECISION)
    n_full = (N_CTX // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, g, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, start, N_CTX, qk_scale,
                       HEAD_DIM, BLOCK_N, False, DTYPE, DOT_FP32, FP32_PRECISION)
    if n_full < N_CTX:
        dq = _dq_block(dq, q, g, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, n_full, N_CTX,
                       qk_scale, HEAD_DIM, BLOCK_N, True, DTYPE, DOT_FP32, FP32_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_valid[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------

# One configuration per (kernel, dot precision, head dim) on the GPU, chosen ahead of time so that every one of them
# is compiled by the tests (gpu_compile_configs) and none spills registers. Dot precision: "16" for fp16/bf16,
# "tf32" and "ieee" for fp32. Values: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# - 16-bit forward: 128 queries x 64 keys per step, 4 warps (one warpgroup: wgmma needs 64 rows per warpgroup);
#   d=128 takes 8 warps to hold its (128, 128) fp32 accumulator without spilling.
# - backward dk/dv: 128 keys per program (the accumulators dk, dv live across the whole query loop), 64 queries
#   per step; dq: 128 queries per program, 64 keys per step. 8 warps hold the larger working set of the backward.
# - fp32 IEEE dots run on the FMA units, register-hungry: smaller tiles.
_GPU_CONFIGS = {
    "forward": {
        "16": {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3)},
        "tf32": {16: (128, 64, 4, 2), 32: (128, 64, 4, 2), 64: (128, 64, 8, 2), 128: (64, 64, 4, 2)},
        "tf32x3": {16: (128, 64, 4, 2), 32: (128, 64, 4, 2), 64: (128, 64, 8, 2), 128: (64, 64, 4, 2)},
    },
    "dkdv": {  # BLOCK_M here is the query step, BLOCK_N the keys of one program
        "16": {16: (64, 128, 8, 3), 32: (64, 128, 8, 3), 64: (64, 128, 8, 3), 128: (64, 64, 8, 2)},
        "tf32": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (32, 64, 8, 2)},
        "tf32x3": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (32, 64, 8, 2)},
    },
    "dq": {
        "16": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (64, 64, 8, 2)},
        "tf32": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (64, 32, 8, 2)},
        "tf32x3": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (64, 32, 8, 2)},
    },
}
# The delta preprocess is a bandwidth-bound row reduction: 128 rows per program.
_DELTA_BLOCK_M = 128
# The interpreter runs one configuration; its cost is per program and per operation, so tiles are large. 32x32
# still takes several query blocks and a masked last key block at the test shapes (N = 35, 64, 100).
_INTERPRETER_CONFIG = (32, 32, 1, 1)


def _dot_precision(dtype):
    """How dots of this input dtype run: "16" (fp16/bf16 tensor cores), "tf32" or "ieee" (fp32, see above)."""
    if dtype != torch.float32:
        return "16"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _config(kernel, dtype, head_dim):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernel` for inputs of `dtype` and head dim `head_dim`."""
    if INTERPRETING:
        return _INTERPRETER_CONFIG
    return _GPU_CONFIGS[kernel][_dot_precision(dtype)][head_dim]


def _fp32_precision(dtype):
    # The kernels' FP32_PRECISION; it has no effect on 16-bit dots, where "tf32x3" is passed as a fixed value.
    precision = _dot_precision(dtype)
    return "tf32x3" if precision == "16" else precision


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
        FP32_PRECISION=_fp32_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def _backward(grad_out, q, k, v, mem_k, mem_v, out, lse, scale):
    batch, heads, n, d = q.shape
    m = mem_k.shape[1]
    dq, dk, dv = _empty_like_output(q), _empty_like_output(q), _empty_like_output(q)
    # Per-batch partial gradients of the memory slots, each element written by exactly one program.
    dmem_k_partial = torch.empty((batch, heads, m, d), dtype=torch.float32, device=q.device)
    dmem_v_partial = torch.empty_like(dmem_k_partial)
    if q.numel() > 0:
        grad_out = grad_out.to(q.dtype)
        delta = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
        delta_block = 32 if INTERPRETING else _DELTA_BLOCK_M
        _attention_backward_delta_kernel[(triton.cdiv(n, delta_block), batch * heads)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n, HEAD_DIM=d, BLOCK_M=delta_block,
            num_warps=1 if INTERPRETING else 4,
        )
        mem_k_in, mem_v_in = _mem_or_standin(mem_k, k), _mem_or_standin(mem_v, v)
        common = dict(HEAD_DIM=d, BLOCK_MEM=BLOCK_MEM, DOT_FP32=INTERPRETING, FP32_PRECISION=_fp32_precision(q.dtype))
        scales = (scale * LOG2E, scale)

        block_m, block_n, num_warps, num_stages = _config("dkdv", q.dtype, d)
        dmem_k_out = dmem_k_partial if m > 0 else dk  # stand-in pointers, never written when M = 0
        dmem_v_out = dmem_v_partial if m > 0 else dv
        grid = (triton.cdiv(m, BLOCK_MEM) + triton.cdiv(n, block_n), batch * heads)
        _attention_backward_dkdv_kernel[grid](
            q, k, v, mem_k_in, mem_v_in, grad_out, lse, delta, dk, dv, dmem_k_out, dmem_v_out,
            *q.stride(), *k.stride(), *v.stride(), *mem_k_in.stride(), *mem_v_in.stride(), *grad_out.stride(),
            *dk.stride(), *dv.stride(), heads, n, m, *scales,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common,
        )

        block_m, block_n, num_warps, num_stages = _config("dq", q.dtype, d)
        _attention_backward_dq_kernel[(triton.cdiv(n, block_m), batch * heads)](
            q, k, v, mem_k_in, mem_v_in, grad_out, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *mem_k_in.stride(), *mem_v_in.stride(), *grad_out.stride(),
            *dq.stride(), heads, n, m, *scales,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common,
        )
    else:
        dmem_k_partial.zero_()
        dmem_v_partial.zero_()
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


def attention(q, k, v, mem_k, mem_v):
    """`softmax(q [mem_k; k]^T * d^-0.5) [mem_v; v]`, non-causal (fastunet.reference.attention), differentiable.

    q, k, v: (B, heads, N, d), one dtype among fp32/fp16/bf16, any strides, d <= 128.
    mem_k, mem_v: (heads, M, d), M >= 0, any float dtype (fp32 parameters under autocast); cast to q's dtype.
    Returns (B, heads, N, d) in q.dtype with strides (heads*d*N, d*N, 1, N): the memory of a contiguous
    (B, heads*d, H, W) tensor, which to_out reads without a copy. Head dims outside HEAD_DIMS are zero-padded to
    the next one (their result is then a slice of the padded output); head dims above 128 raise ValueError.
    """
    d = q.shape[-1]
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
    """Every (kernel, signature, constexprs, options) a GPU launch can select: for fp16, bf16 and fp32 (both its
    IEEE and TF32 dot precisions), each head dim of HEAD_DIMS, and the four kernels, in the Unet's layout with the
    memory slots in q's dtype (fp32 memory slots under autocast change only the cast after their load)."""
    configs = []
    for dtype, precision in ((torch.float16, "16"), (torch.bfloat16, "16"), (torch.float32, "tf32x3"),
                             (torch.float32, "tf32")):
        fp32_precision = "tf32x3" if precision == "16" else precision
        for head_dim in HEAD_DIMS:
            common = dict(HEAD_DIM=head_dim, BLOCK_MEM=BLOCK_MEM, DOT_FP32=False, FP32_PRECISION=fp32_precision)
            for kernel, name in ((_attention_forward_kernel, "forward"), (_attention_backward_dkdv_kernel, "dkdv"),
                                 (_attention_backward_dq_kernel, "dq")):
                block_m, block_n, num_warps, num_stages = _GPU_CONFIGS[name][precision][head_dim]
                signature, constants = _signature(kernel, dtype, dict(common, BLOCK_M=block_m, BLOCK_N=block_n))
                configs.append((kernel, signature, constants, dict(num_warps=num_warps, num_stages=num_stages)))
            if precision != "tf32":  # the delta kernel has no dots
                signature, constants = _signature(_attention_backward_delta_kernel, dtype,
                                                  dict(HEAD_DIM=head_dim, BLOCK_M=_DELTA_BLOCK_M))
                configs.append((_attention_backward_delta_kernel, signature, constants, dict(num_warps=4)))
    return configs
