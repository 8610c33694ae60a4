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

import multiprocessing
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import asyncmp
from asyncmp._core.threads import BlockingCall
from tests.support.io import (
    MiB,
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


@TRANSPORTS
@pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
async def test_close_wakes_the_send_in_progress_and_those_queued(
    use_threads: bool, transport: str
) -> None:
    """A peer that never reads: one send blocks mid-message, two wait behind it. Closing
    wakes all three at once; the message in progress is cut (the peer sees the end of the
    stream in the middle of it), and nothing of the queued ones goes out."""
    if transport == "socket":
        a, peer = asyncmp.Pipe(use_threads=use_threads)
    else:
        reader, writer = multiprocessing.Pipe(duplex=False)
        a, peer = asyncmp.AsyncConnection(writer, use_threads=use_threads), reader
    results: list[str] = []
    try:
        with anyio.fail_after(5):  # at once; the bound is only a "no hang" one
            async with anyio.create_task_group() as tg:

                async def send(payload: bytes) -> None:
                    results.append(await outcome(lambda: a.send_bytes(payload)))

                tg.start_soon(send, bytes(8 * MiB))
                # Past the 4-byte header (written apart from a large payload): in the body.
                await wait_until(lambda: buffered(peer.fileno()) > 4, "the first send started")
                tg.start_soon(send, b"queued 1")
                tg.start_soon(send, b"queued 2")
                await settle()
                assert results == []
                a.close()
        assert results == ["ClosedResourceError"] * 3
        await wait_until(lambda: a.connection.closed and not asyncmp_threads(), "released")
        # The first message is cut: the stdlib reports the end of the stream inside it.
        with pytest.raises(OSError, match="end of file during message"):
            peer.recv_bytes()
    finally:
        await a.aclose()
        peer.close()


# --- closing outside any event loop --------------------------------------------------------


def run_loop(anyio_backend: Any, fn: Callable[[], Awaitable[None]]) -> None:
    """Run *fn* in an event loop of the backend under test, to its end."""
    name, options = (anyio_backend, {}) if isinstance(anyio_backend, str) else anyio_backend
    anyio.run(fn, backend=name, backend_options=options)


def join_asyncmp_threads(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name.startswith("asyncmp"):
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), f"{thread.name} still runs after {timeout} s"


@pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
def test_close_after_the_loop_ended_closes_the_descriptor(
    anyio_backend: Any, use_threads: bool
) -> None:
    """A connection used in a loop (a receive served, one cancelled while it waited) is
    closed after that loop has ended: close() raises nothing, and the descriptor is
    closed, at once on the descriptor route, once its thread stopped on the thread route.
    recv_nowait() works there too."""
    a, peer = asyncmp.Pipe(use_threads=use_threads)
    try:

        async def use() -> None:
            peer.send("served")
            assert await a.recv() == "served"
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.recv)
                await settle()
                tg.cancel_scope.cancel()

        run_loop(anyio_backend, use)
        peer.send("after the loop")
        deadline = time.monotonic() + 10
        while True:  # the thread route's abandoned receive takes it in its thread
            try:
                assert a.recv_nowait() == "after the loop"
                break
            except anyio.WouldBlock:
                assert time.monotonic() < deadline, "recv_nowait() never got the message"
                time.sleep(0.001)
        a.close()
        assert a.closed
        join_asyncmp_threads()
        assert a.connection.closed
        with pytest.raises(EOFError):
            peer.recv()
        a.close()  # again: nothing to do
    finally:
        a.close()
        join_asyncmp_threads()
        peer.close()
