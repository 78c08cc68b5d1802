"""Linear attention with memory key/values: the Triton kernel against the reference, eager and torch.compile'd.

Target (H100/H200, the project's): B 32, 4 heads, d 32, N 16384 (128x128) + 4 memory slots, bf16: forward >= 80%
of HBM bandwidth, forward+backward >= 3x eager.

Implementations, each on the same inputs:
- triton: fastunet.kernels.linear_attention.packed_linear_attention on the to_qkv output itself (one dqkv and
  one dmem_kv gradient, as the Unet calls it);
- reference / reference_compiled: fastunet.reference.packed_linear_attention (fp32 math), eager (the group
  baseline, see bench/conftest.py) and under torch.compile.
Inputs as the Unet makes them: q, k, v are views of a to_qkv output (B, 3*heads*d, H, W), NCHW, in the benchmark
dtype; the memory slots mem_kv (2, heads, d, M) are fp32, as the parameter stays under autocast.
Passes: "forward" (no grad) and "forward_backward" (forward, then the gradients of qkv and mem_kv from a fixed
output gradient).
Bytes (the minimum HBM traffic, memory slots and d x d statistics neglected), T = B*heads*d*N elements:
forward reads q, k, v and writes out: 4 T; the backward reads q, k, v, dout and writes dq, dk, dv: 7 T; so
forward_backward counts 11 T. GB/s and %HBM in extra_info come from the device median (triton.testing.do_bench).
Everything skips without a CUDA GPU. On any machine, `python bench/bench_linear_attention.py` prints the GPU
kernels of one forward+backward of the op and of one LinearAttention layer as the Unet calls it
(bench/kernel_count.py, through the Triton interpreter on CPU).
"""

import math

import pytest
import torch

from measure import CUDA, GPU_ONLY_REASON, pass_step, record_kernel_counts, run_benchmark


BATCH, HEADS, HEAD_DIM, MEM = 32, 4, 32, 4
# (dtype, N): bf16 at three resolutions of the Unet (32x32, 64x64, 128x128); fp32 at the largest only.
CASES = [(torch.bfloat16, 1024), (torch.bfloat16, 4096), (torch.bfloat16, 16384), (torch.float32, 16384)]
IMPLEMENTATIONS = ["triton", "reference", "reference_compiled"]
TENSORS_MOVED = {"forward": 4, "forward_backward": 11}

_compiled_reference = None


def _implementation(name):
    global _compiled_reference
    if name == "triton":
        from fastunet.kernels.linear_attention import packed_linear_attention

        return packed_linear_attention
    from fastunet.reference import packed_linear_attention

    if name == "reference":
        return packed_linear_attention
    if _compiled_reference is None:
        _compiled_reference = torch.compile(packed_linear_attention)
    return _compiled_reference


def _inputs(dtype, n, requires_grad):
    """The to_qkv output (B, 3*heads*d, H, W) in dtype, fp32 memory slots (2, heads, d, M), an output gradient."""
    side = math.isqrt(n)
    generator = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(BATCH, 3 * HEADS * HEAD_DIM, side, side, device="cuda", dtype=dtype, generator=generator)
    mem_kv = torch.randn(2, HEADS, HEAD_DIM, MEM, device="cuda", generator=generator)
    grad = torch.randn(BATCH, HEADS * HEAD_DIM, side, side, device="cuda", dtype=dtype, generator=generator)
    return qkv.requires_grad_(requires_grad), mem_kv.requires_grad_(requires_grad), grad


@pytest.mark.skipif(not CUDA, reason=GPU_ONLY_REASON)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0]).replace('torch.', '')}-N{c[1]}")
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_linear_attention(benchmark, implementation, case, mode):
    dtype, n = case
    benchmark.group = f"linear_attention-{mode}-{str(dtype).replace('torch.', '')}-N{n}"
    requires_grad = mode == "forward_backward"
    qkv, mem_kv, grad = _inputs(dtype, n, requires_grad)
    fn = _implementation(implementation)

    step = pass_step(lambda: fn(qkv, mem_kv, HEADS), (qkv, mem_kv), mode, grad)

    tensor_bytes = BATCH * HEADS * HEAD_DIM * n * qkv.element_size()
    run_benchmark(benchmark, step, bytes_moved=TENSORS_MOVED[mode] * tensor_bytes, rounds=10,
                  baseline=implementation == "reference", batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, n=n,
                  mem=MEM, dtype=str(dtype))  # fmt: skip
    del qkv, mem_kv, grad
    torch.cuda.empty_cache()


def kernel_counts(batch=2, heads=2, dim_head=16, side=8):
    """{what: KernelCount} of one forward+backward of the packed op (bf16, fp32 memory slots) and of one
    LinearAttention layer under bf16 autocast with the residual, as the Unet calls it, on the Triton backend."""
    from kernel_count import count_gpu_kernels, count_layer_step

    import fastunet
    from fastunet.attention import LinearAttention
    from fastunet.kernels.linear_attention import packed_linear_attention

    qkv = torch.randn(batch, 3 * heads * dim_head, side, side).bfloat16().requires_grad_()
    mem_kv = torch.randn(2, heads, dim_head, MEM, requires_grad=True)
    layer = LinearAttention(heads * dim_head, heads=heads, dim_head=dim_head)
    x = torch.randn(batch, heads * dim_head, side, side).bfloat16().requires_grad_()
    grad = torch.ones_like(x)  # made outside the counted steps

    def op_step():
        out = packed_linear_attention(qkv, mem_kv, heads)
        torch.autograd.grad(out, (qkv, mem_kv), grad)

    with fastunet.use_backend("triton"):
        return {"packed_linear_attention forward+backward": count_gpu_kernels(op_step),
                "LinearAttention layer forward+backward (bf16 autocast, residual)": count_layer_step(layer, x, grad)}


def test_linear_attention_kernel_count(benchmark, capsys):
    """Prints (and keeps in extra_info) the GPU kernels of the packed op and of one layer forward+backward as the
    Unet calls it: a regression shows here without a GPU. A count, not a timing: nothing is asserted here (the
    bounds are asserted in tests/)."""
    record_kernel_counts(benchmark, capsys, "linear_attention", __file__, lambda: {"bfloat16": kernel_counts()})


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
