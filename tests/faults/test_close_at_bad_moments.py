"""Fault case 10: closing at bad moments, then a new file takes the old descriptor number.

Setup: an ``AsyncConnection`` that receives, on either route, over a socketpair or a pipe; an
``AsyncQueue`` with a get waiting.

Faults:

* ``close()`` or ``aclose()`` from another task while a receive waits (both routes);
* ``close()`` between readiness and the read (descriptor route): the receive's readiness wait
  has returned because the peer wrote, and the connection is closed before the receive reads;
* ``aclose()`` of a queue adapter between readiness and the read of its get, and while the
  reader lock is being handed over to its get by the thread that queued for it.

After each close, the descriptor number that asyncmp released is taken over by a new pipe
that holds data, as the next ``open()`` anywhere in the process could.

Expected: the receive (or get) raises ``anyio.ClosedResourceError`` promptly (within a thread
slice on the thread route); nothing is ever read from the newcomer that took the old number;
the queue's reader lock is free afterwards.

Lost: what the peer wrote and nobody received: closing an end gives up its unread messages
(and a queue adapter's kept items).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import asyncmp
from asyncmp._threads import BlockingCall
from tests.support.io import (
    after_await,
    after_readiness,
    buffered,
    frame,
    reader_lock_is_held,
    settle,
    take_over_fd,
    wait_until,
    write_all,
)
from tests.support.queues import asyncmp_threads, open_queue

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptor numbers"),
]

TRANSPORTS = pytest.mark.parametrize("transport", ["socket", "pipe"])
NEWCOMER = b"data of a file that merely reuses the number"


async def outcome(fn: Callable[[], Any]) -> str:
    try:
        await fn()
    except Exception as exc:
        return type(exc).__name__
    return "returned"


@TRANSPORTS
@pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_close_during_a_waiting_receive(use_threads: bool, transport: str, how: str) -> None:
    a, peer = asyncmp.Pipe(transport == "socket", use_threads=use_threads)
    number = a.fileno()
    results: list[str] = []
    try:
        with anyio.fail_after(5):  # promptly
            async with anyio.create_task_group() as tg:

                async def receive() -> None:
                    results.append(await outcome(a.recv))

                tg.start_soon(receive)
                await settle()
                if how == "close":
                    a.close()
                else:
                    await a.aclose()
            # The thread route releases the descriptor once its thread has stopped.
            await wait_until(lambda: a.connection.closed and not asyncmp_threads(), "released")
        assert results == ["ClosedResourceError"]
        with take_over_fd(number, NEWCOMER):
            assert await outcome(a.recv) == "ClosedResourceError"
            await settle()
            assert buffered(number) == len(NEWCOMER), "something read from the newcomer"
    finally:
        await a.aclose()
        peer.close()


@TRANSPORTS
async def test_close_between_readiness_and_the_read(transport: str) -> None:
    a, peer = asyncmp.Pipe(transport == "socket")
    number = a.fileno()
    results: list[str] = []
    newcomer: list[Any] = []

    async def close_and_reuse() -> None:
        a.close()
        takeover = take_over_fd(number, NEWCOMER)
        takeover.__enter__()
        newcomer.append(takeover)

    try:
        with after_readiness(close_and_reuse) as fired, anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def receive() -> None:
                    results.append(await outcome(a.recv_bytes))

                tg.start_soon(receive)
                await settle()
                write_all(peer.fileno(), frame(b"readiness"))
            assert fired
        assert results == ["ClosedResourceError"]
        await settle()
        assert buffered(number) == len(NEWCOMER), "the receive read from the newcomer"
    finally:
        for takeover in newcomer:
            takeover.__exit__(None, None, None)
        await a.aclose()
        peer.close()


async def test_queue_aclose_between_readiness_and_the_read() -> None:
    async with open_queue(use_threads=False) as aq:
        q = aq.queue
        await aq.put("first")  # starts this process's feeder thread
        assert await aq.get() == "first"
        number = q._reader.fileno()
        results: list[str] = []
        newcomer: list[Any] = []

        async def close_and_reuse() -> None:
            # Closing the adapter closes the queue in this process: the feeder thread
            # closes the queue's pipe ends here once it has written what was put.
            await aq.aclose()
            takeover = take_over_fd(number, NEWCOMER)
            takeover.__enter__()
            newcomer.append(takeover)

        try:
            with after_readiness(close_and_reuse) as fired, anyio.fail_after(10):
                async with anyio.create_task_group() as tg:

                    async def get() -> None:
                        results.append(await outcome(aq.get))

                    tg.start_soon(get)
                    await settle()
                    await aq.put("second")
                assert fired
            assert results == ["ClosedResourceError"]
            await settle()
            assert buffered(number) == len(NEWCOMER), "the get read from the newcomer"
            assert not reader_lock_is_held(q)
        finally:
            for takeover in newcomer:
                takeover.__exit__(None, None, None)


async def test_queue_aclose_while_the_reader_lock_is_handed_over() -> None:
    """The get queued for the lock in a thread; the thread has just taken it and ended,
    and the adapter is closed before the get's own code runs again."""
    async with open_queue(use_threads=False) as aq:
        q = aq.queue
        await aq.put("held back")
        await wait_until(lambda: buffered(q._reader.fileno()) > 0, "the item is in the pipe")
        assert q._rlock.acquire(False)  # as another consumer, mid-get
        results: list[str] = []
        handed_over = after_await(
            BlockingCall, "wait", aq.aclose, match=lambda call: call._name == "asyncmp-queue-rlock"
        )
        with handed_over as fired, anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def get() -> None:
                    results.append(await outcome(aq.get))

                tg.start_soon(get)
                await wait_until(lambda: bool(asyncmp_threads()), "the get queues for the lock")
                q._rlock.release()  # the get's thread takes it
            assert fired
        assert results == ["ClosedResourceError"]
        assert not reader_lock_is_held(q), "the reader lock stayed taken after aclose()"
