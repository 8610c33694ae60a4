"""Draw the benchmark results as one PNG: a panel per benchmark, a bar per contender.

Reads the JSON that ``benchmarks/run.py`` writes (``benchmarks/results/latest.json``) and
writes ``docs/images/bench.png``, which the documentation's performance page shows. Each
bar is the median over the rounds; the whisker spans the middle half of the rounds (IQR).
A panel whose values span more than a factor of 30 gets a logarithmic axis, so that the
thread-per-call contenders and asyncmp fit on one scale.

    python benchmarks/chart.py [--input results/latest.json] [--output ../docs/images/bench.png]

``nox -s bench`` runs it after ``run.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE / "results" / "latest.json"
DEFAULT_OUTPUT = HERE.parent / "docs" / "images" / "bench.png"

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
FALLBACK_COLOUR = "#afb8c1"
LOG_SPAN = 30.0


def colour(result: dict[str, Any]) -> str:
    family = result.get("family", "")
    return COLOURS.get((family, result.get("backend")), COLOURS.get(family, FALLBACK_COLOUR))


def subtitle(meta: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    return (
        f"{meta.get('python', '?')} on {meta.get('platform', '?')}, {meta.get('cpus', '?')} CPUs;"
        f" mode {meta.get('mode', '?')}, {meta.get('rounds', '?')} rounds; {versions}"
    )


def draw_panel(ax: Any, bench: dict[str, Any]) -> None:
    results = bench["results"]
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
        error_kw={"ecolor": "#57606a", "capsize": 2, "linewidth": 0.8},
    )
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()  # the table's order, top to bottom
    better = "higher" if bench.get("higher_is_better", True) else "lower"
    ax.set_xlabel(f"{bench['unit']} ({better} is better)", fontsize=8)
    ax.set_title(bench["title"], fontsize=9, loc="left", wrap=True)
    ax.tick_params(axis="x", labelsize=8)
    positive = [m for m in medians if m > 0]
    if positive and max(positive) / min(positive) > LOG_SPAN:
        ax.set_xscale("log")
    ax.grid(axis="x", color="#d0d7de", linewidth=0.6)
    ax.set_axisbelow(True)
    for pos, result in zip(positions, results, strict=True):
        ratio = result.get("ratio_vs_baseline")
        if result["key"] == bench.get("baseline"):
            note = "baseline"
        elif ratio is None:
            continue
        else:
            note = f"{ratio:.2f}x"
        ax.annotate(
            note,
            (max(result["median"], result["q3"]), pos),  # right of the whisker
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            color="#57606a",
        )


def render(doc: dict[str, Any], output: Path) -> None:
    benchmarks = doc.get("benchmarks", [])
    if not benchmarks:
        raise SystemExit("chart: the results hold no benchmark")
    columns = 2 if len(benchmarks) > 1 else 1
    rows = math.ceil(len(benchmarks) / columns)
    heights = [
        max(len(b["results"]) for b in benchmarks[i : i + columns])
        for i in range(0, len(benchmarks), columns)
    ]
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(7.5 * columns, sum(0.32 * h + 1.4 for h in heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, bench in zip(axes.flat, benchmarks, strict=False):
        draw_panel(ax, bench)
    for ax in list(axes.flat)[len(benchmarks) :]:
        ax.set_visible(False)
    fig.suptitle(f"asyncmp benchmarks\n{subtitle(doc.get('meta', {}))}", fontsize=10)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="run.py's JSON")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        doc = json.loads(args.input.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"chart: {args.input} not found; run benchmarks/run.py first", file=sys.stderr)
        return 1
    render(doc, args.output)
    print(f"chart: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
