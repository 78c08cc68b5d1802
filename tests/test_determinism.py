"""Every kernel, and the whole Unet, on the Triton backend: repeating a forward and backward on the same inputs
gives bitwise identical outputs and gradients, in every dtype (no float atomics; a launch choice timed on the GPU
is timed once and kept, kernels/tuning.py).

Under the interpreter (no GPU) the shapes are small; on a GPU the same tests run the compiled kernels, where split
reductions and atomics would show up as differences in the last bits.
"""

import pytest
import torch

import fastunet
from fastunet import functional

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REPEATS = 3


def bits(t):
    """The tensor's raw bits, so that equal NaNs compare equal and -0.0 differs from 0.0."""
    t = t.detach().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def forward_backward(op, tensors, seed=0):
    """op(*tensors) -> (output, grad of every input) for a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = op(*leaves)
    generator = torch.Generator(device=out.device).manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=generator, device=out.device).to(out.dtype)
    out.backward(grad_out)
    return [out] + [leaf.grad for leaf in leaves if leaf.grad is not None]


def assert_repeatable(op, tensors, what):
    with fastunet.use_backend("triton"):
        first = forward_backward(op, tensors)
        for repeat in range(1, REPEATS):
            again = forward_backward(op, tensors)
            for index, (a, b) in enumerate(zip(first, again)):
                name = "output" if index == 0 else f"grad {index - 1}"
                differ = int((bits(a) != bits(b)).sum())
                assert differ == 0, f"{what}: {name} differs in {differ} of {a.numel()} elements on repeat {repeat}"


def random(shape, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_act(dtype, device):
    x = random((2, 8, 5, 6), dtype, device, 0)
    weight, bias = random((2, 8), torch.float32, device, 1)
    scale, shift = random((2, 2, 8), torch.float32, device, 2)
    op = lambda x, w, b, s, t: functional.group_norm_act(x, w, b, 4, s, t, True, 1e-5)  # noqa: E731
    assert_repeatable(op, (x, weight, bias, scale, shift), f"group_norm_act {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_act(dtype, device):
    x = random((2, 8, 5, 6), dtype, device, 0).to(memory_format=torch.channels_last)
    g = random((8,), torch.float32, device, 1)
    scale, shift = random((2, 2, 8), torch.float32, device, 2)
    op = lambda x, g, s, t: functional.rms_norm_act(x, g, s, t, True)  # noqa: E731
    assert_repeatable(op, (x, g, scale, shift), f"rms_norm_act {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention(dtype, device):
    q, k, v = random((3, 2, 2, 21, 16), dtype, device, 0)
    mem_k, mem_v = random((2, 2, 4, 16), torch.float32, device, 1)
    assert_repeatable(functional.attention, (q, k, v, mem_k, mem_v), f"attention {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_attention(dtype, device):
    q, k, v = random((3, 2, 2, 16, 21), dtype, device, 0)
    mem_k, mem_v = random((2, 2, 16, 4), torch.float32, device, 1)
    assert_repeatable(functional.linear_attention, (q, k, v, mem_k, mem_v), f"linear_attention {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["packed_attention", "packed_linear_attention"])
def test_packed_attention_ops(op, dtype, device):
    """The forms the Unet calls: q, k, v read from the to_qkv output, one gradient tensor for it."""
    qkv = random((2, 3 * 2 * 16, 3, 7), dtype, device, 0)
    mem_kv = random((2, 2, 4, 16) if op == "packed_attention" else (2, 2, 16, 4), torch.float32, device, 1)
    fn = getattr(functional, op)
    assert_repeatable(lambda qkv, mem_kv: fn(qkv, mem_kv, 2), (qkv, mem_kv), f"{op} {dtype}")


# Each kernel is tested above in every dtype; the whole model in fp32 and in both autocast dtypes, with group norms
# once (a GroupNorm Unet takes ~20 s per forward and backward under the interpreter) and RMS norms otherwise.
@pytest.mark.parametrize("block_norm, autocast_dtype",
                         [("group", None), ("rms", torch.float16), ("rms", torch.bfloat16)],
                         ids=["group-fp32", "rms-fp16", "rms-bf16"])
def test_whole_unet(block_norm, autocast_dtype, device):
    """fp32, and fp16/bf16 autocast (the low-precision path the kernels serve): output and every parameter grad.
    Two stages, so that linear attention (outer stage) and full attention (inner stage and middle) both run."""
    torch.manual_seed(0)
    model = fastunet.Unet(8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=16, resnet_block_groups=4,
                          block_norm=block_norm).to(device)
    x = random((1, 3, 4, 4), torch.float32, device, 3)
    time = torch.tensor([700], device=device)
    with fastunet.use_backend("triton"):
        runs = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.split(":")[0], dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                out = model(x, time)
            out.float().square().mean().backward()
            runs.append([("output", out)] + [(name, p.grad) for name, p in model.named_parameters()])
    for (name, a), (_, b) in zip(*runs):
        differ = int((bits(a) != bits(b)).sum())
        assert differ == 0, f"Unet {block_norm} {autocast_dtype}: {name} differs in {differ} of {a.numel()} elements"
