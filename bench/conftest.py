import os

import torch

# Without a GPU, kernels can only be exercised through the Triton interpreter; the kernel benchmarks then skip
# (interpreted timings mean nothing) and only the whole-Unet reference-path benchmarks run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
