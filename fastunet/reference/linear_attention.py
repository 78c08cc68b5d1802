"""Reference for upstream's LinearAttention core, with the layer's learned memory key/values."""

import torch

from fastunet.reference.precision import upcast


def linear_attention(q, k, v, mem_k, mem_v):
    """Upstream's linear attention, computed in fp32, returned in q.dtype.

    q, k, v: (B, heads, d, N), any strides, one float dtype (N = H*W image positions).
    mem_k, mem_v: (heads, d, M), M >= 0, any float dtype; prepended along positions.
    q is softmaxed over d and then scaled by d^-0.5; [mem_k, k] is softmaxed over the M + N positions;
    context = k v^T (d x d per head); out = context^T q.
    Returns (B, heads, d, N).
    """
    batch, dim_head = q.shape[0], q.shape[2]
    keys = torch.cat((upcast(mem_k).expand(batch, -1, -1, -1), upcast(k)), dim=-1)
    values = torch.cat((upcast(mem_v).expand(batch, -1, -1, -1), upcast(v)), dim=-1)
    # The d^-0.5 scale of q is applied to the (d x d) context instead: the same product, one pass fewer over q.
    context = torch.einsum("b h d n, b h e n -> b h d e", keys.softmax(dim=-1), values) * dim_head**-0.5
    out = torch.einsum("b h d e, b h d n -> b h e n", context, upcast(q).softmax(dim=-2))
    return out.to(q.dtype)


def packed_linear_attention(qkv, mem_kv, heads):
    """`linear_attention` on the to_qkv output, as upstream's LinearAttention splits it.

    qkv: (B, 3*heads*d, H, W), any strides: q, k, v are its channel chunks, each (heads, d) major to minor.
    mem_kv: (2, heads, d, M), any float dtype: memory keys, then values.
    Returns (B, heads*d, H, W) in qkv.dtype.
    """
    batch, channels, height, width = qkv.shape
    q, k, v = qkv.flatten(2).unflatten(1, (3, heads, channels // (3 * heads))).unbind(1)
    out = linear_attention(q, k, v, mem_kv[0], mem_kv[1])
    return out.reshape(batch, channels // 3, height, width)
