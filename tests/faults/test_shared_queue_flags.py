"""Fault case 8: a sync consumer in another process blocks in ``get()`` while this process
waits on the same queue, under uvloop (and asyncio, and trio).

Setup: a ``multiprocessing.Queue`` and its ``AsyncQueue`` (descriptor route). A child process
loops on the plain, blocking ``q.get()`` and reports every item (or any exception) over a
pipe, spending 2 ms on each; it is blocked in ``get()``, holding the reader lock, before
anything is put.

Fault: this process waits on the same queue with an async ``get`` loop. Under uvloop the
usual way to wait (``loop.add_reader``) would set ``O_NONBLOCK`` on the read end, and that
flag belongs to the open file description shared with the child, whose next blocking read
would fail with ``BlockingIOError`` (``test_guarantees.py`` shows that uvloop does set it).
Items are put one by one, and the flags are read before each one, while both wait; at the
end this process stops getting, and the child gets the lock back and blocks reading the
empty pipe once more before its last item comes.

Expected: the child never sees ``BlockingIOError`` (or any exception); ``O_NONBLOCK`` is clear
on the read end during the waits and after them; the two consumers together get every item
exactly once.

Lost: nothing.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import pytest

import asyncmp
from tests.support.io import nonblocking, reader_lock_is_held, settle, wait_until
from tests.support.queues import FORK, open_queue

from . import fault_workers

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="descriptor flags"),
]

COUNT = 40


async def test_sync_consumer_never_sees_blocking_io_error() -> None:
    async with open_queue(use_threads=False) as aq:
        q = aq.queue
        fd = q._reader.fileno()
        fd_getter = aq._fast
        assert fd_getter is not None
        flags_seen: list[bool] = [nonblocking(fd)]
        report, child_report = asyncmp.Pipe(duplex=False)
        consumer = FORK.Process(
            target=fault_workers.get_until_none,
            args=(q, child_report, 0.002),
            name="test-sync-consumer",
        )
        theirs: list[Any] = []
        mine: list[Any] = []
        try:
            consumer.start()
            child_report.close()
            with anyio.fail_after(30):
                await wait_until(lambda: reader_lock_is_held(q), "the child blocks in get()")

                async def my_gets() -> None:
                    while True:
                        mine.append(await aq.get())

                async def their_reports() -> None:
                    async for kind, item in report:
                        theirs.append((kind, item))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(their_reports)
                    tg.start_soon(my_gets)
                    for i in range(COUNT):
                        await settle()  # this process's get waits, and so does the child
                        flags_seen.append(nonblocking(fd))
                        await aq.put(i)
                    await wait_until(
                        lambda: len(mine) + len(theirs) >= COUNT, "every item was taken"
                    )
                    tg.cancel_scope.cancel()
                # The child gets the lock back and blocks reading the empty pipe: were the
                # pipe's description non-blocking, that read would fail now.
                await wait_until(
                    lambda: reader_lock_is_held(q) and not fd_getter.rlock.held,
                    "the child waits in get() again",
                )
                await settle()
                flags_seen.append(nonblocking(fd))
                await aq.put(None)  # the child's signal to stop
                while not theirs or theirs[-1][0] == "item":
                    theirs.append(await report.recv())
            await anyio.to_thread.run_sync(consumer.join, 10)
        finally:
            await report.aclose()
            if consumer.is_alive():
                consumer.kill()
            consumer.join()
        flags_seen.append(nonblocking(fd))
        assert consumer.exitcode == 0
        assert theirs[-1] == ("done", None), f"the child's get() failed: {theirs[-1]}"
        assert not any(flags_seen), "O_NONBLOCK was set on the shared read end"
        got = sorted([item for _, item in theirs[:-1]] + mine)
        assert got == list(range(COUNT))
        print(f"this process got {len(mine)} items, the sync consumer {len(theirs) - 1}")
