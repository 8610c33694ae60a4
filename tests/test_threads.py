"""The thread route's building blocks: a KeptThread runs its owner's blocking calls one after
the other on one thread, and that thread ends when idle or when its owner closes; an owner's
ThreadCalls keep its calls in flight for its close, and wait_or_stop / run_blocking are the
one way to wait for a call."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import anyio
import pytest

import asyncmp
from asyncmp._core.threads import (
    THREAD_SLICE,
    BlockingCall,
    KeptThread,
    ThreadCalls,
    run_blocking,
    thread_limiter,
    wait_or_stop,
)
from tests.support.io import wait_until

pytestmark = pytest.mark.anyio


async def wait_for_thread_end(worker: KeptThread) -> None:
    """The worker's thread has ended on its own: polled, with a "no hang" bound."""
    await wait_until(lambda: worker.thread is None, "the idle worker's thread ended")


async def test_calls_on_a_worker_share_one_thread_in_order() -> None:
    worker = KeptThread("asyncmp-test", idle=10)
    ran: list[tuple[int, int]] = []
    try:

        def note(i: int) -> int:
            ran.append((i, threading.get_ident()))
            return i

        for i in range(5):
            call: BlockingCall[int] = BlockingCall(
                lambda c, i=i: note(i),  # type: ignore[misc]
                name="asyncmp-test",
                worker=worker,
            )
            await call.start()
            await call.wait()
            assert call.result() == i
            assert call.join(0)  # the call has returned: nothing to wait for
        assert [i for i, _ in ran] == list(range(5))
        assert len({ident for _, ident in ran}) == 1
        assert worker.thread is not None  # kept for the next call
    finally:
        thread = worker.close()
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()


async def test_an_idle_worker_ends_its_thread_and_the_next_call_starts_another() -> None:
    worker = KeptThread("asyncmp-test", idle=0.01)
    try:
        for _ in range(2):
            call: BlockingCall[str] = BlockingCall(lambda c: "done", name="t", worker=worker)
            await call.start()
            await call.wait()
            assert call.result() == "done"
            await wait_for_thread_end(worker)
    finally:
        worker.close()


async def test_close_lets_the_running_call_finish_then_ends_the_thread() -> None:
    worker = KeptThread("asyncmp-test", idle=10)
    started, release = threading.Event(), threading.Event()

    def blocking(c: BlockingCall[bool]) -> bool:
        started.set()
        return release.wait(10)

    call: BlockingCall[bool] = BlockingCall(blocking, name="t", worker=worker)
    await call.start()
    assert await anyio.to_thread.run_sync(started.wait, 10)
    thread = worker.close()
    assert thread is not None and thread.is_alive()
    with pytest.raises(anyio.ClosedResourceError):
        await BlockingCall(lambda c: None, name="t", worker=worker).start()
    release.set()
    await call.wait()
    assert call.result() is True
    thread.join(10)
    assert not thread.is_alive()


async def test_an_unlimited_call_takes_no_token() -> None:
    """An owner that bounds its own threads (a connection: one per direction) starts its
    calls with ``limited=False``: they run while the limiter is full, and take nothing."""
    limiter = thread_limiter()
    saved = limiter.total_tokens
    holder = object()
    limiter.total_tokens = 1
    await limiter.acquire_on_behalf_of(holder)
    try:
        call: BlockingCall[str] = BlockingCall(lambda c: "ran", name="t", limited=False)
        with anyio.fail_after(10):
            await call.start()
            await call.wait()
        assert call.result() == "ran"
        assert limiter.borrowed_tokens == 1
    finally:
        limiter.release_on_behalf_of(holder)
        limiter.total_tokens = saved


async def test_a_removed_done_callback_does_not_run() -> None:
    release = threading.Event()
    call: BlockingCall[bool] = BlockingCall(lambda c: release.wait(10), name="t")
    ran: list[str] = []

    def kept(c: BlockingCall[bool]) -> None:
        ran.append("kept")

    def removed(c: BlockingCall[bool]) -> None:
        ran.append("removed")

    await call.start()
    call.add_done_callback(kept)
    call.add_done_callback(removed)
    call.remove_done_callback(removed)
    call.remove_done_callback(removed)  # again: nothing to do
    release.set()
    await call.wait()
    assert ran == ["kept"]


def until_stopped(c: BlockingCall[str]) -> str:
    """A blocking function that runs, in time slices, until its owner asks it to stop."""
    stopped = threading.Event()
    while not c.stopping:
        stopped.wait(THREAD_SLICE)
    return "stopped"


async def test_thread_calls_keep_a_call_until_it_has_finished() -> None:
    calls = ThreadCalls()
    release = threading.Event()
    call = await calls.start(lambda c: release.wait(10), name="asyncmp-test")
    assert list(calls) == [call] and len(calls) == 1
    release.set()
    await call.wait()
    assert call.result() is True
    assert not calls, "a finished call is not kept"


async def test_thread_calls_stop_every_call_and_wait_for_their_threads() -> None:
    calls = ThreadCalls()
    worker = KeptThread("asyncmp-test")
    try:
        first = await calls.start(until_stopped, name="asyncmp-test")
        second = calls.start_now(until_stopped, name="asyncmp-test", worker=worker)
        assert len(calls) == 2
        stopped = calls.stop()
        assert set(stopped) == {first, second}
        assert first.stopping and second.stopping
        with anyio.fail_after(10):
            await calls.wait(stopped)
        assert first.result() == second.result() == "stopped"
        assert first.join(0) and second.join(0)
        assert not calls
    finally:
        thread = worker.close()
        if thread is not None:
            thread.join(10)


async def test_a_cancelled_wait_asks_the_call_to_stop_and_keeps_its_outcome() -> None:
    calls = ThreadCalls()
    undone: list[BlockingCall[str]] = []
    call = await calls.start(until_stopped, name="asyncmp-test")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await wait_or_stop(call, undone.append)
    assert scope.cancelled_caught
    assert call.stopping and undone == [call]
    with anyio.fail_after(10):
        await call.wait()
    assert call.result() == "stopped", "the outcome is kept for whoever collects it"
    assert not calls


async def test_run_blocking_returns_the_finished_call() -> None:
    calls = ThreadCalls()
    call = await run_blocking(
        lambda c: threading.current_thread().name, name="asyncmp-t", calls=calls
    )
    assert call.result() == "asyncmp-t" and call.join(0)
    assert not calls
    unkept = await run_blocking(lambda c: 42, name="asyncmp-t")
    assert unkept.result() == 42


async def test_run_blocking_cancelled_before_its_thread_starts_keeps_nothing() -> None:
    limiter = thread_limiter()
    saved = limiter.total_tokens
    holder = object()
    limiter.total_tokens = 1
    await limiter.acquire_on_behalf_of(holder)
    calls = ThreadCalls()
    ran = threading.Event()
    try:
        with anyio.move_on_after(0.01) as scope:
            await run_blocking(lambda c: ran.set(), name="asyncmp-test", calls=calls)
        assert scope.cancelled_caught and not calls and not ran.is_set()
    finally:
        limiter.release_on_behalf_of(holder)
        limiter.total_tokens = saved


_SRC = Path(asyncmp.__file__).parent


@pytest.mark.parametrize("folder", ["_queue", "_connection"])
def test_the_queue_and_the_connection_run_calls_only_through_the_helpers(folder: str) -> None:
    """The lifecycle of a blocking call (build, start, keep, wait, stop on cancel, forget)
    is written once, in ``_core/threads.py``: the adapters build no BlockingCall
    themselves, start none, and keep no set of calls of their own."""
    written_out = re.compile(
        r"BlockingCall\(|\.start_now\(\)|await \w+\.start\(\)|calls\.(add|discard)\("
    )
    found = [
        f"{path.relative_to(_SRC)}:{n}: {line.strip()}"
        for path in sorted((_SRC / folder).glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if written_out.search(line)
    ]
    assert not found, "a blocking call's lifecycle written out again:\n" + "\n".join(found)
