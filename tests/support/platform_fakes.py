"""Stand-ins that let the suite run other platforms' code paths on Linux.

* :func:`fake_pipe` returns two ends of a message-mode pipe that behave like Windows'
  ``PipeConnection``: the stdlib's own ``_ConnectionBase`` front (argument checks,
  ``closed``, ``readable``, ``writable``, the "bad message length" rule), and behind it
  whole messages with no length prefix and a handle that is no descriptor. As on
  Windows, ``poll()`` raises ``BrokenPipeError`` once the peer has closed and nothing
  is left (python/cpython#85180), and a message longer than ``maxlength`` is consumed
  and fails the connection.
* :class:`FakeKqueueModule` is the part of macOS' ``select`` module that asyncmp uses,
  ``kqueue`` and ``kevent``, built on a real epoll instance, so readiness is real and
  the kqueue descriptor is one an event loop can wait on.
* :class:`ProactorLikeEventLoop` is an asyncio loop whose ``add_reader`` family raises
  ``NotImplementedError``, as ``ProactorEventLoop``'s (Windows' default loop) does.
"""

from __future__ import annotations

import asyncio
import errno
import io
import itertools
import multiprocessing.connection
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike
    from typing_extensions import TypeVarTuple, Unpack

    _Ts = TypeVarTuple("_Ts")

__all__ = (
    "FakeKqueue",
    "FakeKqueueModule",
    "FakePipeConnection",
    "ProactorLikeEventLoop",
    "fake_pipe",
)

# --- a Windows PipeConnection -------------------------------------------------------------------

#: Windows handles are numbers the C runtime knows nothing of; these are no descriptor here
#: either (far above any RLIMIT_NOFILE), so code that treats one as a descriptor fails.
_HANDLES = itertools.count(0x7FFF0000, 4)


class _Channel:
    """One direction of a message-mode pipe: whole messages, in order."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.messages: deque[bytes] = deque()
        self.writer_closed = False
        self.reader_closed = False


if TYPE_CHECKING:
    _ConnectionBase = multiprocessing.connection._ConnectionBase[Any, Any]
else:  # not subscriptable at run time
    _ConnectionBase = multiprocessing.connection._ConnectionBase


# _ConnectionBase is the stdlib's common base of Connection and PipeConnection: subclassing
# it gives the public methods exactly the stdlib's checks.
class FakePipeConnection(_ConnectionBase):
    """One end of :func:`fake_pipe`: a Windows ``PipeConnection`` as asyncmp sees it."""

    def __init__(self, inbox: _Channel | None, outbox: _Channel | None) -> None:
        super().__init__(next(_HANDLES), readable=inbox is not None, writable=outbox is not None)
        self._inbox = inbox
        self._outbox = outbox
        #: Every send_bytes() call that reached the pipe, for tests to count.
        self.sends = 0

    def _send_bytes(self, buf: memoryview) -> None:
        outbox = self._outbox
        assert outbox is not None  # _ConnectionBase checked writable
        with outbox.cond:
            if outbox.reader_closed:
                # ERROR_NO_DATA, which Windows maps to EPIPE.
                raise BrokenPipeError(errno.EPIPE, "The pipe is being closed")
            outbox.messages.append(bytes(buf))
            self.sends += 1
            outbox.cond.notify_all()

    def _recv_bytes(self, maxsize: int | None = None) -> io.BytesIO:
        inbox = self._inbox
        assert inbox is not None
        with inbox.cond:
            while not inbox.messages:
                if inbox.writer_closed:
                    raise EOFError  # ERROR_BROKEN_PIPE
                inbox.cond.wait()
            message = inbox.messages.popleft()
        if maxsize is not None and len(message) > maxsize:
            # PipeConnection reads the head, finds more than maxsize in the message and
            # gives up: the message is gone and the connection with it.
            cast(Any, self)._bad_message_length()  # not in the stub
        return io.BytesIO(message)

    def _poll(self, timeout: float | None) -> bool:
        inbox = self._inbox
        assert inbox is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        with inbox.cond:
            while not inbox.messages:
                if inbox.writer_closed:
                    # PeekNamedPipe() fails on a pipe whose other end is closed.
                    raise BrokenPipeError(errno.EPIPE, "The pipe has been ended")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                inbox.cond.wait(left)
            return True

    def _close(self, *args: Any) -> None:
        for channel, side in ((self._inbox, "reader_closed"), (self._outbox, "writer_closed")):
            if channel is not None:
                with channel.cond:
                    setattr(channel, side, True)
                    channel.cond.notify_all()


def fake_pipe(duplex: bool = True) -> tuple[FakePipeConnection, FakePipeConnection]:
    """Like ``multiprocessing.Pipe(duplex)`` on Windows; one-way: ``(reader, writer)``."""
    a_to_b = _Channel()
    if not duplex:
        return FakePipeConnection(a_to_b, None), FakePipeConnection(None, a_to_b)
    b_to_a = _Channel()
    return FakePipeConnection(b_to_a, a_to_b), FakePipeConnection(a_to_b, b_to_a)


def as_connection(conn: FakePipeConnection) -> multiprocessing.connection.Connection:
    """The fake, typed as what AsyncConnection accepts on this platform."""
    return cast(multiprocessing.connection.Connection, conn)


# --- macOS kqueue -------------------------------------------------------------------------------

# The values of macOS' <sys/event.h>, as its select module has them.
KQ_FILTER_READ = -1
KQ_FILTER_WRITE = -2
KQ_EV_ADD = 0x1
KQ_EV_DELETE = 0x2
KQ_EV_ONESHOT = 0x10
KQ_EV_CLEAR = 0x20
KQ_EV_EOF = 0x8000
_EPOLL_OF_FILTER = {KQ_FILTER_READ: select.EPOLLIN, KQ_FILTER_WRITE: select.EPOLLOUT}


class FakeKevent:
    """``select.kevent``: one change to, or one event from, a kqueue."""

    def __init__(
        self, ident: Any, filter: int = KQ_FILTER_READ, flags: int = KQ_EV_ADD, data: int = 0
    ) -> None:
        self.ident: int = ident if isinstance(ident, int) else ident.fileno()
        self.filter = filter
        self.flags = flags
        self.data = data

    def __repr__(self) -> str:
        return f"<kevent ident={self.ident} filter={self.filter} flags={self.flags:#x}>"


class FakeKqueue:
    """``select.kqueue`` over an epoll instance.

    ``control(changelist, maxevents, timeout)`` applies the changes in order, then, if
    *maxevents* > 0, waits up to *timeout* (None: forever) and returns at most that many
    events. A (descriptor, filter) pair is registered once: ``EV_ADD`` again updates its
    flags, ``EV_DELETE`` of one that is not there raises ``FileNotFoundError`` (ENOENT).
    Without ``EV_CLEAR`` an event is level-triggered: it is pending, and the kqueue
    descriptor readable, for as long as the condition holds; ``EV_CLEAR`` reports a
    change once; ``EV_ONESHOT`` deletes the registration once reported. A closed kqueue
    raises ``ValueError``, as the real object does.
    """

    def __init__(self) -> None:
        self._epoll: select.epoll | None = select.epoll()
        self._filters: dict[int, dict[int, int]] = {}  # fd -> {filter: flags}
        self.changes: list[tuple[int, int, int]] = []  # (ident, filter, flags), for tests

    @property
    def closed(self) -> bool:
        return self._epoll is None

    def _live(self) -> select.epoll:
        if self._epoll is None:
            raise ValueError("I/O operation on closed kqueue object")
        return self._epoll

    def fileno(self) -> int:
        return self._live().fileno()

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    def _sync(self, ep: select.epoll, fd: int, had: bool) -> None:
        filters = self._filters.get(fd, {})
        if not filters:
            self._filters.pop(fd, None)
            if had:
                ep.unregister(fd)
            return
        kinds = {bool(flags & KQ_EV_CLEAR) for flags in filters.values()}
        shots = {bool(flags & KQ_EV_ONESHOT) for flags in filters.values()}
        if len(kinds) > 1 or len(shots) > 1:
            raise NotImplementedError("the fake can't mix EV_CLEAR or EV_ONESHOT on one fd")
        mask = 0
        for kfilter in filters:
            mask |= _EPOLL_OF_FILTER[kfilter]
        if kinds.pop():
            mask |= select.EPOLLET
        if shots.pop():
            mask |= select.EPOLLONESHOT
        if had:
            ep.modify(fd, mask)
        else:
            ep.register(fd, mask)

    def control(
        self, changelist: Iterable[Any] | None, maxevents: int, timeout: float | None = None, /
    ) -> list[Any]:
        ep = self._live()
        if maxevents < 0:
            raise ValueError(f"Length of eventlist must be 0 or positive, got {maxevents}")
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be positive or None")
        for change in changelist or ():
            if not isinstance(change, FakeKevent):
                raise TypeError("changelist must be an iterable of select.kevent objects")
            if change.filter not in _EPOLL_OF_FILTER:
                raise OSError(errno.EINVAL, "filter not supported by the fake")
            fd, kfilter = change.ident, change.filter
            self.changes.append((fd, kfilter, change.flags))
            had = fd in self._filters
            if change.flags & KQ_EV_ADD:
                self._filters.setdefault(fd, {})[kfilter] = change.flags
            elif change.flags & KQ_EV_DELETE:
                if kfilter not in self._filters.get(fd, {}):
                    raise FileNotFoundError(errno.ENOENT, "No such file or directory")
                del self._filters[fd][kfilter]
            self._sync(ep, fd, had)
        if maxevents == 0:
            return []
        events: list[Any] = []
        for fd, mask in ep.poll(-1 if timeout is None else timeout, maxevents):
            for kfilter, flags in list(self._filters.get(fd, {}).items()):
                if not mask & (_EPOLL_OF_FILTER[kfilter] | select.EPOLLHUP | select.EPOLLERR):
                    continue
                eof = KQ_EV_EOF if mask & select.EPOLLHUP else 0
                events.append(FakeKevent(fd, kfilter, (flags & ~KQ_EV_ADD) | eof))
                if flags & KQ_EV_ONESHOT:
                    del self._filters[fd][kfilter]
            if fd in self._filters and not self._filters[fd]:
                del self._filters[fd]
                ep.unregister(fd)
        return events[:maxevents]


class FakeKqueueModule:
    """What asyncmp uses of ``select`` on macOS, for ``asyncmp._core.readiness.KQUEUE``."""

    KQ_FILTER_READ = KQ_FILTER_READ
    KQ_FILTER_WRITE = KQ_FILTER_WRITE
    KQ_EV_ADD = KQ_EV_ADD
    KQ_EV_DELETE = KQ_EV_DELETE
    KQ_EV_ONESHOT = KQ_EV_ONESHOT
    KQ_EV_CLEAR = KQ_EV_CLEAR

    def __init__(self) -> None:
        #: Every kqueue opened through this module, for tests to look at.
        self.opened: list[FakeKqueue] = []

    def kqueue(self) -> FakeKqueue:
        kq = FakeKqueue()
        self.opened.append(kq)
        return kq

    def kevent(self, ident: int, filter: int = KQ_FILTER_READ, flags: int = KQ_EV_ADD) -> Any:
        return FakeKevent(ident, filter, flags)


# --- Windows' ProactorEventLoop -----------------------------------------------------------------


class ProactorLikeEventLoop(asyncio.SelectorEventLoop):
    """A loop without the public reader/writer callbacks, like ``ProactorEventLoop``.

    Its own sockets still work: SelectorEventLoop uses the underscored methods inside.
    """

    def add_reader(
        self, fd: FileDescriptorLike, callback: Callable[[Unpack[_Ts]], Any], *args: Unpack[_Ts]
    ) -> None:
        raise NotImplementedError

    def remove_reader(self, fd: FileDescriptorLike) -> bool:
        raise NotImplementedError

    def add_writer(
        self, fd: FileDescriptorLike, callback: Callable[[Unpack[_Ts]], Any], *args: Unpack[_Ts]
    ) -> None:
        raise NotImplementedError

    def remove_writer(self, fd: FileDescriptorLike) -> bool:
        raise NotImplementedError
