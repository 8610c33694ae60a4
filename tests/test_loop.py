"""The loop layer (``asyncmp._core.loop``): the fair lock and the per-thread turn clock.

The turn clock's promise: a receive or send that needs no waiting skips the trip through
the event loop, yet *each* event loop still gets a full turn at least every
``TURN_INTERVAL``, also while another event loop in another thread of the same process
is on the same fast path. The tests check that promise by its definition, from timestamps
taken around each call, so a busy machine makes them check fewer cases, not fail.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest

import asyncmp
from asyncmp._core import loop as _loop
from asyncmp._core.loop import TURN_INTERVAL, FairLock, fast_checkpoint, note_turn

pytestmark = pytest.mark.anyio


def _let_the_turn_fall_due() -> None:
    """Let more than a turn interval pass without giving the loop a turn."""
    deadline = time.perf_counter() + 2 * TURN_INTERVAL
    while time.perf_counter() < deadline:
        pass


def _in_a_thread_with_its_own_loop(fn: Callable[[], object]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-other-loop")
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the other loop's thread did not finish"
    if errors:
        raise errors[0]


async def _gives_a_turn(*, just_had_one: bool = False, before: Callable[[], object] = bool) -> bool:
    """Does ``fast_checkpoint()`` let another task of this loop run?

    A task started just before it runs before the caller goes on if the call took a full
    trip through the loop: always on asyncio; on trio in a shuffled order, so there the
    trial is repeated until the other task comes first. A call that does not yield never
    lets it run first. *before* runs right before each trial.
    """
    for _ in range(40):
        ran: list[bool] = []

        async def bystander(ran: list[bool] = ran) -> None:
            ran.append(True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(bystander)
            before()
            if just_had_one:
                note_turn()
            await fast_checkpoint()
            if ran:
                return True
    return False


async def test_fast_checkpoint_gives_a_turn_only_when_one_is_due() -> None:
    assert not await _gives_a_turn(just_had_one=True)
    assert await _gives_a_turn(before=_let_the_turn_fall_due)


def _turn_in_another_thread() -> None:
    """Let this loop's turn fall due, then have another thread's loop take its own turn
    (its first call: due at once)."""
    _let_the_turn_fall_due()
    _in_a_thread_with_its_own_loop(lambda: anyio.run(fast_checkpoint))


async def test_a_turn_of_a_loop_in_another_thread_does_not_spend_this_loops_turn() -> None:
    # This loop's turn is still due: the other loop's turn was not this loop's.
    assert await _gives_a_turn(before=_turn_in_another_thread)


@pytest.mark.skipif(sys.platform == "win32", reason="the fd route's fast path")
async def test_two_loops_on_the_fast_path_each_get_their_turns(anyio_backend_name: str) -> None:
    """Each loop receives a burst that is all there (the fast path, no waits), both at
    once, this one with a heartbeat task. Every receive that starts more than a turn
    interval after this loop's last turn must give the heartbeat its turn."""
    if anyio_backend_name == "trio":
        # trio runs a batch of tasks in shuffled order: the heartbeat may run only after
        # the yielding receive went on, so "no tick during a due receive" tells nothing.
        # The per-thread clock under trio: the test above.
        pytest.skip("not observable from a heartbeat under trio's shuffled batches")
    batch = 500
    stop = threading.Event()
    started = threading.Event()

    async def other_loop() -> None:
        a, b = asyncmp.Pipe(False)  # an os.pipe: room for a batch
        try:
            started.set()
            while not stop.is_set():
                for i in range(batch):
                    b.send(i)
                for _ in range(batch):
                    await a.recv()
        finally:
            await a.aclose()
            b.close()

    def run_other_loop() -> None:
        try:
            anyio.run(other_loop)
        finally:
            started.set()

    other = threading.Thread(target=run_other_loop, name="test-other-loop")
    other.start()
    ticks = 0
    due = late = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    a, b = asyncmp.Pipe(False)  # an os.pipe: room for a batch
    try:
        assert started.wait(30)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(heartbeat)
                await anyio.lowlevel.checkpoint()
                last_turn_by = time.perf_counter()  # at the latest
                deadline = time.monotonic() + 10
                while due < 200 and time.monotonic() < deadline:
                    for i in range(batch):
                        b.send(i)
                    for i in range(batch):
                        before, ticks_before = time.perf_counter(), ticks
                        assert await a.recv() == i
                        after = time.perf_counter()
                        if before - last_turn_by >= TURN_INTERVAL:
                            due += 1
                            late += ticks == ticks_before  # due, and no turn
                        if ticks != ticks_before:
                            last_turn_by = after
                tg.cancel_scope.cancel()
    finally:
        stop.set()
        other.join(30)
        await a.aclose()
        b.close()
    assert not other.is_alive()
    print(f"{due} receives found a turn due, {late} of them gave none")
    assert due >= 10, "too few receives found a turn due to tell"
    assert late == 0, f"{late} of {due} receives found this loop's turn due and gave none"


async def test_fair_lock_fast_acquire_says_whether_it_waited() -> None:
    lock = FairLock()
    assert await lock.acquire_fast() is False
    order: list[str] = []

    async def second() -> None:
        waited = await lock.acquire_fast()
        order.append(f"second waited={waited}")
        lock.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        order.append("first releases")
        lock.release()
    assert order == ["first releases", "second waited=True"]
    assert not lock.locked()


async def test_fair_lock_waiter_cancelled_leaves_the_queue() -> None:
    lock = FairLock()
    lock.acquire_nowait()
    with pytest.raises(anyio.WouldBlock):
        lock.acquire_nowait()
    with anyio.move_on_after(0.01):
        await lock.acquire_fast()
    lock.release()
    assert not lock.locked(), "a cancelled waiter was handed the lock"


def test_the_turn_clock_is_per_thread() -> None:
    _loop.turn_clock.last = 123.0
    seen: list[float] = []
    _in_a_thread_with_its_own_loop(lambda: seen.append(_loop.turn_clock.last))
    assert seen == [0.0]
    assert _loop.turn_clock.last == 123.0
    _loop.turn_clock.last = 0.0


async def test_cancel_pending_answers_as_a_checkpoint_would() -> None:
    """The fast path's cancellation check, a plain call: True exactly where a checkpoint
    would raise the cancellation (shields and nested scopes included)."""
    assert not _loop.cancel_pending()
    with anyio.CancelScope() as outer:
        outer.cancel()
        assert _loop.cancel_pending()
        assert _loop.checkpoint_due()
        # The scopes below are what is asked about: no timeout, nothing to await in them.
        with anyio.CancelScope(shield=True):  # noqa: ASYNC100
            assert not _loop.cancel_pending()
            with anyio.CancelScope():  # noqa: ASYNC100
                assert not _loop.cancel_pending()
        with anyio.CancelScope():  # noqa: ASYNC100
            assert _loop.cancel_pending()
        await anyio.lowlevel.checkpoint()
    assert outer.cancelled_caught
    assert not _loop.cancel_pending()
    with anyio.move_on_after(-1) as late:  # a deadline passed already
        assert _loop.cancel_pending()
        await anyio.lowlevel.checkpoint()
    assert late.cancelled_caught


def test_cancel_pending_follows_the_library_that_runs_the_thread() -> None:
    """One thread runs asyncio, then trio, then asyncio again: the check chosen for one
    library must notice that another runs now."""

    async def check() -> None:
        assert not _loop.cancel_pending()
        with anyio.CancelScope() as scope:
            scope.cancel()
            assert _loop.cancel_pending()
            await anyio.lowlevel.checkpoint()
        assert scope.cancelled_caught

    def runs() -> None:
        for backend in ("asyncio", "trio", "asyncio"):
            anyio.run(check, backend=backend)

    _in_a_thread_with_its_own_loop(runs)


def test_cancel_pending_in_two_tasks_of_one_loop() -> None:
    """The check finds the task that runs now: one task cancelled, the other not."""

    async def main() -> None:
        answers: dict[str, bool] = {}
        ready = anyio.Event()

        async def cancelled() -> None:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await ready.wait()  # never waits: the scope is cancelled
            answers["cancelled-after"] = _loop.cancel_pending()

        async def plain() -> None:
            answers["plain"] = _loop.cancel_pending()
            with anyio.CancelScope() as scope:
                scope.cancel()
                answers["plain-inside"] = _loop.cancel_pending()
                await anyio.lowlevel.checkpoint()
            answers["plain-after"] = _loop.cancel_pending()
            ready.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled)
            tg.start_soon(plain)
        assert answers == {
            "plain": False,
            "plain-inside": True,
            "plain-after": False,
            "cancelled-after": False,
        }

    _in_a_thread_with_its_own_loop(lambda: anyio.run(main))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_inside_a_task_chooses_its_check_again() -> None:
    """A child forked while a task runs inherits asyncio's table of running tasks, the
    parent's task in it: a check bound to the parent's loop would read that task's cancel
    scopes. In the child's own loop the answers must be the child's."""

    async def child_main() -> None:
        # The parent's task is not cancelled; this one is.
        with anyio.CancelScope() as scope:
            scope.cancel()
            if not _loop.cancel_pending():
                os._exit(3)
            await anyio.lowlevel.checkpoint()
        if _loop.cancel_pending():
            os._exit(4)

    async def parent_main() -> int:
        assert not _loop.cancel_pending()  # the check is chosen, bound to this loop
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            # In the forking thread, whose check the hook forgot. (anyio's own
            # thread-local state still says asyncio runs here: a new loop in this thread
            # is refused, so the child's loop is asyncio's own.)
            code = 0
            try:
                asyncio.run(child_main())
            except BaseException:
                code = 5
            os._exit(code)
        return pid

    def fork_and_wait() -> None:
        _, status = os.waitpid(anyio.run(parent_main), 0)
        codes.append(os.waitstatus_to_exitcode(status))

    codes: list[int] = []
    _in_a_thread_with_its_own_loop(fork_and_wait)
    assert codes == [0]


# --- the loop an object belongs to ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Pipe", "Queue"])
def test_once_its_loop_has_ended_the_next_loop_takes_an_object_over(kind: str) -> None:
    """An object belongs to its loop only while that loop runs: once ``anyio.run()`` has
    returned, with a receive of the object left waiting (cancelled as the loop ended), a
    trio loop in another thread uses it as its own, and then asyncio in this thread again.
    The fd route: on the thread route such a receive leaves a call only its own loop hears
    about (see docs/howto/backends.md)."""
    if kind == "Pipe":
        ours, theirs = asyncmp.Pipe()
        put, get, aclose = theirs.send, ours.recv, ours.aclose
    else:
        queue = asyncmp.Queue()
        put, get, aclose = queue.queue.put, queue.get, queue.aclose
    done: list[str] = []

    async def use(tag: str, last: bool = False) -> None:
        put(tag)
        with anyio.fail_after(20):
            assert await get() == tag
        async with anyio.create_task_group() as tg:
            tg.start_soon(get)  # waits until the loop's end cancels it
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        if last:
            await aclose()
        done.append(tag)

    try:
        anyio.run(use, "first")
        _in_a_thread_with_its_own_loop(lambda: anyio.run(use, "there", backend="trio"))
        anyio.run(use, "here again", True)
    finally:
        if kind == "Pipe":
            ours.close()
            theirs.close()
    assert done == ["first", "there", "here again"]


def test_a_binding_outside_any_loop_binds_nothing() -> None:
    """Called outside any event loop, ``claim()`` leaves the object unclaimed: the first
    loop that awaits it is its owner."""
    binding = _loop.LoopBinding("this thing")
    binding.claim()
    assert binding.thread == 0

    async def claim() -> int:
        binding.claim()
        return binding.thread

    assert anyio.run(claim) == threading.get_ident()
