"""Choosing between launch candidates by timing them once on the GPU.

Some choices the compiled code cannot settle: bench/static_report.py reads each candidate's registers, instructions
and modelled bytes, and where they trade one against another (a larger tile against fewer programs per SM, fewer
bytes from HBM against fewer busy SMs) only the GPU at hand can say which is faster. The first call with a new key
times each candidate with triton.testing.do_bench and keeps the fastest for the life of the process.

Timing reruns the launch, so a candidate's kernels may only write their outputs. Candidates either compute the same
bits (GroupNorm's program counts: each pack is computed by one program whatever their number), and then the choice
changes the speed only; or they agree only to rounding (attention's tiles sum in other orders), and then the results
depend on which won the timing, which may differ between two processes, as with cuDNN's benchmark mode: under
torch.use_deterministic_algorithms(True) such choices are not timed and take the first candidate. Nothing is timed
under the Triton interpreter, while a CUDA graph is captured or while torch.compile traces: an untimed key then
takes the first candidate (the table's or the planner's), and is timed at its first call outside those.
"""

import torch

from . import INTERPRETING

# key -> the fastest candidate, once timed.
_FASTEST = {}
# triton.testing.do_bench's warm-up and measuring time, ms: a few runs of each candidate, once per key.
WARMUP_MS, MEASURE_MS = 5, 20


def can_time():
    """Whether a launch may be timed now: on the GPU, outside CUDA-graph capture and torch.compile tracing."""
    return not INTERPRETING and not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling()


def fastest(key, candidates, launch, same_bits):
    """The candidate whose `launch(candidate)` runs fastest, timed the first time `key` comes (when can_time());
    `candidates[0]` until then. `key` must name everything the ranking depends on (device, shapes, dtypes).
    same_bits: whether every candidate computes bitwise the same results; if not, deterministic algorithms
    (torch.use_deterministic_algorithms) always get `candidates[0]`."""
    if len(candidates) == 1 or (not same_bits and torch.are_deterministic_algorithms_enabled()):
        return candidates[0]
    if key not in _FASTEST:
        if not can_time():
            return candidates[0]
        from triton.testing import do_bench

        try:
            _FASTEST[key] = min(candidates,
                                key=lambda c: do_bench(lambda: launch(c), warmup=WARMUP_MS, rep=MEASURE_MS))
        except torch.cuda.OutOfMemoryError:
            # do_bench flushes L2 through a 256 MB buffer of its own, which a nearly full GPU may not have: keep the
            # first candidate, as if untimed, rather than fail the call.
            _FASTEST[key] = candidates[0]
    return _FASTEST[key]
