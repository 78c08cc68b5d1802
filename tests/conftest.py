import os
import pathlib
import sys

import torch

# The GPU-kernel counter lives with the benchmarks (bench/kernel_count.py); tests assert the same counts.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))

# Without a GPU the kernels run on CPU tensors through the Triton interpreter. Triton reads the variable when a
# kernel is decorated, so it must be set before fastunet.kernels is imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


import pytest  # noqa: E402


@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else the CPU through the interpreter."""
    return DEVICE
