"""MkDocs hook: put the latest benchmark results on the performance page, when there are any.

``nox -s bench`` writes ``benchmarks/results/latest.md`` and draws ``docs/images/bench.png``
from the same run. Until both exist, the page says how to produce them instead; a strict
build must not fail for want of a measurement. Where the page says ``<!-- bench-results -->``
this hook puts a snippet include of the table (from its second line: the first is its own
title) and the chart, so the numbers come from the file and are never copied into the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKER = "<!-- bench-results -->"
TABLE = "benchmarks/results/latest.md"
CHART = "images/bench.png"  # relative to docs/

FOUND = f"""![The benchmark results: a panel per benchmark, a bar per contender, medians with the
middle half of the rounds as whiskers]({CHART})

--8<-- "{TABLE}:2"
"""
MISSING = """!!! note "No results yet"
    This build found no benchmark results. Run `nox -s bench` (about a minute and a half), which
    writes `benchmarks/results/latest.md` and draws `docs/images/bench.png`, then build the
    documentation again.
"""


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    root = Path(config["config_file_path"]).parent
    have = (root / TABLE).is_file() and (Path(config["docs_dir"]) / CHART).is_file()
    return markdown.replace(MARKER, FOUND if have else MISSING)
