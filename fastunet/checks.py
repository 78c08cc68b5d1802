"""Input checks that run before any computation; each error names what was expected and what came."""

import torch

# What the Triton kernels take. The reference path also takes float64 (a `model.double()`, e.g. for gradcheck).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (*FLOAT_DTYPES, torch.float64)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def describe(t):
    """'(2, 3, 8, 8) float32 on cpu' for a tensor, the type name for anything else."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {dtype_name(t.dtype)} on {t.device}"


def check_tensor(where, name, t, shape=None, ndim=None, dtypes=REFERENCE_DTYPES, nonempty=False):
    """Raise TypeError/ValueError unless `t` is a tensor of one of `dtypes` with the given ndim and shape.

    shape: a tuple whose None entries match any size. nonempty: every dimension must have at least one element.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{where}: expected {name} of dtype {names}, got {describe(t)}")
    if ndim is None and shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{where}: expected {name} with {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and any(want is not None and want != got for want, got in zip(shape, t.shape)):
        wanted = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{where}: expected {name} of shape {wanted}, got {tuple(t.shape)}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{where}: expected {name} with at least one element in every dimension, got shape "
                         f"{tuple(t.shape)}")


def check_same_device(where, **tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{where}: expected all tensors on one device, got {listing}")


def float64_reason(args):
    """Why the Triton kernels cannot run these op arguments because of float64 (they take fp32/fp16/bf16), or None."""
    names = [f"{tuple(a.shape)} float64" for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.float64]
    if names:
        return (f"the Triton kernels take float32, float16 and bfloat16, got float64 tensors {', '.join(names)}; "
                f"float64 runs on the reference backend")
    return None


def check_finite(where, name, t):
    """Raise ValueError if a floating-point `t` holds NaN or Inf. Reads the values: a host sync on a GPU, so it is
    skipped while torch.compile traces or a CUDA graph is captured (both forbid reading values)."""
    if not t.is_floating_point() or torch.compiler.is_compiling():
        return
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if t.device.type == "meta":
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = t[~finite].flatten()[:4].tolist()
        raise ValueError(f"{where}: expected finite {name}, got {int((~finite).sum())} non-finite of {t.numel()} "
                         f"(e.g. {bad}) in {describe(t)}")


def check_module_input(where, x, parameter, ndim=4):
    """Raise before computing unless `x` can meet `parameter` in a module's forward: a float tensor of `ndim`
    dimensions on the parameter's device, and of its dtype unless autocast is on for that device (then any float
    dtype: autocast casts). Errors name the fix (`module.half()`-style conversions, or torch.autocast)."""
    if not isinstance(x, torch.Tensor) or x.dim() != ndim or not x.is_floating_point():
        raise TypeError(f"{where}: expected a {ndim}-D float tensor, got {describe(x)}")
    if x.device != parameter.device:
        raise ValueError(f"{where}: expected input on the module's device {parameter.device}, got {describe(x)}")
    if x.dtype != parameter.dtype and not torch.is_autocast_enabled(x.device.type):
        got = dtype_name(x.dtype)
        raise TypeError(
            f"{where}: expected input of the module's dtype {dtype_name(parameter.dtype)} outside autocast, got "
            f"{describe(x)}; convert the module (e.g. module.to(torch.{got})) or run it under "
            f"torch.autocast({x.device.type!r}, dtype=torch.{got})"
        )
