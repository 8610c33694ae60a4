"""Benchmark asyncmp against the synchronous stdlib and the thread-per-call ways.

Run ``python benchmarks/run.py`` (``nox -s bench`` passes its arguments through):

* ``--quick``: a short run (under 30 s) for a smoke check;
* ``--backend asyncio,trio`` (or the option repeated): only these event loops;
* ``--only small,pingpong,large``: only these benchmarks.

What is measured, against one forked worker process:

1. Receive throughput of 100-byte pickles, (a) when the worker calls ``send()`` per
   message and (b) when it writes pre-framed batches raw, so the consumer is the
   bottleneck. Contenders: asyncmp ``recv()`` per event loop, the plain ``conn.recv()``
   loop, ``run_in_executor(None, conn.recv)``, ``anyio.to_thread.run_sync(conn.recv)``
   and aioprocessing's ``coro_recv()``.
2. Ping-pong latency: the parent sends, the worker echoes.
3. Large-message throughput: ``recv_bytes()`` of 1 MiB and 64 MiB, against a raw copy of
   the same bytes into a preallocated buffer.

The machine may be shared and noisy, so the contenders of a benchmark run interleaved,
in a freshly shuffled order every round, and the report gives medians over rounds and
ratios taken within each round. Nothing here asserts a timing: targets are reported as
met or not, and the exit status says only whether the run worked.

Results go to stdout as markdown, and to ``benchmarks/results/latest.md`` and
``latest.json``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from time import perf_counter
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import asyncmp
except ImportError:  # not installed: run from a checkout
    sys.path.insert(1, str(HERE.parent / "src"))
    import asyncmp

from _cases import (  # noqa: E402
    BACKENDS,
    DEFAULT_IMPLS,
    Contender,
    Impl,
    Timing,
    large_contenders,
    load_candidate,
    pingpong_contenders,
    small_contenders,
)
from _report import (  # noqa: E402
    Series,
    Table,
    Target,
    render_markdown,
    to_json,
    write_results,
)
from _worker import Command, Worker  # noqa: E402

#: b"x" * 85 pickles to exactly 100 bytes.
SMALL_MESSAGE = b"x" * 85
PINGPONG_MESSAGE = b"x" * 85
LARGE_SIZES = (1 << 20, 64 << 20)


@dataclass
class Workload:
    id: str
    title: str
    unit: str
    higher_is_better: bool
    ratio_label: str
    contenders: list[Contender]
    #: (contender, messages timed) -> the worker's command (it sends one more)
    command: Callable[[Contender, int], Command]
    arg: Any  #: passed to each consumer
    transport: str
    #: (seconds, messages timed) -> the reported value
    value: Callable[[float, int], float]
    probe_n: Callable[[Contender], int]
    n_min: int
    n_max: int
    params: dict[str, Any]
    op: str = "msg"


def _rate(seconds: float, n: int) -> float:
    return n / seconds


def _micros_per(seconds: float, n: int) -> float:
    return seconds / n * 1e6


def _small(
    regime: str, transport: str, backends: tuple[str, ...], impls: tuple[Impl, ...]
) -> Workload:
    contenders = small_contenders(backends, impls)
    if transport == "pipe":
        contenders = [c for c in contenders if c.family in ("sync", "asyncmp", "candidate")]
    how = (
        "the producer calls send() per message"
        if regime == "send"
        else "the producer writes pre-framed batches (the consumer is the bottleneck)"
    )
    medium = "socketpair, the default Pipe()" if transport == "socket" else "os.pipe, Pipe(False)"
    number = "1a" if regime == "send" else "1b"
    return Workload(
        id=f"small-{regime}-{transport}",
        title=f"{number}. Receive 100-byte pickles: {how} ({medium})",
        unit="msgs/s",
        higher_is_better=True,
        ratio_label="x sync",
        contenders=contenders,
        command=lambda c, n: ("stream", transport, regime, n + 1, SMALL_MESSAGE),
        arg=SMALL_MESSAGE,
        transport=transport,
        value=_rate,
        probe_n=lambda c: 1000 if c.family == "thread" else 10000,
        n_min=200,
        n_max=2_000_000,
        params={"message_pickle_bytes": 100, "regime": regime, "transport": transport},
    )


def _pingpong(backends: tuple[str, ...], impls: tuple[Impl, ...]) -> Workload:
    return Workload(
        id="pingpong",
        title="2. Ping-pong round trip of a 100-byte pickle (socketpair): parent sends,"
        " worker echoes",
        unit="us/round trip",
        higher_is_better=False,
        ratio_label="latency / sync",
        contenders=pingpong_contenders(backends, impls),
        command=lambda c, n: ("echo", n + 1),
        arg=PINGPONG_MESSAGE,
        transport="socket",
        value=_micros_per,
        probe_n=lambda c: 1000,
        n_min=100,
        n_max=200_000,
        params={"message_pickle_bytes": 100, "transport": "socket"},
        op="round trip",
    )


def _large(size: int, backends: tuple[str, ...], impls: tuple[Impl, ...]) -> Workload:
    mib = size >> 20

    def command(c: Contender, n: int) -> Command:
        kind = "raw" if c.family == "raw" else "bytes"
        return (kind, "socket", size, n + 1)

    return Workload(
        id=f"large-{mib}MiB",
        title=f"3. Receive {mib} MiB messages with recv_bytes() (socketpair)",
        unit="MiB/s",
        higher_is_better=True,
        ratio_label="x sync",
        contenders=large_contenders(backends, impls),
        command=command,
        arg=size,
        transport="socket",
        value=lambda seconds, n: n * mib / seconds,
        probe_n=lambda c: max(1, (16 << 20) // size),
        n_min=2,
        n_max=100_000,
        params={"message_bytes": size, "transport": "socket"},
    )


class Bench:
    def __init__(self, worker: Worker, trial_seconds: float, progress: bool) -> None:
        self.worker = worker
        self.trial_seconds = trial_seconds
        self.progress = progress
        self.notes: list[str] = []

    def trial(self, w: Workload, c: Contender, n: int) -> Timing:
        self.worker.start(w.command(c, n))
        timing = c.consume(self.worker.data(w.transport), n, w.arg)
        self.worker.finish()
        fd = self.worker.data(w.transport).fileno()
        if not os.get_blocking(fd):  # the project's invariant: never flip shared flags
            self.notes.append(f"{c.label} left O_NONBLOCK set on the shared descriptor")
            os.set_blocking(fd, True)
        return timing

    def calibrate(self, w: Workload, c: Contender) -> int:
        """One warm-up trial, which also sizes the trials to ~trial_seconds."""
        probe = w.probe_n(c)
        seconds, _ = self.trial(w, c, probe)
        per_item = max(seconds, 1e-9) / probe
        return max(w.n_min, min(w.n_max, math.ceil(self.trial_seconds / per_item)))

    def log(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)


def run(
    workloads: list[Workload], rounds: int, bench: Bench, rng: random.Random
) -> tuple[list[Table], list[Target]]:
    tables: list[Table] = []
    sizes: list[dict[str, int]] = []
    for w in workloads:
        bench.log(f"calibrating {w.id}")
        sizes.append({c.key: bench.calibrate(w, c) for c in w.contenders})
        tables.append(
            Table(
                id=w.id,
                title=w.title,
                unit=w.unit,
                higher_is_better=w.higher_is_better,
                ratio_label=w.ratio_label,
                params=w.params,
                op=w.op,
                series=[
                    Series(c.key, c.label, c.backend, c.family, sizes[-1][c.key])
                    for c in w.contenders
                ],
            )
        )
    # per round, per benchmark: contender key -> value, for the paired ratios
    per_round: list[list[dict[str, float]]] = [[] for _ in workloads]
    for r in range(rounds):
        start = perf_counter()
        for i, w in enumerate(workloads):
            order = list(w.contenders)
            rng.shuffle(order)
            got: dict[str, float] = {}
            cpu: dict[str, float] = {}
            for c in order:
                n = sizes[i][c.key]
                seconds, cpu_seconds = bench.trial(w, c, n)
                got[c.key] = w.value(seconds, n)
                cpu[c.key] = cpu_seconds / n * 1e6
            per_round[i].append(got)
            table = tables[i]
            base = got[table.baseline]
            for s in table.series:
                s.values.append(got[s.key])
                s.cpu.append(cpu[s.key])
                if s.key != table.baseline:
                    s.ratios.append(got[s.key] / base)
        bench.log(f"round {r + 1}/{rounds} done in {perf_counter() - start:.1f} s")
    return tables, _targets(tables, per_round)


def _targets(tables: list[Table], per_round: list[list[dict[str, float]]]) -> list[Target]:
    targets: list[Target] = []
    for table, rounds in zip(tables, per_round, strict=True):
        threads = [t.key for t in table.series if t.family == "thread"]
        if table.id.startswith("small-") and threads:
            # Where the producer sets the pace, no consumer can exceed it: this ratio of
            # the sync loop bounds what any "x thread-per-call" can reach here.
            ratios = [got["sync"] / max(got[k] for k in threads) for got in rounds]
            targets.append(
                Target(
                    table.id,
                    "sync",
                    "reference: sync / fastest thread-per-call",
                    "ref",
                    0.0,
                    statistics.median(ratios),
                )
            )
        for s in table.series:
            if s.family != "asyncmp":
                continue
            if table.id.startswith("small-"):
                targets.append(Target(table.id, s.key, f"{s.key} / sync", ">=", 1.0, s.ratio))
                if threads:
                    ratios = [got[s.key] / max(got[k] for k in threads) for got in rounds]
                    targets.append(
                        Target(
                            table.id,
                            s.key,
                            f"{s.key} / fastest thread-per-call",
                            ">=",
                            20.0,
                            statistics.median(ratios),
                        )
                    )
            elif table.id == "pingpong":
                targets.append(
                    Target(table.id, s.key, f"{s.key} latency / sync", "<=", 1.3, s.ratio)
                )
            elif table.id.startswith("large-"):
                targets.append(Target(table.id, s.key, f"{s.key} / sync", ">=", 1.0, s.ratio))
    return targets


def _versions() -> dict[str, str]:
    found = {"asyncmp": asyncmp.__version__}
    for name in ("anyio", "trio", "uvloop", "aioprocessing"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def _candidate(spec: str) -> Impl:
    tag, sep, path = spec.partition("=")
    if not sep or not tag or not path:
        raise SystemExit(f"--candidate wants TAG=PATH, got {spec!r}")
    return load_candidate(tag, Path(path))


def _split(values: list[str] | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not values:
        return allowed
    chosen: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item not in allowed:
                raise SystemExit(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
            if item not in chosen:
                chosen.append(item)
    return tuple(c for c in allowed if c in chosen)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under 30 s)")
    parser.add_argument(
        "--backend",
        action="append",
        metavar="NAME[,NAME]",
        help=f"event loops to run asyncmp on: {', '.join(BACKENDS)} (default: all)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME[,NAME]",
        help="benchmarks to run: small, pingpong, large (default: all)",
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 7, quick 3)")
    parser.add_argument(
        "--trial-seconds", type=float, help="target length of one trial (default 0.15, quick 0.04)"
    )
    parser.add_argument("--seed", type=int, help="seed of the shuffled orders")
    parser.add_argument(
        "--candidate",
        action="append",
        metavar="TAG=PATH",
        help="also measure the asyncmp copy at PATH (a src dir), side by side (repeatable)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=HERE / "results",
        help="where latest.md and latest.json go (default: benchmarks/results)",
    )
    parser.add_argument("--no-save", action="store_true", help="print only, write no files")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if sys.platform == "win32":
        raise SystemExit("the benchmarks fork a worker: POSIX only")
    available = tuple(b for b in BACKENDS if b != "uvloop" or find_spec("uvloop") is not None)
    backends = _split(args.backend, available, "backend")
    only = _split(args.only, ("small", "pingpong", "large"), "benchmark")
    rounds = args.rounds or (3 if args.quick else 7)
    trial_seconds = args.trial_seconds or (0.04 if args.quick else 0.15)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    impls = DEFAULT_IMPLS + tuple(_candidate(spec) for spec in args.candidate or ())

    workloads: list[Workload] = []
    if "small" in only:
        workloads += [
            _small("send", "socket", backends, impls),
            _small("batch", "socket", backends, impls),
        ]
        if not args.quick:
            workloads.append(_small("batch", "pipe", backends, impls))
    if "pingpong" in only:
        workloads.append(_pingpong(backends, impls))
    if "large" in only:
        workloads += [_large(size, backends, impls) for size in LARGE_SIZES]

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = perf_counter()
    worker = Worker()
    try:
        bench = Bench(worker, trial_seconds, progress=not args.quiet)
        if "large" in only:
            worker.run(("prepare", LARGE_SIZES))
        tables, targets = run(workloads, rounds, bench, rng)
    finally:
        worker.close()
    meta: dict[str, Any] = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "versions": _versions(),
        "mode": "quick" if args.quick else "full",
        "rounds": rounds,
        "trial_seconds": trial_seconds,
        "seed": seed,
        "backends": list(backends),
        "started": started.isoformat(timespec="seconds"),
        "elapsed_seconds": perf_counter() - t0,
        "load_average": list(os.getloadavg()),
        "notes": bench.notes,
    }
    markdown = render_markdown(meta, tables, targets)
    sys.stdout.write(markdown)
    if not args.no_save:
        write_results(args.output, markdown, to_json(meta, tables, targets))
        bench.log(f"wrote {args.output / 'latest.md'} and {args.output / 'latest.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; the worker was stopped and reaped", file=sys.stderr)
        sys.exit(130)
