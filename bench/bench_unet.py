"""Whole-Unet speed: fastunet vs upstream denoising-diffusion-pytorch 2.3.4 on the same weights.

CPU (runs everywhere, a few minutes): Unet(dim=32, dim_mults=(1, 2, 4, 8)), batch 4, 64x64, fp32; fastunet's
reference path must not be slower than upstream eager. The speed-up over upstream is printed after the table.
CUDA only: Unet(dim=64), batch 32, 128x128: training step (AdamW, autocast bf16) and a sampling step (no grad),
fastunet (auto backend) vs upstream eager and torch.compile(upstream), with peak memory.
"""

import pytest
import torch

import fastunet
from measure import CUDA, GPU_ONLY_REASON, run_benchmark


def upstream_unet(**config):
    from denoising_diffusion_pytorch import Unet

    return Unet(**config)


def same_weight_pair(device, **config):
    torch.manual_seed(0)
    theirs = upstream_unet(**config).to(device)
    ours = fastunet.Unet(**config, block_norm="rms").to(device)
    ours.load_state_dict(theirs.state_dict())
    return {"upstream": theirs, "fastunet": ours}


CPU_CONFIG = dict(dim=32, dim_mults=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def cpu_models():
    return same_weight_pair("cpu", **CPU_CONFIG)


@pytest.mark.parametrize("implementation", ["upstream", "fastunet"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_unet_cpu(benchmark, cpu_models, implementation, mode):
    benchmark.group = f"unet-cpu-{mode}"
    model = cpu_models[implementation]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=generator)
    time = torch.randint(0, 1000, (4,), generator=generator)

    def step():
        if mode == "forward":
            with torch.no_grad():
                return model(x, time)
        model.zero_grad(set_to_none=True)
        model(x, time).square().mean().backward()

    with fastunet.use_backend("reference"):
        run_benchmark(benchmark, step, rounds=15, baseline=implementation == "upstream",
                      config="dim=32 (1,2,4,8) b4 64x64 fp32")


GPU_CONFIG = dict(dim=64, dim_mults=(1, 2, 4, 8))
GPU_IMPLEMENTATIONS = ["upstream", "upstream_compiled", "fastunet"]


@pytest.fixture(scope="module")
def gpu_models():
    models = same_weight_pair("cuda", **GPU_CONFIG)
    models["upstream_compiled"] = torch.compile(models["upstream"])
    return models


@pytest.mark.skipif(not CUDA, reason=GPU_ONLY_REASON)
@pytest.mark.parametrize("implementation", GPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["train_step", "sampling_step"])
def test_unet_gpu(benchmark, gpu_models, implementation, mode):
    benchmark.group = f"unet-h100-{mode}"
    model = gpu_models[implementation]
    x = torch.randn(32, 3, 128, 128, device="cuda")
    time = torch.randint(0, 1000, (32,), device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        if mode == "sampling_step":
            with torch.no_grad():
                return model(x, time)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, time).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    run_benchmark(benchmark, step, baseline=implementation == "upstream", peak_memory_gib=round(peak / 2**30, 2),
                  config="dim=64 (1,2,4,8) b32 128x128, autocast bf16 for training")
