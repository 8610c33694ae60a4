"""Benchmark asyncmp against the synchronous stdlib and the thread-per-call ways.

Run ``python benchmarks/run.py`` (``nox -s bench`` passes its arguments through):

* ``--quick``: a short run (under 30 s) for a smoke check;
* ``--backend asyncio,trio`` (or the option repeated): only these event loops;
* ``--only small,pingpong,large,queue,latency,arrays,pool``: only these benchmarks (the
  default: all seven; arrays needs numpy; a ``--quick`` run leaves the pools out unless
  asked, to stay under 30 s).

What is measured, against one forked worker process:

1. Receive throughput of 100-byte pickles, (a) when the worker calls ``send()`` per
   message and (b) when it writes pre-framed batches raw, so the consumer is the
   bottleneck. Contenders: asyncmp ``recv()`` per event loop, the plain ``conn.recv()``
   loop, ``run_in_executor(None, conn.recv)``, ``anyio.to_thread.run_sync(conn.recv)``
   and aioprocessing's ``coro_recv()``.
2. Ping-pong latency: the parent sends, the worker echoes.
3. Large-message throughput: ``recv_bytes()`` of 1 MiB and 64 MiB, against a raw copy of
   the same bytes into a preallocated buffer.
4. ``multiprocessing.Queue`` (fork context), against producer processes forked once:
   get throughput of 100-byte pickles, (a) when the producer calls ``put()`` per item
   and (b) when it writes pre-framed batches into the queue's pipe, so the consumer is
   the bottleneck; contenders: the sync ``q.get()`` loop, asyncmp ``AsyncQueue.get()``
   and ``get_many(100)`` per event loop, ``run_in_executor(None, q.get)``,
   ``anyio.to_thread.run_sync(q.get)`` and aioprocessing's ``AioQueue.coro_get()``.
   (c) Fan-in from four producers, asyncmp against the sync loop. (d) The CPU an
   asyncmp ``get()`` burns while it waits and another process holds the reader lock.
5. Pools: ``asyncmp.open_pool`` against ``anyio.to_process``,
   ``ProcessPoolExecutor``, aiomultiprocess and trio-parallel; see ``_pools.py``.
6. Latency and memory (``latency``): the worst event-loop gap during a 64 MiB receive,
   how fast a get() cancelled mid-item returns, and what a claimed 1 GiB costs; see
   ``_latency.py``.
7. Large arrays (``--only arrays``): 256 MiB and 1 GiB numpy arrays (16 and 64 MiB with
   ``--quick``) from a worker process to the async parent with ``asyncmp.shared()``,
   against pickling them through the pipe, a raw copy through the pipe and a memcpy; the
   event loop's worst gap meanwhile; small arrays with and without ``shared()``. See
   ``_arrays.py``.

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
from _latency import latency_tables  # noqa: E402
from _pools import pool_tables  # noqa: E402
from _queues import (  # noqa: E402
    QUEUE_ITEM,
    QueueProducers,
    fanin_contenders,
    get_contenders,
    idle_contenders,
    queue_name,
)
from _report import (  # noqa: E402
    Series,
    Table,
    Target,
    Value,
    play_round,
    render_markdown,
    series_of,
    to_json,
    trial_size,
    write_results,
)
from _worker import Command, Worker  # noqa: E402

#: b"x" * 85 pickles to exactly 100 bytes.
SMALL_MESSAGE = b"x" * 85
PINGPONG_MESSAGE = b"x" * 85
LARGE_SIZES = (1 << 20, 64 << 20)
#: Producer processes for the queue benchmarks (fan-in uses all of them).
QUEUE_PRODUCERS = 4


def _rate(seconds: float, n: int) -> float:
    return n / seconds


def _micros_per(seconds: float, n: int) -> float:
    return seconds / n * 1e6


@dataclass(kw_only=True)
class Workload:
    id: str
    title: str
    unit: str
    higher_is_better: bool = True
    ratio_label: str = "x sync"
    contenders: list[Contender]
    #: (contender, messages timed) -> the command for the worker, or for the producers
    #: of a queue workload to share (either way one more than timed is sent)
    command: Callable[[Contender, int], Command]
    arg: Any  #: passed to each consumer
    transport: str
    #: (seconds, messages timed) -> the reported value
    value: Callable[[float, int], float] = _rate
    #: a contender -> how many messages its calibration trial times
    probe_n: Callable[[Contender], int] = lambda c: 1000 if c.family == "thread" else 10000
    n_min: int = 200
    n_max: int = 2_000_000
    params: dict[str, Any]
    op: str = "msg"
    #: Queue workloads: how many producer processes share the command's count.
    producers: int = 1


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
        contenders=contenders,
        command=lambda c, n: ("stream", transport, regime, n + 1, SMALL_MESSAGE),
        arg=SMALL_MESSAGE,
        transport=transport,
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


def _queue_get(regime: str, backends: tuple[str, ...], impls: tuple[Impl, ...]) -> Workload:
    if regime == "put":
        number, how = "4a", "the producer calls put() per item"
    else:
        number = "4b"
        how = "the producer writes pre-framed batches (the consumer is the bottleneck)"
    return Workload(
        id=f"queue-{regime}",
        title=f"{number}. Queue get() of 100-byte pickles from a producer process: {how}",
        unit="items/s",
        contenders=get_contenders(backends, impls, find_spec("aioprocessing") is not None),
        command=lambda c, n: (regime, queue_name(c), n + 1, QUEUE_ITEM),
        arg=QUEUE_ITEM,
        transport="queue",
        params={"item_pickle_bytes": 100, "regime": regime, "producers": 1},
        op="item",
    )


def _queue_fanin(backends: tuple[str, ...], impls: tuple[Impl, ...]) -> Workload:
    return Workload(
        id="queue-fanin",
        title=f"4c. Queue get() fan-in: {QUEUE_PRODUCERS} producer processes call put() per item",
        unit="items/s",
        contenders=fanin_contenders(backends, impls),
        command=lambda c, n: ("put", "main", n + 1, QUEUE_ITEM),
        arg=QUEUE_ITEM,
        transport="queue",
        probe_n=lambda c: 10000,
        params={"item_pickle_bytes": 100, "regime": "put", "producers": QUEUE_PRODUCERS},
        op="item",
        producers=QUEUE_PRODUCERS,
    )


class Bench:
    def __init__(
        self,
        worker: Worker | None,
        producers: QueueProducers | None,
        trial_seconds: float,
        progress: bool,
    ) -> None:
        self.worker = worker
        self.producers = producers
        self.trial_seconds = trial_seconds
        self.progress = progress
        self.notes: list[str] = []

    def trial(self, w: Workload, c: Contender, n: int) -> Timing:
        if w.transport == "queue":
            assert self.producers is not None
            timing = self.producers.trial(
                w.command(c, n), w.producers, lambda source: c.consume(source, n, w.arg)
            )
            self.check_flags(c, self.producers.source.readers())
            return timing
        assert self.worker is not None
        self.worker.start(w.command(c, n))
        timing = c.consume(self.worker.data(w.transport), n, w.arg)
        self.worker.finish()
        self.check_flags(c, [self.worker.data(w.transport)])
        return timing

    def check_flags(self, c: Contender, shared: list[Any]) -> None:
        for conn in shared:
            fd = conn.fileno()
            if not os.get_blocking(fd):  # the project's invariant: never flip shared flags
                self.notes.append(f"{c.label} left O_NONBLOCK set on a shared descriptor")
                os.set_blocking(fd, True)

    def calibrate(self, w: Workload, c: Contender) -> int:
        """One warm-up trial, which also sizes the trials to ~trial_seconds."""
        probe = w.probe_n(c)
        seconds, _ = self.trial(w, c, probe)
        return trial_size(seconds, probe, self.trial_seconds, w.n_min, w.n_max)

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

            def measure(c: Contender, w: Workload = w, n_of: dict[str, int] = sizes[i]) -> Value:
                n = n_of[c.key]
                seconds, cpu_seconds = bench.trial(w, c, n)
                return w.value(seconds, n), cpu_seconds / n * 1e6

            per_round[i].append(play_round(tables[i], w.contenders, rng, measure))
        bench.log(f"round {r + 1}/{rounds} done in {perf_counter() - start:.1f} s")
    return tables, _targets(tables, per_round)


def run_idle(
    contenders: list[Contender], rounds: int, window: float, bench: Bench, rng: random.Random
) -> tuple[Table, list[Target]]:
    """4d: each contender waits *window* seconds in a get() while another process holds
    the reader lock; the value is this process's CPU time over that wall time."""
    assert bench.producers is not None
    table = Table(
        id="queue-idle",
        title=f"4d. Idle CPU while a get() waits ~{window:g} s and another process holds the"
        " reader lock (a sync consumer blocked in get() on the empty queue)",
        unit="% CPU",
        higher_is_better=False,
        ratio_label="ratio",
        params={"wait_seconds": window},
        series=series_of(contenders, 1),
        baseline=None,
        op="wait",
    )

    def measure(c: Contender) -> Value:
        assert bench.producers is not None
        seconds, cpu_seconds = c.consume(bench.producers, 1, window)
        bench.check_flags(c, bench.producers.source.readers())
        return 100.0 * cpu_seconds / seconds, cpu_seconds * 1e6

    for r in range(rounds):
        start = perf_counter()
        play_round(table, contenders, rng, measure)
        bench.log(f"idle round {r + 1}/{rounds} done in {perf_counter() - start:.1f} s")
    targets = [
        Target(table.id, s.key, f"{s.key} idle CPU", "<=", 1.0, s.median, unit="%")
        for s in table.series
        if s.family == "asyncmp"
    ]
    return table, targets


def _versus_threads(
    table: Table,
    rounds: list[dict[str, float]],
    threads: list[str],
    key: str,
    op: str,
    goal: float,
) -> Target:
    """*key* against the fastest thread-per-call contender, round by round: a target, or
    (op "ref", key "sync") the reference that bounds what any contender can reach."""
    ratios = [got[key] / max(got[k] for k in threads) for got in rounds]
    what = "reference: sync" if op == "ref" else key
    return Target(
        table.id, key, f"{what} / fastest thread-per-call", op, goal, statistics.median(ratios)
    )


def _targets(tables: list[Table], per_round: list[list[dict[str, float]]]) -> list[Target]:
    targets: list[Target] = []
    for table, rounds in zip(tables, per_round, strict=True):
        threads = [t.key for t in table.series if t.family == "thread"]
        if table.id.startswith("queue-"):
            targets += _queue_targets(table, rounds, threads)
            continue
        if table.id.startswith("small-") and threads:
            # Where the producer sets the pace, no consumer can exceed it: this ratio of
            # the sync loop bounds what any "x thread-per-call" can reach here.
            targets.append(_versus_threads(table, rounds, threads, "sync", "ref", 0.0))
        for s in table.series:
            if s.family != "asyncmp":
                continue
            if table.id.startswith("small-"):
                targets.append(Target(table.id, s.key, f"{s.key} / sync", ">=", 1.0, s.ratio))
                if threads:
                    targets.append(_versus_threads(table, rounds, threads, s.key, ">=", 20.0))
            elif table.id == "pingpong":
                targets.append(
                    Target(table.id, s.key, f"{s.key} latency / sync", "<=", 1.3, s.ratio)
                )
            elif table.id.startswith("large-"):
                targets.append(Target(table.id, s.key, f"{s.key} / sync", ">=", 1.0, s.ratio))
                if table.get("raw") is not None:
                    targets.append(_versus(table, rounds, "raw", s.key, ">=", 0.7))
    return targets


def _versus(
    table: Table, rounds: list[dict[str, float]], base: str, key: str, op: str, goal: float
) -> Target:
    """*key* against contender *base*, round by round."""
    ratio = statistics.median(got[key] / got[base] for got in rounds)
    return Target(table.id, key, f"{key} / {base}", op, goal, ratio)


def _queue_targets(
    table: Table, rounds: list[dict[str, float]], threads: list[str]
) -> list[Target]:
    found: list[Target] = []
    if threads:
        found.append(_versus_threads(table, rounds, threads, "sync", "ref", 0.0))
    for s in table.series:  # get() and get_many(), each judged on its own
        if s.family != "asyncmp":
            continue
        found.append(Target(table.id, s.key, f"{s.key} / sync", ">=", 1.0, s.ratio))
        if threads:
            found.append(_versus_threads(table, rounds, threads, s.key, ">=", 10.0))
    return found


def _versions() -> dict[str, str]:
    found = {"asyncmp": asyncmp.__version__}
    for name in (
        "anyio",
        "trio",
        "uvloop",
        "aioprocessing",
        "aiomultiprocess",
        "trio-parallel",
        "numpy",
    ):
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
        help="benchmarks to run: small, pingpong, large, queue, latency, arrays, pool (default:"
        " all; --quick leaves pool out)",
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 7, quick 3)")
    parser.add_argument(
        "--idle-rounds", type=int, help="rounds of the queue's idle-CPU probe (default 2, quick 1)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=1.0, help="how long each idle get() waits (1.0)"
    )
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
    only = _split(
        args.only,
        ("small", "pingpong", "large", "queue", "latency", "arrays", "pool"),
        "benchmark",
    )
    if not args.only and args.quick:
        only = tuple(name for name in only if name != "pool")  # the pools take a minute
    notes: list[str] = []
    if "arrays" in only and find_spec("numpy") is None:
        only = tuple(name for name in only if name != "arrays")
        notes.append("the large-array benchmarks (7) need numpy, which is not installed")
        if not only:
            raise SystemExit("--only arrays needs numpy (it is in the bench dependency group)")
    rounds = args.rounds or (3 if args.quick else 7)
    idle_rounds = args.idle_rounds or (1 if args.quick else 2)
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
    if "queue" in only:
        if not args.quick:
            workloads.append(_queue_get("put", backends, impls))
        workloads += [_queue_get("fill", backends, impls), _queue_fanin(backends, impls)]

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = perf_counter()
    # Every process is forked here, before any event loop or thread has run.
    worker: Worker | None = None
    producers: QueueProducers | None = None
    arrays: Any = None
    try:
        if "arrays" in only:  # first: it holds its arrays only once all have forked
            from _arrays import ArrayWorker

            arrays = ArrayWorker()
        if any(w.transport != "queue" for w in workloads):
            worker = Worker()
        if "queue" in only:
            inherited = worker.parent_ends() if worker is not None else []
            producers = QueueProducers(QUEUE_PRODUCERS, inherited)
        bench = Bench(worker, producers, trial_seconds, progress=not args.quiet)
        bench.notes += notes
        if worker is not None and "large" in only:
            worker.run(("prepare", LARGE_SIZES))
        tables, targets = run(workloads, rounds, bench, rng) if workloads else ([], [])
        if producers is not None:
            bench.log("measuring idle CPU")
            idle, idle_targets = run_idle(
                idle_contenders(backends, impls), idle_rounds, args.idle_seconds, bench, rng
            )
            tables.append(idle)
            targets += idle_targets
        if "latency" in only:
            # Each trial forks its own peer and runs its own event loop.
            latency, latency_targets = latency_tables(
                backends, impls, max(1, rounds // 2), rng, bench.log
            )
            tables += latency
            targets += latency_targets
        if arrays is not None:
            from _arrays import array_tables

            array_results, array_targets = array_tables(
                arrays, backends, impls, rounds, args.quick, trial_seconds, rng, bench.log
            )
            tables += array_results
            targets += array_targets
        if "pool" in only:
            # Each trial starts its own pool (and event loop) here, after the others.
            pool_impls = tuple(impl for impl in impls if impl.open_pool is not None)
            pool_results, pool_targets = pool_tables(
                backends, pool_impls, rounds, max(trial_seconds, 0.3), rng, bench.log, bench.notes
            )
            tables += pool_results
            targets += pool_targets
    finally:
        # Independent of each other (the producers closed their copies of the worker's
        # connections); the producers first, as they take at most about half a second.
        if producers is not None:
            producers.close()
        if worker is not None:
            worker.close()
        if arrays is not None:
            arrays.close()
    meta: dict[str, Any] = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "versions": _versions(),
        "mode": "quick" if args.quick else "full",
        "rounds": rounds,
        "idle_rounds": idle_rounds if "queue" in only else None,
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
        print("interrupted; the worker processes were stopped and reaped", file=sys.stderr)
        sys.exit(130)
