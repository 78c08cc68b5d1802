import hashlib
import os
import pathlib
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The GPU-kernel counter lives with the benchmarks (bench/kernel_count.py); tests assert the same counts.
sys.path.insert(0, str(ROOT / "bench"))


def _sources_digest():
    digest = hashlib.sha256()
    for path in sorted((ROOT / "fastunet").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# torch.compile's caches (FX graph, AOTAutograd) key a graph on the ops it calls by name, not on a custom op's
# schema or autograd rule (pytorch issues 144344, 187319): after a change to one of fastunet's ops, a backward
# compiled before it would be reused and call the op with its old arguments. Each version of the sources gets its
# own cache (subprocesses of the tests inherit it).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"fastunet-inductor-{_sources_digest()}"))

# Without a GPU the kernels run on CPU tensors through the Triton interpreter. Triton reads the variable when a
# kernel is decorated, so it must be set before fastunet.kernels is imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_patching import skip_redundant_lang_patching

    skip_redundant_lang_patching()  # half the time of an interpreted GroupNorm step; the same results

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


import pytest  # noqa: E402


@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else the CPU through the interpreter."""
    return DEVICE
