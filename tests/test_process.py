"""The life of a process under ``open_process`` / ``open_worker``, and ``AsyncProcess.wait``.

Every test here runs on each event-loop backend, and on the start methods its behaviour
depends on, no more. Waiting and reaping differ between a child of this process (fork; a
spawned child is one too) and a forkserver's, which is not: its exit status comes through the
sentinel and not from ``waitpid``, and its target is pickled as a spawned one's is
(``WAIT_START_METHODS``). A fresh start (signal handlers, event loops) and a parent's death
run on every start method. The rest (shutdown escalation, a worker's conversation) runs once,
on fork (``ONE_START_METHOD``). A child that must be running before the test acts says ``"ready"``
first (see ``tests/support/process_workers.py``), so no test guesses with a sleep. Timings appear
only as generous bounds that tell "at once" from "after shutdown_timeout".

After every block, the process must be reaped: ``waitpid`` knows nothing of it, and on
Linux ``/proc/<pid>`` is gone (neither a zombie nor an orphan). The suite's leak check adds
that no descriptor, thread or child process outlives a test.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import asyncmp
from asyncmp import AsyncConnection, AsyncProcess, Worker, WorkerExited
from asyncmp._core import platform as _platform

from .support import process_workers as pw
from .support import workers
from .support.loops import FOREIGN_BACKENDS, assert_refused, from_another_loop
from .support.orphans import ORPHAN_PATIENCE, killed_owner

if TYPE_CHECKING:
    from tests.support.workers import MPContext

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and exit codes"),
]

FORK: Any = multiprocessing.get_context("fork") if sys.platform != "win32" else None
#: A shutdown_timeout that a test must never sit out: leaving "at once" takes far less.
LONG = 60.0
#: The bound for "at once" and "within about a second": generous, for a loaded CI machine.
PROMPT = 15.0
SIGTERM = -signal.SIGTERM
SIGKILL = -getattr(signal, "SIGKILL", 9)  # (the module is skipped on Windows, which lacks it)

#: For a test whose behaviour does not depend on the start method: fork, once.
ONE_START_METHOD = pytest.mark.parametrize("mp_context", [pytest.param(FORK, id="fork")])
#: Where waiting and reaping differ: a child of ours (fork), and a forkserver's, which is not
#: ours and whose target was pickled (spawn's children are ours, its targets pickled too).
WAIT_START_METHODS = pytest.mark.parametrize(
    "mp_context",
    [
        pytest.param(multiprocessing.get_context(method), id=method)
        for method in ("fork", "forkserver")
        if method in multiprocessing.get_all_start_methods()
    ],
)


# --- helpers ------------------------------------------------------------------------------------


def assert_reaped(pid: int) -> None:
    """The process is gone: not a zombie of ours, not an orphan still running."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    if sys.platform == "linux":
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} still exists"


def ready_pipe() -> tuple[AsyncConnection, Any]:
    """``(async end that receives, end for the child)`` for a child's "ready"."""
    return asyncmp.Pipe(duplex=False)


async def open_ready_process(
    stack: AsyncExitStack,
    target: Callable[..., object],
    context: Any,
    *,
    shutdown_timeout: float = 5.0,
) -> AsyncProcess:
    """Start ``target(ready_end)`` under ``open_process`` and wait for its "ready"."""
    ready, child_end = ready_pipe()
    async with ready:
        try:
            process = await stack.enter_async_context(
                asyncmp.open_process(
                    target, child_end, context=context, shutdown_timeout=shutdown_timeout
                )
            )
        finally:
            child_end.close()  # the child has its own copy now
        assert await ready.recv() == "ready"
    return process


class Boom(Exception):
    pass


def raises_boom_if(how: str) -> contextlib.AbstractContextManager[object]:
    """Expect :class:`Boom` when the block is left on an exception, else nothing."""
    return pytest.raises(Boom) if how == "exception" else contextlib.nullcontext()


# --- AsyncProcess -------------------------------------------------------------------------------


def test_async_process_needs_a_started_process() -> None:
    with pytest.raises(ValueError, match="not been started"):
        AsyncProcess(FORK.Process(target=pw.exit_with, args=(0,)))


@WAIT_START_METHODS
async def test_wait_on_a_process_started_elsewhere(mp_context: MPContext) -> None:
    process = mp_context.Process(target=pw.exit_with, args=(3,))
    process.start()
    pid = process.pid
    aprocess = AsyncProcess(process)
    assert aprocess.process is process
    assert aprocess.pid == process.pid
    assert await aprocess.wait() == 3
    assert await aprocess.wait() == 3  # again: the code is kept
    aprocess.close()
    assert aprocess.exitcode == 3  # still readable once the process object is closed
    assert not aprocess.is_alive()
    assert repr(aprocess) == f"<asyncmp.AsyncProcess pid={pid} exitcode=3>"
    assert_reaped(aprocess.pid)


@WAIT_START_METHODS
async def test_wait_starts_no_thread(mp_context: MPContext) -> None:
    codes: list[int] = []
    async with AsyncExitStack() as stack:
        process = await open_ready_process(stack, pw.say_ready_then_hang, mp_context)
        threads = set(threading.enumerate())

        async def wait() -> None:
            codes.append(await process.wait())

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            assert set(threading.enumerate()) == threads
            assert process.is_alive()
            process.terminate()
    assert codes == [SIGTERM]
    assert_reaped(process.pid)


async def test_cancelled_wait_changes_nothing() -> None:
    async with AsyncExitStack() as stack:
        process = await open_ready_process(stack, pw.say_ready_then_hang, FORK)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await process.wait()
        assert scope.cancelled_caught
        assert process.is_alive()
        assert process.exitcode is None
        process.terminate()
        assert await process.wait() == SIGTERM
    assert_reaped(process.pid)


@pytest.mark.skipif(
    not hasattr(os, "pidfd_open") or "forkserver" not in multiprocessing.get_all_start_methods(),
    reason="a pidfd and a forkserver",
)
async def test_wait_for_a_forkserver_child_does_not_spin() -> None:
    """Between its child's exit and the status it writes on the sentinel, the forkserver
    can lag (here: it is stopped). The process's pidfd is readable all that time, and
    waitpid() can't reap a child that is not ours; the wait must not spin on the pidfd."""
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    async with AsyncExitStack() as stack:
        process = await open_ready_process(stack, pw.say_ready_then_hang, context)
        server_pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if server_pid is None:
            pytest.skip("this Python keeps the forkserver's pid elsewhere")
        os.kill(server_pid, signal.SIGSTOP)
        try:
            pidfd = os.pidfd_open(process.pid)
            try:
                process.terminate()
                assert select.select([pidfd], [], [], PROMPT)[0], "the child did not exit"
            finally:
                os.close(pidfd)
            wall, cpu = time.monotonic(), time.process_time()
            with anyio.move_on_after(0.5) as scope:
                await process.wait()
            wall, cpu = time.monotonic() - wall, time.process_time() - cpu
            assert scope.cancelled_caught  # no status without the forkserver
            assert cpu < 0.1 * wall, f"{cpu * 1e3:.1f} ms of CPU in {wall * 1e3:.0f} ms"
        finally:
            os.kill(server_pid, signal.SIGCONT)
        with anyio.fail_after(PROMPT):
            assert await process.wait() == SIGTERM
    assert_reaped(process.pid)


# --- many waiters -------------------------------------------------------------------------------
#
# Any number of tasks may wait for one process, and each gets the exit code, whatever the others
# do meanwhile: be cancelled, stop() it, or leave the block that owns it. Each test runs on every
# way of watching a process: a pidfd (Linux), the sentinel (macOS; and a forkserver's children,
# whose status only the sentinel brings), and the thread of the Windows route.

WAIT_ROUTES = ["pidfd", "sentinel", "thread"]


@pytest.fixture(params=WAIT_ROUTES)
def wait_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Watch processes through a pidfd, the sentinel, or a thread, for this test."""
    route: str = request.param
    if route == "pidfd" and not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd on this platform")
    if route == "sentinel":
        monkeypatch.delattr(os, "pidfd_open", raising=False)  # as on macOS
    if route == "thread":
        monkeypatch.setattr(_platform, "POSIX_FDS", False)  # as on Windows
    return route


def open_fds() -> set[int]:
    """This process's open descriptors (empty where they can't be listed)."""
    fd_dir = {"linux": "/proc/self/fd", "darwin": "/dev/fd"}.get(sys.platform)
    return set(map(int, os.listdir(fd_dir))) if fd_dir else set()


async def wait_into(process: AsyncProcess, codes: list[int]) -> None:
    codes.append(await process.wait())


@pytest.mark.usefixtures("wait_route")
@WAIT_START_METHODS
async def test_several_tasks_wait_at_once(mp_context: MPContext) -> None:
    codes: list[int] = []
    async with AsyncExitStack() as stack:
        process = await open_ready_process(stack, pw.say_ready_then_hang, mp_context)
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(wait_into, process, codes)
            await anyio.wait_all_tasks_blocked()
            assert codes == []
            assert process.is_alive()
            process.terminate()
        assert codes == [SIGTERM] * 3
        assert await process.wait() == SIGTERM  # and a later call, at once
    assert_reaped(process.pid)


@pytest.mark.usefixtures("wait_route")
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param(pw.say_ready_then_hang, SIGTERM, id="terminated"),
        pytest.param(pw.ignore_sigterm_then_hang, SIGKILL, id="killed-after-grace"),
    ],
)
@WAIT_START_METHODS
async def test_stop_while_other_tasks_wait(
    mp_context: MPContext, target: Callable[..., object], expected: int
) -> None:
    codes: list[int] = []
    async with AsyncExitStack() as stack:
        process = await open_ready_process(stack, target, mp_context, shutdown_timeout=LONG)
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(wait_into, process, codes)
            await anyio.wait_all_tasks_blocked()
            start = time.monotonic()
            assert await process.stop(grace=0.2) == expected
            assert time.monotonic() - start < PROMPT
            assert not process.is_alive()
        assert codes == [expected] * 2
    assert process.exitcode == expected
    assert_reaped(process.pid)


@pytest.mark.usefixtures("wait_route")
async def test_two_tasks_stop_at_once() -> None:
    codes: list[int] = []
    async with AsyncExitStack() as stack:
        process = await open_ready_process(stack, pw.ignore_sigterm_then_hang, FORK)

        async def stop() -> None:
            codes.append(await process.stop(grace=0.2))

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            tg.start_soon(stop)
    assert codes == [SIGKILL] * 2
    assert_reaped(process.pid)


@pytest.mark.usefixtures("wait_route")
@pytest.mark.parametrize("how", ["normally", "exception"])
@pytest.mark.parametrize("opener", ["open_process", "open_worker"])
@WAIT_START_METHODS
async def test_leaving_the_block_while_tasks_wait(
    mp_context: MPContext, opener: str, how: str
) -> None:
    """Tasks outside the block wait for its process; the block ends, and they get the code."""
    codes: list[int] = []
    async with anyio.create_task_group() as tg:
        with raises_boom_if(how):
            async with AsyncExitStack() as stack:
                if opener == "open_process":
                    p = await open_ready_process(
                        stack, pw.say_ready_then_hang, mp_context, shutdown_timeout=0.1
                    )
                else:
                    w = await stack.enter_async_context(
                        asyncmp.open_worker(
                            pw.say_ready_then_hang, context=mp_context, shutdown_timeout=0.1
                        )
                    )
                    assert await w.recv() == "ready"
                    p = w.process
                for _ in range(2):
                    tg.start_soon(wait_into, p, codes)
                await anyio.wait_all_tasks_blocked()
                if how == "exception":
                    raise Boom
    assert codes == [SIGTERM] * 2
    assert p.exitcode == SIGTERM
    assert_reaped(p.pid)


@pytest.mark.usefixtures("wait_route")
@WAIT_START_METHODS
async def test_a_cancelled_waiter_leaves_the_others_waiting(mp_context: MPContext) -> None:
    codes: list[int] = []
    scopes = [anyio.CancelScope() for _ in range(4)]

    async def wait(scope: anyio.CancelScope) -> None:
        with scope:
            codes.append(await process.wait())

    async with AsyncExitStack() as stack:
        process = await open_ready_process(stack, pw.say_ready_then_hang, mp_context)
        async with anyio.create_task_group() as tg:
            for scope in scopes:
                tg.start_soon(wait, scope)
            await anyio.wait_all_tasks_blocked()
            scopes[0].cancel()  # the first to wait: the one that watches for the others
            scopes[2].cancel()
            await anyio.wait_all_tasks_blocked()
            assert codes == []
            assert process.is_alive()
            scopes[1].cancel()  # the next one that watched
            await anyio.wait_all_tasks_blocked()
            assert codes == []
            process.terminate()
        assert codes == [SIGTERM]  # the last one's
        assert [scope.cancelled_caught for scope in scopes] == [True, True, True, False]
    assert_reaped(process.pid)


@pytest.mark.usefixtures("wait_route")
@WAIT_START_METHODS
async def test_the_last_waiter_gone_leaves_no_descriptor(mp_context: MPContext) -> None:
    async with AsyncExitStack() as stack:
        process = await open_ready_process(stack, pw.say_ready_then_hang, mp_context)
        before = open_fds()
        for _ in range(2):  # and a second round can wait again
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(process.wait)
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
            assert open_fds() == before
            assert process.is_alive()
        codes: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_into, process, codes)
            await anyio.wait_all_tasks_blocked()
            process.terminate()
        assert codes == [SIGTERM]
        assert open_fds() == before
    assert_reaped(process.pid)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_close_while_a_waiting_thread_runs_and_the_loop_ends(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread route: a wait's thread is still in its time slice when the process is
    reaped, close() is called and the loop ends. The thread, not a loop callback that
    will never run, closes the process object once it is done with the sentinel."""
    monkeypatch.setattr(_platform, "POSIX_FDS", False)  # as on Windows
    in_slice = threading.Event()
    slice_may_end = threading.Event()
    real_wait = multiprocessing.connection.wait

    def slow_slice(objects: Any, timeout: float | None = None) -> Any:
        if threading.current_thread().name == "asyncmp-process-wait":
            in_slice.set()
            slice_may_end.wait(10)  # the thread is held inside its slice
        return real_wait(objects, timeout)

    monkeypatch.setattr(multiprocessing.connection, "wait", slow_slice)
    ready, child_end = FORK.Pipe(False)
    process = FORK.Process(target=pw.say_ready_then_hang, args=(child_end,))
    process.start()
    child_end.close()
    ready.recv()
    ready.close()
    aprocess = AsyncProcess(process)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(aprocess.wait)
            await anyio.to_thread.run_sync(in_slice.wait, 10)
            tg.cancel_scope.cancel()  # the thread is asked to stop after its slice
        process.kill()
        process.join()  # reaped here: close() has an exit code to go by
        aprocess.close()  # the thread still runs: it must close the process object

    try:
        anyio.run(main, backend=backend)
    finally:
        slice_may_end.set()
    for thread in threading.enumerate():
        if thread.name == "asyncmp-process-wait":
            thread.join(5)
    assert process._closed


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_close_outside_a_loop_after_waits(backend: str) -> None:
    """The waits, done and cancelled, released what they held in their loop: close() needs
    none, and leaves no descriptor behind."""
    process = FORK.Process(target=pw.exit_with, args=(0,))
    process.start()
    aprocess = AsyncProcess(process)
    before = open_fds()

    async def main() -> int:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await aprocess.wait()
        return await aprocess.wait()

    assert anyio.run(main, backend=backend) == 0
    assert open_fds() == before
    aprocess.close()
    assert open_fds() < before  # the process object's own descriptors, closed
    assert aprocess.exitcode == 0
    assert_reaped(aprocess.pid)


@WAIT_START_METHODS
async def test_close_while_tasks_wait(mp_context: MPContext, wait_route: str) -> None:
    """The process is reaped outside the waits (a sync ``exitcode`` read) and closed while
    tasks wait: closing releases what they watch at once, and they get the code."""
    codes: list[int] = []
    async with anyio.create_task_group() as tg:
        async with AsyncExitStack() as stack:
            process = await open_ready_process(stack, pw.say_ready_then_hang, mp_context)
            sentinel = process.process.sentinel
            before = open_fds()
            for _ in range(2):
                tg.start_soon(wait_into, process, codes)
            await anyio.wait_all_tasks_blocked()
            process.terminate()
            deadline = time.monotonic() + PROMPT
            while process.exitcode is None:  # no checkpoint: the waiters don't run meanwhile
                assert time.monotonic() < deadline, "the process did not end"
                process.process.join(0.05)
            process.close()
            assert codes == []
            if wait_route != "thread":  # (there, the thread may still be in its last slice)
                assert open_fds() <= before - {sentinel}  # nothing new, the process's closed
    assert codes == [SIGTERM] * 2
    assert open_fds() <= before - {sentinel}
    assert process.exitcode == SIGTERM
    assert_reaped(process.pid)


# --- open_process -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "args", "expected"),
    [
        pytest.param(pw.exit_with, (0,), 0, id="returns"),
        pytest.param(pw.exit_with, (7,), 7, id="exit-7"),
        pytest.param(pw.kill_self, (), SIGKILL, id="sigkill"),
    ],
)
@WAIT_START_METHODS
async def test_exit_code(
    mp_context: MPContext, target: Callable[..., object], args: tuple[Any, ...], expected: int
) -> None:
    async with asyncmp.open_process(target, *args, context=mp_context, name="exit-code") as p:
        assert isinstance(p.process, BaseProcess)
        assert p.process.name == "exit-code"
        assert p.pid == p.process.pid
        assert await p.wait() == expected
        assert p.exitcode == expected
        assert not p.is_alive()
    # Readable after the block, which closed the process object; stopping is a no-op now.
    assert p.exitcode == expected
    assert not p.is_alive()
    p.terminate()
    p.kill()
    assert_reaped(p.pid)


@ONE_START_METHOD
async def test_leaving_normally_lets_the_process_finish(mp_context: MPContext) -> None:
    start = time.monotonic()
    async with asyncmp.open_process(
        pw.exit_with, 0, context=mp_context, shutdown_timeout=LONG
    ) as p:
        pass  # the child is likely still starting: the block waits for it to end
    assert p.exitcode == 0  # not terminated
    assert time.monotonic() - start < PROMPT
    assert_reaped(p.pid)


@ONE_START_METHOD
async def test_runaway_child_is_terminated_after_shutdown_timeout(mp_context: MPContext) -> None:
    async with AsyncExitStack() as stack:
        p = await open_ready_process(
            stack, pw.say_ready_then_hang, mp_context, shutdown_timeout=0.1
        )
    assert p.exitcode == SIGTERM
    assert_reaped(p.pid)


@ONE_START_METHOD
async def test_runaway_child_ignoring_sigterm_is_killed(mp_context: MPContext) -> None:
    async with AsyncExitStack() as stack:
        p = await open_ready_process(
            stack, pw.ignore_sigterm_then_hang, mp_context, shutdown_timeout=0.1
        )
    assert p.exitcode == SIGKILL
    assert_reaped(p.pid)


@pytest.mark.parametrize("how", ["exception", "cancellation"])
@ONE_START_METHOD
async def test_leaving_on_error_terminates_at_once(mp_context: MPContext, how: str) -> None:
    start = time.monotonic()
    with anyio.CancelScope() as scope, raises_boom_if(how):
        async with AsyncExitStack() as stack:
            p = await open_ready_process(
                stack, pw.say_ready_then_hang, mp_context, shutdown_timeout=LONG
            )
            if how == "exception":
                raise Boom
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught == (how == "cancellation")
    assert p.exitcode == SIGTERM
    assert time.monotonic() - start < PROMPT
    assert_reaped(p.pid)


@pytest.mark.parametrize("how", ["exception", "cancellation"])
async def test_leaving_on_error_kills_a_child_ignoring_sigterm(how: str) -> None:
    with anyio.CancelScope() as scope, raises_boom_if(how):
        async with AsyncExitStack() as stack:
            p = await open_ready_process(
                stack, pw.ignore_sigterm_then_hang, FORK, shutdown_timeout=LONG
            )
            if how == "exception":
                raise Boom
            scope.cancel()
            await anyio.sleep_forever()
    assert p.exitcode == SIGKILL
    assert_reaped(p.pid)


# --- open_worker --------------------------------------------------------------------------------


@ONE_START_METHOD
async def test_worker_recv_loop_ends_on_eof_when_the_block_exits(mp_context: MPContext) -> None:
    start = time.monotonic()
    async with asyncmp.open_worker(
        pw.echo_until_eof, context=mp_context, shutdown_timeout=LONG
    ) as w:
        assert isinstance(w, Worker)
        assert isinstance(w.process, AsyncProcess)
        for msg in ["hello", [42, None, "hello"], b"\x00" * 100_000]:
            await w.send(msg)
            assert await w.recv() == msg
        await w.send_bytes(pickle.dumps("raw"))  # the worker unpickles what it gets
        assert pickle.loads(await w.recv_bytes()) == "raw"
    assert w.connection.closed
    assert w.process.exitcode == 0  # it returned on EOF: neither terminated nor killed
    assert time.monotonic() - start < PROMPT
    assert_reaped(w.process.pid)


@ONE_START_METHOD
async def test_async_for_ends_when_the_worker_returns(mp_context: MPContext) -> None:
    async with asyncmp.open_worker(pw.send_then_return, 5, context=mp_context) as w:
        assert [msg async for msg in w] == [0, 1, 2, 3, 4]
    assert w.process.exitcode == 0
    assert_reaped(w.process.pid)


@ONE_START_METHOD
async def test_async_for_raises_when_the_worker_crashes(mp_context: MPContext) -> None:
    received: list[int] = []
    async with asyncmp.open_worker(pw.send_then_exit, 3, 7, context=mp_context) as w:
        with pytest.raises(WorkerExited, match="worker exited with code 7"):
            async for msg in w:
                received.append(msg)
    assert received == [0, 1, 2]  # what it sent before dying is delivered first
    assert w.process.exitcode == 7
    assert_reaped(w.process.pid)


@pytest.mark.parametrize(
    ("crash", "message", "exitcode"),
    [
        pytest.param((pw.EXIT, 7), "worker exited with code 7", 7, id="exit-7"),
        pytest.param(pw.KILL, "worker was killed by signal 9 (SIGKILL)", SIGKILL, id="sigkill"),
    ],
)
@ONE_START_METHOD
async def test_worker_crash_mid_conversation_fails_the_pending_recv(
    mp_context: MPContext, crash: object, message: str, exitcode: int
) -> None:
    errors: list[tuple[WorkerExited, float]] = []
    async with asyncmp.open_worker(
        pw.echo_until_eof, context=mp_context, shutdown_timeout=LONG
    ) as w:
        await w.send("hello")
        assert await w.recv() == "hello"

        async def recv_pending() -> None:
            with pytest.raises(WorkerExited) as info:
                await w.recv()
            errors.append((info.value, time.monotonic()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(recv_pending)
            await anyio.wait_all_tasks_blocked()
            crashed_at = time.monotonic()
            await w.send(crash)
        # Every later receive says the same.
        with pytest.raises(WorkerExited, match=re.escape(message)):
            await w.recv()
    [(error, raised_at)] = errors
    assert str(error) == message
    assert error.exitcode == exitcode
    assert isinstance(error, EOFError)
    assert isinstance(error, asyncmp.ConnectionEOF)
    assert isinstance(error.__cause__, asyncmp.ConnectionEOF)
    assert raised_at - crashed_at < PROMPT  # "within about a second", with room for CI
    assert w.process.exitcode == exitcode
    assert_reaped(w.process.pid)


async def test_worker_killed_by_the_parent_fails_the_pending_recv() -> None:
    async with asyncmp.open_worker(pw.echo_until_eof, context=FORK) as w:
        async with anyio.create_task_group() as tg:

            async def recv_pending() -> None:
                with pytest.raises(WorkerExited, match=r"killed by signal 15 \(SIGTERM\)"):
                    await w.recv()

            tg.start_soon(recv_pending)
            await anyio.wait_all_tasks_blocked()
            w.process.terminate()
    assert w.process.exitcode == SIGTERM
    assert_reaped(w.process.pid)


@pytest.mark.parametrize("how", ["exception", "cancellation"])
@ONE_START_METHOD
async def test_worker_left_on_error_is_terminated_at_once(mp_context: MPContext, how: str) -> None:
    start = time.monotonic()
    with anyio.CancelScope() as scope, raises_boom_if(how):
        # The target ignores its connection: it neither reads nor sees EOF, so only the
        # signal can end it, and the exit code tells which one did.
        async with asyncmp.open_worker(
            pw.say_ready_then_hang, context=mp_context, shutdown_timeout=LONG
        ) as w:
            assert await w.recv() == "ready"
            if how == "exception":
                raise Boom
            async with anyio.create_task_group() as tg:
                tg.start_soon(w.recv)  # a receive pending when the scope is cancelled
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
    assert w.connection.closed
    assert w.process.exitcode == SIGTERM
    assert time.monotonic() - start < PROMPT
    assert_reaped(w.process.pid)


async def test_runaway_worker_is_killed() -> None:
    async with asyncmp.open_worker(
        pw.worker_ignoring_sigterm_and_eof, context=FORK, shutdown_timeout=0.1
    ) as w:
        assert await w.recv() == "ready"
    assert w.process.exitcode == SIGKILL
    assert_reaped(w.process.pid)


@pytest.mark.parametrize("opener", ["open_process", "open_worker"])
async def test_cancellation_pending_at_a_normal_exit_still_stops_the_process(opener: str) -> None:
    """The block ends without an error, but the scope was cancelled on the way out."""
    start = time.monotonic()
    with anyio.CancelScope() as scope:
        async with AsyncExitStack() as stack:
            if opener == "open_process":
                p = await open_ready_process(
                    stack, pw.say_ready_then_hang, FORK, shutdown_timeout=LONG
                )
            else:
                w = await stack.enter_async_context(
                    asyncmp.open_worker(pw.say_ready_then_hang, context=FORK, shutdown_timeout=LONG)
                )
                assert await w.recv() == "ready"
                p = w.process
            scope.cancel()  # no checkpoint follows inside the block
    assert scope.cancelled_caught
    assert p.exitcode == SIGTERM
    assert time.monotonic() - start < PROMPT
    assert_reaped(p.pid)


@ONE_START_METHOD
async def test_several_workers_at_once_each_see_eof(mp_context: MPContext) -> None:
    """A worker started after another holds no copy of the other's parent end (fork)."""
    async with AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(
                asyncmp.open_worker(pw.echo_until_eof, context=mp_context, shutdown_timeout=LONG)
            )
            for _ in range(3)
        ]
        for i, w in enumerate(workers):
            await w.send(i)
        assert [await w.recv() for w in workers] == [0, 1, 2]
        start = time.monotonic()
    assert time.monotonic() - start < PROMPT
    assert [w.process.exitcode for w in workers] == [0, 0, 0]
    for w in workers:
        assert_reaped(w.process.pid)


# --- the event loop they belong to --------------------------------------------------------------


async def test_an_opened_process_refuses_another_loop() -> None:
    """An ``open_process`` block's process belongs to the loop that opened it, even before
    it waited: ``wait()`` and ``stop()`` from a loop in another thread raise RuntimeError
    at once, before and while this loop waits (the other loop's wait waited for this
    loop's watch, which never told it). ``stop()`` sent no signal; the wait here gets the
    exit code."""
    codes: list[int] = []
    async with AsyncExitStack() as stack:
        process = await open_ready_process(stack, pw.say_ready_then_hang, FORK)
        for backend in FOREIGN_BACKENDS:
            assert_refused(await from_another_loop(process.wait, backend), "this AsyncProcess")

        async def wait() -> None:
            codes.append(await process.wait())

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            for backend in FOREIGN_BACKENDS:
                for call in (process.wait, process.stop):
                    outcome = await from_another_loop(call, backend)
                    assert_refused(outcome, "this AsyncProcess")
            assert process.is_alive()
            process.terminate()
    assert codes == [SIGTERM]
    assert_reaped(process.pid)


async def test_a_worker_refuses_another_loop() -> None:
    """An ``open_worker`` block's Worker and its process belong to the loop that opened
    them, before they were used: a receive, a send or ``aclose()`` of the Worker and a
    wait for its process, from a loop in another thread, raise RuntimeError at once; the
    conversation here goes on."""
    async with asyncmp.open_worker(pw.echo_until_eof, context=FORK) as worker:
        calls = (worker.recv, lambda: worker.send("there"), worker.aclose)
        for backend in FOREIGN_BACKENDS:
            for call in calls:
                assert_refused(await from_another_loop(call, backend), "this Worker")
            outcome = await from_another_loop(worker.process.wait, backend)
            assert_refused(outcome, "this AsyncProcess")
        await worker.send("here")
        with anyio.fail_after(PROMPT):
            assert await worker.recv() == "here"
    assert worker.process.exitcode == 0
    assert_reaped(worker.process.pid)


# --- a fresh start: signals, event loops, a parent that dies ------------------------------------


@contextlib.contextmanager
def python_handlers(*names: str) -> Iterator[None]:
    """Python-level handlers on these signals in this process, as a server installs them;
    the old ones are back afterwards."""
    signums = [getattr(signal, name) for name in names]
    old = {signum: signal.signal(signum, lambda signum, frame: None) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("opener", ["open_process", "open_worker"])
async def test_a_child_starts_with_fresh_signal_handlers_and_no_event_loop(
    mp_context: MPContext, opener: str
) -> None:
    with python_handlers(*workers.INHERITED_SIGNALS):
        if opener == "open_worker":
            async with asyncmp.open_worker(workers.report_fresh_start, context=mp_context) as w:
                handlers, loops = await w.recv()
        else:
            ours, theirs = asyncmp.Pipe(duplex=False)
            async with ours:
                try:
                    async with asyncmp.open_process(
                        workers.report_fresh_start, theirs, context=mp_context
                    ):
                        theirs.close()
                        handlers, loops = await ours.recv()
                finally:
                    theirs.close()
    # What a new interpreter has: the parent's handlers, its code and its state, are not
    # the child's.
    assert handlers == {
        "SIGTERM": "SIG_DFL",
        "SIGHUP": "SIG_DFL",
        "SIGUSR1": "SIG_DFL",
        "SIGCHLD": "SIG_DFL",
        "SIGPIPE": "SIG_IGN",
        "SIGINT": "default_int_handler",
    }
    assert loops == ["asyncio", "trio", "asyncio", "trio"]


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="watches the orphan by pidfd")
@pytest.mark.parametrize("opener", ["open_process", "open_worker"])
def test_a_busy_child_ends_when_its_parent_is_killed(mp_context: MPContext, opener: str) -> None:
    with killed_owner(pw.own_a_busy_child, mp_context.get_start_method(), opener) as child:
        assert child.ends_within(ORPHAN_PATIENCE), "the child outlived its parent"


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="watches the orphan by pidfd")
def test_die_with_parent_false_lets_a_child_outlive_its_parent() -> None:
    ours, theirs = FORK.Pipe()
    try:
        with killed_owner(pw.own_an_echoing_child, theirs, "fork", False) as child:
            theirs.close()
            ours.send("still there?")  # the owner is dead and reaped
            assert ours.poll(ORPHAN_PATIENCE)
            assert ours.recv() == "still there?"
            assert not child.ends_within(0)
    finally:
        theirs.close()
        ours.close()


# --- Worker as an anyio ObjectStream (#23 item 7) -----------------------------------------------
# Self-contained: each test opens its worker with the default start method (the methods only
# delegate to the Worker's connection; no start method behaves differently here) and uses only
# the names imported at the top of this module.


async def test_worker_is_an_anyio_object_stream() -> None:
    """``receive()`` is ``recv()`` under anyio's name, and the worker's end of the stream
    raises WorkerExited, which is anyio's EndOfStream too."""
    async with asyncmp.open_worker(pw.send_then_exit, 2, 7) as w:
        stream: anyio.abc.ObjectStream[Any] = w
        assert isinstance(stream, anyio.abc.ObjectStream)
        with anyio.fail_after(PROMPT):
            assert await w.receive() == 0
            assert await w.receive() == 1
            with pytest.raises(anyio.EndOfStream) as info:
                await w.receive()
    assert isinstance(info.value, WorkerExited)
    assert str(info.value) == "worker exited with code 7"
    assert w.process.exitcode == 7
    assert_reaped(w.process.pid)


async def test_worker_recv_bytes_into_fills_the_buffer() -> None:
    """``recv_bytes_into()`` as AsyncConnection's: a cancelled call consumed nothing, a
    message that doesn't fit is consumed and raised as BufferTooShort, and the worker's
    end raises WorkerExited."""
    payload = b"\x01" * 100_000
    message = pickle.dumps(payload)  # what the echoing worker sends back
    buffer = bytearray(len(message) + 10)
    async with asyncmp.open_worker(pw.echo_until_eof, shutdown_timeout=LONG) as w:
        with anyio.CancelScope() as scope:

            async def cancel_when_waiting() -> None:
                await anyio.wait_all_tasks_blocked()
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_waiting)
                await w.recv_bytes_into(buffer)
        assert scope.cancelled_caught
        with anyio.fail_after(PROMPT):
            await w.send(payload)
            assert await w.recv_bytes_into(buffer, 10) == len(message)
            assert pickle.loads(buffer[10:]) == payload
            await w.send(payload)
            with pytest.raises(multiprocessing.BufferTooShort) as too_short:
                await w.recv_bytes_into(bytearray(10))
            assert pickle.loads(too_short.value.args[0]) == payload
            await w.send("after")  # the message that did not fit was consumed
            assert await w.recv() == "after"
            await w.send((pw.EXIT, 3))
            with pytest.raises(WorkerExited, match="worker exited with code 3"):
                await w.recv_bytes_into(buffer)
    assert w.process.exitcode == 3
    assert_reaped(w.process.pid)


async def test_worker_send_eof_ends_the_workers_input_not_its_replies() -> None:
    """After ``send_eof()`` the worker's ``recv()`` raises EOFError, so it returns on its
    own, while every reply it sent still arrives here; a closed Worker refuses it."""
    async with asyncmp.open_worker(pw.echo_until_eof, shutdown_timeout=LONG) as w:
        for i in range(3):
            await w.send(i)
        await w.send_eof()
        with anyio.fail_after(PROMPT):
            assert [msg async for msg in w] == [0, 1, 2]  # ends cleanly: exit code 0
            assert await w.process.wait() == 0  # it returned before the block was left
        assert not w.connection.closed
        await w.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await w.send_eof()
    assert_reaped(w.process.pid)


async def test_worker_object_stream_methods_refuse_another_loop() -> None:
    """The new methods check the Worker's loop first, as its other awaited methods do."""
    async with asyncmp.open_worker(pw.echo_until_eof) as w:
        calls = (w.receive, lambda: w.recv_bytes_into(bytearray(10)), w.send_eof)
        for backend in FOREIGN_BACKENDS:
            for call in calls:
                assert_refused(await from_another_loop(call, backend), "this Worker")
        await w.send("here")
        with anyio.fail_after(PROMPT):
            assert await w.receive() == "here"
    assert w.process.exitcode == 0
    assert_reaped(w.process.pid)
