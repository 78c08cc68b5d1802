"""Input checks that run before any computation; each error names what was expected and what came."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(t):
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def check_tensor(where, name, t, shape=None, ndim=None, dtypes=FLOAT_DTYPES):
    """Raise TypeError/ValueError unless `t` is a tensor of one of `dtypes` with the given ndim and shape.

    shape: a tuple whose None entries match any size.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{where}: expected {name} of dtype {names}, got {describe(t)}")
    if ndim is None and shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{where}: expected {name} with {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and any(want is not None and want != got for want, got in zip(shape, t.shape)):
        wanted = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{where}: expected {name} of shape {wanted}, got {tuple(t.shape)}")


def check_same_device(where, **tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{where}: expected all tensors on one device, got {listing}")
