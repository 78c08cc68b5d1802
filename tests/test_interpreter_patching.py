"""tests/interpreter_patching.py: inside an interpreted launch, helper calls skip re-patching triton.language; the
launch still patches once, computes the same, and leaves the language unpatched when it ends."""

import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's behaviour")


@triton.jit
def _twice(x):
    return x * 2


@triton.jit
def _add_one(x):
    return _twice(x) * 0 + x + 1


@triton.jit
def _helpers_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    for _ in range(3):  # helper calls in a loop, as the norm kernels make them
        x = _add_one(x)
    tl.store(y_ptr + offsets, _twice(x))


def test_a_launch_patches_once_and_restores(monkeypatch):
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "skips_redundant_patching", False), "tests/conftest.py installs it"
    calls = []
    triton_patching = interpreter._patch_lang.original
    monkeypatch.setattr(interpreter._patch_lang, "original",
                        lambda fn: calls.append(fn.__name__) or triton_patching(fn))
    x = torch.arange(16, dtype=torch.float32)
    y = torch.empty_like(x)
    _helpers_kernel[(1,)](x, y, BLOCK=16)
    torch.testing.assert_close(y, (x + 3) * 2)
    assert calls == ["_helpers_kernel"], f"Triton's patching ran for {calls}"
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.arange), "the launch left triton.language patched"
