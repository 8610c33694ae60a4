"""Queues and the child processes around them: fresh queues with their adapters, children
that are always reaped, and probes of asyncmp's threads.

The other side of a queue is plain synchronous code in a child process (targets in
``tests/support/queue_workers.py`` and ``tests/faults/fault_workers.py``), started with ``fork``
unless the start method matters.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import struct
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing.process import BaseProcess
from typing import Any

import anyio

import asyncmp
from asyncmp import AsyncQueue

from .io import KiB, MiB

__all__ = (
    "FORK",
    "asyncmp_threads",
    "backend_of",
    "big_frame",
    "child",
    "header",
    "join_process",
    "make_queue",
    "new_os_threads",
    "open_queue",
    "os_threads",
    "outcome",
    "release_pipe",
)

FORK: Any = multiprocessing.get_context("fork") if sys.platform != "win32" else None


def make_queue(kind: str = "Queue", ctx: Any = None, maxsize: int = 0) -> Any:
    factory = getattr(ctx if ctx is not None else FORK, kind)
    return factory() if kind == "SimpleQueue" else factory(maxsize)


def release_pipe(q: Any) -> None:
    """Close the queue's pipe in this process (the adapter's aclose() may have already)."""
    q._reader.close()
    q._writer.close()


@contextlib.asynccontextmanager
async def open_queue(
    kind: str = "Queue",
    *,
    use_threads: bool,
    maxsize: int = 0,
    ctx: Any = None,
    stall_timeout: float = asyncmp.DEFAULT_STALL_TIMEOUT,
) -> AsyncIterator[AsyncQueue[Any]]:
    """A fresh queue and its adapter; the adapter is closed and the pipe released on exit."""
    q = make_queue(kind, ctx, maxsize)
    try:
        async with AsyncQueue[Any](q, use_threads=use_threads, stall_timeout=stall_timeout) as aq:
            yield aq
    finally:
        release_pipe(q)


async def join_process(proc: BaseProcess, timeout: float = 30.0) -> None:
    """Wait for *proc* to exit without blocking the loop; kill it if it doesn't in time."""
    try:
        with anyio.fail_after(timeout):
            await anyio.wait_readable(proc.sentinel)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


@contextlib.asynccontextmanager
async def child(target: Callable[..., object], *args: Any, ctx: Any = None) -> AsyncIterator[Any]:
    """Run *target* in a child process; on exit wait for it (bounded), or kill it if the
    body failed. The test checks ``exitcode`` afterwards."""
    proc = (ctx if ctx is not None else FORK).Process(
        target=target, args=args, name=f"test-{target.__name__}", daemon=True
    )
    proc.start()
    finished = False
    try:
        yield proc
        finished = True
    finally:
        if finished:
            await join_process(proc)
        else:
            proc.kill()
            proc.join()


def header(size: int) -> bytes:
    """The stdlib's frame header: big-endian signed 32-bit length."""
    return struct.pack("!i", size)


def big_frame(size: int = MiB + 4 * KiB) -> tuple[bytes, object]:
    """A whole frame of a pickled ``bytes`` item of *size* bytes, and the item."""
    item = b"p" * size
    payload = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
    return header(len(payload)) + payload, item


def asyncmp_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("asyncmp")]


def os_threads() -> dict[int, str] | None:
    """Threads of this process as the OS counts them, foreign (non-Python) ones included:
    thread id -> name. None without procfs."""
    try:
        tids = os.listdir("/proc/self/task")
    except FileNotFoundError:  # no procfs
        return None
    threads = {}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                threads[int(tid)] = comm.read().strip()
        except FileNotFoundError:  # it ended between the listing and now
            pass
    return threads


def new_os_threads(before: dict[int, str] | None) -> dict[int, str]:
    """The OS threads of this process that were not there *before* (see
    :func:`os_threads`): thread id -> name. Empty without procfs."""
    if before is None:
        return {}
    return {tid: name for tid, name in (os_threads() or {}).items() if tid not in before}


def backend_of(anyio_backend: object) -> tuple[str, bool]:
    """(backend name, whether it runs on uvloop) of the ``anyio_backend`` fixture's value."""
    if isinstance(anyio_backend, tuple):
        return str(anyio_backend[0]), bool(anyio_backend[1])
    return str(anyio_backend), False


async def outcome(fn: Callable[[], Awaitable[object]]) -> str:
    """Await *fn()*; return ``"returned"`` or the name of the exception it raised."""
    try:
        await fn()
    except Exception as exc:
        return type(exc).__name__
    return "returned"
