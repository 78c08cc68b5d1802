"""Reference for full attention over the layer's learned memory key/values followed by the image positions."""

import torch
import torch.nn.functional as F

from fastunet.reference.precision import upcast


def attention(q, k, v, mem_k, mem_v, sdpa=False):
    """`softmax(q [mem_k; k]^T * d^-0.5) [mem_v; v]`, non-causal, computed in fp32, returned in q.dtype.

    q, k, v: (B, heads, N, d), any strides, one float dtype.
    mem_k, mem_v: (heads, M, d), M >= 0, any float dtype; they come before the N image keys/values.
    sdpa: compute with torch's scaled_dot_product_attention (any backend it picks) instead of einsum;
        the same math, usually faster and lighter in memory.
    Returns (B, heads, N, d).
    """
    batch = q.shape[0]
    keys = torch.cat((upcast(mem_k).expand(batch, -1, -1, -1), upcast(k)), dim=2)
    values = torch.cat((upcast(mem_v).expand(batch, -1, -1, -1), upcast(v)), dim=2)
    query = upcast(q)
    if sdpa:
        out = F.scaled_dot_product_attention(query, keys, values)
    else:
        # Scaling q (N x d) instead of the scores (N x (M + N)): the same product, a smaller pass.
        similarity = torch.einsum("b h i d, b h j d -> b h i j", query * q.shape[-1] ** -0.5, keys)
        out = torch.einsum("b h i j, b h j d -> b h i d", similarity.softmax(dim=-1), values)
    return out.to(q.dtype)
