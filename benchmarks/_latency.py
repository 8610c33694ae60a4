"""6. What a large message costs the event loop and the memory, and how fast a get()
cancelled in the middle of an item returns.

Each trial forks a peer process of its own and runs an event loop of its own; nothing
here is a throughput, so the trials are few and short.

* 6a. The worst gap between two ticks of a 1 ms heartbeat task while one 64 MiB
  ``recv_bytes()`` runs (the peer writes the message as fast as the pipe takes it): in
  wall time (the target), and the loop thread's CPU time within that gap (the part the
  receive itself spent, which a busy machine does not inflate much).
* 6b. ``AsyncQueue.get()`` cancelled after the first 256 KiB of a 16 MiB item arrived,
  while the producer pauses 1 s before the rest: the time from the deadline until the
  cancelled call returns.
* 6c. The resident memory a receiver gains while it holds 1 MiB of a message whose
  header claims 1 GiB (Linux, where ``/proc`` tells it).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import anyio
from _cases import BACKENDS, Impl, run_on
from _report import Table, Target, play_round, series_of
from _worker import reap

__all__ = ("latency_tables",)

GAP_MESSAGE = 64 << 20
GAP_TICK = 0.001
CANCEL_ITEM = 16 << 20
CANCEL_FIRST = 256 << 10
CANCEL_PAUSE = 1.0
CANCEL_DEADLINE = 0.2
CLAIM = 1 << 30
CLAIM_SENT = 1 << 20

_FORK = multiprocessing.get_context("fork")


@dataclass(frozen=True)
class _Contender:
    key: str
    label: str
    backend: str
    family: str
    #: -> (value, CPU value or None)
    trial: Callable[[], tuple[float, float | None]]


# -- 6a. loop gaps ----------------------------------------------------------------------


def _send_big(conn: Connection, size: int) -> None:
    conn.send_bytes(b"x" * size)
    conn.close()


class _Beat:
    def __init__(self) -> None:
        self.worst = self.worst_cpu = 0.0
        self._last = time.perf_counter()
        self._last_cpu = time.thread_time()

    async def run(self) -> None:
        while True:
            await anyio.sleep(GAP_TICK)
            now, cpu = time.perf_counter(), time.thread_time()
            if now - self._last > self.worst:
                self.worst, self.worst_cpu = now - self._last, cpu - self._last_cpu
            self._last, self._last_cpu = now, cpu


async def _gap_trial(impl: Impl) -> tuple[float, float]:
    ours, theirs = multiprocessing.Pipe()
    peer = _FORK.Process(target=_send_big, args=(theirs, GAP_MESSAGE))
    peer.start()
    theirs.close()
    try:
        async with impl.cls(ours) as conn:
            beat = _Beat()
            async with anyio.create_task_group() as tg:
                tg.start_soon(beat.run)
                await anyio.sleep(0.01)  # a few ticks first: the loop is warm
                beat.worst = beat.worst_cpu = 0.0
                data = await conn.recv_bytes()
                tg.cancel_scope.cancel()
            if len(data) != GAP_MESSAGE:
                raise AssertionError(f"received {len(data)} bytes")
            del data
    finally:
        reap(peer, 10)
    return beat.worst * 1e3, beat.worst_cpu * 1e6


# -- 6b. a get() cancelled mid-item -------------------------------------------------------


def _produce_with_a_pause(queue: Any, size: int, first: int, pause: float) -> None:
    payload = pickle.dumps(b"y" * size)
    frame = struct.pack("!i", len(payload)) + payload
    fd = queue._writer.fileno()
    queue._sem.acquire()  # what put() takes for an item, and get() gives back
    with queue._wlock:
        view = memoryview(frame)
        done = 0
        while done < first:
            done += os.write(fd, view[done:first])
        time.sleep(pause)
        while done < len(frame):
            done += os.write(fd, view[done:])


async def _cancel_trial(impl: Impl) -> tuple[float, None]:
    assert impl.queue_cls is not None
    queue = _FORK.Queue()
    producer = _FORK.Process(
        target=_produce_with_a_pause, args=(queue, CANCEL_ITEM, CANCEL_FIRST, CANCEL_PAUSE)
    )
    producer.start()
    try:
        async with impl.queue_cls(queue) as aq:
            with anyio.move_on_after(CANCEL_DEADLINE) as scope:
                await aq.get()
            returned = anyio.current_time()
            late = returned - scope.deadline
            if not scope.cancelled_caught:
                raise AssertionError("the get() was not cancelled")
            with anyio.fail_after(30):
                item = await aq.get()  # kept for the next get(), whole
            if len(item) != CANCEL_ITEM:
                raise AssertionError(f"got {len(item)} bytes")
    finally:
        reap(producer, 30)
        queue.close()
        queue.join_thread()
    return max(late, 0.0) * 1e3, None


# -- 6c. what a claim costs ---------------------------------------------------------------


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _claim(conn: Connection, claimed: int, sent: int, done: Any) -> None:
    fd = conn.fileno()
    data = memoryview(struct.pack("!i", claimed) + b"z" * sent)
    while data:
        data = data[os.write(fd, data) :]
    done.wait(30)
    conn.close()


async def _claim_trial(impl: Impl) -> tuple[float, None]:
    ours, theirs = multiprocessing.Pipe()
    done = _FORK.Event()
    peer = _FORK.Process(target=_claim, args=(theirs, CLAIM, CLAIM_SENT, done))
    peer.start()
    theirs.close()
    try:
        async with impl.cls(ours, max_message_size=None) as conn:
            reader = conn._route.fast_reader
            before = _resident()
            async with anyio.create_task_group() as tg:
                tg.start_soon(conn.recv_bytes)
                with anyio.fail_after(30):
                    # No event announces bytes held: look every ms.
                    while reader.decoder.buffered < 4 + CLAIM_SENT:  # noqa: ASYNC110
                        await anyio.sleep(0.001)
                grown = _resident() - before
                tg.cancel_scope.cancel()
    finally:
        done.set()
        reap(peer, 10)
    return grown / (1 << 20), None


# -- running them -------------------------------------------------------------------------


def _contenders(
    backends: tuple[str, ...], impls: tuple[Impl, ...]
) -> list[tuple[Table, list[_Contender], str, float]]:
    def each(
        fn: Callable[[Impl], Any], what: str, want: Callable[[Impl], bool], on: tuple[str, ...]
    ) -> list[_Contender]:
        return [
            _Contender(
                f"{impl.name}-{b}",
                f"{impl.name} {what} [{b}]",
                b,
                impl.family,
                partial(run_on, b, fn, impl),
            )
            for b in on
            for impl in impls
            if want(impl)
        ]

    gaps = Table(
        id="loop-gap-64MiB",
        title="6a. Worst event-loop gap during one 64 MiB recv_bytes() (socketpair);"
        " CPU: the loop thread's, within that gap",
        unit="ms",
        higher_is_better=False,
        ratio_label="ratio",
        params={"message_bytes": GAP_MESSAGE, "tick_seconds": GAP_TICK},
        series=[],
        baseline=None,
        op="gap",
    )
    cancel = Table(
        id="cancelled-get",
        title="6b. A get() cancelled mid-item (256 KiB of 16 MiB there, the producer pauses"
        f" {CANCEL_PAUSE:g} s): time from the deadline to its return",
        unit="ms",
        higher_is_better=False,
        ratio_label="ratio",
        params={"item_bytes": CANCEL_ITEM, "first_bytes": CANCEL_FIRST, "pause": CANCEL_PAUSE},
        series=[],
        baseline=None,
        op="call",
    )
    claim = Table(
        id="claimed-1GiB",
        title="6c. Resident memory gained while 1 MiB of a message claiming 1 GiB is held",
        unit="MiB",
        higher_is_better=False,
        ratio_label="ratio",
        params={"claimed_bytes": CLAIM, "sent_bytes": CLAIM_SENT},
        series=[],
        baseline=None,
        op="message",
    )
    found = [
        (gaps, each(_gap_trial, "recv_bytes()", lambda i: True, backends), "ms", 10.0),
        (
            cancel,
            each(_cancel_trial, "get()", lambda i: i.queue_cls is not None, backends),
            "ms",
            100.0,
        ),
    ]
    if os.path.exists("/proc/self/statm"):
        first = tuple(b for b in BACKENDS if b in backends)[:1]
        found.append(
            (claim, each(_claim_trial, "recv_bytes()", lambda i: True, first), "MiB", 16.0)
        )
    for table, contenders, _, _ in found:
        table.series = series_of(contenders, 1)
    return found


def latency_tables(
    backends: tuple[str, ...],
    impls: tuple[Impl, ...],
    rounds: int,
    rng: Any,
    log: Callable[[str], None],
) -> tuple[list[Table], list[Target]]:
    """Run section 6, each table's contenders shuffled round by round."""
    found = _contenders(backends, impls)
    for r in range(rounds):
        for table, contenders, _, _ in found:
            play_round(table, contenders, rng, lambda c: c.trial())
        log(f"latency round {r + 1}/{rounds} done")
    targets = [
        Target(table.id, s.key, f"{s.key} {table.unit}", "<=", goal, s.median, unit=unit)
        for table, _, unit, goal in found
        for s in table.series
        if s.family == "asyncmp"
    ]
    return [table for table, _, _, _ in found], targets
