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


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTUNET_BACKEND", "reference")
    assert backend.requested_backend() == "reference"
    monkeypatch.setenv("FASTUNET_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"\$FASTUNET_BACKEND: expected one of .* got 'fastest'"):
        backend.requested_backend()
    with fastunet.use_backend("auto"):  # the context manager wins over the variable
        assert backend.requested_backend() == "auto"


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
