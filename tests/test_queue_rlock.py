"""The reader-lock protocol of an AsyncQueue alone, with a fake cross-process lock.

:class:`asyncmp._queue.rlock.ReaderLock` knows neither pipes nor frames; here its lock is a
:class:`FakeLock` (a thread lock that counts what is done to it), and "the owner still uses
the lock" (a get runs, or an item is half read) is a flag the test sets.
"""

from __future__ import annotations

import threading

import anyio
import pytest

from asyncmp._queue.rlock import ReaderLock, acquire_blocking
from asyncmp._queue.state import QueueState

pytestmark = pytest.mark.anyio


class FakeLock:
    """A cross-process lock stand-in: ``acquire(block, timeout)``, ``release()``; it fails
    loudly on a release it does not hold, and counts acquisitions and releases."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquired = 0
        self.released = 0

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        if not block:
            ok = self._lock.acquire(False)
        else:
            ok = self._lock.acquire(True, -1 if timeout is None else timeout)
        self.acquired += ok
        return ok

    def release(self) -> None:
        self._lock.release()  # RuntimeError if not held: a release too many
        self.released += 1

    def locked(self) -> bool:
        return self._lock.locked()


class Owner:
    """The adapter side: whether it still needs the lock."""

    def __init__(self) -> None:
        self.in_use = False

    def __call__(self) -> bool:
        return self.in_use


def make() -> tuple[ReaderLock, FakeLock, Owner]:
    lock, owner = FakeLock(), Owner()
    return ReaderLock(lock, owner), lock, owner


def close(rlock: ReaderLock) -> None:
    thread = rlock.close()
    if thread is not None:
        thread.join(5)


def holds(rlock: ReaderLock) -> bool:
    """Whether *rlock* is held (a call: mypy would narrow the attribute across awaits)."""
    return rlock.held


async def next_turn() -> None:
    """Let the loop run what was scheduled for its next turn (and the tasks woken by it)."""
    await anyio.wait_all_tasks_blocked()
    await anyio.lowlevel.checkpoint()


async def test_take_without_blocking_takes_a_free_lock_only() -> None:
    rlock, lock, _ = make()
    assert rlock.take_nowait() and rlock.held and lock.locked()
    other, _, _ = make()
    other.lock = lock
    assert not other.take_nowait() and not other.held
    rlock.release()
    rlock.release()  # a second release is no release
    assert not lock.locked() and lock.released == 1


async def test_uncontended_item_lets_go_at_once() -> None:
    rlock, lock, _ = make()
    assert rlock.take_nowait()
    rlock.item_done()
    assert not holds(rlock) and not lock.locked()


async def test_contended_item_keeps_the_lock_until_the_next_turn() -> None:
    rlock, lock, _ = make()
    rlock.contended = True
    assert rlock.take_nowait()
    rlock.item_done()
    assert rlock.held and lock.locked(), "let go before the loop had a turn"
    await next_turn()
    assert not holds(rlock) and not lock.locked()


async def test_deferred_release_leaves_a_lock_in_use_then_goes_when_asked_again() -> None:
    """A get that runs, or an item half read: the lock is never let go under it."""
    rlock, lock, owner = make()
    rlock.contended = True
    assert rlock.take_nowait()
    owner.in_use = True
    rlock.item_done()
    await next_turn()
    assert rlock.held and lock.locked(), "let go while the owner used it (mid-frame?)"
    owner.in_use = False
    rlock.release_soon()
    await next_turn()
    assert not holds(rlock) and lock.released == 1


async def test_one_deferred_release_per_turn() -> None:
    rlock, lock, _ = make()
    rlock.contended = True
    assert rlock.take_nowait()
    for _ in range(3):
        rlock.release_soon()
    await next_turn()
    assert not lock.locked() and lock.released == 1


def test_outside_a_loop_the_release_is_at_once() -> None:
    """A sync method called after the loop ended: no next turn is coming."""
    rlock, lock, _ = make()
    rlock.contended = True
    assert rlock.take_nowait()
    rlock.item_done()
    assert not holds(rlock) and not lock.locked()


async def release_in_a_new_loop(rlock: ReaderLock) -> None:
    rlock.release_soon()
    await next_turn()


def test_a_release_left_scheduled_in_an_ended_loop_does_not_block_the_next_loop() -> None:
    """A loop that ended before its next turn never runs the release it had scheduled;
    the next loop schedules its own (and outside a loop the lock goes at once)."""

    async def token() -> object:
        return anyio.lowlevel.current_token().native_token

    for outside_first in (False, True):
        rlock, lock, _ = make()
        rlock.contended = True
        assert rlock.take_nowait()
        # What a loop that ended before its next turn leaves behind.
        rlock._scheduled = anyio.run(token)
        if outside_first:
            rlock.release_soon()
            assert not rlock.held, "outside a loop, the lock goes at once"
            assert rlock.take_nowait()

        anyio.run(release_in_a_new_loop, rlock)
        assert not holds(rlock) and not lock.locked()


async def test_contended_take_queues_in_a_thread_and_takes_it_when_let_go() -> None:
    rlock, lock, _ = make()
    assert lock.acquire(False)  # another consumer holds it
    state = QueueState(10)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rlock.take_contended, state)
            await anyio.wait_all_tasks_blocked()
            assert not holds(rlock) and rlock.contended
            lock.release()  # the other consumer lets go
        assert rlock.held and lock.locked() and not state.calls
    finally:
        rlock.release()
        close(rlock)
    assert not lock.locked()


async def test_cancelled_contended_take_holds_nothing() -> None:
    """Cancelled while queued: the lock is not held, nor kept by the thread, even if the
    thread wins it just as the getter gives up."""
    rlock, lock, _ = make()
    assert lock.acquire(False)
    state = QueueState(10)
    try:
        with anyio.move_on_after(0.01) as scope:
            await rlock.take_contended(state)
        assert scope.cancelled_caught and not rlock.held
        lock.release()
        close(rlock)  # the thread has stopped, and let go of anything it won
        assert lock.acquire(False), "the thread kept the lock"
        lock.release()
        assert lock.acquired == lock.released
    finally:
        close(rlock)


async def test_closed_during_the_handover_lets_go_and_says_closed() -> None:
    rlock, lock, _ = make()
    assert lock.acquire(False)
    state = QueueState(10)
    errors: list[BaseException] = []

    async def take() -> None:
        try:
            await rlock.take_contended(state)
        except anyio.ClosedResourceError as exc:
            errors.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await anyio.wait_all_tasks_blocked()
            state.closed = True
            lock.release()
        assert errors and not rlock.held and not lock.locked()
    finally:
        close(rlock)


def test_blocking_acquire_waits_only_when_told() -> None:
    lock = FakeLock()
    assert acquire_blocking(lock, 0)
    assert not acquire_blocking(lock, 0)  # no wait at 0
    assert not acquire_blocking(lock, 0.01)  # a bounded wait
    lock.release()
    assert acquire_blocking(lock, 0.01)
    lock.release()
