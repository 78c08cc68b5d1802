"""Recomputation in the backward: a layer keeps the outputs of some of its convolutions, recomputes the rest.

fastunet.Unet's checkpointing modes are built from two tools:
- `recompute_when_saved` marks an op's output with its recipe (the op and its inputs), and while
  `saving_recipes()` is active a backward that would keep the output keeps the recipe instead, recomputing the
  output when it needs it. Used where the inputs are kept anyway (a norm's input, an attention core's q/k/v): the
  recipe then costs no memory. It adds no work to the forward, only a pack hook per saved tensor, and so it is
  the default mode's tool in eager execution.
- `keep_only_convolutions` runs a region of a layer's forward as a selective-checkpoint region
  (torch.utils.checkpoint): its inputs and chosen convolution outputs are kept, every other op inside it is run
  again in the backward. It dispatches every op of the region through Python in the forward and again in the
  backward (tens of microseconds each), so it serves the opt-in modes, and torch.compile, which traces the
  region once and recomputes inside its graph instead.
A recomputed op runs the same deterministic kernel on the same inputs, on the backend and under the autocast
state of the forward, so values and gradients are those of keeping everything, exactly.

Which outputs a region keeps follows the ops' costs: a convolution is compute-bound and costly to redo, while
the ops between convolutions are memory-bound (one read and one write of the activation) or, for attention,
small beside the convolutions at the sizes where the Unet uses it.
"""

import contextlib
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from fastunet.backend import requested_backend, use_backend

_CONVOLUTION = torch.ops.aten.convolution.default


def _keep_convolutions(weight_shapes, ctx, op, *args, **kwargs):
    # The policy sees ATen ops, not modules: a kept convolution is told apart by its weight's shape, which is
    # unique among a region's convolutions (checked in keep_only_convolutions). args[1] is the weight.
    if op is _CONVOLUTION and tuple(args[1].shape) in weight_shapes:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def keep_only_convolutions(function, *args, kept, others=(), random=False, **kwargs):
    """function(*args, **kwargs), keeping for the backward its inputs and the outputs of the convolutions `kept`
    (nn.Conv2d modules called inside it); every other op inside is recomputed in the backward. kept=None keeps
    nothing inside: the whole region is recomputed.

    others: the region's other convolutions (recomputed), named so that a kept one is never confused with one of
    them. random: whether function draws random numbers (active dropout); their generator state is then replayed
    in the recomputation. The recomputation runs the fused ops on the backend that was in force in the forward,
    wherever the backward is called. Without gradients, function(*args, **kwargs) as it is.
    """
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    context = noop_context_fn
    if kept is not None:
        shapes = frozenset(tuple(conv.weight.shape) for conv in kept)
        if any(tuple(conv.weight.shape) in shapes for conv in others):
            raise ValueError("keep_only_convolutions: a recomputed convolution has the weight shape of a kept one")
        context = partial(create_selective_checkpoint_contexts, partial(_keep_convolutions, shapes))
    if not torch.compiler.is_compiling():
        # Eager recomputation calls function again from the backward, where another use_backend() (or none) may
        # be in force. A compiled graph recomputes its own traced ops instead.
        function = partial(_on_backend, requested_backend(), function)
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=random, context_fn=context, **kwargs)


def _on_backend(name, function, *args, **kwargs):
    with use_backend(name):
        return function(*args, **kwargs)


def draws_random_numbers(module):
    """Whether module's forward, in its current train/eval mode, draws random numbers: an active nn.Dropout, or
    an attention core's flash `dropout` rate (fastunet.attention.Attend)."""
    if not module.training:
        return False
    return any((isinstance(m, nn.Dropout) and m.p > 0) or _positive_rate(getattr(m, "dropout", None))
               for m in module.modules())


def _positive_rate(value):
    return isinstance(value, (int, float)) and value > 0


# The attribute of a tensor that holds its _Recipe, set by recompute_when_saved.
_RECIPE = "_fastunet_recipe"


class _Recipe:
    """function(*args) as the forward computed it: on `backend`, under autocast state `autocast` of device_type."""

    __slots__ = ("function", "args", "backend", "device_type", "autocast")

    def __init__(self, function, args, device_type):
        self.function, self.args, self.device_type = function, args, device_type
        self.backend = requested_backend()
        self.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def recompute(self):
        # Without a graph: autograd gives the unpacked tensor the saved one's place in the graph, so a backward
        # that builds a graph itself (create_graph=True) still reaches the recipe's inputs through it.
        enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(self.device_type, dtype, enabled=enabled):
            return _on_backend(self.backend, self.function, *self.args)


def recompute_when_saved(tensor, function, *args):
    """Mark tensor, just computed as function(*args) (deterministic, no random numbers), so that a backward that
    saves it under saving_recipes() recomputes it instead. args are held until then: give only tensors the
    backward keeps anyway. No effect without gradients or under torch.compile. Returns tensor."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        setattr(tensor, _RECIPE, _Recipe(function, args, tensor.device.type))
    return tensor


def saving_recipes(enabled=True):
    """A context in which every tensor saved for the backward that carries a recipe (recompute_when_saved) is saved
    as its recipe. Tensors without one go to the saved-tensor hooks already in force (e.g. the user's
    torch.autograd.graph.save_on_cpu), or are kept as they are. A no-op when not enabled, without gradients or
    under torch.compile."""
    if not enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    outer = _hooks_in_force()
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def pack(saved):
        recipe = getattr(saved, _RECIPE, None)
        if recipe is not None:
            return recipe
        return saved if outer_pack is None else (outer_pack(saved),)

    def unpack(packed):
        if isinstance(packed, _Recipe):
            return packed.recompute()
        return packed if outer_unpack is None else outer_unpack(packed[0])

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _hooks_in_force():
    """The (pack, unpack) saved-tensor hooks in force, or None. A private torch function whose argument (whether
    to look past Dynamo's tracing) is recent; older torch takes none."""
    top = torch._C._autograd._top_saved_tensors_default_hooks
    try:
        return top(False)
    except TypeError:
        return top()
