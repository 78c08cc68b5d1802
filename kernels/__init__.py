"""Triton kernels of fastunet, installed as `fastunet.kernels` (the folder is top-level `kernels/` in the repo).

Each module implements one fused op of fastunet.functional with the same name and arguments as its
reference in fastunet.reference, as torch.library custom ops with fake and autograd registrations, and
exposes `gpu_compile_configs()`: every (kernel, signature, constexprs, options[, attrs]) a GPU run can select
(optionally per `arch`), so that tests compile all of them ahead of time without a GPU for sm_80, sm_86, sm_89,
sm_90 and sm_120; see tests/gpu_compile.py.
"""

import os

# Triton decides between the interpreter and the compiler when a kernel is decorated, i.e. at import.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
