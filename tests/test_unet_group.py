"""block_norm="group" (the default) is upstream 1.9-1.11.1's GroupNorm Unet: the same init for the same seed, its
checkpoints load strictly, and outputs and gradients match, checked against the real 1.11.1 run in a subprocess."""

import pytest
import torch

import fastunet
from tolerances import assert_close
from upstream import run_upstream_1_11_1

CASES = {
    "default": dict(dim=8, dim_mults=(1, 2, 4), resnet_block_groups=4),
    "groups_8_learned_variance": dict(dim=16, dim_mults=(1, 2), learned_variance=True),
    "self_condition_full_attn": dict(dim=8, dim_mults=(1, 2), self_condition=True, full_attn=True, resnet_block_groups=2),
    # 1.11.1 breaks on init_dim != dim (its final block is built from dim), so only heads and channels vary here.
    "heads_one_channel": dict(dim=8, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=16, resnet_block_groups=8),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_upstream_1_11_1(name, tmp_path):
    config = CASES[name]
    upstream = run_upstream_1_11_1(dict(config, seed=3, batch=2, size=(16, 16)), tmp_path)

    torch.manual_seed(3)
    ours = fastunet.Unet(**config)  # block_norm="group" is the default
    ours_state = ours.state_dict()
    assert list(ours_state) == list(upstream["state_dict"]), "state_dict keys or their order differ from 1.11.1"
    for key, value in upstream["state_dict"].items():
        assert torch.equal(ours_state[key], value), f"{key}: same seed, different initial values than 1.11.1"

    torch.manual_seed(99)
    ours = fastunet.Unet(**config)
    ours.load_state_dict(upstream["state_dict"], strict=True)
    with fastunet.use_backend("reference"):
        out = ours(upstream["x"], upstream["time"])
        out.square().mean().backward()
    assert_close(out, upstream["out"], what=f"{name} output vs 1.11.1")
    for key, param in ours.named_parameters():
        expected = upstream["grads"][key]
        scale = expected.abs().max().item()
        assert_close(param.grad, expected, what=f"{name} grad {key}", atol=1e-5 * max(scale, 1), rtol=1e-4)


def test_group_norm_keys_are_1_11_1_names():
    state = fastunet.Unet(dim=8, dim_mults=(1, 2)).state_dict()
    norm_keys = [k for k in state if ".norm." in k and ".block" in k]
    assert norm_keys and all(k.endswith((".norm.weight", ".norm.bias")) for k in norm_keys), norm_keys
    assert state["downs.0.0.block1.norm.weight"].shape == (8,)
    assert len(fastunet.Unet(dim=64).state_dict()) == 283
    assert sum(p.numel() for p in fastunet.Unet(dim=64).parameters()) == 35_719_555
