"""CUDA-only tests of the fused norm kernels: exactly the paths the Triton interpreter cannot run.

On CPU the kernels run in the interpreter (tests/test_group_norm.py, tests/test_rms_norm.py) at small shapes and
without FAST_MATH, so these never ran there: the GPU's approximate exp2 and division in SiLU and its derivative,
the bf16 widening in inline PTX (kernels/scale_shift_act.py's to_float32), the 16-byte vector accesses of the
aligned tiles, and the plans that only the Unet's real shapes choose on a real device: the persistent "big"
tile, the split path at batch 1, packed small maps, and the parameter-gradient kernel over a batch of 32. Every
case compares with fastunet.reference at the CPU tests' own tolerances (tests/tolerances.py). bench/run_gpu.sh
runs this file first, with the other files that hold CUDA-only tests.
"""

import pytest
import torch

from fastunet import reference
from fastunet.kernels import group_norm as gn
from fastunet.kernels import rms_norm as rn
from fastunet.kernels import scale_shift_act
from test_group_norm import check_against_reference as check_group_norm, make_inputs as group_norm_inputs
from test_rms_norm import check_against_reference as check_rms_norm, make_inputs as rms_norm_inputs
from tolerances import assert_close, assert_sum_close

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA only: the interpreter runs neither FAST_MATH, the inline PTX, nor the plans of real GPU shapes",
)

DEVICE = "cuda"

# (shape, groups, channels_last, the tile the planner should pick on this GPU or "split" for the split path).
GROUP_NORM_CASES = [
    # 192 groups, more than the SMs of any GPU, so that no split path is taken: persistent programs over packs
    ((24, 64, 128, 128), 8, False, "big"),
    ((1, 64, 128, 128), 8, False, "split"),  # 8 groups on a whole GPU: pixel chunks in two launches
    ((32, 128, 32, 32), 8, False, "rows"),
    ((32, 512, 8, 8), 8, False, "small_maps"),  # several 64-pixel groups per program
    ((4, 64, 63, 65), 8, False, "unaligned"),
    ((24, 128, 64, 64), 8, True, "rows"),
    ((24, 64, 128, 128), 8, True, "big"),
]


def _group_norm_plan(shape, groups, channels_last, dtype):
    x = torch.empty(shape, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    plans, _, _ = gn._prepare_launch(None, (x,), groups, backward=False)
    return plans[0]


# Each case in bf16 (the Unet's dtype under autocast); fp16 and fp32 on the first two tiles. Every (tile, dtype) is
# a compile of each direction: this keeps the file within bench/run_gpu.sh's test stage.
GROUP_NORM_RUNS = [(*case, torch.bfloat16) for case in GROUP_NORM_CASES] + [
    (*case, dtype) for case in GROUP_NORM_CASES[:2] for dtype in (torch.float16, torch.float32)]


@pytest.mark.parametrize("shape, groups, channels_last, expected_tile, dtype", GROUP_NORM_RUNS, ids=str)
def test_group_norm_at_unet_shapes(shape, groups, channels_last, expected_tile, dtype):
    """Forward and every gradient at the shapes whose plans only a GPU's SM count and L2 size select; 16-bit
    activations with fp32 parameters, as under autocast."""
    plan = _group_norm_plan(shape, groups, channels_last, dtype)
    assert (plan.chunks > 1 if expected_tile == "split" else plan.tile == expected_tile), plan
    param_dtype = torch.float32 if dtype != torch.float32 else None
    x, weight, bias, scale, shift = group_norm_inputs(shape, groups, dtype, DEVICE, channels_last,
                                                      param_dtype=param_dtype)
    check_group_norm(x, weight, bias, groups, scale, shift, True)


def test_group_norm_silu_saturates_correctly_in_fp32():
    """Pre-activations beyond |u| = 100, where the fast SiLU's exp2 overflows to inf and its division meets it
    (sigmoid -> 0, and -> 1 at the other end): y within fp32's tolerance of the exact reference, every gradient
    finite. (The gradients' own accuracy at such gains is a conditioning question, not the activation's: the
    group means of gamma * du cancel at a scale 50x the usual, so they are checked at ordinary gains above.)"""
    x, weight, bias, scale, shift = group_norm_inputs((4, 64, 32, 32), 8, torch.float32, DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight * 50, bias * 50)]
    y = gn.group_norm_act(*leaves, 8, scale, shift)
    # The kernel folds the mean into beta (u = x * alpha + beta), which rounds at the magnitude of x * alpha: 50x
    # the usual here, so fp32's absolute tolerance is scaled by the same 50.
    assert_close(y, reference.group_norm_act(x, weight * 50, bias * 50, 8, scale, shift), what="y", atol=50 * 1e-5)
    pre_activation = (y.detach().abs().max())
    assert pre_activation > 100, f"the test should reach |u| > 100, got max |y| = {pre_activation}"
    y.backward(torch.randn_like(y))
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_gradient_slice_reads_its_own_strides(channels_last):
    """The gradient as the skip cat hands it down: a channel slice of a wider tensor (GRAD_STRIDES builds)."""
    x, weight, bias, scale, shift = group_norm_inputs((8, 64, 32, 32), 8, torch.bfloat16, DEVICE, channels_last)
    wide = torch.randn(8, 128, 32, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    if channels_last:
        wide = wide.to(memory_format=torch.channels_last)
    grad_y = wide[:, 32:96]
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    expected = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    gn.group_norm_act(*leaves, 8, scale, shift).backward(grad_y)
    reference.group_norm_act(*expected, 8, scale, shift).backward(grad_y.contiguous())
    assert_close(leaves[0].grad, expected[0].grad, what="dx")
    for name, leaf, reference_leaf in zip(("d_weight", "d_bias"), leaves[1:], expected[1:]):
        assert_sum_close(leaf.grad, reference_leaf.grad, 8 * 32 * 32, name)


# (shape, channels_last, tile the planner should pick)
RMS_NORM_CASES = [
    ((8, 64, 64, 64), False, "channels_64"),  # one pass over each pixel's channels
    ((8, 256, 16, 16), False, "channels_256"),
    ((8, 512, 16, 16), False, "channels_512"),
    ((4, 768, 16, 16), False, "channels_256"),  # more channels than one tile holds: stepping
    ((4, 96, 63, 65), False, "unaligned"),
    ((8, 128, 32, 32), True, "channels_128"),
]


RMS_NORM_RUNS = [(*case, torch.bfloat16) for case in RMS_NORM_CASES] + [
    (*RMS_NORM_CASES[0], dtype) for dtype in (torch.float16, torch.float32)]


@pytest.mark.parametrize("shape, channels_last, expected_tile, dtype", RMS_NORM_RUNS, ids=str)
def test_rms_norm_at_unet_shapes(shape, channels_last, expected_tile, dtype):
    """Forward and every gradient, including the ATen sum of the per-pixel-block partials (P up to 64 here)."""
    x, g, scale, shift = rms_norm_inputs(shape, dtype, DEVICE, channels_last,
                                         param_dtype=torch.float32 if dtype != torch.float32 else None)
    aligned = scale_shift_act.vector_aligned((x,), shape[1] if channels_last else shape[2] * shape[3])
    assert rn.plan_rms_norm(shape[1], shape[2] * shape[3], channels_last, aligned) == expected_tile
    check_rms_norm(x, g, scale, shift, True)
