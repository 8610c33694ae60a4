"""Move bytes over a descriptor whose flags say "blocking", without blocking.

The descriptor stays blocking (asyncmp never changes the flags of a descriptor it was
handed: see ``_core.readiness`` for why), so every read or write must be one that can't
block. On a socket (a duplex ``Pipe`` is a socketpair, ``Client`` and ``Listener`` use
sockets) ``MSG_DONTWAIT`` makes one call non-blocking without touching the shared flags.
A pipe has no such per-call flag. On Linux, the end a pipe is read from gets an open file
description of this process's own (:class:`OwnReadEnd`, opened anew through
``/proc/self/fd``), which is non-blocking and which no other process holds. Elsewhere we
ask the kernel first: ``FIONREAD`` says how many bytes are buffered, and we read no more
than that. For writes, a zero-timeout ``poll`` says whether a write of ``PIPE_BUF`` bytes
fits, and we write no more than that before asking again. A write of at most
``PIPE_BUF`` bytes to a pipe is atomic: it goes in whole or not at all, so a frame that
small is never torn, and no write ever blocks.

Who owns the descriptor (the way trio's ``_FdHolder`` has it): a transport is handed a
descriptor number by the descriptor's owner (a connection's route, a queue's getter), and
never closes it: the owner does, after closing the transport. Closing a transport
releases what it holds of its own (a socket object over a duplicate, a pipe's own read
end) and *forgets the number*: :attr:`FdTransport.fd` becomes -1. Any read or write after
that fails with ``EBADF``, at once, instead of reading or writing whatever file the
process has opened since under the same number, so nobody has to ask "was it closed?"
before a last write or a shutdown: the call fails, and that is the answer.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import socket
import stat
import sys
import termios
import weakref
from typing import Any

from .atfork import register_fork_owned
from .readiness import Poller, poller

__all__ = (
    "UNOPENED",
    "FdTransport",
    "OwnReadEnd",
    "open_transport",
    "own_read_end",
    "pipe_write_end",
    "socket_over_dup",
)

#: The most one write into a pipe that polls writable takes whole, without blocking: a
#: write of at most this many bytes is atomic (POSIX), so it fits whole or would block.
_PIPE_BUF: int = getattr(select, "PIPE_BUF", 512)
#: What a write end polls once nobody can read what it writes.
_READERS_GONE: int = getattr(select, "POLLERR", 0) | getattr(select, "POLLHUP", 0)
# Plain ints: the socket module's are enum members, and ``|`` on those goes through
# the enum machinery on every call.
_MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
_MSG_NOSIGNAL = int(getattr(socket, "MSG_NOSIGNAL", 0))
_SEND_FLAGS = _MSG_DONTWAIT | _MSG_NOSIGNAL
#: The most one write_some() call moves, so the loop gets a turn in between.
_MAX_WRITE_PER_CALL = 4 << 20
_POLLNVAL = int(getattr(select, "POLLNVAL", 0x20))
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

    :attr:`fd` is the descriptor's number until :meth:`close`, -1 after it: every call
    then raises ``OSError`` (``EBADF``), whatever file the number was given to since
    (see the module docstring).
    """

    __slots__ = ("_count", "fd", "own_end")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._count = array.array("i", [0])
        self.own_end: OwnReadEnd | None = None

    def available(self) -> int:
        """Bytes buffered in the kernel, ready to read now (``FIONREAD``)."""
        try:
            _ioctl(self.fd, _FIONREAD, self._count, True)
        except ValueError:  # fcntl refuses -1 itself, before the kernel can: closed
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None
        return self._count[0]

    def read_some(self, max_bytes: int) -> bytes | None:
        raise NotImplementedError

    def read_into(self, buf: memoryview) -> int | None:
        raise NotImplementedError

    def write_some(self, data: memoryview) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds and forget the descriptor's number (the
        descriptor itself is its owner's to close). Idempotent."""
        self.fd = -1


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
        super().close()
        self._sock.close()  # its methods raise EBADF from now on


class _Closed:
    """The polls of a closed pipe transport: "ready", so that a call goes on to fail."""

    @staticmethod
    def poll(timeout: float | None = None, /) -> list[tuple[int, int]]:
        return [(-1, _POLLNVAL)]


_CLOSED: Poller = _Closed()


class _PipeTransport(FdTransport):
    """A pipe's end. Reads go through the pipe's own read end where there is one (one
    system call each), else ``FIONREAD`` says first how much is there."""

    __slots__ = ("_poll_in", "_poll_out")

    def __init__(self, fd: int, *, write_end: bool = False) -> None:
        super().__init__(fd)
        self._poll_in = poller(fd, writable=False)
        self._poll_out = poller(fd, writable=True)
        # A write end has no own read end, and knowing it saves asking the kernel.
        self.own_end = None if write_end else own_read_end(fd)

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
        # The one place that writes frames into pipes (every frame writer comes here).
        # A pipe that polls writable has room for PIPE_BUF bytes, and a write of at most
        # PIPE_BUF bytes is atomic: it either fits whole or would block. So write
        # PIPE_BUF at a time, asking before each: a frame of at most PIPE_BUF bytes goes
        # in whole, in one write, and no write ever blocks.
        # A pipe whose every read end is closed polls POLLERR: raise as the write would,
        # without writing (a process whose SIGPIPE is at its default would die of it).
        written = 0
        total = min(len(data), _MAX_WRITE_PER_CALL)
        poll = self._poll_out.poll
        while written < total:
            ready = poll(0)
            if not ready:
                break
            if ready[0][1] & _READERS_GONE:
                raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            written += os.write(self.fd, data[written : written + min(_PIPE_BUF, total - written)])
        return written

    def close(self) -> None:
        super().close()
        if self.own_end is not None:
            self.own_end.close()
        # The polls watch the old number, which may be another file's by now: from here
        # on they say "ready", so the next call goes to -1 and fails with EBADF.
        self._poll_in = self._poll_out = _CLOSED


def open_transport(fd: int) -> FdTransport:
    """Return the byte mover that suits *fd*: sockets use ``MSG_DONTWAIT``."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode) and _MSG_DONTWAIT:
        return _SocketTransport(fd)
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode):
        return _PipeTransport(fd)
    raise ValueError(f"file descriptor {fd} is neither a pipe nor a socket")


def pipe_write_end(fd: int) -> FdTransport:
    """The transport of *fd*, known to be a pipe's write end (a queue's), made without a
    system call: for a writer that makes one per frame, as a ``SimpleQueue``'s put does."""
    return _PipeTransport(fd, write_end=True)
