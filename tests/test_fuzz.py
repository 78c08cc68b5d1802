"""Property tests: every fused op on the Triton backend matches the reference backend, forward and backward, for
random shapes, strides, dtypes, groups, memory-slot counts and flags in the Unet's range.

Each example is a plain dict (shapes, names, a seed for the values), so hypothesis prints a failing example whole;
rebuilding it needs nothing else. The example sequence is derandomized (the same in every CI run); set
FASTUNET_FUZZ_EXAMPLES to search longer, and FASTUNET_FUZZ_RANDOM=1 to search new examples (hypothesis then prints
the @reproduce_failure blob of a failure). Under the interpreter the budget is small (~2 s per example).

Tolerances, from tests/tolerances.py's per-dtype values (tol = its rtol), as the ops' own tests use them:
- norms: elementwise assert_close in the dtype for y and dx; parameter gradients (sums over pixels) by
  assert_sum_close.
- attentions: |kernel - reference| <= tol * (max |reference| + |reference|) against the reference on fp32-upcast
  inputs; the kernels' dots round their 16-bit operands, so each element's error follows the size of its terms,
  not its value. Gradients reduce once more (softmax backward): twice tol.
"""

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastunet
from conftest import DEVICE
from fastunet import functional
from tolerances import TOLERANCES, assert_close, assert_sum_close

FUZZ = settings(
    max_examples=int(os.environ.get("FASTUNET_FUZZ_EXAMPLES", "10")),
    deadline=None,
    derandomize=os.environ.get("FASTUNET_FUZZ_RANDOM") != "1",
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
dtype_names = st.sampled_from(sorted(DTYPES))


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # The interpreter evaluates SiLU's exp(-u) in numpy, which warns on overflow to inf; the result (0) is right.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
        yield


def randn(shape, seed, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def laid_out(t, layout):
    """t (B, C, H, W) with the same values in one of the layouts the Unet (or a user) hands the ops."""
    if layout == "channels_last":
        return t.to(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "transposed":  # a (B, C, W, H) tensor seen transposed
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "batch_offset":  # not starting at the storage's first element
        return torch.cat((torch.zeros_like(t[:1]), t))[1:]
    return t.contiguous()


LAYOUTS = ["contiguous", "channels_last", "strided", "transposed", "batch_offset"]


def backward_of(fn, tensors, grad_seed):
    """fn(*tensors) and the gradients of <fn(*tensors), g> for a fixed random g, with respect to each tensor."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grad = randn(out.shape, grad_seed).to(out.device, out.dtype)
    out.backward(grad)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def on_backend(backend, fn):
    def run(*tensors):
        with fastunet.use_backend(backend):
            return fn(*tensors)
    return run


@st.composite
def norm_cases(draw, grouped):
    groups = draw(st.integers(1, 4)) if grouped else 1
    channels = groups * draw(st.integers(1, 6 if grouped else 24))
    shape = (draw(st.integers(1, 3)), channels, draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    if grouped and channels // groups * shape[2] * shape[3] == 1:
        shape = (*shape[:3], 2)  # a group of one value is refused (test_bad_input); the smallest group has two
    return dict(
        shape=shape,
        groups=groups,
        dtype=draw(dtype_names),
        param_dtype=draw(st.sampled_from(["same", "float32"])),  # "float32": autocast's fp32 parameters
        layout=draw(st.sampled_from(LAYOUTS)),
        affine=draw(st.booleans()),
        scale_shift=draw(st.sampled_from(["chunked", "contiguous", "scale", "shift", "none"])),
        silu=draw(st.booleans()),
        offset=draw(st.sampled_from([0.0, 3.0])),  # a mean far from 0 stresses the variance
        residual=draw(st.sampled_from(["none", "contiguous", "channels_last"])),  # the ResnetBlock's skip, fused
        seed=draw(st.integers(0, 2**16)),
    )


def norm_residual(case, x):
    if case["residual"] == "none":
        return None
    return laid_out(randn(x.shape, case["seed"] + 5).to(DEVICE, x.dtype), case["residual"])


def norm_inputs(case):
    batch, channels = case["shape"][:2]
    dtype = DTYPES[case["dtype"]]
    param_dtype = dtype if case["param_dtype"] == "same" else torch.float32
    seed = case["seed"]
    x = laid_out(randn(case["shape"], seed, shift=case["offset"]).to(DEVICE, dtype), case["layout"])
    weight = (1 + 0.5 * randn(channels, seed + 1)).to(DEVICE, param_dtype) if case["affine"] else None
    bias = (0.5 * randn(channels, seed + 2)).to(DEVICE, param_dtype) if case["affine"] else None
    embedding = (0.5 * randn((batch, 2 * channels), seed + 3)).to(DEVICE, param_dtype)
    scale, shift = {
        "chunked": embedding.chunk(2, dim=1),  # the Unet's views of the time MLP output
        "contiguous": (embedding[:, :channels].contiguous(), embedding[:, channels:].contiguous()),
        "scale": (embedding[:, :channels], None),
        "shift": (None, embedding[:, channels:]),
        "none": (None, None),
    }[case["scale_shift"]]
    return x, weight, bias, scale, shift


def check_norm(case, fn, x, params, scale, shift):
    """fn(x, *params, scale, shift, residual) on Triton vs reference: y, dx and d_residual elementwise, parameter
    grads as sums."""
    residual = norm_residual(case, x)
    tensors = (x, *params, scale, shift, residual)
    y, grads = backward_of(on_backend("triton", fn), tensors, case["seed"] + 4)
    y_ref, grads_ref = backward_of(on_backend("reference", fn), tensors, case["seed"] + 4)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y_ref, what="y")
    assert_close(grads[0], grads_ref[0], what="dx")
    if residual is not None:
        assert_close(grads[-1], grads_ref[-1], what="d_residual")
    batch, _, height, width = x.shape
    names = [f"d_param{i}" for i in range(len(params))] + ["d_scale", "d_shift"]
    sums = [batch * height * width] * len(params) + [height * width] * 2
    for name, grad, grad_ref, summed in zip(names, grads[1:-1], grads_ref[1:-1], sums):
        assert (grad is None) == (grad_ref is None), name
        if grad is not None:
            assert grad.dtype == grad_ref.dtype, f"{name}: {grad.dtype} != {grad_ref.dtype}"
            assert_sum_close(grad, grad_ref, summed, name)


@FUZZ
@given(case=norm_cases(grouped=True))
def test_group_norm_act(case):
    x, weight, bias, scale, shift = norm_inputs(case)
    params = (weight, bias) if case["affine"] else ()

    def fn(x, *rest):
        weight, bias = rest[:-3] if case["affine"] else (None, None)
        scale, shift, residual = rest[-3:]
        return functional.group_norm_act(x, weight, bias, case["groups"], scale, shift, case["silu"], 1e-5,
                                         residual=residual)

    check_norm(case, fn, x, params, scale, shift)


@FUZZ
@given(case=norm_cases(grouped=False))
def test_rms_norm_act(case):
    x, weight, _, scale, shift = norm_inputs(case)
    # RMSNorm's gain is its (1, C, 1, 1) parameter seen as (C,); without `affine` it is a plain contiguous vector.
    g = weight.view(1, -1, 1, 1).view(-1) if weight is not None else torch.rand(x.shape[1]).to(DEVICE, x.dtype) + 0.5

    def fn(x, g, scale, shift, residual):
        return functional.rms_norm_act(x, g, scale, shift, case["silu"], residual=residual)

    check_norm(case, fn, x, (g,), scale, shift)


@st.composite
def attention_cases(draw):
    return dict(
        batch=draw(st.integers(1, 2)),
        heads=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([16, 32])),  # the Unet's default 32; the kernels take 16..128
        height=draw(st.integers(1, 7)),
        width=draw(st.integers(1, 7)),
        mem=draw(st.integers(0, 6)),  # num_mem_kv; upstream's default 4
        dtype=draw(dtype_names),
        mem_dtype=draw(st.sampled_from(["same", "float32"])),
        layout=draw(st.sampled_from(["unet_views", "contiguous", "transposed"])),
        # 3: logits up to ~d * 9 / sqrt(d), a sharp softmax (where a delta of rowsum(dO * O) once failed in bf16:
        # tests/test_edges.py, test_bf16_attention_backward_...).
        magnitude=draw(st.sampled_from([1.0, 3.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def attention_inputs(case, positions_last):
    """q, k, v as (B, heads, N, d) (positions_last: (B, heads, d, N)) in the case's layout; mem_k, mem_v as the
    halves of one mem_kv parameter."""
    batch, heads, d = case["batch"], case["heads"], case["head_dim"]
    n = case["height"] * case["width"]
    dtype = DTYPES[case["dtype"]]
    seed, magnitude = case["seed"], case["magnitude"]
    if case["layout"] == "unet_views":  # the to_qkv conv output, split as the Attention modules do
        qkv = (randn((batch, 3 * heads * d, n), seed) * magnitude).to(DEVICE, dtype)
        q, k, v = qkv.unflatten(1, (3, heads, d)).unbind(1)  # (B, heads, d, N) views
        if not positions_last:
            q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
    else:
        shape = (batch, heads, d, n) if positions_last else (batch, heads, n, d)
        q, k, v = (randn(shape, seed + i) * magnitude for i in range(3))
        if case["layout"] == "transposed":
            q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
        q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    mem_shape = (2, heads, d, case["mem"]) if positions_last else (2, heads, case["mem"], d)
    mem_dtype = dtype if case["mem_dtype"] == "same" else torch.float32
    mem_k, mem_v = (randn(mem_shape, seed + 5) * magnitude).to(DEVICE, mem_dtype)
    return q, k, v, mem_k, mem_v


def check_attention(case, fn, inputs):
    """fn(*inputs) on Triton vs the reference on fp32-upcast inputs, output and every input's gradient."""
    dtype = DTYPES[case["dtype"]]
    out, grads = backward_of(on_backend("triton", fn), inputs, case["seed"] + 6)
    upcast = [t.float() for t in inputs]
    expected, expected_grads = backward_of(on_backend("reference", fn), upcast, case["seed"] + 6)
    assert out.dtype == dtype and out.shape[0] == inputs[0].shape[0]
    tol = TOLERANCES[dtype]["rtol"]
    names = ("dq", "dk", "dv", "dmem_k", "dmem_v") if len(inputs) == 5 else ("dqkv", "dmem_kv")
    for name, actual, reference, tensor_tol in [("out", out, expected, tol),
                                                *zip(names, grads, expected_grads, [2 * tol] * 5)]:
        if reference.numel() == 0:
            continue
        # Gradients come back in each input's dtype; a 16-bit memory gradient is judged at that dtype.
        tensor_tol = max(tensor_tol, 2 * TOLERANCES[actual.dtype]["rtol"]) if name != "out" else tensor_tol
        # Where a whole tensor cancels to ~0 (one key: softmax weight 1, dq = 0), the kernel keeps the fp32 residue
        # of the d products of size magnitude^2 summed into each element: a floor of ~16 fp32 ulps of that sum.
        residue = 16 * 2.0**-24 * case["head_dim"] * case["magnitude"] ** 2
        scale = reference.abs().max().item()
        assert_close(actual.float(), reference, atol=tensor_tol * scale + residue, rtol=tensor_tol, what=name)


@FUZZ
@given(case=attention_cases())
def test_attention(case):
    check_attention(case, functional.attention, attention_inputs(case, positions_last=False))


@FUZZ
@given(case=attention_cases())
def test_linear_attention(case):
    check_attention(case, functional.linear_attention, attention_inputs(case, positions_last=True))


def packed_inputs(case, memory_layout):
    """qkv, the to_qkv conv output (B, 3 * heads * d, H, W), in the case's layout (for "unet_views" the conv's own
    contiguous output; "transposed" a channels_last tensor), and mem_kv (2, heads, M, d) or (2, heads, d, M)."""
    batch, heads, d = case["batch"], case["heads"], case["head_dim"]
    shape = (batch, 3 * heads * d, case["height"], case["width"])
    qkv = (randn(shape, case["seed"]) * case["magnitude"]).to(DEVICE, DTYPES[case["dtype"]])
    qkv = laid_out(qkv, {"unet_views": "contiguous", "contiguous": "strided", "transposed": "channels_last"}[
        case["layout"]])
    mem_shape = (2, heads, case["mem"], d) if memory_layout == "md" else (2, heads, d, case["mem"])
    mem_dtype = DTYPES[case["dtype"]] if case["mem_dtype"] == "same" else torch.float32
    return qkv, (randn(mem_shape, case["seed"] + 5) * case["magnitude"]).to(DEVICE, mem_dtype)


@FUZZ
@given(case=attention_cases())
def test_packed_attention(case):
    """The form the Unet's Attention calls: q, k, v read from the to_qkv output through its strides."""
    fn = lambda qkv, mem_kv: functional.packed_attention(qkv, mem_kv, case["heads"])  # noqa: E731
    check_attention(case, fn, packed_inputs(case, "md"))


@FUZZ
@given(case=attention_cases())
def test_packed_linear_attention(case):
    fn = lambda qkv, mem_kv: functional.packed_linear_attention(qkv, mem_kv, case["heads"])  # noqa: E731
    check_attention(case, fn, packed_inputs(case, "dm"))
