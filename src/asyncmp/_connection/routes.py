"""The routes of an AsyncConnection: how its bytes move, behind one interface.

:class:`ConnectionRoute` is what :class:`~asyncmp.AsyncConnection` uses; it never asks
which route it has. Each route owns the ``multiprocessing`` Connection it was given and
closes it.

* :class:`FdRoute` (POSIX): waits for readiness through a private epoll/kqueue helper and
  moves only the bytes that are there (see ``_core.transport``), through the frame engine's greedy
  reader and writer (see ``_core.frames``). Bytes that arrived but don't make a whole frame
  yet stay in the reader's decoder, so a cancelled receive loses nothing.
* :class:`ThreadRoute` (Windows pipe handles, or on request): runs blocking calls in
  asyncmp's threads (see ``_core.threads``). A receive abandoned on cancellation keeps
  running, and its message goes to the next receive.

A route serves one caller per direction at a time: the AsyncConnection's fair locks see
to that. A route raises :class:`ProtocolError` for a stream it can't trust; the
AsyncConnection remembers it (the one latch) and refuses to go on.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.lowlevel import checkpoint_if_cancelled

from .._core import frames as _frames
from .._core import platform as _platform
from .._core.frames import (
    PEER_CLOSED,
    FrameWriter,
    GreedyReader,
    maxlength_exceeded,
    stdlib_recv_error,
    torn_send,
)
from .._core.threads import THREAD_SLICE, BlockingCall, KeptThread, ThreadCalls
from .._core.wire import encode_header

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:
    from typing_extensions import TypeVar

if TYPE_CHECKING:
    from typing import TypeAlias

if TYPE_CHECKING or sys.platform != "win32":
    from .._core.readiness import Poller, poller
    from .._core.transport import FdTransport, open_transport, socket_over_dup

__all__ = ("Connection", "ConnectionRoute", "FdRoute", "ThreadRoute")

#: What a blocking call of the thread route returns.
_R = TypeVar("_R")

if sys.platform == "win32":
    # A Windows Pipe() end is a PipeConnection, a sibling of Connection (a socket end).
    Connection: TypeAlias = (
        "multiprocessing.connection.Connection | multiprocessing.connection.PipeConnection"
    )
else:
    Connection: TypeAlias = multiprocessing.connection.Connection


class ConnectionRoute(Protocol):
    """How an AsyncConnection's bytes move. Calls come one per direction at a time."""

    @property
    def uses_threads(self) -> bool:
        """True if the route runs blocking calls in threads."""

    @property
    def fast_reader(self) -> GreedyReader | None:
        """The greedy reader of the receive fast path (``take_frame()`` with no await
        before it), or None where there is none."""

    @property
    def fast_writer(self) -> FrameWriter | None:
        """The writer of the send fast path (``send_nowait()``, then ``send()`` for the
        rest), or None where there is none."""

    @property
    def broken(self) -> str | None:
        """Why sending can't go on (a send cancelled mid-message), or None."""

    async def recv_frame(self, maxlength: int | None, *, nothing_there: bool = False) -> bytes:
        """Receive one frame. *nothing_there*: the caller just found nothing to take
        on the fast path, so start by waiting."""

    def recv_frame_nowait(self, maxlength: int | None) -> bytes:
        """A frame that is here already. :raises anyio.WouldBlock: none is."""

    async def send_frame(self, payload: memoryview, already: int = -1) -> None:
        """Send one frame; *already* of its bytes went out on the fast path (-1: none
        was tried, so this call is the cancellation point)."""

    def send_eof(self) -> None:
        """Half-close the sending direction where the transport can."""

    def close(self) -> None:
        """Close now, waking every waiting task (idempotent; no loop needed)."""

    async def aclose(self) -> None:
        """Close, then wait until no thread of the route runs."""

    def forget_in_forked_child(self) -> None:
        """In a freshly forked child: close this process's copies, without I/O."""


def _shutdown_socket_write(fd: int) -> None:
    """``shutdown(SHUT_WR)`` on a socket *fd*; nothing on anything else (no half-close).

    The socket object is made by ``socket_over_dup``, which never sets ``O_NONBLOCK`` on
    the shared descriptor (``socket.socket(fileno=)`` does under a default timeout)."""
    try:
        sock = socket_over_dup(fd)
    except (ValueError, OSError):
        return  # not a socket (a pipe has no half-close), or closed already
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()


class FdRoute:
    """POSIX route: readiness through a helper descriptor, never a thread. The frame
    engine does the work: a greedy reader and a writer over one transport."""

    __slots__ = ("_conn", "_fd", "_transport", "fast_reader", "fast_writer")

    uses_threads = False

    def __init__(self, conn: Connection, max_message_size: int | None) -> None:
        self._conn = conn
        self._fd = fd = conn.fileno()
        self._transport: FdTransport = open_transport(fd)
        self.fast_reader: GreedyReader = GreedyReader(self._transport, max_message_size)
        transport = self._transport  # -1 once closed: a shutdown then does nothing
        self.fast_writer: FrameWriter = FrameWriter(
            transport, on_torn=lambda: _shutdown_socket_write(transport.fd)
        )

    @property
    def broken(self) -> str | None:
        return self.fast_writer.broken

    async def recv_frame(self, maxlength: int | None, *, nothing_there: bool = False) -> bytes:
        return await self.fast_reader.recv_frame(maxlength, nothing_there=nothing_there)

    def recv_frame_nowait(self, maxlength: int | None) -> bytes:
        return self.fast_reader.recv_frame_nowait(maxlength)

    async def send_frame(self, payload: memoryview, already: int = -1) -> None:
        await self.fast_writer.send(payload, already)

    def send_eof(self) -> None:
        _shutdown_socket_write(self._fd)

    def close(self) -> None:
        try:
            self.fast_reader.close()
            self.fast_writer.close()
            self._transport.close()
        finally:
            self._conn.close()

    async def aclose(self) -> None:
        self.close()

    def forget_in_forked_child(self) -> None:
        self._transport.close()
        _close_inherited(self._conn)


def _close_inherited(conn: Connection) -> None:
    try:
        conn.close()
    except OSError:
        pass


def _has_finished(call: BlockingCall[Any]) -> bool:
    """``call.finished``, read anew (a type checker would keep an earlier reading)."""
    return call.finished


class ThreadRoute:
    """Route for handles the loop can't watch: blocking calls in asyncmp threads.

    Receiving: a Windows pipe handle is message-mode, so the stdlib's ``recv_bytes()``
    reads exactly one whole message once ``poll()`` says one is there. A POSIX
    descriptor is a byte stream, so there the thread waits with ``poll()`` and frames
    the bytes with the fd route's reader (``GreedyReader``, without its waits): hostile
    headers, partial messages and memory bounds behave exactly as on that route.

    Sending: on POSIX the thread writes what fits without blocking (the fd route's
    writer) and waits for room with ``poll()`` in slices of ``THREAD_SLICE``, so a
    send can be stopped between slices: by ``close()``, or by a cancellation that outlived
    its shield. A Windows pipe handle gets the stdlib's ``send_bytes()``, which can't be
    stopped: it returns once the peer has read enough or closed its end.

    Threads: one per direction at most (a :class:`KeptThread` each), so the route never uses
    more than two threads per connection, and they are not counted by asyncmp's thread
    limiter (``limited=False``): a receive waiting for a silent peer may wait for ever,
    and with a shared limit, enough of those would leave an active connection without a
    thread.

    Closing: ``close()`` wakes the tasks waiting on a call at once, asks the calls to
    stop, and the handle is closed when no thread uses it any more, by the last thread
    to finish (or by ``close()`` itself if none runs). That needs no event loop, so a
    connection closed after its loop has ended still releases its handle.
    """

    __slots__ = (
        "_active",
        "_active_lock",
        "_calls",
        "_closed",
        "_conn",
        "_limit",
        "_pending_recv",
        "_reader",
        "_released",
        "_transport",
        "_wakers",
        "_workers",
        "_wpoll",
        "_writer",
        "broken",
    )

    uses_threads = True
    fast_reader = None
    fast_writer = None

    def __init__(self, conn: Connection, max_message_size: int | None) -> None:
        self._conn = conn
        self._limit = max_message_size
        # Windows (or a test that says it is): message-mode handles, the stdlib's calls.
        self._transport: FdTransport | None = None
        self._reader: GreedyReader | None = None
        self._writer: FrameWriter | None = None
        self._wpoll: Poller | None = None
        if _platform.POSIX_FDS:
            fd = conn.fileno()
            self._transport = open_transport(fd)
            self._reader = GreedyReader(self._transport, max_message_size)
            self._writer = FrameWriter(self._transport, on_torn=self.send_eof)
            self._wpoll = poller(fd, writable=True)
        self._pending_recv: BlockingCall[bytes] | None = None
        self._calls = ThreadCalls()
        self._closed = False
        self.broken: str | None = None
        # A thread per direction, kept between calls (see _threads.KeptThread).
        self._workers = (KeptThread("asyncmp-recv"), KeptThread("asyncmp-send"))
        # How many calls may still use the handle (counted from the loop when a call is
        # made, down in its thread when it ends); the last one out after close() closes
        # the handle. Guarded by _active_lock.
        self._active = 0
        self._active_lock = threading.Lock()
        self._released = False
        # Events of the tasks waiting on a call, set by close() to wake them at once.
        self._wakers: set[anyio.Event] = set()

    # -- the calls ----------------------------------------------------------------------

    async def _start(
        self, fn: Callable[[BlockingCall[_R]], _R], name: str, worker: KeptThread
    ) -> BlockingCall[_R]:
        """Start a call of *fn* that counts as a user of the handle until it has returned.

        :raises anyio.ClosedResourceError: this end is closed."""

        def run(call: BlockingCall[_R]) -> _R:
            try:
                return fn(call)
            finally:
                self._leave()

        with self._active_lock:
            if self._closed:
                raise anyio.ClosedResourceError
            self._active += 1
        try:
            return await self._calls.start(run, name=name, worker=worker, limited=False)
        except BaseException:
            self._leave()  # it never ran
            raise

    def _leave(self) -> None:
        with self._active_lock:
            self._active -= 1
            release = self._closed and self._active == 0 and not self._released
            if release:
                self._released = True
        if release:
            self._release()

    def _release(self) -> None:
        # Only once no thread uses the handle: closing a descriptor under a thread that
        # still reads or writes it could hand that thread a reused descriptor number.
        try:
            if self._transport is not None:
                self._transport.close()
        finally:
            self._conn.close()

    async def _wait(self, call: BlockingCall[Any]) -> None:
        """Wait until *call* has finished, or until this end is closed."""
        if self._closed:
            return
        waker = anyio.Event()

        def wake(_: BlockingCall[Any]) -> None:
            waker.set()

        self._wakers.add(waker)
        call.add_done_callback(wake)
        try:
            await waker.wait()
        finally:
            # A receive cancelled again and again while one call waits for a silent peer
            # leaves nothing behind on that call.
            call.remove_done_callback(wake)
            self._wakers.discard(waker)

    # -- receiving ----------------------------------------------------------------------

    def _blocking_recv(self, call: BlockingCall[bytes]) -> bytes:
        # No maxlength here: a receive cancelled while this runs hands the frame to the
        # next receive, which may have another maxlength. The frame is bounded by
        # max_message_size; each receive checks its own maxlength when it takes it.
        conn = self._conn
        reader = self._reader
        while not call.stopping:
            if reader is not None:
                try:
                    return reader.recv_frame_nowait(None)
                except anyio.WouldBlock:
                    conn.poll(THREAD_SLICE)
            elif self._stdlib_poll(THREAD_SLICE):
                return self._stdlib_recv(None)
        raise anyio.ClosedResourceError

    def _stdlib_poll(self, timeout: float) -> bool:
        try:
            return self._conn.poll(timeout)
        except BrokenPipeError:
            # A Windows PipeConnection's poll() raises this once the peer has closed
            # (python/cpython#85180); recv_bytes() then returns what is left, or EOF.
            return True

    def _stdlib_recv(self, maxlength: int | None) -> bytes:
        limit = self._limit if maxlength is None else maxlength
        try:
            return self._conn.recv_bytes(limit)
        except (EOFError, OSError) as exc:
            error = stdlib_recv_error(exc, limit)
            if error is None:
                raise
            raise error from None

    def _check_maxlength(self, frame: bytes, maxlength: int | None) -> bytes:
        if maxlength is not None and len(frame) > maxlength:
            raise maxlength_exceeded(len(frame), maxlength)
        return frame

    async def recv_frame(self, maxlength: int | None, *, nothing_there: bool = False) -> bytes:
        call = self._pending_recv
        if call is None:
            await checkpoint_if_cancelled()
            call = await self._start(self._blocking_recv, "asyncmp-recv", self._workers[0])
            self._pending_recv = call
        await self._wait(call)
        return self._collect(call, maxlength)

    def _collect(self, call: BlockingCall[bytes], maxlength: int | None) -> bytes:
        if self._closed:
            raise anyio.ClosedResourceError
        self._pending_recv = None
        return self._check_maxlength(call.result(), maxlength)

    def recv_frame_nowait(self, maxlength: int | None) -> bytes:
        call = self._pending_recv
        if call is not None:
            # finished, not done: outside a loop (after it ended) the loop never hears.
            if not call.finished:
                raise anyio.WouldBlock
            return self._collect(call, maxlength)
        if self._reader is not None:
            return self._reader.recv_frame_nowait(maxlength)
        # Windows pipes are message mode: poll() true means a whole message is there.
        if not self._stdlib_poll(0):
            raise anyio.WouldBlock
        return self._stdlib_recv(maxlength)

    # -- sending ------------------------------------------------------------------------

    def _blocking_send(
        self, call: BlockingCall[None], payload: memoryview, done: list[int]
    ) -> None:
        """Send one frame; *done* counts its bytes written so far (POSIX)."""
        writer, wpoll = self._writer, self._wpoll
        if writer is None or wpoll is None:
            try:
                self._conn.send_bytes(payload)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise anyio.BrokenResourceError(PEER_CLOSED) from exc
            return
        slice_ms = int(THREAD_SLICE * 1000)
        writer.send_blocking(payload, wpoll, slice_ms, call.stop_requested, done)

    async def send_frame(self, payload: memoryview, already: int = -1) -> None:
        # No fast path here: already is always -1, and this is the cancellation point.
        await checkpoint_if_cancelled()
        done = [0]
        total = len(encode_header(len(payload))) + len(payload)
        call: BlockingCall[None] = await self._start(
            lambda c: self._blocking_send(c, payload, done), "asyncmp-send", self._workers[1]
        )
        try:
            await self._wait(call)
        except anyio.get_cancelled_exc_class():
            # The write can't be taken back: let it finish (bounded), else stop it and
            # break the connection if part of the frame went out.
            with anyio.move_on_after(_frames.SEND_SHIELD_SECONDS, shield=True):
                await self._wait(call)
            if not call.finished and not self._closed:
                call.request_stop()
                if self._writer is not None:  # POSIX: it stops within a slice
                    with anyio.move_on_after(_frames.SEND_SHIELD_SECONDS, shield=True):
                        await self._wait(call)
                if not _has_finished(call) or 0 < done[0] < total:
                    self.broken = torn_send(done[0], total)
                    if not self._closed:  # closed meanwhile: the handle may be gone
                        self.send_eof()  # the peer sees EOF, never a torn frame and more
            raise
        if self._closed:
            # The frame in progress is cut: the peer sees the end of the stream in it.
            raise anyio.ClosedResourceError
        call.result()

    def send_eof(self) -> None:
        # A Windows pipe handle has no half-close, and os.dup() can't copy a Windows
        # socket handle; POSIX descriptors get what the fd route does.
        if _platform.POSIX_FDS:
            _shutdown_socket_write(self._conn.fileno())

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        with self._active_lock:
            self._closed = True
            release = self._active == 0 and not self._released
            if release:
                self._released = True
        try:
            for waker in self._wakers:
                waker.set()  # the tasks waiting on a call raise ClosedResourceError now
            self._wakers.clear()
            self._calls.stop()
            for worker in self._workers:
                worker.close()  # its thread ends once its call (if any) has returned
        finally:
            if release:
                self._release()

    async def aclose(self) -> None:
        self.close()
        calls = list(self._calls)
        with anyio.CancelScope(shield=True):
            for call in calls:
                if call.finished:
                    continue  # maybe in a loop that has ended: it would never say so
                with anyio.move_on_after(_frames.SEND_SHIELD_SECONDS + 1.0):
                    await call.wait()
        for call in calls:
            call.join(0.5)
        for worker in self._workers:
            thread = worker.thread
            if thread is not None:
                thread.join(0.5)

    def forget_in_forked_child(self) -> None:
        # No thread of the parent runs here: close this process's copies at once.
        self._closed = self._released = True
        if self._transport is not None:
            self._transport.close()
        _close_inherited(self._conn)
