#!/usr/bin/env bash
# One GPU session's worth of measurement: the CUDA tests, then every benchmark, written to bench/results/ as
# pytest-benchmark JSON (it records the machine, the commit and each benchmark's extra_info: device, device_ms,
# GB/s, %HBM, TFLOP/s) beside a small header with the GPU name, torch and triton versions and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
python - > "$out/$stamp-environment.txt" <<'PY'
import datetime, subprocess, torch, triton
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "triton", triton.__version__)
print("commit", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
PY
pytest tests/ -q -x 2>&1 | tail -30 | tee "$out/$stamp-tests.txt"
pytest bench/ --benchmark-only --benchmark-json="$out/$stamp-bench.json" -q 2>&1 | tail -80 | tee "$out/$stamp-bench.txt"
