"""What the two fused norms (group_norm, rms_norm) share: the `act(z * (scale + 1) + shift)` epilogue and its
backward, and the plumbing around (B, C, H, W) tensors.

Both norms see x as rows (batch, channel) of H*W pixels, in one of two layouts read in place:
- NCHW-contiguous: the pixels of a row are contiguous, rows are H*W apart ("line stride" H*W);
- channels_last-contiguous: the channels of a pixel are contiguous, pixels are C apart ("line stride" C).
The layout is a constexpr, so the compiler knows the unit-stride axis and vectorises loads and stores along
it. All (B, C, H, W) tensors of one launch (x, y, dy, dx) share that layout and strides, so one offset tile
addresses all of them; any other strides (slices, expanded gradients) are copied to it first.

The per-(batch, channel) parameters (weight, bias, g, scale, shift) are read in their own dtype through their
strides (no casts, no copies: under autocast scale and shift are the two bf16 halves of the time MLP's output,
weight and bias fp32 parameters) and converted to fp32 on load; optional ones are skipped by runtime flags, not
constexprs. The pointer dtypes are part of a compiled kernel's specialization, so each kernel compiles once per
tile, input dtype and parameter dtype mix actually used: `PARAMETER_DTYPE_MIXES` lists the mixes a model can
make, and `gpu_compile_configs` in each norm module compiles each of them.

When scale and shift are the two halves of one (B, 2C) tensor (`halves_of_one`), the ops take that tensor whole
and write its gradient whole: the two halves never pass through autograd separately, so no `cat` joins their
gradients. The parameter gradients are reduced over the batch (and pixel blocks) by `_parameter_grads_kernel`,
one small launch in a fixed order (deterministic, no atomics), which writes each gradient in its parameter's dtype.
"""

import functools

import torch
import triton
import triton.language as tl

from fastunet.kernels import INTERPRETING
from fastunet.kernels.fast_math import FAST_MATH, divide, exp, reciprocal

# The sigmoid of the epilogue on a GPU: the fast exp2, division (div.approx.ftz) and reciprocal of
# fastunet.kernels.fast_math, one special-function op each and no range fix-ups, 5 SASS instructions for SiLU
# where tl.sigmoid's full-range forms take 14 (bench/static_report.py). What they flush to zero is a sigmoid below
# 1e-38 or a 1 - sigmoid below 1e-38, both beyond fp32's precision of the result.

# ---------------------------------------------------------------------------------------------------------------
# Device code


@triton.jit
def load_as_fp32(bytes_ptr, offsets, mask, dtype_code, other):
    """Elements at `offsets` of a tensor of any float dtype passed as raw bytes (a uint8 view), as fp32.

    dtype_code (runtime, DTYPE_CODES): 0 fp32, 1 fp16, 2 bf16. Parameters reach the kernels this way so that
    their dtypes are runtime values, not part of the compiled signature: one compiled kernel serves every mix of
    parameter dtypes (fp32 parameters with bf16 scale/shift under autocast, all fp16 after model.half(), ...)."""
    if dtype_code == 1:
        value = tl.load(bytes_ptr.to(tl.pointer_type(tl.float16)) + offsets, mask=mask, other=other).to(tl.float32)
    elif dtype_code == 2:
        value = tl.load(bytes_ptr.to(tl.pointer_type(tl.bfloat16)) + offsets, mask=mask, other=other).to(tl.float32)
    else:
        value = tl.load(bytes_ptr.to(tl.pointer_type(tl.float32)) + offsets, mask=mask, other=other)
    return value


@triton.jit
def store_from_fp32(bytes_ptr, offsets, value, mask, dtype_code):
    """Store fp32 `value` into a tensor of any float dtype passed as raw bytes (see load_as_fp32), rounded to it."""
    if dtype_code == 1:
        tl.store(bytes_ptr.to(tl.pointer_type(tl.float16)) + offsets, value.to(tl.float16), mask=mask)
    elif dtype_code == 2:
        tl.store(bytes_ptr.to(tl.pointer_type(tl.bfloat16)) + offsets, value.to(tl.bfloat16), mask=mask)
    else:
        tl.store(bytes_ptr.to(tl.pointer_type(tl.float32)) + offsets, value, mask=mask)


@triton.jit
def dtype_code_of(dtype_codes, index):
    """The DTYPE_CODES entry `index` of a packed `dtype_codes` (pack_dtype_codes: 2 bits each)."""
    return (dtype_codes >> (2 * index)) & 3


@triton.jit
def load_scale_shift(
    scale_ptr, shift_ptr,  # (B, C) raw bytes of any float dtype, strided; not read when the matching flag is False
    batch, channel,  # int scalar or vectors: the (batch, channel) of each lane
    mask,  # lanes to read; gives the shape of the results
    scale_batch_stride, scale_channel_stride, shift_batch_stride, shift_channel_stride,  # in elements
    has_scale, has_shift,  # runtime 0/1 flags
    scale_dtype, shift_dtype,  # runtime DTYPE_CODES
):
    """(1 + scale, shift) of each lane as fp32 vectors of mask's shape; (1, 0) where absent."""
    one_plus_scale = tl.where(mask, 1.0, 1.0)
    shift = tl.where(mask, 0.0, 0.0)
    if has_scale:
        one_plus_scale += load_as_fp32(scale_ptr, batch.to(tl.int64) * scale_batch_stride
                                       + channel * scale_channel_stride, mask, scale_dtype, 0.0)
    if has_shift:
        shift = load_as_fp32(shift_ptr, batch.to(tl.int64) * shift_batch_stride + channel * shift_channel_stride,
                             mask, shift_dtype, 0.0)
    return one_plus_scale, shift


@triton.jit
def load_parameter(parameter_ptr, channel, mask, present, dtype_code, absent_value):
    """A (C,) unit-stride parameter (raw bytes of any float dtype) at `channel` as fp32, or `absent_value` where it
    is absent (runtime flag `present`) or masked."""
    value = tl.where(mask, absent_value, absent_value)
    if present:
        value = load_as_fp32(parameter_ptr, channel, mask, dtype_code, absent_value)
    return value


@triton.jit
def tile_offsets(batch, channel, pixel, batch_stride, line_stride, CHANNELS_LAST: tl.constexpr):
    """Element offsets of a [rows, pixels] tile of a (B, C, H, W) tensor in the given layout, in two parts whose
    outer sum they are: (row_offsets, line_offsets), (rows,) int64 offsets of each row's first element and
    (pixels,) offsets along a row (int32 in NCHW, where a row holds H*W < 2**31 elements; int64 in channels_last).

    channel: (rows,) int vector; pixel: (pixels,) int vector; batch: int scalar or (rows,) vector; batch_stride
    C*H*W; line_stride: H*W for NCHW, C for channels_last. The unit stride is implicit. Kept apart, an NCHW
    row's part is added to a base pointer once per row (tile_pointers) and a tile loop adds only the line part
    per element: one 64-bit add of a 32-bit offset, where the summed int64 offsets took a sign extension, two
    64-bit adds and a 64-bit shift per 16-byte vector of each tensor.
    """
    # One return: Triton types a function by all its return statements, the constexpr-dead one included.
    if CHANNELS_LAST:
        row_offsets = batch.to(tl.int64) * batch_stride + channel
        line_offsets = pixel.to(tl.int64) * line_stride
    else:
        row_offsets = batch.to(tl.int64) * batch_stride + channel.to(tl.int64) * line_stride
        line_offsets = pixel
    return row_offsets, line_offsets


@triton.jit
def tile_pointers(base_ptr, offsets, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """base_ptr + offsets (tile_offsets' two parts), with the alignment the host guarantees when ALIGN == 8: a
    16-byte-aligned base, and each contiguous run of the tile starting at a multiple of 8 elements. The hint makes
    the compiler emit 16-byte vector accesses without depending on Triton's specialisation of the arguments (which
    the ahead-of-time compile of the tests does not have)."""
    row_offsets, line_offsets = offsets
    if CHANNELS_LAST:
        # Summed first: per-row pointers held across a tile loop cost a channels_last tile (rows along the
        # vectors) a register pair per row and thread, and 4 bytes of spills on sm_80.
        pointers = base_ptr + (row_offsets[:, None] + line_offsets[None, :])
    else:
        pointers = (base_ptr + row_offsets)[:, None] + line_offsets[None, :]
    if ALIGN > 1:  # pointer divisibility is counted in bytes
        if CHANNELS_LAST:
            pointers = tl.multiple_of(pointers, [16, 1])
        else:
            pointers = tl.multiple_of(pointers, [1, 16])
    return pointers


@triton.jit
def gradient_tile_pointers(grad_ptr, offsets, batch, pixel, batch_stride, line_stride, grad_batch_stride,
                           grad_line_stride, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
                           GRAD_STRIDES: tl.constexpr):
    """Pointers of a tile of the gradient of y whose `offsets` (tile_offsets) were computed with x's strides.
    With GRAD_STRIDES, for a gradient with strides of its own (gradient_rows): moved by a per-batch shift (batch:
    an int scalar) and, in channels_last, a per-pixel one (`pixel`: the tile's (pixels,) vector). In NCHW the move
    is one scalar add per tile: a second set of element offsets cost the small-maps backward tile 16 bytes of
    spills on sm_80. Without, x's pointers (tile_pointers)."""
    if GRAD_STRIDES:
        grad_ptr += batch.to(tl.int64) * (grad_batch_stride - batch_stride)
        if CHANNELS_LAST:
            row_offsets, line_offsets = offsets
            offsets = row_offsets, line_offsets + pixel.to(tl.int64) * (grad_line_stride - line_stride)
    return tile_pointers(grad_ptr, offsets, CHANNELS_LAST, ALIGN)


@triton.jit
def run_sums(value, BLOCK_ROWS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, VECTOR: tl.constexpr):
    """Sums of each run of VECTOR consecutive pixels of a [rows, pixels] tile (rows: a group's channels, or a
    norm's): [rows, pixels / VECTOR]. A run of the 16-byte vector of an NCHW row (or of 1) lies in one thread, so
    that is adds in registers; a run of the whole row (VECTOR = BLOCK_PIXELS) is a block-wide sum."""
    if VECTOR == 1:
        return value
    if VECTOR == BLOCK_PIXELS:
        return tl.sum(value, 1, keep_dims=True)
    return tl.sum(tl.reshape(value, [BLOCK_ROWS, BLOCK_PIXELS // VECTOR, VECTOR]), 2)


@triton.jit
def to_float32(x):
    """x as fp32. On the GPU a bf16 pair shares one 32-bit register, and its halves become two fp32 in one
    instruction each (a shift and a mask), where the compiler's conversion takes three per pair (it moves the
    high half down, then shifts both up)."""
    if FAST_MATH and x.dtype == tl.bfloat16:
        bits = tl.inline_asm_elementwise("shl.b32 $0, $2, 16;\n\tand.b32 $1, $2, 0xffff0000;", "=r,=r,r", [x],
                                         dtype=tl.uint32, is_pure=True, pack=2)
        return bits.to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def activation(u, silu):
    """The epilogue's activation of the pre-activation u = z * (scale + 1) + shift (fp32): SiLU or identity.

    SiLU as u / (1 + exp(-u)): u * sigmoid(u) without its multiply; the same at the extremes (-0 below -88, inf at
    inf, NaN at -inf)."""
    if silu:
        u = divide(u, 1.0 + exp(-u))
    return u


@triton.jit
def activation_backward(grad_out, u, silu):
    """d loss / d u from d loss / d out, for `out = activation(u, silu)` (fp32).

    silu'(u) = sigmoid(u) * (1 + u * (1 - sigmoid(u))), as sig + sig * (u - u * sig): two fused multiply-adds where
    the product form takes a subtract, a multiply-add and a multiply. At |u| ~ 1e5 the sigmoid saturates to 0 or 1
    and the result stays finite (sig = 0: 0 * u; sig = 1: u - u), so fp16-range activations give no NaN.
    """
    if silu:
        sig = reciprocal(1.0 + exp(-u))
        grad_out = grad_out * (sig + sig * (u - u * sig))
    return grad_out


@triton.jit
def _parameter_grads_kernel(
    sums_ptr,  # (2, B, C) fp32 contiguous: per (batch, channel), the sums of du * xhat, then of du
    weight_ptr, bias_ptr,  # (C,) raw bytes, unit stride; read only when has_weight / has_bias
    scale_ptr,  # (B, C) raw bytes, strided; read only when has_scale
    d_weight_ptr, d_bias_ptr,  # (C,) raw bytes of outputs in weight's / bias's dtype
    d_scale_ptr, d_shift_ptr,  # (B, C) raw bytes of outputs in scale's / shift's dtype, strided
    scale_batch_stride, scale_channel_stride,  # in elements, as every stride here
    d_scale_batch_stride, d_scale_channel_stride, d_shift_batch_stride, d_shift_channel_stride,
    batch, channels,
    dtype_codes,  # pack_dtype_codes(weight, bias, scale, shift)
    has_weight, has_bias, has_scale,
    need_weight, need_bias, need_scale, need_shift,
    BLOCK_BATCH: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
):
    """Parameter gradients of `out = act((xhat * weight + bias) * (scale + 1) + shift)` from the sums s1 of
    du * xhat and s0 of du (du = d loss / d pre-activation) of each (batch, channel): d_weight = sum_b s1 * (1 +
    scale), d_bias = sum_b s0 * (1 + scale), d_scale = s1 * weight + s0 * bias (d out / d scale is xhat * weight +
    bias), d_shift = s0. One program per block of channels takes [BLOCK_BATCH, BLOCK_CHANNELS] tiles of the
    batch, one step for a batch of up to BLOCK_BATCH, and sums them over the batch per lane, then once:
    deterministic."""
    channel = tl.program_id(0) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    valid = channel < channels
    weight_dtype, bias_dtype = dtype_code_of(dtype_codes, 0), dtype_code_of(dtype_codes, 1)
    scale_dtype, shift_dtype = dtype_code_of(dtype_codes, 2), dtype_code_of(dtype_codes, 3)
    weight = load_parameter(weight_ptr, channel, valid, has_weight, weight_dtype, 1.0)
    bias = load_parameter(bias_ptr, channel, valid, has_bias, bias_dtype, 0.0)
    lane_d_weight = tl.zeros([BLOCK_BATCH, BLOCK_CHANNELS], tl.float32)
    lane_d_bias = tl.zeros([BLOCK_BATCH, BLOCK_CHANNELS], tl.float32)
    for first in range(0, batch, BLOCK_BATCH):
        b = first + tl.arange(0, BLOCK_BATCH)
        mask = (b < batch)[:, None] & valid[None, :]
        offsets = b.to(tl.int64)[:, None] * channels + channel[None, :]
        sum_du_xhat = tl.load(sums_ptr + offsets, mask=mask, other=0.0)
        sum_du = tl.load(sums_ptr + batch * channels + offsets, mask=mask, other=0.0)
        one_plus_scale = tl.where(mask, 1.0, 1.0)
        if has_scale:
            one_plus_scale += load_as_fp32(scale_ptr, b[:, None] * scale_batch_stride
                                           + channel[None, :] * scale_channel_stride, mask, scale_dtype, 0.0)
        lane_d_weight += sum_du_xhat * one_plus_scale
        lane_d_bias += sum_du * one_plus_scale
        if need_scale:
            store_from_fp32(d_scale_ptr, b[:, None] * d_scale_batch_stride + channel[None, :] * d_scale_channel_stride,
                            sum_du_xhat * weight[None, :] + sum_du * bias[None, :], mask, scale_dtype)
        if need_shift:
            store_from_fp32(d_shift_ptr, b[:, None] * d_shift_batch_stride + channel[None, :] * d_shift_channel_stride,
                            sum_du, mask, shift_dtype)
    if need_weight:
        store_from_fp32(d_weight_ptr, channel, tl.sum(lane_d_weight, 0), valid, weight_dtype)
    if need_bias:
        store_from_fp32(d_bias_ptr, channel, tl.sum(lane_d_bias, 0), valid, bias_dtype)


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


def vector_aligned(tensors, contiguous_run, strides=()):
    """Whether ALIGN=8 holds: every tensor's data is 16-byte aligned and the contiguous axis is cut in runs of a
    multiple of 8 elements (`contiguous_run`: H*W for NCHW, the channels a program reads per pixel for
    channels_last), and so are `strides` (a gradient's own, see gradient_rows)."""
    return (contiguous_run % VECTOR_ELEMENTS == 0 and all(s % VECTOR_ELEMENTS == 0 for s in strides)
            and all(t.data_ptr() % 16 == 0 for t in tensors))


def gradient_rows(grad, memory_format):
    """(grad, batch_stride, line_stride): the gradient of a norm's output as the backward kernels read it, with
    strides of its own (for tile_offsets).

    grad itself when its elements lie as rows of `memory_format` do, only with a batch stride and (channels_last)
    a pixel stride of its own: a channel slice of a larger tensor, as the gradient the skip `cat` of the Unet's up
    path hands each down-path block's output, which a copy would read and write whole once more. Any other layout
    is copied to `memory_format`."""
    batch, channels, height, width = grad.shape
    batch_stride, channel_stride, height_stride, width_stride = grad.stride()
    if memory_format == torch.channels_last:
        line = width_stride if width > 1 else (height_stride if height > 1 else channels)
        rows = ((channels == 1 or channel_stride == 1) and line >= channels
                and (height == 1 or height_stride == width * line))
    else:
        line = height * width
        rows = ((width == 1 or width_stride == 1) and (height == 1 or height_stride == width)
                and (channels == 1 or channel_stride == line))
    if rows and (batch == 1 or batch_stride >= 0):
        # With one image the batch stride multiplies nothing: the layout's own, so that it matches x's.
        return grad, batch_stride if batch > 1 else row_strides(grad.shape, memory_format)[0], line
    grad = in_memory_format(grad, memory_format)
    return (grad, *row_strides(grad.shape, memory_format))


def empty_output(x, dtype=None, shape=None):
    """A fresh (B, C, H, W) tensor of x's shape (or `shape`) in kernel_memory_format(x): channels_last for a
    channels_last x, so that the convolutions of a channels_last model take the kernels' outputs without a layout
    copy; NCHW otherwise."""
    return torch.empty(x.shape if shape is None else shape, dtype=dtype or x.dtype, device=x.device,
                       memory_format=kernel_memory_format(x))


# Runtime dtype codes of the parameters (load_as_fp32, store_from_fp32).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def parameter_bytes(t):
    """(raw bytes, (strides in elements)) of a parameter tensor for the kernels: a uint8 view of its memory (no
    copy, the kernel reads it through its strides in its own dtype; a copy only when its last dimension is not
    unit-stride, which no parameter or time-MLP output is), or (None, zeros) when t is None."""
    if t is None:
        return None, (0, 0)
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    strides = t.stride() if t.dim() == 2 else (0, t.stride(0))
    return t.view(torch.uint8), strides


def pack_dtype_codes(*tensors):
    """The DTYPE_CODES of `tensors` (None counts as fp32), 2 bits each, first tensor lowest (dtype_code_of)."""
    codes = 0
    for index, t in enumerate(tensors):
        codes |= (0 if t is None else DTYPE_CODES[t.dtype]) << (2 * index)
    return codes


def halves_of_one(scale, shift):
    """The (B, 2C) tensor whose two halves along dim 1 are exactly `scale` and `shift` (views, as
    `time_mlp(t).chunk(2, dim=1)` makes them: their base itself, or a slice of a wider base), or None."""
    if scale is None or shift is None or torch.compiler.is_compiling():
        # Dynamo cannot trace storage offsets; a compiled graph takes the halves apart and fuses their gradients' cat.
        return None
    base = scale._base
    if base is None or shift._base is not base or base.dim() != 2 or scale.dim() != 2:
        return None
    channels = scale.shape[1]
    column = (scale.storage_offset() - base.storage_offset()) // max(base.stride(1), 1)
    if (base.shape[0] != scale.shape[0] or shift.shape != scale.shape
            or scale.stride() != base.stride() or shift.stride() != base.stride()
            or scale.storage_offset() != base.storage_offset() + column * base.stride(1)
            or shift.storage_offset() != scale.storage_offset() + channels * base.stride(1)
            or column < 0 or column + 2 * channels > base.shape[1]):
        return None
    # Adjacent columns of a wider tensor (several blocks' time MLPs in one GEMM): one (B, 2C) slice of it.
    return base if base.shape[1] == 2 * channels else base.narrow(1, column, 2 * channels)


def split_scale_shift(scale, shift, scale_shift):
    """(scale, shift) views: the halves of scale_shift (B, 2C) when given, else scale and shift themselves."""
    if scale_shift is None:
        return scale, shift
    return scale_shift.chunk(2, dim=1)


def parameter_grads(partial_sums, weight, bias, scale, shift, scale_shift, needs):
    """The parameter gradients from per-(batch, partial, channel) sums, in one launch of _parameter_grads_kernel
    (two when there are several partials per batch).

    partial_sums: (2, B, P, C) fp32 contiguous, the sums of du * xhat, then of du. weight, bias: (C,) or None;
    scale, shift: (B, C) or None; scale_shift: (B, 2C) or None (then scale, shift are None and its two halves are
    meant). needs: which of (weight, bias, scale, shift, scale_shift) want a gradient. Returns (d_weight, d_bias,
    d_scale, d_shift, d_scale_shift), each in its parameter's dtype, None where not wanted.
    """
    need_weight, need_bias, need_scale, need_shift, need_scale_shift = needs
    if not any(needs):
        return None, None, None, None, None
    _, batch, partials, channels = partial_sums.shape
    device = partial_sums.device
    # Several partials per (batch, channel) (RMSNorm's, one per block of pixels: 256 at 128x128) are summed by one
    # ATen reduction, deterministic and spread over the whole GPU; the kernel's programs, one per 32 channels,
    # walked them in sequence (B * P / 16 dependent steps, 512 at 128x128, batch 32).
    sums = partial_sums.sum(dim=2) if partials > 1 else partial_sums[:, :, 0]
    scale, shift = split_scale_shift(scale, shift, scale_shift)
    d_weight = torch.empty(channels, device=device, dtype=weight.dtype) if need_weight else None
    d_bias = torch.empty(channels, device=device, dtype=bias.dtype) if need_bias else None
    d_scale_shift = torch.empty(batch, 2 * channels, device=device, dtype=scale_shift.dtype) \
        if need_scale_shift else None
    if d_scale_shift is not None:
        d_scale, d_shift = d_scale_shift.chunk(2, dim=1)
    else:
        d_scale = torch.empty(batch, channels, device=device, dtype=scale.dtype) if need_scale else None
        d_shift = torch.empty(batch, channels, device=device, dtype=shift.dtype) if need_shift else None
    absent = sums.view(torch.uint8)  # the pointer passed for what is absent or not wanted; never used
    views = [parameter_bytes(t) for t in (weight, bias, scale, d_weight, d_bias, d_scale, d_shift)]
    _parameter_grads_kernel[(triton.cdiv(channels, PARAMETER_GRADS_BLOCK_CHANNELS),)](
        sums, *(absent if view is None else view for view, _ in views),
        *views[2][1], *views[5][1], *views[6][1],
        batch, channels, pack_dtype_codes(weight, bias, scale, shift),
        *runtime_flags(weight is not None, bias is not None, scale is not None,
                       d_weight is not None, d_bias is not None, d_scale is not None, d_shift is not None),
        BLOCK_BATCH=PARAMETER_GRADS_BLOCK_BATCH, BLOCK_CHANNELS=PARAMETER_GRADS_BLOCK_CHANNELS, num_warps=4)
    if d_scale_shift is not None:
        return d_weight, d_bias, None, None, d_scale_shift
    return d_weight, d_bias, d_scale, d_shift, None


# The parameter-gradient kernel's [batch, channels] fp32 tiles, 8 per thread of 4 warps: a batch of up to 32 in one
# step, so that its few programs (C / 32) each wait on one round of loads, not one per image.
PARAMETER_GRADS_BLOCK_BATCH = 32
PARAMETER_GRADS_BLOCK_CHANNELS = 32


def parameter_grads_compile_configs():
    """(kernel, signature, constexprs, options, attrs) of _parameter_grads_kernel: the only configuration (its
    parameter dtypes are runtime values), with the 16-divisibility a Unet launch gets (aligned pointers, channel
    counts and strides multiples of 16)."""
    kernel = _parameter_grads_kernel
    constexprs = dict(BLOCK_BATCH=PARAMETER_GRADS_BLOCK_BATCH, BLOCK_CHANNELS=PARAMETER_GRADS_BLOCK_CHANNELS)
    flags = ("has_weight", "has_bias", "has_scale", "need_weight", "need_bias", "need_scale", "need_shift")
    signature = compile_signature(kernel, constexprs, torch.float32, (), flags, floats=())
    yield kernel, signature, constexprs, dict(num_warps=4), divisibility_attrs(
        kernel, signature, ("scale_batch_stride", "d_scale_batch_stride", "d_shift_batch_stride", "channels"))


def parameter_arguments(absent, vectors, matrices):
    """Kernel arguments for (C,) `vectors` and (B, C) `matrices` of any float dtype, each possibly None: (pointers,
    strides, dtype_codes): the raw-byte views (parameter_bytes; for None a 16-byte allocation on `absent`'s device,
    never read), vectors
    first; the (batch, channel) element strides of each matrix; pack_dtype_codes of all, in the same order."""
    parameters = (*vectors, *matrices)
    views = [parameter_bytes(t) for t in parameters]
    if any(view is None for view, _ in views):
        absent = torch.empty(16, dtype=torch.uint8, device=absent.device)
    pointers = [absent if view is None else view for view, _ in views]
    strides = [stride for _, pair in views[len(vectors):] for stride in pair]
    return pointers, strides, pack_dtype_codes(*parameters)


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


# Pointer arguments that carry parameters as raw bytes (parameter_bytes) in every kernel of the fused norms.
PARAMETER_POINTERS = {"weight_ptr", "bias_ptr", "g_ptr", "scale_ptr", "shift_ptr", "d_weight_ptr", "d_bias_ptr",
                      "d_scale_ptr", "d_shift_ptr"}


def divisibility_attrs(kernel, signature, divisible_ints):
    """Triton's `attrs` (tests/gpu_compile.py) for a launch whose pointers are all 16-byte aligned and whose
    `divisible_ints` are multiples of 16, as Triton's launch specializes them: {(index,): [["tt.divisibility", 16]]}."""
    return {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names)
            if signature[name] != "constexpr" and (signature[name].startswith("*") or name in divisible_ints)}


# What a launch in the Unet's layout specializes (C a multiple of 16, H*W too from 4x4 maps up, scale/shift the
# unit-stride halves of a (B, 2C) tensor): these integers are multiples of 16 (tt.divisibility) ...
UNET_DIVISIBLE_INTS = ("batch_stride", "line_stride", "grad_batch_stride", "grad_line_stride", "scale_batch_stride",
                       "shift_batch_stride", "channels", "pixels")
# ... and these equal 1, which Triton turns into constants.
UNET_UNIT_STRIDES = ("scale_channel_stride", "shift_channel_stride")


def unet_launch_specialization(kernel, signature, constexprs):
    """(signature, constexprs, attrs) of an aligned-tile configuration as a Unet launch compiles it: every pointer
    16-byte aligned and UNET_DIVISIBLE_INTS multiples of 16 (attrs), UNET_UNIT_STRIDES constants 1."""
    signature, constexprs = dict(signature), dict(constexprs)
    for name in UNET_UNIT_STRIDES:
        if name in signature:
            signature[name], constexprs[name] = "constexpr", 1
    return signature, constexprs, divisibility_attrs(kernel, signature, UNET_DIVISIBLE_INTS)


def compile_signature(kernel, constexprs, x_dtype, x_pointers, flags, floats=("eps",)):
    """The `signature` of triton.compiler.ASTSource for one kernel of the fused norms.

    x_pointers: pointer arguments in the input dtype `x_dtype`; PARAMETER_POINTERS are raw bytes (u8); every other
    pointer is fp32. flags: runtime bool
    arguments (runtime_flags); floats: fp32 scalars; constexprs: the constexpr values. Every other argument is an i32 (strides
    and sizes; Triton would pick i64 for values of 2**31 and more, and the same code compiles).
    """
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in PARAMETER_POINTERS:
            signature[name] = "*u8"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (TRITON_DTYPE_NAMES[x_dtype] if name in x_pointers else "fp32")
        elif name in flags:
            signature[name] = "u1"  # bools on the GPU, see runtime_flags
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature
