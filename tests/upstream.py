"""The real upstream package, the ground truth of the drop-in tests.

- 2.3.4 (channel RMSNorm blocks) is installed by the test extra and imported directly.
- 1.11.1 (GroupNorm blocks, the last such release) cannot be installed beside it under the same module name, so
  it is installed into a private folder and run in a subprocess that writes its checkpoint, inputs and outputs.

In CI (the CI variable set) a missing upstream fails the run; elsewhere the dependent tests skip with the reason.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

UPSTREAM_1_11_1_DIR = pathlib.Path(
    os.environ.get("FASTUNET_UPSTREAM_1_11_1", pathlib.Path.home() / ".cache" / "fastunet" / "upstream-1.11.1")
)


def unavailable(reason):
    if os.environ.get("CI"):
        pytest.fail(f"upstream ground truth missing in CI: {reason}")
    pytest.skip(reason)


def upstream_2():
    """The module denoising_diffusion_pytorch 2.3.4."""
    try:
        import denoising_diffusion_pytorch
    except ImportError as error:
        unavailable(f"denoising-diffusion-pytorch==2.3.4 is not installed (pip install -e '.[test]'): {error}")
    from denoising_diffusion_pytorch.version import __version__

    if __version__ != "2.3.4":
        unavailable(f"expected denoising-diffusion-pytorch 2.3.4, found {__version__}")
    return denoising_diffusion_pytorch


def _install_1_11_1():
    if (UPSTREAM_1_11_1_DIR / "denoising_diffusion_pytorch").is_dir():
        return
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(UPSTREAM_1_11_1_DIR),
         "denoising-diffusion-pytorch==1.11.1"],
        capture_output=True, text=True,
    )
    if run.returncode != 0:
        unavailable(f"could not install denoising-diffusion-pytorch==1.11.1: {run.stderr[-2000:]}")


_RUN_1_11_1 = r"""
import sys, torch
from denoising_diffusion_pytorch import Unet
config, path = eval(sys.argv[1]), sys.argv[2]
torch.manual_seed(config.pop("seed"))
batch, size = config.pop("batch"), config.pop("size")
model = Unet(**config)
x = torch.randn(batch, model.channels, *size)
time = torch.randint(0, 1000, (batch,))
out = model(x, time)
out.square().mean().backward()
grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
torch.save(dict(state_dict=model.state_dict(), x=x, time=time, out=out.detach(), grads=grads), path)
"""


def run_upstream_1_11_1(config, tmp_path):
    """Build upstream 1.11.1's Unet(**config) after torch.manual_seed(config['seed']), run it on random inputs of
    config['batch'] x channels x config['size'], backpropagate mean(out^2); return its state_dict, x, time, out
    and parameter grads."""
    _install_1_11_1()
    path = tmp_path / "upstream_1_11_1.pt"
    env = {**os.environ, "PYTHONPATH": str(UPSTREAM_1_11_1_DIR)}
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", _RUN_1_11_1, repr(config), str(path)],
                         capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"upstream 1.11.1 run failed:\n{run.stderr[-4000:]}")
    return torch.load(path)
