"""The likeliest mistakes with asyncmp's adapters fail at once, saying what to do instead.

An adapter (``AsyncQueue``, ``AsyncConnection``, ``Worker``, ``AsyncProcess``,
``AsyncListener``) belongs to the process that made it: pickling one, or handing it to a
spawned child, raises a ``TypeError`` that names the plain object to pass. A forked child
that uses an ``AsyncConnection`` it inherited learns why it is closed. An adapter given the
wrong kind of object raises ``TypeError`` at construction, naming what it accepts.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, cast

import anyio
import pytest

import asyncmp
from asyncmp import AsyncConnection, AsyncQueue

from .support import misuse_workers

if TYPE_CHECKING:
    from tests.support.workers import MPContext

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="the peers are POSIX processes"),
]

FORK = "fork" in multiprocessing.get_all_start_methods()

#: What the TypeError says to pass instead, per adapter.
INSTEAD = {
    "AsyncQueue": r"pass its \.queue",
    "AsyncConnection": r"plain multiprocessing Connection",
    "Worker": r"plain Pipe or Queue",
    "AsyncProcess": r"\.pid",
    "AsyncListener": r"\.address",
}


async def adapters() -> AsyncIterator[tuple[str, object]]:
    """Each adapter, open, then closed once the caller is done with it."""
    context = multiprocessing.get_context("fork" if FORK else "spawn")
    aq = asyncmp.Queue(context=context)
    async with aq:
        yield "AsyncQueue", aq
    aconn, worker_end = asyncmp.Pipe()
    with worker_end:
        async with aconn:
            yield "AsyncConnection", aconn
    async with asyncmp.open_worker(misuse_workers.noop, context=context) as worker:
        yield "Worker", worker
        yield "AsyncProcess", worker.process
    async with asyncmp.serve() as listener:
        yield "AsyncListener", listener


# ---------------------------------------------------------------------------------------
# Pickling an adapter
# ---------------------------------------------------------------------------------------


async def test_pickling_an_adapter_says_what_to_pass_instead() -> None:
    seen = []
    async for name, adapter in adapters():
        for dump in (pickle.dumps, multiprocessing.reduction.ForkingPickler.dumps):
            with pytest.raises(TypeError, match=rf"^an? {name} can't be pickled.*{INSTEAD[name]}"):
                dump(adapter)
        seen.append(name)
    assert seen == list(INSTEAD)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
async def test_handing_an_adapter_to_a_spawned_child_says_what_to_pass_instead(
    method: str,
) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    context = cast("MPContext", multiprocessing.get_context(method))
    async for name, adapter in adapters():
        process = context.Process(target=misuse_workers.noop, args=(adapter,))
        with pytest.raises(TypeError, match=rf"^an? {name} can't be pickled.*{INSTEAD[name]}"):
            process.start()
        assert process.pid is None  # nothing was started


# ---------------------------------------------------------------------------------------
# A forked child's inherited AsyncConnection
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not FORK, reason="no fork start method here")
async def test_a_forked_child_using_an_inherited_connection_learns_why_it_is_closed() -> None:
    context = multiprocessing.get_context("fork")
    aconn, worker_end = asyncmp.Pipe()
    report_in, report_out = context.Pipe(duplex=False)
    with worker_end:
        async with aconn, AsyncConnection(report_in) as report:
            async with asyncmp.open_process(
                misuse_workers.report_inherited_connection, aconn, report_out, context=context
            ):
                report_out.close()
                with anyio.fail_after(20):
                    kind, message = await report.recv()
    assert kind == "ClosedResourceError"
    assert "inherited by a forked child" in message
    assert "plain multiprocessing Connection" in message
    assert "other end" in message


async def test_a_connection_closed_here_says_so_and_nothing_of_fork() -> None:
    aconn, worker_end = asyncmp.Pipe()
    with worker_end:
        await aconn.aclose()
        calls: list[Callable[[], object]] = [aconn.recv_nowait, aconn.fileno]
        for call in calls:
            with pytest.raises(anyio.ClosedResourceError, match="was closed") as info:
                call()
            assert "fork" not in str(info.value)
        with pytest.raises(anyio.ClosedResourceError, match="was closed"):
            await aconn.send("x")
        with pytest.raises(anyio.ClosedResourceError, match="was closed"):
            await aconn.recv()


# ---------------------------------------------------------------------------------------
# The wrong kind of object, at construction
# ---------------------------------------------------------------------------------------


async def test_async_queue_refuses_what_is_no_queue() -> None:
    a, b = multiprocessing.Pipe()
    with a, b:
        wrong: object
        for wrong in ([1, 2], {"get": 1}, a, asyncio.Queue[int](), None):
            with pytest.raises(TypeError, match=r"^AsyncQueue wraps a multiprocessing Queue"):
                AsyncQueue(wrong)
    with pytest.raises(TypeError, match=r"use AsyncConnection"):
        AsyncQueue(a)
    async with asyncmp.Queue() as aq:
        with pytest.raises(TypeError, match=r"already an AsyncQueue"):
            AsyncQueue(aq)


async def test_async_queue_still_takes_a_manager_queue_and_a_thread_queue() -> None:
    with multiprocessing.get_context("fork" if FORK else "spawn").Manager() as manager:
        async with AsyncQueue[Any](manager.Queue()) as aq:
            assert aq.uses_threads
            await aq.put("through the manager")
            with anyio.fail_after(10):
                assert await aq.get() == "through the manager"
    async with AsyncQueue[Any](queue.Queue()) as aq:
        await aq.put(1)
        with anyio.fail_after(10):
            assert await aq.get() == 1


async def test_async_connection_refuses_what_is_no_connection() -> None:
    q: multiprocessing.Queue[Any] = multiprocessing.Queue()
    s1, s2 = socket.socketpair()
    try:
        wrong: Any
        for wrong in (q, s1, [1], None):
            with pytest.raises(
                TypeError, match=r"^AsyncConnection wraps a multiprocessing Connection"
            ):
                AsyncConnection(wrong)
        with pytest.raises(TypeError, match=r"use AsyncQueue"):
            AsyncConnection(cast(Any, q))
    finally:
        q.close()
        q.join_thread()
        s1.close()
        s2.close()
    aconn, worker_end = asyncmp.Pipe()
    with worker_end:
        async with aconn:
            with pytest.raises(TypeError, match=r"already an AsyncConnection"):
                AsyncConnection(aconn)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# A pool, a worker or a process used outside its block; a map awaited
# ---------------------------------------------------------------------------------------

#: Each opener, the name its block binds, and public names of what it yields.
OPENERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "open_pool": ("pool", ("run", "map", "statistics", "processes", "max_tasks_per_child")),
    "open_worker": ("worker", ("send", "recv", "recv_nowait", "process", "connection")),
    "open_process": ("process", ("pid", "wait", "stop", "exitcode", "kill")),
}


def unentered(opener: str) -> Any:
    """What calling *opener* returns, not entered: no process is started by it."""
    if opener == "open_pool":
        return asyncmp.open_pool(1)
    if opener == "open_worker":
        return asyncmp.open_worker(misuse_workers.noop)
    return asyncmp.open_process(misuse_workers.noop)


@pytest.mark.parametrize("opener", list(OPENERS))
async def test_an_opener_used_without_async_with_says_to_use_it(opener: str) -> None:
    var, names = OPENERS[opener]
    fix = rf"async with asyncmp\.{opener}\(\.\.\.\) as {var}:"
    manager = unentered(opener)
    for name in names:
        with pytest.raises(AttributeError, match=rf"^asyncmp\.{opener}\(\) returns .*{fix}"):
            getattr(manager, name)
        assert not hasattr(manager, name)
    with pytest.raises(TypeError, match=rf"^asyncmp\.{opener}\(\) .*{fix}"):
        await manager
    with pytest.raises(AttributeError, match=r"no_such_name") as info:
        manager.no_such_name  # noqa: B018
    assert "async with" not in str(info.value)  # only names of the block's object get the hint
    # The manager itself is untouched: entering it works.
    async with manager as entered:
        assert getattr(entered, names[0]) is not None


async def test_awaiting_a_pool_map_says_to_iterate_with_async_for() -> None:
    async with asyncmp.open_pool(1) as pool:
        results = pool.map(abs, [-1, -2])
        with pytest.raises(TypeError, match=r"^pool\.map\(\) .*async for"):
            await results  # type: ignore[misc]
        async with results:
            assert [y async for y in results] == [1, 2]  # and the map is still whole


async def test_an_async_function_given_to_a_pool_says_how_to_run_it() -> None:
    fix = r"def fetch_sync\(x\): return asyncio\.run\(fetch\(x\)\)"
    async with asyncmp.open_pool(1) as pool:
        with pytest.raises(
            TypeError, match=rf"^pool\.run\(\) and pool\.map\(\) call plain .*{fix}"
        ):
            _ = await pool.run(misuse_workers.fetch, 1)
        with pytest.raises(TypeError, match=rf"fetch is an async function.*{fix}"):
            async for _ in pool.map(misuse_workers.fetch, [1, 2]):
                pass
        assert pool.statistics().calls_done == 0  # nothing was sent


@pytest.mark.parametrize("kind", ["partial", "callable-object"])
async def test_an_async_function_behind_a_partial_or_call_is_refused_too(kind: str) -> None:
    fn: Any = (
        functools.partial(misuse_workers.fetch)
        if kind == "partial"
        else misuse_workers.AsyncFetcher()
    )
    name = "fetch" if kind == "partial" else "AsyncFetcher"
    async with asyncmp.open_pool(1) as pool:
        for _ in range(2):  # the second time too (nothing is cached for these)
            with pytest.raises(TypeError, match=rf"{name} is an async function"):
                _ = await pool.run(fn, 1)
        with pytest.raises(TypeError, match=rf"{name} is an async function"):
            async for _ in pool.map(fn, [1, 2]):
                pass
        assert pool.statistics().calls_done == 0  # nothing was sent


async def test_recv_nowait_on_an_empty_pipe_says_what_to_await_instead() -> None:
    aconn, worker_end = asyncmp.Pipe()
    with worker_end:
        async with aconn:
            with pytest.raises(anyio.WouldBlock, match=r"no whole message .*await recv\(\)"):
                aconn.recv_nowait()
            os.write(worker_end.fileno(), b"\x00\x00")  # half a frame header: no message yet
            with pytest.raises(anyio.WouldBlock, match=r"no whole message"):
                aconn.recv_nowait()


async def test_recv_nowait_while_another_task_receives_says_so() -> None:
    aconn, worker_end = asyncmp.Pipe()
    with worker_end:
        async with aconn, anyio.create_task_group() as tg:
            tg.start_soon(aconn.recv)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(anyio.WouldBlock, match=r"another task is receiving"):
                aconn.recv_nowait()
            tg.cancel_scope.cancel()
