"""fastunet.kernels.rms_norm against fastunet.reference.rms_norm_act: forward and every gradient.

Without a GPU the kernels run on CPU tensors through the Triton interpreter (tests/conftest.py), so shapes are
small; the tiles the plan would pick for other channel counts are forced by name. The GPU build of every
configuration is checked by the ahead-of-time compile test at the end.
"""

import warnings

import pytest
import torch

from fastunet import reference
from fastunet.kernels import rms_norm as rn
from fastunet.kernels import scale_shift_act
from gpu_compile import assert_every_config_compiles_cleanly
from tolerances import assert_close, assert_sum_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # The interpreter evaluates SiLU's exp(-u) in numpy, which warns on overflow to inf; the result (0) is right.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
        yield


def make_inputs(shape, dtype, device, channels_last=False, scale_shift="both", param_dtype=None, magnitude=1.0,
                seed=0):
    """x, g, scale, shift; scale and shift are the two halves of one (B, 2C) tensor (non-contiguous views)."""
    generator = torch.Generator().manual_seed(seed)
    batch, channels = shape[:2]
    param_dtype = param_dtype or dtype
    x = (torch.randn(shape, generator=generator) * magnitude).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = (1 + 0.5 * torch.randn(channels, generator=generator)).to(device, param_dtype)
    time_embedding = (0.5 * torch.randn(batch, 2 * channels, generator=generator)).to(device, param_dtype)
    scale = time_embedding[:, :channels] if scale_shift in ("both", "scale") else None
    shift = time_embedding[:, channels:] if scale_shift in ("both", "shift") else None
    return x, g, scale, shift


def run(fn, x, g, scale, shift, silu, grad_y=None):
    """y and the gradients of (y * grad_y).sum() for x, g, scale and shift (None where absent)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, g, scale, shift)]
    y = fn(*leaves, silu, 1e-12)
    if grad_y is None:
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    y.backward(grad_y)
    return y, [None if t is None else t.grad for t in leaves], grad_y


class _ForcedTile(torch.autograd.Function):
    """rms_norm_forward / rms_norm_backward with an explicit tile and pixel blocks per program (the custom op
    always plans itself)."""

    @staticmethod
    def forward(ctx, x, g, scale, shift, silu, eps, tile, blocks):
        ctx.save_for_backward(x, g, scale, shift)
        ctx.silu, ctx.eps, ctx.tile, ctx.blocks = silu, eps, tile, blocks
        y, ctx.rinv = rn.rms_norm_forward(x, g, scale, shift, silu, eps, tile=tile, blocks=blocks,
                                          save_rinv=rn.rinv_pays(x.shape[1]))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, g, scale, shift = ctx.saved_tensors
        needs = [ctx.needs_input_grad[i] and t is not None for i, t in enumerate((x, g, scale, shift))] + [False]
        grads = rn.rms_norm_backward(grad_y, x, g, scale, shift, ctx.silu, ctx.eps, needs, tile=ctx.tile,
                                     blocks=ctx.blocks, rinv=ctx.rinv)
        return (*grads[:4], None, None, None, None)


def check_against_reference(x, g, scale, shift, silu, tile=None, blocks=None):
    if tile is None and blocks is None:
        fn = rn.rms_norm_act
    else:
        def fn(x, g, scale, shift, silu, eps):
            return _ForcedTile.apply(x, g, scale, shift, silu, eps, tile, blocks)
    y, grads, grad_y = run(fn, x, g, scale, shift, silu)
    y_ref, grads_ref, _ = run(reference.rms_norm_act, x, g, scale, shift, silu, grad_y)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y_ref, what="y")
    assert_close(grads[0], grads_ref[0], what="dx")
    batch, _, height, width = x.shape
    for name, grad, grad_ref, summed in zip(("dg", "d_scale", "d_shift"), grads[1:], grads_ref[1:],
                                            (batch * height * width, height * width, height * width)):
        assert (grad is None) == (grad_ref is None), name
        if grad is not None:
            assert grad.dtype == grad_ref.dtype, name
            assert_sum_close(grad, grad_ref, summed, name)
    return y, grads


# (shape, channels_last, scale_shift, silu): odd and Unet-like shapes, each run in every dtype below.
CASES = [
    ((2, 8, 5, 7), False, "both", True),  # odd H and W: the unaligned tile
    ((2, 6, 1, 1), False, "both", True),  # H*W = 1
    ((1, 3, 4, 4), True, "none", False),  # C = 3, channels_last (unaligned channels)
    ((2, 12, 3, 5), True, "scale", True),
    ((2, 64, 8, 8), False, "both", True),  # Unet-like: one 64-channel step per pixel block
    ((2, 64, 8, 8), True, "shift", False),
    ((1, 96, 16, 16), True, "both", True),  # the 128-channel tile, its last 32 channels masked
    ((1, 256, 4, 4), False, "none", False),  # the 256-channel tile (attention pre-norm without epilogue)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, channels_last, scale_shift, silu", CASES, ids=str)
def test_matches_reference(shape, channels_last, scale_shift, silu, dtype, device):
    x, g, scale, shift = make_inputs(shape, dtype, device, channels_last, scale_shift)
    y, _ = check_against_reference(x, g, scale, shift, silu)
    if channels_last and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_mixed_precision_parameters(dtype, device):
    """Autocast's mix: x in 16 bits, g, scale and shift in fp32; gradients come back in each dtype."""
    x, g, scale, shift = make_inputs((2, 32, 8, 8), dtype, device, param_dtype=torch.float32)
    _, grads = check_against_reference(x, g, scale, shift, True)
    assert [t.dtype for t in grads] == [dtype] + [torch.float32] * 3


def test_fp16_large_magnitudes_stay_finite(device):
    """|x| up to 6e4 in fp16: the sum of squares (~1e11) overflows fp16 but not the fp32 accumulation."""
    x, g, scale, shift = make_inputs((2, 32, 8, 8), torch.float16, device, magnitude=3e4)
    x = x.clamp(-6e4, 6e4)
    assert x.abs().max() > 5e4
    y, grads = check_against_reference(x, g, scale, shift, True)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)


@pytest.mark.parametrize("channels", [16, 48], ids=["rinv-recomputed", "rinv-saved"])
def test_zero_pixels_take_the_eps_branch(channels, device):
    """A pixel whose channels are all zero has ||x|| < eps: y = 0, and dx = g-scaled dy / eps with no
    normalization term, as the clamp's gradient says (matched against autograd through the reference); with rinv
    recomputed by the backward and saved by the forward (its sign carries the clamp)."""
    x, g, scale, shift = make_inputs((1, channels, 4, 4), torch.float32, device)
    x[:, :, 1, 2] = 0
    x[:, :, 3, 0] = 1e-14  # nonzero, still below eps = 1e-12 in norm
    check_against_reference(x, g, scale, shift, False)


@pytest.mark.parametrize("tile", ["channels_64", "channels_256", "unaligned"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_forced_tiles(tile, channels_last, device):
    """Stepping through ~300 channels: several channel steps, the last partly masked (296 in channels_last,
    where the aligned tiles need a multiple of 8)."""
    x, g, scale, shift = make_inputs((2, 296 if channels_last else 300, 4, 4), torch.float32, device, channels_last)
    assert not rn.one_block(tile, x.shape[1])
    check_against_reference(x, g, scale, shift, True, tile=tile)


@pytest.mark.parametrize("tile", [name for name, single in rn.plannable_tiles() if single])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_one_block_tiles(tile, channels_last, device):
    """Each tile holding every channel (one pass), its last 8 channels masked, in bf16 (the Unet's dtype)."""
    channels = rn.FORWARD_TILES[tile].channels - 8
    x, g, scale, shift = make_inputs((2, channels, 4, 4), torch.bfloat16, device, channels_last,
                                     param_dtype=torch.float32)
    assert rn.one_block(tile, channels)
    check_against_reference(x, g, scale, shift, True, tile=tile)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_programs_walk_several_pixel_blocks(channels_last, device):
    """A program walks several pixel blocks, keeping its sums for the parameter gradients per lane across them:
    at 24x24 in fp32 (tiles of 32 pixels), 18 blocks per batch in 6 chunks of 3, or in 5 of 4 (the last 2 short)."""
    x, g, scale, shift = make_inputs((2, 40, 24, 24), torch.float32, device, channels_last)
    assert {rn.tile_for("channels_64", backward, 4).pixels for backward in (False, True)} == {32}
    for blocks in (3, 4):
        check_against_reference(x, g, scale, shift, True, tile="channels_64", blocks=blocks)


def test_backward_refuses_a_rinv_of_another_shape(device):
    x, g, scale, shift = make_inputs((2, 48, 4, 4), torch.float32, device)
    _, rinv = rn.rms_norm_forward(x, g, scale, shift, True, 1e-12, save_rinv=True)
    assert rinv.shape == (2, 16) and rinv.dtype == torch.float32
    with pytest.raises(ValueError, match=r"contiguous fp32 \(2, 16\), got torch.float32 \(2, 8\)"):
        rn.rms_norm_backward(torch.ones_like(x), x, g, scale, shift, True, 1e-12, [True] * 4 + [False],
                             rinv=rinv[:, :8].contiguous())


def test_stepping_tiles_take_one_pixel_block_per_program(device):
    x, g, scale, shift = make_inputs((2, 300, 4, 4), torch.float32, device)
    with pytest.raises(ValueError, match="one pixel block per program, not 2"):
        rn.rms_norm_forward(x, g, scale, shift, True, 1e-12, tile="channels_256", blocks=2)


@pytest.mark.parametrize("channels", [16, 48])
def test_rinv_is_saved_only_where_it_pays(channels, device):
    """The forward keeps rinv (B, H*W) fp32 for the backward from SAVE_RINV_MIN_CHANNELS channels on, and only
    when a gradient will be asked for; the narrower norm's backward recomputes it."""
    x, g, scale, shift = make_inputs((2, channels, 4, 4), torch.float32, device)
    saved = []

    def kept_rinv(requires_grad):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            rn.rms_norm_act(x.clone().requires_grad_(requires_grad), g, scale, shift, True)
        return [t for t in saved if t.shape == (2, 16) and t.dtype == torch.float32]

    assert len(kept_rinv(True)) == (1 if channels >= rn.SAVE_RINV_MIN_CHANNELS else 0)
    assert kept_rinv(False) == []


def test_strided_inputs_are_copied_correctly(device):
    base, g, scale, shift = make_inputs((2, 16, 9, 8), torch.float32, device)
    check_against_reference(base[:, :, 1:], g, scale, shift, True)
    wide, _, _, _ = make_inputs((2, 24, 8, 8), torch.float32, device)
    check_against_reference(wide[:, 4:20], g, scale, shift, True)
    x = base.detach().clone().requires_grad_()
    rn.rms_norm_act(x, g, scale, shift, True).sum().backward()  # grad_y is expanded
    x_ref = base.detach().clone().requires_grad_()
    reference.rms_norm_act(x_ref, g, scale, shift, True).sum().backward()
    assert_close(x.grad, x_ref.grad, what="dx from an expanded grad_y")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape, dtype, half", [((2, 16, 8, 8), torch.bfloat16, 0), ((2, 12, 5, 7), torch.float32, 1)],
                         ids=str)
def test_gradient_slice_of_a_wider_tensor_is_read_in_place(shape, dtype, half, channels_last, device, monkeypatch):
    """As tests/test_group_norm.py's: a channel slice of a wider gradient (the Unet's skip cat) is read in place
    through its own strides, with vector tiles (aligned bf16) and scalar ones (unaligned fp32)."""
    x, g, scale, shift = make_inputs(shape, dtype, device, channels_last)
    batch, channels, height, width = shape
    wide = torch.randn(batch, 2 * channels, height, width, generator=torch.Generator().manual_seed(3)).to(device,
                                                                                                          dtype)
    wide = wide.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad_y = wide[:, half * channels:(half + 1) * channels]
    _, grads_ref, _ = run(reference.rms_norm_act, x, g, scale, shift, True, grad_y)

    def no_copy(t, memory_format):
        raise AssertionError(f"the gradient of strides {t.stride()} was copied")

    monkeypatch.setattr(scale_shift_act, "in_memory_format", no_copy)
    _, grads, _ = run(rn.rms_norm_act, x, g, scale, shift, True, grad_y)
    assert_close(grads[0], grads_ref[0], what="dx")
    for name, grad, grad_ref, summed in zip(("dg", "d_scale", "d_shift"), grads[1:], grads_ref[1:],
                                            (batch * height * width, height * width, height * width)):
        assert_sum_close(grad, grad_ref, summed, name)


@pytest.mark.parametrize("requires_grad", ["x", "g", "shift"])
def test_only_some_inputs_require_grad(requires_grad, device):
    x, g, scale, shift = make_inputs((2, 16, 8, 8), torch.float32, device)
    grads = {}
    for fn in (rn.rms_norm_act, reference.rms_norm_act):
        inputs = dict(x=x.clone(), g=g.clone(), scale=scale.clone(), shift=shift.clone())
        inputs[requires_grad].requires_grad_()
        y = fn(inputs["x"], inputs["g"], inputs["scale"], inputs["shift"], True)
        y.backward(torch.ones_like(y))
        grads[fn] = inputs[requires_grad].grad
    actual, expected = grads[rn.rms_norm_act], grads[reference.rms_norm_act]
    if requires_grad == "x":
        assert_close(actual, expected, what="dx")
    else:
        assert_sum_close(actual, expected, 2 * 8 * 8, f"d_{requires_grad}")


def test_deterministic(device):
    """Two runs give the same bits, forward and every gradient (no atomics, fixed reduction orders)."""
    x, g, scale, shift = make_inputs((2, 96, 16, 16), torch.bfloat16, device, param_dtype=torch.float32)
    runs = [run(rn.rms_norm_act, x, g, scale, shift, True) for _ in range(2)]
    for name, first, second in zip(("y", "dx", "dg", "d_scale", "d_shift"), *([y, *grads] for y, grads, _ in runs)):
        assert torch.equal(first, second), f"{name} differs between two runs"


def test_plan_heuristic():
    """The smallest tile holding every channel (one pass); above 512 channels the stepping tile; unaligned data
    gets the unaligned tile, which always steps."""
    channels = (3, 32, 64, 65, 96, 128, 192, 256, 384, 512, 513, 768, 1024)
    assert [rn.plan_rms_norm(c, 64, False, True) for c in channels] == [
        "channels_64", "channels_64", "channels_64", "channels_128", "channels_128", "channels_128", "channels_256",
        "channels_256", "channels_512", "channels_512", "channels_256", "channels_256", "channels_256"]
    assert [rn.one_block(rn.plan_rms_norm(c, 64, False, True), c) for c in channels] == [True] * 10 + [False] * 3
    assert rn.plan_rms_norm(64, 35, False, False) == "unaligned" and not rn.one_block("unaligned", 8)
    # Pixel blocks per program on 132 SMs at batch 32: about two waves of programs; stepping tiles take one.
    assert [rn.blocks_per_program(32, 256, True, 132, backward) for backward in (False, True)] == [8, 16]
    assert [rn.blocks_per_program(32, 16, True, 132, backward) for backward in (False, True)] == [1, 1]
    assert rn.blocks_per_program(32, 256, False, 132, True) == 1


def test_every_plan_is_compiled():
    """Each (tile, ONE_BLOCK) the planner can pick, for any channel count, is in the ahead-of-time compile list."""
    planned = {(name, rn.one_block(name, c)) for c in range(1, 1100)
               for name in (rn.plan_rms_norm(c, 64, False, True), rn.plan_rms_norm(c, 63, False, False))}
    assert planned == set(rn.plannable_tiles())


def test_forced_tile_is_checked(device):
    x, g, scale, shift = make_inputs((2, 8, 5, 7), torch.float32, device)
    with pytest.raises(ValueError, match="vector-aligned"):
        rn.rms_norm_forward(x, g, scale, shift, True, 1e-12, tile="channels_64")


@pytest.mark.parametrize("save_rinv", [False, True], ids=["recomputed-rinv", "saved-rinv"])
def test_opcheck(save_rinv, device):
    x, g, scale, _ = make_inputs((2, 8, 4, 4), torch.float32, device)
    args = [t.detach().clone().requires_grad_() for t in (x, g, scale)]
    torch.library.opcheck(torch.ops.fastunet.rms_norm_act.default, (*args, None, None, None, True, 1e-12, save_rinv))


@pytest.mark.parametrize("channels", [8, 48], ids=["rinv-recomputed", "rinv-saved"])
def test_torch_compile(channels, device):
    x, g, scale, shift = make_inputs((2, channels, 4, 4), torch.float32, device)
    leaves = [t.detach().clone().requires_grad_() for t in (x, g, scale)]

    def block(x, g, scale):
        return rn.rms_norm_act(x * 2, g, scale, shift, True) + 1

    compiled = torch.compile(block, fullgraph=True)
    y = compiled(*leaves)
    y.sum().backward()
    grads = [t.grad for t in leaves]
    leaves_ref = [t.detach().clone().requires_grad_() for t in (x, g, scale)]
    y_ref = block(*leaves_ref)
    y_ref.sum().backward()
    assert_close(y, y_ref, what="compiled y")
    for name, grad, leaf in zip(("dx", "dg", "d_scale"), grads, leaves_ref):
        assert_close(grad, leaf.grad, what=f"compiled {name}", atol=1e-4)


def test_gpu_compile():
    """Every configuration the plans can launch compiles for sm_80, 86, 89, 90 and 120 (with Triton's bundled
    ptxas, no GPU needed), within each one's shared memory, without register spills."""
    assert_every_config_compiles_cleanly("fastunet.kernels.rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unet_call_costs_at_most_four_gpu_kernels(dtype, device):
    """Forward + backward as a 2.x ResnetBlock calls it (g fp32 under bf16 autocast, scale/shift the chunk()
    halves of one time-MLP output): at most 4 GPU kernels (torch.profiler on CPU, not a timing), all Triton but
    one ATen sum of the per-program partial sums of the parameter gradients (kernels/scale_shift_act.py's
    parameter_grads: a reduction spread over the GPU, where the parameter kernel's few programs walked the
    partials in sequence). No cast, zero-fill or cat."""
    from kernel_count import count_gpu_kernels
    g_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    x, g, _, _ = make_inputs((2, 16, 8, 8), dtype, device, param_dtype=g_dtype)
    time_mlp = (0.5 * torch.randn(2, 32, generator=torch.Generator().manual_seed(3))).to(device, dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, g, time_mlp)]
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(device, dtype)

    def step():
        scale, shift = leaves[2].chunk(2, dim=1)
        rn.rms_norm_act(leaves[0], leaves[1], scale, shift, True).backward(grad_y)
    counted = count_gpu_kernels(step)
    assert counted.total <= 4, counted.summary(top=20)
    assert counted.by_name.get("aten::sum", 0) <= 1, counted.summary(top=20)
    assert all(name.startswith("triton::") or name == "aten::sum" for name in counted.by_name), counted.summary(top=20)
    assert [t.grad.dtype for t in leaves] == [t.dtype for t in leaves]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_residual_is_added_after_the_activation(dtype, device):
    """`act(rms_norm(x) * (scale + 1) + shift) + residual` with the residual's gradient passed through."""
    x, g, scale, shift = make_inputs((2, 16, 8, 8), dtype, device, param_dtype=torch.float32)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    results = []
    for fn in (rn.rms_norm_act, reference.rms_norm_act):
        leaves = [t.detach().clone().requires_grad_() for t in (x, g, scale._base, residual)]
        y = fn(leaves[0], leaves[1], *leaves[2].chunk(2, dim=1), True, residual=leaves[3])
        y.backward(torch.ones_like(y))
        results.append([y, *(t.grad for t in leaves)])
    (y, dx, d_g, d_time, d_residual), expected = results
    assert_close(y, expected[0], what="y")
    assert_close(dx, expected[1], what="dx")
    assert_sum_close(d_g, expected[2], 2 * 8 * 8, "dg")
    assert_sum_close(d_time, expected[3], 8 * 8, "d_scale_shift")
    assert torch.equal(d_residual, expected[4]), "the residual's gradient is the output's"
