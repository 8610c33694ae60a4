"""MkDocs hook: put the latest benchmark results on the performance page, when there are any.

``nox -s bench`` writes ``benchmarks/results/latest.md`` and ``latest.json``, and draws from
the same run ``docs/images/bench.png`` (the summary) and ``docs/images/bench/<id>.png`` (one
chart per benchmark). Until they exist, the page says how to produce them instead; a strict
build must not fail for want of a measurement. Where the page says ``<!-- bench-results -->``
this hook puts the summary chart, then the tables of ``latest.md`` (from its second line: the
first is its own title), each section with its own chart under its heading. Where it says
``<!-- bench-pool-chart -->`` it puts the pools' summary (``docs/images/bench-pool.png``).
The numbers are read from the files at build time and never copied into the page. Each chart
is a link to itself, so a click shows it at full size. A run of some benchmarks only (say
``--only pool``) has no chart for what it left out: that chart is left out of the page too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "<!-- bench-results -->"
POOL_MARKER = "<!-- bench-pool-chart -->"
TABLE = "benchmarks/results/latest.md"
RESULTS = "benchmarks/results/latest.json"  # the benchmarks' ids, to name their charts
SUMMARY = "images/bench.png"  # relative to docs/
POOL_SUMMARY = "images/bench-pool.png"  # relative to docs/
DETAILS = "images/bench"  # relative to docs/: <benchmark id>.png

SUMMARY_ALT = (
    "Summary: for each scenario, asyncmp's speed on asyncio, uvloop and trio next to the plain"
    " blocking loop (1x) and next to the fastest thread-per-call way"
)
SUMMARY_TEXT = """\
Each row is a scenario from the sections below. A marker's place on the axis is asyncmp's speed
next to the plain blocking loop, the grey line at 1x; the orange triangle is the fastest way
that spends a thread per call, where the scenario has one. Click a chart to see it at full
size; the tables give every contender's median, spread and CPU time.
"""
DETAIL_ALT = "A bar per contender: the median, with the middle half of the rounds as a whisker"
POOL_ALT = (
    "For each pool benchmark, asyncmp's speed on asyncio, uvloop and trio next to its anchor"
    " (1x), next to the other pools, and its target"
)
POOL_MISSING = "*The latest results have no pool benchmarks: `nox -s bench` runs them.*\n"
MISSING = """!!! note "No results yet"
    This build found no benchmark results. Run `nox -s bench` (a few minutes), which
    writes `benchmarks/results/latest.md` and draws the charts in `docs/images/`, then build
    the documentation again.
"""


def chart(path: str, alt: str) -> str:
    """An image that links to itself: the page shows it at its width, a click at full size."""
    return f"[![{alt}]({path})]({path})"


def results(root: Path, docs: Path) -> str:
    doc = json.loads((root / RESULTS).read_text(encoding="utf-8"))
    ids = {bench["title"]: bench["id"] for bench in doc.get("benchmarks", [])}
    lines = [chart(SUMMARY, SUMMARY_ALT), "", SUMMARY_TEXT] if (docs / SUMMARY).is_file() else []
    for line in (root / TABLE).read_text(encoding="utf-8").splitlines()[1:]:
        if not line.startswith("## "):
            lines.append(line)
            continue
        lines.append(f"#{line}")  # a level below the page's own "Latest results"
        bench = ids.get(line.removeprefix("## "))
        if bench is not None and (docs / DETAILS / f"{bench}.png").is_file():
            lines += ["", chart(f"{DETAILS}/{bench}.png", DETAIL_ALT)]
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    root = Path(config["config_file_path"]).parent
    docs = Path(config["docs_dir"])
    have = all((root / name).is_file() for name in (TABLE, RESULTS))
    pools = (
        chart(POOL_SUMMARY, POOL_ALT) + "\n" if (docs / POOL_SUMMARY).is_file() else POOL_MISSING
    )
    markdown = markdown.replace(POOL_MARKER, pools if have else "")
    return markdown.replace(MARKER, results(root, docs) if have else MISSING)
