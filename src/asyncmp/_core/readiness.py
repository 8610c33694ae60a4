"""Wait for readiness without touching the flags of a descriptor asyncmp was handed.

The invariant of asyncmp's descriptor I/O: **asyncmp never changes the flags of a
descriptor it was handed.** (``_core.transport`` keeps it when moving bytes.)

``O_NONBLOCK`` is not a property of a file descriptor but of the *open file
description* behind it, and every process that inherited or was sent the descriptor
shares that description. A ``multiprocessing.Pipe`` or ``Queue`` pipe is shared with
worker processes by design. If we set ``O_NONBLOCK`` on our end, a worker doing a plain
blocking ``conn.recv()`` or ``q.get()`` on its copy suddenly gets ``BlockingIOError``.
The usual ways of making a descriptor "async" do exactly that: uvloop's ``add_reader``
(through libuv's ``uv_poll_init``) sets the flag and never restores it.

So we never hand the shared descriptor to the event loop. :class:`ReadinessWaiter`
registers it in a private epoll (Linux) or kqueue (macOS, BSD) instance and lets the
event loop watch *that* descriptor instead. An epoll or kqueue descriptor is readable
while any descriptor registered in it is ready, and registering a descriptor changes none
of its flags. Whatever the loop does to the helper descriptor (uvloop sets
``O_NONBLOCK`` on it) harms nobody: it is ours alone and never leaves this process (a
forked child closes it at once: see ``_core.atfork``).

A thread waits with :func:`poller` instead (a ``select.poll`` object watching one
direction), which a zero-timeout call also turns into a question: is it ready now?
"""

from __future__ import annotations

import asyncio
import errno
import functools
import select
import sys
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import anyio

from .atfork import register_fork_owned
from .loop import is_selector_loop, running_asyncio_loop, wait_readable_elsewhere

__all__ = ("KQUEUE", "KqueueAPI", "Poller", "ReadinessWaiter", "poller")


class _Kqueue(Protocol):
    """The part of a ``select.kqueue`` object the helper uses."""

    def control(
        self, changelist: Iterable[Any] | None, maxevents: int, timeout: float | None = None, /
    ) -> list[Any]: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


class KqueueAPI(Protocol):
    """The part of the ``select`` module the kqueue helper uses.

    It is ``select`` itself where the platform has kqueue (macOS, the BSDs); the test suite
    hands in a stand-in to run the kqueue helper on Linux.
    """

    KQ_FILTER_READ: int
    KQ_FILTER_WRITE: int
    KQ_EV_ADD: int

    def kqueue(self) -> _Kqueue: ...
    def kevent(self, ident: int, filter: int = ..., flags: int = ...) -> Any: ...


#: Where kqueue and kevent come from; None where the platform has no kqueue (Linux uses
#: epoll). The helper reads it at each call, so tests can set it.
KQUEUE: KqueueAPI | None
if sys.platform != "linux" and sys.platform != "win32":
    KQUEUE = select if hasattr(select, "kqueue") else None
else:
    KQUEUE = None


def _open_kqueue(api: KqueueAPI, fd: int, writable: bool) -> tuple[_Kqueue, int]:
    """A kqueue with *fd* registered for one direction, level-triggered (no EV_CLEAR,
    no EV_ONESHOT): it stays readable for as long as *fd* is ready."""
    kq = api.kqueue()
    try:
        kfilter = api.KQ_FILTER_WRITE if writable else api.KQ_FILTER_READ
        kq.control([api.kevent(fd, kfilter, api.KQ_EV_ADD)], 0, 0)
    except BaseException:
        kq.close()
        raise
    return kq, kq.fileno()


def _open_helper(fd: int, writable: bool) -> tuple[Any, int]:
    """Return an epoll or kqueue object watching *fd*, and the descriptor to give the loop."""
    kqueue_api = KQUEUE
    if kqueue_api is not None:
        return _open_kqueue(kqueue_api, fd, writable)
    if sys.platform == "linux":
        ep = select.epoll()
        try:
            ep.register(fd, select.EPOLLOUT if writable else select.EPOLLIN)
        except BaseException:
            ep.close()
            raise
        return ep, ep.fileno()
    else:  # an else, not a fall-through: type checkers then skip it on Linux
        # No epoll or kqueue: the loop watches the descriptor itself. Flag-safe on trio
        # and asyncio's selector loops; not under uvloop.
        return None, fd  # pragma: no cover


def _zero_timeout_poll(helper: Any) -> Callable[[], object]:
    """A call that polls *helper* (an epoll or kqueue object, or None) without waiting:
    truthy if its target is ready now. Without a helper: always (nothing to ask)."""
    if helper is None:  # pragma: no cover - a platform with neither epoll nor kqueue
        return lambda: True
    if hasattr(helper, "poll"):  # epoll
        return functools.partial(helper.poll, 0)
    return functools.partial(helper.control, None, 1, 0)  # kqueue


class ReadinessWaiter:
    """Wait until a descriptor is readable (or writable) without touching its flags.

    The event loop is handed a private epoll or kqueue descriptor in which the target is
    registered; see the module docstring for why. One waiter serves one direction, so a
    reader is never woken because the descriptor became writable. One task waits at a
    time; a second one gets ``anyio.BusyResourceError``.

    On an asyncio loop (uvloop included) the helper stays registered with the loop from
    one wait to the next: registering and unregistering per wait costs two ``epoll_ctl``
    calls and, under uvloop, an ``ioctl`` besides (it sets ``O_NONBLOCK`` on the helper
    every time). The loop's watch is level-triggered, so while nobody waits the callback
    unregisters the helper the first time it fires, instead of firing in every turn.

    An asyncio selector loop polls, then runs the callbacks queued before the poll (a
    task's step among them), then the poll's callbacks. So a task can read what a poll
    saw and begin to wait again before that poll's callback runs: after a wake-up (the
    next turn's poll saw the bytes the woken task is about to read), or after any other
    turn the task took between two reads. That readiness is stale, and waking the task
    for it would have it find nothing (which a queue takes for another consumer's
    doing). So on a selector loop the callback asks the helper again (a zero-timeout
    poll, one system call) before it wakes anyone; a readiness that is not there now is
    ignored, which is always safe: the helper stays registered, and the watch is
    level-triggered, so the next poll reports a new one. uvloop runs a watch's callback
    from the poll itself, after the tasks, and needs no such care.

    On trio, and anywhere else, each wait goes through the library's own call.
    """

    __slots__ = (
        "__weakref__",
        "_add",
        "_closed",
        "_elsewhere",
        "_fut",
        "_helper",
        "_helper_fd",
        "_loop",
        "_probe",
        "_registered",
        "_remove",
        "_selector_loop",
        "_writable",
    )

    def __init__(self, fd: int, *, writable: bool = False) -> None:
        self._closed = False
        self._writable = writable
        self._helper, self._helper_fd = _open_helper(fd, writable)
        self._probe = _zero_timeout_poll(self._helper)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._add: Any = None
        self._remove: Any = None
        self._registered = False
        self._selector_loop = False
        self._fut: asyncio.Future[None] | None = None
        self._elsewhere = False
        register_fork_owned(self)

    def fileno(self) -> int:
        return self._helper_fd

    async def wait(self) -> None:
        """Return once the target is ready.

        If cancelled, nothing happened. :raises anyio.ClosedResourceError: if
        :meth:`close` was called, before or during the wait.
        :raises anyio.BusyResourceError: another task is waiting on this waiter.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        loop = running_asyncio_loop()
        if loop is not self._loop:
            self._attach(loop)
        if self._add is None:
            await self._wait_elsewhere()
            return
        if self._fut is not None:
            raise anyio.BusyResourceError("writing to" if self._writable else "reading from")
        assert loop is not None
        fut: asyncio.Future[None] = loop.create_future()
        if not self._registered:
            try:
                self._add(self._helper_fd, self._on_ready)
            except NotImplementedError:  # pragma: no cover - e.g. a proactor loop
                self._add = None
                await self._wait_elsewhere()
                return
            self._registered = True
        self._fut = fut
        try:
            await fut
        finally:
            if self._fut is fut:
                self._fut = None
        if self._closed:
            raise anyio.ClosedResourceError

    def _attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Watch through *loop* from now on (no loop: the async library's own call)."""
        self._unregister()
        self._loop = loop
        if loop is None:
            self._add = self._remove = None
        else:
            # The helper is readable while the target is ready, in either direction.
            self._add, self._remove = loop.add_reader, loop.remove_reader
        self._selector_loop = is_selector_loop(loop)

    def _on_ready(self) -> None:
        fut = self._fut
        if fut is None:
            # Nobody waits: stop watching, or the loop calls this in every turn while
            # the target stays ready. The next wait registers again.
            self._unregister()
            return
        if self._selector_loop and not self._probe():
            return  # seen by a poll before the waiting task read it: stale
        self._fut = None
        if not fut.done():
            fut.set_result(None)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            try:
                self._remove(self._helper_fd)
            except RuntimeError:  # pragma: no cover - the loop was closed
                pass

    async def _wait_elsewhere(self) -> None:
        self._elsewhere = True
        await wait_readable_elsewhere(
            self._helper_fd, "writing to" if self._writable else "reading from"
        )

    def close(self) -> None:
        """Wake every task in :meth:`wait` with ``ClosedResourceError``, then close.

        It works outside an event loop too (before one started, or after it ended): no
        task can be waiting then, and the helper descriptor is closed all the same.
        """
        if self._closed:
            return
        self._closed = True
        try:
            fut = self._fut
            self._fut = None
            if fut is not None and not fut.done():
                fut.set_result(None)
            self._unregister()
            if self._elsewhere:
                try:
                    anyio.notify_closing(self._helper_fd)
                except RuntimeError:
                    # No event loop runs here (anyio's NoEventLoopError, or sniffio's
                    # error on older anyio): nobody can be waiting on the descriptor.
                    pass
        finally:
            if self._helper is not None:
                self._helper.close()

    def _forget_in_forked_child(self) -> None:
        self._closed = True
        self._registered = False
        self._fut = None
        if self._helper is not None:
            self._helper.close()


class Poller(Protocol):
    """What a thread waits with: the ``poll`` of a ``select.poll`` object (:func:`poller`)."""

    def poll(self, timeout: float | None = None, /) -> list[tuple[int, int]]: ...


def poller(fd: int, *, writable: bool) -> Poller:
    """A ``select.poll`` object watching *fd* for one direction (POSIX only)."""
    if sys.platform != "win32":
        p = select.poll()
        p.register(fd, select.POLLOUT if writable else select.POLLIN)
        return p
    raise OSError(errno.ENOTSUP, "poll() needs POSIX")  # pragma: no cover
