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
        ((torch.randn(3, 16, 16), TIME), TypeError, r"expected x as a 4-D fp32/fp16/bf16 tensor .* got \(3, 16, 16\)"),
        ((torch.randn(2, 3, 16, 16).double(), TIME), TypeError, r"got \(2, 3, 16, 16\) float64"),
        ((torch.ones(2, 3, 16, 16, dtype=torch.int64), TIME), TypeError, r"got \(2, 3, 16, 16\) int64"),
        ((X, torch.tensor([1, 2, 3])), ValueError, r"expected time of shape \(2,\) for a batch of 2, got \(3,\)"),
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
    pattern = rf"holds a {checkpoint_norm} block norm.*built with block_norm='{model_norm}'.*block_norm='{checkpoint_norm}'"
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
        (lambda: functional.group_norm_act(torch.randn(2, 6, 4, 4), torch.ones(5), None, 3), ValueError,
         r"expected weight of shape \(6\), got \(5,\)"),
        (lambda: functional.group_norm_act(torch.randn(2, 6, 4, 4), None, None, 3, scale=torch.ones(3, 6)), ValueError,
         r"expected scale of shape \(2, 6\), got \(3, 6\)"),
        (lambda: functional.rms_norm_act(torch.randn(2, 6, 4), torch.ones(6)), ValueError,
         r"expected x with 4 dimensions, got shape \(2, 6, 4\)"),
        (lambda: functional.rms_norm_act(torch.randn(2, 6, 4, 4).double(), torch.ones(6)), TypeError,
         r"expected x of dtype float32, float16, bfloat16, got \(2, 6, 4, 4\) float64"),
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
