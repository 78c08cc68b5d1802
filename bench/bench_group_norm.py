"""Fused GroupNorm + scale/shift + SiLU: Triton against the reference, eager and under torch.compile.

    pytest bench/bench_group_norm.py --benchmark-only

On a GPU each case records the device median (do_bench) and the achieved bandwidth in benchmark.extra_info,
counting the op's minimum traffic: forward x read + y written; backward x and dy read + dx written (the project's
targets: >= 85% and >= 75% of HBM at 32x64x128x128 bf16, G=8); forward+backward the sum of both.
Parameters and statistics (O(B*C)) are left out. The inputs are a ResnetBlock's block1 under autocast: x in the
benchmark's dtype, weight and bias fp32, scale and shift the two halves of one (B, 2C) tensor of x's dtype.
"""

from dataclasses import replace

import pytest
import torch

from fastunet import reference
from fastunet.kernels import group_norm as gn
from fastunet.kernels import tuning
from fastunet.kernels.group_norm import group_norm_act
from fastunet.kernels.scale_shift_act import device_limits
from measure import CUDA, GPU_ONLY_REASON, pass_step, record_kernel_counts, run_benchmark

pytestmark = [
    # Timings come from do_bench (in extra_info); pytest-benchmark's own rounds only need to be few.
    pytest.mark.benchmark(max_time=0.2, min_rounds=3, warmup=False),
]

GROUPS = 8
# Unet(dim=64) at 128x128, batch 32: the first stage (the headline target, also in fp32), a middle one, the
# bottleneck of a 64x64 Unet.
CASES = [
    ((32, 64, 128, 128), torch.bfloat16),
    ((32, 64, 128, 128), torch.float32),
    ((32, 256, 32, 32), torch.bfloat16),
    ((32, 512, 8, 8), torch.bfloat16),
]
IMPLEMENTATIONS = ("triton", "eager", "compiled")
PASSES = ("forward", "backward", "forward_backward")

if CUDA:
    # One compiled reference re-specialised per shape, dtype and layout: more than dynamo's default 8 variants.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    _compiled_reference = torch.compile(reference.group_norm_act, dynamic=False)


def _implementation(name):
    return {"triton": group_norm_act, "eager": reference.group_norm_act, "compiled": _compiled_reference}[name]


def _inputs(shape, dtype, channels_last, requires_grad):
    batch, channels = shape[:2]
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = 1 + 0.1 * torch.randn(channels, device="cuda")
    bias = 0.1 * torch.randn(channels, device="cuda")
    time_embedding = 0.1 * torch.randn(batch, 2 * channels, device="cuda", dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (x, weight, bias, time_embedding)]


@pytest.mark.skipif(not CUDA, reason=GPU_ONLY_REASON)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape, dtype", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_group_norm(benchmark, shape, dtype, channels_last, implementation, pass_):
    fn = _implementation(implementation)
    layout = "channels_last" if channels_last else "nchw"
    # One group per case, eager reference as its baseline (bench/conftest.py reports the others' speedups).
    benchmark.group = f"group_norm {'x'.join(map(str, shape))} {str(dtype)[6:]} {layout} {pass_}"
    benchmark.extra_info["baseline"] = implementation == "eager"
    x, weight, bias, time_embedding = _inputs(shape, dtype, channels_last, requires_grad=pass_ != "forward")

    def forward():
        scale, shift = time_embedding.chunk(2, dim=1)
        return fn(x, weight, bias, GROUPS, scale, shift, True, 1e-5)

    element_bytes = x.numel() * x.element_size()
    leaves = (x, weight, bias, time_embedding)
    step = pass_step(forward, leaves, pass_)
    # Minimum traffic: x read and y written; backward reads x and dy and writes dx; both passes add up.
    bytes_moved = {"forward": 2, "backward": 3, "forward_backward": 5}[pass_] * element_bytes
    run_benchmark(benchmark, step, bytes_moved=bytes_moved, op="group_norm_act", shape=list(shape), groups=GROUPS,
                  dtype=str(dtype), layout=layout,
                  implementation=implementation, pass_=pass_)


# ---------------------------------------------------------------------------------------------------------------
# The backward's persistent grid at the headline shape, a tuning question only a GPU answers. 256 groups of x and
# dy (512 KB each) on an H100/H200: the planner's two rounds of 128 programs hold 64 MB in flight against a 50 MB
# L2 (bench/static_report.py's model: ~22% of the second pass re-read from HBM, 1.15x the minimum bytes, issue
# 0.60x the HBM floor); three rounds of 86 programs fit L2 (1.0x the bytes) with a third more work per busy SM
# (issue ~0.9x); four rounds of 64 fit the planner's 3/4 budget but idle more than half the SMs (issue ~1.2x).
# gn.plan_candidates gives the op the first two to time at its first call of the shape (kernels/tuning.py); this
# group shows all three and what the op chose ("timed").

@pytest.mark.skipif(not CUDA, reason=GPU_ONLY_REASON)
@pytest.mark.parametrize("rounds", [None, 3, 4, "timed"], ids=["planned", "3_rounds", "4_rounds", "timed"])
def test_group_norm_backward_rounds(benchmark, rounds):
    shape, dtype = (32, 64, 128, 128), torch.bfloat16
    benchmark.group = f"group_norm backward persistent rounds {'x'.join(map(str, shape))} {str(dtype)[6:]} nchw"
    benchmark.extra_info["baseline"] = rounds is None
    x, weight, bias, time_embedding = _inputs(shape, dtype, False, requires_grad=False)
    scale, shift = time_embedding.chunk(2, dim=1)
    _, mean, rstd = gn.group_norm_forward(x, weight, bias, GROUPS, scale, shift, True, 1e-5)
    grad_y = torch.randn_like(x)
    candidates = gn.plan_candidates(shape[0], shape[1], shape[2] * shape[3], GROUPS, False, True, x.element_size(),
                                    *device_limits(x.device), backward=True)
    packs = shape[0] * GROUPS // candidates[0].groups_per_pack
    if rounds == "timed":
        plan = None
    elif rounds is None:
        plan = candidates[0]
    else:
        plan = replace(candidates[0], programs=-(-packs // rounds))
    needs = [True, True, True, False, False, True]

    def step():
        return gn.group_norm_backward(grad_y, x, weight, bias, GROUPS, None, None, True, mean, rstd, needs,
                                      plan=plan, scale_shift=time_embedding)

    if plan is None:  # the op's own choice, timed at its first call of the shape (here or in an earlier test)
        step()
        plan = next(chosen for key, chosen in tuning._FASTEST.items()
                    if key[:2] == ("group_norm", "_group_norm_backward_kernel") and key[3] == shape) \
            if len(candidates) > 1 else candidates[0]
    run_benchmark(benchmark, step, bytes_moved=3 * x.numel() * x.element_size(), op="group_norm_backward",
                  shape=list(shape), groups=GROUPS, dtype=str(dtype), layout="nchw", programs=plan.programs,
                  pack_rounds=-(-packs // plan.programs), timed=rounds == "timed",
                  candidates=[candidate.programs for candidate in candidates])


# ---------------------------------------------------------------------------------------------------------------
# GPU kernels per call, counted on any machine (bench/kernel_count.py): without a GPU the count runs in a
# subprocess under the Triton interpreter (this process compiles, it does not interpret).

def _unet_call_inputs(dtype, device):
    """x, weight, bias, time-MLP output (B, 2C) as a ResnetBlock's norm sees them: weight and bias fp32 under bf16
    autocast, else in x's dtype; small, since a count does not depend on the size."""
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    x = torch.randn(2, 16, 8, 8, device=device, dtype=dtype, requires_grad=True)
    weight = torch.ones(16, device=device, dtype=param_dtype, requires_grad=True)
    bias = torch.zeros(16, device=device, dtype=param_dtype, requires_grad=True)
    time_mlp = torch.randn(2, 32, device=device, dtype=dtype, requires_grad=True)
    return x, weight, bias, time_mlp


def count_unet_call():
    """{dtype name: {"forward": KernelCount, "forward_backward": KernelCount}} of the Triton op as the Unet
    calls it, in bf16 (autocast's mix), fp16 and fp32."""
    from kernel_count import count_gpu_kernels

    device = "cuda" if CUDA else "cpu"
    counts = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, weight, bias, time_mlp = _unet_call_inputs(dtype, device)

        def forward():
            scale, shift = time_mlp.chunk(2, dim=1)
            return group_norm_act(x, weight, bias, GROUPS, scale, shift, True, 1e-5)

        grad_y = torch.randn_like(forward())

        def forward_backward():
            forward().backward(grad_y)

        with torch.no_grad():
            counts[str(dtype)[6:]] = {"forward": count_gpu_kernels(forward)}
        counts[str(dtype)[6:]]["forward_backward"] = count_gpu_kernels(forward_backward)
    return counts


def test_group_norm_kernel_count(benchmark, capsys):
    """Prints (and keeps in extra_info) the GPU kernels of one forward and one forward+backward as the Unet calls
    the op: a regression shows here without a GPU. A count, not a timing: nothing is asserted."""
    record_kernel_counts(benchmark, capsys, "group_norm_act", __file__, count_unet_call)


if __name__ == "__main__":
    import json

    print(json.dumps({dtype: {name: count.total for name, count in passes.items()}
                      for dtype, passes in count_unet_call().items()}))
