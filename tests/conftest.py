import os

import torch

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
