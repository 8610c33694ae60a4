"""Soak: producers that get killed, consumers sync and async, cancellations everywhere.

Run ``python tests/faults/soak.py --duration 300`` (``nox -s soak`` passes its arguments
through). It is not part of the test suite or of CI; ``test_soak.py`` runs it for a few
seconds so that it keeps working.

Each round picks an event loop (asyncio, uvloop, trio) and a start method (fork, spawn,
forkserver) in turn, and runs for its share of ``--duration``:

* ``--producers`` producer processes at a time, each with a ``Pipe`` of its own (duplex or
  one-way, descriptor or thread route, at random) to a forwarder task in this process. A
  producer sends items ``(tag, seq, crc32(payload), payload)`` of random sizes (mostly
  small, now and then up to 4 MiB) and exits; when one ends another starts.
* Random SIGKILLs of producers, at any moment, mid-message included.
* The forwarders put what they receive into one bounded ``multiprocessing.Queue`` through an
  ``AsyncQueue``. ``--consumers`` consumers take from it: async tasks in this process (each
  with an adapter of its own, on the descriptor or the thread route) and one plain
  synchronous consumer process.
* A share of every receive, put and get (10 to 30 percent, ``--cancel-rate``) runs under a
  cancel scope with a deadline of zero to two milliseconds; a cancelled call is retried.

The accounting. Before each send a producer records in shared memory how many items it has
started to send. A producer that exits normally must have every item delivered. A producer
that was killed may lose the one item it was sending (or about to send) when it died: that
is the documented loss (the receiver gets every whole message, then ``ConnectionEOF``,
"mid-message" if the item was torn). Nothing else may be lost: not by a cancelled receive,
put or get, not in the queue. No item may arrive twice or corrupt.

The last line printed is the summary::

    soak: sent=... received=... lost=... (documented: ...) duplicates=0 cancellations=... kills=...

The exit status is 1 if anything was lost beyond the documented losses, duplicated or
corrupted, if a round hung, or if anything was left behind.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `tests` importable, here and in children
    sys.path.insert(0, str(ROOT))
try:
    import asyncmp
except ImportError:  # not installed: run from a checkout
    sys.path.insert(1, str(ROOT / "src"))
    import asyncmp

from asyncmp import AsyncConnection, AsyncQueue, ConnectionEOF  # noqa: E402
from tests.faults import fault_workers  # noqa: E402

BACKENDS = ("asyncio", "uvloop", "trio")
START_METHODS = tuple(
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
)
#: How long a round may overrun its share of the duration before it counts as hung.
HANG_BOUND = 120.0
#: The queue between forwarders and consumers: small, so that puts wait for room.
QUEUE_SIZE = 16


@dataclass
class Tally:
    """What one round (or the whole run) counted."""

    sent: int = 0
    received: int = 0
    documented: int = 0
    duplicates: int = 0
    corrupt: int = 0
    unexplained: list[str] = field(default_factory=list)
    operations: int = 0
    cancellations: int = 0
    kills: int = 0
    producers: int = 0

    def add(self, other: Tally) -> None:
        for name in ("sent", "received", "documented", "duplicates", "corrupt"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("operations", "cancellations", "kills", "producers"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.unexplained += other.unexplained

    @property
    def lost(self) -> int:
        return self.sent - (self.received - self.duplicates)

    @property
    def ok(self) -> bool:
        return (
            not self.unexplained
            and self.duplicates == 0
            and self.corrupt == 0
            and self.lost == self.documented
        )

    def summary(self) -> str:
        rate = self.cancellations / self.operations if self.operations else 0.0
        return (
            f"soak: sent={self.sent} received={self.received} lost={self.lost} "
            f"(documented: {self.documented} in flight at {self.kills} kills) "
            f"duplicates={self.duplicates} cancellations={self.cancellations} "
            f"({rate:.0%} of {self.operations} calls) kills={self.kills}"
        )


class Chaos:
    """Decides which calls run under a short cancel scope, and counts the cancellations."""

    def __init__(self, rng: random.Random, rate: float, tally: Tally) -> None:
        self.rng = rng
        self.rate = rate
        self.tally = tally

    async def call(self, fn: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """``(True, result)``, or ``(False, None)`` if the call was cancelled."""
        self.tally.operations += 1
        # A zero deadline always cancels; a short one now and then lets the call finish:
        # together they cancel about `rate` of the calls.
        if self.rng.random() >= self.rate / 0.9:
            return True, await fn()
        deadline = 0.0 if self.rng.random() < 0.8 else self.rng.uniform(0, 0.002)
        done, result = False, None
        with anyio.move_on_after(deadline) as scope:
            result = await fn()
            done = True
        if scope.cancelled_caught and not done:
            self.tally.cancellations += 1
        return done, result

    async def retry(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Call until a call is not cancelled (a cancelled call must have done nothing)."""
        while True:
            done, result = await self.call(fn)
            if done:
                return result


@dataclass
class Producer:
    tag: int
    process: Any
    conn: AsyncConnection
    killed: bool = False
    received: list[int] = field(default_factory=list)
    end: str = ""


async def run_round(
    backend: str, method: str, seconds: float, args: argparse.Namespace, seed: int
) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    rate = args.cancel_rate if args.cancel_rate is not None else rng.uniform(0.1, 0.3)
    chaos = Chaos(rng, rate, tally)
    ctx: Any = multiprocessing.get_context(method)
    q = ctx.Queue(QUEUE_SIZE)
    progress = ctx.RawArray("q", 100_000)
    putter = AsyncQueue[Any](q)
    producers: list[Producer] = []
    received: Counter[tuple[int, int]] = Counter()
    tags = itertools.count()
    deadline = time.monotonic() + seconds

    async def forward(p: Producer) -> None:
        try:
            while True:
                try:
                    item = await chaos.retry(p.conn.recv)
                except ConnectionEOF as exc:
                    p.end = str(exc)
                    break
                await chaos.retry(functools.partial(putter.put, item))
        except Exception as exc:
            tally.unexplained.append(f"producer {p.tag}'s forwarder failed: {exc!r}")
        finally:
            await p.conn.aclose()

    async def run_producers(tg: Any) -> None:
        while time.monotonic() < deadline:
            live = [p for p in producers if p.process.is_alive()]
            while len(live) < args.producers:
                tag = next(tags)
                duplex = rng.random() < 0.5
                a, b = asyncmp.Pipe(duplex, use_threads=rng.random() < 0.15)
                count = rng.randrange(20, 400)
                proc = ctx.Process(
                    target=fault_workers.soak_producer,
                    args=(b, tag, count, rng.randrange(1 << 32), progress),
                    name=f"soak-producer-{tag}",
                    daemon=True,
                )
                proc.start()
                b.close()
                p = Producer(tag, proc, a)
                producers.append(p)
                live.append(p)
                tg.start_soon(forward, p)
            await anyio.sleep(0.01)

    async def kill_producers() -> None:
        while time.monotonic() < deadline:
            await anyio.sleep(rng.expovariate(args.kills_per_second))
            live = [p for p in producers if p.process.is_alive()]
            if live:
                victim = rng.choice(live)
                victim.killed = True
                os.kill(victim.process.pid, signal.SIGKILL)
                tally.kills += 1

    async def consume(getter: AsyncQueue[Any]) -> None:
        try:
            while True:
                item = await chaos.retry(getter.get)
                if item is None:
                    return
                if fault_workers.soak_item_ok(item):
                    received[(item[0], item[1])] += 1
                else:
                    tally.corrupt += 1
        except Exception as exc:
            tally.unexplained.append(f"a consumer failed: {exc!r}")

    # Adapters of one queue in one process share it: closing one closes the queue here
    # (its feeder closes the pipe ends), so they are closed only once all are done.
    getters = [
        AsyncQueue[Any](q, use_threads=i % 2 == 1) for i in range(max(1, args.consumers - 1))
    ]

    sync_reports: list[AsyncConnection] = []
    sync_consumers = []
    for i in range(args.consumers - len(getters)):
        report_end, child_report = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=fault_workers.soak_consumer,
            args=(q, child_report),
            name=f"soak-consumer-{i}",
            daemon=True,
        )
        proc.start()
        child_report.close()
        sync_reports.append(AsyncConnection(report_end))
        sync_consumers.append(proc)

    try:
        with anyio.fail_after(seconds + HANG_BOUND):
            async with anyio.create_task_group() as consumers:
                for getter in getters:
                    consumers.start_soon(consume, getter)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run_producers, tg)
                    tg.start_soon(kill_producers)
                # Every forwarder is done: every producer has ended and been drained.
                for _ in range(args.consumers):
                    await putter.put(None)
            for report in sync_reports:
                got, corrupt = await report.recv()
                tally.corrupt += corrupt
                received.update(got)
                await report.aclose()
    except TimeoutError:
        tally.unexplained.append(f"round {backend}/{method} hung")
    finally:
        for p in producers:
            await p.conn.aclose()
            p.process.join(10)
            if p.process.is_alive():
                tally.unexplained.append(f"producer {p.tag} did not end")
                p.process.kill()
                p.process.join()
        for proc in sync_consumers:
            proc.join(10)
            if proc.is_alive():
                tally.unexplained.append(f"{proc.name} did not end")
                proc.kill()
                proc.join()
        for report in sync_reports:
            await report.aclose()
        await putter.aclose()  # waits until the feeder has written everything
        for getter in getters:
            await getter.aclose()

    by_tag: dict[int, list[int]] = {}
    for (tag, seq), n in received.items():
        by_tag.setdefault(tag, []).extend([seq] * n)
    for p in producers:
        p.process.join()
        if not p.killed and p.process.exitcode != 0:
            tally.unexplained.append(f"producer {p.tag} exited with {p.process.exitcode}")
        attempted = progress[p.tag]
        seqs = sorted(by_tag.get(p.tag, []))
        unique = sorted(set(seqs))
        tally.sent += attempted
        tally.received += len(seqs)
        tally.duplicates += len(seqs) - len(unique)
        tally.producers += 1
        if unique != list(range(len(unique))):
            tally.unexplained.append(f"producer {p.tag}: gaps in {unique[:20]}...")
        missing = attempted - len(unique)
        # A killed producer whose exit code says it finished lost nothing.
        if p.killed and p.process.exitcode == -signal.SIGKILL and missing == 1:
            tally.documented += 1
        elif missing:
            tally.unexplained.append(
                f"producer {p.tag} ({'killed' if p.killed else 'exited'}, {p.end!r}): "
                f"{missing} of {attempted} items missing"
            )
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds in all")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="repeatable")
    parser.add_argument("--start-method", action="append", choices=START_METHODS)
    parser.add_argument("--producers", type=int, default=4, help="at a time")
    parser.add_argument("--consumers", type=int, default=3, help="one is a sync process")
    parser.add_argument("--kills-per-second", type=float, default=4.0)
    parser.add_argument("--cancel-rate", type=float, help="default: 0.1 to 0.3 per round")
    parser.add_argument("--round", type=float, default=20.0, help="seconds per round")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    backends = args.backend or list(BACKENDS)
    methods = args.start_method or list(START_METHODS)
    combos = [(b, m) for m in methods for b in backends]
    print(f"soak: seed={seed} duration={args.duration:g} s over {combos}", file=sys.stderr)
    total = Tally()
    end = time.monotonic() + args.duration
    rng = random.Random(seed)
    for i in itertools.count():
        left = end - time.monotonic()
        if left <= 0.5:
            break
        backend, method = combos[i % len(combos)]
        seconds = min(args.round, left)
        options: dict[str, Any] = {}
        name = backend
        if backend == "uvloop":
            import uvloop

            name, options = "asyncio", {"loop_factory": uvloop.new_event_loop}
        tally = anyio.run(
            run_round,
            backend,
            method,
            seconds,
            args,
            rng.randrange(1 << 32),
            backend=name,
            backend_options=options,
        )
        print(f"  round {i} {backend}/{method}: {tally.summary()[6:]}", file=sys.stderr)
        for problem in tally.unexplained:
            print(f"    {problem}", file=sys.stderr)
        total.add(tally)
    leftovers = multiprocessing.active_children()
    threads = [t.name for t in threading.enumerate() if t.name.startswith("asyncmp")]
    if leftovers or threads:
        total.unexplained.append(f"left behind: {leftovers} {threads}")
        print(f"soak: left behind: {leftovers} {threads}", file=sys.stderr)
    print(total.summary())
    return 0 if total.ok else 1


if __name__ == "__main__":
    sys.exit(main())
