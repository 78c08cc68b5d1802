"""How many GPU kernels a piece of code launches, counted on any machine (no GPU needed) with torch.profiler.

The count is what a GPU run of the same code would launch, one kernel for each of:
- every Triton launch (`kernel[grid](...)`), compiled or interpreted;
- every outermost ATen op that computes something: an op called from Python, from autograd's engine or from a
  custom op's implementation, not from inside another ATen op. Composite ops (`aten::linear`, `aten::to`) count
  once however many ops they dispatch to, as the one kernel (a GEMM, a cast) they launch on a GPU.
Left out, because they launch nothing on a GPU: views and metadata changes (`view`, `chunk`, `as_strided`,
`set_`, ...), plain allocations (`empty`, `empty_like`, ...), ops that turn out to be no-ops (an `aten::to` to the
dtype a tensor already has, `contiguous` on a contiguous tensor: no computing op beneath them), ops that selective
activation checkpointing's recomputation answers from the outputs it kept (a kept convolution called again in the
backward), and everything the Triton interpreter does inside a launch (its copies of each argument to and from
numpy).

A convolution counts as one kernel although cuDNN may split it; a fused optimizer step counts once per
`_foreach_*` op. So the count is a lower bound on what a GPU profiler sees, comparable between implementations.

    from kernel_count import count_gpu_kernels      # bench/ is on sys.path in bench/ and tests/ runs
    counted = count_gpu_kernels(lambda: model(x, t).sum().backward())
    counted.total, counted.by_name.most_common(5)
"""

import collections
import contextlib
import dataclasses

import torch
from torch.profiler import ProfilerActivity, profile, record_function

TRITON_PREFIX = "triton::"
# Marks an op that selective checkpointing's recomputation answered from its cache (_cached_recomputations).
CACHED = "checkpoint::cached"

# ATen ops that compute nothing on a GPU unless an op beneath them does: views, metadata, allocations and
# conditional copies. Every other ATen op is a kernel.
NON_KERNEL_OPS = frozenset("aten::" + name for name in (
    # views and metadata
    "alias", "as_strided", "chunk", "detach", "detach_", "diagonal", "expand", "expand_as", "flatten", "lift_fresh",
    "movedim", "narrow", "permute", "reshape", "_reshape_alias", "resolve_conj", "resolve_neg", "select", "slice",
    "split", "split_with_sizes", "squeeze", "squeeze_", "t", "transpose", "unbind", "unflatten", "unfold",
    "unsqueeze", "unsqueeze_", "view", "view_as", "_unsafe_view", "set_", "resize_", "as_strided_",
    "_has_compatible_shallow_copy_type", "is_same_size", "result_type", "size", "stride", "dim", "numel",
    # allocations without initialization
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    # copies that only happen when needed (a no-op when nothing beneath them computes)
    "to", "_to_copy", "contiguous", "type_as", "reshape_as",
    # dropout returns its input when p == 0 or in eval mode; otherwise the mask ops beneath it compute
    "dropout",
))


@dataclasses.dataclass
class KernelCount:
    """total: GPU kernels counted; by_name: how many of each (Triton kernels as 'triton::<function name>')."""

    total: int
    by_name: collections.Counter

    def summary(self, top=8):
        """One line: the total and the most frequent kernels."""
        common = ", ".join(f"{name.removeprefix('aten::')} x{n}" for name, n in self.by_name.most_common(top))
        return f"{self.total} GPU kernels ({common})"


@contextlib.contextmanager
def _named_triton_launches():
    """Wrap every Triton launch in a profiler range 'triton::<kernel>', so it is seen as one event and the
    interpreter's own tensor operations nest inside it."""
    import triton.runtime.jit as jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    originals = {cls: cls.run for cls in classes}

    def wrap(original):
        def run(self, *args, **kwargs):
            name = getattr(getattr(self, "fn", None), "__name__", None) or getattr(self, "__name__", "kernel")
            with record_function(TRITON_PREFIX + str(name)):
                return original(self, *args, **kwargs)
        return run

    for cls, original in originals.items():
        cls.run = wrap(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.run = original


@contextlib.contextmanager
def _cached_recomputations():
    """Mark in the profile every op output that a selective-checkpoint recomputation takes from its cache instead
    of computing it: torch.utils.checkpoint returns each such output through _VersionWrapper.get_val (a private
    class; without it, nothing is marked and those ops count as kernels)."""
    wrapper = getattr(torch.utils.checkpoint, "_VersionWrapper", None)
    original = getattr(wrapper, "get_val", None)
    if original is None:
        yield
        return

    def get_val(self, *args, **kwargs):
        with record_function(CACHED):
            return original(self, *args, **kwargs)

    wrapper.get_val = get_val
    try:
        yield
    finally:
        wrapper.get_val = original


def _answered_by_checkpoint(event):
    """Whether checkpointing answered (part of) an ATen op without computing it: from its cache (a CACHED mark
    beneath), or by stopping the recomputation once the op had saved its inputs (nothing but detaches beneath:
    the early stop of torch.utils.checkpoint, at a region's last op)."""
    children = event.cpu_children
    if event.name == CACHED:
        return True
    if event.name.startswith("aten::") and children and all(child.name == "aten::detach" for child in children):
        return True
    return any(_answered_by_checkpoint(child) for child in children
               if child.name.startswith("aten::") or child.name in (CACHED, "PythonDispatchMode"))


def _computes(event):
    """Whether an ATen event launches a kernel: an op outside NON_KERNEL_OPS (`aten::mm` computes itself, beside
    the metadata ops it calls), or one inside it with a computing op or a Triton launch beneath it."""
    if event.name.startswith(TRITON_PREFIX) or event.name not in NON_KERNEL_OPS:
        return True
    return any(_computes(child) for child in event.cpu_children
               if child.name.startswith("aten::") or child.name.startswith(TRITON_PREFIX))


def _count(event, counter):
    if event.name.startswith(TRITON_PREFIX):
        counter[event.name] += 1
    elif event.name.startswith("aten::") and not _answered_by_checkpoint(event):
        if _computes(event):
            counter[event.name] += 1
    elif event.name != CACHED:
        # Python ranges, autograd engine nodes, custom ops: their ATen ops and launches are the kernels. So are
        # those beneath an op answered from the checkpoint cache (autocast's casts of a kept convolution's inputs).
        for child in event.cpu_children:
            _count(child, counter)


def count_gpu_kernels(fn, *args, **kwargs):
    """Run fn(*args, **kwargs) once under the profiler and count the GPU kernels it launches (see the module
    docstring). Returns a KernelCount; fn's result is discarded."""
    with _named_triton_launches(), _cached_recomputations(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)
    counter = collections.Counter()
    for event in prof.events():
        if event.cpu_parent is None:
            _count(event, counter)
    return KernelCount(sum(counter.values()), counter)


def count_layer_step(layer, x, grad_output):
    """GPU kernels of one forward+backward of an attention layer as the Unet calls it: `layer(x, residual=x)` under
    bf16 autocast on x's device, then backward of grad_output, on fastunet's Triton backend. Returns a KernelCount."""
    import fastunet

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = layer(x, residual=x)
        out.backward(grad_output)

    with fastunet.use_backend("triton"):
        return count_gpu_kernels(step)


def main():
    """Print the kernels of one bf16-autocast GroupNorm+scale/shift+SiLU forward+backward as a ResnetBlock calls it."""
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import fastunet

    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    weight, bias = torch.ones(32, requires_grad=True), torch.zeros(32, requires_grad=True)
    time_mlp_out = torch.randn(2, 64, requires_grad=True)

    def step():
        scale, shift = time_mlp_out.bfloat16().chunk(2, dim=1)
        y = fastunet.functional.group_norm_act(x.bfloat16(), weight, bias, 8, scale, shift)
        y.backward(torch.ones_like(y))

    with fastunet.use_backend("triton"):
        print(count_gpu_kernels(step).summary(top=20))


if __name__ == "__main__":
    main()
