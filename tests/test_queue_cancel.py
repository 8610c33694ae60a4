"""A ``get`` cancelled in the middle of an item returns at once, and loses nothing.

A producer writes the start of a large item raw into the queue's pipe and then pauses (it
waits for an event the test sets once the cancelled get has returned). The get has read
the first part when its deadline passes. It must return promptly; the rest of the item is
read in the background and kept for the next ``get``; the reader lock is let go as soon as
the item is whole, whether or not this adapter ever gets again; and ``aclose()`` meanwhile
waits for the item and puts it back for the other consumers.

Every test runs on both routes (``fd`` and ``threads``) and on every event-loop backend.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

import anyio
import pytest

from asyncmp import AsyncQueue

from . import queue_workers
from .faults import fault_workers
from .support.io import KiB, MiB, buffered, reader_lock_is_held, settle, wait_for_event, wait_until
from .support.queues import FORK, asyncmp_threads, big_frame, child, header, open_queue

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="the peers are forked POSIX processes"),
]

#: The "no hang" bound on the time from a get's deadline to its return (the target is
#: 0.1 s; the machine may be busy).
RETURN_BOUND = 0.5
#: The stall_timeout of these tests: far past RETURN_BOUND, so that a get that waits for the
#: rest of the item shows, and short enough that it fails in seconds.
STALL = 5.0
#: What the producer writes before it pauses.
SPLIT = 256 * KiB


@pytest.fixture(params=["fd", "threads"])
def use_threads(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "threads")


async def cancel_mid_item(aq: AsyncQueue[Any], written: Any) -> float:
    """Start a get; once it has read all the producer wrote (*written* is set and the pipe
    is empty), let its deadline pass. Return how long after the deadline it returned."""
    q = aq.queue
    scope = anyio.CancelScope()
    returned: list[float] = []

    async def get() -> None:
        with scope:
            await aq.get()
        returned.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(get)
        await wait_for_event(written, "the producer wrote the first part")
        await wait_until(lambda: buffered(q._reader.fileno()) == 0, "the get read the first part")
        assert reader_lock_is_held(q), "the get holds the reader lock, mid-item"
        deadline = anyio.current_time()
        scope.deadline = deadline
    assert scope.cancelled_caught, "the get returned, yet the item is not whole"
    return returned[0] - deadline


async def test_a_get_cancelled_mid_item_returns_at_once_and_the_next_get_has_the_item(
    use_threads: bool,
) -> None:
    """The issue's reproduction: 256 KiB of a 16 MiB item, then the producer pauses."""
    frame, item = big_frame(16 * MiB)
    async with open_queue(use_threads=use_threads, stall_timeout=STALL) as aq:
        q = aq.queue
        written, release = FORK.Event(), FORK.Event()
        async with child(
            fault_workers.write_item_in_two_parts, q, frame[:SPLIT], frame[SPLIT:], written, release
        ) as writer:
            try:
                late = await cancel_mid_item(aq, written)
            finally:
                release.set()
            print(f"the cancelled get returned {late * 1e3:.1f} ms after its deadline")
            assert late < RETURN_BOUND, f"the cancelled get returned {late:.3f} s late"
            with anyio.fail_after(20):
                assert await aq.get() == item
        assert writer.exitcode == 0
        assert not reader_lock_is_held(q)


async def test_the_reader_lock_is_let_go_once_the_item_is_whole_without_another_get(
    use_threads: bool,
) -> None:
    """After the cancelled get this adapter never gets again until a plain consumer in
    another process has taken the *next* item: it can only do so if the rest of the first
    item was read in the background, exactly (not into the next), and the lock let go."""
    frame, item = big_frame(MiB)
    following = pickle.dumps("next")
    rest = frame[SPLIT:] + header(len(following)) + following
    async with open_queue(use_threads=use_threads, stall_timeout=STALL) as aq:
        q = aq.queue
        assert q._sem.acquire(timeout=5)  # the slot of "next" (the writer takes the other)
        written, release = FORK.Event(), FORK.Event()
        async with child(
            fault_workers.write_item_in_two_parts, q, frame[:SPLIT], rest, written, release
        ) as writer:
            try:
                late = await cancel_mid_item(aq, written)
            finally:
                release.set()
            assert late < RETURN_BOUND, f"the cancelled get returned {late:.3f} s late"
            async with child(queue_workers.get_expecting, q, "next", 20) as consumer:
                pass
            assert consumer.exitcode == 0, "the plain consumer did not get the next item"
            assert not reader_lock_is_held(q)
            assert aq.qsize() == 1  # the first item, kept for this adapter's next get
            with anyio.fail_after(20):
                assert await aq.get() == item
            assert aq.qsize() == 0
        assert writer.exitcode == 0


async def test_aclose_while_the_rest_of_a_cancelled_item_comes_puts_it_back_whole(
    use_threads: bool,
) -> None:
    """The adapter is closed while the rest of the cancelled get's item is still to come:
    aclose() waits for it and puts it back in the queue, where another consumer gets it
    whole; no thread is left."""
    frame, item = big_frame(MiB)
    async with open_queue(use_threads=use_threads, stall_timeout=STALL) as aq:
        q = aq.queue
        written, release = FORK.Event(), FORK.Event()
        async with child(
            fault_workers.write_item_in_two_parts, q, frame[:SPLIT], frame[SPLIT:], written, release
        ) as writer:
            try:
                await cancel_mid_item(aq, written)
                async with child(queue_workers.get_expecting, q, item, 20) as consumer:
                    with anyio.fail_after(20):
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(aq.aclose)
                            await settle()
                            release.set()  # the producer finishes the item
            finally:
                release.set()
        assert writer.exitcode == 0
        assert consumer.exitcode == 0, "the other consumer did not get the item whole"
        assert asyncmp_threads() == [], "a thread outlived aclose()"
        assert not reader_lock_is_held(q)
