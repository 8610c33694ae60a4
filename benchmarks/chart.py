"""Draw the benchmark results: one summary chart, and one chart per benchmark.

Reads the JSON that ``benchmarks/run.py`` writes (``benchmarks/results/latest.json``) and
writes, into ``docs/images/`` (the documentation's performance page shows them):

- ``bench.png``, the summary, made to be read at the page's width: for each scenario, how
  fast asyncmp is on each event loop next to the plain blocking loop (1 on the axis) and
  next to the fastest thread-per-call way, on one logarithmic axis.
- ``bench-pool.png``, the pools' summary: for each pool benchmark that has an anchor, how
  fast asyncmp's pool is on each event loop next to that anchor (1 on the axis), next to
  the other pools that ran, and where the target lies. The channel summary above leaves
  the pools out: its axis is the plain blocking loop, which a pool has no equivalent of.
- ``bench/<benchmark id>.png``, one chart per benchmark, a bar per contender: each bar is
  the median over the rounds, the whisker spans the middle half of the rounds (IQR). A
  chart whose values span more than a factor of 30 gets a logarithmic axis, so that the
  thread-per-call contenders and asyncmp fit on one scale.

    python benchmarks/chart.py [--input results/latest.json] [--output-dir ../docs/images]
                               [--candidates]

``nox -s bench`` runs it after ``run.py``. Charts in ``bench/`` that the results no longer
have are removed, so the page never shows a chart from another run.

A candidate copy of asyncmp measured beside this one (``run.py --candidate TAG=PATH``) is left
out of every chart, as the documentation leaves its rows out of the tables: it compares a
change with the code it started from, which matters to whoever made the change, not to a
reader. ``--candidates`` draws its bars in the per-benchmark charts too.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE / "results" / "latest.json"
DEFAULT_OUTPUT_DIR = HERE.parent / "docs" / "images"
SUMMARY = "bench.png"
POOL_SUMMARY = "bench-pool.png"
DETAILS = "bench"  # a directory: one PNG per benchmark, named by its id

#: The documentation's content column is about 730 CSS pixels wide: the charts are drawn
#: for it at twice its resolution, 7.3 inches at 200 dots per inch.
WIDTH_INCHES = 7.3
DPI = 200

#: Bar colours: asyncmp per event loop, then the other families.
COLOURS: dict[object, str] = {
    ("asyncmp", "asyncio"): "#1f6feb",
    ("asyncmp", "uvloop"): "#0a3d91",
    ("asyncmp", "trio"): "#6ca4f8",
    "asyncmp": "#1f6feb",
    "candidate": "#8250df",
    "sync": "#6e7781",
    "raw": "#24292f",
    "thread": "#d4731b",
}
#: The other pools' markers, by family (the pool benchmarks' anchors sit at 1x).
PEERS = {
    "aiomultiprocess": ("P", "#bf8700"),
    "trio-parallel": ("X", "#1a7f37"),
    "anyio": ("^", "#d4731b"),
    "executor": ("v", "#6e7781"),
}
TARGET_COLOUR = "#cf222e"
FALLBACK_COLOUR = "#afb8c1"
MARKERS = {"asyncio": "o", "uvloop": "s", "trio": "D"}
LOG_SPAN = 30.0
GRID = "#d0d7de"
MUTED = "#57606a"

#: The summary's row names; a benchmark not named here is shown with its title's first part.
SHORT_NAMES = {
    "small-send-socket": "1a  small messages, producer-paced",
    "small-batch-socket": "1b  small messages, consumer-paced",
    "small-batch-pipe": "1b  the same on a one-way pipe",
    "pingpong": "2   ping-pong round trip",
    "large-1MiB": "3   1 MiB messages",
    "large-64MiB": "3   64 MiB messages",
    "queue-put": "4a  queue, producer-paced",
    "queue-fill": "4b  queue, consumer-paced",
    "queue-fanin": "4c  queue, 4 producers",
}


def colour(result: dict[str, Any]) -> str:
    family = result.get("family", "")
    return COLOURS.get((family, result.get("backend")), COLOURS.get(family, FALLBACK_COLOUR))


def machine(meta: dict[str, Any]) -> str:
    return (
        f"{meta.get('python', '?')} on {meta.get('platform', '?')}, {meta.get('cpus', '?')} CPUs;"
        f" medians of {meta.get('rounds', '?')} rounds"
    )


# --- the summary ------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the summary: a scenario and one of asyncmp's calls in it."""

    name: str
    asyncmp: dict[str, float]  # backend -> speed relative to the sync loop
    thread: float | None  # the fastest thread-per-call contender's, if it ran
    thread_factor: str  # "20-22x", how much faster asyncmp is than that thread


def speed(result: dict[str, Any], bench: dict[str, Any]) -> float | None:
    """Speed relative to the baseline: the ratio, inverted where lower is better."""
    ratio = result.get("ratio_vs_baseline")
    if ratio is None or ratio <= 0:
        return None
    return float(ratio) if bench.get("higher_is_better", True) else 1.0 / float(ratio)


def method_of(key: str) -> str:
    """'asyncmp-get_many-trio' -> 'get_many'; 'asyncmp-trio' -> ''."""
    parts = key.split("-")
    return "-".join(parts[1:-1])


def call_of(label: str) -> str:
    """'asyncmp get_many(100) [trio]' -> 'get_many(100)'."""
    return label.removeprefix("asyncmp ").split(" [")[0]


def summary_rows(doc: dict[str, Any]) -> Iterator[Row]:
    targets: dict[tuple[str, str], float] = {
        (t["benchmark"], t["contender"]): t["measured"]
        for t in doc.get("targets", [])
        if t.get("description", "").endswith("/ fastest thread-per-call")
    }
    for bench in doc["benchmarks"]:
        if bench.get("baseline") is None or is_pool(bench):
            continue  # no sync loop to compare with (the idle-CPU probe, the pools)
        if bench["id"].startswith("arrays-"):
            continue  # shared() against pickling, not against a sync loop: its own charts
        results = bench["results"]
        threads = [s for r in results if r["family"] == "thread" if (s := speed(r, bench))]
        methods: dict[str, dict[str, float]] = {}
        factors: dict[str, list[float]] = {}
        calls: dict[str, str] = {}
        for r in results:
            s = speed(r, bench)
            if r["family"] != "asyncmp" or s is None:
                continue
            method = method_of(r["key"])
            methods.setdefault(method, {})[r["backend"]] = s
            calls[method] = call_of(r["label"])
            factor = targets.get((bench["id"], r["key"]))
            if factor is None and threads:
                factor = s / max(threads)
            if factor is not None:
                factors.setdefault(method, []).append(factor)
        base = SHORT_NAMES.get(bench["id"]) or bench["title"].split(":")[0].split(" (")[0]
        for method, by_backend in methods.items():
            name = f"{base}: {calls[method]}" if len(methods) > 1 else base
            spread = factors.get(method, [])
            low, high = (min(spread), max(spread)) if spread else (0.0, 0.0)
            same = round(low) == round(high)
            times = f"{low:.0f}x" if same else f"{low:.0f}-{high:.0f}x"
            yield Row(name, by_backend, max(threads) if threads else None, times)


def is_pool(bench: dict[str, Any]) -> bool:
    return str(bench.get("id", "")).startswith("pool-")


def render_summary(doc: dict[str, Any], output: Path) -> bool:
    """Draw the summary; False (and nothing written) if no benchmark of the run has a
    sync baseline (a run of the pools only)."""
    rows = list(summary_rows(doc))
    if not rows:
        return False
    values = [v for row in rows for v in row.asyncmp.values()]
    values += [row.thread for row in rows if row.thread is not None]
    # The loops sit a little apart within a row, so that equal speeds don't hide each other.
    loops = Loops(rows, 0.26)
    fig, ax, left, right = log_rows(rows, 1.5, 0.3, values, 1.5)
    ax.axvspan(left, 1.0, color="#f6f8fa", zorder=0)
    ax.axvline(1.0, color=COLOURS["sync"], linewidth=1.5, zorder=1)
    for pos, row in enumerate(rows):
        if pos:
            ax.axhline(pos - 0.5, color=GRID, linewidth=0.6, zorder=1)
        if row.thread is not None:
            slowest = min(row.asyncmp.values())
            ax.plot(
                [row.thread, slowest],
                [pos, pos],
                color="#e6a77a",
                linewidth=1.2,
                linestyle=(0, (2, 2)),
                zorder=2,
            )
            ax.plot(row.thread, pos, "v", color=COLOURS["thread"], markersize=9, zorder=3)
            ax.annotate(
                f"asyncmp {row.thread_factor} faster",
                ((row.thread * slowest) ** 0.5, pos),  # the middle of the line, on a log axis
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
                color="#9a4f0f",
            )
        loops.plot(ax, row.asyncmp, pos)
    handles = loops.handles()
    handles.append(
        Line2D(
            [],
            [],
            marker="v",
            linestyle="",
            color=COLOURS["thread"],
            markersize=9,
            label="fastest thread per call",
        )
    )
    handles.append(Line2D([], [], color=COLOURS["sync"], linewidth=1.5, label="sync loop (1x)"))
    finish(
        fig,
        ax,
        [row.name for row in rows],
        9,
        [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5) if left <= t <= right],
        "speed next to the plain blocking loop (right is faster; log scale)",
        9,
        handles,
        len(handles),
        f"asyncmp next to a blocking loop and a thread per call\n{machine(doc.get('meta', {}))}",
        output,
    )
    return True


# --- what both summaries draw -----------------------------------------------------------------


class Loops:
    """asyncmp's markers, one per event loop, a little apart within a row."""

    def __init__(self, rows: list[Any], spread: float) -> None:
        self.backends = [b for b in MARKERS if any(b in row.asyncmp for row in rows)]
        middle = (len(self.backends) - 1) / 2
        self.offsets = {b: (i - middle) * spread for i, b in enumerate(self.backends)}

    def plot(self, ax: Any, speeds: dict[str, float], pos: int) -> None:
        for backend in self.backends:
            if backend in speeds:
                ax.plot(
                    speeds[backend],
                    pos + self.offsets[backend],
                    MARKERS[backend],
                    color=COLOURS["asyncmp", backend],
                    markersize=7,
                    markeredgecolor="white",
                    markeredgewidth=0.6,
                    zorder=4,
                )

    def handles(self) -> list[Line2D]:
        return [
            Line2D(
                [],
                [],
                marker=MARKERS[b],
                linestyle="",
                color=COLOURS["asyncmp", b],
                markersize=7,
                label=f"asyncmp, {b}",
            )
            for b in self.backends
        ]


def log_rows(
    rows: list[Any], height: float, per_row: float, values: list[float], margin: float
) -> tuple[Any, Any, float, float]:
    """A figure of one row per item of *rows*, the first on top, on a logarithmic axis
    that spans *values*, 1 and 0.5 with room on either side; and that axis's ends."""
    fig, ax = plt.subplots(
        figsize=(WIDTH_INCHES, height + per_row * len(rows)), layout="constrained"
    )
    left, right = min([*values, 0.5]) / 1.6, max([*values, 1.0]) * margin
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first row on top
    return fig, ax, left, right


def finish(
    fig: Any,
    ax: Any,
    names: list[str],
    name_size: float,
    ticks: list[float],
    xlabel: str,
    xlabel_size: float,
    handles: list[Line2D],
    ncol: int,
    title: str,
    output: Path,
) -> None:
    """Name the rows, mark the axis in speeds ("2x"), add the legend and the title, save."""
    ax.set_yticks(range(len(names)), names, fontsize=name_size)
    ax.tick_params(axis="y", length=0)
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks], fontsize=8.5)
    ax.minorticks_off()
    ax.set_xlabel(xlabel, fontsize=xlabel_size)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=ncol,
        fontsize=8,
        frameon=False,
        handletextpad=0.3,
        columnspacing=1.0,
    )
    fig.suptitle(title, fontsize=10.5)
    save(fig, output)


# --- the pools' summary -----------------------------------------------------------------------


@dataclass
class PoolRow:
    """One pool benchmark, next to its anchor."""

    name: str
    anchor: str  # the anchor's label
    asyncmp: dict[str, float]  # backend -> speed relative to the anchor
    peers: dict[str, float]  # another pool's family -> its speed relative to the anchor
    target: float | None


def pool_rows(doc: dict[str, Any]) -> Iterator[PoolRow]:
    targets: dict[str, float] = {
        t["benchmark"]: t["threshold"]
        for t in doc.get("targets", [])
        if t.get("op") == ">=" and str(t.get("benchmark", "")).startswith("pool-")
    }
    for bench in doc["benchmarks"]:
        baseline = bench.get("baseline")
        if not is_pool(bench) or baseline is None:
            continue  # the cancellation and start benchmarks: times, no anchor
        ours: dict[str, float] = {}
        peers: dict[str, float] = {}
        anchor = baseline
        for r in bench["results"]:
            if r["key"] == baseline:
                anchor = r["label"]
                continue
            s = speed(r, bench)
            if s is None:
                continue
            if r["family"] == "asyncmp":
                ours[r["backend"]] = s
            elif r["family"] != "candidate":
                peers[r["family"]] = s
        if ours:
            name = textwrap.fill(bench["title"].split(":", 1)[-1].strip(), 34)
            yield PoolRow(name, anchor, ours, peers, targets.get(bench["id"]))


def render_pool_summary(doc: dict[str, Any], output: Path) -> bool:
    """Draw the pools' summary; False (and nothing written) if the run had no pools."""
    rows = list(pool_rows(doc))
    if not rows:
        return False
    loops = Loops(rows, 0.22)
    values = [v for row in rows for v in row.asyncmp.values()]
    values += [v for row in rows for v in row.peers.values()]
    values += [row.target for row in rows if row.target is not None]
    fig, ax, left, right = log_rows(rows, 1.9, 0.55, values, 1.6)
    ax.axvline(1.0, color=COLOURS["sync"], linewidth=1.5, zorder=1)
    peer_handles: dict[str, Line2D] = {}
    for pos, row in enumerate(rows):
        if pos:
            ax.axhline(pos - 0.5, color=GRID, linewidth=0.6, zorder=1)
        if row.target is not None:
            ax.plot([row.target] * 2, [pos - 0.4, pos + 0.4], color=TARGET_COLOUR, linewidth=1.2)
            ax.annotate(
                f"target {row.target:g}x",
                (row.target, pos - 0.4),
                xytext=(3, 0),
                textcoords="offset points",
                va="top",
                fontsize=7.5,
                color=TARGET_COLOUR,
            )
        for family, value in row.peers.items():
            marker, tint = PEERS.get(family, ("o", FALLBACK_COLOUR))
            ax.plot(value, pos, marker, color=tint, markersize=7, alpha=0.85, zorder=3)
            peer_handles.setdefault(
                family,
                Line2D([], [], marker=marker, linestyle="", color=tint, markersize=7, label=family),
            )
        loops.plot(ax, row.asyncmp, pos)
    handles = loops.handles()
    handles += peer_handles.values()
    handles.append(Line2D([], [], color=COLOURS["sync"], linewidth=1.5, label="anchor (1x)"))
    ticks = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)
    finish(
        fig,
        ax,
        [row.name for row in rows],
        8.5,
        [t for t in ticks if left <= t <= right],
        "speed next to the anchor, 1x (right is faster; log scale)\nanchor: anyio.to_process"
        " for the tiny tasks, ProcessPoolExecutor for the CPU-bound ones",
        8.5,
        handles,
        min(len(handles), 4),
        "asyncmp's pool next to the other ways to run functions in processes\n"
        f"{machine(doc.get('meta', {}))}",
        output,
    )
    return True


# --- one chart per benchmark ------------------------------------------------------------------


def render_detail(bench: dict[str, Any], output: Path, *, candidates: bool = False) -> None:
    results = [r for r in bench["results"] if candidates or r.get("family") != "candidate"]
    title = textwrap.fill(bench["title"], 92)
    title_lines = title.count("\n") + 1
    fig, ax = plt.subplots(
        figsize=(WIDTH_INCHES, 0.8 + 0.2 * title_lines + 0.3 * len(results)),
        layout="constrained",
    )
    labels = [r["label"] for r in results]
    medians = [r["median"] for r in results]
    lower = [max(r["median"] - r["q1"], 0.0) for r in results]
    upper = [max(r["q3"] - r["median"], 0.0) for r in results]
    positions = list(range(len(results)))
    ax.barh(
        positions,
        medians,
        xerr=[lower, upper],
        color=[colour(r) for r in results],
        error_kw={"ecolor": MUTED, "capsize": 2.5, "linewidth": 0.9},
    )
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()  # the table's order, top to bottom
    better = "higher" if bench.get("higher_is_better", True) else "lower"
    ax.set_xlabel(f"{bench['unit']} ({better} is better)", fontsize=8.5)
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    ax.tick_params(axis="x", labelsize=8)
    positive = [m for m in medians if m > 0]
    if positive and max(positive) / min(positive) > LOG_SPAN:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(plain_number))
    ax.grid(axis="x", color=GRID, linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.margins(x=0.12)  # room for the ratios right of the longest bar
    for pos, result in zip(positions, results, strict=True):
        ratio = result.get("ratio_vs_baseline")
        if result["key"] == bench.get("baseline"):
            note = "baseline"
        elif ratio is None:
            continue
        else:
            note = f"{ratio:.3g}x"  # as the tables round it
        ax.annotate(
            note,
            (max(result["median"], result["q3"]), pos),  # right of the whisker
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=7.5,
            color=MUTED,
        )
    save(fig, output)


def plain_number(value: float, _position: object) -> str:
    """A log axis's tick as the tables write numbers: 10,000 rather than 10^4."""
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def save(fig: Any, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=DPI)
    plt.close(fig)


def render(doc: dict[str, Any], output_dir: Path, *, candidates: bool = False) -> list[Path]:
    """Write the summary and a chart per benchmark; return the paths written. With
    *candidates*, the per-benchmark charts show candidate copies of asyncmp too."""
    benchmarks = doc.get("benchmarks", [])
    if not benchmarks:
        raise SystemExit("chart: the results hold no benchmark")
    written: list[Path] = []
    # A summary the run has nothing for is removed: the page must not show an old one.
    for name, draw in ((SUMMARY, render_summary), (POOL_SUMMARY, render_pool_summary)):
        path = output_dir / name
        if draw(doc, path):
            written.append(path)
        else:
            path.unlink(missing_ok=True)
    details = output_dir / DETAILS
    for bench in benchmarks:
        path = details / f"{bench['id']}.png"
        render_detail(bench, path, candidates=candidates)
        written.append(path)
    for stale in set(details.glob("*.png")) - set(written):
        stale.unlink()  # a benchmark this run did not have
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="run.py's JSON")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        help=f"where {SUMMARY}, {POOL_SUMMARY} and {DETAILS}/<benchmark id>.png go",
    )
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="draw candidate copies of asyncmp (run.py --candidate) in the per-benchmark charts",
    )
    args = parser.parse_args(argv)
    try:
        doc = json.loads(args.input.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"chart: {args.input} not found; run benchmarks/run.py first", file=sys.stderr)
        return 1
    for path in render(doc, args.output_dir, candidates=args.candidates):
        print(f"chart: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
