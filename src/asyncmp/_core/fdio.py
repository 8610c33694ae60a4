"""POSIX I/O: wait for readiness and move bytes without blocking the loop.

The invariant: **asyncmp never changes the flags of a descriptor it was handed.**

``O_NONBLOCK`` is not a property of a file descriptor but of the *open file
description* behind it, and every process that inherited or was sent the descriptor
shares that description. A ``multiprocessing.Pipe`` or ``Queue`` pipe is shared with
worker processes by design. If we set ``O_NONBLOCK`` on our end, a worker doing a plain
blocking ``conn.recv()`` or ``q.get()`` on its copy suddenly gets ``BlockingIOError``.
The usual ways of making a descriptor "async" do exactly that: uvloop's ``add_reader``
(through libuv's ``uv_poll_init``) sets the flag and never restores it.

So this module does two things differently:

* **Waiting.** We never hand the shared descriptor to the event loop. We register it
  in a private epoll (Linux) or kqueue (macOS, BSD) instance and let the event loop
  watch *that* descriptor instead. An epoll or kqueue descriptor is readable while any
  descriptor registered in it is ready, and registering a descriptor changes none of
  its flags. Whatever the loop does to the helper descriptor (uvloop sets
  ``O_NONBLOCK`` on it) harms nobody: it is ours alone and never leaves this process.

* **Moving bytes.** The descriptor stays blocking, so every read or write must be one
  that can't block. On a socket (a duplex ``Pipe`` is a socketpair, ``Client`` and
  ``Listener`` use sockets) ``MSG_DONTWAIT`` makes one call non-blocking without
  touching the shared flags. A pipe has no such per-call flag. On Linux, the end a pipe
  is read from gets an open file description of this process's own (:class:`OwnReadEnd`,
  opened anew through ``/proc/self/fd``), which is non-blocking and which no other
  process holds. Elsewhere we ask the kernel first: ``FIONREAD`` says how many bytes are
  buffered, and we read no more than that. For writes, a zero-timeout ``poll`` says
  whether a write of ``PIPE_BUF`` bytes fits, and we write no more than that before
  asking again.

Forked children inherit every descriptor. The descriptors asyncmp owns (a connection's
end, the helper epoll/kqueue, a pipe's own read end) are closed in a forked child by an
``os.register_at_fork`` hook, so a worker never holds a copy of the parent's end: when
the parent closes its end, the worker's ``recv()`` sees EOF, as it should.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import functools
import os
import select
import socket
import stat
import sys
import termios
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import anyio

from .loop import is_selector_loop, running_asyncio_loop, wait_readable_elsewhere

__all__ = (
    "UNOPENED",
    "FdTransport",
    "ForkOwned",
    "KqueueAPI",
    "OwnReadEnd",
    "Poller",
    "ReadinessWaiter",
    "open_transport",
    "own_read_end",
    "poller",
    "register_fork_owned",
    "socket_over_dup",
)

_PIPE_BUF = getattr(select, "PIPE_BUF", 512)
# Plain ints: the socket module's are enum members, and ``|`` on those goes through
# the enum machinery on every call.
_MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
_MSG_NOSIGNAL = int(getattr(socket, "MSG_NOSIGNAL", 0))
_SEND_FLAGS = _MSG_DONTWAIT | _MSG_NOSIGNAL
#: The most one write_some() call moves, so the loop gets a turn in between.
_MAX_WRITE_PER_CALL = 4 << 20
_EOF_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN})

if sys.platform != "win32":
    _ioctl = fcntl.ioctl
    _FIONREAD = termios.FIONREAD
    _readv = os.readv
else:  # pragma: no cover
    # Nothing in this module runs on Windows (no descriptors to poll there: see
    # _platform); these stand-ins only let type checkers read it for Windows too.
    _FIONREAD = 0

    def _ioctl(fd: int, request: int, arg: Any, mutate_flag: bool = True, /) -> Any:
        raise OSError(errno.ENOTSUP, "FIONREAD needs POSIX")

    def _readv(fd: int, buffers: list[memoryview], /) -> int:
        raise OSError(errno.ENOTSUP, "readv() needs POSIX")


# ---------------------------------------------------------------------------------------
# Fork hygiene
# ---------------------------------------------------------------------------------------


class ForkOwned(Protocol):
    def _forget_in_forked_child(self) -> None:
        """Close this object's descriptors in a freshly forked child, without I/O."""


_fork_owned: weakref.WeakSet[ForkOwned] = weakref.WeakSet()


def register_fork_owned(obj: ForkOwned) -> None:
    """Have *obj*'s descriptors closed in any child this process forks from now on."""
    _fork_owned.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_fork_owned):
        obj._forget_in_forked_child()
    _fork_owned.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------------------
# Waiting for readiness
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Moving bytes
# ---------------------------------------------------------------------------------------


#: :attr:`OwnReadEnd.fd` before the first read: not opened yet.
UNOPENED = -2


class OwnReadEnd:
    """A non-blocking descriptor for reading a pipe, on an open file description of this
    process's own (Linux), opened at the first read that asks for it (:meth:`open`).

    Opening ``/proc/self/fd/N`` of a pipe opens the pipe anew: a new open file
    description, with flags of its own, on the same pipe buffer. So it can be
    non-blocking while every other process's description of the pipe stays as it is,
    and a plain ``read()`` on it returns what is there, or ``EAGAIN``: one system call,
    cheaper than ``preadv2()``, and than ``FIONREAD`` before a read. (Elsewhere, opening
    ``/dev/fd/N`` duplicates the descriptor instead, sharing its description: never
    done there.)

    It counts as one more reader of the pipe while it is open, so it is opened only when
    this process reads (an adapter that only puts never opens one, and a producer sees
    ``EPIPE`` once the consumers are gone), and closed with its transport, when
    garbage-collected, and in every forked child (by the fork hook, which a child never
    inherits it past). :attr:`fd` is :data:`UNOPENED` before the first read, -1 where it
    could not be opened or once closed: any read on either number fails with ``EBADF``,
    never on a descriptor the process reuses.
    """

    __slots__ = ("__weakref__", "_finalizer", "_of", "fd")

    def __init__(self, of: int) -> None:
        self._of = of
        self.fd = UNOPENED
        self._finalizer: weakref.finalize[[int], OwnReadEnd] | None = None

    def open(self) -> int:
        """Open it if not yet tried; return :attr:`fd` (-1: not to be had here)."""
        if self.fd != UNOPENED:
            return self.fd
        self.fd = fd = _reopen_nonblocking(self._of)
        if fd >= 0:
            self._finalizer = weakref.finalize(self, os.close, fd)
            register_fork_owned(self)
        return fd

    def close(self) -> None:
        self.fd = -1
        if self._finalizer is not None:
            self._finalizer()

    def _forget_in_forked_child(self) -> None:
        self.close()


def own_read_end(fd: int) -> OwnReadEnd | None:
    """An own read end (not opened yet) for the pipe that *fd* reads from, on Linux;
    None for anything else: another system, a socket, a pipe's write end."""
    own = None
    if sys.platform == "linux":
        try:
            if (
                stat.S_ISFIFO(os.fstat(fd).st_mode)
                and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            ):
                own = OwnReadEnd(fd)
        except OSError:
            pass
    return own


def _reopen_nonblocking(fd: int) -> int:
    """The pipe *fd* reads from, opened anew for reading, non-blocking; -1 if the system
    says no (no ``/proc``, say) or the result is not what Linux documents."""
    if sys.platform == "linux":
        try:
            st = os.fstat(fd)
            own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return -1
        try:
            mine = os.fstat(own)
            same_pipe = (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)
            apart = bool(fcntl.fcntl(own, fcntl.F_GETFL) & os.O_NONBLOCK) and not (
                fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
            )
        except OSError:  # pragma: no cover - an fstat or fcntl that fails on an open fd
            same_pipe = apart = False
        if same_pipe and apart:
            return own
        os.close(own)  # pragma: no cover - not the semantics Linux documents
    return -1  # pragma: no cover - Linux only


class FdTransport:
    """Non-blocking reads and writes on a descriptor whose flags say "blocking".

    ``read_some`` returns ``None`` when it would block and ``b""`` at EOF (a reset
    counts as EOF); ``read_into`` fills a buffer instead and returns how many bytes it
    read, ``None`` when it would block and 0 at EOF. ``write_some`` returns how many
    bytes it wrote, 0 when it would block, and raises ``BrokenPipeError`` (or another
    ``OSError``) when the peer is gone. :attr:`own_end` is the pipe's own read end
    (:class:`OwnReadEnd`), where there can be one.
    """

    __slots__ = ("_count", "fd", "own_end")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._count = array.array("i", [0])
        self.own_end: OwnReadEnd | None = None

    def available(self) -> int:
        """Bytes buffered in the kernel, ready to read now (``FIONREAD``)."""
        _ioctl(self.fd, _FIONREAD, self._count, True)
        return self._count[0]

    def read_some(self, max_bytes: int) -> bytes | None:
        raise NotImplementedError

    def read_into(self, buf: memoryview) -> int | None:
        raise NotImplementedError

    def write_some(self, data: memoryview) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds; the descriptor itself is its owner's."""


def socket_over_dup(fd: int) -> socket.socket:
    """A blocking socket object of our own over a duplicate of the socket *fd*, made
    without touching the flags of the open file description behind *fd*.

    Closing it closes only the duplicate. ``socket.socket(fileno=...)`` can't be used for
    this: under a global ``socket.setdefaulttimeout()`` it puts the new object in timeout
    mode, which sets ``O_NONBLOCK`` on the description that *fd* shares with other
    processes. So the object is made over a throwaway socket of its own, switched to
    blocking mode there (on the throwaway's description, which nobody else has), and
    then the throwaway descriptor is replaced by a duplicate of *fd* with ``dup2()``,
    which changes no flags. The object keeps the throwaway's family and type in its
    attributes; its ``recv``, ``send`` and ``shutdown`` go to the kernel by descriptor and
    don't depend on them.

    :raises ValueError: *fd* is not a socket (nothing is left open).
    """
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ValueError(f"file descriptor {fd} is not a socket")
    if sys.platform != "win32":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(None)  # blocking mode, on the throwaway's own description
            os.dup2(fd, sock.fileno(), inheritable=False)
        except BaseException:
            sock.close()
            raise
        return sock
    raise OSError(errno.ENOTSUP, "socket_over_dup() needs POSIX")  # pragma: no cover


class _SocketTransport(FdTransport):
    __slots__ = ("_recv", "_recv_into", "_send", "_sock")

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        # A socket object of our own, on a duplicate descriptor: closing it never closes
        # the owner's descriptor, and making it changes no flag (see socket_over_dup).
        self._sock = socket_over_dup(fd)
        self._recv = self._sock.recv
        self._recv_into = self._sock.recv_into
        self._send = self._sock.send

    def read_some(self, max_bytes: int) -> bytes | None:
        try:
            return self._recv(max_bytes, _MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _EOF_ERRNOS:
                return b""
            raise

    def read_into(self, buf: memoryview) -> int | None:
        try:
            return self._recv_into(buf, len(buf), _MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _EOF_ERRNOS:
                return 0
            raise

    def write_some(self, data: memoryview) -> int:
        try:
            return self._send(data[:_MAX_WRITE_PER_CALL], _SEND_FLAGS)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self._sock.close()


class _PipeTransport(FdTransport):
    """A pipe's end. Reads go through the pipe's own read end where there is one (one
    system call each), else ``FIONREAD`` says first how much is there."""

    __slots__ = ("_poll_in", "_poll_out")

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._poll_in = poller(fd, writable=False)
        self._poll_out = poller(fd, writable=True)
        self.own_end = own_read_end(fd)

    def _readable(self) -> int:
        """How much to read now without blocking: 0 if nothing is there yet."""
        n = self.available()
        if n == 0 and self._poll_in.poll(0):
            # Readable with nothing buffered: data that arrived since (the second FIONREAD
            # sees it), or EOF, where a read of one byte returns empty at once.
            n = self.available() or 1
        return n

    def _own_fd(self) -> int:
        own = self.own_end
        return -1 if own is None else own.open()

    def read_some(self, max_bytes: int) -> bytes | None:
        own_fd = self._own_fd()
        if own_fd >= 0:
            try:
                return os.read(own_fd, max_bytes)
            except BlockingIOError:
                return None
        n = self._readable()
        return os.read(self.fd, min(n, max_bytes)) if n else None

    def read_into(self, buf: memoryview) -> int | None:
        own_fd = self._own_fd()
        if own_fd >= 0:
            try:
                return _readv(own_fd, [buf])
            except BlockingIOError:
                return None
        n = self._readable()
        return _readv(self.fd, [buf[: min(n, len(buf))]]) if n else None

    def write_some(self, data: memoryview) -> int:
        # A pipe that polls writable has room for PIPE_BUF bytes, and a write of at
        # most PIPE_BUF bytes is atomic: it either fits whole or would block. So write
        # PIPE_BUF at a time, asking before each.
        written = 0
        total = min(len(data), _MAX_WRITE_PER_CALL)
        poll = self._poll_out.poll
        while written < total and poll(0):
            written += os.write(self.fd, data[written : written + min(_PIPE_BUF, total - written)])
        return written

    def close(self) -> None:
        if self.own_end is not None:
            self.own_end.close()


class Poller(Protocol):
    def poll(self, timeout: float | None = None, /) -> list[tuple[int, int]]: ...


def poller(fd: int, *, writable: bool) -> Poller:
    """A ``select.poll`` object watching *fd* for one direction (POSIX only)."""
    if sys.platform != "win32":
        p = select.poll()
        p.register(fd, select.POLLOUT if writable else select.POLLIN)
        return p
    raise OSError(errno.ENOTSUP, "poll() needs POSIX")  # pragma: no cover


def open_transport(fd: int) -> FdTransport:
    """Return the byte mover that suits *fd*: sockets use ``MSG_DONTWAIT``."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode) and _MSG_DONTWAIT:
        return _SocketTransport(fd)
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode):
        return _PipeTransport(fd)
    raise ValueError(f"file descriptor {fd} is neither a pipe nor a socket")
