#!/usr/bin/env bash
# One GPU session's measurement, in under 9 minutes on an H100/H200; commits nothing.
#   1. the test files that hold CUDA-only tests (CUDA graphs, inductor, tensor-core paths), on the GPU;
#   2. the whole-model benchmarks, then the kernel benchmarks (pytest-benchmark JSON autosaved by
#      bench/conftest.py into bench/results/cuda/<machine>/, machine, commit and extra_info inside);
#   3. python bench/report.py: bench/results/report.md (and report.png where matplotlib is installed).
# Each stage has a time limit; an interrupted pytest still saves what it measured (SIGINT, then SIGKILL 20 s
# later). Logs go to bench/results/cuda/logs/. Review, then commit bench/results/cuda/ and the report yourself.
#
# On a GPU machine that has torch, triton and pytest but neither fastunet nor upstream (the device tool's: a copy of
# the tree without .git, no registry), from the repository root here:
#   bash bench/gpu_wheels.sh         # once, here: the upstream wheels into .whl/
# then on the GPU machine, carrying .whl:
#   FASTUNET_COMMIT=<the commit measured> bash bench/run_gpu.sh
# The script installs fastunet (editable, offline) and the carried wheels first, and where $OUT is set it leaves the
# results there as one tarball (bench/results/cuda/ and the report).
set -uo pipefail
cd "$(dirname "$0")/.."
logs="bench/results/cuda/logs"
mkdir -p "$logs"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
status=0
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

# Setup. The carried wheels go to a folder of their own on PYTHONPATH; fastunet is installed editable, the one way
# its kernels/ folder imports as fastunet.kernels from the repository root (where ./fastunet shadows any copy).
site="${TMPDIR:-/tmp}/fastunet-site"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl || { echo "== the wheels in .whl/ did not install"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import fastunet.kernels" 2> /dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . \
        || { echo "== fastunet did not install (offline, editable: needs setuptools >= 64)"; exit 1; }
fi
"$PYTHON" -c "import fastunet.kernels" || { echo "== fastunet.kernels does not import"; exit 1; }
"$PYTHON" -c "import denoising_diffusion_pytorch" 2> /dev/null \
    || echo "== denoising-diffusion-pytorch is missing: the whole-Unet benchmarks have no baseline (bash bench/gpu_wheels.sh)"

stage() {  # stage <seconds> <log name> <command...>
    local limit="$1" name="$2"
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee "$logs/$stamp-$name.txt" | tail -40
    local rc="${PIPESTATUS[0]}"
    [ "$rc" -eq 0 ] || { echo "== $name exited with $rc"; status=1; }
}

"$PYTHON" - <<'PY' | tee "$logs/$stamp-environment.txt"
import datetime, os, subprocess, torch, triton
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (this script needs a GPU)")
print("torch", torch.__version__, "triton", triton.__version__)
try:
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    commit = ""
print("commit", commit or os.environ.get("FASTUNET_COMMIT", "unknown (no git here and FASTUNET_COMMIT unset)"))
PY

# Files with a test that skips without CUDA; their other tests run on the GPU too. The norms' CUDA tests first:
# their GPU paths (fast SiLU, inline PTX, the plans of real shapes) have never run anywhere else.
cuda_test_files="tests/test_norms_cuda.py $(grep -l "cuda.is_available()" tests/test_*.py | grep -v test_norms_cuda)"
stage 200 tests "$PYTHON" -m pytest $cuda_test_files -q -rs -x -p no:cacheprovider
stage 190 bench-unet env FASTUNET_BENCH_BUILD_BUDGET_S=60 "$PYTHON" -m pytest bench/bench_unet.py --benchmark-only -q
stage 120 bench-kernels "$PYTHON" -m pytest bench/ --benchmark-only -q --ignore=bench/bench_unet.py
stage 20 report "$PYTHON" bench/report.py
if [ -n "${OUT:-}" ]; then  # the device tool brings back what lies under $OUT
    tar -czf "$OUT/gpu-results-$stamp.tgz" bench/results/cuda $(ls bench/results/report.* 2> /dev/null) \
        && echo "== results: $OUT/gpu-results-$stamp.tgz"
fi
exit "$status"
