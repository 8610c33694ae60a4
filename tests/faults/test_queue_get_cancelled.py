"""Fault case 3: a queue ``get`` is cancelled while it holds the queue's reader lock.

Setup: a bounded ``multiprocessing.Queue`` (``maxsize=1``) and its ``AsyncQueue``, on either
route. A producer process writes the first 8 KiB of a 1 MiB item into the queue's pipe (its
slot in the queue taken, as ``put`` does), then waits; the async ``get`` takes the reader lock
and reads those bytes, so it holds the lock in the middle of the item.

Fault: the ``get`` is cancelled there; then the producer writes the rest of the item.

Expected: the cancelled ``get`` returns nothing and raises the cancellation, at once. The
rest of the item is read in one of asyncmp's threads, so once the item is whole the reader
lock is free again and the item's slot is released: ``qsize()`` counts the item the adapter
holds, a bounded ``put`` finds room at once, a plain ``get()`` in another process gets the
next item whole, and the adapter's next ``get`` returns the big item whole.

Lost: nothing. The big item is held by this adapter (its next ``get`` returns it); other
consumers don't see it, and ``aclose()`` would put it back in the queue.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import pytest

from tests.support import queue_workers
from tests.support.io import KiB, buffered, reader_lock_is_held, settle, wait_until
from tests.support.queues import FORK, asyncmp_threads, big_frame, child, open_queue

from . import fault_workers

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="the peers are forked POSIX processes"),
]

ROUTES = pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
SPLIT = 8 * KiB


async def cancel_get_mid_item(aq: Any) -> tuple[object, Any]:
    """Run the fault: a get that holds the lock mid-item is cancelled, then the producer
    finishes the item. Returns (the item, the producer process)."""
    q = aq.queue
    frame, item = big_frame()
    written, release = FORK.Event(), FORK.Event()
    got: list[object] = []
    async with child(
        fault_workers.write_item_in_two_parts, q, frame[:SPLIT], frame[SPLIT:], written, release
    ) as producer:
        scope = anyio.CancelScope()

        async def get() -> None:
            with scope:
                got.append(await aq.get())

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(get)
                await wait_until(
                    lambda: written.is_set() and buffered(q._reader.fileno()) == 0,
                    "the get read the first part of the item",
                )
                await settle()
                assert reader_lock_is_held(q)  # by the get, in the middle of the item
                assert q.full()  # the item's slot is taken
                scope.cancel()
                release.set()
        assert scope.cancelled_caught
        assert got == []
    assert producer.exitcode == 0
    # The rest of the item is read in a thread until the item is whole.
    await wait_until(lambda: not asyncmp_threads(), "the get's thread ended")
    await wait_until(lambda: not reader_lock_is_held(q), "the reader lock is free")
    return item, producer


@ROUTES
async def test_get_cancelled_holding_the_reader_lock_loses_nothing(use_threads: bool) -> None:
    async with open_queue(use_threads=use_threads, maxsize=1, stall_timeout=30) as aq:
        q = aq.queue
        item, _ = await cancel_get_mid_item(aq)
        assert not q.full(), "the cancelled get did not release the item's slot"
        with anyio.fail_after(5):  # a bounded put does not deadlock
            await aq.put("next")
        async with child(queue_workers.get_expecting, q, "next", 10) as consumer:
            pass
        assert consumer.exitcode == 0, "a plain get() elsewhere did not get the next item whole"
        with anyio.fail_after(5):
            assert await aq.get() == item
        assert not reader_lock_is_held(q)


@ROUTES
async def test_qsize_counts_the_item_a_cancelled_get_holds(use_threads: bool) -> None:
    async with open_queue(use_threads=use_threads, maxsize=1, stall_timeout=30) as aq:
        item, _ = await cancel_get_mid_item(aq)
        assert aq.queue.qsize() == 0
        assert aq.qsize() == 1
        assert not aq.empty()
        with anyio.fail_after(5):
            await aq.put("next")
        assert aq.qsize() == 2
        with anyio.fail_after(5):
            assert [await aq.get(), await aq.get()] == [item, "next"]
        assert aq.qsize() == 0
