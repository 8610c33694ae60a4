"""A heartbeat task that shows whether the event loop stalls, and the bounds it is held to."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskStatus

__all__ = ("STALL_CPU_BOUND", "STALL_WALL_BOUND", "Heartbeat", "heartbeat")

# Generous bounds; a few ms is the goal. The loop thread's CPU time between two heartbeat
# ticks is what asyncmp controls: 0.2-4 ms typically here (a 2 MiB read into fresh pages,
# which the system zeroes as they are first written). Growing a body buffer by realloc, as
# versions before the whole-size buffer did for 64 MiB, cost up to ~60 ms on a busy machine;
# copying and joining a whole 64 MiB message at the end, as an early version did, 50-375 ms.
# Wall-clock gaps also count the time the machine gave to other processes (up to ~700 ms seen
# on a 2-core machine running two copies of the suite and more), so their bound is looser; it
# catches a call that blocks the loop without using CPU, which waits on the peer for seconds.
STALL_CPU_BOUND = 0.060
STALL_WALL_BOUND = 2.0


class Heartbeat:
    """A task that ticks every *interval* seconds and records the worst gap between ticks.

    Gaps are measured in wall-clock time and in the CPU time of the event loop's thread.
    A CPU gap is time the loop spent busy without giving the heartbeat its turn: a stall.
    Wall time beyond that is the thread not running at all: blocked in a call, or waiting
    while the machine runs other processes.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.ticks = 0
        self.worst_gap = 0.0
        self.worst_cpu_gap = 0.0
        self._last = time.perf_counter()
        self._last_cpu = time.thread_time()

    def reset(self) -> None:
        self.ticks = 0
        self.worst_gap = self.worst_cpu_gap = 0.0
        self._last = time.perf_counter()
        self._last_cpu = time.thread_time()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.reset()
        task_status.started()
        while True:
            await anyio.sleep(self.interval)
            now, now_cpu = time.perf_counter(), time.thread_time()
            self.worst_gap = max(self.worst_gap, now - self._last)
            self.worst_cpu_gap = max(self.worst_cpu_gap, now_cpu - self._last_cpu)
            self._last, self._last_cpu = now, now_cpu
            self.ticks += 1


@asynccontextmanager
async def heartbeat(interval: float) -> AsyncIterator[Heartbeat]:
    """Run a :class:`Heartbeat` in a task for the body of the block."""
    beat = Heartbeat(interval)
    async with anyio.create_task_group() as tg:
        await tg.start(beat.run)
        try:
            yield beat
        finally:
            tg.cancel_scope.cancel()
