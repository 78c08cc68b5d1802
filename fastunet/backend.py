"""Which implementation runs the fused ops: Triton kernels or the pure-PyTorch reference.

Selection, strongest first: the innermost `use_backend(name)` context (per thread), then the environment
variable `FASTUNET_BACKEND` as it was when fastunet was imported, then "auto". Names:
- "auto": Triton for CUDA tensors, and for CPU tensors when the Triton interpreter is on
  (`TRITON_INTERPRET=1` when fastunet was imported); the reference otherwise.
- "triton": always Triton; a tensor Triton cannot run on is an error, never a silent fallback.
- "reference": always the pure-PyTorch reference.

torch.compile: everything here traces without a graph break. Dynamo reads the thread-local stack of
use_backend() and guards on it, so a compiled model recompiles (never silently reuses a graph) when it runs
under another backend. The environment variable is read once, at import, because Dynamo does not guard on
os.environ: a value read inside forward would be baked into the graph.
"""

import contextlib
import importlib.util
import os
import threading

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "FASTUNET_BACKEND"

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when fastunet.kernels is imported, so the
# interpreter state is fixed for the life of the process. Read it once, here, at the same moment.
TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

_state = threading.local()


def _check_name(name, origin):
    if name not in BACKENDS:
        raise ValueError(f"{origin}: expected one of {BACKENDS}, got {name!r}")
    return name


# A bad value fails `import fastunet`, naming the variable, rather than the first forward.
ENVIRONMENT_BACKEND = _check_name(os.environ.get(ENV_VAR, "auto").strip().lower(), f"${ENV_VAR}")


def requested_backend():
    """The backend name in force: the innermost use_backend(), else $FASTUNET_BACKEND at import, else "auto"."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return ENVIRONMENT_BACKEND


@contextlib.contextmanager
def use_backend(name):
    """Run the fused ops of the enclosed code on backend `name` ("auto", "triton" or "reference")."""
    _check_name(name, "use_backend")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def triton_can_run_on(device):
    """Whether Triton kernels can execute on tensors of this torch.device, and if not, why."""
    if not TRITON_INSTALLED:
        return False, "the triton package is not installed"
    if device.type == "cuda":
        if TRITON_INTERPRETING:
            return False, "TRITON_INTERPRET=1 was set when fastunet was imported, so kernels run on CPU only"
        return True, ""
    if device.type == "cpu":
        if TRITON_INTERPRETING:
            return True, ""
        return False, "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing fastunet)"
    return False, f"Triton kernels run on CUDA devices, not {device.type}"


def use_triton(op_name, device):
    """Resolve the backend for one call of `op_name` on `device`: True for Triton, False for the reference."""
    name = requested_backend()
    if name == "reference":
        return False
    can_run, why = triton_can_run_on(device)
    if name == "auto":
        return can_run
    if not can_run:
        raise RuntimeError(f"fastunet backend 'triton' was requested for {op_name} on a {device} tensor, but {why}")
    return True
