"""Flash attention with memory key/values: the Triton kernel against its baselines, bf16, head dim 32, 4 slots.

Targets (H100/H200, the project's): forward >= 300 TFLOP/s and backward >= 200 TFLOP/s at N=4096, and >= 1.2x
the best SDPA backend at N in {256, 1024, 4096, 16384}; N=64 (a 64x64 image's middle stage) rides along.

Implementations, each on the same shapes:
- triton: fastunet.kernels.attention.packed_attention on the (B, 3*heads*d, H, W) to_qkv output itself (the
  Unet's layout and call: one dqkv and one dmem_kv gradient), memory slots read from their own tensor;
- reference / reference_compiled: fastunet.reference.attention (fp32 einsum math), eager and torch.compile'd;
- sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math: torch's scaled_dot_product_attention restricted to one
  backend with torch.nn.attention.sdpa_kernel. SDPA takes one key tensor, so the memory slots are concatenated to
  the keys/values, and q made contiguous, OUTSIDE the timed region: SDPA is timed on its preferred inputs, which
  favours it (the Unet would pay that concatenation and copy on every call). A backend that refuses the inputs is
  skipped with its reason.
The providers that materialize the (N, N+M) scores (reference, reference_compiled, sdpa_math) skip, with the
reason, where those scores alone would pass MATERIALIZED_SCORES_LIMIT bytes in fp32 (N=16384: 32 GiB, and their
backward keeps several such tensors).
Passes: "forward" (no grad) and "forward_backward" (forward, then gradients of every input from a fixed output
gradient). FLOPs: 4*B*heads*N*(N+M)*d for the forward, 2.5 times that for the backward, so 3.5 times for
forward_backward. The TFLOP/s in extra_info come from the device median (triton.testing.do_bench).

The group baseline (relative speeds printed after the table, see bench/conftest.py) is sdpa_flash.
Everything skips without a CUDA GPU. On any machine, `python bench/bench_attention.py` prints the GPU kernels of
one forward+backward of the op and of one Attention layer as the Unet calls it (bench/kernel_count.py, through
the Triton interpreter on CPU).
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from measure import CUDA, GPU_ONLY_REASON, pass_step, record_kernel_counts, run_benchmark


HEADS, HEAD_DIM, MEM = 4, 32, 4
# Batch per sequence length: enough (batch * heads) programs to fill an H100 at every N.
BATCH = {64: 512, 256: 128, 1024: 32, 4096: 32, 16384: 8}
MATERIALIZING = ("reference", "reference_compiled", "sdpa_math")
MATERIALIZED_SCORES_LIMIT = 16 << 30  # fp32 scores: N=4096 at batch 32 8 GiB, N=16384 at batch 8 32 GiB
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}
IMPLEMENTATIONS = ["triton", "reference", "reference_compiled", *SDPA_BACKENDS]

_compiled_reference = None


def _reference_compiled():
    global _compiled_reference
    if _compiled_reference is None:
        from fastunet.reference import attention as reference_attention

        _compiled_reference = torch.compile(reference_attention)
    return _compiled_reference


def _inputs(n, requires_grad):
    """q, k, v views of a to_qkv output (B, 3*heads*d, H, W) and the memory slots, all bf16 on the GPU."""
    side = math.isqrt(n)
    generator = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(BATCH[n], 3 * HEADS * HEAD_DIM, side, side, device="cuda", dtype=torch.bfloat16,
                      generator=generator)
    mem_kv = torch.randn(2, HEADS, MEM, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
    return qkv.requires_grad_(requires_grad), mem_kv.requires_grad_(requires_grad)


def _split(qkv, mem_kv):
    q, k, v = qkv.flatten(2).unflatten(1, (3, HEADS, HEAD_DIM)).transpose(-1, -2).unbind(1)
    return q, k, v, mem_kv[0], mem_kv[1]


def _sdpa_callable(backend_name, qkv, mem_kv, requires_grad):
    """An SDPA call on inputs prepared here, outside the timed region, and the leaves to differentiate."""
    q, k, v, mem_k, mem_v = (t.detach() for t in _split(qkv, mem_kv))
    batch = q.shape[0]
    keys = torch.cat((mem_k.expand(batch, -1, -1, -1), k), dim=2)
    values = torch.cat((mem_v.expand(batch, -1, -1, -1), v), dim=2)
    leaves = [t.contiguous().requires_grad_(requires_grad) for t in (q, keys, values)]
    backend = getattr(torch.nn.attention.SDPBackend, SDPA_BACKENDS[backend_name])

    def call():
        with torch.nn.attention.sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*leaves)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except RuntimeError as error:
            reasons = "; ".join(str(w.message) for w in caught)
            pytest.skip(f"{backend_name} refuses (B={batch}, heads={HEADS}, N={q.shape[2]}, keys={keys.shape[2]}, "
                        f"d={HEAD_DIM}, bf16): {str(error).splitlines()[0]} {reasons}")
    return call, leaves


@pytest.mark.skipif(not CUDA, reason=GPU_ONLY_REASON)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("n", sorted(BATCH))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_attention(benchmark, implementation, n, mode):
    benchmark.group = f"attention-{mode}-N{n}"
    scores_bytes = BATCH[n] * HEADS * n * (n + MEM) * 4
    if implementation in MATERIALIZING and scores_bytes > MATERIALIZED_SCORES_LIMIT:
        pytest.skip(f"{implementation} materializes the {BATCH[n]}x{HEADS}x{n}x{n + MEM} scores, "
                    f"{scores_bytes / 2**30:.0f} GiB in fp32 (over {MATERIALIZED_SCORES_LIMIT >> 30} GiB)")
    requires_grad = mode == "forward_backward"
    qkv, mem_kv = _inputs(n, requires_grad)
    if implementation.startswith("sdpa"):
        call, leaves = _sdpa_callable(implementation, qkv, mem_kv, requires_grad)
    else:
        if implementation == "triton":
            from fastunet.kernels.attention import attention as fn
        elif implementation == "reference":
            from fastunet.reference import attention as fn
        else:
            fn = _reference_compiled()
        leaves = [qkv, mem_kv]
        if implementation == "triton":
            from fastunet.kernels.attention import packed_attention

            def call():
                return packed_attention(qkv, mem_kv, HEADS)
        else:
            def call():
                return fn(*_split(qkv, mem_kv))

    step = pass_step(call, leaves, mode)

    forward_flops = 4 * BATCH[n] * HEADS * n * (n + MEM) * HEAD_DIM
    info = {}
    if implementation == "triton":
        # The launch configurations of this GPU's table (BLOCK_M, BLOCK_N, num_warps, num_stages), for the record.
        from fastunet.kernels import attention as kernel_module

        kernels = ("forward", "dq", "dkdv") if requires_grad else ("forward",)
        info["tiles"] = {k: kernel_module._config(k, torch.bfloat16, HEAD_DIM, qkv.device) for k in kernels}
    run_benchmark(benchmark, step, flops=forward_flops * (3.5 if requires_grad else 1.0), rounds=10,
                  baseline=implementation == "sdpa_flash", batch=BATCH[n], heads=HEADS, n=n, mem=MEM,
                  head_dim=HEAD_DIM, dtype="bfloat16", **info)
    del qkv, mem_kv, leaves
    torch.cuda.empty_cache()


def kernel_counts(batch=2, heads=2, dim_head=16, side=4):
    """{what: KernelCount} of one forward+backward of the packed op (bf16, fp32 memory slots) and of one Attention
    layer under bf16 autocast with the residual, as the Unet calls it, on the Triton backend."""
    from kernel_count import count_gpu_kernels, count_layer_step

    import fastunet
    from fastunet.attention import Attention
    from fastunet.kernels.attention import packed_attention

    qkv = torch.randn(batch, 3 * heads * dim_head, side, side).bfloat16().requires_grad_()
    mem_kv = torch.randn(2, heads, MEM, dim_head, requires_grad=True)
    layer = Attention(heads * dim_head, heads=heads, dim_head=dim_head)
    x = torch.randn(batch, heads * dim_head, side, side).bfloat16().requires_grad_()
    grad = torch.ones_like(x)  # made outside the counted steps

    def op_step():
        out = packed_attention(qkv, mem_kv, heads)
        torch.autograd.grad(out, (qkv, mem_kv), grad)

    with fastunet.use_backend("triton"):
        return {"packed_attention forward+backward": count_gpu_kernels(op_step),
                "Attention layer forward+backward (bf16 autocast, residual)": count_layer_step(layer, x, grad)}


def test_attention_kernel_count(benchmark, capsys):
    """Prints (and keeps in extra_info) the GPU kernels of the packed op and of one layer forward+backward as the
    Unet calls it: a regression shows here without a GPU. A count, not a timing: nothing is asserted here (the
    bounds are asserted in tests/)."""
    record_kernel_counts(benchmark, capsys, "attention", __file__, lambda: {"bfloat16": kernel_counts()})


if __name__ == "__main__":
    import json
    import os
    import sys

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastunet is imported
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    counts = kernel_counts()
    for what, counted in counts.items():
        print(f"{what}: {counted.summary(top=20)}")
    # Last line, read by the benchmark entry below when it runs this file under the interpreter.
    print(json.dumps({"bfloat16": {what: counted.total for what, counted in counts.items()}}))
