"""The one dispatch point between the Triton kernels and the pure-PyTorch reference of each fused op.

Every function here checks its inputs (raising before any computation), asks fastunet.backend which
implementation to use, and calls it. Both implementations take the same arguments and return the same
shapes and dtypes; the reference in fastunet.reference defines the result.

The Triton kernels are imported with this module, not at the first call: torch.compile cannot trace an import
inside forward (Dynamo refuses importlib), and resolving every op here leaves nothing in the per-call path but
dictionary lookups and comparisons, which trace without a graph break. Triton decides between interpreter and
compiler when a kernel is decorated, so TRITON_INTERPRET must be set before fastunet is imported (as before).
"""

import importlib

from fastunet import reference
from fastunet.backend import TRITON_INSTALLED, requested_backend, use_triton
from fastunet.checks import check_same_device, check_tensor, float64_reason

# op name -> module of fastunet.kernels that implements it with Triton (a function of the same name).
TRITON_KERNELS = {
    "attention": "fastunet.kernels.attention",
    "group_norm_act": "fastunet.kernels.group_norm",
    "linear_attention": "fastunet.kernels.linear_attention",
    "packed_attention": "fastunet.kernels.attention",
    "packed_linear_attention": "fastunet.kernels.linear_attention",
    "rms_norm_act": "fastunet.kernels.rms_norm",
}


def _resolve_triton_kernels():
    """op name -> (Triton function, its module's `unsupported_reason` or None); empty without triton."""
    if not TRITON_INSTALLED:
        return {}
    resolved = {}
    for op_name, module_name in TRITON_KERNELS.items():
        module = importlib.import_module(module_name)
        resolved[op_name] = (getattr(module, op_name), getattr(module, "unsupported_reason", None))
    return resolved


TRITON_FUNCTIONS = _resolve_triton_kernels()


def _implementation(op_name, device, args):
    """The function that runs `op_name` on `device` for these arguments under the backend in force.

    A kernel module may define `unsupported_reason(*args)`, naming inputs its kernels do not take (e.g. a head dim
    the tiles cannot hold): "auto" then runs the reference for that call, and "triton" raises with the reason.
    The reference is looked up on each call (tests replace it); it is an attribute read, traceable.
    """
    if not use_triton(op_name, device):
        return getattr(reference, op_name)
    kernel, unsupported_reason = TRITON_FUNCTIONS[op_name]
    why = float64_reason(args) or (unsupported_reason(*args) if unsupported_reason is not None else None)
    if why:
        if requested_backend() == "triton":
            raise RuntimeError(f"fastunet backend 'triton' was requested for {op_name}, but {why}")
        return getattr(reference, op_name)
    return kernel


def _check_scale_shift(where, x, scale, shift, residual=None):
    batch, channels = x.shape[:2]
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(where, name, t, shape=(batch, channels))
    if residual is not None:
        check_tensor(where, "residual", residual, shape=tuple(x.shape))
        if residual.dtype != x.dtype:
            raise TypeError(f"{where}: expected residual of x's dtype {x.dtype}, got {residual.dtype}")


def group_norm_act(x, weight, bias, groups, scale=None, shift=None, silu=True, eps=1e-5, residual=None):
    """`silu?(group_norm(x) * (scale + 1) + shift) + residual` in fp32 statistics, returned in x.dtype.

    x (B, C, H, W) fp32/fp16/bf16, any strides; weight, bias (C,) or None; groups divides C;
    scale, shift (B, C) or None (any float dtype); residual: x's shape and dtype, or None.
    """
    where = "group_norm_act"
    check_tensor(where, "x", x, ndim=4, nonempty=True)
    channels = x.shape[1]
    if not isinstance(groups, int) or groups < 1 or channels % groups:
        raise ValueError(f"{where}: expected groups to be a positive int dividing the {channels} channels, got {groups!r}")
    if x.shape[0] * channels // groups * x.shape[2] * x.shape[3] == 1:
        # nn.GroupNorm's own rule: one value in all of the batch's groups is refused; one value per group with a
        # batch of several is normalized (to the bias, as torch does).
        raise ValueError(f"{where}: expected more than one value over the batch per group (B * C / groups * H * W), "
                         f"got 1 for x of shape {tuple(x.shape)} and {groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(where, name, t, shape=(channels,))
    _check_scale_shift(where, x, scale, shift, residual)
    check_same_device(where, x=x, weight=weight, bias=bias, scale=scale, shift=shift, residual=residual)
    args = (x, weight, bias, groups, scale, shift, silu, eps, residual)
    return _implementation(where, x.device, args)(*args)


def rms_norm_act(x, g, scale=None, shift=None, silu=False, eps=1e-12, residual=None):
    """`silu?(x / max(||x||_2 over C, eps) * sqrt(C) * g * (scale + 1) + shift) + residual` per pixel, in x.dtype.

    x (B, C, H, W) fp32/fp16/bf16, any strides; g (C,); scale, shift (B, C) or None; residual: x's shape and
    dtype, or None.
    """
    where = "rms_norm_act"
    check_tensor(where, "x", x, ndim=4, nonempty=True)
    check_tensor(where, "g", g, shape=(x.shape[1],))
    _check_scale_shift(where, x, scale, shift, residual)
    check_same_device(where, x=x, g=g, scale=scale, shift=shift, residual=residual)
    args = (x, g, scale, shift, silu, eps, residual)
    return _implementation(where, x.device, args)(*args)


def _check_qkv(where, q, k, v, mem_k, mem_v, mem_shape):
    check_tensor(where, "q", q, ndim=4, nonempty=True)
    check_tensor(where, "k", k, shape=q.shape)
    check_tensor(where, "v", v, shape=q.shape)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{where}: expected {name} of q's dtype {q.dtype}, got {t.dtype}")
    check_tensor(where, "mem_k", mem_k, shape=mem_shape)
    check_tensor(where, "mem_v", mem_v, shape=mem_k.shape)
    check_same_device(where, q=q, k=k, v=v, mem_k=mem_k, mem_v=mem_v)


def attention(q, k, v, mem_k, mem_v, sdpa=False):
    """`softmax(q [mem_k; k]^T * d^-0.5) [mem_v; v]`, returned in q.dtype.

    q, k, v (B, heads, N, d), one dtype, any strides; mem_k, mem_v (heads, M, d), M >= 0.
    sdpa: on the reference backend, use torch's scaled_dot_product_attention (the Triton kernel is
    already a flash kernel and ignores it). Returns (B, heads, N, d).
    """
    where = "attention"
    _check_qkv(where, q, k, v, mem_k, mem_v, (q.shape[1], None, q.shape[3]))
    args = (q, k, v, mem_k, mem_v)
    implementation = _implementation(where, q.device, args)
    if implementation is reference.attention:
        return implementation(*args, sdpa=sdpa)
    return implementation(*args)


def _check_packed_qkv(where, qkv, mem_kv, heads, mem_layout):
    """Checks of the packed ops' inputs; returns the head dim. mem_layout: "md" for (2, heads, M, d), "dm" for
    (2, heads, d, M)."""
    check_tensor(where, "qkv", qkv, ndim=4, nonempty=True)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise ValueError(f"{where}: expected heads to be a positive int, got {heads!r}")
    channels = qkv.shape[1]
    if channels % (3 * heads):
        raise ValueError(f"{where}: expected qkv with 3 * heads * dim_head channels (heads={heads}), got {channels}")
    d = channels // (3 * heads)
    check_tensor(where, "mem_kv", mem_kv, shape=(2, heads, None, d) if mem_layout == "md" else (2, heads, d, None))
    check_same_device(where, qkv=qkv, mem_kv=mem_kv)
    return d


def packed_attention(qkv, mem_kv, heads, sdpa=False, dropout=0.0, scale=None):
    """`attention` on the to_qkv output itself: one gradient tensor for qkv, one for mem_kv (no joins).

    qkv (B, 3*heads*d, H, W), any strides: q, k, v its channel chunks, each (heads, d) major to minor (upstream's
    rearrange); mem_kv (2, heads, M, d), M >= 0, any float dtype. sdpa: on the reference backend, use torch's
    scaled_dot_product_attention. dropout in [0, 1): on the attention weights (upstream's Attend in training);
    the Triton kernels have none, so "auto" runs the reference for dropout > 0 and "triton" raises. scale: the
    softmax scale, d^-0.5 when None. Returns (B, heads*d, H, W) in qkv.dtype.
    """
    where = "packed_attention"
    _check_packed_qkv(where, qkv, mem_kv, heads, "md")
    if not 0 <= dropout < 1:
        raise ValueError(f"{where}: expected dropout in [0, 1), got {dropout!r}")
    args = (qkv, mem_kv, heads, sdpa, dropout, scale)
    return _implementation(where, qkv.device, args)(*args)


def linear_attention(q, k, v, mem_k, mem_v):
    """Upstream's linear attention with memory key/values, returned in q.dtype.

    q, k, v (B, heads, d, N), one dtype, any strides; mem_k, mem_v (heads, d, M), M >= 0.
    Returns (B, heads, d, N).
    """
    where = "linear_attention"
    _check_qkv(where, q, k, v, mem_k, mem_v, (q.shape[1], q.shape[2], None))
    args = (q, k, v, mem_k, mem_v)
    return _implementation(where, q.device, args)(*args)


def packed_linear_attention(qkv, mem_kv, heads):
    """`linear_attention` on the to_qkv output itself: one gradient tensor for qkv, one for mem_kv (no joins).

    qkv (B, 3*heads*d, H, W), any strides: q, k, v its channel chunks, each (heads, d) major to minor (upstream's
    rearrange); mem_kv (2, heads, d, M), M >= 0, any float dtype. Returns (B, heads*d, H, W) in qkv.dtype.
    """
    where = "packed_linear_attention"
    _check_packed_qkv(where, qkv, mem_kv, heads, "dm")
    args = (qkv, mem_kv, heads)
    return _implementation(where, qkv.device, args)(*args)
