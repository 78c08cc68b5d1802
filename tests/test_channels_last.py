"""channels_last end to end: after model.to(memory_format=torch.channels_last) with a channels_last input, fastunet's
Triton path makes no layout copy (aten copy_/clone/contiguous that computes, counted as bench/kernel_count.py
counts kernels: outermost ATen ops, inside Triton launches left out)."""

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastunet
import kernel_count

CONFIG = dict(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=16, resnet_block_groups=4)
COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous"}


def layout_copies(fn):
    """Counter of (op, shape, where) for every outermost computing copy fn makes."""
    with kernel_count._named_triton_launches(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    copies = collections.Counter()

    def visit(event, parent):
        if event.name.startswith(kernel_count.TRITON_PREFIX):
            return
        if event.name.startswith("aten::"):
            if event.name in COPY_OPS and kernel_count._computes(event):
                copies[(event.name, str(event.input_shapes[0]), parent)] += 1
            return
        for child in event.cpu_children:
            visit(child, event.name)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event, None)
    return copies


def channels_last_model(block_norm, device):
    torch.manual_seed(0)
    model = fastunet.Unet(**CONFIG, block_norm=block_norm).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8, device=device).to(memory_format=torch.channels_last)
    return model, x, torch.tensor([10, 700], device=device)


@pytest.mark.parametrize("block_norm", ["group", "rms"])
def test_forward_makes_no_layout_copy(block_norm, device):
    model, x, time = channels_last_model(block_norm, device)

    def forward():
        with fastunet.use_backend("triton"):
            out = model(x, time)
        assert out.is_contiguous(memory_format=torch.channels_last), "the output left channels_last"

    copies = layout_copies(forward)
    assert not copies, f"layout copies in a channels_last forward: {dict(copies)}"


def layout_mismatches_at_convolutions(model):
    """A list that fills, as the model runs, with every convolution input and every to_qkv output gradient that is
    not channels_last (hooks on the model)."""
    wrong = []

    def check(name, what, tensor):
        if not tensor.is_contiguous(memory_format=torch.channels_last):
            wrong.append(f"{name} {what} {tuple(tensor.stride())}")

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, inputs, out, name=name: check(name, "input", inputs[0]))
        if isinstance(module, (fastunet.Attention, fastunet.LinearAttention)):
            module.to_qkv.register_full_backward_hook(
                lambda m, grad_in, grad_out, name=name: check(name, "to_qkv output gradient", grad_out[0]))
    return wrong


@pytest.mark.parametrize("block_norm", ["group", "rms"])
def test_training_step_makes_no_layout_copy(block_norm, device):
    """No outermost layout copy in a channels_last forward+backward, and none hidden in the convolutions either:
    the copies a layout mismatch costs there (cuDNN converts its input or output gradient to the weight's layout)
    are not outermost ops, so they are checked at the convolutions. Every convolution's input is channels_last
    (the attention layers' fused ops hand to_out its input in the model's layout, and each Downsample's
    pixel-unshuffle writes it), and so is the output gradient the attention ops hand to_qkv. (Left out: the final
    conv's gradient comes from the user's loss; the gradients the skip cat hands back are channel slices,
    channels_last rows with their own strides, which the fused norms read in place.)"""
    model, x, time = channels_last_model(block_norm, device)
    mismatches = layout_mismatches_at_convolutions(model)

    def step():
        with fastunet.use_backend("triton"):
            model(x, time).square().mean().backward()

    copies = layout_copies(step)
    assert not copies, f"layout copies in a channels_last forward+backward: {dict(copies)}"
    assert not mismatches, f"not channels_last: {mismatches}"


def test_pixel_unshuffle_keeps_channels_last():
    """Downsample's rearrangement gives einops' values, in the input's layout, and copies and pickles as einops'
    module does (deepcopy, EMA and checkpoints go through its constructor)."""
    import copy
    import pickle

    from einops import rearrange

    from fastunet.layers import PIXEL_UNSHUFFLE, Rearrange

    x = torch.randn(2, 6, 8, 4).to(memory_format=torch.channels_last)
    module = Rearrange(PIXEL_UNSHUFFLE, p1=2, p2=2)
    out = module(x)
    assert torch.equal(out, rearrange(x.contiguous(), PIXEL_UNSHUFFLE, p1=2, p2=2))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert module(x.contiguous()).is_contiguous()
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert type(clone) is Rearrange and torch.equal(clone(x), out)
