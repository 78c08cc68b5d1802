"""CUDA-only tests of the attention kernels: exactly the paths the Triton interpreter cannot run.

Under the interpreter every dot operand is upcast to fp32 (16-bit tl.dot is wrong there, triton issue 11584) and
fp32 dots are exact, so these never ran on CPU: 16-bit tensor-core dots (mma.sync / wgmma) with their transposed
shared-memory operands, TF32 dots of fp32 inputs, the in-kernel casts of fp32 memory slots beside bf16
activations (autocast), and every GPU configuration of the tile tables (_config / _plans pick one per head dim,
dtype and N alignment). Tolerances are the CPU tests' own (tests/test_attention.py: twice PyTorch's error in the
dtype plus one ulp, TF32-truncated yardstick for fp32; tests/test_linear_attention.py: per-dtype relative).
"""

import pytest
import torch

from tolerances import assert_close
from test_attention import _check_against_reference, _inputs as _attention_inputs
from test_linear_attention import _check_against_reference as _check_linear, _inputs as _linear_inputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA only: the interpreter upcasts dot operands to fp32, so tensor-core, TF32 and in-kernel memory-slot "
           "casts run only on a GPU",
)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("n", [256, 250], ids=["aligned", "unaligned"])
def test_attention_every_config(n, head_dim, dtype):
    """Each table entry of this GPU (head dim x dot precision), with N a multiple of 16 (the divisibility-specialized
    build) and not (masked last blocks, scalar loads), 4 memory slots in the input dtype."""
    inputs, grad = _attention_inputs(2, 4, n, 4, head_dim, dtype, "cuda", seed=20)
    _check_against_reference(inputs, grad, f"cuda N{n} d{head_dim} {dtype}")


@pytest.mark.parametrize("n", [256, 4096], ids=["unet_mid", "n4096"])
def test_attention_bf16_fp32_memory(n):
    """Autocast's mix: bf16 q, k, v, fp32 memory slots cast to bf16 inside the kernels, their gradient stored fp32;
    at the Unet's mid-stage shape (N = 256, heads 4, d 32) and at N = 4096."""
    inputs, grad = _attention_inputs(2, 4, n, 4, 32, torch.bfloat16, "cuda", mem_dtype=torch.float32, seed=21)
    _check_against_reference(inputs, grad, f"cuda bf16 with fp32 memory N{n}")


def test_attention_layer_autocast():
    """The Attention layer under bf16 autocast on the Triton backend against the reference backend in fp32."""
    import fastunet
    from fastunet.attention import Attention

    torch.manual_seed(22)
    layer = Attention(128, heads=4, dim_head=32).cuda()
    x = torch.randn(4, 128, 16, 16, device="cuda")
    grads = {}
    for backend in ("triton", "reference"):
        layer.zero_grad(set_to_none=True)
        with fastunet.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16,
                                                           enabled=backend == "triton"):
            out = layer(x, residual=x)
        out.float().square().mean().backward()
        grads[backend] = [out.float()] + [p.grad.float() for p in layer.parameters()]
    for name, a, e in zip(["out"] + [n for n, _ in layer.named_parameters()], grads["triton"], grads["reference"]):
        scale = e.abs().max().item()
        assert_close(a, e, what=f"layer {name}", atol=3e-2 * scale, rtol=3e-2)


@pytest.mark.parametrize("tf32_matmul", [False, True], ids=["torch_fp32", "torch_tf32"])
def test_attention_tf32(tf32_matmul):
    """fp32 inputs run TF32 dots; the yardstick truncates every dot operand to TF32. Torch's own matmul precision
    setting does not change the kernels (they always ask for TF32)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32_matmul
    try:
        inputs, grad = _attention_inputs(2, 2, 300, 4, 32, torch.float32, "cuda", seed=23)
        _check_against_reference(inputs, grad, f"cuda tf32 (torch allow_tf32={tf32_matmul})")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("n", [4096, 1000], ids=["aligned", "unaligned"])
def test_linear_attention_every_config(n, head_dim, dtype):
    """Each linear-attention configuration of the GPU heuristic (per head dim and dtype), 16-bit tensor-core
    products and the fp32 fp16x3 / split-K products, fp32 memory slots read in place, several splits."""
    inputs, grad = _linear_inputs(4, 4, head_dim, n, 4, dtype, "cuda", seed=24)
    _check_linear(inputs, grad, f"cuda N{n} d{head_dim} {dtype}")


def test_packed_ops_match_unpacked():
    """The packed ops (the Unet's call) equal the unpacked ones on the same values bit for bit: the same kernels
    read the same elements through other strides."""
    from fastunet.kernels.attention import attention, packed_attention
    from fastunet.kernels.linear_attention import linear_attention, packed_linear_attention

    generator = torch.Generator(device="cuda").manual_seed(25)
    qkv = torch.randn(2, 3 * 4 * 32, 16, 16, device="cuda", generator=generator).bfloat16()
    mem_kv = torch.randn(2, 4, 4, 32, device="cuda", generator=generator)
    q, k, v = qkv.flatten(2).unflatten(1, (3, 4, 32)).transpose(-1, -2).unbind(1)
    unpacked = attention(q, k, v, mem_kv[0], mem_kv[1]).transpose(-1, -2).reshape(2, 128, 16, 16)
    assert torch.equal(packed_attention(qkv, mem_kv, 4), unpacked)
    mem_kv = mem_kv.transpose(-1, -2).contiguous()
    q, k, v = qkv.flatten(2).unflatten(1, (3, 4, 32)).unbind(1)
    unpacked = linear_attention(q, k, v, mem_kv[0], mem_kv[1]).reshape(2, 128, 16, 16)
    assert torch.equal(packed_linear_attention(qkv, mem_kv, 4), unpacked)
