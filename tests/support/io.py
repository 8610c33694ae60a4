"""Raw framing, kernel buffer probes, waiting without sleeps, and fault hooks.

What a test that plays a peer byte by byte needs: the stdlib's framing, how many bytes wait in
a kernel buffer, a writer thread that can be joined, a hook that fires right after the
readiness wait of a receive or get, a descriptor number taken over by a new file, and the
checks that show a fault landed where the case says it did.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

if sys.platform != "win32":
    import fcntl
    import termios

    from asyncmp._core.readiness import ReadinessWaiter

__all__ = (
    "KiB",
    "MiB",
    "Writer",
    "after_await",
    "after_readiness",
    "buffered",
    "frame",
    "nonblocking",
    "patched",
    "reader_lock_is_held",
    "settle",
    "take_over_fd",
    "wait_for_event",
    "wait_until",
    "write_all",
)

KiB = 1 << 10
MiB = 1 << 20


def frame(payload: bytes) -> bytes:
    """The stdlib's framing of one payload below 2 GiB: big-endian signed 32-bit length."""
    return struct.pack("!i", len(payload)) + payload


def buffered(fd: int) -> int:
    """Bytes waiting to be read on a pipe or socket (``FIONREAD``)."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count, True)
    return count[0]


def nonblocking(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def reader_lock_is_held(q: Any) -> bool:
    """True if somebody holds the queue's reader lock (it is free again afterwards)."""
    if q._rlock.acquire(False):
        q._rlock.release()
        return False
    return True


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def wait_until(
    predicate: Callable[[], bool], what: str | Callable[[], str], timeout: float = 10.0
) -> None:
    """Poll *predicate* until it holds: a condition that another thread or process makes
    true and that no event announces (bytes in a pipe, a lock's state, a thread's end; for
    an Event use :func:`wait_for_event`). The timeout is a "no hang" bound, never part of
    what is tested. *what* may be a call, to say on failure what the state was then."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            said = what if isinstance(what, str) else what()
            pytest.fail(f"timed out after {timeout} s waiting until {said}")
        await anyio.sleep(0.001)


async def wait_for_event(event: Any, what: str, timeout: float = 10.0) -> None:
    """Wait for a ``multiprocessing`` (or ``threading``) Event, blocked on it in a thread:
    no polling. The timeout is a "no hang" bound."""
    if not await anyio.to_thread.run_sync(event.wait, timeout):
        pytest.fail(f"timed out after {timeout} s waiting until {what}")


async def settle(timeout: float = 10.0) -> None:
    """Return once every other task waits on something: ``anyio.wait_all_tasks_blocked()``
    without the 0.1 s naps that anyio's asyncio version takes whenever a task is still
    runnable (which add up over many Hypothesis examples)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio's version is exact and quick
        await anyio.wait_all_tasks_blocked()
        return
    this = asyncio.current_task()
    deadline = time.monotonic() + timeout

    def blocked(task: asyncio.Task[Any]) -> bool:
        waiter = getattr(task, "_fut_waiter", None)
        return task is this or (waiter is not None and not waiter.done())

    while True:
        await anyio.lowlevel.checkpoint()
        if all(blocked(task) for task in asyncio.all_tasks()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"tasks still runnable after {timeout} s")


class Writer(threading.Thread):
    """Writes *data* to *fd* with blocking ``os.write``: a peer whose writes may not fit in
    the kernel buffer at once. A reader that went away ends it quietly."""

    def __init__(self, fd: int, data: bytes) -> None:
        super().__init__(name="test-writer", daemon=True)
        self.fd = fd
        self.data = data
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            write_all(self.fd, self.data)
        except OSError as exc:
            self.error = exc

    def finish(self, timeout: float = 10.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"the writer still blocks after {timeout} s"


@contextlib.contextmanager
def patched(obj: object, name: str, value: object) -> Iterator[None]:
    """Set ``obj.name`` for the body (Hypothesis examples can't use ``monkeypatch``)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def after_await(
    cls: type[Any],
    name: str,
    fault: Callable[[], Awaitable[None]],
    match: Callable[[Any], bool] = lambda obj: True,
) -> Iterator[list[object]]:
    """Run *fault* once, in the awaiting task, right after ``await obj.name()`` returned for
    an instance of *cls* that *match* accepts, before the caller's code goes on.

    A fault injected there lands exactly between two steps of asyncmp that no checkpoint
    separates, whatever order the event loop would wake tasks in. Yields a list that holds
    the instance once the fault has fired.
    """
    original = getattr(cls, name)
    fired: list[object] = []

    async def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = await original(self, *args, **kwargs)
        if not fired and match(self):
            fired.append(self)
            await fault()
        return result

    setattr(cls, name, hooked)
    try:
        yield fired
    finally:
        setattr(cls, name, original)


def after_readiness(
    fault: Callable[[], Awaitable[None]],
) -> contextlib.AbstractContextManager[list[object]]:
    """Run *fault* once, in the task that waited, right after its next readiness wait on
    the descriptor route returned and before it reads anything.

    The asyncmp code between the wait and the read has no checkpoint, so this is where a
    cancellation delivered together with the wake-up lands (asyncio throws it into the
    task at the wake-up), and where a ``close()`` from a callback run in the same loop turn
    would strike.
    """
    return after_await(ReadinessWaiter, "wait", fault)


@contextlib.contextmanager
def take_over_fd(number: int, payload: bytes) -> Iterator[int]:
    """Make descriptor *number* (just closed by the code under test) refer to a new pipe
    holding *payload*, as the next ``open()`` in any thread could; yields the pipe's write
    end. ``buffered(number)`` then tells whether anybody read from the newcomer."""
    try:
        os.fstat(number)
    except OSError:
        pass
    else:
        raise AssertionError(f"descriptor {number} is still open: nothing released it")
    r, w = os.pipe()  # the lowest free numbers: r may well be *number* already
    if r != number:
        os.dup2(r, number, inheritable=False)
        os.close(r)
    try:
        write_all(w, payload)
        yield w
    finally:
        os.close(number)
        os.close(w)
