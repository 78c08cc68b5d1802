"""Render the kept benchmark runs (bench/results/**.json, pytest-benchmark) into a readable report.

    python bench/report.py                 # writes report.md and report.png (the PNG needs matplotlib)
    python bench/report.py --results DIR --out DIR

report.md: for the latest run of each device, every group as a table (median, spread, images/s, peak memory,
kernels per step, and each one's ratio to its baseline, marked when within noise), with the device, versions,
date and commit of the run. report.png: the speed-up of each provider over its baseline in the latest run of
each device, and, where several runs of a device are kept, the speed-ups over those runs (commits).

GPU runs (bench/results/cuda/) are the ones committed; the report of them goes to bench/results/. When only CPU
runs exist (bench/results/cpu/, kept out of git), the report goes beside them, in bench/results/cpu/.
"""

import argparse
import dataclasses
import json
import pathlib

RESULTS = pathlib.Path(__file__).parent / "results"


@dataclasses.dataclass
class Run:
    path: pathlib.Path
    data: dict

    @property
    def device(self):
        return self.data["machine_info"].get("device", "unknown")

    @property
    def date(self):
        return self.data.get("datetime", "")[:19].replace("T", " ")

    @property
    def commit(self):
        info = self.data.get("commit_info", {})
        commit = (info.get("id") or "unknown")[:10]
        return commit + (" (uncommitted changes)" if info.get("dirty") else "")

    def versions(self):
        info = self.data["machine_info"]
        keys = ("torch", "triton", "denoising_diffusion_pytorch", "python_version")
        return ", ".join(f"{k.replace('_version', '')} {info[k]}" for k in keys if info.get(k))

    def groups(self):
        groups = {}
        for bench in self.data["benchmarks"]:
            groups.setdefault(bench["group"], []).append(bench)
        return groups


def load_runs(results):
    runs = []
    for path in sorted(results.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "benchmarks" in data and "machine_info" in data:
            runs.append(Run(path, data))
    return sorted(runs, key=lambda run: run.data.get("datetime", ""))


def latest_by_device(runs):
    """{device: (latest run, its groups, its skipped)}: the groups of every kept run of the latest run's commit
    on that device, a later run's group replacing an earlier one's (bench/run_gpu.sh runs the whole-model and
    the kernel benchmarks as two pytest runs)."""
    latest = {}
    for run in runs:
        latest[run.device] = run
    merged = {}
    for device, last in latest.items():
        groups, skipped = {}, []
        for run in runs:
            if run.device == device and run.commit == last.commit:
                groups.update(run.groups())
                skipped += run.data.get("skipped", [])
        merged[device] = (last, groups, skipped)
    return merged


def provider(bench):
    return bench.get("extra_info", {}).get("provider") or bench["name"]


def baseline_of(bench, benches):
    """The benchmark this one is compared to: its extra_info's compare_to, else its group's baseline."""
    wanted = bench.get("extra_info", {}).get("compare_to")
    for other in benches:
        if wanted is not None and provider(other) == wanted:
            return other
    if wanted is None:
        return next((b for b in benches if b.get("extra_info", {}).get("baseline")), None)
    return None


def speedup(bench, base):
    """(ratio of medians, within noise): above 1 is faster; within noise when the interquartile ranges overlap."""
    stats, base_stats = bench["stats"], base["stats"]
    ratio = base_stats["median"] / stats["median"]
    within = stats["q1"] <= base_stats["q3"] and base_stats["q1"] <= stats["q3"]
    return ratio, within


def _ratio_text(value, base_value):
    if value is None or base_value in (None, 0):
        return ""
    return f" ({value / base_value:.2f}x)"


def group_table(benches):
    lines = [
        "| provider | what ran | median ms | IQR | images/s | speed vs baseline | peak MiB | kernels/step |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for bench in benches:
        extra, stats = bench.get("extra_info", {}), bench["stats"]
        base = baseline_of(bench, benches)
        if base is None or base is bench:
            versus = "baseline"
        else:
            ratio, within = speedup(bench, base)
            versus = f"{ratio:.2f}x {provider(base)}" + (" (within noise)" if within else "")
        base_extra = base.get("extra_info", {}) if base is not None and base is not bench else {}
        memory = extra.get("peak_memory_MiB")
        kernels = extra.get("kernels_per_step")
        memory_text = "" if memory is None else f"{memory}{_ratio_text(memory, base_extra.get('peak_memory_MiB'))}"
        kernels_text = "" if kernels is None else f"{kernels}{_ratio_text(kernels, base_extra.get('kernels_per_step'))}"
        lines.append(
            f"| {provider(bench)} | {extra.get('ran', '')} | {stats['median'] * 1e3:.2f} | "
            f"{100 * stats['iqr'] / stats['median']:.0f}% | {extra.get('images_per_s', '')} | {versus} | "
            f"{memory_text} | {kernels_text} |"
        )
    methods = sorted({b.get("extra_info", {}).get(k) for b in benches for k in ("memory_method", "kernels_method")}
                     - {None})
    return lines + [""] + [f"- {method}" for method in methods]


def render_markdown(runs):
    latest = latest_by_device(runs)
    lines = ["# Benchmark report", ""]
    if all(device == "cpu" for device in latest):
        lines += ["**No GPU run is kept yet.** The tables below come from CPU runs, where fastunet runs its "
                  "reference path; they say nothing about the Triton kernels' speed.", ""]
    lines += [f"Rendered by `python bench/report.py` from {len(runs)} kept run(s). Ratios are of medians, "
              "against upstream eager at the same precision (whole model) or the group's baseline; "
              "above 1 is faster. 'within noise': the two interquartile ranges overlap.", ""]
    for device, (run, groups, skipped) in sorted(latest.items(), key=lambda item: item[0] == "cpu"):
        lines += [f"## {device}", "", f"- date {run.date} UTC, commit {run.commit}", f"- {run.versions()}", ""]
        for group, benches in sorted(groups.items()):
            configs = sorted({str(b.get("extra_info", {}).get("config")) for b in benches} - {"None"})
            lines += [f"### {group}", ""] + ([f"{'; '.join(configs)}", ""] if configs else [])
            lines += group_table(benches) + [""]
        if skipped:
            lines += ["Not run:", ""] + [f"- `{item['test']}`: {item['reason']}" for item in skipped] + [""]
    return "\n".join(lines) + "\n"


def render_png(runs, path):
    """Speed-up per provider (latest run of each device) and over runs (commits). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = []
    for device, (run, groups, _) in latest_by_device(runs).items():
        for group, benches in sorted(groups.items()):
            bars = [(provider(b), *speedup(b, base)) for b in benches
                    if (base := baseline_of(b, benches)) is not None and base is not b]
            if bars:
                panels.append((f"{group} ({device}, {run.commit[:10]})", bars))
    history = {}
    for run in runs:
        for group, benches in run.groups().items():
            for bench in benches:
                base = baseline_of(bench, benches)
                if base is not None and base is not bench:
                    history.setdefault((run.device, group, provider(bench)), []).append(
                        (run.date, speedup(bench, base)[0]))
    history = {key: points for key, points in history.items() if len(points) > 1}
    rows = len(panels) + (1 if history else 0)
    if rows == 0:
        return False
    heights = [0.9 + 0.3 * len(bars) for _, bars in panels] + ([3.0] if history else [])
    figure, axes = plt.subplots(rows, 1, figsize=(9, sum(heights)), squeeze=False,
                                gridspec_kw=dict(height_ratios=heights))
    for axis, (title, bars) in zip(axes[:, 0], panels):
        names = [name for name, _, _ in bars]
        ratios = [ratio for _, ratio, _ in bars]
        colors = ["#9aa0a6" if within else ("#1a7f37" if ratio >= 1 else "#cf222e") for _, ratio, within in bars]
        axis.barh(names, ratios, color=colors)
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("speed-up over baseline (grey: within noise)", fontsize=8)
        axis.tick_params(labelsize=7)
        for y, ratio in enumerate(ratios):
            axis.text(ratio, y, f" {ratio:.2f}x", va="center", fontsize=7)
    if history:
        axis = axes[-1, 0]
        for (device, group, name), points in sorted(history.items()):
            axis.plot([date for date, _ in points], [ratio for _, ratio in points], marker="o",
                      label=f"{device} {group} {name}")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_title("speed-up over kept runs", fontsize=9)
        axis.tick_params(labelsize=6)
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS, help="where the runs are kept")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="where report.md/png go (default: bench/results/, or bench/results/cpu/ for CPU only)")
    args = parser.parse_args(argv)
    runs = load_runs(args.results)
    if not runs:
        print(f"no pytest-benchmark runs under {args.results}: run `pytest bench/ --benchmark-only` first")
        return 1
    out = args.out or (args.results if any(run.device != "cpu" for run in runs) else args.results / "cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(render_markdown(runs))
    print(f"wrote {out / 'report.md'} from {len(runs)} run(s)")
    if render_png(runs, out / "report.png"):
        print(f"wrote {out / 'report.png'}")
    else:
        print("report.png not written: matplotlib is not installed (pip install matplotlib), or nothing to plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
