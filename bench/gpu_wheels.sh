#!/usr/bin/env bash
# Run where the package registry is reachable (this project's machines), before a GPU call: downloads into .whl/
# (git-ignored) the pure-Python wheels that bench/run_gpu.sh needs and the GPU machines' image lacks: upstream
# denoising-diffusion-pytorch 2.3.4, the whole-Unet benchmarks' baseline and the drop-in tests' ground truth, and
# ema-pytorch, which it imports. (Its other imports, accelerate, einops, pillow, scipy, torchvision and tqdm, are
# on the image; pytorch-fid is imported only to compute FID.) Carry `.whl` with the call; run_gpu.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    denoising-diffusion-pytorch==2.3.4 ema-pytorch==0.8.3
ls -l .whl
