"""The contenders: each one receives the same messages its own way and times itself.

Every consumer takes the parent's end of a data connection and a message count. It
receives the first message untimed (the worker's wake-up and any first-use costs land
there) and returns the seconds the remaining ``n`` took, measured with
``time.perf_counter`` around the receiving loop only: creating an event loop or a
wrapper is outside the timed part. They also return the CPU time this process spent
meanwhile (``time.process_time``, every thread of it), which a busy machine disturbs
less than the wall clock.

The asyncmp consumers wrap a ``dup`` of the descriptor, so closing the
AsyncConnection at the end of a trial leaves the shared connection open for the next
contender.
"""

from __future__ import annotations

import asyncio
import importlib.util
import mmap
import multiprocessing.connection
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from time import perf_counter, process_time
from typing import Any

import anyio
import anyio.to_thread

import asyncmp
from asyncmp import AsyncConnection, AsyncQueue, open_pool

__all__ = (
    "BACKENDS",
    "DEFAULT_IMPLS",
    "Consumer",
    "Contender",
    "Impl",
    "Timing",
    "check",
    "large_contenders",
    "load_candidate",
    "on",
    "pingpong_contenders",
    "run_on",
    "since",
    "small_contenders",
    "start_timing",
    "time_awaits",
    "time_calls",
)

Connection = multiprocessing.connection.Connection

BACKENDS = ("asyncio", "uvloop", "trio")

#: (wall-clock seconds, CPU seconds of this process, all its threads included)
Timing = tuple[float, float]
#: A consumer: (data source, messages to time, extra argument) -> its timing. The source
#: is the parent's end of a connection here, the benchmark's queues in ``_queues``.
Consumer = Callable[[Any, int, Any], Timing]


def start_timing() -> Timing:
    return perf_counter(), process_time()


def since(start: Timing) -> Timing:
    return perf_counter() - start[0], process_time() - start[1]


def time_calls(n: int, fn: Callable[..., Any], *args: Any) -> tuple[Timing, Any]:
    """Call ``fn(*args)`` once untimed (first-use costs land there), then *n* times timed:
    the timing, and what the last call returned."""
    fn(*args)
    t0 = start_timing()
    for _ in range(n - 1):
        fn(*args)
    last = fn(*args)
    return since(t0), last


async def time_awaits(n: int, fn: Callable[..., Awaitable[Any]], *args: Any) -> tuple[Timing, Any]:
    """:func:`time_calls`, awaiting each call."""
    await fn(*args)
    t0 = start_timing()
    for _ in range(n - 1):
        await fn(*args)
    last = await fn(*args)
    return since(t0), last


@dataclass(frozen=True)
class Contender:
    key: str  #: unique id, used in the JSON
    label: str  #: what the tables show
    backend: str | None  #: event loop, or None for the no-loop baselines
    consume: Consumer
    family: str  #: "asyncmp", "sync", "thread" or "raw"


@dataclass(frozen=True)
class Impl:
    """An asyncmp to measure: the one installed (tag "") or a candidate copy."""

    tag: str
    cls: type[Any]  #: its AsyncConnection
    queue_cls: type[Any] | None = None  #: its AsyncQueue, if it has one
    open_pool: Any = None  #: its open_pool, if it has one
    package: Path | None = None  #: its package directory, for a fresh interpreter to import

    @property
    def name(self) -> str:
        return f"asyncmp:{self.tag}" if self.tag else "asyncmp"

    @property
    def family(self) -> str:
        """Its rows' family: "asyncmp", or "candidate" for a copy measured beside it."""
        return "candidate" if self.tag else "asyncmp"


DEFAULT_IMPLS = (
    Impl("", AsyncConnection, AsyncQueue, open_pool, Path(asyncmp.__file__).resolve().parent),
)


def load_candidate(tag: str, path: Path) -> Impl:
    """Import a copy of asyncmp from *path* (a ``src`` directory holding ``asyncmp/``,
    or the package directory itself) under a private name, to run beside the installed
    one: a proposed change measured side by side, in the same run."""
    pkg = path / "asyncmp" if (path / "asyncmp" / "__init__.py").is_file() else path
    init = pkg / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"no asyncmp package at {path}")
    name = f"_asyncmp_candidate_{tag.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(pkg)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return Impl(
        tag,
        module.AsyncConnection,
        getattr(module, "AsyncQueue", None),
        getattr(module, "open_pool", None),
        pkg.resolve(),
    )


def _asyncmp(
    impls: tuple[Impl, ...],
    backends: tuple[str, ...],
    what: str,
    fn: Callable[..., Awaitable[Timing]],
    variant: str = "",
) -> list[Contender]:
    infix = f"-{variant}" if variant else ""
    return [
        Contender(
            f"{impl.name}{infix}-{b}",
            f"{impl.name} {what} [{b}]",
            b,
            on(b, partial(fn, impl.cls)),
            impl.family,
        )
        for b in backends
        for impl in impls
    ]


def run_on(backend: str, fn: Callable[..., Awaitable[Timing]], *args: Any) -> Timing:
    if backend == "uvloop":
        import uvloop

        return anyio.run(
            fn, *args, backend="asyncio", backend_options={"loop_factory": uvloop.new_event_loop}
        )
    return anyio.run(fn, *args, backend=backend)


def _dup(conn: Connection) -> Connection:
    return Connection(os.dup(conn.fileno()), readable=conn.readable, writable=conn.writable)


def check(got: object, expected: object) -> None:
    if got != expected:
        raise AssertionError(f"received {got!r:.80}, expected {expected!r:.80}")


# ---------------------------------------------------------------------------------------
# 1. Small messages: recv() of ~100-byte pickles
# ---------------------------------------------------------------------------------------


def _sync_small(conn: Connection, n: int, expected: object) -> Timing:
    elapsed, last = time_calls(n, conn.recv)
    check(last, expected)
    return elapsed


async def _asyncmp_small(cls: type[Any], conn: Connection, n: int, expected: object) -> Timing:
    async with cls(_dup(conn)) as aconn:
        elapsed, last = await time_awaits(n, aconn.recv)
    check(last, expected)
    return elapsed


async def _executor_small(conn: Connection, n: int, expected: object) -> Timing:
    loop = asyncio.get_running_loop()
    elapsed, last = await time_awaits(n, loop.run_in_executor, None, conn.recv)
    check(last, expected)
    return elapsed


async def _to_thread_small(conn: Connection, n: int, expected: object) -> Timing:
    elapsed, last = await time_awaits(n, anyio.to_thread.run_sync, conn.recv)
    check(last, expected)
    return elapsed


async def _aioprocessing_small(conn: Connection, n: int, expected: object) -> Timing:
    from aioprocessing.connection import AioConnection  # type: ignore[import-untyped]

    aconn: Any = AioConnection(conn)
    try:
        elapsed, last = await time_awaits(n, aconn.coro_recv)
    finally:
        executor = getattr(aconn, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
    check(last, expected)
    return elapsed


def on(backend: str, fn: Callable[..., Awaitable[Timing]]) -> Consumer:
    """A consumer that runs ``fn(source, n, arg)`` on *backend*'s event loop."""

    def consume(source: Any, n: int, arg: Any) -> Timing:
        return run_on(backend, fn, source, n, arg)

    return consume


def small_contenders(
    backends: tuple[str, ...], impls: tuple[Impl, ...] = DEFAULT_IMPLS
) -> list[Contender]:
    """Contenders for the small-message receive benchmark.

    The sync loop and ``run_in_executor`` are baselines and always run; the others
    run when their event loop is among *backends*.
    """
    found = [Contender("sync", "sync conn.recv() loop", None, _sync_small, "sync")]
    found += _asyncmp(impls, backends, "recv()", _asyncmp_small)
    found.append(
        Contender(
            "executor-asyncio",
            "run_in_executor(conn.recv) [asyncio]",
            "asyncio",
            on("asyncio", _executor_small),
            "thread",
        )
    )
    found += [
        Contender(
            f"to_thread-{b}",
            f"anyio.to_thread.run_sync(conn.recv) [{b}]",
            b,
            on(b, _to_thread_small),
            "thread",
        )
        for b in ("asyncio", "trio")
        if b in backends
    ]
    if "asyncio" in backends:
        found.append(
            Contender(
                "aioprocessing-asyncio",
                "aioprocessing coro_recv() [asyncio]",
                "asyncio",
                on("asyncio", _aioprocessing_small),
                "thread",
            )
        )
    return found


# ---------------------------------------------------------------------------------------
# 2. Ping-pong: send one message, await the echo
# ---------------------------------------------------------------------------------------


def _sync_pingpong(conn: Connection, n: int, msg: object) -> Timing:
    send, recv = conn.send, conn.recv
    send(msg)
    recv()
    t0 = start_timing()
    for _ in range(n):
        send(msg)
        recv()
    elapsed = since(t0)
    return elapsed


async def _asyncmp_pingpong(cls: type[Any], conn: Connection, n: int, msg: object) -> Timing:
    async with cls(_dup(conn)) as aconn:
        send, recv = aconn.send, aconn.recv
        await send(msg)
        await recv()
        t0 = start_timing()
        for _ in range(n):
            await send(msg)
            await recv()
        elapsed = since(t0)
    return elapsed


def pingpong_contenders(
    backends: tuple[str, ...], impls: tuple[Impl, ...] = DEFAULT_IMPLS
) -> list[Contender]:
    found = [Contender("sync", "sync send()+recv()", None, _sync_pingpong, "sync")]
    return found + _asyncmp(impls, backends, "send()+recv()", _asyncmp_pingpong)


# ---------------------------------------------------------------------------------------
# 3. Large messages: recv_bytes() of 1 MiB .. 64 MiB, against a raw copy
# ---------------------------------------------------------------------------------------


def _sync_large(conn: Connection, n: int, size: int) -> Timing:
    elapsed, data = time_calls(n, conn.recv_bytes)
    check(len(data), size)
    return elapsed


async def _asyncmp_large(cls: type[Any], conn: Connection, n: int, size: int) -> Timing:
    async with cls(_dup(conn)) as aconn:
        elapsed, data = await time_awaits(n, aconn.recv_bytes)
    check(len(data), size)
    return elapsed


def read_exactly(fd: int, view: memoryview) -> None:
    """Fill *view* from *fd* with ``os.readv()``: the raw floor's reads."""
    pos, size = 0, len(view)
    while pos < size:
        got = os.readv(fd, [view[pos:]])
        if not got:
            raise EOFError("the worker closed the connection")
        pos += got


def _raw_large(conn: Connection, n: int, size: int) -> Timing:
    """The floor: the same bytes, unframed, read straight into a buffer allocated once."""
    fd = conn.fileno()
    view = memoryview(bytearray(size))
    return time_calls(n, read_exactly, fd, view)[0]


def _raw_fresh_large(conn: Connection, n: int, size: int) -> Timing:
    """The floor of a call that returns new memory: the same reads, each message into
    fresh pages (a private anonymous mapping, as the allocator hands out for a large
    ``bytes``; ``mmap``'s default, a shared one, is file-backed and slower), which the
    system zeroes on first touch, a page at a time."""
    fd = conn.fileno()

    def read_one() -> None:
        with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE) as fresh, memoryview(fresh) as view:
            read_exactly(fd, view)

    return time_calls(n, read_one)[0]


async def _asyncmp_large_into(cls: type[Any], conn: Connection, n: int, size: int) -> Timing:
    buffer = bytearray(size)
    async with cls(_dup(conn)) as aconn:
        elapsed, got = await time_awaits(n, aconn.recv_bytes_into, buffer)
    check(got, size)
    return elapsed


def large_contenders(
    backends: tuple[str, ...], impls: tuple[Impl, ...] = DEFAULT_IMPLS
) -> list[Contender]:
    found = [
        Contender("sync", "sync conn.recv_bytes()", None, _sync_large, "sync"),
        Contender("raw", "raw os.readv() into a preallocated buffer", None, _raw_large, "raw"),
        Contender(
            "raw-fresh", "raw os.readv() into fresh memory each time", None, _raw_fresh_large, "raw"
        ),
    ]
    into = tuple(impl for impl in impls if hasattr(impl.cls, "recv_bytes_into"))
    return (
        found
        + _asyncmp(impls, backends, "recv_bytes()", _asyncmp_large)
        + _asyncmp(into, backends, "recv_bytes_into() a reused buffer", _asyncmp_large_into, "into")
    )
