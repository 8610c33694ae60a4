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

Prose on any page quotes a measured number with a placeholder, never by hand:
``{{ bench ID KEY FIELD [UNIT] }}`` is replaced by that number from ``latest.json``. ID is a
benchmark's id and KEY a contender's key; either may be a glob (``asyncmp-*``), and several
matches give a range (``161-187 ms``). FIELD is ``median`` (in the benchmark's unit, or in
UNIT: ``s`` for a benchmark in ``ms``), ``speed`` (its speed next to the benchmark's
baseline, from the median of the per-round ratios; for a time, the baseline's time over its
own: ``3.51x``) or ``cpu`` (the CPU time per operation, in microseconds, or in UNIT
``ms``). ``{{ bench machine }}`` is the machine and Python of the run. Without results a
placeholder reads "(not measured)"; a benchmark the latest run left out, "(not in the latest
run)"; a KEY that matches nothing in a benchmark that ran, or a FIELD or UNIT it doesn't
know, fails the build.

A run may also measure another copy of asyncmp beside this one (``run.py --candidate
TAG=PATH``, a proposed change against the code it started from): its rows, ``asyncmp:TAG``,
and its targets stay in the results files, for whoever made the change, and are left out of
the page, as ``chart.py`` leaves them out of the charts.
"""

from __future__ import annotations

import json
import math
import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

MARKER = "<!-- bench-results -->"
POOL_MARKER = "<!-- bench-pool-chart -->"
TABLE = "benchmarks/results/latest.md"
RESULTS = "benchmarks/results/latest.json"  # the benchmarks' ids, to name their charts
SUMMARY = "images/bench.png"  # relative to docs/
POOL_SUMMARY = "images/bench-pool.png"  # relative to docs/
DETAILS = "images/bench"  # relative to docs/: <benchmark id>.png
#: A table row of a candidate copy of asyncmp: it names "asyncmp:TAG" (the installed copy is
#: plain "asyncmp").
CANDIDATE_ROW = re.compile(r"^\|.*\basyncmp:\S")

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
        if CANDIDATE_ROW.match(line):
            continue
        if not line.startswith("## "):
            lines.append(line)
            continue
        lines.append(f"#{line}")  # a level below the page's own "Latest results"
        bench = ids.get(line.removeprefix("## "))
        if bench is not None and (docs / DETAILS / f"{bench}.png").is_file():
            lines += ["", chart(f"{DETAILS}/{bench}.png", DETAIL_ALT)]
    return "\n".join(lines) + "\n"


#: A measured number in prose (see the module's docstring).
NUMBER = re.compile(r"\{\{\s*bench\s+([^{}]*?)\s*\}\}")
#: What a number in UNIT is, in the unit the results give it in.
SCALES = {("ms", "s"): 1e-3, ("us", "ms"): 1e-3}


def fmt(values: list[float], digits: int) -> str:
    """The range of *values* ("161-187"), one value if they round alike: as many decimals as
    give the larger one *digits* significant digits, as the tables write numbers."""
    low, high = min(values), max(values)
    decimals = max(0, digits - 1 - math.floor(math.log10(high))) if high > 0 else 0
    low_text, high_text = f"{low:,.{decimals}f}", f"{high:,.{decimals}f}"
    return low_text if low_text == high_text else f"{low_text}-{high_text}"


def number(doc: dict[str, Any] | None, spec: str) -> str:
    """The text for one placeholder ``{{ bench SPEC }}``."""
    words = spec.split()
    if doc is None:
        return "(not measured)"
    if words == ["machine"]:
        meta = doc.get("meta", {})
        python, platform = meta.get("python", "?"), meta.get("platform", "?")
        return f"{python} on {platform}, {meta.get('cpus', '?')} CPUs"
    if len(words) not in (3, 4):
        raise ValueError(f"{{{{ bench {spec} }}}}: want ID KEY FIELD [UNIT]")
    pattern, key, field = words[:3]
    benches = [b for b in doc.get("benchmarks", []) if fnmatchcase(b["id"], pattern)]
    if not benches:
        return "(not in the latest run)"
    values: list[float] = []
    unit = ""
    for bench in benches:
        found = [
            r
            for r in bench["results"]
            if fnmatchcase(r["key"], key) and r.get("family") != "candidate"
        ]
        if not found:
            raise ValueError(f"{{{{ bench {spec} }}}}: no contender {key!r} in {bench['id']}")
        for result in found:
            if field == "median":
                values.append(float(result["median"]))
                unit = bench["unit"]
            elif field == "cpu":
                values.append(float(result["cpu_us_per_op"]))
                unit = "us"
            elif field == "speed":
                ratio = result.get("ratio_vs_baseline")
                if not ratio:
                    raise ValueError(f"{{{{ bench {spec} }}}}: {result['key']} has no ratio")
                better = bench.get("higher_is_better", True)
                values.append(float(ratio) if better else 1.0 / float(ratio))
                unit = "x"
            else:
                raise ValueError(f"{{{{ bench {spec} }}}}: FIELD is median, speed or cpu")
    if len(words) == 4:
        scale = SCALES.get((unit, words[3]))
        if scale is None:
            raise ValueError(f"{{{{ bench {spec} }}}}: can't give {unit} in {words[3]}")
        values = [v * scale for v in values]
        unit = words[3]
    text = fmt(values, 3)
    return text + {"x": "x", "us": " µs"}.get(unit, f" {unit}")


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    root = Path(config["config_file_path"]).parent
    if NUMBER.search(markdown):
        path = root / RESULTS
        doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        markdown = NUMBER.sub(lambda m: number(doc, m.group(1)), markdown)
    if MARKER not in markdown:
        return markdown
    docs = Path(config["docs_dir"])
    have = all((root / name).is_file() for name in (TABLE, RESULTS))
    pools = (
        chart(POOL_SUMMARY, POOL_ALT) + "\n" if (docs / POOL_SUMMARY).is_file() else POOL_MISSING
    )
    markdown = markdown.replace(POOL_MARKER, pools if have else "")
    return markdown.replace(MARKER, results(root, docs) if have else MISSING)
