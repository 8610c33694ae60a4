"""Statistics over the rounds, and the markdown and JSON that report them."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

__all__ = (
    "Row",
    "Series",
    "Table",
    "Target",
    "Value",
    "play_round",
    "record_round",
    "render_markdown",
    "series_of",
    "to_json",
    "trial_size",
    "write_results",
)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


@dataclass
class Series:
    """One contender in one benchmark: a value per round, and ratios paired per round."""

    key: str
    label: str
    backend: str | None
    family: str
    n_per_trial: int = 0
    values: list[float] = field(default_factory=list)
    #: ratio against the table's baseline, computed within each round
    ratios: list[float] = field(default_factory=list)
    #: CPU microseconds this process spent per message (or round trip), per round
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    def to_json(self) -> dict[str, Any]:
        q1, q3 = _quartiles(self.values)
        return {
            "key": self.key,
            "label": self.label,
            "backend": self.backend,
            "family": self.family,
            "n_per_trial": self.n_per_trial,
            "samples": self.values,
            "median": self.median,
            "q1": q1,
            "q3": q3,
            "ratio_vs_baseline": self.ratio,
            "ratio_samples": self.ratios,
            "cpu_us_per_op": statistics.median(self.cpu) if self.cpu else None,
            "cpu_us_per_op_samples": self.cpu,
        }


@dataclass
class Table:
    """One benchmark: its contenders' series, in display order."""

    id: str
    title: str
    unit: str
    higher_is_better: bool
    ratio_label: str
    params: dict[str, Any]
    series: list[Series]
    baseline: str | None = "sync"  #: None: no ratios (nothing to compare against)
    op: str = "msg"  #: what one operation is, for the CPU column

    def get(self, key: str) -> Series | None:
        for s in self.series:
            if s.key == key:
                return s
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "baseline": self.baseline,
            "ratio_label": self.ratio_label,
            "op": self.op,
            "params": self.params,
            "results": [s.to_json() for s in self.series],
        }


class Row(Protocol):
    """What a table shows of a contender: every section's contenders have these."""

    @property
    def key(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def backend(self) -> str | None: ...
    @property
    def family(self) -> str: ...


R = TypeVar("R", bound=Row)
#: What one trial gives a table: its value, and the CPU per operation (None: not measured).
Value = tuple[float, float | None]


def series_of(rows: Iterable[Row], n_per_trial: int = 0) -> list[Series]:
    """A table's series, one per contender, in the contenders' order."""
    return [Series(r.key, r.label, r.backend, r.family, n_per_trial) for r in rows]


def trial_size(seconds: float, probe: int, trial_seconds: float, n_min: int, n_max: int) -> int:
    """How many operations fill ~*trial_seconds*, from a probe of *probe* that took
    *seconds*, within [*n_min*, *n_max*]."""
    per_op = max(seconds, 1e-9) / probe
    return max(n_min, min(n_max, math.ceil(trial_seconds / per_op)))


def record_round(table: Table, got: dict[str, float], cpu: dict[str, float | None]) -> None:
    """Add one round to *table*: each series' value and CPU (where it has one), and its
    ratio to the baseline measured in the same round."""
    base = got[table.baseline] if table.baseline is not None else None
    for s in table.series:
        if s.key not in got:
            continue
        s.values.append(got[s.key])
        if cpu.get(s.key) is not None:
            s.cpu.append(cpu[s.key])  # type: ignore[arg-type]
        if base is not None and s.key != table.baseline:
            s.ratios.append(got[s.key] / base)


def play_round(
    table: Table,
    contenders: Sequence[R],
    rng: Any,
    measure: Callable[[R], Value],
) -> dict[str, float]:
    """One round of *table*: *measure* each contender (value, CPU or None), in an order
    shuffled anew, and record the round; returns the values by contender key."""
    order = list(contenders)
    rng.shuffle(order)
    got: dict[str, float] = {}
    cpu: dict[str, float | None] = {}
    for c in order:
        got[c.key], cpu[c.key] = measure(c)
    record_round(table, got, cpu)
    return got


@dataclass
class Target:
    benchmark: str
    contender: str
    description: str
    op: str  #: ">=", "<=", or "ref" for a reference value that is no target
    threshold: float
    measured: float | None
    unit: str = "x"  #: "x" for a ratio, "%" a percentage, "ms" milliseconds, "MiB" memory

    @property
    def met(self) -> bool | None:
        if self.measured is None or self.op == "ref":
            return None
        if self.op == ">=":
            return self.measured >= self.threshold
        return self.measured <= self.threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "contender": self.contender,
            "description": self.description,
            "op": self.op,
            "threshold": self.threshold,
            "measured": self.measured,
            "unit": self.unit,
            "met": self.met,
        }


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}x" if value < 10 else f"{value:.1f}x"


def _fmt_measured(value: float | None, unit: str) -> str:
    if unit == "%":
        return "-" if value is None else f"{value:.2g}%"
    if unit in ("ms", "MiB"):
        return "-" if value is None else f"{value:.3g} {unit}"
    return _fmt_ratio(value)


def _unit(unit: str) -> str:
    return {"%": "%", "ms": " ms", "MiB": " MiB"}.get(unit, "")


def render_markdown(meta: dict[str, Any], tables: list[Table], targets: list[Target]) -> str:
    lines = ["# asyncmp benchmarks", ""]
    lines.append(
        f"{meta['python']} on {meta['platform']}, {meta['cpus']} CPUs; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + "."
    )
    idle = meta.get("idle_rounds")
    lines.append(
        f"Mode {meta['mode']}: {meta['rounds']} rounds of ~{meta['trial_seconds']:.2f} s trials,"
        f" contenders interleaved in a shuffled order each round (seed {meta['seed']});"
        + (f" {idle} rounds of the idle-CPU probe;" if idle else "")
        + f" {meta['started']}, {meta['elapsed_seconds']:.0f} s in all."
    )
    lines.append(
        "Values are medians over the rounds, IQR the middle half of them; ratios are the"
        " median of per-round ratios against the baseline measured in the same round."
        " CPU is the time the measuring process spent (all its threads, not the worker's)"
        " per operation: less disturbed by a busy machine than the wall clock."
    )
    lines.append("")
    for table in tables:
        lines.append(f"## {table.title}")
        lines.append("")
        better = "higher" if table.higher_is_better else "lower"
        lines.append(
            f"| contender | {table.unit} (median, {better} is better) | IQR"
            f" | {table.ratio_label} | CPU us/{table.op} | n/trial |"
        )
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for s in table.series:
            q1, q3 = _quartiles(s.values)
            ratio = "1 (baseline)" if s.key == table.baseline else _fmt_ratio(s.ratio)
            cpu = _fmt(statistics.median(s.cpu)) if s.cpu else "-"
            lines.append(
                f"| {s.label} | {_fmt(s.median)} | {_fmt(q1)} - {_fmt(q3)} | {ratio}"
                f" | {cpu} | {s.n_per_trial:,} |"
            )
        lines.append("")
    if targets:
        lines.append("## Targets")
        lines.append("")
        lines.append("| benchmark | target | measured | met |")
        lines.append("| --- | --- | ---: | :---: |")
        for t in targets:
            if t.op == "ref":
                measured = _fmt_measured(t.measured, t.unit)
                lines.append(f"| {t.benchmark} | ({t.description}) | {measured} | |")
                continue
            status = {True: "yes", False: "**no**", None: "n/a"}[t.met]
            lines.append(
                f"| {t.benchmark} | {t.description} {t.op} {t.threshold:g}{_unit(t.unit)} |"
                f" {_fmt_measured(t.measured, t.unit)} | {status} |"
            )
        lines.append("")
    for note in meta.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def to_json(meta: dict[str, Any], tables: list[Table], targets: list[Target]) -> str:
    doc = {
        "schema": 1,
        "meta": meta,
        "benchmarks": [t.to_json() for t in tables],
        "targets": [t.to_json() for t in targets],
    }
    return json.dumps(doc, indent=2) + "\n"


def write_results(directory: Path, markdown: str, json_text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "latest.md").write_text(markdown, encoding="utf-8")
    (directory / "latest.json").write_text(json_text, encoding="utf-8")
