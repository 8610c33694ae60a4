"""Fault case 4: a producer is SIGKILLed in the middle of putting a 64 MiB item.

Setup: a ``multiprocessing.Queue`` and its ``AsyncQueue`` (either route,
``stall_timeout=0.5``). A producer process puts one 64 MiB item; its feeder thread writes the
frame into the pipe, fills it, and blocks for room. The producer is stopped (SIGSTOP) there,
and an async ``get`` starts: it takes the reader lock and reads what the pipe holds, so it is
in the middle of the item, waiting for more. A heartbeat task ticks every 5 ms.

Fault: the stopped producer is SIGKILLed (it dies inside its feeder's write) and reaped; then
the ``get`` is cancelled.

Expected: the cancelled ``get`` returns at once, on both routes (the rest of the item is
waited for in one of asyncmp's threads), and the next ``get`` raises
``anyio.BrokenResourceError`` ("a producer stopped mid-item") once no byte has come for
``stall_timeout``. Meanwhile the loop never stalls and the
``get`` does not spin (the heartbeat's worst gaps stay within the no-stall bounds, and the
loop thread's CPU time over the stall stays small). The reader lock is free again, and the
adapter stays broken: ``get`` and ``put`` raise ``anyio.BrokenResourceError``.

Lost (see docs/faults.md): the 64 MiB item, and the queue for writing: the dead producer held
the queue's cross-process write lock, which nobody can release, so no process can ever put
into the queue again (their feeder threads block on that lock), and the item's slot in a
bounded queue is gone. What other producers wrote before the kill can still be read.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import sys
import time
from typing import Any

import anyio
import pytest

from tests.support.heartbeat import STALL_CPU_BOUND, STALL_WALL_BOUND, heartbeat
from tests.support.io import (
    KiB,
    MiB,
    buffered,
    patched,
    reader_lock_is_held,
    settle,
    wait_until,
    write_all,
)
from tests.support.queues import FORK, open_queue

from . import fault_workers

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL, SIGSTOP and fork"),
]

SIZE = 64 * MiB
STALL = 0.5


def writable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(0))


@pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
async def test_producer_killed_mid_put_breaks_the_get_within_the_stall_bound(
    use_threads: bool,
) -> None:
    async with open_queue(use_threads=use_threads, stall_timeout=STALL) as aq:
        q = aq.queue
        fd = q._reader.fileno()
        producer = FORK.Process(
            target=fault_workers.put_big_then_wait, args=(q, SIZE), name="test-big-producer"
        )
        outcome: list[BaseException | object] = []
        ended_at: list[float] = []
        scope = anyio.CancelScope()

        async def get() -> None:
            with scope:
                try:
                    outcome.append(await aq.get())
                except anyio.BrokenResourceError as exc:
                    outcome.append(exc)
            ended_at.append(time.monotonic())

        producer.start()
        try:
            with anyio.fail_after(30):
                # The feeder filled the pipe and blocks in its write: freeze it there.
                await wait_until(
                    lambda: buffered(fd) > 0 and not writable_now(q._writer.fileno()),
                    "the feeder filled the pipe",
                )
                os.kill(producer.pid or 0, signal.SIGSTOP)
                async with heartbeat(0.005) as beat:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(get)
                        await wait_until(lambda: buffered(fd) == 0, "the get read the pipe")
                        await settle()
                        assert reader_lock_is_held(q), "the get is not in the middle of the item"
                        os.kill(producer.pid or 0, signal.SIGKILL)  # the fault
                        await anyio.to_thread.run_sync(producer.join)
                        killed_at, cpu_at_kill = time.monotonic(), time.thread_time()
                        scope.cancel()
                    # The cancelled get returned at once; the rest of the item is waited
                    # for in a thread, and the next get collects what that found.
                    assert outcome == [] and scope.cancelled_caught
                    assert ended_at[0] - killed_at < STALL / 2, "the cancel was not prompt"
                    with pytest.raises(anyio.BrokenResourceError) as info:
                        await aq.get()
                    outcome.append(info.value)
                    ended_at.append(time.monotonic())
                    cpu_during_stall = time.thread_time() - cpu_at_kill
                    worst_gap, worst_cpu_gap = beat.worst_gap, beat.worst_cpu_gap
        finally:
            if producer.is_alive():
                producer.kill()
            producer.join()
        assert producer.exitcode == -signal.SIGKILL
        print(
            f"the broken item was reported {(ended_at[-1] - killed_at) * 1e3:.0f} ms after the "
            f"kill, using {cpu_during_stall * 1e3:.0f} ms of loop CPU; worst heartbeat gap "
            f"{worst_gap * 1e3:.1f} ms wall, {worst_cpu_gap * 1e3:.1f} ms loop CPU"
        )
        assert len(outcome) == 1
        error = outcome[0]
        assert isinstance(error, anyio.BrokenResourceError), error
        assert "mid-item" in str(error)
        # Bounded: stall_timeout after the last byte, which came before the kill.
        assert ended_at[-1] - killed_at < STALL + 1.0
        assert worst_cpu_gap < STALL_CPU_BOUND, "the loop was kept busy"
        assert worst_gap < STALL_WALL_BOUND, "the loop was blocked"
        assert cpu_during_stall < STALL / 2, "the waiting get spun"
        assert not reader_lock_is_held(q), "the broken get kept the reader lock"
        with pytest.raises(anyio.BrokenResourceError):
            await aq.get()
        with pytest.raises(anyio.BrokenResourceError):
            await aq.put("x")
        # The documented loss beyond the item: the dead producer's write lock stays taken.
        assert not q._wlock.acquire(False), "the queue's write lock was free after the kill"


class AlwaysFullPipe:
    """The transport of a queue pipe whose producer is always ahead of the reader: every look
    finds another 64 KiB of *data* there (a producer on another core refilling the pipe as
    fast as it is drained, made deterministic). Counts the bytes read between two turns of
    the loop.

    It stands in for the adapter's transport, through which the body of an item that is not
    all there is read; the frame's header goes through the real pipe (the adapter reads a
    header straight from the descriptor)."""

    def __init__(self, data: bytes, beat: Any) -> None:
        self.data = memoryview(data)
        self.beat = beat
        self.turn = -1
        self.since_turn = 0
        self.worst = 0

    def available(self) -> int:
        return min(64 * KiB, len(self.data))

    def _take(self, max_bytes: int) -> memoryview | None:
        n = min(self.available(), max_bytes)
        if n == 0:
            return None
        if self.beat.ticks != self.turn:
            self.turn, self.since_turn = self.beat.ticks, 0
        self.since_turn += n
        self.worst = max(self.worst, self.since_turn)
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk

    def read_some(self, max_bytes: int) -> bytes | None:
        chunk = self._take(max_bytes)
        return None if chunk is None else bytes(chunk)

    def read_into(self, buf: memoryview) -> int | None:
        chunk = self._take(len(buf))
        if chunk is None:
            return None
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        pass


async def test_get_gives_the_loop_turns_while_a_producer_keeps_the_pipe_full() -> None:
    """The get of a 64 MiB item from a producer that is always ahead gives the event loop
    a turn at least every few MiB (a heartbeat task counts the turns; as trio runs the tasks
    of a turn in random order, two of the get's reads can fall between two of its ticks)."""
    payload = pickle.dumps(b"\x5a" * SIZE, pickle.HIGHEST_PROTOCOL)
    async with open_queue(use_threads=False) as aq:
        q = aq.queue
        q._sem.acquire()  # the item's slot, as put() takes it
        # The header, and a byte after it that keeps the real pipe readable throughout.
        write_all(q._writer.fileno(), struct.pack("!i", len(payload)) + b"\0")
        async with heartbeat(0) as beat:
            pipe = AlwaysFullPipe(payload, beat)
            assert aq._fast is not None
            with patched(aq._fast.reader, "_transport", pipe), anyio.fail_after(30):
                item = await aq.get()
        assert item == b"\x5a" * SIZE
        print(f"worst: {pipe.worst / MiB:.1f} MiB read without a loop turn")
        assert pipe.worst <= 8 * MiB, "the get held the loop"


async def test_get_of_a_64_mib_item_being_written_never_stalls_the_loop() -> None:
    """The setup of the case above without the kill: the get reads each item as the
    producer's feeder writes it, and the heartbeat shows that the loop kept its turns."""
    count = 3
    async with open_queue(use_threads=False) as aq:
        q = aq.queue
        producer = FORK.Process(
            target=fault_workers.put_big_items, args=(q, count, SIZE), name="test-big-producer"
        )
        producer.start()
        try:
            gaps = []
            with anyio.fail_after(60):
                async with heartbeat(0.001) as beat:
                    for _ in range(count):
                        beat.reset()
                        item = await aq.get()
                        gaps.append((beat.worst_gap, beat.worst_cpu_gap))
                        assert len(item) == SIZE
        finally:
            producer.join(30)
            if producer.is_alive():
                producer.kill()
                producer.join()
        assert producer.exitcode == 0
        print(
            "worst gaps (wall, loop CPU), ms:", [(round(w * 1e3), round(c * 1e3)) for w, c in gaps]
        )
        assert max(c for _, c in gaps) < STALL_CPU_BOUND, "the loop was busy reading"
        assert max(w for w, _ in gaps) < STALL_WALL_BOUND
