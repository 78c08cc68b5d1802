"""A hundred training steps do not grow memory: nothing keeps a step's graph, activations or per-call state.

On a GPU the whole Unet runs on the Triton backend and the measure is torch.cuda.memory_allocated, which is exact:
after warm-up it must come back to the same byte count every step. On CPU the measure is the process's resident
memory (RSS), which the allocator makes noisy by a few MB, so the bound is set well below what a leak of one
step's state would add over the run; the whole model runs on the reference backend (under the interpreter one
Triton step takes seconds), and each fused op's Triton path is checked on its own with fewer calls.
"""

import gc
import os
import resource
import warnings

import pytest
import torch

import fastunet
from conftest import DEVICE
from fastunet import functional

WARMUP, STEPS = 10, 100
# Measured on CPU (reference backend, this model): resident memory moves by -0.4 to +0.9 MB over 300 clean steps
# (allocator noise), and grows by 1.8 MB per step when each step's autograd graph is kept. Over 100 steps the 4 MB
# bound fails any leak of more than 40 KB per step, such as keeping each step's graph (200 steps caught 20 KB but
# cost a minute of CI).
RSS_BOUND_BYTES = 4 * 2**20


def resident_bytes():
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize()


def memory_now():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return resident_bytes()


def growth_over_steps(step, warmup, steps, checkpoints=4):
    """Run `step` warmup times, then `steps` times; the memory at evenly spaced checkpoints after warm-up."""
    for _ in range(warmup):
        step()
    readings = [memory_now()]
    for index in range(steps):
        step()
        if (index + 1) % (steps // checkpoints) == 0:
            readings.append(memory_now())
    return readings


def assert_no_growth(readings, bound, what):
    growth = readings[-1] - readings[0]
    print(f"{what}: memory after warm-up {readings[0] / 2**20:.1f} MiB, readings {[r - readings[0] for r in readings]}")
    if DEVICE == "cuda":
        assert growth == 0, f"{what}: CUDA allocated memory grew by {growth} bytes over the steps, readings {readings}"
    else:
        assert growth < bound, f"{what}: resident memory grew by {growth / 2**20:.2f} MiB (bound {bound / 2**20:.0f})" \
                               f", readings {[r - readings[0] for r in readings]}"


pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not os.path.exists("/proc/self/statm"),
                                reason="resident memory is read from /proc/self/statm (Linux)")


def test_unet_training_steps_do_not_grow_memory():
    torch.manual_seed(0)
    model = fastunet.Unet(8, dim_mults=(1, 2), block_norm="rms").to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    time = torch.tensor([5, 900], device=DEVICE)
    backend = "triton" if DEVICE == "cuda" else "reference"

    def step():
        with fastunet.use_backend(backend):
            loss = model(x, time).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    assert_no_growth(growth_over_steps(step, WARMUP, STEPS), RSS_BOUND_BYTES, f"Unet on {backend}")


OPS = {
    "group_norm_act": lambda t: functional.group_norm_act(t["x"], t["weight"], t["bias"], 4, t["scale"], t["shift"]),
    "rms_norm_act": lambda t: functional.rms_norm_act(t["x"], t["weight"], t["scale"], t["shift"], True),
    "attention": lambda t: functional.attention(t["q"], t["k"], t["v"], t["mem_k"], t["mem_v"]),
    "linear_attention": lambda t: functional.linear_attention(t["q"].mT, t["k"].mT, t["v"].mT, t["mem_k"].mT,
                                                             t["mem_v"].mT),
    "packed_attention": lambda t: functional.packed_attention(t["qkv"], t["mem_kv"], 1),
    "packed_linear_attention": lambda t: functional.packed_linear_attention(t["qkv"], t["mem_kv"].mT, 1),
}


@pytest.mark.parametrize("op", OPS)
def test_triton_op_calls_do_not_grow_memory(op):
    """Forward and backward of one fused op on the Triton backend, repeatedly: no per-call state is kept (saved
    tensors, cached launch plans keyed by anything but the configuration). 20 calls after 3 of warm-up under the
    interpreter (~0.1-0.5 s each): the bound fails a leak of 200 KB per call (measured growth: 0 bytes)."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE).requires_grad_()

    tensors = dict(x=randn(2, 8, 4, 4), weight=randn(8), bias=randn(8), scale=randn(2, 8), shift=randn(2, 8),
                   q=randn(1, 1, 16, 16), k=randn(1, 1, 16, 16), v=randn(1, 1, 16, 16), mem_k=randn(1, 4, 16),
                   mem_v=randn(1, 4, 16), qkv=randn(1, 48, 4, 4), mem_kv=randn(2, 1, 4, 16))

    def step():
        with fastunet.use_backend("triton"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
            OPS[op](tensors).square().sum().backward()

    assert_no_growth(growth_over_steps(step, 3, 20), RSS_BOUND_BYTES, f"{op} on triton")
