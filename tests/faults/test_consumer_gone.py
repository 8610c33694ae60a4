"""Fault case 7: the consumer is gone.

Connections. Setup: an ``AsyncConnection`` that sends, on either route, over a socketpair or a
one-way pipe; the other end lives only in a child process that reads nothing. Fault: the child
is SIGKILLed, once before a small send, and once while an 8 MiB send waits for room.
Expected: the send raises ``anyio.BrokenResourceError`` (promptly, for the waiting one), so
does every later send, and nothing is printed on stderr.

Queues. A queue's pipe stays open in every process that holds the queue, the producer
included, so a consumer that dies leaves the items in the pipe for the next one: that is
tested as such (nothing lost). Only when no process holds the read end any more can a put
know that the consumer is gone. Setup: the producer dropped its copy of the read end (the
queue's private ``_reader``) and the only consumer process is SIGKILLed. Expected: ``put``
raises ``anyio.BrokenResourceError``, and no feeder thread prints a traceback.

A consumer killed while it holds the queue's reader lock (a plain consumer blocked in
``q.get()`` holds it while it waits). Expected: the queue is dead for every consumer: async
gets wait until their timeout or cancellation, ``get_nowait()`` and a plain ``get(timeout)``
find nothing, ``put()`` goes on, ``aclose()`` is prompt.

Race: the last read end closes after a put found one, while the feeder thread still holds the
item. Expected: nothing printed; the next put raises ``anyio.BrokenResourceError``.

Lost: the queue whose reader lock died with its holder, and every item in it.
Connections: the message whose send raised (a send that waited may have put part of
it on the wire; nobody reads it). Queues: nothing while a read end is open; the item whose put
raised, when none is (it was not put); in the race, the items the feeder held.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import sys
from typing import Any

import anyio
import pytest

import asyncmp
from asyncmp import AsyncConnection, AsyncQueue
from tests.support import queue_workers
from tests.support.io import (
    MiB,
    buffered,
    reader_lock_is_held,
    settle,
    wait_for_event,
    wait_until,
)
from tests.support.queues import FORK, child, open_queue

from . import fault_workers

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and POSIX descriptors"),
]

ROUTES = pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
TRANSPORTS = pytest.mark.parametrize("transport", ["socket", "pipe"])


async def start_and_kill(target: Any, *args: Any) -> None:
    """Run *target* in a child that signals it is ready, then SIGKILL and reap it."""
    ready = FORK.Event()
    proc = FORK.Process(target=target, args=(*args, ready), name="test-consumer")
    proc.start()
    try:
        await wait_for_event(ready, "the consumer is ready")
    finally:
        proc.kill()
        await anyio.to_thread.run_sync(proc.join)
    assert proc.exitcode == -signal.SIGKILL


def sending_pair(transport: str, use_threads: bool) -> tuple[AsyncConnection, Any]:
    if transport == "socket":
        return asyncmp.Pipe(use_threads=use_threads)
    reader, writer = multiprocessing.Pipe(duplex=False)
    return AsyncConnection(writer, use_threads=use_threads), reader


@ROUTES
@TRANSPORTS
@pytest.mark.parametrize("when", ["before the send", "during the send"])
async def test_send_to_a_killed_consumer_is_a_broken_resource(
    use_threads: bool, transport: str, when: str, capfd: pytest.CaptureFixture[str]
) -> None:
    a, peer = sending_pair(transport, use_threads)
    ready = FORK.Event()
    proc = FORK.Process(
        target=fault_workers.hold_then_wait_to_be_killed, args=(peer, ready), name="test-peer"
    )
    outcome: list[BaseException | None] = []
    try:
        proc.start()
        peer.close()  # the consumer's end lives in the consumer only

        async def send(payload: bytes) -> None:
            try:
                await a.send_bytes(payload)
            except anyio.BrokenResourceError as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        with anyio.fail_after(10):
            await wait_for_event(ready, "the consumer is ready")
            if when == "before the send":
                proc.kill()
                await anyio.to_thread.run_sync(proc.join)
                await send(b"nobody reads this")
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send, bytes(8 * MiB))
                    await settle()  # the send waits for room
                    assert outcome == []
                    proc.kill()
                    await anyio.to_thread.run_sync(proc.join)
            with pytest.raises(anyio.BrokenResourceError):
                await a.send("and nobody reads this either")
    finally:
        await a.aclose()
        peer.close()
        if proc.is_alive():
            proc.kill()
        proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert len(outcome) == 1
    assert isinstance(outcome[0], anyio.BrokenResourceError)
    _, err = capfd.readouterr()
    assert err == ""


@ROUTES
async def test_put_after_the_consumer_died_waits_in_the_pipe_for_the_next(
    use_threads: bool,
) -> None:
    async with open_queue(use_threads=use_threads) as aq:
        await start_and_kill(fault_workers.hold_then_wait_to_be_killed, aq.queue)
        with anyio.fail_after(5):
            await aq.put("for whoever reads next")
        async with child(
            queue_workers.get_expecting, aq.queue, "for whoever reads next", 10
        ) as consumer:
            pass
        assert consumer.exitcode == 0


@ROUTES
@pytest.mark.parametrize("kind", ["Queue", "SimpleQueue"])
async def test_put_with_no_read_end_left_is_a_broken_resource(
    use_threads: bool, kind: str, capfd: pytest.CaptureFixture[str]
) -> None:
    q = getattr(FORK, kind)()
    aq = AsyncQueue[Any](q, use_threads=use_threads)
    try:
        await start_and_kill(fault_workers.hold_then_wait_to_be_killed, q)
        # This process only produces: it drops its copy of the read end. The consumer held
        # the only other one, and it is dead.
        q._reader.close()
        outcome = "returned"
        try:
            with anyio.fail_after(5):
                await aq.put("nobody reads this")
        except anyio.BrokenResourceError:
            outcome = "BrokenResourceError"
        except Exception as exc:
            outcome = type(exc).__name__
        with anyio.fail_after(10):
            await aq.aclose()  # waits for the feeder thread: what it prints is printed now
    finally:
        await aq.aclose()
        q._writer.close()
    _, err = capfd.readouterr()
    assert (outcome, err) == ("BrokenResourceError", "")


@ROUTES
async def test_the_last_reader_gone_while_the_feeder_holds_an_item(
    use_threads: bool, capfd: pytest.CaptureFixture[str]
) -> None:
    """The race after the check: put() found a reader, the feeder thread then found none.

    The put returned and its item is lost (documented); the feeder prints nothing, and the
    next put raises.
    """
    q = FORK.Queue()
    aq = AsyncQueue[Any](q, use_threads=use_threads)
    try:
        await start_and_kill(fault_workers.hold_then_wait_to_be_killed, q)
        # The feeder writes under the queue's write lock: holding it keeps the item in the
        # feeder while this process's read end still makes the put look fine.
        assert q._wlock.acquire(timeout=5)
        try:
            with anyio.fail_after(5):
                await aq.put("lost: the feeder can't write it")
            q._reader.close()
        finally:
            q._wlock.release()
        await wait_until(lambda: aq._putter.feeder_error is not None, "the feeder's write failed")
        with pytest.raises(anyio.BrokenResourceError), anyio.fail_after(5):
            await aq.put("refused")
        with anyio.fail_after(10):
            await aq.aclose()
    finally:
        await aq.aclose()
        q._writer.close()
    _, err = capfd.readouterr()
    assert err == ""


@ROUTES
async def test_a_consumer_killed_holding_the_reader_lock_leaves_the_queue_dead(
    use_threads: bool, tmp_path: Any
) -> None:
    """A plain consumer blocked in ``q.get()`` holds the queue's reader lock; SIGKILLed
    there, it never lets go, and nobody can take an item from the queue any more. What
    each call then does (docs/faults.md): a get waits (until its timeout or cancellation),
    get_nowait() finds nothing, put() goes on, aclose() is prompt."""
    async with open_queue(use_threads=use_threads) as aq:
        q = aq.queue
        consumer = FORK.Process(
            target=queue_workers.get_blocking, args=(q, str(tmp_path / "r")), name="test-consumer"
        )
        consumer.start()
        try:
            await wait_until(lambda: reader_lock_is_held(q), "the consumer blocks in get()")
        finally:
            consumer.kill()
            await anyio.to_thread.run_sync(consumer.join)
        assert consumer.exitcode == -signal.SIGKILL
        with anyio.fail_after(10):
            await aq.put("stranded")
            await wait_until(lambda: buffered(q._reader.fileno()) > 0, "the item is in the pipe")
            with pytest.raises(queue.Empty):
                aq.get_nowait()
            with pytest.raises(queue.Empty):
                await aq.get(timeout=0.2)
            with anyio.move_on_after(0.2) as scope:
                await aq.get_many(5)
            assert scope.cancelled_caught
            with pytest.raises(queue.Empty):
                q.get(timeout=0.2)  # a plain consumer too
            assert reader_lock_is_held(q)
        with anyio.fail_after(5):
            await aq.aclose()
