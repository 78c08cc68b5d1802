"""block_norm="rms" is exactly upstream 2.3.4: same init for the same seed, strict checkpoint loading, and the same
outputs and gradients, for every constructor option. Runs on the reference backend (the Triton backend is
compared with the reference in test_unet_triton.py)."""

import pytest
import torch

import fastunet
from tolerances import assert_close
from upstream import upstream_2

SMALL = dict(dim=8, dim_mults=(1, 2, 4))

OPTIONS = {
    "default": {},
    "self_condition": dict(self_condition=True),
    "learned_variance": dict(learned_variance=True),
    "learned_sinusoidal": dict(learned_sinusoidal_cond=True, learned_sinusoidal_dim=8),
    "random_fourier": dict(random_fourier_features=True),
    "per_stage_attention": dict(attn_heads=(1, 2, 4), attn_dim_head=(8, 16, 4)),
    "full_attn_all": dict(full_attn=True),
    "full_attn_tuple": dict(full_attn=(True, False, True)),
    "full_attn_false": dict(full_attn=False),
    "full_attn_empty": dict(full_attn=()),
    "init_dim": dict(init_dim=12),
    "one_channel": dict(channels=1),
    "dropout_eval": dict(dropout=0.3),
    "out_dim_theta": dict(out_dim=5, sinusoidal_pos_emb_theta=100),
    "flash_attn_fp32": dict(flash_attn=True),
    "four_stages": dict(dim=8, dim_mults=(1, 2, 2, 4), attn_heads=2),
    "combined": dict(self_condition=True, learned_variance=True, init_dim=16, channels=1, full_attn=(False, True, True),
                     attn_heads=(2, 2, 1), dropout=0.1, random_fourier_features=True),
}


def build_pair(options, seed=0):
    upstream = upstream_2()
    config = {**SMALL, **options}
    torch.manual_seed(seed)
    theirs = upstream.Unet(**config)
    torch.manual_seed(seed)
    ours = fastunet.Unet(**config, block_norm="rms")
    return theirs, ours


def make_inputs(model, batch=2, size=(16, 16), seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.channels, *size, generator=generator)
    if model.random_or_learned_sinusoidal_cond:
        time = torch.rand(batch, generator=generator)
    else:
        time = torch.randint(0, 1000, (batch,), generator=generator)
    return x, time


@pytest.mark.parametrize("name", OPTIONS)
def test_same_structure_init_and_strict_load(name):
    theirs, ours = build_pair(OPTIONS[name])
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert list(ours_state) == list(theirs_state), "state_dict keys or their order differ from upstream"
    for key, value in theirs_state.items():
        assert ours_state[key].shape == value.shape, f"{key}: {tuple(ours_state[key].shape)} != {tuple(value.shape)}"
        assert torch.equal(ours_state[key], value), f"{key}: same seed, different initial values"
    for attribute in ("channels", "self_condition", "out_dim", "random_or_learned_sinusoidal_cond", "downsample_factor"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    # A differently seeded model then loads upstream's checkpoint strictly.
    torch.manual_seed(123)
    fresh = fastunet.Unet(**{**SMALL, **OPTIONS[name]}, block_norm="rms")
    fresh.load_state_dict(theirs_state, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in theirs_state.items())


@pytest.mark.parametrize("name", OPTIONS)
def test_outputs_and_gradients_match_upstream(name):
    theirs, ours = build_pair(OPTIONS[name], seed=2)
    torch.manual_seed(7)
    ours.load_state_dict(theirs.state_dict())  # also covers parameters with requires_grad=False
    theirs.eval(), ours.eval()
    x, time = make_inputs(ours, size=(16, 8) if name == "default" else (16, 16))
    with fastunet.use_backend("reference"):
        for self_cond in ([None, torch.randn_like(x)] if ours.self_condition else [None]):
            theirs.zero_grad(), ours.zero_grad()
            expected = theirs(x, time, self_cond)
            actual = ours(x, time, self_cond)
            assert_close(actual, expected, what=f"{name} output")
            weight = torch.randn_like(expected)
            (expected * weight).sum().backward()
            (actual * weight).sum().backward()
            ours_params = dict(ours.named_parameters())
            for key, param in theirs.named_parameters():
                if param.grad is None:
                    assert ours_params[key].grad is None, f"{key}: upstream has no grad, fastunet has one"
                    continue
                # Gradients sum many fp32 products; rounding-order differences scale with the gradient's size.
                scale = param.grad.abs().max().item()
                assert_close(ours_params[key].grad, param.grad, what=f"{name} grad {key}", atol=1e-5 * max(scale, 1), rtol=1e-4)


def test_int_and_float_time_agree():
    _, ours = build_pair({})
    x, time = make_inputs(ours)
    with fastunet.use_backend("reference"):
        assert_close(ours(x, time.float()), ours(x, time), what="float time vs int time")


def test_non_contiguous_and_channels_last_inputs():
    theirs, ours = build_pair({})
    x, time = make_inputs(ours, size=(16, 16))
    expected = theirs(x, time)
    with fastunet.use_backend("reference"):
        assert_close(ours(x.to(memory_format=torch.channels_last), time), expected, what="channels_last x")
        wide = torch.randn(2, 3, 16, 32)
        wide[..., ::2] = x
        assert_close(ours(wide[..., ::2], time), expected, what="strided x")
        ours_cl = ours.to(memory_format=torch.channels_last)
        assert_close(ours_cl(x.to(memory_format=torch.channels_last), time), expected, what="channels_last model")
