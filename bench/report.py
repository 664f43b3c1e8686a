"""Turn pytest-benchmark JSON runs of ``bench/`` into a Markdown report and PNG plots.

    python -m bench.report RUN.json [RUN.json ...] [--out DIR]

For every case (op, pass, dtype, shape) the fused kernels' median time gives
``GB/s = floor bytes / median`` (``bench/cases.py`` defines the floors), its share of the copy
bandwidth measured in the same run (a device copy of the same byte count), and its speedup over each
peer (``peer median / fused median``). The report checks the performance targets of
``docs/performance.md``, lists every case, and is stamped with the device, torch/triton versions, date
and the exact command of each run. A run through Triton's interpreter (the CPU smoke run) is marked as
such in the report and on every figure, and its targets read "not measured".
Output (default ``bench/results/<date>_<device>/``): ``README.md``, ``gbps_<op>_<dtype>.png``
(GB/s against B, one panel per pass and D, median over E and T) and ``speedup_<op>_<dtype>.png``
(geometric-mean speedup over each peer, per B).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.cases import PASSES, PEERS

RESULTS = Path(__file__).resolve().parent / "results"
PEER_TITLES = {"eager": "eager", "compile": "compile", "compile-max": "compile max-autotune", "sdpa": "SDPA"}
NOT_MEASURED = "not measured (CPU interpreter)"
SMOKE_MARK = "CPU smoke run through the Triton interpreter: not kernel speeds"


@dataclass
class Case:
    """One (op, pass, dtype, shape) with the median seconds and peak bytes of each implementation."""

    op: str
    pass_: str
    dtype: str
    B: int
    E: int
    T: int
    D: int
    bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    peak: dict[str, int | None] = field(default_factory=dict)

    def gbps(self, impl: str = "fused") -> float | None:
        seconds = self.seconds.get(impl)
        return None if seconds is None else self.bytes / seconds / 1e9

    def copy_fraction(self) -> float | None:
        fused, copy = self.gbps(), self.gbps("copy")
        return None if fused is None or copy is None else fused / copy

    def speedup(self, peer: str) -> float | None:
        if "fused" not in self.seconds or peer not in self.seconds:
            return None
        return self.seconds[peer] / self.seconds["fused"]


def load_runs(paths: Iterable[Path]) -> tuple[list[dict], list[Case]]:
    """The runs' stamps and their cases (a later run's measurement of the same case wins)."""
    stamps, cases = [], {}
    for path in paths:
        run = json.loads(Path(path).read_text())
        info = run["machine_info"].get("fused_gate")
        if info is None:
            raise ValueError(f"{path}: not a fused_gate bench run (no machine_info.fused_gate)")
        stamps.append({**info, "date": run["datetime"], "commit": run.get("commit_info", {}).get("id"), "file": path})
        for bench in run["benchmarks"]:
            x = bench["extra_info"]
            key = (x["op"], x["pass"], x["dtype"], x["B"], x["E"], x["T"], x["D"])
            case = cases.setdefault(key, Case(*key))
            if x["impl"] != "copy":
                case.bytes = x["bytes"]
            case.seconds[x["impl"]] = bench["stats"]["median"]
            case.peak[x["impl"]] = x.get("peak_memory_bytes")
    return stamps, sorted(cases.values(), key=lambda c: (c.op, PASSES.index(c.pass_), c.dtype, c.E, c.T, c.D, c.B))


def select(cases: Iterable[Case], metric: Callable[[Case], float | None], **where: object) -> list[float]:
    """``metric(case)`` for the cases whose attributes equal ``where``, skipping cases without a value."""
    values = []
    for case in cases:
        if all(getattr(case, k) == v for k, v in where.items()) and (value := metric(case)) is not None:
            values.append(value)
    return values


def geomean(values: Iterable[float]) -> float:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def target_rows(cases: list[Case], interpreted: bool = False) -> list[tuple[str, str, str]]:
    """The targets of ``docs/performance.md``: (target, measured, met) for the cases present in the run.

    ``interpreted``: the run timed Triton's interpreter, so "met" is ``NOT_MEASURED`` for every target.
    """

    def verdict(met: bool) -> str:
        return NOT_MEASURED if interpreted else ("yes" if met else "no")

    rows = []
    for op in sorted({c.op for c in cases}):
        mine = [c for c in cases if c.op == op]
        largest_b = max(c.B for c in mine)
        for pass_, goal in (("fwd", 0.9), ("bwd", 0.8)):
            fractions = select(mine, Case.copy_fraction, pass_=pass_, B=largest_b)
            if fractions:
                low, mid = min(fractions), statistics.median(fractions)
                rows.append(
                    (
                        f"{op} {pass_} ≥ {goal:.0%} of copy bandwidth (B = {largest_b})",
                        f"min {low:.0%}, median {mid:.0%} over {len(fractions)} shapes",
                        verdict(low >= goal),
                    )
                )
        for peer, goal in (("eager", 2.0), ("compile-max", 1.5), ("sdpa", 2.0)):
            speedups = select(mine, lambda c, peer=peer: c.speedup(peer), pass_="fwd+bwd")
            if speedups:
                rows.append(
                    (
                        f"{op} fwd+bwd ≥ {goal:g}x {PEER_TITLES[peer]}",
                        f"min {min(speedups):.2f}x, geomean {geomean(speedups):.2f}x over {len(speedups)} shapes",
                        verdict(min(speedups) >= goal),
                    )
                )
        small = select(mine, lambda c: c.seconds.get("fused"), pass_="fwd", B=256)
        if small:
            rows.append(
                (
                    f"{op} fwd at B = 256 ≤ ~10 µs",
                    f"max {max(small) * 1e6:.1f} µs over {len(small)} shapes",
                    verdict(max(small) <= 10e-6),
                )
            )
    return rows


def markdown(stamps: list[dict], cases: list[Case], images: list[str]) -> str:
    first = stamps[0]
    interpreted = any(s["interpreted"] for s in stamps)
    lines = [f"# fused_gate benchmarks: {first['device']}", ""]
    if interpreted:
        lines += [f"**{SMOKE_MARK}.**", ""]
    lines += [
        f"- device: {first['device']}",
        f"- torch {first['torch']}, triton {first['triton']}, CUDA {first['cuda']}",
    ]
    for stamp in stamps:
        lines.append(f"- run {stamp['date']} (commit {str(stamp['commit'])[:10]}): `{stamp['command']}`")
    lines += [
        "",
        "GB/s = the pass's floor bytes / median time (`bench/cases.py`); % copy = that against a device copy "
        "of the same bytes timed in the same run; x peer = peer median / fused median (above 1: fused is "
        "faster); peak = device memory one call allocates beyond its inputs.",
        "",
    ]
    rows = target_rows(cases, interpreted)
    if rows:
        lines += ["## Performance targets", "", "From `docs/performance.md`; met = every shape meets it.", ""]
        lines += ["| target | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {t} | {m} | {ok} |" for t, m, ok in rows]
        lines.append("")
    lines += [f"![{name}]({name})" for name in images]
    lines.append("")
    groups: dict[tuple[str, str], list[Case]] = defaultdict(list)
    for case in cases:
        groups[case.op, case.pass_].append(case)
    for (op, pass_), group in groups.items():
        peers = [p for p in PEERS if any(p in c.seconds for c in group)]
        head = ["dtype", "B", "E", "T", "D", "fused µs", "GB/s", "% copy", *[f"x {PEER_TITLES[p]}" for p in peers]]
        head += ["peak MiB fused", "peak MiB eager"]
        lines += [f"## {op} {pass_}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for c in group:
            fused = c.seconds.get("fused")
            cells = [c.dtype, c.B, c.E, c.T, c.D, _fmt(None if fused is None else fused * 1e6, ".1f")]
            cells += [_fmt(c.gbps(), ".3g"), _fmt(c.copy_fraction(), ".0%")]
            cells += [_fmt(c.speedup(p), ".2f", "x") for p in peers]
            cells += [_mib(c.peak.get("fused")), _mib(c.peak.get("eager"))]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    return "\n".join(lines)


def _save(fig, axes, title: str, path: Path, smoke: bool) -> None:
    """One legend under the panels (it never hides data), the title, and for a smoke run a mark and a watermark."""
    import matplotlib.pyplot as plt

    width, height = fig.get_size_inches()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    if smoke:
        title = f"{title}\n{SMOKE_MARK}"
        mark = {"ha": "center", "va": "center", "rotation": 25, "color": "red", "alpha": 0.15}
        fig.text(0.5, 0.5, "CPU SMOKE RUN", fontsize=min(40.0, 5.0 * width), **mark)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_axis(ax, values: list[float], suffix: str) -> None:
    """A log y axis with few enough labels not to overlap (denser when the values span a decade or less)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = [v for v in values if v > 0 and math.isfinite(v)]
    decades = math.log10(max(values) / min(values)) if values else 0.0
    ax.set_yscale("log")
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades <= 1 else (1.0, 2.0, 5.0) if decades <= 2 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _plot_gbps(cases: list[Case], passes: list[str], impls: list[str], path: Path, title: str, smoke: bool) -> None:
    """GB/s against B: one panel per (pass, D), one line per implementation, median over E and T."""
    import matplotlib.pyplot as plt

    dims, batches = sorted({c.D for c in cases}), sorted({c.B for c in cases})
    size = (max(6.0, 3.6 * len(dims)), 2.8 * len(passes) + 0.9)
    fig, axes = plt.subplots(len(passes), len(dims), figsize=size, squeeze=False)
    for row, pass_ in enumerate(passes):
        for col, d in enumerate(dims):
            ax = axes[row][col]
            plotted = []
            for impl in impls:
                by_b = {b: select(cases, lambda c, impl=impl: c.gbps(impl), pass_=pass_, D=d, B=b) for b in batches}
                xs = [b for b in batches if by_b[b]]
                ys = [statistics.median(by_b[b]) for b in xs]
                style = {"fused": "-o", "copy": "k--"}.get(impl, ":.")
                ax.plot(xs, ys, style, label=impl)
                plotted += ys
            ax.set_xscale("log", base=2)
            _log_axis(ax, plotted, "")
            ax.set_title(f"{pass_}, D = {d}", fontsize=9)
            ax.set_xlabel("B")
            if col == 0:
                ax.set_ylabel("GB/s (median over E, T)")
    _save(fig, axes, title, path, smoke)


def _plot_speedup(cases: list[Case], passes: list[str], peers: list[str], path: Path, title: str, smoke: bool) -> None:
    """Geometric-mean speedup of the fused op over each peer: one panel per pass, one bar per B."""
    import matplotlib.pyplot as plt

    batches = sorted({c.B for c in cases})
    fig, axes = plt.subplots(1, len(passes), figsize=(max(6.0, 4.4 * len(passes)), 4.0), squeeze=False)
    width = 0.8 / len(batches)
    for col, pass_ in enumerate(passes):
        ax = axes[0][col]
        plotted = [1.0]
        for i, b in enumerate(batches):
            heights = [geomean(select(cases, lambda c, p=p: c.speedup(p), pass_=pass_, B=b)) for p in peers]
            ax.bar([j + i * width for j in range(len(peers))], heights, width, label=f"B = {b}")
            plotted += heights
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(peers))], peers, fontsize=8)
        _log_axis(ax, plotted, "x")
        ax.set_title(pass_, fontsize=9)
        if col == 0:
            ax.set_ylabel("speedup of fused (geomean)")
    _save(fig, axes, title, path, smoke)


def plot(cases: list[Case], out: Path, smoke: bool = False) -> list[str]:
    """Write the GB/s and speedup figures of each (op, dtype); returns their file names.

    ``smoke``: the run went through Triton's interpreter; every figure says so in its title and a watermark.
    """
    import matplotlib

    matplotlib.use("Agg")
    names = []
    for op, dtype in sorted({(c.op, c.dtype) for c in cases}):
        mine = [c for c in cases if c.op == op and c.dtype == dtype]
        passes = [p for p in PASSES if any(c.pass_ == p for c in mine)]
        peers = [p for p in PEERS if any(p in c.seconds for c in mine)]
        names += [f"gbps_{op}_{dtype}.png", f"speedup_{op}_{dtype}.png"]
        gbps_title, speedup_title = f"{op} {dtype}: achieved GB/s", f"{op} {dtype}: fused vs each peer"
        _plot_gbps(mine, passes, ["fused", *peers, "copy"], out / names[-2], gbps_title, smoke)
        _plot_speedup(mine, passes, peers, out / names[-1], speedup_title, smoke)
    return names


def results_dir(device: str, date: str, max_slug: int = 48) -> Path:
    """``bench/results/<YYYY-MM-DD>_<device slug>``: one folder per device and day.

    The slug is the device name in lower-case words joined by ``-``, as many whole words as fit in
    ``max_slug`` characters (the first word, cut, if it alone is longer).
    """
    words = re.findall(r"[a-z0-9]+", device.lower())
    slug = words[0][:max_slug] if words else "device"
    for word in words[1:]:
        if len(slug) + 1 + len(word) > max_slug:
            break
        slug += f"-{word}"
    return RESULTS / f"{date[:10]}_{slug}"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<date>_<device>/)")
    args = parser.parse_args(argv)
    stamps, cases = load_runs(args.runs)
    if not cases:
        parser.error("the runs hold no benchmark")
    out = args.out or results_dir(stamps[0]["device"], stamps[0]["date"])
    out.mkdir(parents=True, exist_ok=True)
    for path in args.runs:
        if path.resolve().parent != out.resolve():
            shutil.copy(path, out / path.name)
    images = plot(cases, out, smoke=any(s["interpreted"] for s in stamps))
    (out / "README.md").write_text(markdown(stamps, cases, images))
    print(f"report: {out / 'README.md'} ({len(cases)} cases, {len(images)} plots)")
    return out


if __name__ == "__main__":
    main()
