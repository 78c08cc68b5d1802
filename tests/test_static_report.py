"""The static cost report's attention sections (bench/static_report.py) run, and what they read from the compiled
code holds: sm_90 SASS (Triton's bundled ptxas, no GPU) of the Unet's launches, captured from the modules' own
launchers.

These are properties of the code the GPU would run, not timings: flash attention's dots are wgmma, waited on once
per step in the forward (the p v dots overlap the next block's loads), with the exp2 the softmax needs and no more;
no launch spills registers; linear attention's streaming launches issue their instructions in well under the time
their bytes take from HBM (the headroom that lets loads overlap the arithmetic). A change that reintroduced a wait
after every dot, an exact exp with its range fix-ups or a spill fails here, before any GPU runs it.

The sections compile with TRITON_INTERPRET unset, which the interpreting test process cannot do: they run in a
subprocess that prints their figures as JSON. The norms' section (3 minutes of compiles) is left to
tests/test_group_norm.py's and tests/test_rms_norm.py's compile tests.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

_FIGURES = r"""
import dataclasses, importlib, json, sys
sys.path.insert(0, "bench")
import static_report as report, static_attention, static_linear_attention
device = report.H100
module = importlib.import_module("fastunet.kernels.attention")
attention = []
for side in static_attention.SIDES:
    for candidate in (0, 1):  # the table's configurations, then the autotuner's other candidates
        for direction, launches in zip(("forward", "backward"),
                                       static_attention._launches(module, side, device.arch, candidate)):
            for launch in launches:
                compiled = report.compile_launch(launch, device.arch)
                step = static_attention.step_figures(launch, device)
                attention.append(dict(n=side * side, candidate=candidate, kernel=compiled.name,
                                      spills=compiled.spills, registers=compiled.registers,
                                      resident=report.resident_programs(compiled, device),
                                      step=dataclasses.asdict(step) if step else None))
linear = [dict(title=section.title, kernel=row.kernel, spills=row.spills, issue_over_hbm=row.issue_us / row.hbm_us,
               streaming=row.kernel in static_linear_attention.STREAMING)
          for section in static_linear_attention.sections(device) for row in section.rows]
print(json.dumps(dict(attention=attention, linear=linear)))
"""


@pytest.fixture(scope="module")
def figures():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _FIGURES], cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode == 0, f"the static report failed:\n{run.stderr[-4000:]}"
    return json.loads(run.stdout.splitlines()[-1])


def _steps(figures, role):
    return [launch for launch in figures["attention"] if role in launch["kernel"] and launch["step"]]


def test_every_attention_launch_compiles_without_spills(figures):
    launches = figures["attention"]
    # forward 1 + backward 2 launches, for both N and both the table's and the candidates' configurations
    assert len(launches) == 12
    assert all(launch["spills"] == 0 for launch in launches), [l for l in launches if l["spills"]]


def test_flash_forward_runs_wgmma_waited_once_per_step(figures):
    forward = _steps(figures, "forward")
    assert len(forward) == 4
    for launch in forward:
        step = launch["step"]
        assert step["mma_kinds"] and all(kind.startswith("HGMMA") for kind in step["mma_kinds"]), step
        # q k^T's wait (the softmax needs the scores at once); p v's dots are not waited on in their own step.
        assert step["waits"] == 1, step
        assert step["executed"] == step["counted"] == 2, step
        # One exp2 per score and one per row's rescale: BLOCK_M x BLOCK_N scores over the program's threads, plus
        # the rows each thread holds (two per 16-row slice of a warp).
        threads = step["num_warps"] * 32
        scores = step["block_m"] * step["block_n"] // threads
        assert scores <= step["exp2"] <= scores + 2, step


def test_flash_forward_table_config_keeps_two_programs_per_sm(figures):
    # Two 8-warp programs per SM interleave one's softmax with the other's dots (kernels/attention.py, Hopper).
    table = [launch for launch in _steps(figures, "forward") if launch["candidate"] == 0]
    assert table and all(launch["resident"] >= 2 for launch in table), table


def test_flash_backward_waits_per_step(figures):
    # dk/dv: one wait before p (k q^T) and one before dS (v dO^T), for 4 dots; dq: the same two in its delta pass
    # and in its dq pass.
    for role, most in (("dkdv", 2), ("dq", 4)):
        launches = _steps(figures, role)
        assert launches, role
        for launch in launches:
            step = launch["step"]
            assert all(kind.startswith("HGMMA") for kind in step["mma_kinds"]), step
            assert 1 <= step["waits"] <= most, step


def test_linear_attention_streams_without_spills_and_with_issue_headroom(figures):
    rows = figures["linear"]
    assert rows and all(row["spills"] == 0 for row in rows), [r for r in rows if r["spills"]]
    streaming = [row for row in rows if row["streaming"]]
    # Three map sizes, four streaming launches each (the forward's context partials and output, the backward's dq
    # and dk/dv).
    assert len(streaming) == 12
    # Issue within 0.65x of the HBM time of the launch's bytes (0.33-0.61 now; the exact exp and division it had
    # before kernels/fast_math.py put the output kernel at 0.81).
    worst = max(streaming, key=lambda row: row["issue_over_hbm"])
    assert worst["issue_over_hbm"] <= 0.65, worst
