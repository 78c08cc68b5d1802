"""Timing and reporting shared by the benchmarks.

pytest-benchmark times on the host; GPU work is asynchronous, so every timed call synchronizes, and the
device-side median from triton.testing.do_bench (CUDA events, L2 flushed between runs) is recorded beside it in
`extra_info` with the achieved bandwidth or throughput and its fraction of the measured limit.
"""

import functools

import torch

CUDA = torch.cuda.is_available()
GPU_ONLY_REASON = "kernel timings are only meaningful on a CUDA GPU; none is present"


def synchronized(fn):
    """fn, followed by a device synchronize when on CUDA, so host timers see the work finish."""
    if not CUDA:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def device_ms(fn):
    """Median device time of fn in milliseconds (CUDA events, L2 flushed before each run)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


@functools.lru_cache(maxsize=None)
def hbm_bandwidth_gbs():
    """Achievable HBM bandwidth of this GPU in GB/s: a 1 GiB device-to-device copy, bytes read + written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def pass_step(forward, leaves, pass_, grad_output=None):
    """The function to time for one pass of an op.

    forward: () -> output; leaves: the tensors to differentiate; pass_: "forward" (under no_grad), "backward"
    (autograd through one recorded forward, retained) or "forward_backward"; grad_output: the output's gradient
    (random of the output's shape when None).
    """
    if pass_ == "forward":
        def step():
            with torch.no_grad():
                return forward()
        return step
    if grad_output is None:
        with torch.no_grad():
            grad_output = torch.randn_like(forward())
    if pass_ == "backward":
        recorded = forward()
        return lambda: torch.autograd.grad(recorded, leaves, grad_output, retain_graph=True)
    if pass_ == "forward_backward":
        return lambda: torch.autograd.grad(forward(), leaves, grad_output)
    raise ValueError(f"expected pass_ in ('forward', 'backward', 'forward_backward'), got {pass_!r}")


def run_benchmark(benchmark, fn, *, bytes_moved=None, flops=None, rounds=None, **info):
    """Time fn with pytest-benchmark (synchronized) and, on CUDA, record the device median and throughput.

    bytes_moved: the op's minimum HBM traffic (each input read once, each output written once).
    flops: the op's floating-point operations, for TFLOP/s.
    rounds: a fixed number of timed rounds (after one warm-up) instead of pytest-benchmark's calibration.
    """
    benchmark.extra_info.update(info)
    if CUDA:
        fn()  # compile and warm up outside the timed region
        ms = device_ms(fn)
        benchmark.extra_info["device"] = torch.cuda.get_device_name()
        benchmark.extra_info["device_ms"] = ms
        if bytes_moved is not None:
            gbs = bytes_moved / ms / 1e6
            benchmark.extra_info["GB/s"] = round(gbs, 1)
            benchmark.extra_info["%HBM"] = round(100 * gbs / hbm_bandwidth_gbs(), 1)
        if flops is not None:
            benchmark.extra_info["TFLOP/s"] = round(flops / ms / 1e9, 1)
    benchmark.extra_info["torch"] = torch.__version__
    if rounds is not None:
        return benchmark.pedantic(synchronized(fn), rounds=rounds, warmup_rounds=1)
    return benchmark(synchronized(fn))


def interleaved_durations(steps, rounds, warmup_rounds=1):
    """Seconds per call of each step, measured in interleaved rounds: round r calls every step once, starting at
    a different one each round, so that a change of machine load (another process, frequency scaling) lands on
    every step alike instead of on whichever happened to run during it.

    steps: {name: () -> anything}. Returns {name: [seconds of each timed round]}. CUDA work is synchronized.
    """
    import time

    names = list(steps)
    timed = {name: synchronized(steps[name]) for name in names}
    for _ in range(warmup_rounds):
        for name in names:
            timed[name]()
    durations = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            timed[name]()
            durations[name].append(time.perf_counter() - start)
    return durations


def record_durations(benchmark, durations):
    """Hand durations measured outside pytest-benchmark (interleaved_durations) to it, so that its table, its
    statistics and its saved JSON show them like its own rounds. Uses pytest-benchmark's `_make_stats`, the
    same call its own runner makes (present in pytest-benchmark 4 and 5)."""
    if benchmark.disabled:  # `pytest bench/` without --benchmark-only: a plain test run, nothing to record
        return
    benchmark._mode = "interleaved rounds (bench/measure.py)"
    stats = benchmark._make_stats(1)
    for seconds in durations:
        stats.update(seconds)


def peak_memory_bytes(fn, device):
    """Peak memory fn allocates above what was allocated when it began, in bytes, and how that was measured.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: the running sum of every CPU tensor
    allocation and free that torch.profiler records during fn (profile_memory=True); its maximum is the same
    quantity for CPU tensors, byte-exact (no allocator cache or page granularity as with resident memory).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated above the start"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    sizes = sorted((node.start_time_ns, node.extra_fields.alloc_size)
                   for node in walk(prof.profiler.kineto_results.experimental_event_tree())
                   if type(node.extra_fields).__name__ == "_ExtraFields_Allocation"
                   and node.extra_fields.device.type == "cpu")
    allocated = peak = 0
    for _, size in sizes:
        allocated += size
        peak = max(peak, allocated)
    return peak, "peak of the running sum of torch.profiler's CPU allocation events (alloc and free)"


def record_kernel_counts(benchmark, capsys, op_name, script, count_in_process):
    """Record and print an op's GPU kernels per Unet-style call: {dtype: {pass: total}}.

    count_in_process: () -> {dtype: {pass (or what was counted): KernelCount}}, run here on CUDA. Without a GPU the kernels must run in
    the Triton interpreter, which is chosen at import, so `script` (the benchmark file, whose __main__ prints the
    counts as JSON) runs in a subprocess with TRITON_INTERPRET=1. The benchmark's timing is of nothing: this entry
    exists to keep the counts in the run's JSON beside the timings.
    """
    import json
    import os
    import subprocess
    import sys

    if CUDA:
        counts = {dtype: {name: count.total for name, count in passes.items()}
                  for dtype, passes in count_in_process().items()}
        method = "counted on CUDA (torch.profiler, CPU side)"
    else:
        env = dict(os.environ, TRITON_INTERPRET="1")
        run = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, check=True)
        counts = json.loads(run.stdout.strip().splitlines()[-1])
        method = "counted on CPU under the Triton interpreter (torch.profiler): what a GPU run would launch"
    benchmark.group = f"{op_name} GPU kernels per call"
    benchmark.extra_info.update(op=op_name, kernels=counts, method=method)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    with capsys.disabled():
        print(f"\n{op_name} GPU kernels per Unet-style call ({method}): {json.dumps(counts)}")
