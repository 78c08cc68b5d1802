"""Tests of the Triton linear attention with memory key/values (fastunet.kernels.linear_attention).

Reference: fastunet.reference.linear_attention on the same values upcast to fp32, gradients by autograd through it.

Tolerances: the worst element must satisfy |kernel - reference| <= TOL * (max |reference| + |reference|), i.e.
assert_close with rtol = TOL and atol = TOL * max |reference|. The absolute part scales with the tensor because
every element is a sum of products whose 16-bit operands carry relative rounding errors, and a sum of mixed signs
can cancel far below its terms (an element's error follows its terms, not its value).
- Forward: tests/tolerances.py's value for the dtype (2 ulps; fp32: sums in another order). Measured worst under
  the interpreter: bf16 6.9e-3, fp16 3.3e-4, fp32 8e-7.
- Backward: twice that for fp16/bf16. The gradients reduce over all positions with 16-bit operands (dcontext,
  the memory-slot gradients) and then cancel once more in a softmax backward (dk = ks (dks - rowsum), dq alike).
  Measured worst: bf16 1.1e-2 (dmem_k), fp16 1.3e-3, over random and large-logit inputs.
The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest, so the GPU's errors are smaller.
"""


import pytest
import torch

from gpu_compile import ARCHS, SHARED_MEMORY_LIMIT, compile_for_archs, configurations
from tolerances import TOLERANCES, assert_close

import fastunet.kernels.linear_attention as kernel_module
from fastunet.kernels.linear_attention import linear_attention
from fastunet.reference import linear_attention as reference_linear_attention

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORWARD_TOL = {dtype: TOLERANCES[dtype]["rtol"] for dtype in DTYPES}
BACKWARD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}
GRAD_NAMES = ("dq", "dk", "dv", "dmem_k", "dmem_v")


def _inputs(batch, heads, head_dim, n, mem, dtype, device, mem_dtype=torch.float32, scale=1.0, seed=0):
    """q, k, v (B, heads, d, N) in dtype, mem_k, mem_v (heads, d, M) in mem_dtype, and a gradient for out."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, head_dim, n, generator=generator) * scale for _ in range(3))
    mem_k, mem_v = (torch.randn(heads, head_dim, mem, generator=generator) * scale for _ in range(2))
    grad = torch.randn(batch, heads, head_dim, n, generator=generator)
    return [t.to(device, dtype) for t in (q, k, v)] + [t.to(device, mem_dtype) for t in (mem_k, mem_v)], grad.to(
        device, dtype
    )


def _run(fn, inputs, grad):
    """fn(*inputs) and the gradients of <fn(*inputs), grad> with respect to every input."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, grad)


def _reference(inputs, grad):
    """The reference on fp32-upcast inputs, with its gradients."""
    return _run(reference_linear_attention, [t.float() for t in inputs], grad.float())


def _check(out, grads, expected_out, expected_grads, dtype, what):
    def close(actual, expected, tol, name):
        scale = expected.abs().max().item() if expected.numel() else 0.0
        assert_close(actual.float(), expected, atol=tol * scale, rtol=tol, what=f"{what}: {name}")

    close(out, expected_out, FORWARD_TOL[dtype], "out")
    for name, actual, expected in zip(GRAD_NAMES, grads, expected_grads):
        # Memory-slot gradients come back in the memory's dtype, which may be the coarser one.
        close(actual, expected, max(BACKWARD_TOL[dtype], BACKWARD_TOL[actual.dtype]), name)


def _check_against_reference(inputs, grad, what, **kwargs):
    out, grads = _run(lambda *t: linear_attention(*t, **kwargs), inputs, grad)
    expected_out, expected_grads = _reference(inputs, grad)
    _check(out, grads, expected_out, expected_grads, inputs[0].dtype, what)
    return out, grads


# (batch, heads, head dim, N, M): every head dim; N + M never a multiple of 16; N = 35 and 100 end in a partial
# tile of the interpreter's 32 positions, all take 2 to 4 tiles through the online softmax; M = 0, 1, 4; one to
# three heads; batch 1 and 2.
SHAPES = [
    (1, 1, 16, 35, 1),
    (2, 2, 16, 100, 4),
    (2, 2, 32, 64, 4),
    (1, 3, 32, 100, 0),
    (2, 1, 64, 35, 4),
    (1, 2, 128, 64, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}h{}d{}N{}M{}".format(*s))
def test_matches_reference(shape, dtype, device):
    batch, heads, head_dim, n, mem = shape
    inputs, grad = _inputs(batch, heads, head_dim, n, mem, dtype, device)
    out, grads = _check_against_reference(inputs, grad, f"{shape} {dtype}")
    # Output layout: the contiguous (B, heads, d, N) tensor the next 1x1 conv reads as NCHW without a copy.
    assert out.shape == (batch, heads, head_dim, n) and out.dtype == dtype and out.is_contiguous()
    for name, g, t in zip(GRAD_NAMES, grads, inputs):
        assert g.shape == t.shape and g.dtype == t.dtype, f"{name}: {tuple(g.shape)} {g.dtype}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_to_qkv_views(channels_last, dtype, device):
    """q, k, v as upstream makes them: chunks of the to_qkv conv output (B, 3 h d, H, W), viewed as (B, h, d, HW)."""
    batch, heads, head_dim, height, width, mem = 2, 2, 16, 5, 7, 4
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(batch, 3 * heads * head_dim, height, width, generator=generator).to(device, dtype)
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    mem_k, mem_v = (torch.randn(heads, head_dim, mem, generator=generator).to(device) for _ in range(2))
    grad = torch.randn(batch, heads, head_dim, height * width, generator=generator).to(device, dtype)

    def attend(fn, qkv, mem_k, mem_v):
        q, k, v = (t.view(batch, heads, head_dim, height * width) for t in qkv.chunk(3, dim=1))
        assert q.data_ptr() == qkv.data_ptr() and not q.is_contiguous()  # strided views, no copies
        return fn(q, k, v, mem_k, mem_v)

    out, grads = _run(lambda *t: attend(linear_attention, *t), [qkv, mem_k, mem_v], grad)
    expected_out, expected_grads = _run(
        lambda *t: attend(reference_linear_attention, *t), [qkv.float(), mem_k, mem_v], grad.float()
    )
    tol = FORWARD_TOL[dtype]
    assert_close(out.float(), expected_out, atol=tol * expected_out.abs().max().item(), rtol=tol, what="out")
    for name, actual, expected in zip(("dqkv", "dmem_k", "dmem_v"), grads, expected_grads):
        tol = BACKWARD_TOL[dtype]
        assert_close(actual.float(), expected, atol=tol * expected.abs().max().item(), rtol=tol, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_inputs(dtype, device):
    """Positions not innermost (q), every other position (k), batch and head axes swapped (v), and a stride-0 dout."""
    batch, heads, head_dim, n, mem = 2, 2, 32, 40, 4
    inputs, grad = _inputs(batch, heads, head_dim, n, mem, dtype, device)
    q, k, v, mem_k, mem_v = inputs
    q = q.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    k = torch.stack((k, torch.randn_like(k)), dim=-1).flatten(-2)[..., ::2]
    v = v.transpose(0, 1).contiguous().transpose(0, 1)
    mem_k = mem_k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, mem_k))
    _check_against_reference([q, k, v, mem_k, mem_v], grad, "strided")
    # out.sum() backpropagates an expanded (stride 0) gradient, which the kernel reads in place.
    _check_against_reference([q, k, v, mem_k, mem_v], torch.ones(1, device=device, dtype=dtype).expand_as(grad),
                             "stride-0 dout")  # fmt: skip


@pytest.mark.parametrize("num_splits", [3, 100], ids=["3_splits", "one_tile_a_split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_reduction(num_splits, dtype, device):
    """The position reduction split across programs and combined: keys rise along the positions, so every split
    has its own row max, far from the global one, and the combination must rescale. 20 memory slots take the
    combine kernels through two 16-slot tiles."""
    batch, heads, head_dim, n, mem = 1, 2, 32, 300, 20
    inputs, grad = _inputs(batch, heads, head_dim, n, mem, dtype, device)
    inputs[1] = (inputs[1].float() + torch.linspace(-20, 20, n, device=device)).to(dtype)
    _check_against_reference(inputs, grad, f"{num_splits} splits", num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits(dtype, device):
    """Queries and keys uniform in [-100, 100]: exp without the max subtracted overflows even fp32."""
    batch, heads, head_dim, n, mem = 2, 1, 16, 50, 4
    inputs, grad = _inputs(batch, heads, head_dim, n, mem, dtype, device)
    generator = torch.Generator().manual_seed(2)
    for i in (0, 1, 3):
        inputs[i] = (torch.rand(inputs[i].shape, generator=generator) * 200 - 100).to(device, inputs[i].dtype)
    out, grads = _check_against_reference(inputs, grad, "large logits", num_splits=2)
    assert all(torch.isfinite(t).all() for t in (out, *grads))


def test_mixed_dtypes(device):
    """Autocast: q, k, v bf16 while the memory parameters stay fp32; and memory slots in another 16-bit dtype."""
    inputs, grad = _inputs(2, 2, 32, 35, 4, torch.bfloat16, device, mem_dtype=torch.float32)
    _, grads = _check_against_reference(inputs, grad, "bf16 with fp32 memory")
    assert grads[3].dtype == grads[4].dtype == torch.float32
    inputs, grad = _inputs(1, 2, 16, 35, 3, torch.float32, device, mem_dtype=torch.bfloat16)
    _, grads = _check_against_reference(inputs, grad, "fp32 with bf16 memory")
    assert grads[0].dtype == torch.float32 and grads[3].dtype == torch.bfloat16


def test_fp16_large_gradient(device):
    """dcontext sums dout over all positions: under loss scaling it passes fp16's 65504 while dk and dv do not."""
    batch, heads, head_dim, n, mem = 1, 1, 16, 100, 4
    inputs, _ = _inputs(batch, heads, head_dim, n, mem, torch.float16, device)
    q = inputs[0].float()
    q[:, :, 0] += 12  # the feature softmax picks feature 0 everywhere, so dcontext's row 0 sums all of dout
    inputs[0] = q.half()
    inputs[2] = (inputs[2].float() * 0.1).half()
    # dcontext row 0 is ~ d^-0.5 * N * 2e4 = 5e5; dv, dk and dq stay below 3e4.
    grad = torch.full((batch, heads, head_dim, n), 2e4, device=device, dtype=torch.float16)
    _, grads = _check_against_reference(inputs, grad, "fp16 dout 2e4")
    assert all(torch.isfinite(g).all() for g in grads)


def test_deterministic(device):
    """No atomics: two runs agree bit for bit, forward and every gradient, with the reduction split."""
    inputs, grad = _inputs(2, 2, 32, 200, 4, torch.bfloat16, device)
    first = _run(lambda *t: linear_attention(*t, num_splits=3), inputs, grad)
    second = _run(lambda *t: linear_attention(*t, num_splits=3), inputs, grad)
    for name, a, b in zip(("out", *GRAD_NAMES), (first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_unsupported_head_dim(device):
    inputs, _ = _inputs(1, 1, 24, 16, 4, torch.float32, device)
    with pytest.raises(ValueError, match="head dims"):
        linear_attention(*inputs)


def test_opcheck(device):
    inputs, grad = _inputs(1, 2, 16, 20, 3, torch.float32, device)
    inputs = [t.requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.fastunet.linear_attention_forward.default, (*inputs, 2))
    out, context, lse = torch.ops.fastunet.linear_attention_forward(*inputs, 2)
    args = (grad, *(t.detach() for t in inputs), context, lse, 2)
    torch.library.opcheck(torch.ops.fastunet.linear_attention_backward.default, args)


def test_torch_compile(device):
    inputs, grad = _inputs(1, 2, 16, 20, 3, torch.float32, device)
    compiled = torch.compile(linear_attention, fullgraph=True)
    out, grads = _run(compiled, inputs, grad)
    expected_out, expected_grads = _run(linear_attention, inputs, grad)
    assert torch.equal(out, expected_out)
    for name, a, b in zip(GRAD_NAMES, grads, expected_grads):
        assert torch.equal(a, b), name


def _gpu_configs(arch):
    """(dtype pointer, kernel name, D, BLOCK_N, num_warps, num_stages, ROW_SPLIT) of every configuration listed
    for sm_`arch`."""
    listed = set()
    for kernel, signature, constexprs, options, _ in kernel_module.gpu_compile_configs(arch):
        pointer = signature.get("q_ptr", signature.get("k_ptr", "*fp32"))
        listed.add((pointer, kernel.__name__, constexprs["D"], constexprs.get("BLOCK_N"), options["num_warps"],
                    options.get("num_stages"), constexprs.get("ROW_SPLIT", 1)))  # fmt: skip
    return listed


@pytest.mark.parametrize("arch", ARCHS)
def test_heuristic_selects_listed_configs(arch, monkeypatch):
    """The GPU heuristic (run here with a pretend 132-SM device with sm_`arch`'s shared memory) only picks
    configurations the AOT test compiles for that architecture, and its splits cover the positions exactly."""
    monkeypatch.setattr(kernel_module, "INTERPRETING", False)
    monkeypatch.setattr(kernel_module, "_sm_count", lambda index: 132)
    monkeypatch.setattr(kernel_module, "_shared_memory", lambda index: kernel_module.SHARED_MEMORY_OPTIN[arch])
    listed = _gpu_configs(arch)
    if arch in kernel_module._CONSUMER_ARCHS:  # sm_80's builds, compiled for sm_80, cover the rest of their tiles
        listed |= _gpu_configs(80)
    streaming = ("_context_partial_kernel", "_output_kernel", "_query_grad_kernel", "_key_value_grad_kernel")
    for dtype, pointer in kernel_module._POINTER_TYPES.items():
        for head_dim in kernel_module.HEAD_DIMS:
            for batch_heads in (1, 8, 128, 1024):
                for n in (1, 35, 64, 1024, 4096, 16384, 65536):
                    blocks, reduce, mapping = kernel_module._plans(
                        batch_heads, n, head_dim, dtype, torch.device("cuda", 0), 0
                    )
                    for name in streaming:
                        row_split = blocks.row_split if name == "_key_value_grad_kernel" else 1
                        config = (pointer, name, head_dim, blocks.block_n, blocks.num_warps, blocks.num_stages,
                                  row_split)
                        assert config in listed, f"{config} selected but not listed in gpu_compile_configs({arch})"
                    tiles = -(-n // blocks.block_n)
                    for tiles_per_program, programs in (reduce, mapping):
                        assert (programs - 1) * tiles_per_program < tiles <= programs * tiles_per_program
    # The benchmark shape (B 32, 4 heads, d 32, N 16384, bf16) fills the device several waves deep.
    _, (_, splits), (_, programs) = kernel_module._plans(128, 16384, 32, torch.bfloat16, torch.device("cuda", 0), 0)
    assert 128 * splits >= 4 * 132 and 128 * programs >= 4 * 132
    # The shared-memory limits the kernel module chooses from are the ones the compile tests check against.
    assert kernel_module.SHARED_MEMORY_OPTIN[arch] == SHARED_MEMORY_LIMIT[arch]


@pytest.fixture(scope="module")
def compiled_configs():
    """Records of compiling every listed configuration for each architecture of gpu_compile.ARCHS."""
    return compile_for_archs("fastunet.kernels.linear_attention", ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_compile(arch, compiled_configs):
    """Every configuration compiles for sm_`arch` within its shared memory (99 KB on sm_86/89/120), without
    spills, 16-bit products on the tensor cores; aligned builds get the divisibility of a real launch."""
    configs = configurations(kernel_module, arch)
    records = compiled_configs[arch]
    assert len(records) == len(configs)
    failures = [r for r in records if "error" in r]
    assert not failures, f"sm_{arch}: {len(failures)} configurations failed, e.g. {failures[0]}"
    for (_, signature, _, _, attrs), r in zip(configs, records):
        assert r["shared"] <= SHARED_MEMORY_LIMIT[arch], f"sm_{arch} {r['name']}: {r['shared']} bytes of shared memory"
        assert r["spills"] == 0, f"sm_{arch} {r['name']}: {r['spills']} bytes of register spills"
        if signature.get("q_ptr", signature.get("k_ptr")) in ("*fp16", "*bf16"):
            assert r["tensor_cores"], f"sm_{arch} {r['name']}: 16-bit products not on the tensor cores"


def test_gpu_compile_coverage():
    """Every streaming kernel is listed with the divisibility a real launch at the Unet's shapes gets (16-bit),
    and the kernels that read or write the memory slots with fp32 and 16-bit slots."""
    configs = kernel_module.gpu_compile_configs()
    assert {c[2].get("ROW_SPLIT") for c in configs if c[0] is kernel_module._key_value_grad_kernel} == {1, 2}
    aligned = {(k.__name__, s.get("q_ptr", s.get("k_ptr"))) for k, s, _, _, attrs in configs if attrs}
    for name in ("_context_partial_kernel", "_output_kernel", "_query_grad_kernel", "_key_value_grad_kernel"):
        for pointer in ("*fp16", "*bf16"):
            assert (name, pointer) in aligned, (name, pointer)
    memory = {(k.__name__, s["mem_k_ptr" if "mem_k_ptr" in s else "dmem_k_ptr"]) for k, s, _, _, _ in configs
              if "mem_k_ptr" in s or "dmem_k_ptr" in s}
    for name in ("_context_combine_kernel", "_context_grad_combine_kernel", "_key_value_grad_kernel"):
        for pointer in ("*fp32", "*bf16"):
            assert (name, pointer) in memory, (name, pointer)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mem", [4, 0])
def test_packed(channels_last, dtype, mem, device):
    """packed_linear_attention on the to_qkv output: the reference's values, and one gradient tensor of qkv's
    shape and one of mem_kv's (fp32 slots beside bf16 activations, as under autocast), against the reference."""
    from fastunet.kernels.linear_attention import packed_linear_attention
    from fastunet.reference import packed_linear_attention as reference_packed

    batch, heads, head_dim, height, width = 2, 2, 16, 5, 7
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(batch, 3 * heads * head_dim, height, width, generator=generator).to(device, dtype)
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    mem_kv = torch.randn(2, heads, head_dim, mem, generator=generator).to(device)
    grad = torch.randn(batch, heads * head_dim, height, width, generator=generator).to(device, dtype)
    out, (dqkv, dmem_kv) = _run(lambda *t: packed_linear_attention(*t, heads, num_splits=2), [qkv, mem_kv], grad)
    expected_out, (expected_dqkv, expected_dmem) = _run(lambda *t: reference_packed(*t, heads),
                                                        [qkv.float(), mem_kv], grad.float())
    assert out.shape == grad.shape and out.dtype == dtype and dqkv.shape == qkv.shape and dqkv.dtype == dtype
    # In qkv's layout (a channels_last model's convolutions then take them without a copy).
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout) and dqkv.is_contiguous(memory_format=layout)
    assert dmem_kv.shape == mem_kv.shape and dmem_kv.stride() == mem_kv.stride()
    assert dmem_kv.dtype == torch.float32
    tol = FORWARD_TOL[dtype]
    assert_close(out.float(), expected_out, atol=tol * expected_out.abs().max().item(), rtol=tol, what="out")
    for name, actual, expected in (("dqkv", dqkv, expected_dqkv), ("dmem_kv", dmem_kv, expected_dmem)):
        if expected.numel():
            tol = BACKWARD_TOL[dtype]
            assert_close(actual.float(), expected, atol=tol * expected.abs().max().item(), rtol=tol, what=name)


def test_packed_deterministic(device):
    """The memory-slot gradients are reduced over the batch in a fixed order inside the last launch: bitwise
    equal between runs."""
    from fastunet.kernels.linear_attention import packed_linear_attention

    generator = torch.Generator().manual_seed(4)
    qkv = torch.randn(3, 3 * 2 * 16, 4, 6, generator=generator).to(device, torch.bfloat16)
    mem_kv = torch.randn(2, 2, 16, 4, generator=generator).to(device)
    grad = torch.randn(3, 32, 4, 6, generator=generator).to(device, torch.bfloat16)
    first = _run(lambda *t: packed_linear_attention(*t, 2, num_splits=2), [qkv, mem_kv], grad)
    second = _run(lambda *t: packed_linear_attention(*t, 2, num_splits=2), [qkv, mem_kv], grad)
    for name, a, b in zip(("out", "dqkv", "dmem_kv"), (first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_packed_opcheck(device):
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 3 * 2 * 16, 4, 5, generator=generator).to(device).requires_grad_()
    mem_kv = torch.randn(2, 2, 16, 3, generator=generator).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.fastunet.packed_linear_attention_forward.default, (qkv, mem_kv, 2, 2))
    out, context, lse = torch.ops.fastunet.packed_linear_attention_forward(qkv, mem_kv, 2, 2)
    args = (torch.randn_like(out), qkv.detach(), mem_kv.detach(), context, lse, 2, 2)
    torch.library.opcheck(torch.ops.fastunet.packed_linear_attention_backward.default, args)


def test_grid_axis_limit():
    """Programs per (b, head) stay within CUDA's 65535 on grid axis 1: longer sequences take more tiles a
    program (N = 2**24 positions at the 16-position tiles of d = 128 would need 2**20 programs)."""
    tiles = 2**24 // 16
    for tiles_per_program in (1, 4, 16):
        per_program, programs = kernel_module._split(tiles, tiles_per_program)
        assert programs <= kernel_module.MAX_GRID_Y
        assert (programs - 1) * per_program < tiles <= programs * per_program


def test_layer_kernel_count():
    """One LinearAttention layer forward+backward as the Unet calls it (bf16 autocast, bf16 activations,
    `x = attn(x, residual=x)`), convolutions included: at most 24 GPU kernels (38 before the packed ops, counted
    by the issue; 31 by bench/kernel_count.py before, 20 after, the residual added in the output norm's kernel)."""
    from kernel_count import count_layer_step

    from fastunet.attention import LinearAttention

    x = torch.randn(2, 32, 4, 4).bfloat16().requires_grad_()
    counted = count_layer_step(LinearAttention(32, heads=2, dim_head=16).to(x.device), x, torch.randn_like(x))
    assert counted.total <= 24, counted.summary(top=30)
    assert not {"aten::stack", "aten::cat", "aten::zeros"} & set(counted.by_name), counted.summary(top=30)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_layer_residual(backend, device):
    """LinearAttention(x, residual=r) (the residual fused into the output RMSNorm) equals LinearAttention(x) + r,
    upstream's value, forward and gradients; a residual of another dtype is added outside the norm."""
    import fastunet
    from fastunet.attention import LinearAttention

    torch.manual_seed(6)
    layer = LinearAttention(32, heads=2, dim_head=16).to(device)
    x = torch.randn(2, 32, 4, 4, device=device)
    residual = torch.randn(2, 32, 4, 4, device=device)
    with fastunet.use_backend(backend):
        fused, fused_grads = _run(lambda a, r: layer(a, residual=r), [x, residual], torch.ones_like(x))
        plain, plain_grads = _run(lambda a, r: layer(a) + r, [x, residual], torch.ones_like(x))
        mixed = layer(x, residual=residual.double())
    assert_close(fused, plain, what="fused residual")
    for name, a, b in zip(("dx", "dresidual"), fused_grads, plain_grads):
        assert_close(a, b, what=name)
    assert mixed.dtype == torch.float64
    assert_close(mixed.float(), plain, what="residual of another dtype")


def test_packed_torch_compile(device):
    """The packed custom ops under torch.compile(fullgraph=True): the same forward and gradients as eager."""
    from fastunet.kernels.linear_attention import packed_linear_attention

    generator = torch.Generator().manual_seed(7)
    qkv = torch.randn(1, 3 * 2 * 16, 4, 4, generator=generator).to(device)
    mem_kv = torch.randn(2, 2, 16, 4, generator=generator).to(device)
    grad = torch.randn(1, 32, 4, 4, generator=generator).to(device)

    def block(qkv, mem_kv):
        return packed_linear_attention(qkv * 2, mem_kv, 2).sigmoid()

    eager = _run(block, [qkv, mem_kv], grad)
    compiled = _run(torch.compile(block, fullgraph=True), [qkv, mem_kv], grad)
    for name, a, b in zip(("out", "dqkv", "dmem_kv"), (compiled[0], *compiled[1]), (eager[0], *eager[1])):
        assert_close(a, b, what=f"compiled {name}")  # inductor fuses the `* 2` backward in another order
