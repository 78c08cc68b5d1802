"""What the two fused norms (group_norm, rms_norm) share: the `act(z * (scale + 1) + shift)` epilogue and its
backward, and the plumbing around (B, C, H, W) tensors.

Both norms see x as rows (batch, channel) of H*W pixels, in one of two layouts read in place:
- NCHW-contiguous: the pixels of a row are contiguous, rows are H*W apart ("line stride" H*W);
- channels_last-contiguous: the channels of a pixel are contiguous, pixels are C apart ("line stride" C).
The layout is a constexpr, so the compiler knows the unit-stride axis and vectorises loads and stores along
it. All (B, C, H, W) tensors of one launch (x, y, dy, dx) share that layout and strides, so one offset tile
addresses all of them; any other strides (slices, expanded gradients) are copied to it first.

The per-(batch, channel) parameters (weight, bias, g, scale, shift) reach the kernels in fp32 and optional ones
are skipped by runtime flags, not constexprs: each kernel then compiles once per tile and input dtype rather
than once per mix of parameter dtypes and flags (see `gpu_compile_configs` in each norm module).
"""

import functools

import torch
import triton
import triton.language as tl

from fastunet.kernels import INTERPRETING

# ---------------------------------------------------------------------------------------------------------------
# Device code


@triton.jit
def load_scale_shift(
    scale_ptr, shift_ptr,  # (B, C) fp32, strided; not read when the matching flag is False
    batch, channel,  # int scalar or vectors: the (batch, channel) of each lane
    mask,  # lanes to read; gives the shape of the results
    scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,
    has_scale, has_shift,  # runtime 0/1 flags
):
    """(1 + scale, shift) of each lane as fp32 vectors of mask's shape; (1, 0) where absent."""
    one_plus_scale = tl.where(mask, 1.0, 1.0)
    shift = tl.where(mask, 0.0, 0.0)
    if has_scale:
        one_plus_scale += tl.load(scale_ptr + batch.to(tl.int64) * scale_batch_stride
                                  + channel * scale_channel_stride, mask=mask, other=0.0)
    if has_shift:
        shift = tl.load(shift_ptr + batch.to(tl.int64) * shift_batch_stride + channel * shift_channel_stride,
                        mask=mask, other=0.0)
    return one_plus_scale, shift


@triton.jit
def tile_offsets(batch, channel, pixel, batch_stride, line_stride, CHANNELS_LAST: tl.constexpr):
    """int64 element offsets of a [rows, pixels] tile of a (B, C, H, W) tensor in the given layout.

    channel: (rows,) int vector; pixel: (pixels,) int vector; batch: int scalar or (rows,) vector; batch_stride
    C*H*W; line_stride: H*W for NCHW, C for channels_last. The unit stride is implicit.
    """
    row_offset = batch.to(tl.int64) * batch_stride
    if CHANNELS_LAST:
        return (row_offset + channel)[:, None] + pixel.to(tl.int64)[None, :] * line_stride
    return (row_offset + channel.to(tl.int64) * line_stride)[:, None] + pixel[None, :]


@triton.jit
def tile_pointers(base_ptr, offsets, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """base_ptr + offsets, with the alignment the host guarantees when ALIGN == 8: a 16-byte-aligned base, and
    each contiguous run of the tile starting at a multiple of 8 elements. The hint makes the compiler emit
    16-byte vector accesses without depending on Triton's specialisation of the arguments (which the
    ahead-of-time compile of the tests does not have)."""
    pointers = base_ptr + offsets
    if ALIGN > 1:  # pointer divisibility is counted in bytes
        if CHANNELS_LAST:
            pointers = tl.multiple_of(pointers, [16, 1])
        else:
            pointers = tl.multiple_of(pointers, [1, 16])
    return pointers


@triton.jit
def activation(u, silu):
    """The epilogue's activation of the pre-activation u = z * (scale + 1) + shift (fp32): SiLU or identity."""
    if silu:
        u = u * tl.sigmoid(u)
    return u


@triton.jit
def activation_backward(grad_out, u, silu):
    """d loss / d u from d loss / d out, for `out = activation(u, silu)` (fp32).

    silu'(u) = sigmoid(u) * (1 + u * (1 - sigmoid(u))); at |u| ~ 1e5 the sigmoid saturates to 0 or 1 and the
    product stays finite (u * 0), so fp16-range activations give no NaN.
    """
    if silu:
        sig = tl.sigmoid(u)
        grad_out = grad_out * (sig * (1.0 + u * (1.0 - sig)))
    return grad_out


# ---------------------------------------------------------------------------------------------------------------
# Host code

FUSED_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
VECTOR_ELEMENTS = 8  # ALIGN: a multiple of 8 elements is 16 bytes in 16-bit types (and 32 in fp32)


def kernel_memory_format(x):
    """The layout the kernels use for x (B, C, H, W), which is also the memory format of their outputs (y, dx):
    channels_last when x's channels are its unit-stride dimension (channels_last in, channels_last out), NCHW
    for everything else."""
    channels, height, width = x.shape[1:]
    if channels > 1 and height * width > 1 and x.stride(1) == 1:
        return torch.channels_last
    return torch.contiguous_format


def in_memory_format(t, memory_format):
    """`t` itself when it is contiguous in `memory_format` (NCHW and channels_last inputs: no copy), else a
    copy that is (slices, expanded or permuted tensors)."""
    return t if t.is_contiguous(memory_format=memory_format) else t.contiguous(memory_format=memory_format)


def row_strides(shape, memory_format):
    """(batch_stride, line_stride) of a (B, C, H, W) tensor contiguous in `memory_format`, for tile_offsets.

    They are computed from the shape, not read from the tensor: a contiguous tensor may carry any stride on a
    dimension of size 1, which no index ever multiplies."""
    _, channels, height, width = shape
    line_stride = channels if memory_format == torch.channels_last else height * width
    return channels * height * width, line_stride


def vector_aligned(tensors, contiguous_run):
    """Whether ALIGN=8 holds: every tensor's data is 16-byte aligned and the contiguous axis is cut in runs of a
    multiple of 8 elements (`contiguous_run`: H*W for NCHW, the channels a program reads per pixel for
    channels_last)."""
    return contiguous_run % VECTOR_ELEMENTS == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


def empty_output(x, dtype=None):
    """A fresh tensor of x's shape (B, C, H, W) in kernel_memory_format(x)."""
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=kernel_memory_format(x))


def as_fp32(t, contiguous=False):
    """`t` in fp32 (no copy when it already is; contiguous if asked), or None."""
    if t is None:
        return None
    t = t.float()
    return t.contiguous() if contiguous else t


def scale_shift_strides(scale, shift):
    """(scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride); 0 where absent."""
    return (*(scale.stride() if scale is not None else (0, 0)), *(shift.stride() if shift is not None else (0, 0)))


@functools.lru_cache(maxsize=None)
def device_limits(device):
    """(streaming multiprocessors, L2 bytes) of a CUDA device; (1, 50 MiB) when interpreting on the CPU.

    With one "SM" the plans pack and never split, which keeps interpreted tests fast; tests force the other
    paths through explicit plans.
    """
    if INTERPRETING or device.type != "cuda":
        return 1, 50 << 20
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "L2_cache_size", 50 << 20)


def grads_from_sums(sum_du_xhat, sum_du, weight, bias, scale, shift, needs):
    """Parameter gradients of `out = act((xhat * weight + bias) * (scale + 1) + shift)` from sums over pixels.

    sum_du_xhat, sum_du: (B, C) fp32: per (batch, channel), the sum over pixels of d loss / d u times xhat, and of
    d loss / d u, where u is the pre-activation and xhat the normalized input (the RMS norm passes g as weight
    and no bias). weight, bias: (C,) or None; scale, shift: (B, C) or None; needs: which of (weight, bias,
    scale, shift) want a gradient. Returns those four gradients (None where not wanted) in each parameter's
    own dtype; the batch sums are torch.sum over a dimension, a fixed order, so they are deterministic.
    """
    need_weight, need_bias, need_scale, need_shift = needs
    d_weight = d_bias = d_scale = d_shift = None
    one_plus_scale = None if scale is None else scale.float() + 1
    if need_weight:
        d_weight = (sum_du_xhat if one_plus_scale is None else sum_du_xhat * one_plus_scale).sum(0).to(weight.dtype)
    if need_bias:
        d_bias = (sum_du if one_plus_scale is None else sum_du * one_plus_scale).sum(0).to(bias.dtype)
    if need_scale:
        # d out / d scale is z = xhat * weight + bias, so its sum against d loss / d u is sum_du_xhat * weight +
        # sum_du * bias.
        z_sum = sum_du_xhat if weight is None else sum_du_xhat * weight.float()
        if bias is not None:
            z_sum = z_sum + sum_du * bias.float()
        d_scale = z_sum.to(scale.dtype)
    if need_shift:
        d_shift = sum_du.to(shift.dtype)
    return d_weight, d_bias, d_scale, d_shift


def gradient_or_empty(grad, like):
    """What a backward custom op returns for one gradient: it, or an empty placeholder when not computed
    (operator schemas have no optional outputs; the autograd formula turns the placeholder back into None)."""
    return torch.empty(0, dtype=like.dtype, device=like.device) if grad is None else grad


def runtime_flags(*conditions):
    """Runtime on/off switches: bools (an i1 argument) on the GPU, 0/1 ints under the interpreter, whose Triton 3.6
    version rejects Python bools for non-constexpr arguments (it builds an int32 array for an int1 type)."""
    if INTERPRETING:
        return tuple(int(bool(c)) for c in conditions)
    return tuple(bool(c) for c in conditions)


def compile_signature(kernel, constexprs, x_dtype, x_pointers, flags, floats=("eps",)):
    """The `signature` of triton.compiler.ASTSource for one kernel of the fused norms.

    x_pointers: pointer arguments in the input dtype `x_dtype`; every other pointer is fp32. flags: runtime bool
    arguments (runtime_flags); floats: fp32 scalars; constexprs: the constexpr values. Every other argument is an i32 (strides
    and sizes; Triton would pick i64 for values of 2**31 and more, and the same code compiles).
    """
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (TRITON_DTYPE_NAMES[x_dtype] if name in x_pointers else "fp32")
        elif name in flags:
            signature[name] = "u1"  # bools on the GPU, see runtime_flags
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature
