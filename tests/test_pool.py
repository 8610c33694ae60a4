"""open_pool: results, errors, crashes, cancellation, map, workers' lives, statistics."""

from __future__ import annotations

import itertools
import multiprocessing
import operator
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncmp
from asyncmp import AsyncConnection, Pool
from asyncmp._core.loop import TURN_INTERVAL
from asyncmp._pool.conversation import _MAX_BATCH
from tests.support import pool_workers as w
from tests.support import workers
from tests.support.io import wait_until
from tests.support.orphans import ORPHAN_PATIENCE, killed_owner
from tests.support.workers import MPContext

from .support.loops import FOREIGN_BACKENDS, assert_refused, from_another_loop

pytestmark = pytest.mark.anyio

#: A "no hang" bound for what should be immediate, in seconds of loop time.
PROMPT = 1.0
#: A "no hang" bound for a worker's death to be seen (a signal, a reap, a reply).
PATIENT = 15.0

FORK: Any = multiprocessing.get_context("fork") if sys.platform != "win32" else None
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class Holds:
    """The test's side of :func:`w.hold` and :func:`w.note`."""

    def __init__(self, conn: AsyncConnection[Any], release: Any) -> None:
        self.conn = conn
        self._release = release

    async def recv(self) -> Any:
        return await self.conn.recv()

    def recv_nowait(self) -> Any:
        return self.conn.recv_nowait()

    def release(self) -> None:
        """Let one held call return."""
        self._release.release()


@asynccontextmanager
async def held_pool(processes: int = 2, **options: Any) -> AsyncIterator[tuple[Pool, Holds]]:
    """A pool whose workers can :func:`w.hold` calls and :func:`w.note` them on a pipe."""
    ours, theirs = asyncmp.Pipe()
    # Of the pool's context: a fork context's semaphore can't be passed to a spawned child.
    # (A test's stand-in context may have none: then the default context's.)
    release = getattr(options.get("context"), "Semaphore", multiprocessing.Semaphore)(0)
    try:
        async with asyncmp.open_pool(
            processes, initializer=w.install, initargs=(theirs, release), **options
        ) as pool:
            yield pool, Holds(ours, release)
    finally:
        theirs.close()
        await ours.aclose()


async def started(holds: Holds) -> int:
    """Wait until a worker runs :func:`w.hold`; return its pid."""
    word, pid = await holds.recv()
    assert word == "started"
    return int(pid)


# --- results and errors ----------------------------------------------------------------


async def test_run_returns_the_result() -> None:
    async with asyncmp.open_pool(2) as pool:
        assert await pool.run(w.echo, 42) == 42
        assert await pool.run(divmod, 7, 2) == (3, 1)
        assert pool.processes == 2


async def test_an_exception_is_reraised_with_the_workers_traceback() -> None:
    async with asyncmp.open_pool(2) as pool:
        with pytest.raises(ValueError, match=r"^no good$") as info:
            await pool.run(w.fail, "no good")
        cause = info.value.__cause__
        assert isinstance(cause, asyncmp.RemoteTraceback)
        assert "in fail" in str(cause)
        assert "raise ValueError(message)" in str(cause)
        assert await pool.run(w.echo, 1) == 1  # the pool goes on
        assert pool.statistics().calls_failed == 1


async def test_an_unpicklable_argument_raises_in_the_caller_and_nothing_is_sent() -> None:
    async with asyncmp.open_pool(2) as pool:
        with pytest.raises(TypeError, match="pickle"):
            await pool.run(w.echo, threading.Lock())  # type: ignore[arg-type]
        stats = pool.statistics()
        assert (stats.calls_queued, stats.calls_running, stats.calls_done) == (0, 0, 0)
        assert await pool.run(w.echo, 3) == 3


async def test_an_unpicklable_argument_is_named_keeping_its_error_type_and_cause() -> None:
    async with asyncmp.open_pool(1) as pool:
        with pytest.raises(TypeError) as info:
            await pool.run(operator.is_, 1, threading.Lock())
        assert str(info.value) == (
            "pool.run(fn, *args): args[1] (of type _thread.lock) can't be pickled:"
            " cannot pickle '_thread.lock' object"
        )
        cause = info.value.__cause__
        assert type(cause) is TypeError and str(cause) == "cannot pickle '_thread.lock' object"
        # Inside a container: the argument that holds it is named.
        with pytest.raises(
            TypeError, match=r"^pool\.run\(fn, \*args\): args\[0\] \(of type dict\)"
        ):
            await pool.run(w.echo, {"lock": threading.Lock()})  # type: ignore[arg-type]
        stats = pool.statistics()
        assert (stats.calls_queued, stats.calls_running, stats.calls_done) == (0, 0, 0)


async def test_a_pickling_error_with_nothing_to_add_is_raised_as_it_is() -> None:
    """When no one part fails alone, the error is raised as pickling raised it: not as its
    own cause."""
    async with asyncmp.open_pool(1) as pool:
        with pytest.raises(TypeError, match=r"^not on the first try$") as info:
            await pool.run(operator.is_, 1, w.PicklesOnlyAgain())
        assert info.value.__cause__ is not info.value
        assert pool.statistics().calls_done == 0


async def test_a_function_that_cant_be_pickled_is_said_to_need_a_module_level_name() -> None:
    def local(x: int) -> int:
        return x

    async with asyncmp.open_pool(1) as pool:
        for fn in (lambda x: x, local, partial(local)):
            with pytest.raises((pickle.PicklingError, AttributeError)) as info:
                await pool.run(fn, 1)
            message = str(info.value)
            assert message.startswith(f"pool.run(fn, *args): fn ({fn!r}) can't be pickled: ")
            assert "it must be defined at module level" in message
            assert type(info.value) is type(info.value.__cause__)
            assert message.endswith(
                "(a lambda or a function defined inside another has no such name)"
            )
        assert await pool.run(w.echo, 2) == 2


async def test_an_unpicklable_map_item_is_named_by_its_index() -> None:
    items: list[Any] = list(range(30))
    items[17] = threading.Lock()
    results = []
    async with asyncmp.open_pool(2) as pool:
        with pytest.raises(TypeError) as info:
            async for y in pool.map(w.echo, items):
                results.append(y)
    assert results == list(range(17))
    assert str(info.value) == (
        "pool.map(fn, iterable): the item at index 17 (of type _thread.lock) can't be"
        " pickled: cannot pickle '_thread.lock' object"
    )
    assert type(info.value.__cause__) is TypeError


async def test_an_unpicklable_result_or_exception_fails_that_call_only() -> None:
    async with asyncmp.open_pool(1) as pool:
        pid = await pool.run(w.getpid)
        with pytest.raises(pickle.PicklingError, match="result of return_unpicklable"):
            await pool.run(w.return_unpicklable)
        with pytest.raises(pickle.PicklingError, match="raised NeedsTwoArgs: 1-2"):
            await pool.run(w.raise_unpicklable)
        assert await pool.run(w.getpid) == pid  # the same worker goes on


async def test_a_result_or_exception_the_parent_cannot_unpickle_fails_that_call_only() -> None:
    # Their classes live in a module that only the worker has.
    async with asyncmp.open_pool(1) as pool:
        pid = await pool.run(w.getpid)
        with pytest.raises(pickle.PicklingError, match="raised WorkerOnlyError: not here") as info:
            await pool.run(w.raise_worker_only, "not here")
        assert "No module named 'asyncmp_tests_worker_only'" in str(info.value)
        assert isinstance(info.value.__cause__, asyncmp.RemoteTraceback)
        assert "in raise_worker_only" in str(info.value.__cause__)
        with pytest.raises(pickle.PicklingError, match="reply to return_worker_only") as info:
            await pool.run(w.return_worker_only)
        assert "No module named 'asyncmp_tests_worker_only'" in str(info.value)
        assert await pool.run(w.getpid) == pid  # the same worker goes on
        assert pool.statistics().calls_failed == 2


# --- crashes ---------------------------------------------------------------------------


async def test_a_worker_that_dies_raises_worker_exited_and_is_replaced(
    mp_context: MPContext,
) -> None:
    async with asyncmp.open_pool(2, context=mp_context) as pool:
        with pytest.raises(asyncmp.WorkerExited) as info:
            await pool.run(w.exit_with, 7)
        assert info.value.exitcode == 7
        with pytest.raises(asyncmp.WorkerExited) as info:
            await pool.run(w.kill_self)
        assert info.value.exitcode == -signal.SIGKILL
        # Every other call goes on, on the replacements too.
        results: list[int] = []
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(_append, results, pool.run(w.echo, i))
        assert sorted(results) == list(range(10))
        stats = pool.statistics()
        assert stats.workers_replaced == 2
        assert stats.workers_alive == 2
        assert stats.calls_failed == 2


async def _append(results: list[Any], call: Any) -> None:
    results.append(await call)


async def test_a_crash_fails_only_the_call_it_ran() -> None:
    async with held_pool(2) as (pool, conn):
        async with anyio.create_task_group() as tg:
            held: list[int] = []
            tg.start_soon(_append, held, pool.run(w.hold, 5))
            await started(conn)
            with pytest.raises(asyncmp.WorkerExited):
                await pool.run(w.exit_with, 3)
            conn.release()
        assert held == [5]


async def test_a_crash_among_quick_calls_sent_together_fails_that_call_only() -> None:
    outcomes: dict[int, object] = {}

    async def call(i: int) -> None:
        try:
            outcomes[i] = await (pool.run(w.exit_with, 3) if i == 10 else pool.run(w.echo, i))
        except asyncmp.WorkerExited as exc:
            outcomes[i] = exc.exitcode

    async with asyncmp.open_pool(1) as pool:
        for i in range(20):  # quick calls: later ones travel to the worker together
            await pool.run(w.echo, i)
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(call, i)
        # The calls sent along with the one that crashed never started: they ran later.
        assert outcomes == {i: 3 if i == 10 else i for i in range(40)}
        # The next call runs on the replacement. (Started in trio's shuffled order, the call
        # that crashes may be the last one answered: the pool then replaces its worker
        # after the task group has ended.)
        assert await pool.run(w.echo, 40) == 40
        assert pool.statistics().workers_replaced == 1


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="waits for the worker with os.waitid")
async def test_a_crash_seen_while_sending_quick_calls_ahead_fails_that_call_only() -> None:
    # While calls are quick, a worker gets the next request while it runs one. Here the
    # worker dies before that send, with replies to calls it ran still in the pipe: they
    # must be read, and only the call it was running fails.
    outcomes: dict[int, object] = {}

    async def call(
        i: int, fn: Any, *args: Any, alone: bool = False, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        task_status.started()
        try:
            outcomes[i] = await pool.run(fn, *args, kill_on_cancel=alone)
        except asyncmp.WorkerExited as exc:
            outcomes[i] = ("exited", exc.exitcode)

    async with held_pool(1) as (pool, holds):
        for i in range(20):  # quick calls: now they travel in full batches, one ahead
            await pool.run(w.echo, i)
        async with anyio.create_task_group() as tg:
            # The worker is busy (with a call sent alone, which leaves the pool's idea of
            # how long calls take as it is): queue the rest in a known order.
            await tg.start(partial(call, -1, w.hold, -1, alone=True))
            await started(holds)
            # The first batch ends with a held call; the one sent ahead with it runs a
            # quick call, then ends the worker; a few more stay queued.
            for i in range(_MAX_BATCH - 1):
                await tg.start(partial(call, i, w.echo, i))
            await tg.start(partial(call, 100, w.hold, 100))
            await tg.start(partial(call, 200, w.echo, 200))
            await tg.start(partial(call, 300, w.exit_with, 3))
            for i in range(400, 400 + _MAX_BATCH):
                await tg.start(partial(call, i, w.echo, i))
            holds.release()
            pid = await started(holds)
            await anyio.wait_all_tasks_blocked()
            holds.release()
            # Hold the loop until the worker is gone (without reaping it): the pool then
            # reads the reply to 100 first, sends the next batch to the dead worker, and
            # only then finds the reply to 200.
            try:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
            except ChildProcessError:  # reaped already
                pass
        expected: dict[int, object] = {i: i for i in outcomes}
        expected[300] = ("exited", 3)
        assert outcomes == expected
        assert len(outcomes) == 2 * _MAX_BATCH + 3
        assert pool.statistics().workers_replaced == 1


#: How long a grandchild of a worker sleeps, holding the worker's pipe, and the bound
#: within which the pool must see the worker's end all the same.
GRANDCHILD_LIFE = 60.0
WORKER_END_BOUND = 20.0


async def test_a_workers_end_is_seen_while_a_grandchild_holds_its_pipe(
    mp_context: MPContext,
) -> None:
    # The call forks a grandchild, which inherits the worker's end of its pipe, and then
    # ends the worker: the pipe reaches no EOF while the grandchild lives. The pool
    # watches the worker process itself.
    grandchild = None
    async with held_pool(1, context=mp_context) as (pool, holds):
        try:
            pid = await pool.run(w.getpid)
            with anyio.fail_after(WORKER_END_BOUND):
                with pytest.raises(asyncmp.WorkerExited) as info:
                    await pool.run(w.crash_leaving_grandchild, 3)
                word, grandchild = await holds.recv()
            assert word == "grandchild"
            assert info.value.exitcode == 3
            assert await pool.run(w.getpid) != pid
            stats = pool.statistics()
            assert (stats.workers_replaced, stats.workers_alive) == (1, 1)
            assert (stats.calls_failed, stats.calls_running, stats.calls_queued) == (1, 0, 0)
        finally:
            if grandchild is None:  # the test failed early: it may have said its pid
                with suppress(anyio.WouldBlock):
                    word, grandchild = holds.recv_nowait()
            if grandchild is not None:
                await _kill_orphan(grandchild)


async def _kill_orphan(pid: int) -> None:
    """Kill a process that is not our child (its init reaps it) and wait until it is
    gone or a zombie."""
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: _gone_or_zombie(pid), f"process {pid} is gone")


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except FileNotFoundError:
        return True
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


async def test_a_worker_that_dies_idle_is_replaced_before_it_takes_a_call() -> None:
    async with asyncmp.open_pool(1) as pool:
        pid = await pool.run(w.getpid)
        os.kill(pid, signal.SIGKILL)
        await wait_until(
            lambda: pool.statistics().workers_replaced == 1, "the idle worker was replaced"
        )
        assert await pool.run(w.getpid) != pid
        assert pool.statistics() == asyncmp.PoolStatistics(1, 0, 0, 2, 0, 1)


async def test_a_fresh_worker_that_dies_idle_is_replaced_once_a_call_comes() -> None:
    # A worker that ends before it ran any call is replaced only once a call is queued:
    # workers that die as soon as they start are not started again and again meanwhile.
    async with asyncmp.open_pool(1) as pool:
        [pid] = [
            p.pid for p in multiprocessing.active_children() if p.name == "asyncmp-pool-worker"
        ]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: pool.statistics().workers_alive == 0, "the pool saw it end")
        await anyio.wait_all_tasks_blocked()
        assert pool.statistics().workers_replaced == 0
        assert await pool.run(w.getpid) != pid
        assert pool.statistics() == asyncmp.PoolStatistics(1, 0, 0, 1, 0, 1)


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="waits for the worker with os.waitid")
async def test_a_call_sent_to_a_worker_that_died_idle_goes_to_another() -> None:
    async with asyncmp.open_pool(1) as pool:
        pid = await pool.run(w.getpid)
        os.kill(pid, signal.SIGKILL)
        # Hold the loop until the worker is dead (without reaping it): the pool has not
        # seen it yet, and may send it the next call; the send fails, so the call was not
        # delivered, and goes to the replacement.
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
        assert await pool.run(w.echo, 5) == 5
        assert await pool.run(w.getpid) != pid
        assert pool.statistics() == asyncmp.PoolStatistics(1, 0, 0, 3, 0, 1)


# --- cancellation ----------------------------------------------------------------------


async def test_a_cancelled_queued_call_is_withdrawn_and_never_runs() -> None:
    async with held_pool(1) as (pool, conn):
        async with anyio.create_task_group() as tg:
            held: list[int] = []
            tg.start_soon(_append, held, pool.run(w.hold, 1))
            await started(conn)
            with anyio.CancelScope() as scope:
                tg.start_soon(_cancel_when_blocked, scope)
                await pool.run(w.note, 2)
            assert scope.cancelled_caught
            assert pool.statistics().calls_queued == 0
            conn.release()
        assert held == [1]
        assert await pool.run(w.note, 3) == 3
        # Only the call that ran said so: the withdrawn one never did.
        assert await conn.recv() == ("ran", 3)
        with pytest.raises(anyio.WouldBlock):
            conn.recv_nowait()


async def _cancel_when_blocked(scope: anyio.CancelScope) -> None:
    await anyio.wait_all_tasks_blocked()
    scope.cancel()


async def test_a_cancelled_running_call_returns_at_once_and_its_result_is_dropped() -> None:
    async with held_pool(1) as (pool, conn):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.run, w.hold, 111)
                pid = await started(conn)
                before = anyio.current_time()
                scope.cancel()
        assert anyio.current_time() - before < PROMPT
        assert pool.statistics().calls_running == 1  # it runs on
        conn.release()  # it returns 111, which nobody must get
        assert await pool.run(w.echo, 2) == 2
        assert await pool.run(w.getpid) == pid  # the worker was kept
        stats = pool.statistics()
        assert stats.workers_replaced == 0
        assert stats.calls_running == 0


async def test_kill_on_cancel_kills_and_replaces_the_worker() -> None:
    async with held_pool(1) as (pool, conn):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: pool.run(w.hold, 1, kill_on_cancel=True))
                pid = await started(conn)
                before = anyio.current_time()
                scope.cancel()
        assert anyio.current_time() - before < PROMPT
        new_pid = await pool.run(w.getpid)
        assert new_pid != pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
        assert pool.statistics().workers_replaced == 1


async def test_a_kill_on_cancel_call_waits_for_a_worker_with_nothing_else_to_do() -> None:
    # Quick calls go to a busy worker ahead of time; a kill_on_cancel call must not:
    # cancelling it kills its worker, which would end the call running there.
    held: list[int] = []

    async def call(fn: Any, *args: Any, alone: bool = False) -> None:
        held.append(await pool.run(fn, *args, kill_on_cancel=alone))

    async def release_then_cancel(scope: anyio.CancelScope) -> None:
        await anyio.wait_all_tasks_blocked()  # everything is queued
        holds.release()  # the worker is free: it takes the next calls
        await started(holds)
        scope.cancel()

    async with held_pool(1) as (pool, holds):
        for i in range(20):  # quick calls: now they are sent ahead
            await pool.run(w.echo, i)
        async with anyio.create_task_group() as tg:
            # The worker is busy (with a call sent alone, which leaves the pool's idea of
            # how long calls take as it is): queue the next ones meanwhile.
            tg.start_soon(partial(call, w.hold, -1, alone=True))
            await started(holds)
            tg.start_soon(call, w.hold, 1)
            await anyio.wait_all_tasks_blocked()
            with anyio.CancelScope() as scope:
                tg.start_soon(release_then_cancel, scope)
                await pool.run(w.echo, 2, kill_on_cancel=True)
            assert scope.cancelled_caught
            holds.release()
        assert held == [-1, 1]
        stats = pool.statistics()
        assert (stats.workers_replaced, stats.calls_queued, stats.calls_running) == (0, 0, 0)


async def test_cancelling_1000_calls_at_random_points_loses_and_mixes_nothing() -> None:
    rng = random.Random(14)
    n = 1000
    outcomes: dict[int, object] = {}

    async def call(i: int, scope: anyio.CancelScope) -> None:
        with scope:
            outcomes[i] = await pool.run(w.echo, i, kill_on_cancel=rng.random() < 0.02)
            return
        outcomes[i] = "cancelled"

    async def cancel_later(scope: anyio.CancelScope, steps: int) -> None:
        for _ in range(steps):
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    async with asyncmp.open_pool(2) as pool:
        async with anyio.create_task_group() as tg:
            for i in range(n):
                scope = anyio.CancelScope()
                tg.start_soon(call, i, scope)
                if rng.random() < 0.5:
                    tg.start_soon(cancel_later, scope, rng.randrange(200))
        returned = [i for i, outcome in outcomes.items() if outcome != "cancelled"]
        assert len(outcomes) == n
        assert all(outcomes[i] == i for i in returned)  # each got its own result
        assert 0 < len(returned) < n
        # Nothing stale is left in the pipes: later calls get their own results.
        for i in range(20):
            assert await pool.run(w.echo, -i) == -i
        assert pool.statistics().calls_queued == 0


# --- map -------------------------------------------------------------------------------


async def _aitems(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await anyio.lowlevel.checkpoint()
        yield i


@pytest.mark.parametrize("source", ["sync", "async"])
async def test_map_in_order(source: str) -> None:
    items = range(3000) if source == "sync" else _aitems(3000)
    async with asyncmp.open_pool(2) as pool:
        results = [y async for y in pool.map(w.echo, items)]
        assert results == list(range(3000))
        assert pool.statistics().calls_done == 3000


@pytest.mark.parametrize("source", ["sync", "async"])
async def test_map_unordered_yields_every_result(source: str) -> None:
    items = range(3000) if source == "sync" else _aitems(3000)
    async with asyncmp.open_pool(2) as pool:
        results = [y async for y in pool.map(w.echo, items, ordered=False)]
        assert sorted(results) == list(range(3000))


async def test_map_unordered_a_slow_call_does_not_hold_back_the_others() -> None:
    async with held_pool(2) as (pool, conn):
        # The first item holds its worker; the others all finish on the second one.
        results = []
        it = pool.map(w.hold_first, range(6), ordered=False)
        async for y in it:
            results.append(y)
            if len(results) == 5:
                conn.release()
        assert results[:5] == [1, 2, 3, 4, 5]
        assert results[5] == 0
        await started(conn)


async def test_map_raises_at_the_failing_items_place_and_stops() -> None:
    async with asyncmp.open_pool(2) as pool:
        results = []
        with pytest.raises(ValueError, match="bad 5"):
            async for y in pool.map(w.fail_at_5, range(1000)):
                results.append(y)
        assert results == [0, 1, 2, 3, 4]
        assert await pool.run(w.echo, 1) == 1
        assert pool.statistics().calls_queued == 0


async def test_a_worker_dying_in_a_map_raises_worker_exited_and_stops_it() -> None:
    async with asyncmp.open_pool(2) as pool:
        results = []
        with pytest.raises(asyncmp.WorkerExited) as info:
            async for y in pool.map(w.exit_at_3, range(100)):
                results.append(y)
        assert info.value.exitcode == 3
        assert results == [0, 1, 2]
        assert await pool.run(w.echo, 1) == 1


async def test_an_unpicklable_map_item_fails_at_its_place() -> None:
    async with asyncmp.open_pool(2) as pool:
        items: list[Any] = [0, 1, threading.Lock(), 3]
        results = []
        with pytest.raises(TypeError, match="pickle"):
            async for y in pool.map(w.echo, items):
                results.append(y)
        assert results == [0, 1]


#: The consumer's work per result in the test below, in seconds of wall time.
CONSUMER_WORK = 20e-6


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_map_gives_the_loop_a_turn_while_results_are_buffered() -> None:
    """A consumer going through buffered results lets the other tasks run about every
    TURN_INTERVAL: counted in results, not in time, so a busy machine changes nothing
    (each result costs at least CONSUMER_WORK of wall time, the turn clock runs on wall
    time too)."""
    turns = 0

    async def heartbeat() -> None:
        nonlocal turns
        while True:
            await anyio.lowlevel.checkpoint()
            turns += 1

    in_a_row = longest = 0
    async with asyncmp.open_pool(2) as pool, anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        seen = turns
        count = 0
        async for _ in pool.map(w.echo, range(10_000)):
            count += 1
            _spin(CONSUMER_WORK)
            if turns == seen:
                in_a_row += 1
                longest = max(longest, in_a_row)
            else:
                in_a_row, seen = 0, turns
        tg.cancel_scope.cancel()
    assert count == 10_000
    # A turn is due after TURN_INTERVAL / CONSUMER_WORK results (50). trio may run the
    # heartbeat after the consumer in the batch of that turn, so it is seen one interval
    # later: twice that, and twice again for slack. Without turns: thousands in a row.
    bound = 4 * TURN_INTERVAL / CONSUMER_WORK
    assert longest <= bound, f"{longest} results in a row without a turn of the loop"


@pytest.mark.parametrize("source", ["sync", "async"])
async def test_an_endless_map_stopped_early_takes_no_more_and_leaves_nothing_queued(
    source: str,
) -> None:
    taken = 0

    def endless() -> Iterator[int]:
        nonlocal taken
        for i in itertools.count():
            taken += 1
            yield i

    async def aendless() -> AsyncGenerator[int, None]:
        for i in endless():
            yield i

    async with asyncmp.open_pool(2) as pool, aclosing(aendless()) as agen:
        items = endless() if source == "sync" else agen
        async for y in pool.map(w.echo, items):
            if y == 5000:
                break
        taken_at_break = taken
        # Dropped by the loop: what was queued is withdrawn, nothing more is taken.
        assert pool.statistics().calls_queued == 0
        assert taken_at_break < 5000 + 4 * 2048
        assert await pool.run(w.echo, -1) == -1
        assert taken == taken_at_break


async def test_map_aclose_withdraws_at_once() -> None:
    async with held_pool(1) as (pool, conn):
        it = pool.map(w.hold, range(10))

        async def step() -> None:
            await it.__anext__()

        async with anyio.create_task_group() as tg:
            tg.start_soon(step)
            await started(conn)
            assert pool.statistics().calls_queued == 1  # two chunks of 1 are ahead
            tg.cancel_scope.cancel()
        await it.aclose()
        assert pool.statistics().calls_queued == 0
        conn.release()
        assert await pool.run(w.echo, 7) == 7


# --- the workers' lives ----------------------------------------------------------------


async def test_the_initializer_runs_once_in_each_worker(mp_context: MPContext) -> None:
    async with asyncmp.open_pool(
        2, context=mp_context, initializer=w.set_value, initargs=("hello",)
    ) as pool:
        async with anyio.create_task_group() as tg:
            seen: list[tuple[object, int]] = []
            for _ in range(6):
                tg.start_soon(_append, seen, pool.run(w.initialized))
        assert set(seen) == {("hello", 1)}


async def test_a_failing_initializer_is_a_clear_error_not_a_respawn_loop(
    mp_context: MPContext,
) -> None:
    with pytest.raises(anyio.BrokenResourceError, match="initializer failed") as info:
        async with asyncmp.open_pool(
            2, context=mp_context, initializer=w.fail_init, initargs=("no config",)
        ):
            raise AssertionError("not reached")  # pragma: no cover
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    assert str(cause) == "no config"
    assert isinstance(cause.__cause__, asyncmp.RemoteTraceback)


@pytest.mark.parametrize("initializer", [None, w.fail_init], ids=["ready", "init-failed"])
def test_a_worker_whose_pool_closed_before_its_first_word_exits_quietly(
    initializer: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    # A replacement worker can start while the pool closes: its first word (ready, or
    # the initializer's error) then meets a closed pipe, which is no error of the worker's.
    from asyncmp._pool.worker import serve

    theirs, mine = multiprocessing.get_context("fork").Pipe(duplex=False)
    theirs.close()  # the pool's end, gone before the worker speaks
    process = multiprocessing.get_context("fork").Process(
        target=serve, args=(mine, None, initializer, ("no config",))
    )
    process.start()
    mine.close()
    process.join(30)
    assert process.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err


async def test_an_initializer_error_the_parent_cannot_unpickle_breaks_the_pool_clearly(
    mp_context: MPContext,
) -> None:
    # Its class lives in a module that only the worker has.
    with pytest.raises(anyio.BrokenResourceError, match="no config here") as info:
        async with asyncmp.open_pool(
            2, context=mp_context, initializer=w.fail_init_worker_only, initargs=("no config here",)
        ):
            raise AssertionError("not reached")  # pragma: no cover
    assert "initializer failed" in str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, pickle.PicklingError)
    assert "fail_init_worker_only raised WorkerOnlyError: no config here" in str(cause)
    assert "No module named 'asyncmp_tests_worker_only'" in str(cause)
    assert isinstance(cause.__cause__, asyncmp.RemoteTraceback)
    assert "in raise_worker_only" in str(cause.__cause__)


async def test_a_replacement_whose_initializer_error_cannot_be_unpickled_spares_running_calls(
    tmp_path: Path,
) -> None:
    ours, theirs = asyncmp.Pipe()
    release = multiprocessing.Semaphore(0)
    holds = Holds(ours, release)
    try:
        async with asyncmp.open_pool(
            2,
            max_tasks_per_child=1,
            initializer=w.install_then_fail_from,
            initargs=(theirs, release, str(tmp_path), 2, "replacement config"),
        ) as pool:
            held: list[int] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(_append, held, pool.run(w.hold, 7))
                await started(holds)
                # The other worker runs one call and is replaced, by a worker whose
                # initializer raises what the parent can't unpickle: the pool breaks.
                assert await pool.run(w.echo, 1) == 1
                with pytest.raises(anyio.BrokenResourceError, match="replacement config") as info:
                    await pool.run(w.echo, 2)
                assert isinstance(info.value.__cause__, pickle.PicklingError)
                # The call on the healthy worker goes on, and so does the block.
                holds.release()
            assert held == [7]
            with pytest.raises(anyio.BrokenResourceError, match="replacement config"):
                await pool.run(w.echo, 3)
            stats = pool.statistics()
            assert (stats.calls_done, stats.calls_failed, stats.calls_running) == (2, 1, 0)
    finally:
        theirs.close()
        await ours.aclose()


async def test_max_tasks_per_child_replaces_workers() -> None:
    async with asyncmp.open_pool(1, max_tasks_per_child=2) as pool:
        pids = [await pool.run(w.getpid) for _ in range(5)]
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
        assert len(set(pids)) == 3
        # Chunks of map count call by call.
        pids = [pid async for pid in pool.map(w.pid_of, range(6))]
        assert len(set(pids)) >= 3
        assert pool.statistics().workers_replaced >= 4


async def test_max_tasks_per_child_is_exact_for_map_chunks_and_run_batches() -> None:
    async with asyncmp.open_pool(1, max_tasks_per_child=3) as pool:
        # Chunks grow past what a worker has left: each is cut at the worker's count.
        pids = [pid async for pid in pool.map(w.pid_of, range(30))]
        assert sorted(Counter(pids).values()) == [3] * 10
        # Quick run() calls queued together go in batches, cut the same way.
        results: list[int] = []

        async def call() -> None:
            results.append(await pool.run(w.getpid))

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(call)
        assert sorted(Counter(results).values()) == [3] * 10
        stats = pool.statistics()
        assert (stats.calls_done, stats.calls_queued, stats.calls_running) == (60, 0, 0)


async def test_a_worker_ignores_sigint_the_pool_owns_its_life() -> None:
    async with held_pool(1) as (pool, holds):
        async with anyio.create_task_group() as tg:
            results: list[int] = []

            async def call() -> None:
                results.append(await pool.run(w.hold, 5))

            tg.start_soon(call)
            pid = await started(holds)
            # What a Ctrl-C in a terminal does: SIGINT to the whole process group.
            os.kill(pid, signal.SIGINT)
            holds.release()
        assert results == [5]
        assert await pool.run(w.getpid) == pid
        assert pool.statistics().workers_replaced == 0


async def test_start_methods_run_calls(mp_context: MPContext) -> None:
    async with asyncmp.open_pool(2, context=mp_context) as pool:
        assert [y async for y in pool.map(w.echo, range(50))] == list(range(50))


async def test_processes_default_and_validation() -> None:
    with pytest.raises(ValueError, match="processes=0"):
        async with asyncmp.open_pool(0):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="max_tasks_per_child=0"):
        async with asyncmp.open_pool(1, max_tasks_per_child=0):
            pass  # pragma: no cover
    async with asyncmp.open_pool() as pool:
        with pytest.raises(TypeError, match="not iterable"):
            pool.map(w.echo, 5)  # type: ignore[arg-type]
        assert pool.processes == os.cpu_count()
        assert pool.statistics().workers_alive == os.cpu_count()


class _SecondProcessFails:
    """A multiprocessing context whose second process fails to start."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context()
        self._started = 0

    def Pipe(self, duplex: bool = True) -> Any:
        return self._ctx.Pipe(duplex)

    def Process(self, **kwargs: Any) -> Any:
        self._started += 1
        if self._started == 2:
            raise OSError("no more processes")
        return self._ctx.Process(**kwargs)


async def test_a_worker_that_cannot_start_raises_as_itself_and_leaves_nothing() -> None:
    with pytest.raises(OSError, match="no more processes"):
        async with asyncmp.open_pool(2, context=_SecondProcessFails()):
            raise AssertionError("not reached")  # pragma: no cover


async def test_the_blocks_own_exception_comes_out_as_itself() -> None:
    with pytest.raises(KeyError):
        async with asyncmp.open_pool(1):
            raise KeyError("mine")


# --- leaving the block -----------------------------------------------------------------


async def test_a_cancelled_block_leaves_no_process_behind() -> None:
    ours, theirs = asyncmp.Pipe()
    release = multiprocessing.Semaphore(0)
    try:
        with anyio.CancelScope() as scope:
            async with asyncmp.open_pool(
                2, initializer=w.install, initargs=(theirs, release)
            ) as pool:
                pids = [await pool.run(w.getpid)]
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pool.run, w.hold, 1)
                    pids.append(await started(Holds(ours, release)))
                    scope.cancel()
        assert scope.cancelled_caught
    finally:
        theirs.close()
        await ours.aclose()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert pool.statistics().workers_alive == 0
    with pytest.raises(anyio.ClosedResourceError):
        await pool.run(w.echo, 1)


async def test_calls_queued_or_running_when_the_block_ends_raise_closed() -> None:
    outcomes: list[BaseException] = []

    async def call(pool: Pool, fn: Any, arg: int) -> None:
        try:
            await pool.run(fn, arg)
        except anyio.ClosedResourceError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as outer:
        async with held_pool(1) as (pool, conn):
            outer.start_soon(call, pool, w.hold, 0)
            await started(conn)
            outer.start_soon(call, pool, w.echo, 1)
            await anyio.wait_all_tasks_blocked()
            assert pool.statistics().calls_queued == 1
        # Left normally: the queued call fails, the running one's worker is stopped.
    assert len(outcomes) == 2
    assert pool.statistics().workers_alive == 0


async def test_statistics_count_workers_and_calls() -> None:
    async with held_pool(2) as (pool, conn):
        assert pool.statistics() == asyncmp.PoolStatistics(2, 0, 0, 0, 0, 0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, w.hold, 1)
            tg.start_soon(pool.run, w.hold, 2)
            await started(conn)
            await started(conn)
            tg.start_soon(pool.run, w.echo, 3)
            await anyio.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert (stats.calls_running, stats.calls_queued) == (2, 1)
            conn.release()
            conn.release()
        with pytest.raises(ValueError):
            await pool.run(w.fail, "x")
        assert pool.statistics() == asyncmp.PoolStatistics(2, 0, 0, 3, 1, 0)


# --- the pool's event loop -------------------------------------------------------------


async def test_another_loop_is_refused_at_once() -> None:
    """While a call of this loop runs, ``run()``, ``map()`` and the iterator of a map made
    here raise RuntimeError at once from a loop in another thread (they waited until their
    own timeout: nothing woke them). Nothing was queued; the pool goes on serving this
    loop."""
    async with held_pool(1) as (pool, holds):
        results: list[int] = []
        made_here = pool.map(w.echo, [1, 2, 3])

        async def held_call() -> None:
            results.append(await pool.run(w.hold, 7))

        async def map_there() -> list[int]:
            return [y async for y in pool.map(w.echo, [1])]

        calls = (
            lambda: pool.run(w.echo, 1),
            map_there,
            lambda: anext(made_here),
            made_here.aclose,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(held_call)
            await started(holds)
            for backend in FOREIGN_BACKENDS:
                for call in calls:
                    assert_refused(await from_another_loop(call, backend), "this Pool")
            stats = pool.statistics()
            assert (stats.calls_queued, stats.calls_running) == (0, 1)
            holds.release()
        assert results == [7]
        assert [y async for y in made_here] == [1, 2, 3]
        assert await pool.run(w.echo, 5) == 5


def test_the_ways_the_refusal_names_reach_the_pool() -> None:
    """What the RuntimeError says to do works: from a plain thread, ``anyio.from_thread.run``
    with the pool loop's token; from a thread that loop started, without one; and sync code
    with no loop opens a pool in a blocking portal and calls it through the portal."""

    async def main() -> list[int]:
        async with asyncmp.open_pool(1) as pool:
            token = anyio.lowlevel.current_token()
            got: list[int] = []

            def plain_thread() -> None:
                got.append(anyio.from_thread.run(pool.run, w.echo, 1, token=token))

            thread = threading.Thread(target=plain_thread, name="test-caller")
            thread.start()
            got.append(await anyio.to_thread.run_sync(anyio.from_thread.run, pool.run, w.echo, 2))
            await anyio.to_thread.run_sync(thread.join)
            return sorted(got)

    for backend in ("asyncio", "trio"):
        assert anyio.run(main, backend=backend) == [1, 2]
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(asyncmp.open_pool(1)) as pool:
            assert portal.call(pool.run, w.echo, 3) == 3


# --- a fresh start: signals, event loops, a parent that dies ---------------------------


@contextmanager
def python_handlers(*names: str) -> Iterator[None]:
    """Python-level handlers on these signals in this process, as a server installs them
    (uvicorn, gunicorn and celery handle SIGTERM); the old ones are back afterwards."""
    signums = [getattr(signal, name) for name in names]
    old = {signum: signal.signal(signum, lambda signum, frame: None) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


@posix_only
async def test_a_worker_starts_with_the_signal_handlers_of_a_fresh_process(
    mp_context: MPContext,
) -> None:
    with python_handlers(*workers.INHERITED_SIGNALS):
        async with asyncmp.open_pool(1, context=mp_context) as pool:
            handlers = await pool.run(workers.signal_handlers)
    # The pool owns SIGINT (ignored) and SIGTERM (how it stops a busy worker); the others
    # are what a new interpreter has, SIGPIPE ignored as Python ignores it.
    assert handlers == {
        "SIGTERM": "SIG_DFL",
        "SIGHUP": "SIG_DFL",
        "SIGUSR1": "SIG_DFL",
        "SIGCHLD": "SIG_DFL",
        "SIGPIPE": "SIG_IGN",
        "SIGINT": "SIG_IGN",
    }


async def _expect_killed_by(pool: Pool, holds: Holds, signum: int) -> None:
    """Hold a call, send *signum* to its worker: the call raises WorkerExited for it."""

    async def kill_when_started() -> None:
        os.kill(await started(holds), signum)

    with anyio.fail_after(PATIENT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_when_started)
            with pytest.raises(asyncmp.WorkerExited) as info:
                await pool.run(w.hold, 1)
    assert info.value.exitcode == -signum


@posix_only
@pytest.mark.parametrize("method", multiprocessing.get_all_start_methods())
def test_a_spawned_worker_keeps_the_handlers_its_main_module_installs(method: str) -> None:
    """Only a forked worker's handlers are the parent's: a spawn or forkserver worker
    installed its own as it imported the main module, as a new interpreter would."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.main_handlers", method],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    usr1 = "SIG_DFL" if method == "fork" else "a Python handler"
    assert result.stdout.splitlines() == [f"{usr1},SIG_DFL"]


@pytest.mark.parametrize(
    "method", [m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]
)
def test_a_spawned_worker_loads_only_the_worker_side(method: str) -> None:
    """A spawn or forkserver worker imports the worker module by name, and with it
    ``asyncmp/__init__.py``: neither loads anyio or the parent's side of the pool."""

    async def main() -> list[str]:
        async with asyncmp.open_pool(1, context=multiprocessing.get_context(method)) as pool:
            return await pool.run(w.loaded_modules)

    loaded = anyio.run(main)
    assert "asyncmp._pool.worker" in loaded
    assert [m for m in loaded if m.split(".")[0] in w.EVENT_LOOP_LIBRARIES] == []
    assert [m for m in loaded if m.split(".")[0] == "asyncmp" and m not in w.WORKER_SIDE] == []


async def test_sigterm_ends_a_busy_worker_whatever_handler_the_parent_has(
    mp_context: MPContext,
) -> None:
    # An operator's `kill <worker>`: the parent's handler must not swallow it in the worker.
    with python_handlers("SIGTERM"):
        async with held_pool(1, context=mp_context) as (pool, holds):
            await _expect_killed_by(pool, holds, signal.SIGTERM)
            assert await pool.run(w.echo, 2) == 2  # on the replacement


class _KeepsExitCodes:
    """A fork context whose processes note their exit code when the pool closes them."""

    def __init__(self) -> None:
        self.exit_codes: list[int | None] = []

    def Pipe(self, duplex: bool = True) -> Any:
        return FORK.Pipe(duplex)

    def Process(self, **kwargs: Any) -> Any:
        codes = self.exit_codes

        class Process(FORK.Process):  # type: ignore[misc]
            def close(self) -> None:
                codes.append(self.exitcode)
                super().close()

        return Process(**kwargs)


@posix_only
async def test_leaving_the_block_terminates_a_busy_worker_not_after_the_kill_grace() -> None:
    # The parent's SIGTERM handler, inherited, would swallow the pool's terminate(): every
    # exit with a busy worker would wait out the grace and end in a SIGKILL.
    context = _KeepsExitCodes()
    closed: list[BaseException] = []

    async def call(pool: Pool) -> None:
        try:
            await pool.run(w.hold, 0)
        except anyio.ClosedResourceError as exc:
            closed.append(exc)

    with python_handlers("SIGTERM"):
        async with anyio.create_task_group() as outer:
            async with held_pool(1, context=context) as (pool, holds):
                outer.start_soon(call, pool)
                await started(holds)
    assert len(closed) == 1
    assert context.exit_codes == [-signal.SIGTERM]


@posix_only
async def test_a_forked_worker_can_run_an_event_loop_of_its_own() -> None:
    # Forked from a task of the running loop: the worker must not believe a loop runs.
    async with asyncmp.open_pool(1, context=FORK) as pool:
        assert await pool.run(workers.run_event_loops) == ["asyncio", "trio", "asyncio", "trio"]


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="watches the orphan by pidfd")
def test_a_busy_worker_ends_when_its_parent_is_killed(mp_context: MPContext) -> None:
    # The OOM killer, `docker kill` or `kill -9` of a service, while a call runs.
    with killed_owner(w.own_a_busy_pool, mp_context.get_start_method()) as worker:
        assert worker.ends_within(ORPHAN_PATIENCE), "the worker outlived its parent"
