"""Reference for full attention over the layer's learned memory key/values followed by the image positions."""

import torch
import torch.nn.functional as F

from fastunet.reference.precision import upcast


def attention(q, k, v, mem_k, mem_v, sdpa=False, dropout=0.0, scale=None):
    """`softmax(q [mem_k; k]^T * scale) [mem_v; v]`, non-causal, computed in fp32, returned in q.dtype.

    q, k, v: (B, heads, N, d), any strides, one float dtype.
    mem_k, mem_v: (heads, M, d), M >= 0, any float dtype; they come before the N image keys/values.
    sdpa: compute with torch's scaled_dot_product_attention (any backend it picks) instead of einsum;
        the same math, usually faster and lighter in memory.
    dropout: probability of zeroing each attention weight (the survivors scaled by 1 / (1 - dropout)), as
        upstream's Attend in training; 0 disables it.
    scale: the softmax scale, d^-0.5 when None.
    Returns (B, heads, N, d).
    """
    batch = q.shape[0]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = torch.cat((upcast(mem_k).expand(batch, -1, -1, -1), upcast(k)), dim=2)
    values = torch.cat((upcast(mem_v).expand(batch, -1, -1, -1), upcast(v)), dim=2)
    query = upcast(q)
    if sdpa:
        out = F.scaled_dot_product_attention(query, keys, values, dropout_p=dropout, scale=scale)
    else:
        # Scaling q (N x d) instead of the scores (N x (M + N)): the same product, a smaller pass.
        similarity = torch.einsum("b h i d, b h j d -> b h i j", query * scale, keys)
        weights = similarity.softmax(dim=-1)
        if dropout > 0:
            weights = F.dropout(weights, dropout)
        out = torch.einsum("b h i j, b h j d -> b h i d", weights, values)
    return out.to(q.dtype)


def packed_attention(qkv, mem_kv, heads, sdpa=False, dropout=0.0, scale=None):
    """`attention` on the to_qkv output, as upstream's Attention splits it.

    qkv: (B, 3*heads*d, H, W), any strides: q, k, v are its channel chunks, each (heads, d) major to minor.
    mem_kv: (2, heads, M, d), any float dtype: memory keys, then values.
    sdpa, dropout, scale: as in `attention`.
    Returns (B, heads*d, H, W) in qkv.dtype.
    """
    batch, channels, height, width = qkv.shape
    q, k, v = qkv.flatten(2).unflatten(1, (3, heads, channels // (3 * heads))).transpose(-1, -2).unbind(1)
    out = attention(q, k, v, mem_kv[0], mem_kv[1], sdpa=sdpa, dropout=dropout, scale=scale)
    return out.transpose(-1, -2).reshape(batch, channels // 3, height, width)
