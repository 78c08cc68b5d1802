"""bench/kernel_count.py counts what a GPU would launch: computing ATen ops and Triton launches, not views,
allocations, no-op casts or the interpreter's own copies."""

import torch
import triton
import triton.language as tl
from kernel_count import count_gpu_kernels


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1.0, mask=mask)


def test_views_allocations_and_no_op_casts_launch_nothing():
    x = torch.randn(4, 6)

    def step():
        x.view(6, 4).t().chunk(2)
        torch.empty(10)
        torch.empty_like(x)
        x.to(torch.float32)
        x.contiguous()
        torch.nn.functional.dropout(x, p=0.0, training=True)

    assert count_gpu_kernels(step).total == 0


def test_each_computing_op_is_one_kernel_however_it_dispatches():
    x, w = torch.randn(4, 6), torch.randn(3, 6)

    counted = count_gpu_kernels(lambda: (torch.nn.functional.linear(x, w), x.to(torch.bfloat16), x + 1, torch.zeros(3)))
    assert counted.total == 4, counted.by_name
    assert counted.by_name["aten::linear"] == 1 and counted.by_name["aten::to"] == 1


def test_a_triton_launch_is_one_kernel_and_hides_the_interpreters_copies():
    x = torch.zeros(8)
    counted = count_gpu_kernels(lambda: _add_one_kernel[(1,)](x, 8, BLOCK=8))
    assert counted.by_name == {"triton::_add_one_kernel": 1}, counted.by_name
    assert torch.equal(x, torch.ones(8))


def test_the_backward_pass_is_counted():
    x = torch.randn(5, requires_grad=True)

    def step():
        (x * 2).sum().backward()

    counted = count_gpu_kernels(step)
    # forward: mul, sum; backward: the ones seed, sum's expand (a view), mul's gradient, accumulation into x.grad
    # (the first one stores the tensor: no kernel).
    assert 4 <= counted.total <= 5, counted.by_name
    assert counted.by_name["aten::mul"] == 2, counted.by_name


def test_dropout_counts_only_when_it_drops():
    x = torch.randn(4, 6)
    assert count_gpu_kernels(lambda: torch.nn.functional.dropout(x, p=0.5, training=True)).total == 1
    assert count_gpu_kernels(lambda: torch.nn.functional.dropout(x, p=0.5, training=False)).total == 0


def test_checkpoint_recomputation_counts_only_what_it_computes():
    # A selective-checkpoint region that keeps both convolutions' outputs recomputes only the relu between them:
    # its recomputation's convolution calls are answered from the cache (the first) or stopped once they have
    # saved their inputs (the last), and launch nothing. A region that keeps nothing recomputes the first
    # convolution too.
    from fastunet.recompute import keep_only_convolutions

    torch.manual_seed(0)
    first, second = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)

    def region(x):
        return second(torch.relu(first(x)))

    def counted(kept):
        for p in (x, *first.parameters(), *second.parameters()):
            p.grad = None  # so that every run writes its gradients alike, with no accumulation
        run = (lambda: region(x)) if kept == "plain" else (lambda: keep_only_convolutions(region, x, kept=kept))
        return count_gpu_kernels(lambda: run().sum().backward()).by_name

    plain, kept_both, kept_none = counted("plain"), counted((first, second)), counted(None)
    assert (plain["aten::conv2d"], kept_both["aten::conv2d"], kept_none["aten::conv2d"]) == (2, 2, 3)
    assert (plain["aten::relu"], kept_both["aten::relu"], kept_none["aten::relu"]) == (1, 2, 2)
    assert sum(kept_both.values()) == sum(plain.values()) + 1, (plain, kept_both)
