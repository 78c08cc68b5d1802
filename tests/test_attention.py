"""Tests of the Triton flash attention with memory key/values (fastunet.kernels.attention).

Reference: fastunet.reference.attention on fp32-upcast inputs; gradients from autograd through it.
Tolerances (the FlashAttention rule): for fp16/bf16 the kernel's error against the fp32 reference must stay within
twice the error of PyTorch's own attention computed in that dtype (matmuls in it, softmax in fp32), plus one unit
in the last place of the dtype at the tensor's scale. fp32 inputs run TF32 dots on the GPU (see the kernel module),
so their yardstick is the same math with every dot operand truncated to TF32 (10-bit mantissa), as Ampere and
Hopper tensor cores do; under the interpreter fp32 dots are exact and the kernel passes far inside that bound.
"""


import itertools

import pytest
import torch

from gpu_compile import ARCHS, SHARED_MEMORY_LIMIT, compile_for_archs, configurations
from tolerances import assert_close

import fastunet.kernels.attention as kernel_module
from fastunet.kernels import tuning
from fastunet.kernels.attention import attention
from fastunet.reference import attention as reference_attention

# Relative size of one unit in the last place, by the precision the kernel's dots round to.
ULP = {torch.float32: 2.0**-10, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
GRAD_NAMES = ("dq", "dk", "dv", "dmem_k", "dmem_v")


def _inputs(batch, heads, n, mem, head_dim, dtype, device, mem_dtype=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=generator) for _ in range(3))
    mem_k, mem_v = (torch.randn(heads, mem, head_dim, generator=generator) for _ in range(2))
    grad = torch.randn(batch, heads, n, head_dim, generator=generator)
    mem_dtype = mem_dtype or dtype
    return ([t.to(device, dtype) for t in (q, k, v)] + [t.to(device, mem_dtype) for t in (mem_k, mem_v)],
            grad.to(device, dtype))


def _run(fn, inputs, grad):
    """fn(*inputs) and the gradients of <fn(*inputs), grad> with respect to every input."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), grads


def _attention_in_dtype(q, k, v, mem_k, mem_v):
    """PyTorch's attention in q's dtype: matmuls in it, softmax in fp32 (as autocast does), memory slots cast."""
    batch = q.shape[0]
    keys = torch.cat((mem_k.to(q.dtype).expand(batch, -1, -1, -1), k), dim=2)
    values = torch.cat((mem_v.to(q.dtype).expand(batch, -1, -1, -1), v), dim=2)
    scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.float().softmax(dim=-1).to(q.dtype) @ values


def _tf32(t):
    """t with its fp32 mantissa truncated to TF32's 10 bits, as tensor cores read fp32 dot operands."""
    return (t.float().view(torch.int32) & ~0x1FFF).view(torch.float32)


def _attention_tf32(inputs, grad):
    """The attention and its gradients with every matmul operand truncated to TF32, everything else fp32."""
    q, k, v, mem_k, mem_v = (t.float() for t in inputs)
    batch, _, _, head_dim = q.shape
    scale = head_dim**-0.5
    keys = torch.cat((mem_k.expand(batch, -1, -1, -1), k), dim=2)
    values = torch.cat((mem_v.expand(batch, -1, -1, -1), v), dim=2)
    p = ((_tf32(q) @ _tf32(keys).transpose(-1, -2)) * scale).softmax(dim=-1)
    out = _tf32(p) @ _tf32(values)
    g = grad.float()
    d_values = _tf32(p).transpose(-1, -2) @ _tf32(g)
    dp = _tf32(g) @ _tf32(values).transpose(-1, -2)
    ds = p * (dp - (g * out).sum(-1, keepdim=True))
    dq = _tf32(ds) @ _tf32(keys) * scale
    d_keys = _tf32(ds).transpose(-1, -2) @ _tf32(q) * scale
    m = mem_k.shape[1]
    return out, (dq, d_keys[:, :, m:], d_values[:, :, m:], d_keys[:, :, :m].sum(0), d_values[:, :, :m].sum(0))


def _check_against_reference(inputs, grad, what):
    """Kernel output and gradients against the fp32 reference, within the dtype's budget (module docstring)."""
    dtype = inputs[0].dtype
    out, grads = _run(attention, inputs, grad)
    assert out.dtype == dtype and out.shape == inputs[0].shape, f"{what}: output {out.dtype} {tuple(out.shape)}"
    for name, g, t in zip(GRAD_NAMES, grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, f"{what}: {name} is {g.dtype} {tuple(g.shape)}"
    expected_out, expected_grads = _run(reference_attention, [t.float() for t in inputs], grad.float())
    if dtype == torch.float32:
        low_out, low_grads = _attention_tf32(inputs, grad)
    else:
        low_out, low_grads = _run(_attention_in_dtype, inputs, grad)
    for name, actual, expected, low in zip(("out",) + GRAD_NAMES, (out,) + grads, (expected_out,) + expected_grads,
                                           (low_out,) + low_grads):
        if expected.numel() == 0:
            continue
        scale = expected.abs().max().item()
        budget = 2 * (low.float() - expected).abs().max().item() + ULP[dtype] * scale
        assert_close(actual.float(), expected, what=f"{what}: {name}", atol=budget, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "batch, heads, n, mem, head_dim",
    [
        (2, 2, 35, 4, 32),  # the Unet's head dim and 4 memory slots; N + M = 39
        (1, 3, 100, 1, 16),  # one slot; several query blocks and a masked last key block
        (2, 1, 64, 0, 64),  # no memory slots; N a multiple of the blocks
        (1, 2, 20, 4, 128),  # largest head dim
    ],
)
def test_matches_reference(batch, heads, n, mem, head_dim, dtype, device):
    inputs, grad = _inputs(batch, heads, n, mem, head_dim, dtype, device)
    _check_against_reference(inputs, grad, f"B{batch} heads{heads} N{n} M{mem} d{head_dim} {dtype}")


def _layout(name, tensors, heads, height, width):
    """q, k, v (B, heads, N, d) laid out as named, holding the values of `tensors`."""
    batch, _, n, head_dim = tensors[0].shape
    if name in ("qkv_nchw", "qkv_channels_last"):
        # The Unet's to_qkv output (B, 3*heads*d, H, W), chunked and viewed as upstream's rearrange does.
        qkv = torch.cat([t.transpose(-1, -2).reshape(batch, heads * head_dim, height, width) for t in tensors], 1)
        if name == "qkv_channels_last":
            qkv = qkv.contiguous(memory_format=torch.channels_last)
        views = [c.flatten(2).unflatten(1, (heads, head_dim)).transpose(-1, -2) for c in qkv.chunk(3, dim=1)]
        assert views[0].stride()[2] == (1 if name == "qkv_nchw" else 3 * heads * head_dim)
        return views
    if name == "contiguous":
        return [t.contiguous() for t in tensors]
    # Non-contiguous in every dimension: positions and heads permuted, head dim with stride 2.
    views = []
    for t in tensors:
        wide = torch.zeros(batch, n, heads, 2 * head_dim, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t.transpose(1, 2)
        views.append(wide[..., ::2].transpose(1, 2))
    assert views[0].stride()[3] == 2
    return views


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["qkv_nchw", "qkv_channels_last", "contiguous", "strided"])
def test_layouts(layout, dtype, device):
    heads, height, width = 2, 5, 7
    inputs, grad = _inputs(2, heads, height * width, 4, 32, dtype, device, seed=1)
    q, k, v = _layout(layout, inputs[:3], heads, height, width)
    mem_k, mem_v = inputs[3:]
    if layout == "strided":  # memory slots as views too, head dim contiguous across slots
        mem_k, mem_v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (mem_k, mem_v))
    for a, b in zip((q, k, v), inputs[:3]):
        assert torch.equal(a, b)
    _check_against_reference([q, k, v, mem_k, mem_v], grad, f"{layout} {dtype}")


def test_output_layout(device):
    """Output and q/k/v gradients have the memory of a contiguous (B, heads*d, H, W) tensor (what to_out reads)."""
    batch, heads, height, width, head_dim = 2, 3, 4, 5, 16
    n = height * width
    inputs, grad = _inputs(batch, heads, n, 4, head_dim, torch.float16, device)
    out, grads = _run(attention, inputs, grad)
    expected = (heads * head_dim * n, head_dim * n, 1, n)
    for name, t in (("out", out),) + tuple(zip(GRAD_NAMES[:3], grads[:3])):
        assert t.stride() == expected, f"{name} strides {t.stride()}, expected {expected}"
    image = out.transpose(-1, -2).reshape(batch, heads * head_dim, height, width)
    assert image.data_ptr() == out.data_ptr() and image.is_contiguous(), "to_out's input would need a copy"
    assert grads[3].is_contiguous() and grads[4].is_contiguous()


def test_mixed_dtype_memory(device):
    """Under autocast q, k, v are bf16 while the mem_kv parameter stays fp32: its gradient comes back in fp32."""
    inputs, grad = _inputs(2, 2, 35, 4, 32, torch.bfloat16, device, mem_dtype=torch.float32, seed=2)
    _check_against_reference(inputs, grad, "q bf16, memory fp32")


@pytest.mark.parametrize("head_dim", [8, 24])
def test_padded_head_dim(head_dim, device):
    """Head dims outside (16, 32, 64, 128) are zero-padded; the scale stays head_dim**-0.5."""
    inputs, grad = _inputs(1, 2, 20, 4, head_dim, torch.float32, device, seed=3)
    _check_against_reference(inputs, grad, f"head dim {head_dim}")


def test_single_position(device):
    inputs, grad = _inputs(2, 1, 1, 4, 32, torch.float32, device, seed=4)
    _check_against_reference(inputs, grad, "N=1")


def test_empty_batch(device):
    inputs, grad = _inputs(0, 2, 16, 4, 32, torch.float32, device)
    out, grads = _run(attention, inputs, grad)
    assert out.shape == (0, 2, 16, 32)
    assert torch.equal(grads[3], torch.zeros_like(inputs[3])) and torch.equal(grads[4], torch.zeros_like(inputs[4]))


def test_rejected_shapes(device):
    inputs, _ = _inputs(1, 1, 8, 4, 256, torch.float32, device)
    with pytest.raises(ValueError, match="head dims up to 128"):
        attention(*inputs)


def test_program_limit():
    """The grids have one axis of up to 2**31 - 1 programs: only shapes with B * heads * cdiv(N, 16) past that are
    refused (checked on meta tensors, which allocate nothing)."""
    def reason(batch, heads, n):
        q = torch.empty(batch, heads, n, 32, device="meta")
        mem = torch.empty(heads, 4, 32, device="meta")
        return kernel_module.unsupported_reason(q, q, q, mem, mem)

    assert reason(2**16, 2, 4096) is None  # batch * heads past the 65535 of a second grid axis
    assert reason(2**20, 16, 2**16) is not None
    assert "programs" in reason(2**20, 16, 2**16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="65540 (batch, head) pairs take minutes in the interpreter")
def test_many_batch_heads(device):
    """More than 65535 (batch, head) pairs, the limit of a second grid axis, against the reference."""
    inputs, grad = _inputs(2**14 + 1, 4, 16, 4, 16, torch.bfloat16, device, seed=8)
    _check_against_reference(inputs, grad, "B*heads = 65540")


def test_deterministic(device):
    """Two runs give bitwise equal outputs and gradients (no atomics; memory-slot partials summed in order)."""
    inputs, grad = _inputs(2, 2, 70, 4, 32, torch.bfloat16, device, seed=5)
    first_out, first_grads = _run(attention, inputs, grad)
    second_out, second_grads = _run(attention, inputs, grad)
    for name, a, b in zip(("out",) + GRAD_NAMES, (first_out,) + first_grads, (second_out,) + second_grads):
        assert torch.equal(a, b), f"{name} differs between two runs: max difference {(a - b).abs().max().item()}"


def test_opcheck(device):
    """Schema, fake (meta) implementation with the same strides, autograd registration, and AOT dispatch."""
    inputs, grad = _inputs(1, 2, 20, 4, 16, torch.float32, device, seed=6)
    forward_args = [t.requires_grad_() for t in inputs] + [16**-0.5]
    torch.library.opcheck(torch.ops.fastunet.attention_forward.default, forward_args)
    with torch.no_grad():
        _, lse = torch.ops.fastunet.attention_forward(*forward_args)
    backward_args = [grad] + [t.detach() for t in inputs] + [lse, 16**-0.5]
    torch.library.opcheck(torch.ops.fastunet.attention_backward.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile(device):
    """The custom ops under torch.compile(fullgraph=True): same forward and gradients as eager."""

    def block(q, k, v, mem_k, mem_v):
        return attention(q * 2, k, v, mem_k, mem_v).sigmoid()

    inputs, grad = _inputs(1, 2, 20, 4, 16, torch.float32, device, seed=7)
    eager_out, eager_grads = _run(block, inputs, grad)
    compiled_out, compiled_grads = _run(torch.compile(block, fullgraph=True), inputs, grad)
    for name, a, b in zip(("out",) + GRAD_NAMES, (compiled_out,) + compiled_grads, (eager_out,) + eager_grads):
        assert_close(a, b, what=f"compiled {name}")


def _packed_inputs(batch, heads, height, width, mem, head_dim, dtype, device, mem_dtype, channels_last, seed):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 3 * heads * head_dim, height, width, generator=generator).to(device, dtype)
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    mem_kv = torch.randn(2, heads, mem, head_dim, generator=generator).to(device, mem_dtype)
    grad = torch.randn(batch, heads * head_dim, height, width, generator=generator).to(device, dtype)
    return qkv, mem_kv, grad


def _unpack(qkv, mem_kv, heads):
    """q, k, v (B, heads, N, d) and mem_k, mem_v of the packed inputs, as upstream's rearrange makes them."""
    q, k, v = qkv.flatten(2).unflatten(1, (3, heads, -1)).transpose(-1, -2).unbind(1)
    return [q, k, v, mem_kv[0], mem_kv[1]]


@pytest.mark.parametrize("channels_last, dtype, mem_dtype, mem, head_dim", [
    (False, torch.float32, torch.float32, 4, 32),
    (True, torch.bfloat16, torch.float32, 4, 32),  # autocast: bf16 activations, fp32 memory slots
    (False, torch.float16, torch.float16, 0, 16),
    (True, torch.float32, torch.float32, 0, 16),
    (False, torch.bfloat16, torch.float32, 3, 24),  # padded head dim
], ids=str)
def test_packed(channels_last, dtype, mem_dtype, mem, head_dim, device):
    """packed_attention on the to_qkv output: output (B, heads*d, H, W) and gradients, one tensor of qkv's shape
    and one of mem_kv's in its dtype, within the same budget as the unpacked op (module docstring) of the fp32
    reference. Head dim 24 goes through the padded path."""
    from fastunet.kernels.attention import packed_attention

    heads, height, width = 2, 5, 7
    qkv, mem_kv, grad = _packed_inputs(2, heads, height, width, mem, head_dim, dtype, device, mem_dtype,
                                       channels_last, seed=9)
    out, (dqkv, dmem_kv) = _run(lambda *t: packed_attention(*t, heads), [qkv, mem_kv], grad)
    assert out.shape == grad.shape and out.dtype == dtype and dqkv.shape == qkv.shape and dqkv.dtype == dtype
    # In qkv's layout (a channels_last model's convolutions then take them without a copy), except through the
    # padded path, which returns NCHW.
    layout = torch.channels_last if channels_last and head_dim in (16, 32, 64, 128) else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout) and dqkv.is_contiguous(memory_format=layout)
    assert dmem_kv.shape == mem_kv.shape and dmem_kv.dtype == mem_dtype
    # The unpacked op's gradients on the same values, as views of one packed tensor, within its budget.
    grad_views = grad.flatten(2).unflatten(1, (heads, -1)).transpose(-1, -2)
    inputs = _unpack(qkv, mem_kv, heads)
    expected_out, expected_grads = _run(reference_attention, [t.float() for t in inputs], grad_views.float())
    if dtype == torch.float32:
        low_out, low_grads = _attention_tf32(inputs, grad_views)
    else:
        low_out, low_grads = _run(_attention_in_dtype, inputs, grad_views)
    dq, dk, dv = _unpack(dqkv, dmem_kv, heads)[:3]
    actual = (out.flatten(2).unflatten(1, (heads, -1)).transpose(-1, -2), dq, dk, dv, dmem_kv[0], dmem_kv[1])
    for name, a, e, low in zip(("out",) + GRAD_NAMES, actual, (expected_out,) + expected_grads,
                               (low_out,) + low_grads):
        if e.numel() == 0:
            continue
        budget = 2 * (low.float() - e).abs().max().item() + ULP[dtype] * e.abs().max().item()
        assert_close(a.float(), e, what=f"packed {dtype} M{mem} d{head_dim}: {name}", atol=budget, rtol=0)


def test_packed_deterministic(device):
    """The memory-slot partials of every query block are summed in a fixed order in the dk/dv launch: two runs
    agree bit for bit (several query blocks and batch elements)."""
    from fastunet.kernels.attention import packed_attention

    qkv, mem_kv, grad = _packed_inputs(3, 2, 9, 8, 4, 32, torch.bfloat16, device, torch.float32, False, seed=10)
    first = _run(lambda *t: packed_attention(*t, 2), [qkv, mem_kv], grad)
    second = _run(lambda *t: packed_attention(*t, 2), [qkv, mem_kv], grad)
    for name, a, b in zip(("out", "dqkv", "dmem_kv"), (first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_packed_opcheck(device):
    qkv, mem_kv, grad = _packed_inputs(1, 2, 4, 5, 4, 16, torch.float32, device, torch.float32, False, seed=11)
    forward_args = [qkv.requires_grad_(), mem_kv.requires_grad_(), 2, 16**-0.5]
    torch.library.opcheck(torch.ops.fastunet.packed_attention_forward.default, forward_args)
    with torch.no_grad():
        _, lse = torch.ops.fastunet.packed_attention_forward(*forward_args)
    backward_args = [grad, qkv.detach(), mem_kv.detach(), lse, 2, 16**-0.5]
    torch.library.opcheck(torch.ops.fastunet.packed_attention_backward.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_packed_dropout_not_ignored(device):
    """A nonzero dropout never runs silently without it: the kernel raises, the dispatcher under "triton" raises
    naming it, and "auto" runs the reference, which applies it (outputs differ from the dropout-free ones)."""
    import fastunet
    from fastunet import functional
    from fastunet.kernels.attention import packed_attention

    qkv, mem_kv, _ = _packed_inputs(1, 2, 4, 4, 4, 16, torch.float32, device, torch.float32, False, seed=12)
    with pytest.raises(ValueError, match="dropout"):
        packed_attention(qkv, mem_kv, 2, dropout=0.5)
    with fastunet.use_backend("triton"), pytest.raises(RuntimeError, match="dropout"):
        functional.packed_attention(qkv, mem_kv, 2, dropout=0.5)
    torch.manual_seed(0)
    dropped = functional.packed_attention(qkv, mem_kv, 2, dropout=0.5)
    assert not torch.allclose(dropped, functional.packed_attention(qkv, mem_kv, 2))


# Upstream 2.3.4's Attention: every submodule name, as named_modules() lists them.
UPSTREAM_ATTENTION_MODULES = {"", "norm", "attend", "attend.attn_dropout", "to_qkv", "to_out"}


def test_upstream_module_names():
    """Every module name of upstream's Attention exists in fastunet's, the same state_dict keys (Attend has no
    parameters), checked against the installed upstream when it imports."""
    from fastunet.attention import Attention

    ours = Attention(32, heads=2, dim_head=16)
    names = {name for name, _ in ours.named_modules()}
    assert UPSTREAM_ATTENTION_MODULES <= names, UPSTREAM_ATTENTION_MODULES - names
    upstream = pytest.importorskip("denoising_diffusion_pytorch.denoising_diffusion_pytorch")
    theirs = upstream.Attention(32, heads=2, dim_head=16)
    assert {name for name, _ in theirs.named_modules()} == UPSTREAM_ATTENTION_MODULES
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())


def test_attend_attributes(device):
    """Upstream's Attend attributes have upstream's effect: `flash` selects SDPA on the reference path (same values
    as the einsum path), and a nonzero dropout in training applies dropout (the auto backend runs the reference)
    or, with backend "triton", raises; in eval it is off."""
    import fastunet
    from fastunet.attention import Attention

    torch.manual_seed(0)
    layer = Attention(32, heads=2, dim_head=16).to(device)
    x = torch.randn(2, 32, 4, 4, device=device)
    with fastunet.use_backend("reference"):
        plain = layer(x)
        layer.attend.flash = True
        assert layer.flash
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            flash = layer(x)
    assert_close(flash, plain, what="flash vs einsum")
    for attribute in ("flash", "dropout"):
        layer.attend.flash = attribute == "flash"
        if attribute == "flash":
            layer.attend.dropout = 0.5
        else:
            layer.attend.attn_dropout.p = 0.5
        layer.train()
        with fastunet.use_backend("triton"), pytest.raises(RuntimeError, match="dropout"):
            layer(x)
        torch.manual_seed(1)
        assert not torch.allclose(layer(x), plain), f"{attribute}: dropout had no effect"
        layer.eval()
        assert_close(layer(x), plain, what=f"{attribute}: eval has no dropout")
        layer.attend.dropout, layer.attend.attn_dropout.p = 0.0, 0.0


def test_layer_kernel_count():
    """One Attention layer forward+backward as the Unet calls it (bf16 autocast, bf16 activations, the residual
    added), convolutions included: at most 22 GPU kernels (33 counted by the issue before the packed ops; 26 by
    bench/kernel_count.py before, 15 after), and no join, zero-fill or sum of the attention's gradients."""
    from kernel_count import count_layer_step

    from fastunet.attention import Attention

    x = torch.randn(2, 32, 4, 4).bfloat16().requires_grad_()
    counted = count_layer_step(Attention(32, heads=2, dim_head=16).to(x.device), x, torch.randn_like(x))
    assert counted.total <= 22, counted.summary(top=30)
    assert not {"aten::stack", "aten::cat", "aten::zeros", "aten::zeros_like"} & set(counted.by_name), \
        counted.summary(top=30)
    triton_launches = sum(n for name, n in counted.by_name.items() if "attention" in name)
    assert triton_launches == 3, counted.summary(top=30)  # forward, dq (with delta), dk/dv (with the slots)


KERNEL_NAMES = {kernel: name for name, kernel in kernel_module._KERNELS.items()}
# sm_86, sm_89 and sm_120 run the sm_80 table (see _table_arch) with 99 KiB of shared memory per block.
SM80_TABLE_SHARED_LIMIT = 101376


def test_gpu_compile():
    """Every configuration a GPU launch can select compiles for its architecture's table, for sm_80, sm_86, sm_89,
    sm_90 and sm_120 (Triton's bundled ptxas), fits in that architecture's shared memory (sm_80's builds also in
    the 99 KB of sm_86/89/120, which run its table), spills no registers, and runs its dots on tensor cores
    (mma/wgmma; fp32 runs TF32 dots). Each compiles without alignment hints (N not a multiple of 16, the worse
    case for registers) and, for fp16/bf16, also with the divisibility the Unet's shapes get (and with fp32 memory
    slots, autocast); sm_86/89/120 compile the Unet's training builds (see _consumer_compile_configs).
    Exempt from the spill check: the builds the kernel module lists in SPILLS_ALLOWED per table (with its reason);
    the check fails if one of them stops spilling, so the list stays exact."""
    records = compile_for_archs("fastunet.kernels.attention", ARCHS)
    problems = []
    for arch, arch_records in records.items():
        configs = configurations(kernel_module, arch)
        if len(arch_records) != len(configs):
            problems.append(f"sm_{arch}: {len(arch_records)} records for {len(configs)} configurations")
        table = kernel_module._table_arch(arch)
        for (kernel, signature, constexprs, _, attrs), record in zip(configs, arch_records):
            name = KERNEL_NAMES[kernel]
            pointer = signature.get("Q", signature.get("OUT"))
            precision = "tf32" if pointer == "*fp32" else "16"
            memory = signature.get("MEM_K", pointer)
            where = (f"sm_{arch} {pointer[1:]}" + (f" (memory slots {memory[1:]})" if memory != pointer else "")
                     + f" {record['name']}")
            if "error" in record:
                problems.append(f"{where}: {record['error']}")
                continue
            limit = SM80_TABLE_SHARED_LIMIT if arch == 80 else SHARED_MEMORY_LIMIT[arch]
            if record["shared"] > limit:
                problems.append(f"{where}: {record['shared']} bytes of shared memory > {limit}")
            key = (name, precision, constexprs["HEAD_DIM"], bool(attrs))
            exempt = key in kernel_module.SPILLS_ALLOWED[table]
            if record["spills"] and not exempt:
                problems.append(f"{where}: {record['spills']} bytes of spills ({record['registers']} registers)")
            if exempt and not record["spills"] and arch == table:
                problems.append(f"{where}: no longer spills; remove it from SPILLS_ALLOWED[{table}]")
            if not record["tensor_cores"]:
                problems.append(f"{where}: no tensor-core instruction (mma/wgmma)")
    assert not problems, "\n".join(problems)


def test_gpu_compile_coverage():
    """The compile test covers, for each architecture's table, every configuration a launch selects, unaligned and
    (16-bit) aligned, and the autocast specialization (fp32 memory slots, read or written by every kernel)."""
    for arch in (80, 90):
        listed = set()
        for kernel, signature, constexprs, options, attrs in configurations(kernel_module, arch):
            name = KERNEL_NAMES[kernel]
            tiles = (constexprs["BLOCK_M"], constexprs["BLOCK_N"], options["num_warps"], options.get("num_stages"))
            listed.add((name, signature.get("Q", signature.get("OUT")), signature.get("MEM_K", signature.get("DMEM_K")),
                        constexprs["HEAD_DIM"], tiles, bool(attrs)))
            if attrs:
                assert all(signature[kernel.arg_names[i]] != "constexpr" for (i,) in attrs), "hint on a constant"
        table = kernel_module._GPU_CONFIGS[kernel_module._table_arch(arch)]
        for dtype, pointer in ((torch.float16, "*fp16"), (torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
            for head_dim in kernel_module.HEAD_DIMS:
                for name in ("forward", "dkdv", "dq"):
                    candidates = kernel_module._candidates(kernel_module._table_arch(arch), name, dtype, head_dim)
                    assert candidates[0] == table[name][kernel_module._dot_precision(dtype)][head_dim]
                    for tiles, aligned in itertools.product(candidates, (False, True)):
                        if aligned and dtype == torch.float32:
                            continue
                        memories = ("*fp32",) if dtype == torch.float32 else (pointer, "*fp32")
                        for memory in memories:
                            assert (name, pointer, memory, head_dim, tiles, aligned) in listed, \
                                (arch, name, pointer, memory, head_dim, tiles, aligned)
    assert kernel_module._table_arch(86) == kernel_module._table_arch(120) == 80
    assert kernel_module._table_arch(90) == kernel_module._table_arch(100) == 90
    # From the device's limits: a Hopper-class part with less shared memory takes the sm_80 table.
    assert kernel_module._table_arch(90, shared_memory=101376) == 80
    for arch in ARCHS:
        assert kernel_module.SHARED_MEMORY_OPTIN[arch] == SHARED_MEMORY_LIMIT[arch]


def test_autotune_picks_fastest(monkeypatch):
    """On a Hopper-class device (pretended), the forward and dk/dv configurations are timed once per (device,
    dtype, head dim, N rounded to a power of two) among _candidates and the fastest kept; the interpreter, a
    single-candidate key and deterministic algorithms never time anything."""
    import triton.testing

    assert kernel_module._tuned_config("forward", torch.bfloat16, 32, 256, torch.device("cpu"), None) == \
        kernel_module._INTERPRETER_CONFIG
    monkeypatch.setattr(kernel_module, "INTERPRETING", False)
    monkeypatch.setattr(tuning, "INTERPRETING", False)
    monkeypatch.setattr(kernel_module, "_device_table", lambda index: kernel_module._SM90_CONFIGS)
    monkeypatch.setattr(tuning, "_FASTEST", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    timed = []
    fake_times = {}  # the last candidate is the fastest

    def fake_do_bench(fn, warmup, rep):
        tiles = fn()
        timed.append(tiles)
        return fake_times[tiles]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    device = torch.device("cuda", 0)
    for kernel in ("forward", "dkdv"):
        candidates = kernel_module._candidates(90, kernel, torch.bfloat16, 32)
        assert len(candidates) > 1 and len(set(candidates)) == len(candidates)
        fake_times.clear()
        fake_times.update({tiles: 1.0 / (i + 1) for i, tiles in enumerate(candidates)})
        timed.clear()
        launch = lambda tiles: tiles  # noqa: E731
        assert kernel_module._tuned_config(kernel, torch.bfloat16, 32, 250, device, launch) == candidates[-1]
        assert sorted(timed) == sorted(candidates)
        timed.clear()  # cached for N = 250 .. 256, timed again for another power of two
        assert kernel_module._tuned_config(kernel, torch.bfloat16, 32, 256, device, launch) == candidates[-1]
        assert not timed
        kernel_module._tuned_config(kernel, torch.bfloat16, 32, 4096, device, launch)
        assert sorted(timed) == sorted(candidates)
    # Under deterministic algorithms the table's entry, timed before or not: the candidates differ in their last
    # bits, so the results must not depend on which won.
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    timed.clear()
    for kernel in ("forward", "dkdv"):
        for n in (256, 16384):
            assert kernel_module._tuned_config(kernel, torch.bfloat16, 32, n, device, launch) == \
                kernel_module._candidates(90, kernel, torch.bfloat16, 32)[0]
    assert not timed
    # fp32 and d = 128 have one configuration: nothing is timed.
    timed.clear()
    assert kernel_module._tuned_config("forward", torch.float32, 32, 256, device, None) == \
        kernel_module._SM90_CONFIGS["forward"]["tf32"][32]
    assert not timed


def test_packed_torch_compile(device):
    """The packed custom ops under torch.compile(fullgraph=True): the same forward and gradients as eager."""
    from fastunet.kernels.attention import packed_attention

    qkv, mem_kv, grad = _packed_inputs(1, 2, 4, 4, 4, 16, torch.float32, device, torch.float32, False, seed=13)

    def block(qkv, mem_kv):
        return packed_attention(qkv * 2, mem_kv, 2).sigmoid()

    eager_out, eager_grads = _run(block, [qkv, mem_kv], grad)
    compiled_out, compiled_grads = _run(torch.compile(block, fullgraph=True), [qkv, mem_kv], grad)
    for name, a, b in zip(("out", "dqkv", "dmem_kv"), (compiled_out,) + compiled_grads, (eager_out,) + eager_grads):
        assert_close(a, b, what=f"compiled {name}")
