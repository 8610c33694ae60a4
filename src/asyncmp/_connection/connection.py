"""AsyncConnection: the async end of a ``multiprocessing`` Pipe, Client or Listener.

An :class:`AsyncConnection` owns one ``multiprocessing.connection.Connection`` and moves
whole messages over it in the stdlib's own framing, so the other end can stay a plain
synchronous Connection in a worker process.

Its bytes move through a route (``_connection.routes``), behind one interface
(:class:`~asyncmp._connection.routes.ConnectionRoute`): descriptor readiness and the frame engine
on POSIX, blocking calls in asyncmp's threads on Windows or on request. AsyncConnection
never asks which route it has; it keeps what every route shares: one fair lock per
direction (concurrent callers are served one at a time, first come first served), the
fast paths where the route offers them, the latch that stops a connection whose
incoming stream broke the framing, and the closing sequence.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import sys
from multiprocessing import BufferTooShort
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
from anyio.abc import ObjectStream
from anyio.lowlevel import checkpoint

from .._core import platform as _platform
from .._core.exceptions import ProtocolError
from .._core.frames import SEND_SHIELD_SECONDS as SEND_SHIELD_SECONDS
from .._core.loop import FairLock, LoopBinding, fast_checkpoint, thread_id
from .._core.wire import DEFAULT_MAX_MESSAGE_SIZE, dumps
from .routes import Connection, ConnectionRoute, FdRoute, ThreadRoute

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:
    from typing_extensions import TypeVar

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .._core.frames import FrameWriter, GreedyReader

if TYPE_CHECKING or sys.platform != "win32":
    from .._core.atfork import register_fork_owned
else:  # pragma: no cover
    register_fork_owned = None

__all__ = ("AsyncConnection", "Pipe")

#: Unpickles a received frame, as ``Connection.recv()`` does.
_unpickle_frame = ForkingPickler.loads

#: What an AsyncConnection receives and sends; ``Any`` unless the code says otherwise.
T = TypeVar("T", default=Any)


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


class _FramedEnd:
    """What an :class:`AsyncConnection` is below its objects: an end that moves whole
    frames over its route, in turn (a fair lock each way), with the one ``ProtocolError``
    latch, the checks every call makes first, and closing. :class:`AsyncConnection` adds
    the objects (pickling, the fast path of ``recv()``) and the constructor, which sets
    the attributes used here."""

    _conn: Connection
    _route: ConnectionRoute
    _fast_reader: GreedyReader | None
    _fast_writer: FrameWriter | None
    _readable: bool
    _writable: bool
    _recv_lock: FairLock
    _send_lock: FairLock
    _closed: bool
    _why_closed: str
    _owner: LoopBinding
    _protocol_error: str | None

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
        return self._route.uses_threads

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
        broken = self._route.broken
        if broken is not None:
            raise anyio.BrokenResourceError(broken)
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
        :raises RuntimeError: called from another event loop than the one this connection
            belongs to, while that one still runs (see :class:`AsyncConnection`).
        """
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        return await self._recv_frame(maxlength)

    async def recv_bytes_into(self, buffer: Buffer, offset: int = 0) -> int:
        """Receive the next message's bytes into *buffer* from byte *offset* on, and return
        the message's length, as ``Connection.recv_bytes_into()`` does.

        *buffer* is a writable, C-contiguous bytes-like object (a ``bytearray``, an
        ``mmap``, an array). On the descriptor route a large message is read straight
        into it, with no copy on the way: give a buffer used again and again, and a big
        message moves at the speed of the pipe (a fresh ``bytes`` from
        :meth:`recv_bytes` costs the system zeroing fresh pages too). The thread route
        receives the message, then copies it in.

        If cancelled, no message was consumed: the next call returns the whole message.
        What was read of it into *buffer* was copied back first (about a millisecond per
        2 MiB, with the loop's turn in between), so *buffer* may have been written to.

        :raises multiprocessing.BufferTooShort: the message doesn't fit; it was consumed,
            and is the exception's ``args[0]``, as with the stdlib.
        :raises ValueError: *offset* is negative or past the end of *buffer*.
        :raises TypeError: *buffer* is not writable or not contiguous.
        Also what :meth:`recv_bytes` raises.
        """
        with memoryview(buffer) as view:
            if view.readonly:
                raise TypeError("recv_bytes_into() needs a writable buffer")
            if offset < 0:
                raise ValueError("negative offset")
            if offset > view.nbytes:
                raise ValueError("offset too large")
            with view.cast("B") as flat, flat[offset:] as target:
                got = await self._recv_into(target)
        if isinstance(got, bytes):
            raise BufferTooShort(got)
        return got

    async def _recv_into(self, target: memoryview) -> int | bytes:
        self._owner.check()
        reader = self._fast_reader
        lock = self._recv_lock
        try:
            self._check_readable()
            await lock.acquire_fast()
            try:
                self._check_readable()
                if reader is not None:
                    return await reader.recv_frame_into(target)
                frame = await self._route.recv_frame(None)
            finally:
                lock.release()
        except ProtocolError as exc:
            self._latch(exc)
            raise
        if len(frame) > len(target):
            return frame
        target[: len(frame)] = frame
        return len(frame)

    async def _recv_frame(self, maxlength: int | None, *, nothing_there: bool = False) -> bytes:
        """Every receive but the fast path's first look comes through here, in turn.
        *nothing_there*: the caller just looked and found nothing, with no await since."""
        self._owner.check()
        lock = self._recv_lock
        try:
            self._check_readable()
            if await lock.acquire_fast():  # first come, first served
                nothing_there = False
            try:
                self._check_readable()
                return await self._route.recv_frame(maxlength, nothing_there=nothing_there)
            finally:
                lock.release()
        except ProtocolError as exc:
            self._latch(exc)
            raise

    def _latch(self, exc: ProtocolError) -> None:
        """The incoming stream can't be trusted any more: refuse to go on, both ways,
        whatever the route would make of the bytes that follow."""
        self._protocol_error = str(exc)

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
        :raises RuntimeError: called from another event loop than the one this connection
            belongs to, while that one still runs (see :class:`AsyncConnection`).
        """
        self._owner.check()
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
        writer = self._fast_writer
        if writer is not None and not lock.locked():
            # Fast path: nobody else is sending. After the cancellation check (and the
            # loop's turn every ms), write what fits at once, with no await in between,
            # so no other sender can slip in. A frame that did not go out whole takes
            # the lock before anything awaits and is finished on the async path, which
            # finishes or breaks a frame torn by a cancellation.
            await fast_checkpoint()
            if not lock.locked():
                self._check_writable()
                written = writer.send_nowait(payload)
                if written is None:
                    return
                lock.acquire_nowait()
                try:
                    await writer.send(payload, written)
                finally:
                    lock.release()
                return
        await lock.acquire_fast()  # first come, first served
        try:
            self._check_writable()
            await self._route.send_frame(payload)
        finally:
            lock.release()

    async def send_eof(self) -> None:
        """Tell the peer no more messages come (``shutdown(SHUT_WR)`` on a socket).

        On a pipe end, which has no half-close, this does nothing; close it instead.
        It waits for the sends in progress or queued before it, so their messages go
        out whole. If cancelled while waiting, nothing happened.

        :raises anyio.ClosedResourceError: this end was closed.
        """
        self._owner.check()
        self._check_open()
        async with self._send_lock:
            self._check_open()
            self._route.send_eof()
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
        self._close()

    def _close(self) -> bool:
        """What close() and aclose() both do; True if this call closed the end."""
        if self._closed:
            return False
        self._closed = True
        self._route.close()
        return True

    async def aclose(self) -> None:
        """Close this end as :meth:`close` does; on the thread route, also wait for
        asyncmp's threads to end.

        It is a checkpoint; closing happens even if it is cancelled. It raises nothing,
        and closing a closed end does nothing, but for the ``RuntimeError`` of a call
        from another event loop than its own (which closes nothing: use :meth:`close`).
        """
        self._owner.check()
        if self._close():
            await self._route.aclose()
        await checkpoint()

    def _forget_in_forked_child(self) -> None:
        self._closed = True
        self._why_closed = _INHERITED
        self._route.forget_in_forked_child()


class AsyncConnection(_FramedEnd, ObjectStream[T]):
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

    ``AsyncConnection[T]``, an ``anyio.abc.ObjectStream[T]``, says what it carries:
    :meth:`recv` returns ``T`` and :meth:`send` takes one (``Any`` without a type
    argument; nothing is checked at run time).

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

    An AsyncConnection belongs to the event loop that first awaits one of its methods, for
    as long as that loop runs: an awaited method called from a loop in another thread
    meanwhile raises ``RuntimeError`` at once, which says how to call it through its own
    loop (``anyio.from_thread.run`` with that loop's token, or a ``BlockingPortal``). Once
    that loop has ended, the next loop to use it takes it over.
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
        self._route: ConnectionRoute = (
            ThreadRoute(conn, max_message_size) if use_threads else FdRoute(conn, max_message_size)
        )
        # The fast paths, where the route has them (read once: they are the hot paths).
        self._fast_reader = self._route.fast_reader
        self._fast_writer = self._route.fast_writer
        self._readable = conn.readable
        self._writable = conn.writable
        self._recv_lock = FairLock()
        self._send_lock = FairLock()
        self._closed = False
        self._why_closed = _CLOSED_HERE
        self._owner = LoopBinding("this AsyncConnection")
        # Set by the first ProtocolError: the incoming stream can't be trusted from then
        # on, whatever the route would make of the bytes that follow.
        self._protocol_error: str | None = None
        if register_fork_owned is not None:
            register_fork_owned(self)

    # -- receiving objects ---------------------------------------------------------------

    async def recv(self) -> T:
        """Receive the next message and unpickle it, as ``Connection.recv()`` does.

        If cancelled, no message was consumed; the next call returns it. Raises what
        :meth:`recv_bytes` raises, and whatever unpickling raises (the message is then
        consumed, the connection stays usable).
        """
        if thread_id() != self._owner.thread:  # the check(), inlined: the hot path
            self._owner.claim()
        reader = self._fast_reader
        if reader is not None and not self._recv_lock.locked():
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
                    frame = reader.take_frame()
                except ProtocolError as exc:
                    self._latch(exc)
                    raise
                if frame is None:
                    # Nothing here yet: wait in turn (no await since the look).
                    frame = await self._recv_frame(None, nothing_there=True)
                return self._unpickle(frame)
        return self._unpickle(await self._recv_frame(None))

    def recv_nowait(self) -> T:
        """Return the next message if all of it has arrived.

        It may be called outside an event loop (after it ended, say, to drain the
        messages that are there before closing).

        :raises anyio.WouldBlock: no whole message is there (or another task is
            receiving); bytes of a partial one stay buffered. It is anyio's exception,
            as its memory object streams' ``receive_nowait()`` raise, not
            ``queue.Empty``: a connection is an anyio object stream between two ends,
            not a queue (an :class:`AsyncQueue`'s ``get_nowait()`` raises
            ``queue.Empty``).
        :raises ConnectionEOF: the peer closed its end and every message was delivered.
        :raises ProtocolError: as for :meth:`recv_bytes`.
        :raises anyio.ClosedResourceError: this end was closed.
        """
        self._check_readable()
        if self._recv_lock.locked():
            raise anyio.WouldBlock(
                "another task is receiving on this connection: the next message is its;"
                " await recv() to take the one after"
            )
        try:
            frame = self._route.recv_frame_nowait(None)
        except anyio.WouldBlock:
            raise anyio.WouldBlock(
                "no whole message has arrived yet: await recv() to wait for one"
            ) from None
        except ProtocolError as exc:
            self._latch(exc)
            raise
        return self._unpickle(frame)

    # The two places a message is pickled and unpickled, for a subclass to wrap (a
    # connection to another machine refuses shared memory there).
    def _unpickle(self, frame: bytes) -> T:
        return _unpickle_frame(frame)  # type: ignore[no-any-return]

    def _pickle(self, obj: T) -> bytes:
        return dumps(obj)

    async def receive(self) -> T:
        """``anyio.abc.ObjectReceiveStream`` name for :meth:`recv`.

        Cancellation and exceptions: as :meth:`recv` (a clean EOF raises
        :class:`ConnectionEOF`, which is an ``anyio.EndOfStream``).
        """
        return await self.recv()

    # -- sending objects -----------------------------------------------------------------

    async def send(self, obj: T) -> None:
        """Pickle *obj* and send it, as ``Connection.send()`` does.

        The object is pickled first, in the caller: an unpicklable object raises here and
        nothing is sent. Cancellation: as :meth:`send_bytes`.

        :raises pickle.PicklingError: (or whatever pickling raises) *obj* can't be
            pickled; nothing was sent.
        :raises anyio.BrokenResourceError: as for :meth:`send_bytes`.
        :raises anyio.ClosedResourceError: this end was closed.
        :raises RuntimeError: as for :meth:`send_bytes`; nothing was pickled.
        """
        if thread_id() != self._owner.thread:  # the check(), inlined: the hot path
            self._owner.claim()
        self._check_writable()
        await self._send_frame(memoryview(self._pickle(obj)))

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
