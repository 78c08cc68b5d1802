"""torch.compile(fastunet.Unet, fullgraph=True) on every backend: one graph, no graph break, same numbers as eager.

fullgraph=True turns any graph break into an error, and a counting Dynamo backend checks that exactly one graph
was captured. On CPU the graph is run by "aot_eager" (AOTAutograd traces forward and backward through the
custom ops' fake and autograd registrations, then runs them eagerly; the kernels run under the interpreter);
on CUDA by inductor as well. mode="reduce-overhead" (CUDA graphs) is CUDA-only.
"""

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import fastunet
from tolerances import assert_close

CONFIG = dict(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=16, resnet_block_groups=4)
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (reduce-overhead) need a CUDA GPU")


class CountingBackend:
    """A Dynamo backend that keeps every graph it is given and runs it with `inner` ("aot_eager", "inductor")."""

    def __init__(self, inner="aot_eager"):
        self.inner = lookup_backend(inner)
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return self.inner(graph_module, example_inputs)

    def fastunet_ops(self):
        """Names of the fastunet custom ops called in the captured graphs (none on the reference backend)."""
        return sorted({str(node.target) for graph in self.graphs for node in graph.graph.nodes
                       if "fastunet" in str(node.target)})


def build(block_norm, device):
    torch.manual_seed(0)
    model = fastunet.Unet(**CONFIG, block_norm=block_norm).to(device)
    return model, torch.randn(2, 3, 8, 8, device=device), torch.tensor([10, 700], device=device)


def forward_backward(model, x, time, net=None):
    """Output and parameter gradients of one forward+backward of `net` (default `model`, or its compiled
    wrapper, which shares model's parameters)."""
    model.zero_grad(set_to_none=True)
    out = (model if net is None else net)(x, time)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def compare(eager, compiled, what):
    (out, grads), (compiled_out, compiled_grads) = eager, compiled
    # Same ops in the same order; only AOTAutograd's regrouping of the backward can change fp32 summation order.
    assert_close(compiled_out, out, what=f"{what} output", atol=1e-5, rtol=1e-4)
    for name, grad in grads.items():
        assert_close(compiled_grads[name], grad, what=f"{what} grad {name}",
                     atol=1e-5 * max(1.0, grad.abs().max().item()), rtol=1e-4)


# GroupNorm blocks: the fused norm with the time scale/shift, plus both attentions and the RMS pre-norms; the
# RMS block norm's capture is covered (forward) by the backend-switch test below, to keep CI short.
@pytest.mark.parametrize("backend, block_norm", [("reference", "group"), ("triton", "group")])
def test_fullgraph_one_graph_matches_eager(backend, block_norm, device):
    torch._dynamo.reset()
    model, x, time = build(block_norm, device)
    # The reference path is plain torch ops: Dynamo's capture is what is tested, and "eager" runs it quickly.
    # The Triton path also goes through AOTAutograd, which needs each custom op's fake and autograd registrations.
    counter = CountingBackend("aot_eager" if backend == "triton" else "eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with fastunet.use_backend(backend):
        eager = forward_backward(model, x, time)
        result = forward_backward(model, x, time, compiled)
    assert len(counter.graphs) == 1, f"{backend}: expected one graph, Dynamo captured {len(counter.graphs)}"
    ops = counter.fastunet_ops()
    if backend == "triton":
        assert len(ops) >= 2, f"triton backend: expected the fused ops' custom ops in the graph, found {ops}"
    else:
        assert not ops, f"reference backend: expected no fastunet custom op in the graph, found {ops}"
    compare(eager, result, f"{backend} {block_norm}")


def test_backend_switch_recompiles_instead_of_reusing_the_graph(device):
    """Dynamo guards on the use_backend() stack: a model compiled under one backend, then run under the other,
    gets a second graph that calls the other implementation (not the stale first graph)."""
    torch._dynamo.reset()
    model, x, time = build("rms", device)
    counter = CountingBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        with fastunet.use_backend("reference"):
            reference_out = compiled(x, time)
        assert len(counter.graphs) == 1 and not counter.fastunet_ops()
        with fastunet.use_backend("triton"):
            triton_out = compiled(x, time)
    assert len(counter.graphs) == 2, f"expected a recompile on the backend switch, got {len(counter.graphs)} graphs"
    assert counter.fastunet_ops(), "the graph compiled under use_backend('triton') calls no fastunet kernel"
    assert_close(triton_out, reference_out, what="triton vs reference after the switch", atol=2e-3, rtol=2e-3)


@CUDA_ONLY
@pytest.mark.parametrize("block_norm", ["group", "rms"])
def test_inductor_matches_eager_on_cuda(block_norm):
    torch._dynamo.reset()
    model, x, time = build(block_norm, "cuda")
    eager = forward_backward(model, x, time)
    counter = CountingBackend("inductor")
    result = forward_backward(model, x, time, torch.compile(model, backend=counter, fullgraph=True))
    assert len(counter.graphs) == 1 and counter.fastunet_ops()
    # Inductor fuses the convolutions' neighbours and may reassociate fp32 sums; TF32 is off by default.
    assert_close(result[0], eager[0], what=f"inductor {block_norm} output", atol=1e-4, rtol=1e-3)


@CUDA_ONLY
@pytest.mark.parametrize("block_norm", ["group", "rms"])
def test_cuda_graphs_training_and_sampling_steps(block_norm):
    """mode="reduce-overhead": a training step (forward, backward, AdamW under bf16 autocast) and a sampling step
    (no grad) replay as CUDA graphs and give eager's numbers."""
    torch._dynamo.reset()
    model, x, time = build(block_norm, "cuda")
    compiled_model = fastunet.Unet(**CONFIG, block_norm=block_norm).cuda()
    compiled_model.load_state_dict(model.state_dict())
    compiled = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)

    def train_step(net, optimizer):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(x, time).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()

    eager_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled_optimizer = torch.optim.AdamW(compiled_model.parameters(), lr=1e-3)
    for step in range(3):  # the first calls record, later ones replay
        expected = train_step(model, eager_optimizer)
        actual = train_step(compiled, compiled_optimizer)
        assert_close(actual, expected, dtype=torch.bfloat16, what=f"{block_norm} training loss, step {step}")
    for name, p in model.named_parameters():
        assert_close(compiled_model.get_parameter(name), p, dtype=torch.bfloat16, what=f"{block_norm} {name}")

    with torch.no_grad():
        expected = model(x, time)
        for _ in range(3):
            actual = compiled(x, time).clone()
    assert_close(actual, expected, what=f"{block_norm} sampling step", atol=1e-4, rtol=1e-3)
