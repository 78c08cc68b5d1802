"""What a training forward keeps for the backward: fastunet (each checkpointing mode) against upstream 2.3.4.

Measured as the CPU tensor memory still allocated when the forward returns (torch.profiler's allocation events,
byte-exact; saved_tensors_hooks would miss what selective checkpointing keeps, which bypasses the hooks). On the
reference path: it runs everywhere quickly, and keeps more than the fused kernels do. Measured when written, at
Unet(dim=16, (1, 2, 4, 8)), 2x3x64x64 fp32: 0.87x upstream by default, 0.54x "selective", 0.60x "full".
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastunet

CONFIG = dict(dim=8, dim_mults=(1, 2, 4))


def retained_after_forward(model, x, time):
    """Bytes of CPU tensors allocated during model(x, time) and still alive when it returns (output included)."""
    kept = {}
    with fastunet.use_backend("reference"), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept["out"] = model(x, time)

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    return sum(node.extra_fields.alloc_size for node in walk(prof.profiler.kineto_results.experimental_event_tree())
               if type(node.extra_fields).__name__ == "_ExtraFields_Allocation" and node.extra_fields.device.type == "cpu")


@pytest.fixture(scope="module")
def measured():
    from denoising_diffusion_pytorch import Unet as UpstreamUnet

    torch.manual_seed(0)
    upstream = UpstreamUnet(**CONFIG)
    x, time = torch.randn(2, 3, 32, 32), torch.tensor([10, 700])
    result = {"upstream": retained_after_forward(upstream, x, time)}
    for mode in (None, "selective", "full"):
        model = fastunet.Unet(**CONFIG, block_norm="rms", checkpointing=mode)
        model.load_state_dict(upstream.state_dict())
        result[mode] = retained_after_forward(model, x, time)
    return result


def test_default_keeps_less_than_upstream(measured):
    assert measured[None] < measured["upstream"], measured


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_keeps_less_than_the_default(measured, mode):
    # Measured when written at this size: selective 0.64x and full 0.80x of the default (0.55x / 0.68x upstream;
    # default 0.85x upstream); a bound of 0.9x leaves room for allocation details and fails if checkpointing stops.
    assert measured[mode] < 0.9 * measured[None], {k: round(v / measured[None], 2) for k, v in measured.items()}
