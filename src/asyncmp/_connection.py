"""AsyncConnection: the async end of a ``multiprocessing`` Pipe, Client or Listener.

An :class:`AsyncConnection` owns one ``multiprocessing.connection.Connection`` and moves
whole messages over it in the stdlib's own framing, so the other end can stay a plain
synchronous Connection in a worker process.

Two I/O routes sit behind one small interface:

* :class:`_FdIO` (POSIX): waits for readiness through a private epoll/kqueue helper and
  moves only the bytes that are there (see ``_fdio``). Bytes that arrived but don't
  make a whole frame yet stay in the connection's decoder, so a cancelled receive loses
  nothing: the next receive picks up where it stopped.
* :class:`_ThreadIO` (Windows pipe handles, or on request): runs the stdlib's own
  blocking calls in asyncmp's threads (see ``_threads``). A receive abandoned on
  cancellation keeps running, and its message goes to the next receive.

Both serve concurrent callers one at a time, first come first served, through a fair
lock per direction.
"""

from __future__ import annotations

import errno
import io
import multiprocessing
import multiprocessing.connection
import socket
import sys
import threading
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
from anyio.abc import ObjectStream
from anyio.lowlevel import checkpoint, checkpoint_if_cancelled

from . import _frames, _platform
from ._exceptions import ConnectionEOF, ProtocolError
from ._frames import (
    PEER_CLOSED,
    FrameWriter,
    GreedyReader,
    maxlength_exceeded,
    torn_send,
)
from ._frames import SEND_SHIELD_SECONDS as SEND_SHIELD_SECONDS
from ._loop import FairLock, fast_checkpoint
from ._threads import THREAD_SLICE, BlockingCall, KeptThread
from ._wire import DEFAULT_MAX_MESSAGE_SIZE, encode_header

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:
    from typing_extensions import TypeVar

if TYPE_CHECKING:
    from typing import TypeAlias

    from typing_extensions import Buffer

if TYPE_CHECKING or sys.platform != "win32":
    from ._fdio import (
        FdTransport,
        open_transport,
        poller,
        register_fork_owned,
        socket_over_dup,
    )
else:  # pragma: no cover
    register_fork_owned = None

__all__ = ("AsyncConnection", "Pipe")

#: What a blocking call of the thread route returns.
_R = TypeVar("_R")

if sys.platform == "win32":
    # A Windows Pipe() end is a PipeConnection, a sibling of Connection (a socket end).
    Connection: TypeAlias = (
        "multiprocessing.connection.Connection | multiprocessing.connection.PipeConnection"
    )
else:
    Connection: TypeAlias = multiprocessing.connection.Connection

#: Unpickles a received frame, as ``Connection.recv()`` does.
_unpickle_frame = ForkingPickler.loads

#: What an AsyncConnection receives and sends; ``Any`` unless the code says otherwise.
T = TypeVar("T", default=Any)


def _dumps(obj: Any) -> bytes:
    """Pickle *obj* as ``Connection.send()`` does, into ``bytes``.

    ``ForkingPickler.dumps()`` returns a memoryview exported from a BytesIO. If that view
    ends up in a reference cycle (an exception's traceback kept by a thread-route call
    holds the frames that hold it), Python 3.13's garbage collector finalizes the BytesIO
    before the view and reports a BufferError. ``getvalue()`` hands over the BytesIO's
    own buffer, without a copy.
    """
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return buf.getvalue()


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


class _FdIO:
    """POSIX route: readiness through a helper descriptor, never a thread. The frame
    engine does the work: a greedy reader and a writer over one transport."""

    __slots__ = ("__weakref__", "_closed", "_fd", "_transport", "reader", "writer")

    def __init__(self, conn: Connection, max_message_size: int | None) -> None:
        self._fd = fd = conn.fileno()
        self._transport: FdTransport = open_transport(fd)
        self.reader = GreedyReader(self._transport, max_message_size)
        self.writer = FrameWriter(self._transport, on_torn=lambda: _shutdown_socket_write(fd))
        self._closed = False
        register_fork_owned(self)

    @property
    def broken(self) -> str | None:
        return self.writer.broken

    # -- receiving ----------------------------------------------------------------------

    async def recv_frame(self, maxlength: int | None, *, nothing_there: bool = False) -> bytes:
        return await self.reader.recv_frame(maxlength, nothing_there=nothing_there)

    def take_frame(self) -> bytes | None:
        return self.reader.take_frame()

    def recv_frame_nowait(self, maxlength: int | None) -> bytes:
        return self.reader.recv_frame_nowait(maxlength)

    # -- sending ------------------------------------------------------------------------

    def send_frame_nowait(self, payload: memoryview) -> int | None:
        return self.writer.send_nowait(payload)

    async def send_frame(self, payload: memoryview, already: int = -1) -> None:
        await self.writer.send(payload, already)

    def send_eof(self) -> None:
        # Never leave a torn frame followed by more data: make the peer see EOF.
        _shutdown_socket_write(self._fd)

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        try:
            self.reader.close()
            self.writer.close()
        finally:
            self._transport.close()

    async def aclose(self) -> None:
        self.close()

    def _forget_in_forked_child(self) -> None:
        self._closed = True
        self._transport.close()


def _has_finished(call: BlockingCall[Any]) -> bool:
    """``call.finished``, read anew (a type checker would keep an earlier reading)."""
    return call.finished


class _ThreadIO:
    """Route for handles the loop can't watch: blocking calls in asyncmp threads.

    Receiving: a Windows pipe handle is message-mode, so the stdlib's ``recv_bytes()``
    reads exactly one whole message once ``poll()`` says one is there. A POSIX
    descriptor is a byte stream, so there the thread waits with ``poll()`` and frames
    the bytes with the same non-blocking decoder as the fd route (``_FdIO``): hostile
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
        "_frames",
        "_limit",
        "_pending_recv",
        "_released",
        "_wakers",
        "_workers",
        "_wpoll",
        "broken",
    )

    def __init__(self, conn: Connection, max_message_size: int | None) -> None:
        self._conn = conn
        self._limit = max_message_size
        # Windows (or a test that says it is): message-mode handles, the stdlib's calls.
        self._frames = _FdIO(conn, max_message_size) if _platform.POSIX_FDS else None
        self._wpoll = poller(conn.fileno(), writable=True) if _platform.POSIX_FDS else None
        self._pending_recv: BlockingCall[bytes] | None = None
        self._calls: set[BlockingCall[Any]] = set()
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

    def _call(
        self, fn: Callable[[BlockingCall[_R]], _R], name: str, worker: KeptThread
    ) -> BlockingCall[_R]:
        """A call of *fn* that counts as a user of the handle until it has returned."""

        def run(call: BlockingCall[_R]) -> _R:
            try:
                return fn(call)
            finally:
                self._leave()

        with self._active_lock:
            if self._closed:
                raise anyio.ClosedResourceError
            self._active += 1
        return BlockingCall(run, name=name, worker=worker, limited=False)

    async def _start(self, call: BlockingCall[Any]) -> None:
        try:
            await call.start()
        except BaseException:
            self._leave()  # it never ran
            raise
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

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
            if self._frames is not None:
                self._frames.close()
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
        frames = self._frames
        while not call.stopping:
            if frames is not None:
                try:
                    return frames.recv_frame_nowait(None)
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
        except EOFError:
            raise ConnectionEOF(PEER_CLOSED) from None
        except OSError as exc:
            if exc.args and exc.args[0] == "bad message length":
                raise ProtocolError(f"message exceeds the limit of {limit} bytes") from None
            if exc.args and "end of file" in str(exc.args[0]):
                raise ConnectionEOF(f"{PEER_CLOSED} mid-message") from None
            if exc.errno in (errno.ECONNRESET, errno.ECONNABORTED):
                raise ConnectionEOF(PEER_CLOSED) from None
            raise

    def _check_maxlength(self, frame: bytes, maxlength: int | None) -> bytes:
        if maxlength is not None and len(frame) > maxlength:
            raise maxlength_exceeded(len(frame), maxlength)
        return frame

    async def recv_frame(self, maxlength: int | None, *, nothing_there: bool = False) -> bytes:
        call = self._pending_recv
        if call is None:
            await checkpoint_if_cancelled()
            call = self._call(self._blocking_recv, "asyncmp-recv", self._workers[0])
            await self._start(call)
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
        if self._frames is not None:
            return self._frames.recv_frame_nowait(maxlength)
        # Windows pipes are message mode: poll() true means a whole message is there.
        if not self._stdlib_poll(0):
            raise anyio.WouldBlock
        return self._stdlib_recv(maxlength)

    # -- sending ------------------------------------------------------------------------

    def _blocking_send(
        self, call: BlockingCall[None], payload: memoryview, done: list[int]
    ) -> None:
        """Send one frame; *done* counts its bytes written so far (POSIX)."""
        frames, wpoll = self._frames, self._wpoll
        if frames is None or wpoll is None:
            try:
                self._conn.send_bytes(payload)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise anyio.BrokenResourceError(PEER_CLOSED) from exc
            return
        slice_ms = int(THREAD_SLICE * 1000)
        frames.writer.send_blocking(payload, wpoll, slice_ms, call.stop_requested, done)

    async def send_frame(self, payload: memoryview) -> None:
        await checkpoint_if_cancelled()
        done = [0]
        total = len(encode_header(len(payload))) + len(payload)
        call: BlockingCall[None] = self._call(
            lambda c: self._blocking_send(c, payload, done), "asyncmp-send", self._workers[1]
        )
        await self._start(call)
        try:
            await self._wait(call)
        except anyio.get_cancelled_exc_class():
            # The write can't be taken back: let it finish (bounded), else stop it and
            # break the connection if part of the frame went out.
            with anyio.move_on_after(_frames.SEND_SHIELD_SECONDS, shield=True):
                await self._wait(call)
            if not call.finished and not self._closed:
                call.request_stop()
                if self._frames is not None:  # POSIX: it stops within a slice
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
            for call in self._calls:
                call.request_stop()
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


def _connection_like(conn: object) -> bool:
    """Has what AsyncConnection uses of a Connection (a Windows PipeConnection is a
    sibling of Connection, not a subclass: ask for the methods instead)."""
    return hasattr(conn, "closed") and all(
        callable(getattr(conn, name, None))
        for name in ("fileno", "poll", "recv_bytes", "send_bytes", "close")
    )


def _not_a_connection(conn: object) -> TypeError:
    if isinstance(conn, AsyncConnection):
        return TypeError(
            "this is already an AsyncConnection: use it as it is, or wrap its plain "
            "multiprocessing Connection (its .connection) only once"
        )
    message = (
        "AsyncConnection wraps a multiprocessing Connection (an end of "
        "multiprocessing.Pipe(), or one from Client() or Listener.accept()), "
        f"not {type(conn).__module__}.{type(conn).__qualname__}"
    )
    if callable(getattr(conn, "get", None)) and callable(getattr(conn, "put", None)):
        message += "; for a queue, use AsyncQueue"
    return TypeError(message)


_CLOSED_HERE = "this AsyncConnection was closed (close() or aclose())"
_INHERITED = (
    "this AsyncConnection was inherited by a forked child process and is closed here: "
    "its end belongs to the parent. Give the child a plain multiprocessing Connection "
    "instead, the other end of the pipe (asyncmp.Pipe() returns it second), and wrap it "
    "in an AsyncConnection in the child if the child is async"
)


class AsyncConnection(ObjectStream[T]):
    """The async end of a ``multiprocessing.connection.Connection``.

    Wraps *conn* (either end of ``multiprocessing.Pipe()``, or a connection from
    ``multiprocessing.connection.Client`` or ``Listener.accept()``) and owns it from
    then on: closing the AsyncConnection closes *conn*. The peer can be a plain
    synchronous Connection; the bytes on the wire are the stdlib's.

    On POSIX the descriptor is closed in any child forked after this call, so a worker
    never holds a copy of this end and sees EOF once it is closed here. An
    AsyncConnection belongs to the process that made it: pickling it, or passing it to
    a spawned child, raises ``TypeError``; a forked child that uses its copy gets
    ``anyio.ClosedResourceError``. Give a child the plain Connection at the other end.

    ``AsyncConnection[T]`` says what it carries: :meth:`recv` returns ``T`` and
    :meth:`send` takes one (``Any`` without a type argument; nothing is checked at run
    time).

    ``async for msg in conn`` receives until the peer closes its end (the iteration then
    ends instead of raising :class:`ConnectionEOF`); each step is a :meth:`recv`, with its
    cancellation behaviour and exceptions. ``async with conn`` calls :meth:`aclose` on the
    way out.

    :param max_message_size: the largest payload accepted, in bytes. A header that
        announces more raises :class:`ProtocolError` before anything of that size is
        allocated. ``None`` means no limit.
    :param use_threads: ``None`` picks the route by platform: descriptor readiness on
        POSIX, threads on Windows. ``True`` forces the thread route anywhere. The thread
        route runs at most one thread per direction per connection, and asyncmp's thread
        limiter doesn't count them: any number of connections may wait at once.
    :raises TypeError: *conn* is not a ``multiprocessing`` Connection.
    :raises anyio.ClosedResourceError: *conn* is closed already.

    Outside an event loop (before it starts, after it ended, or in a process that never
    runs one) these work: the constructor and :func:`Pipe`, :meth:`close`,
    :meth:`recv_nowait`, :meth:`fileno` and the properties. Everything else is awaited.
    None of them is thread-safe: call them from the thread that runs the loop, if one runs.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        use_threads: bool | None = None,
    ) -> None:
        if not _connection_like(conn):  # an AsyncConnection is not: it has no poll()
            raise _not_a_connection(conn)
        if conn.closed:
            raise anyio.ClosedResourceError("the connection is already closed")
        if max_message_size is not None and max_message_size < 0:
            # Checked before the route opens descriptors of its own.
            raise ValueError(f"max_message_size={max_message_size} is negative")
        if use_threads is None:
            use_threads = not _platform.POSIX_FDS
        elif not use_threads and not _platform.POSIX_FDS:
            raise ValueError("use_threads=False needs POSIX descriptors; Windows takes threads")
        self._conn = conn
        self._io: _FdIO | _ThreadIO = (
            _ThreadIO(conn, max_message_size) if use_threads else _FdIO(conn, max_message_size)
        )
        self._readable = conn.readable
        self._writable = conn.writable
        self._recv_lock = FairLock()
        self._send_lock = FairLock()
        self._closed = False
        self._why_closed = _CLOSED_HERE
        # Set by the first ProtocolError: the incoming stream can't be trusted from then
        # on, whatever the route would make of the bytes that follow.
        self._protocol_error: str | None = None
        if register_fork_owned is not None:
            register_fork_owned(self)

    # -- properties ---------------------------------------------------------------------

    @property
    def connection(self) -> Connection:
        """The wrapped ``multiprocessing`` Connection (owned by this object)."""
        return self._conn

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def readable(self) -> bool:
        return self._conn.readable

    @property
    def writable(self) -> bool:
        return self._conn.writable

    @property
    def uses_threads(self) -> bool:
        """True if this connection takes the thread route."""
        return isinstance(self._io, _ThreadIO)

    def fileno(self) -> int:
        """The descriptor (or handle) of the wrapped connection (also outside a loop).

        :raises anyio.ClosedResourceError: this end was closed."""
        self._check_open()
        return self._conn.fileno()

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError(self._why_closed)

    def _check_readable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError(self._why_closed)
        if self._protocol_error is not None:
            raise ProtocolError(self._protocol_error)
        if not self._readable:
            raise OSError("connection is write-only")

    def _check_writable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError(self._why_closed)
        if self._protocol_error is not None:
            raise anyio.BrokenResourceError(self._protocol_error)
        if self._io.broken is not None:
            raise anyio.BrokenResourceError(self._io.broken)
        if not self._writable:
            raise OSError("connection is read-only")

    # -- receiving ----------------------------------------------------------------------

    async def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive the next message's bytes, as ``Connection.recv_bytes()`` does.

        If cancelled, no message was consumed: bytes of a partly received message stay
        buffered, and the next call returns the whole message.

        :raises ConnectionEOF: the peer closed its end (after every complete message was
            delivered); also an ``EOFError`` and an ``anyio.EndOfStream``.
        :raises ProtocolError: the stream broke the framing, or a message exceeds
            ``max_message_size`` or *maxlength*. The connection is broken from then on.
            *maxlength* is this call's own: a receive cancelled before it does not pass
            its *maxlength* on. (On the thread route a message above *maxlength* but
            within ``max_message_size`` is read before it is refused.)
        :raises anyio.ClosedResourceError: this end was closed, before or during the call.
        :raises ValueError: *maxlength* is negative.
        :raises OSError: this end is write-only (the sending end of ``Pipe(False)``).
        """
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        return await self._recv_bytes(maxlength, nothing_there=False)

    async def _recv_bytes(self, maxlength: int | None, *, nothing_there: bool) -> bytes:
        self._check_readable()
        lock = self._recv_lock
        if await lock.acquire_fast():  # first come, first served
            nothing_there = False
        try:
            self._check_readable()
            return await self._io.recv_frame(maxlength, nothing_there=nothing_there)
        except ProtocolError as exc:
            self._protocol_error = str(exc)
            raise
        finally:
            lock.release()

    async def recv(self) -> T:
        """Receive the next message and unpickle it, as ``Connection.recv()`` does.

        If cancelled, no message was consumed; the next call returns it. Raises what
        :meth:`recv_bytes` raises, and whatever unpickling raises (the message is then
        consumed, the connection stays usable).
        """
        route = self._io
        if route.__class__ is _FdIO and not self._recv_lock.locked():
            # Fast path: a whole message already here needs no lock and no trip through
            # the loop, only the cancellation check (and the loop's turn every ms). No
            # other task can start receiving between the check and taking the frame:
            # there is no await in between.
            await fast_checkpoint()
            if (
                not self._recv_lock.locked()
                and not self._closed
                and self._protocol_error is None
                and self._readable
            ):
                try:
                    frame = route.take_frame()
                except ProtocolError as exc:
                    self._protocol_error = str(exc)
                    raise
                if frame is not None:
                    return _unpickle_frame(frame)  # type: ignore[no-any-return]
                # Nothing here yet: wait, holding the lock (no await since the check).
                lock = self._recv_lock
                lock.acquire_nowait()
                try:
                    frame = await route.recv_frame(None, nothing_there=True)
                except ProtocolError as exc:
                    self._protocol_error = str(exc)
                    raise
                finally:
                    lock.release()
                return _unpickle_frame(frame)  # type: ignore[no-any-return]
        return _unpickle_frame(await self._recv_bytes(None, nothing_there=False))  # type: ignore[no-any-return]

    def recv_nowait(self) -> T:
        """Return the next message if all of it has arrived.

        It may be called outside an event loop (after it ended, say, to drain the
        messages that are there before closing).

        :raises anyio.WouldBlock: no whole message is there (or another task is
            receiving); bytes of a partial one stay buffered.
        :raises ConnectionEOF: the peer closed its end and every message was delivered.
        :raises ProtocolError: as for :meth:`recv_bytes`.
        :raises anyio.ClosedResourceError: this end was closed.
        """
        self._check_readable()
        if self._recv_lock.locked():
            raise anyio.WouldBlock
        try:
            frame = self._io.recv_frame_nowait(None)
        except ProtocolError as exc:
            self._protocol_error = str(exc)
            raise
        return _unpickle_frame(frame)  # type: ignore[no-any-return]

    async def receive(self) -> T:
        """``anyio.abc.ObjectReceiveStream`` name for :meth:`recv`.

        Cancellation and exceptions: as :meth:`recv` (a clean EOF raises
        :class:`ConnectionEOF`, which is an ``anyio.EndOfStream``).
        """
        return await self.recv()

    # -- sending ------------------------------------------------------------------------

    async def send_bytes(self, buf: Buffer, offset: int = 0, size: int | None = None) -> None:
        """Send bytes as one message, as ``Connection.send_bytes()`` does.

        If cancelled before any byte went out, nothing was sent. If cancelled mid-message,
        the rest is sent under a shield for up to ``SEND_SHIELD_SECONDS``; if that is not
        enough, the connection is broken (the peer sees EOF, never a torn message followed
        by more data) and later sends raise ``anyio.BrokenResourceError``. On the thread
        route the write goes on in a thread meanwhile; on POSIX that thread stops at its
        next 50 ms slice once the shield has run out, on Windows the stdlib's write can't
        be stopped, and the connection is broken while it runs.

        :raises anyio.BrokenResourceError: the peer is gone, or an earlier send broke
            the connection.
        :raises anyio.ClosedResourceError: this end was closed, before or during the call
            (at once, on both routes). A message being written when this end was closed
            is cut: the peer sees the end of the stream inside it (on the thread route
            its thread may still finish the message in the moment before it stops).
        :raises ValueError: *offset* or *size* is negative or beyond the buffer.
        :raises OSError: this end is read-only (the receiving end of ``Pipe(False)``).
        """
        view = memoryview(buf).cast("B")
        n = len(view)
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        await self._send_frame(view[offset : offset + size])

    async def _send_frame(self, payload: memoryview) -> None:
        self._check_writable()
        lock = self._send_lock
        route = self._io
        if route.__class__ is _FdIO and not lock.locked():
            # Fast path: nobody else is sending. After the cancellation check (and the
            # loop's turn every ms), write what fits at once, with no await in between,
            # so no other sender can slip in. A frame that did not go out whole takes
            # the lock before anything awaits and is finished on the async path, which
            # finishes or breaks a frame torn by a cancellation.
            await fast_checkpoint()
            if not lock.locked():
                self._check_writable()
                written = route.send_frame_nowait(payload)
                if written is None:
                    return
                lock.acquire_nowait()
                try:
                    await route.send_frame(payload, written)
                finally:
                    lock.release()
                return
        await lock.acquire_fast()  # first come, first served
        try:
            self._check_writable()
            await self._io.send_frame(payload)
        finally:
            lock.release()

    async def send(self, obj: T) -> None:
        """Pickle *obj* and send it, as ``Connection.send()`` does.

        The object is pickled first, in the caller: an unpicklable object raises here and
        nothing is sent. Cancellation: as :meth:`send_bytes`.

        :raises pickle.PicklingError: (or whatever pickling raises) *obj* can't be
            pickled; nothing was sent.
        :raises anyio.BrokenResourceError: as for :meth:`send_bytes`.
        :raises anyio.ClosedResourceError: this end was closed.
        """
        self._check_writable()
        await self._send_frame(memoryview(_dumps(obj)))

    async def send_eof(self) -> None:
        """Tell the peer no more messages come (``shutdown(SHUT_WR)`` on a socket).

        On a pipe end, which has no half-close, this does nothing; close it instead.
        It waits for the sends in progress or queued before it, so their messages go
        out whole. If cancelled while waiting, nothing happened.

        :raises anyio.ClosedResourceError: this end was closed.
        """
        self._check_open()
        async with self._send_lock:
            self._check_open()
            self._io.send_eof()
        await checkpoint()

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Close this end now. Tasks waiting on it get ``anyio.ClosedResourceError`` at
        once; a message being sent is cut (the peer sees the end of the stream inside
        it), and the messages queued behind it are not sent.

        It may be called outside an event loop (before it starts, or after it ended). On
        the descriptor route the descriptor is closed before it returns. On the thread
        route it is closed by the last of asyncmp's threads that still use it, once that
        thread stops (within ``THREAD_SLICE``, 50 ms, on POSIX; on Windows a send in
        progress first has to return); :meth:`aclose` waits for that. It raises nothing,
        and closing a closed end does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._close_route()

    def _close_route(self) -> None:
        try:
            self._io.close()
        finally:
            if isinstance(self._io, _FdIO):
                self._conn.close()

    async def aclose(self) -> None:
        """Close this end as :meth:`close` does; on the thread route, also wait for
        asyncmp's threads to end.

        It is a checkpoint; closing happens even if it is cancelled. It raises nothing,
        and closing a closed end does nothing.
        """
        if not self._closed:
            self._closed = True
            self._close_route()
            await self._io.aclose()
        await checkpoint()

    def _forget_in_forked_child(self) -> None:
        self._closed = True
        self._why_closed = _INHERITED
        if isinstance(self._io, _FdIO):
            self._io._forget_in_forked_child()
        try:
            self._conn.close()
        except OSError:
            pass

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "an AsyncConnection can't be pickled or passed to another process: pass a plain "
            "multiprocessing Connection instead, the other end of the pipe (asyncmp.Pipe() "
            "returns it second), and wrap it in an AsyncConnection there if that process "
            "is async"
        )

    # async with and async for come from anyio's ObjectStream: aclose() on exit, and
    # receive() until EndOfStream (ConnectionEOF is one).

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        route = "threads" if self.uses_threads else "fd"
        return f"<asyncmp.AsyncConnection {state} route={route} conn={self._conn!r}>"


def Pipe(
    duplex: bool = True,
    *,
    max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
    use_threads: bool | None = None,
) -> tuple[AsyncConnection[Any], Connection]:
    """Return ``(async_end, worker_end)``: the first for this process, the second to hand
    to a worker. With ``duplex=False`` the async end is the receiving one."""
    a, b = multiprocessing.Pipe(duplex)
    try:
        return AsyncConnection(a, max_message_size=max_message_size, use_threads=use_threads), b
    except BaseException:
        a.close()
        b.close()
        raise
