"""GPU kernels per Unet training step, fastunet's Triton path against upstream 2.3.4, counted on any machine.

    TRITON_INTERPRET=1 python bench/kernels_per_step.py      # without a GPU: the kernels run in the interpreter

A training step here is one forward and backward of Unet(dim=8, dim_mults=(1, 2)) on a 2x3x16x16 batch under
bf16 autocast (the optimizer, the same for both, is left out), counted by bench/kernel_count.py: outermost ATen
ops plus Triton launches, views, allocations and the interpreter's own copies left out. The count does not depend
on the image size. On CPU these are counts of what a GPU run would launch, not a GPU measurement.
"""

import os

import torch

CONFIG = dict(dim=8, dim_mults=(1, 2))
BLOCK_NORMS = ("group", "rms")


def training_step(model, backend=None, batch=2, size=16):
    """() -> None: one bf16-autocast forward + backward of `model` under fastunet backend `backend`."""
    import fastunet

    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    time = torch.tensor([10, 700] * (batch // 2) + [10] * (batch % 2)).to(device)

    def step():
        with fastunet.use_backend(backend or "auto"), torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, time)
        out.float().square().mean().backward()
    return step


def count_training_steps(device="cpu", size=16):
    """{"upstream": KernelCount, "fastunet-<block_norm>": KernelCount, ...} for one training step each."""
    from denoising_diffusion_pytorch import Unet as UpstreamUnet

    import fastunet
    from kernel_count import count_gpu_kernels

    torch.manual_seed(0)
    counts = {"upstream": count_gpu_kernels(training_step(UpstreamUnet(**CONFIG).to(device), size=size))}
    for block_norm in BLOCK_NORMS:
        torch.manual_seed(0)
        model = fastunet.Unet(**CONFIG, block_norm=block_norm).to(device)
        counts[f"fastunet-{block_norm}"] = count_gpu_kernels(training_step(model, "triton", size=size))
    return counts


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("without a GPU, set TRITON_INTERPRET=1 (the Triton kernels then run in the interpreter)")
    counts = count_training_steps(device)
    upstream = counts["upstream"].total
    where = "counted on CPU with torch.profiler" if device == "cpu" else "counted on CUDA with torch.profiler (CPU side)"
    print(f"GPU kernels per training step, Unet{tuple(CONFIG.values())}, bf16 autocast ({where}):")
    for name, count in counts.items():
        print(f"  {name}: {count.total} ({count.total / upstream:.2f}x upstream); {count.summary(top=6)}")


if __name__ == "__main__":
    main()
