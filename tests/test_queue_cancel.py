"""A ``get`` cancelled in the middle of an item returns at once, and loses nothing.

A producer writes the start of a large item raw into the queue's pipe and then pauses (it
waits for an event the test sets once the cancelled get has returned). The get has read
the first part when its deadline passes. It must return promptly; the rest of the item is
read in the background and kept for the next ``get``; the reader lock is let go as soon as
the item is whole, whether or not this adapter ever gets again; and ``aclose()`` meanwhile
waits for the item and puts it back for the other consumers, without waiting for them to
read it: a thread of its own writes it back whole, which the process's exit waits for.

Every test runs on both routes (``fd`` and ``threads``) and on every event-loop backend.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

import anyio
import pytest

from asyncmp import AsyncQueue

from .faults import fault_workers
from .support import queue_workers
from .support.io import KiB, MiB, buffered, reader_lock_is_held, settle, wait_for_event, wait_until
from .support.queues import (
    FORK,
    asyncmp_threads,
    backend_of,
    big_frame,
    child,
    header,
    open_queue,
    release_pipe,
)

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
        # The put-back's thread ends once the item is in the pipe (the consumer took it).
        await wait_until(lambda: asyncmp_threads() == [], "no asyncmp thread is left")
        assert not reader_lock_is_held(q)


# -- nobody else reading: aclose() puts the item back in the background --------------------

#: The "no hang" bound on aclose() with nobody reading: far below STALL, which is what a
#: put-back that needs a reader would wait before it gave up.
ACLOSE_BOUND = STALL / 2


def _count_as_put(q: Any, items: int) -> None:
    """What ``put()`` counts for *items* written raw (the writer takes one slot): the other
    slots and, on a ``JoinableQueue``, the unfinished tasks."""
    sem = getattr(q, "_sem", None)
    if sem is not None:
        for _ in range(items - 1):
            assert sem.acquire(timeout=5)
    unfinished = getattr(q, "_unfinished_tasks", None)
    if unfinished is not None:
        with q._cond:
            for _ in range(items):
                unfinished.release()


def _no_task_unfinished(q: Any) -> bool:
    unfinished = getattr(q, "_unfinished_tasks", None)
    return unfinished is None or bool(unfinished._semlock._is_zero())


async def _cancel_mid_item_then_finish(aq: AsyncQueue[Any], first: bytes, rest: bytes) -> None:
    """A producer writes *first*, a get is cancelled mid-item, the producer writes *rest*
    and exits: the item is whole by then, or nearly, in the hands of the adapter's thread."""
    written, release = FORK.Event(), FORK.Event()
    async with child(
        fault_workers.write_item_in_two_parts, aq.queue, first, rest, written, release
    ) as writer:
        try:
            late = await cancel_mid_item(aq, written)
        finally:
            release.set()
        assert late < RETURN_BOUND, f"the cancelled get returned {late:.3f} s late"
    assert writer.exitcode == 0


@pytest.mark.parametrize("kind", ["Queue", "JoinableQueue", "SimpleQueue"])
async def test_aclose_with_nobody_reading_puts_the_item_back_whole_and_returns(
    use_threads: bool, kind: str
) -> None:
    """The issue's reproduction: a get cancelled in the middle of a 16 MiB item, a small
    item after it, and aclose() while no other consumer reads. The item is larger than the
    pipe, so it can only go back as somebody reads: aclose() must not wait for that (nor
    give up after stall_timeout, leaving part of the item in the pipe). It returns at once;
    a plain consumer that comes later gets the small item, then the big one whole, and
    nothing after them; the task counts of a JoinableQueue are as if it were never taken."""
    frame, item = big_frame(16 * MiB)
    following = pickle.dumps("next")
    rest = frame[SPLIT:] + header(len(following)) + following
    async with open_queue(kind, use_threads=use_threads, stall_timeout=STALL) as aq:
        q = aq.queue
        _count_as_put(q, 2)
        await _cancel_mid_item_then_finish(aq, frame[:SPLIT], rest)
        # The consumer starts now (aclose() closes a SimpleQueue here, and a child forked
        # after that could not read it), and reads once aclose() has returned.
        start = FORK.Event()
        expected = ["next", item]
        async with child(queue_workers.get_in_order, q, expected, 20, start) as consumer:
            try:
                started = anyio.current_time()
                await aq.aclose()
                took = anyio.current_time() - started
            finally:
                start.set()
            print(f"aclose() took {took * 1e3:.1f} ms")
            assert took < ACLOSE_BOUND, f"aclose() waited {took:.1f} s for a reader"
        assert consumer.exitcode == 0, "the plain consumer did not get both items whole"
        await wait_until(lambda: asyncmp_threads() == [], "the put-back thread ended")
        assert _no_task_unfinished(q), "the put-back counted the item as a new task"


async def test_an_item_put_back_into_a_full_bounded_queue_waits_for_a_slot(
    use_threads: bool,
) -> None:
    """The cancelled get's item let go of its slot once it was whole, and a producer took
    that slot meanwhile: the queue is full when aclose() gives the item back. It must wait
    for a slot as a put does, not go in uncounted, which would make the consumer that
    takes the last item release the bounded semaphore past its bound (ValueError). The
    item is small enough to fit the pipe, and the consumer starts once aclose() returned."""
    split = 8 * KiB
    frame, item = big_frame(32 * KiB)
    async with open_queue(maxsize=2, use_threads=use_threads, stall_timeout=STALL) as aq:
        q = aq.queue
        _count_as_put(q, 2)  # the slot of "next"; the writer takes the item's
        following = pickle.dumps("next")
        rest = frame[split:] + header(len(following)) + following
        await _cancel_mid_item_then_finish(aq, frame[:split], rest)
        with anyio.fail_after(20):
            await aq.put("filler")  # the slot the item let go
        start = FORK.Event()
        expected = ["next", "filler", item]
        async with child(queue_workers.get_in_order, q, expected, 20, start) as consumer:
            try:
                with anyio.fail_after(20):
                    await aq.aclose()
            finally:
                start.set()
        assert consumer.exitcode == 0, "the consumer did not get the three items"
        await wait_until(lambda: asyncmp_threads() == [], "the put-back thread ended")
        if sys.platform == "linux":  # (get_value() is not there on macOS)
            assert q._sem.get_value() == 2, "a slot was counted twice or never"


async def test_the_item_put_back_waits_for_a_reader_past_stall_timeout() -> None:
    """stall_timeout bounds a wait for a producer, not the put-back's wait for a reader: the
    first consumer comes after twice stall_timeout, and gets the item whole. (The wait is
    what is tested: time must pass with nobody reading.)"""
    stall = 2.0
    frame, item = big_frame(16 * MiB)
    async with open_queue(use_threads=False, stall_timeout=stall) as aq:
        q = aq.queue
        await _cancel_mid_item_then_finish(aq, frame[:SPLIT], frame[SPLIT:])
        start = FORK.Event()
        async with child(queue_workers.get_in_order, q, [item], 20, start) as consumer:
            try:
                await aq.aclose()
                await anyio.sleep(2 * stall)
            finally:
                start.set()
        assert consumer.exitcode == 0, "the put-back gave up with nobody reading"
        await wait_until(lambda: asyncmp_threads() == [], "the put-back thread ended")


async def test_a_process_that_exits_after_such_an_aclose_waits_until_the_item_is_back(
    anyio_backend: object, mp_context: Any
) -> None:
    """A child takes a 16 MiB item in a get cancelled mid-item, aclose()s and returns, with
    nobody reading. Exiting then would leave part of the item in the pipe, so the child's
    exit waits for the put-back, as it waits for a Queue's feeder thread: it is still there
    a second later, and once this process reads the item (whole), it exits with code 0.
    Under each start method: their children leave through different exit paths."""
    backend, uvloop = backend_of(anyio_backend)
    frame, item = big_frame(16 * MiB)
    q = mp_context.Queue()
    closed = mp_context.Event()
    try:
        async with child(
            fault_workers.aclose_after_a_cancelled_get_then_exit,
            q,
            frame,
            32 * KiB,
            STALL,
            closed,
            backend,
            uvloop,
            ctx=mp_context,
        ) as proc:
            await wait_for_event(closed, "the child closed its adapter", timeout=30)
            with anyio.move_on_after(1.0):  # a "no hang" bound on an exit that would be wrong
                await anyio.wait_readable(proc.sentinel)
            assert proc.is_alive(), f"the child exited mid-put-back (code {proc.exitcode})"
            # A consumer of its own, which can be killed if it blocks inside a torn item.
            start = mp_context.Event()
            start.set()
            async with child(
                queue_workers.get_in_order, q, [item], 20, start, ctx=mp_context
            ) as consumer:
                pass
            assert consumer.exitcode == 0, "the consumer did not get the item whole"
        assert proc.exitcode == 0
        assert buffered(q._reader.fileno()) == 0, "something was left in the pipe"
    finally:
        release_pipe(q)


@pytest.mark.skipif(
    sys.platform != "linux",
    reason="only Linux tells who holds a pipe's read end (/proc); elsewhere exit waits",
)
async def test_a_process_that_is_its_queues_only_reader_exits_at_once_after_such_an_aclose(
    anyio_backend: object, mp_context: Any
) -> None:
    """The same child, but it made the queue itself: no other process holds the queue's
    read end, so nothing could ever read the item it puts back, and its exit must not wait
    for that (it would wait forever: the pipe never says its readers are gone while this
    very process holds one). It exits with code 0 in seconds."""
    backend, uvloop = backend_of(anyio_backend)
    frame, _ = big_frame(16 * MiB)
    closed = mp_context.Event()
    async with child(
        fault_workers.make_a_queue_then_aclose_after_a_cancelled_get,
        mp_context.get_start_method(),
        frame,
        32 * KiB,
        STALL,
        closed,
        backend,
        uvloop,
        ctx=mp_context,
    ) as proc:
        await wait_for_event(closed, "the child closed its adapter", timeout=30)
        # (Not the sentinel: it is readable a moment before the process can be reaped.)
        await wait_until(
            lambda: not proc.is_alive(),
            "the child exited (it waits for a put-back nobody can read)",
            timeout=30,  # a "no hang" bound
        )
    assert proc.exitcode == 0
