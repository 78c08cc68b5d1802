"""What code written for upstream 2.3.4's Unet touches works the same on fastunet.Unet(block_norm="rms"): every
module name, times of every shape and dtype upstream accepts (and a few it refuses), models converted to fp16/bf16.
Runs on the reference backend: these are about the module's interface, not the kernels."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastunet
from tolerances import assert_close
from upstream import upstream_2

CONFIGS = {
    "default": dict(dim=8, dim_mults=(1, 2, 4)),
    "every_option": dict(dim=8, dim_mults=(1, 2, 4), full_attn=(False, True, True), flash_attn=True,
                         self_condition=True, learned_sinusoidal_cond=True, learned_variance=True, dropout=0.1),
}


@pytest.fixture(autouse=True)
def reference_backend():
    with fastunet.use_backend("reference"):
        yield


def build_pair(config, seed=0):
    torch.manual_seed(seed)
    theirs = upstream_2().Unet(**config)
    torch.manual_seed(seed)
    ours = fastunet.Unet(**config, block_norm="rms")
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_every_upstream_module_name_exists(name):
    """Code that reaches into the model by name (unet.mid_attn.attend.flash, hooks, freezing) finds it; each module
    is of the same kind (the class name, or a subclass of the same torch.nn class)."""
    theirs, ours = build_pair(CONFIGS[name])
    ours_modules = dict(ours.named_modules())
    missing = [n for n, _ in theirs.named_modules() if n not in ours_modules]
    assert not missing, f"{len(missing)} upstream module names missing in fastunet.Unet, e.g. {missing[:8]}"
    for module_name, module in theirs.named_modules():
        torch_bases = {c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.modules")} - {torch.nn.Module}
        ours_module = ours_modules[module_name]
        same_kind = type(ours_module).__name__ == type(module).__name__ or any(isinstance(ours_module, c) for c in torch_bases)
        assert same_kind, f"{module_name!r}: upstream {type(module).__name__}, fastunet {type(ours_module).__name__}"


def inputs(model, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.channels, 8, 8, generator=generator)


@pytest.mark.parametrize("shape", [(1,), ()])
def test_one_time_for_the_whole_batch(shape):
    """Upstream broadcasts a (1,) time through its (1, C, 1, 1) scale/shift; fastunet also takes a 0-d time."""
    theirs, ours = build_pair(CONFIGS["default"])
    x = inputs(ours, batch=3)
    time = torch.tensor([417])
    expected = theirs(x, time)
    assert_close(ours(x, time.reshape(shape)), expected, what=f"time of shape {shape}")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                   torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_time_of_any_int_or_float_dtype(dtype):
    """Cast to the time MLP's dtype (at least fp32). Upstream raises "mat1 and mat2 must have the same dtype" for a
    float64 time; its int64 result is the truth. Times 3 and 120 are exact in every dtype listed."""
    theirs, ours = build_pair(CONFIGS["default"])
    x = inputs(ours)
    time = torch.tensor([3, 120])
    assert_close(ours(x, time.to(dtype)), theirs(x, time), what=f"{dtype} time")


def test_learned_sinusoidal_float_time_of_any_float_dtype():
    theirs, ours = build_pair(CONFIGS["every_option"])
    x = inputs(ours)
    time = torch.tensor([0.25, 0.75])  # exact in fp16 and bf16
    expected = theirs(x, time)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert_close(ours(x, time.to(dtype)), expected, what=f"{dtype} time, learned sinusoidal features")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_converted_low_precision_model_runs(dtype):
    """model.half() / model.bfloat16(): upstream raises "mat1 and mat2 must have the same dtype" at its time MLP.
    The result stays near the fp32 model's: within 5% of the output's scale for a whole Unet of roundings (bf16
    keeps 8 significant bits, fp16 11)."""
    _, ours = build_pair(CONFIGS["every_option"])
    x = inputs(ours)
    time = torch.tensor([0.25, 0.75])
    expected = ours(x, time)
    out = ours.to(dtype)(x.to(dtype), time)
    assert out.dtype == dtype and torch.isfinite(out).all()
    error = (out.float() - expected).abs().max().item()
    assert error < 0.05 * expected.abs().max().item(), f"{dtype} model: error {error:.3g}"


def test_forward_hooks_on_the_time_mlp_run():
    """Code that captures the time embedding with a hook on unet.time_mlp (as on upstream's) still sees it."""
    theirs, ours = build_pair(CONFIGS["default"])
    seen = []
    for model in (theirs, ours):
        model.time_mlp.register_forward_hook(lambda module, args, out: seen.append(out))
    x, time = inputs(ours), torch.tensor([3, 120])
    theirs(x, time), ours(x, time)
    assert len(seen) == 2, f"the time_mlp hook ran {len(seen)} times for the two models, expected once each"
    assert_close(seen[1], seen[0], what="time embedding seen by the hook")


@st.composite
def unet_configs(draw):
    """Upstream constructor arguments in their documented range, at sizes the CPU runs in a fraction of a second."""
    stages = draw(st.integers(1, 3))
    config = dict(
        dim=draw(st.sampled_from([4, 8, 12])),
        dim_mults=tuple(draw(st.lists(st.sampled_from([1, 2, 3]), min_size=stages, max_size=stages))),
        channels=draw(st.integers(1, 4)),
        self_condition=draw(st.booleans()),
        learned_variance=draw(st.booleans()),
        attn_heads=draw(st.integers(1, 3)),
        attn_dim_head=draw(st.sampled_from([4, 8, 16])),
        full_attn=draw(st.sampled_from([None, True, False])),
        flash_attn=draw(st.booleans()),
    )
    fourier = draw(st.sampled_from(["sinusoidal", "learned", "random"]))
    config["learned_sinusoidal_cond"] = fourier == "learned"
    config["random_fourier_features"] = fourier == "random"
    if draw(st.booleans()):
        config["init_dim"] = draw(st.sampled_from([4, 6]))
    side = 2 ** (stages - 1) * draw(st.integers(1, 2))
    return dict(config=config, batch=draw(st.integers(1, 3)), height=side, width=side * draw(st.integers(1, 2)),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=15, deadline=None, derandomize=True, print_blob=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=unet_configs())
def test_random_constructor_options_match_upstream(case):
    """Any upstream configuration: same state_dict keys and shapes, strict load, and the same outputs (the example
    is printed whole on failure, seed included)."""
    theirs, ours = build_pair(case["config"], seed=case["seed"])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(case["batch"], ours.channels, case["height"], case["width"], generator=generator)
    time = torch.rand(case["batch"], generator=generator) * (1 if ours.random_or_learned_sinusoidal_cond else 1000)
    self_cond = torch.randn_like(x) if ours.self_condition else None
    assert_close(ours(x, time, self_cond), theirs(x, time, self_cond), what=f"output for {case}")
