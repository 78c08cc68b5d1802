"""What `pytest bench/ --benchmark-only` keeps and prints, with no extra flags (only for runs of bench/).

- Keeps each run: pytest-benchmark's autosave into bench/results/<cpu|cuda>/<machine>/NNNN_<commit>_<date>.json
  (machine, commit and every benchmark's extra_info inside), unless --benchmark-json/--benchmark-save or
  --benchmark-storage is given. bench/results/.gitignore keeps the CPU runs out of git; GPU runs are committed.
- Names the commit from git, or, in a copy of the tree without its history (a GPU machine's), from the
  FASTUNET_COMMIT environment variable (bench/run_gpu.sh passes it on).
- Shows skip reasons (-rs) and, after pytest-benchmark's table, each group's configuration, which backend each
  provider ran, its ratio to its baseline, whether that ratio is within noise, images/s, peak memory and
  kernels per step.

A benchmark names what it is compared to with `extra_info["compare_to"] = <provider>` (the whole-model
benchmarks), or marks its group's baseline with `extra_info["baseline"] = True` (the kernel benchmarks).
"""

import os
import pathlib
import platform

import pytest
import torch

RESULTS = pathlib.Path(__file__).parent / "results"
DEFAULT_STORAGE = "file://./.benchmarks"
_UNVERSIONED = "unversioned"  # pytest-benchmark's commit id where it finds no .git


def _commit_override():
    """The commit a run measures where the tree has no git history, from FASTUNET_COMMIT (None when unset)."""
    return os.environ.get("FASTUNET_COMMIT") or None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    option = config.option
    # Before pytest-benchmark's own pytest_configure, which reads these options.
    if hasattr(option, "benchmark_autosave"):
        if not (option.benchmark_autosave or option.benchmark_save or option.benchmark_json):
            from pytest_benchmark.utils import get_tag

            # What --benchmark-autosave stores: <commit>_<date>[_dirty].
            option.benchmark_autosave = get_tag().replace(_UNVERSIONED, _commit_override() or _UNVERSIONED, 1)
            option.benchmark_save_data = True  # every round's time, for the report's spread
        if option.benchmark_storage == DEFAULT_STORAGE:
            option.benchmark_storage = f"file://{RESULTS / ('cuda' if torch.cuda.is_available() else 'cpu')}"
    if "s" not in option.reportchars and "a" not in option.reportchars.lower():
        option.reportchars += "s"


def pytest_benchmark_update_machine_info(config, machine_info):
    import subprocess

    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    machine_info["cpu_threads"] = torch.get_num_threads()
    machine_info["platform"] = platform.platform()
    try:
        import denoising_diffusion_pytorch

        machine_info["denoising_diffusion_pytorch"] = denoising_diffusion_pytorch.__version__
    except (ImportError, AttributeError):
        pass
    try:
        describe = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                  cwd=pathlib.Path(__file__).parent).stdout.strip()
    except FileNotFoundError:  # no git on the machine
        describe = ""
    machine_info["git_describe"] = describe or _commit_override()


def pytest_benchmark_update_commit_info(config, commit_info):
    if commit_info.get("id") in (_UNVERSIONED, "unknown") and _commit_override():
        commit_info["id"] = _commit_override()


_SKIPPED = []


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        _SKIPPED.append(dict(test=report.nodeid.split("::")[-1], reason=str(report.longrepr[2]).removeprefix("Skipped: ")))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Keep the skipped benchmarks and why beside the measured ones, so that the report can say what did not run."""
    output_json["skipped"] = list(_SKIPPED)


def _within_noise(bench, base):
    """The two interquartile ranges overlap: the ratio of medians could be 1 under the run-to-run spread."""
    return bench.stats.q1 <= base.stats.q3 and base.stats.q1 <= bench.stats.q3


def _spread(bench):
    return 100 * bench.stats.iqr / bench.stats.median


def comparison(bench, base):
    """'1.23x (spread 4% vs 3%)' or '... within noise'; above 1 means faster than the baseline."""
    ratio = base.stats.median / bench.stats.median
    noise = ", within noise" if _within_noise(bench, base) else ""
    return f"{ratio:.2f}x {_provider(base)} (IQR {_spread(bench):.0f}% vs {_spread(base):.0f}%{noise})"


def _provider(bench):
    return bench.extra_info.get("provider") or bench.name


def _describe_extra(extra):
    parts = []
    if "images_per_s" in extra:
        parts.append(f"{extra['images_per_s']} images/s")
    if extra.get("peak_memory_MiB") is not None:
        parts.append(f"peak {extra['peak_memory_MiB']} MiB")
    if extra.get("kernels_per_step") is not None:
        parts.append(f"{extra['kernels_per_step']} kernels/step")
    return ", ".join(parts)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        if bench.stats is not None and bench.stats.rounds:
            groups.setdefault(bench.group, []).append(bench)
    write = terminalreporter.write_line
    terminalreporter.section("each group against its baseline (ratio of medians; above 1 is faster)")
    methods = set()
    for group, benches in sorted(groups.items(), key=lambda item: str(item[0])):
        by_provider = {_provider(b): b for b in benches}
        configs = sorted({str(b.extra_info["config"]) for b in benches if "config" in b.extra_info})
        write(f"{group}" + (f": {'; '.join(configs)}" if configs else ""))
        group_baseline = next((b for b in benches if b.extra_info.get("baseline")), None)
        for bench in benches:
            extra = bench.extra_info
            base = by_provider.get(extra.get("compare_to")) or group_baseline
            line = f"  {_provider(bench)}: median {bench.stats.median * 1e3:.2f} ms"
            if base is not None and base is not bench:
                line += f", {comparison(bench, base)}"
            described = _describe_extra(extra)
            if described:
                line += f"; {described}"
            if "ran" in extra:
                line += f"  [{extra['ran']}]"
            write(line)
            methods.update(extra[k] for k in ("memory_method", "kernels_method") if extra.get(k))
    for method in sorted(methods):
        write(f"  ({method})")
    write("Runs are kept under bench/results/ (pytest-benchmark JSON); `python bench/report.py` renders them.")
