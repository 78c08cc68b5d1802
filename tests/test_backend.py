"""Backend selection: use_backend and FASTUNET_BACKEND choose between Triton and the reference, loudly."""

import subprocess
import sys

import pytest
import torch

import fastunet
from fastunet import backend, functional, reference


def test_use_backend_nests_and_restores():
    outer = backend.requested_backend()
    with fastunet.use_backend("reference"):
        assert backend.requested_backend() == "reference"
        with fastunet.use_backend("triton"):
            assert backend.requested_backend() == "triton"
        assert backend.requested_backend() == "reference"
    assert backend.requested_backend() == outer


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"expected one of \('auto', 'triton', 'reference'\), got 'cuda'"):
        with fastunet.use_backend("cuda"):
            pass


def _import_in_fresh_process(code, **environment):
    """Run `code` after `import fastunet` in a new interpreter with only `environment` set; (stdout, stderr)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", **environment}
    run = subprocess.run([sys.executable, "-c", "import fastunet\n" + code], capture_output=True, text=True, env=env)
    return run.stdout, run.stderr


def test_environment_variable_is_read_at_import():
    # Read once at import: torch.compile does not guard on os.environ, so a later change must not be half-seen.
    code = (
        "import os\n"
        "from fastunet import backend\n"
        "print('AT_IMPORT', backend.requested_backend())\n"
        "os.environ['FASTUNET_BACKEND'] = 'triton'\n"
        "print('AFTER', backend.requested_backend())\n"
        "with fastunet.use_backend('auto'):\n"  # the context manager wins over the variable
        "    print('CONTEXT', backend.requested_backend())\n"
    )
    stdout, stderr = _import_in_fresh_process(code, FASTUNET_BACKEND="Reference ")
    assert stdout.split() == ["AT_IMPORT", "reference", "AFTER", "reference", "CONTEXT", "auto"], stderr


def test_bad_environment_variable_fails_the_import():
    stdout, stderr = _import_in_fresh_process("print('IMPORTED')", FASTUNET_BACKEND="fastest")
    assert "IMPORTED" not in stdout
    assert "$FASTUNET_BACKEND: expected one of ('auto', 'triton', 'reference'), got 'fastest'" in stderr, stderr


def test_reference_backend_runs_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "rms_norm_act", lambda *args: calls.append(args) or args[0])
    with fastunet.use_backend("reference"):
        functional.rms_norm_act(torch.randn(1, 4, 2, 2), torch.ones(4))
    assert len(calls) == 1


def test_auto_follows_the_interpreter_on_cpu():
    expected = backend.TRITON_INSTALLED and backend.TRITON_INTERPRETING
    with fastunet.use_backend("auto"):
        assert backend.use_triton("rms_norm_act", torch.device("cpu")) == expected


def test_triton_on_cpu_without_interpreter_is_an_error():
    # A fresh process without TRITON_INTERPRET: asking for Triton on a CPU tensor must fail, not fall back.
    code = (
        "import torch, fastunet\n"
        "from fastunet import functional\n"
        "with fastunet.use_backend('triton'):\n"
        "    try:\n"
        "        functional.rms_norm_act(torch.randn(1, 4, 2, 2), torch.ones(4))\n"
        "    except RuntimeError as error:\n"
        "        print('RAISED', error)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "RAISED fastunet backend 'triton' was requested for rms_norm_act on a cpu tensor" in run.stdout, run.stderr


def test_unsupported_head_dim_auto_uses_reference_and_triton_raises():
    if not (backend.TRITON_INSTALLED and backend.TRITON_INTERPRETING) and not torch.cuda.is_available():
        pytest.skip("needs Triton to be runnable here (a GPU or the interpreter)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = torch.randn(3, 1, 2, 24, 5, device=device)  # linear attention kernels take d in (16, 32, 64, 128)
    mem_k, mem_v = torch.randn(2, 2, 24, 4, device=device)
    with fastunet.use_backend("auto"):
        out = functional.linear_attention(q, k, v, mem_k, mem_v)
    torch.testing.assert_close(out, reference.linear_attention(q, k, v, mem_k, mem_v))
    with fastunet.use_backend("triton"), pytest.raises(RuntimeError, match=r"head dims .* got 24"):
        functional.linear_attention(q, k, v, mem_k, mem_v)
