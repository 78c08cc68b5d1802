#!/usr/bin/env bash
# One GPU session's measurement, in under 9 minutes on an H100/H200; commits nothing.
#   1. the test files that hold CUDA-only tests (CUDA graphs, inductor, tensor-core paths), on the GPU;
#   2. the whole-model benchmarks, then the kernel benchmarks (pytest-benchmark JSON autosaved by
#      bench/conftest.py into bench/results/cuda/<machine>/, machine, commit and extra_info inside);
#   3. python bench/report.py: bench/results/report.md (and report.png where matplotlib is installed).
# Each stage has a time limit; an interrupted pytest still saves what it measured (SIGINT, then SIGKILL 20 s
# later). Logs go to bench/results/cuda/logs/. Review, then commit bench/results/cuda/ and the report yourself.
set -uo pipefail
cd "$(dirname "$0")/.."
logs="bench/results/cuda/logs"
mkdir -p "$logs"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
status=0

stage() {  # stage <seconds> <log name> <command...>
    local limit="$1" name="$2"
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee "$logs/$stamp-$name.txt" | tail -40
    local rc="${PIPESTATUS[0]}"
    [ "$rc" -eq 0 ] || { echo "== $name exited with $rc"; status=1; }
}

python - <<'PY' | tee "$logs/$stamp-environment.txt"
import datetime, subprocess, torch, triton
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (this script needs a GPU)")
print("torch", torch.__version__, "triton", triton.__version__)
print("commit", subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip())
PY

# Files with a test that skips without CUDA; their other tests run on the GPU too. The norms' CUDA tests first:
# their GPU paths (fast SiLU, inline PTX, the plans of real shapes) have never run anywhere else.
cuda_test_files="tests/test_norms_cuda.py $(grep -l "cuda.is_available()" tests/test_*.py | grep -v test_norms_cuda)"
stage 200 tests python -m pytest $cuda_test_files -q -rs -x -p no:cacheprovider
stage 190 bench-unet env FASTUNET_BENCH_BUILD_BUDGET_S=60 python -m pytest bench/bench_unet.py --benchmark-only -q
stage 120 bench-kernels python -m pytest bench/ --benchmark-only -q --ignore=bench/bench_unet.py
stage 20 report python bench/report.py
exit "$status"
