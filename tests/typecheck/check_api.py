"""What a type checker makes of asyncmp's public API, as a user's program sees it.

``nox -s typecheck`` runs mypy over this file (strict, so ``warn_unused_ignores`` is on):
an ``assert_type`` line fails if a type changes, and a line that must be an error carries
``# type: ignore[code]``, which fails as unused once the error is gone. The file is
checked, never run (pytest does not collect it).
"""

from __future__ import annotations

import multiprocessing
from contextlib import AbstractAsyncContextManager
from multiprocessing.connection import Connection
from typing import Any

from typing_extensions import assert_type

import asyncmp
from asyncmp import AsyncConnection, AsyncListener, AsyncProcess, AsyncQueue, Worker


def target(conn: Connection) -> None:
    conn.send(conn.recv())


async def connections() -> None:
    aconn, worker_end = asyncmp.Pipe()
    assert_type(aconn, AsyncConnection[Any])
    assert_type(worker_end, Connection)
    assert_type(await aconn.recv(), Any)

    a, b = multiprocessing.Pipe()
    # No type argument: Any, and no annotation asked for.
    plain = AsyncConnection(a)
    assert_type(plain, AsyncConnection[Any])
    assert_type(plain.connection, Connection)

    # A type argument: what recv() returns and what send() takes.
    ints: AsyncConnection[int] = AsyncConnection(b)
    assert_type(await ints.recv(), int)
    assert_type(await ints.receive(), int)
    assert_type(ints.recv_nowait(), int)
    assert_type(await ints.recv_bytes(), bytes)
    async for n in ints:
        assert_type(n, int)
    await ints.send(1)
    await ints.send("one")  # type: ignore[arg-type]
    await ints.send_bytes(b"raw")
    strs = AsyncConnection[str](a)
    assert_type(await strs.recv(), str)

    # The wrong kind of object.
    AsyncConnection(multiprocessing.Queue())  # type: ignore[arg-type]
    AsyncConnection(plain)  # type: ignore[arg-type]


async def remote() -> None:
    conn = await asyncmp.connect("/tmp/socket", authkey=b"secret")
    assert_type(conn, AsyncConnection[Any])
    async with asyncmp.serve(authkey=b"secret") as listener:
        assert_type(listener, AsyncListener)
        async for accepted in listener:
            assert_type(accepted, AsyncConnection[Any])


async def queues() -> None:
    # A factory's queue carries Any, and says what it carries once annotated.
    anything = asyncmp.Queue()
    assert_type(anything, AsyncQueue[Any])
    ints: AsyncQueue[int] = asyncmp.Queue()
    assert_type(await ints.get(), int)
    assert_type(await ints.get(timeout=1.0), int)
    assert_type(ints.get_nowait(), int)
    assert_type(await ints.get_many(10), list[int])
    await ints.put(1)
    ints.put_nowait(2)
    await ints.put("one")  # type: ignore[arg-type]
    ints.put_nowait(b"two")  # type: ignore[arg-type]
    assert_type(asyncmp.JoinableQueue(), AsyncQueue[Any])
    assert_type(asyncmp.SimpleQueue(), AsyncQueue[Any])

    # Wrapping a queue needs no type argument, and takes one.
    plain = AsyncQueue(multiprocessing.Queue())
    assert_type(plain, AsyncQueue[Any])
    strs = AsyncQueue[str](multiprocessing.Queue())
    assert_type(await strs.get(), str)


async def processes() -> None:
    # open_worker() and open_process() are async context managers, not coroutines.
    cm: AbstractAsyncContextManager[Worker[Any]] = asyncmp.open_worker(target)
    await asyncmp.open_worker(target)  # type: ignore[misc]
    asyncmp.open_worker(target).send  # type: ignore[attr-defined]  # noqa: B018
    async with cm as worker:
        assert_type(worker, Worker[Any])
        assert_type(worker.process, AsyncProcess)
        assert_type(worker.process.pid, int)
        assert_type(worker.connection, AsyncConnection[Any])
        assert_type(await worker.recv(), Any)

    # A Worker says what its pipe carries once annotated.
    ints: Worker[int]
    async with asyncmp.open_worker(target) as ints:
        assert_type(await ints.recv(), int)
        assert_type(ints.recv_nowait(), int)
        async for n in ints:
            assert_type(n, int)
        await ints.send(1)
        await ints.send("one")  # type: ignore[arg-type]

    async with asyncmp.open_process(print, "hello") as process:
        assert_type(process, AsyncProcess)
        assert_type(await process.wait(), int)
        assert_type(process.exitcode, int | None)
        assert_type(await process.stop(), int)


def scale(x: int, factor: float) -> float:
    return x * factor


def label(x: int) -> str:
    return str(x)


async def pools() -> None:
    cm: AbstractAsyncContextManager[asyncmp.Pool] = asyncmp.open_pool(2)
    async with cm as pool:
        # run() checks the arguments against fn and returns what fn returns.
        assert_type(await pool.run(scale, 2, 0.5), float)
        assert_type(await pool.run(label, 1, kill_on_cancel=True), str)
        await pool.run(scale, "2", 0.5)  # type: ignore[arg-type]
        await pool.run(label)  # type: ignore[arg-type]
        # map() is an async iterator of fn's results.
        assert_type(pool.map(label, range(3)), asyncmp.PoolMap[str])
        async with pool.map(label, range(3)) as results:
            await results.aclose()
        async for text in pool.map(label, [1, 2], ordered=False):
            assert_type(text, str)
        pool.map(label, ["one"])  # type: ignore[arg-type]
        assert_type(pool.statistics(), asyncmp.PoolStatistics)
        # A map is iterated, not awaited (that raises at run time too).
        await pool.map(label, range(3))  # type: ignore[misc]
    # open_pool() is entered, not awaited nor used as a pool (both raise at run time too).
    await asyncmp.open_pool(2)  # type: ignore[misc]
    asyncmp.open_pool(2).run  # type: ignore[attr-defined]  # noqa: B018


async def shared_memory() -> None:
    # shared() is typed as what it wraps, so typed channels take it.
    data = {"frame": bytearray(1024)}
    assert_type(asyncmp.shared(data), dict[str, bytearray])
    assert_type(asyncmp.SHARED_THRESHOLD, int)
    ints: AsyncConnection[int] = AsyncConnection(multiprocessing.Pipe()[0])
    await ints.send(asyncmp.shared(1))
    await ints.send(asyncmp.shared("one"))  # type: ignore[arg-type]
    error: asyncmp.AsyncmpError = asyncmp.SharedMemoryError("gone")
    assert isinstance(error, asyncmp.AsyncmpError)
