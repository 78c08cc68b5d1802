"""Bad input raises a TypeError or ValueError naming what was expected and what came, before any computation."""

import re

import pytest
import torch

import fastunet
from fastunet import functional
from upstream import upstream_2


@pytest.fixture(scope="module")
def model():
    return fastunet.Unet(8, dim_mults=(1, 2, 4), self_condition=True, resnet_block_groups=4)


X = torch.randn(2, 3, 16, 16)
TIME = torch.tensor([1, 2])


@pytest.mark.parametrize(
    "args, error, pattern",
    [
        ((torch.randn(2, 4, 16, 16), TIME), ValueError, r"expected x with 3 channels, got shape \(2, 4, 16, 16\)"),
        ((torch.randn(2, 3, 16, 10), TIME), ValueError, r"divisible by downsample_factor=4, got 16x10"),
        ((torch.randn(3, 16, 16), TIME), TypeError, r"expected x as a 4-D float tensor .* got \(3, 16, 16\)"),
        ((torch.ones(2, 3, 16, 16, dtype=torch.int64), TIME), TypeError, r"got \(2, 3, 16, 16\) int64"),
        ((torch.randn(0, 3, 16, 16), TIME[:0]), ValueError, r"expected a batch of at least one image .* got x of shape \(0, 3, 16, 16\)"),
        ((torch.randn(2, 3, 0, 16), TIME), ValueError, r"expected a batch of at least one image .* \(2, 3, 0, 16\)"),
        ((X, torch.tensor([1, 2, 3])), ValueError, r"expected time of shape \(2,\) for a batch of 2 .* got \(3,\)"),
        ((X, torch.tensor([True, False])), TypeError, r"expected time as an int or float tensor .* got \(2,\) bool"),
        ((X, torch.tensor([1.0, float("nan")])), ValueError, r"expected finite time, got 1 non-finite of 2"),
        ((X, torch.tensor([float("inf")]).half()), ValueError, r"expected finite time, got 1 non-finite of 1 .*float16"),
        ((X, TIME.to("meta")), ValueError, r"expected time on x's device cpu, got \(2,\) int64 on meta"),
        ((X.to("meta"), TIME), ValueError, r"expected x on the model's device cpu, got \(2, 3, 16, 16\) float32 on meta"),
        ((X, TIME, X.half()), TypeError, r"expected x_self_cond of x's dtype and device \(\(2, 3, 16, 16\) float32 on cpu\), got .* float16"),
        ((X, torch.tensor([[1], [2]])), ValueError, r"expected time of shape \(2,\) .* got \(2, 1\)"),
        ((X, 5), TypeError, r"expected time as an int or float tensor of shape \(2,\), got int"),
        ((X, TIME, torch.randn(2, 3, 8, 8)), ValueError, r"expected x_self_cond of x's shape \(2, 3, 16, 16\), got \(2, 3, 8, 8\)"),
    ],
)
def test_unet_forward_rejects(model, args, error, pattern):
    with pytest.raises(error, match=pattern):
        model(*args)


def test_self_cond_without_self_condition():
    model = fastunet.Unet(8, dim_mults=(1, 2), resnet_block_groups=4)
    with pytest.raises(ValueError, match="self_condition=False"):
        model(X[:, :, :8, :8], TIME, X[:, :, :8, :8])


def test_constructor_rejects():
    with pytest.raises(ValueError, match=r"expected block_norm in \('group', 'rms'\), got 'layer'"):
        fastunet.Unet(8, block_norm="layer")
    with pytest.raises(ValueError, match=r"expected resnet_block_groups=3 to divide every block width .* got widths"):
        fastunet.Unet(8, dim_mults=(1, 2), resnet_block_groups=3)
    with pytest.raises(ValueError, match=r"expected full_attn to be one value or a tuple of 3"):
        fastunet.Unet(8, dim_mults=(1, 2, 4), full_attn=(True, False))


@pytest.mark.parametrize("model_norm, checkpoint_norm", [("group", "rms"), ("rms", "group")])
@pytest.mark.parametrize("strict", [True, False])
def test_checkpoint_of_the_other_block_norm(model_norm, checkpoint_norm, strict):
    checkpoint = fastunet.Unet(8, dim_mults=(1, 2), block_norm=checkpoint_norm).state_dict()
    model = fastunet.Unet(8, dim_mults=(1, 2), block_norm=model_norm)
    name = {"rms": "an RMSNorm", "group": "a GroupNorm"}[checkpoint_norm]
    pattern = rf"holds {name} block norm.*built with block_norm='{model_norm}'.*block_norm='{checkpoint_norm}'"
    with pytest.raises(ValueError, match=pattern):
        model.load_state_dict(checkpoint, strict=strict)


def test_upstream_2_checkpoint_into_group_model_names_the_fix():
    checkpoint = upstream_2().Unet(8, dim_mults=(1, 2)).state_dict()
    with pytest.raises(ValueError, match=re.escape("block_norm='rms'")):
        fastunet.Unet(8, dim_mults=(1, 2)).load_state_dict(checkpoint)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: functional.group_norm_act(torch.randn(2, 6, 4, 4), None, None, 4), ValueError,
         r"expected groups to be a positive int dividing the 6 channels, got 4"),
        (lambda: functional.group_norm_act(torch.randn(1, 6, 1, 1), None, None, 6), ValueError,
         r"expected more than one value over the batch per group \(B \* C / groups \* H \* W\), got 1 for x of "
         r"shape \(1, 6, 1, 1\)"),
        (lambda: functional.group_norm_act(torch.randn(2, 6, 4, 4), torch.ones(5), None, 3), ValueError,
         r"expected weight of shape \(6\), got \(5,\)"),
        (lambda: functional.group_norm_act(torch.randn(2, 6, 4, 4), None, None, 3, scale=torch.ones(3, 6)), ValueError,
         r"expected scale of shape \(2, 6\), got \(3, 6\)"),
        (lambda: functional.rms_norm_act(torch.randn(2, 6, 4), torch.ones(6)), ValueError,
         r"expected x with 4 dimensions, got shape \(2, 6, 4\)"),
        (lambda: functional.rms_norm_act(torch.ones(2, 6, 4, 4, dtype=torch.int32), torch.ones(6)), TypeError,
         r"expected x of dtype float32, float16, bfloat16, float64, got \(2, 6, 4, 4\) int32"),
        (lambda: functional.rms_norm_act(torch.randn(0, 6, 4, 4), torch.ones(6)), ValueError,
         r"expected x with at least one element in every dimension, got shape \(0, 6, 4, 4\)"),
        (lambda: functional.group_norm_act(torch.randn(2, 6, 0, 4), None, None, 3), ValueError,
         r"expected x with at least one element in every dimension, got shape \(2, 6, 0, 4\)"),
        (lambda: functional.group_norm_act(torch.randn(2, 6, 4, 4), torch.ones(6, device="meta"), None, 3), ValueError,
         r"expected all tensors on one device, got x on cpu, weight on meta"),
        (lambda: functional.rms_norm_act(torch.randn(2, 6, 4, 4), torch.ones(6), scale=torch.ones(2, 6, 1)), ValueError,
         r"expected scale with 2 dimensions, got shape \(2, 6, 1\)"),
        (lambda: functional.attention(*torch.randn(3, 0, 2, 5, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)), ValueError,
         r"expected q with at least one element in every dimension, got shape \(0, 2, 5, 8\)"),
        (lambda: functional.attention(*torch.randn(3, 1, 2, 5, 8), torch.randn(2, 4, 8), [0.0]), TypeError,
         r"expected mem_v to be a torch.Tensor, got list"),
        (lambda: functional.linear_attention(*torch.randn(3, 1, 2, 8, 5), torch.randn(2, 8, 4),
                                             torch.randn(2, 8, 4, device="meta")), ValueError,
         r"expected all tensors on one device, got q on cpu, k on cpu, v on cpu, mem_k on cpu, mem_v on meta"),
        (lambda: functional.attention(*torch.randn(3, 1, 2, 5, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)), ValueError,
         r"expected mem_k of shape \(2, \*, 8\), got \(3, 4, 8\)"),
        (lambda: functional.attention(*torch.randn(3, 1, 2, 5, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 4)), ValueError,
         r"expected mem_k of shape \(2, \*, 8\), got \(2, 4, 4\)"),
        (lambda: functional.linear_attention(torch.randn(1, 2, 8, 5), torch.randn(1, 2, 8, 6), torch.randn(1, 2, 8, 5),
                                             torch.randn(2, 8, 4), torch.randn(2, 8, 4)), ValueError,
         r"expected k of shape \(1, 2, 8, 5\), got \(1, 2, 8, 6\)"),
        (lambda: functional.linear_attention(torch.randn(1, 2, 8, 5), torch.randn(1, 2, 8, 5).half(),
                                             torch.randn(1, 2, 8, 5), torch.randn(2, 8, 4), torch.randn(2, 8, 4)),
         TypeError, r"expected k of q's dtype torch.float32, got torch.float16"),
    ],
)
def test_functional_rejects(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize("model_dtype, x_dtype, fix", [
    (torch.float32, torch.float16, r"model.half\(\) or keep it in float32 and run it under torch.autocast\('cpu', dtype=torch.float16\)"),
    (torch.float32, torch.bfloat16, r"model.bfloat16\(\) or .* torch.autocast\('cpu', dtype=torch.bfloat16\)"),
    (torch.float16, torch.float32, r"model.float\(\)"),
    (torch.float32, torch.float64, r"model.double\(\)"),
])
def test_dtype_mix_outside_autocast_names_the_fix(model_dtype, x_dtype, fix):
    """Without the check, fp16 x into an fp32 model ends in torch's "Input type (c10::Half) and bias type (float)"."""
    model = fastunet.Unet(8, dim_mults=(1, 2), block_norm="rms").to(model_dtype)
    wanted = str(model_dtype).replace("torch.", "")
    with pytest.raises(TypeError, match=rf"expected x of the model's dtype {wanted} outside autocast, got .*; .*{fix}"):
        model(X[:1, :, :8, :8].to(x_dtype), TIME[:1])


def test_low_precision_x_runs_under_autocast_and_in_a_converted_model():
    """Both fixes the dtype-mix error names work (reference backend: this is about the checks, not the kernels)."""
    torch.manual_seed(0)
    model = fastunet.Unet(8, dim_mults=(1, 2), block_norm="rms")
    x = X[:1, :, :8, :8]
    with fastunet.use_backend("reference"):
        expected = model(x, TIME[:1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_out = model(x.bfloat16(), TIME[:1])
        converted_out = model.bfloat16()(x.bfloat16(), TIME[:1])
    # bf16 keeps 8 significant bits; a whole Unet of bf16 roundings stays within a few percent of its output scale.
    scale = expected.abs().max().item()
    for name, out in (("autocast", autocast_out), ("model.bfloat16()", converted_out)):
        assert out.dtype == torch.bfloat16, name
        error = (out.float() - expected).abs().max().item()
        assert error < 0.05 * scale, f"{name}: error {error:.3g} vs output scale {scale:.3g}"


STANDALONE_MODULES = {
    "Attention": (lambda: fastunet.Attention(16), (2, 16, 4, 4)),
    "LinearAttention": (lambda: fastunet.LinearAttention(16), (2, 16, 4, 4)),
    "Block": (lambda: fastunet.Block(16, 16), (2, 16, 4, 4)),
    "RMSNorm": (lambda: fastunet.RMSNorm(16), (2, 16, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(STANDALONE_MODULES))
def test_standalone_modules_name_dtype_and_device_mix(name):
    """Used on their own (outside the Unet's checks), the modules refuse a dtype or device mix by name, with the
    fix, instead of torch's 'Input type (c10::Half) and bias type (float) should be the same'."""
    build, shape = STANDALONE_MODULES[name]
    module = build()
    with pytest.raises(TypeError, match=rf"{name}: expected input of the module's dtype float32 outside autocast, got "
                                        rf"\(2, 16, 4, 4\) float16 on cpu; convert the module .*torch.autocast"):
        module(torch.randn(shape, dtype=torch.float16))
    with pytest.raises(ValueError, match=rf"{name}: expected input on the module's device cpu, got \(2, 16, 4, 4\) "
                                         rf"float32 on meta"):
        module(torch.empty(shape, device="meta"))
    with pytest.raises(TypeError, match=rf"{name}: expected a 4-D float tensor, got \(2, 16\) float32"):
        module(torch.randn(2, 16))


def test_standalone_resnet_block_names_a_time_embedding_dtype_mix():
    block = fastunet.ResnetBlock(16, 16, time_emb_dim=8)
    with pytest.raises(TypeError, match=r"ResnetBlock: expected input of the module's dtype float32 outside autocast, "
                                        r"got \(2, 8\) float64"):
        block(torch.randn(2, 16, 4, 4), torch.randn(2, 8, dtype=torch.float64))
