"""Whole-Unet training and sampling steps: fastunet against upstream denoising-diffusion-pytorch 2.3.4.

    pytest bench/bench_unet.py --benchmark-only

Every provider starts from the same weights (fastunet built with block_norm="rms", which loads 2.x checkpoints).
A training step is forward, backward and AdamW; a sampling step is one forward without gradients (one step of
the sampling loop). Groups are named `unet-<device>-<step>`, e.g. unet-cpu-train_step, unet-nvidia-h200-...

- CPU: Unet(dim=16, (1, 2, 4, 8)), batch 2, 32x32, one CPU thread (two threads on a loaded 2-core machine
  oversubscribe: a step took 15x longer). fastunet runs its reference path (on CPU, Triton kernels only run
  under the interpreter, which checks correctness and times nothing). The claim checked here: fastunet's
  reference path is no slower than upstream eager.
- CUDA: Unet(dim=64, (1, 2, 4, 8)), batch 32, 128x128.
Providers are measured in interleaved rounds (bench/measure.py), each against upstream eager at its own
precision; bench/conftest.py prints the ratios, their noise, images/s, peak memory and kernels per step, and
`python bench/report.py` renders the kept runs.
"""

import copy
import dataclasses
import functools
import os
from time import perf_counter as timer

import pytest
import torch

import fastunet
from kernel_count import count_gpu_kernels
from measure import CUDA, interleaved_durations, peak_memory_bytes, record_durations

DEVICE = torch.device("cuda" if CUDA else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if CUDA else "cpu"
# "NVIDIA H200" -> "nvidia-h200": the group names say which device measured them.
DEVICE_SLUG = "-".join(DEVICE_NAME.lower().replace("_", " ").split())

if CUDA:
    MODEL_CONFIG = dict(dim=64, dim_mults=(1, 2, 4, 8))
    BATCH, IMAGE_SIZE, ROUNDS = 32, 128, {"train_step": 15, "sampling_step": 25}
    THREADS = None
else:
    MODEL_CONFIG = dict(dim=16, dim_mults=(1, 2, 4, 8))
    BATCH, IMAGE_SIZE, ROUNDS = 2, 32, {"train_step": 5, "sampling_step": 10}
    THREADS = 1
CONFIG_TEXT = (f"Unet(dim={MODEL_CONFIG['dim']}, dim_mults={MODEL_CONFIG['dim_mults']}), batch {BATCH}, "
               f"{IMAGE_SIZE}x{IMAGE_SIZE}, {DEVICE_NAME}" + (f", {THREADS} CPU thread" if THREADS else ""))

COMPILE_ON_CPU_REASON = ("torch.compile of the whole Unet's training step takes minutes on a 2-core CPU "
                         "(inductor builds C++); measured on CUDA only")
CUDA_ONLY_REASON = "needs a CUDA GPU"
TRITON_ON_CPU_REASON = ("fastunet's Triton kernels run on CPU only under the interpreter, which checks "
                        "correctness and times nothing; measured on CUDA only")


@dataclasses.dataclass(frozen=True)
class Provider:
    """One way of running the step. implementation: "upstream" or "fastunet"; backend: fastunet's
    use_backend name (None for upstream); precision: "fp32" or "bf16" (autocast); compile_mode: None (eager),
    "default" or "reduce-overhead" (CUDA graphs); checkpointing: fastunet.Unet's checkpointing mode."""

    name: str
    implementation: str
    precision: str
    backend: str = None
    compile_mode: str = None
    skip_on_cpu: str = None
    checkpointing: object = None

    @property
    def baseline(self):
        """The provider this one is compared to: upstream eager at the same precision."""
        return f"upstream-eager-{self.precision}"

    def describe(self):
        ran = "upstream 2.3.4" if self.backend is None else f"fastunet, backend {self.backend!r}"
        how = "eager" if self.compile_mode is None else f"torch.compile(mode={self.compile_mode!r})"
        precision = "fp32" if self.precision == "fp32" else "bf16 autocast"
        checkpointing = "" if self.checkpointing is None else f", checkpointing={self.checkpointing!r}"
        return f"{ran}, {how}, {precision}{checkpointing}"


PROVIDERS = [
    Provider("upstream-eager-fp32", "upstream", "fp32"),
    Provider("upstream-eager-bf16", "upstream", "bf16"),
    Provider("upstream-compile-bf16", "upstream", "bf16", compile_mode="default", skip_on_cpu=COMPILE_ON_CPU_REASON),
    Provider("fastunet-reference-fp32", "fastunet", "fp32", backend="reference"),
    Provider("fastunet-reference-bf16", "fastunet", "bf16", backend="reference"),
    Provider("fastunet-triton-bf16", "fastunet", "bf16", backend="triton", skip_on_cpu=TRITON_ON_CPU_REASON),
    Provider("fastunet-triton-selective-bf16", "fastunet", "bf16", backend="triton", skip_on_cpu=TRITON_ON_CPU_REASON,
             checkpointing="selective"),
    Provider("fastunet-triton-compile-bf16", "fastunet", "bf16", backend="triton", compile_mode="default",
             skip_on_cpu=TRITON_ON_CPU_REASON),
    Provider("fastunet-triton-cudagraphs-bf16", "fastunet", "bf16", backend="triton",
             compile_mode="reduce-overhead", skip_on_cpu=CUDA_ONLY_REASON),
]
STEPS = ("train_step", "sampling_step")


def runnable(provider):
    return CUDA or provider.skip_on_cpu is None


@functools.lru_cache(maxsize=None)
def upstream_weights():
    from denoising_diffusion_pytorch import Unet

    torch.manual_seed(0)
    return Unet(**MODEL_CONFIG).state_dict()


def build_model(provider):
    if provider.implementation == "upstream":
        from denoising_diffusion_pytorch import Unet

        model = Unet(**MODEL_CONFIG)
    else:
        model = fastunet.Unet(**MODEL_CONFIG, block_norm="rms", checkpointing=provider.checkpointing)
    model.load_state_dict(copy.deepcopy(upstream_weights()))
    return model.to(DEVICE)


def make_step(provider, step_name, x, time):
    """() -> None running one step of `provider`, with its own model (and optimizer for a training step)."""
    model = build_model(provider)
    net = model if provider.compile_mode is None else torch.compile(model, mode=provider.compile_mode)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=provider.precision == "bf16")

    def backend():  # use_backend() is a one-shot context manager: a fresh one per use
        return fastunet.use_backend(provider.backend or "auto")

    if step_name == "sampling_step":
        def step():
            with torch.no_grad(), autocast, backend():
                net(x, time)
        return step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast, backend():
            loss = net(x, time).float().square().mean()
        with backend():  # recomputation under checkpointing runs fused ops in the backward
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def count_kernels(provider, step):
    """Kernels one step launches, and how they were counted."""
    if provider.compile_mode == "reduce-overhead":
        return None, "not counted: a CUDA graph replays its kernels in one launch"
    if CUDA:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset"))]
        return len(kernels), "CUDA kernels seen by torch.profiler"
    return count_gpu_kernels(step).total, "counted on CPU: outermost ATen ops + Triton launches (bench/kernel_count.py)"


# Seconds a group may spend building and warming up (compiling) its providers before the remaining ones are
# skipped with that reason; bench/run_gpu.sh sets it so that its whole run fits its time limit. Eager providers
# come first in PROVIDERS' order below, compiled ones last.
BUILD_BUDGET_S = float(os.environ.get("FASTUNET_BENCH_BUILD_BUDGET_S", "inf"))
BUILD_ORDER = sorted(PROVIDERS, key=lambda p: p.compile_mode is not None)


@functools.lru_cache(maxsize=None)
def measure_group(step_name):
    """Every runnable provider's step, measured in interleaved rounds, with memory and kernel counts:
    {provider name: (durations, extra_info) or skip reason}. Cached: a group's first test measures all of it."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(DEVICE)
    time = torch.randint(0, 1000, (BATCH,), generator=generator).to(DEVICE)
    threads = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    started = timer()
    steps, info, skipped = {}, {}, {}
    try:
        for provider in BUILD_ORDER:
            if not runnable(provider):
                continue
            if timer() - started > BUILD_BUDGET_S:
                skipped[provider.name] = (f"the group's build budget (FASTUNET_BENCH_BUILD_BUDGET_S={BUILD_BUDGET_S:g} s)"
                                          " was spent on the providers before it")
                continue
            step = make_step(provider, step_name, x, time)
            step()  # compile and warm up before memory and kernels are measured
            peak, memory_method = peak_memory_bytes(step, DEVICE)
            kernels, kernels_method = count_kernels(provider, step)
            steps[provider.name] = step
            info[provider.name] = dict(peak_memory_MiB=round(peak / 2**20, 2), memory_method=memory_method,
                                       kernels_per_step=kernels, kernels_method=kernels_method)
        durations = interleaved_durations(steps, ROUNDS[step_name])
    finally:
        torch.set_num_threads(threads)
    return {**skipped, **{name: (durations[name], info[name]) for name in steps}}


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
@pytest.mark.parametrize("step_name", STEPS)
def test_unet(benchmark, provider, step_name):
    benchmark.group = f"unet-{DEVICE_SLUG}-{step_name}"
    if not runnable(provider):
        pytest.skip(f"{provider.name}: {provider.skip_on_cpu}")
    measured = measure_group(step_name)[provider.name]
    if isinstance(measured, str):
        pytest.skip(f"{provider.name}: {measured}")
    durations, info = measured
    median = sorted(durations)[len(durations) // 2]
    benchmark.extra_info.update(
        info, provider=provider.name, ran=provider.describe(), compare_to=provider.baseline,
        config=CONFIG_TEXT, device=DEVICE_NAME,
        images_per_s=round(BATCH / median, 2), torch=torch.__version__,
    )
    record_durations(benchmark, durations)
