"""Prints, after the benchmark table, each implementation's speed relative to the baseline of its group.

A benchmark names its baseline with `benchmark.extra_info["baseline"] = True`; the others in its group
(pytest-benchmark's `group`) are reported as baseline time / their time (above 1 means faster).
"""


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        if bench.stats is not None and bench.stats.rounds:
            groups.setdefault(bench.group, []).append(bench)
    lines = []
    for group, benches in sorted(groups.items(), key=lambda item: str(item[0])):
        baselines = [b for b in benches if b.extra_info.get("baseline")]
        if not baselines:
            continue
        base = baselines[0]
        for bench in benches:
            if bench is base:
                continue
            # The minimum is the least disturbed by other load on the machine; both are shown.
            lines.append(
                f"{group}: {bench.name} is {base.stats.median / bench.stats.median:.2f}x (median) / "
                f"{base.stats.min / bench.stats.min:.2f}x (min) the speed of {base.name}; medians "
                f"{bench.stats.median * 1e3:.2f} ms vs {base.stats.median * 1e3:.2f} ms"
            )
    if lines:
        terminalreporter.section("speed relative to each group's baseline (host-timed medians)")
        for line in lines:
            terminalreporter.write_line(line)
