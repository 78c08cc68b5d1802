"""kernels/tuning.py: candidates timed once per key where timing is possible, the first one otherwise.

Runs on any machine: the GPU is pretended (the interpreter flag off, do_bench replaced by a timer that runs the
launch and returns set times), since what is tested is which candidate is kept and when timing happens.
"""

import pytest
import torch
import triton.testing

from fastunet.kernels import tuning


@pytest.fixture
def pretend_gpu(monkeypatch):
    """A fresh cache, timing allowed, and do_bench replaced: returns (times, timed), the time each candidate
    takes and the candidates timed so far, in order."""
    monkeypatch.setattr(tuning, "_FASTEST", {})
    monkeypatch.setattr(tuning, "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    times, timed = {}, []

    def fake_do_bench(fn, warmup, rep):
        candidate = fn()
        timed.append(candidate)
        return times[candidate]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    return times, timed


def test_fastest_is_timed_once_per_key(pretend_gpu):
    times, timed = pretend_gpu
    times.update(a=3.0, b=1.0, c=2.0)
    launch = lambda candidate: candidate  # noqa: E731
    assert tuning.fastest("key 1", ["a", "b", "c"], launch, same_bits=True) == "b"
    assert timed == ["a", "b", "c"]
    timed.clear()
    assert tuning.fastest("key 1", ["a", "b", "c"], launch, same_bits=True) == "b"
    assert not timed, "a key is timed once"
    times.update(a=0.5)
    assert tuning.fastest("key 2", ["a", "b", "c"], launch, same_bits=True) == "a"
    assert timed == ["a", "b", "c"], "another key is timed on its own"


def test_a_single_candidate_is_never_timed(pretend_gpu):
    _, timed = pretend_gpu
    assert tuning.fastest("key", ["only"], lambda candidate: candidate, same_bits=True) == "only"
    assert not timed


@pytest.mark.parametrize("state", ["capturing", "compiling"])
def test_no_timing_while_capturing_or_compiling(pretend_gpu, monkeypatch, state):
    """A CUDA graph being captured or a torch.compile trace takes the first candidate and leaves the key untimed,
    so that the first call outside them times it."""
    times, timed = pretend_gpu
    times.update(a=2.0, b=1.0)
    launch = lambda candidate: candidate  # noqa: E731
    inside = [True]
    if state == "capturing":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: inside[0])
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: inside[0])
    assert tuning.fastest("key", ["a", "b"], launch, same_bits=True) == "a"
    assert not timed
    inside[0] = False
    assert tuning.fastest("key", ["a", "b"], launch, same_bits=True) == "b"
    assert timed == ["a", "b"]


def test_out_of_memory_while_timing_keeps_the_first_candidate(pretend_gpu, monkeypatch):
    """do_bench's own buffer may not fit a nearly full GPU: the call goes on with the first candidate."""
    def out_of_memory(fn, warmup, rep):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(triton.testing, "do_bench", out_of_memory)
    assert tuning.fastest("key", ["a", "b"], lambda candidate: candidate, same_bits=True) == "a"
    assert tuning._FASTEST["key"] == "a", "kept, not retried at every call"


def test_deterministic_algorithms_take_the_first_candidate_unless_all_give_the_same_bits(pretend_gpu, monkeypatch):
    """Candidates that agree only to rounding (attention's tiles) would make the results depend on which won the
    timing: under torch.use_deterministic_algorithms(True) they are not timed, even where a key was timed before;
    candidates of the same bits still are."""
    times, timed = pretend_gpu
    times.update(a=2.0, b=1.0)
    launch = lambda candidate: candidate  # noqa: E731
    assert tuning.fastest("rounding", ["a", "b"], launch, same_bits=False) == "b"  # timed before the switch
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    timed.clear()
    assert tuning.fastest("rounding", ["a", "b"], launch, same_bits=False) == "a"
    assert tuning.fastest("another", ["a", "b"], launch, same_bits=False) == "a"
    assert not timed
    assert tuning.fastest("same bits", ["a", "b"], launch, same_bits=True) == "b"
    assert timed == ["a", "b"]


def test_the_interpreter_never_times(monkeypatch):
    monkeypatch.setattr(tuning, "_FASTEST", {})
    monkeypatch.setattr(tuning, "INTERPRETING", True)

    def fail(*args, **kwargs):
        raise AssertionError("timed under the interpreter")

    monkeypatch.setattr(triton.testing, "do_bench", fail)
    assert tuning.fastest("key", ["a", "b"], lambda candidate: candidate, same_bits=True) == "a"
    assert not tuning.can_time()
