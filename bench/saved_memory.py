"""What a training forward keeps for the backward: fastunet in each checkpointing mode against upstream 2.3.4.

    TRITON_INTERPRET=1 python bench/saved_memory.py      # without a GPU: the Triton path runs in the interpreter

Measured as the CPU tensor memory still allocated when the forward returns, output included: the sum of the
allocations and frees torch.profiler records during the forward (byte-exact, no allocator cache). Hooks on saved
tensors would miss what selective checkpointing keeps, which bypasses them. What a forward keeps does not depend
on the values computed, so the interpreter gives the counts a GPU run has for the same shapes and dtypes.
"""

import gc
import time

import torch

CONFIG = dict(dim=16, dim_mults=(1, 2, 4, 8))  # the configuration the project's memory targets are stated at
MODES = (False, None, "selective", "full")


def retained_after_forward(model, x, time_, backend):
    """Bytes of CPU tensors allocated during model(x, time_) under fastunet backend `backend` (ignored by
    upstream's model) and still alive when it returns, output included."""
    import fastunet
    from torch.profiler import ProfilerActivity, profile

    # Reference cycles left by an earlier forward (checkpoint frames hold some) would otherwise be freed inside
    # the profile and counted against this one.
    gc.collect()
    kept = {}
    with fastunet.use_backend(backend), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept["out"] = model(x, time_)

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    return sum(node.extra_fields.alloc_size for node in walk(prof.profiler.kineto_results.experimental_event_tree())
               if type(node.extra_fields).__name__ == "_ExtraFields_Allocation" and node.extra_fields.device.type == "cpu")


def saved_by_mode(config=CONFIG, size=64, batch=2, block_norm="rms", backend="triton", modes=MODES):
    """{"upstream": bytes, mode: bytes for each of `modes`} for one fp32 training forward of each model, all with
    upstream's weights (block_norm "rms" loads them exactly)."""
    import fastunet
    from denoising_diffusion_pytorch import Unet as UpstreamUnet

    torch.manual_seed(0)
    upstream = UpstreamUnet(**config)
    x = torch.randn(batch, 3, size, size)
    time_ = torch.tensor([10, 700] * (batch // 2) + [10] * (batch % 2))
    result = {"upstream": retained_after_forward(upstream, x, time_, "reference")}
    for mode in modes:
        model = fastunet.Unet(**config, block_norm=block_norm, checkpointing=mode)
        model.load_state_dict(upstream.state_dict())
        result[mode] = retained_after_forward(model, x, time_, backend)
    return result


def main():
    from fastunet.backend import TRITON_INTERPRETING

    backends = ("reference", "triton") if TRITON_INTERPRETING else ("reference",)
    if not TRITON_INTERPRETING:
        print("The Triton path is measured under TRITON_INTERPRET=1 only (these are CPU tensors).")
    print(f"Kept for the backward after one training forward, Unet({CONFIG}), 2x3x64x64 fp32, block_norm='rms', "
          f"measured on CPU; ratio to upstream 2.3.4")
    for backend in backends:
        started = time.perf_counter()
        saved = saved_by_mode(backend=backend)
        upstream = saved.pop("upstream")
        cells = ", ".join(f"checkpointing={mode!r}: {saved[mode] / upstream:.3f}x" for mode in MODES)
        print(f"  {backend:9s} upstream {upstream / 2**20:.1f} MiB; {cells}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
