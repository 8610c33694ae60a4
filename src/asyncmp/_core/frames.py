"""The frame engine: whole frames over a descriptor, between the codec and the I/O layer.

``_core.wire`` knows the framing and moves no bytes; ``_core.transport`` moves bytes without
blocking and knows no framing. This module puts the two together, once, for every adapter:

* :class:`GreedyReader` (connections): reads whatever is there, as much as the decoder
  can use, so one read may bring many small frames; a large body goes straight into the
  decoder's buffer. A connection's stream is its own, so reading ahead loses nothing.
* :class:`ExactReader` (queues): never reads past the frame in progress. A queue's pipe
  is shared by every consumer, and the next frame belongs to whoever takes the reader
  lock next. Its fast path (:meth:`ExactReader.take_whole`) asks ``FIONREAD`` what is
  there and reads a frame that is all there in two more reads (header, body);
  :meth:`ExactReader.read_available` goes on with a partial frame within a per-turn
  budget; :meth:`ExactReader.read_blocking` waits for the rest in a thread, each wait
  bounded by a stall timeout.
* :class:`OwnEndReader` (queues on Linux): an exact reader whose fast path needs no
  ``FIONREAD``: it reads the pipe's own read end (:class:`~asyncmp._core.transport.OwnReadEnd`),
  a non-blocking open file description that no other process shares.
  :func:`exact_reader` picks it where the pipe has one.
* :class:`FrameWriter`, the one frame writer: header and small payloads in one write,
  large ones in two; writes what fits, waits for room, and finishes a frame torn by a
  cancellation (shielded and bounded) or breaks the stream so the peer never sees a torn
  frame followed by more. From a thread, :meth:`FrameWriter.write_blocking` serves a
  connection's thread route and a queue's put alike.

A new read strategy (io_uring, say) is one more reader class here; the adapters keep
their shape.

Errors: bad framing raises :class:`ProtocolError` (connections) or
``anyio.BrokenResourceError`` (queues, whose error is the adapter's whole state); the
texts are defined once, below. The end of a stream is the decoder's to classify
(``FrameDecoder.feed_eof()``: clean at a frame boundary, or a frame cut short): a reader
that meets it passes that on to :func:`eof_error` (connections) or :func:`queue_eof`;
:func:`stdlib_recv_error` does the same for what the stdlib's own decoder raises.
"""

from __future__ import annotations

import errno
import math
import os
import sys
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from .exceptions import ConnectionEOF, ProtocolError
from .loop import fast_checkpoint, note_turn, turn_if_due
from .wire import (
    CLEAN_END,
    SPILL_THRESHOLD,
    FrameDecoder,
    StreamEnd,
    WireError,
    encode_header,
    unpack_short_header,
)

if TYPE_CHECKING or sys.platform != "win32":
    from .readiness import Poller, ReadinessWaiter
    from .transport import UNOPENED, FdTransport, OwnReadEnd

__all__ = (
    "BODY_READ",
    "COALESCE_LIMIT",
    "PEER_CLOSED",
    "READ_BUDGET",
    "SEND_SHIELD_SECONDS",
    "ExactReader",
    "FrameWriter",
    "GreedyReader",
    "OwnEndReader",
    "eof_error",
    "exact_reader",
    "frame_parts",
    "maxlength_exceeded",
    "queue_eof",
    "stalled",
    "stdlib_recv_error",
    "torn_send",
)

#: The most one read moves into the body of a large message (about a millisecond of
#: copying, a few where the pages are fresh), so the loop gets its turn in between.
BODY_READ = 2 << 20
#: The most an exact reader reads of one big item before the event loop gets a turn.
READ_BUDGET = 4 << 20
#: Payloads up to this size go out in one write together with their header.
COALESCE_LIMIT = 16 * 1024
#: How long a send cancelled mid-frame may go on, shielded, to finish its frame before
#: the connection is declared broken instead.
SEND_SHIELD_SECONDS = 2.0

PEER_CLOSED = "the peer closed the connection"
_CORRUPT_QUEUE = "corrupt queue framing: {}"
_QUEUE_CLOSED_MID_ITEM = "the queue's pipe was closed mid-item"


def eof_error(end: StreamEnd) -> ConnectionEOF:
    """The end of a connection's stream, as the decoder classified it (clean, or a message
    cut short, with what was held of it where that is known)."""
    if not end.truncated:
        return ConnectionEOF(PEER_CLOSED)
    if end.held is None:
        return ConnectionEOF(f"{PEER_CLOSED} mid-message")
    return ConnectionEOF(f"{PEER_CLOSED} mid-message ({end.held} bytes of it held)")


def queue_eof(end: StreamEnd) -> anyio.BrokenResourceError:
    """The end of a queue's pipe: no process holds its write end any more. Clean or not,
    the queue is broken from here on, and says so as it does for an item cut short."""
    return anyio.BrokenResourceError(_QUEUE_CLOSED_MID_ITEM)


def stdlib_recv_error(exc: OSError | EOFError, limit: int | None) -> Exception | None:
    """What the stdlib's ``recv_bytes()`` raised (the thread route on Windows, whose
    decoder is the stdlib's), as a connection's error; None for an error of another kind,
    which goes up as it is."""
    if isinstance(exc, EOFError):
        return eof_error(CLEAN_END)
    if exc.args and exc.args[0] == "bad message length":
        return ProtocolError(f"message exceeds the limit of {limit} bytes")
    if exc.args and "end of file" in str(exc.args[0]):
        return eof_error(StreamEnd(truncated=True, held=None))
    if exc.errno in (errno.ECONNRESET, errno.ECONNABORTED):
        return eof_error(CLEAN_END)
    return None


def maxlength_exceeded(length: int, maxlength: int) -> ProtocolError:
    return ProtocolError(f"message of {length} bytes exceeds maxlength={maxlength}")


def torn_send(written: int, total: int) -> str:
    """Why a connection is broken after a send was cancelled mid-message."""
    return f"a send was cancelled after {written} of {total} bytes of its message"


def stalled(stall_timeout: float, held: int) -> anyio.BrokenResourceError:
    """A producer stopped writing in the middle of a queue item."""
    return anyio.BrokenResourceError(
        f"a producer stopped mid-item: no progress for {stall_timeout} s "
        f"with {held} bytes of it read"
    )


def _put_stalled(stall_timeout: float, written: int, total: int) -> anyio.BrokenResourceError:
    """A put that began its item found no room for *stall_timeout* seconds."""
    return anyio.BrokenResourceError(
        f"a put stopped mid-item: nobody read the queue for "
        f"{stall_timeout} s with {written} of its {total} bytes written"
    )


def frame_parts(payload: memoryview) -> tuple[list[memoryview], int]:
    """What goes on the wire for *payload*, as writes, and their total length: header and
    payload in one piece up to :data:`COALESCE_LIMIT`, in two above."""
    header = encode_header(len(payload))
    if len(payload) <= COALESCE_LIMIT:
        return [memoryview(header + payload)], len(header) + len(payload)
    return [memoryview(header), payload], len(header) + len(payload)


# ---------------------------------------------------------------------------------------
# Connections: the greedy reader
# ---------------------------------------------------------------------------------------


class GreedyReader:
    """Frames of a connection's own stream: reads what is there, keeps what it read.

    Bytes that arrived but don't make a whole frame yet stay in the decoder, so a
    receive cancelled between reads loses nothing: the next one picks up where it
    stopped. Methods that read raise :class:`ConnectionEOF` at the end of the stream and
    :class:`ProtocolError` for bad framing.
    """

    __slots__ = ("_closed", "_rwait", "_transport", "decoder")

    def __init__(self, transport: FdTransport, max_message_size: int | None) -> None:
        self._transport = transport
        self.decoder = FrameDecoder(max_message_size)
        self._rwait: ReadinessWaiter | None = None
        self._closed = False

    def next_frame(self) -> bytes | None:
        """A whole frame from what was read already, or None."""
        try:
            return self.decoder.next_frame()
        except WireError as exc:
            raise ProtocolError(str(exc)) from None

    def read_once(self) -> bool:
        """Read what is there into the decoder; False if nothing was."""
        decoder = self.decoder
        view = decoder.body_buffer(BODY_READ)
        if view is not None:
            # A large body in progress: straight into its buffer, no copy on the way,
            # and on until the kernel has no more or the view is full.
            read_into = self._transport.read_into
            got = 0
            n: int | None = 0
            try:
                while got < len(view):
                    with view[got:] as rest:
                        n = read_into(rest)
                    if not n:
                        break
                    got += n
            finally:
                decoder.body_received(got)
            if got:
                return True
            if n is None:
                return False
            raise eof_error(decoder.feed_eof())
        data = self._transport.read_some(max(65536, min(decoder.bytes_wanted(), 1 << 20)))
        if data is None:
            return False
        if not data:
            raise eof_error(decoder.feed_eof())
        decoder.feed(data)
        return True

    def check_length(self, maxlength: int | None) -> None:
        """Refuse the frame in progress, by its header, if it is longer than *maxlength*."""
        if maxlength is None:
            return
        length = self._frame_length()
        if length is not None and length > maxlength:
            raise maxlength_exceeded(length, maxlength)

    def take_frame(self) -> bytes | None:
        """A whole frame that is already here (buffered, or one read away), or None.

        Never waits; the fast path of ``AsyncConnection.recv``. It asks the kernel even
        right after a send: a peer that answers each message often has its answer there
        before this process got from its send to here, and a read that finds nothing
        costs less than a turn of the loop that would find it.
        """
        try:
            frame = self.decoder.next_frame()
        except WireError as exc:
            raise ProtocolError(str(exc)) from None
        if frame is None and not self._closed and self.read_once():
            frame = self.next_frame()
        return frame

    def recv_frame_nowait(self, maxlength: int | None) -> bytes:
        """A whole frame from what is there now. :raises anyio.WouldBlock: none is."""
        while True:
            self.check_length(maxlength)
            frame = self.next_frame()
            if frame is not None:
                return frame
            if not self.read_once():
                raise anyio.WouldBlock

    async def recv_frame(self, maxlength: int | None, *, nothing_there: bool = False) -> bytes:
        """Receive one frame, waiting for readiness as needed. *nothing_there*: the
        caller just found no whole frame and nothing to read (and did the cancellation
        check), so start by waiting.

        If cancelled, nothing is lost: what was read stays in the decoder.
        :raises anyio.ClosedResourceError: :meth:`close` was called.
        """
        if nothing_there:
            await self._wait_readable()
        else:
            await fast_checkpoint()
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            self.check_length(maxlength)
            frame = self.next_frame()
            if frame is not None:
                return frame
            if self.read_once():
                self.check_length(maxlength)
                frame = self.next_frame()
                if frame is not None:
                    return frame
                # A long message: read on while the bytes keep coming, giving the loop
                # its turn every ms; no cancellation check per read.
                await turn_if_due()
                continue
            await self._wait_readable()

    async def recv_frame_into(self, target: memoryview) -> int | bytes:
        """Receive one frame into *target* (a writable view of bytes) and return its
        length. A frame longer than *target* is received whole and returned instead, as
        ``bytes``: the caller raises ``BufferTooShort`` with it, as the stdlib does.

        A large body is read straight into *target*, with no copy. If cancelled, or
        stopped by an error, before all of it is there, nothing is lost: what is in
        *target* is copied back into the decoder (shielded, :data:`BODY_READ` bytes per
        turn of the loop), the next receive gets the whole frame, and *target* may have
        been written to. Raises what :meth:`recv_frame` raises.
        """
        await fast_checkpoint()
        decoder = self.decoder
        adopted = False
        try:
            while True:
                if self._closed:
                    raise anyio.ClosedResourceError
                if adopted:
                    length = decoder.take_target()
                    if length is not None:
                        return length
                else:
                    length = self._frame_length()
                    if length is not None and length > len(target):
                        return await self.recv_frame(None)
                    frame = self.next_frame()
                    if frame is not None:
                        target[: len(frame)] = frame
                        return len(frame)
                    adopted = decoder.adopt_body(target)
                if self.read_once():
                    await turn_if_due()
                    continue
                await self._wait_readable()
        except BaseException:
            if adopted:
                with anyio.CancelScope(shield=True):
                    while not decoder.give_back_body(BODY_READ):
                        await anyio.lowlevel.checkpoint()
            raise

    def _frame_length(self) -> int | None:
        try:
            return self.decoder.frame_length()
        except WireError as exc:
            raise ProtocolError(str(exc)) from None

    async def _wait_readable(self) -> None:
        if self._rwait is None:
            self._rwait = ReadinessWaiter(self._transport.fd)
        await self._rwait.wait()
        note_turn()

    def close(self) -> None:
        """Wake a task waiting in :meth:`recv_frame` (it raises ``ClosedResourceError``)
        and close the readiness helper; the transport is its owner's to close."""
        self._closed = True
        if self._rwait is not None:
            self._rwait.close()


# ---------------------------------------------------------------------------------------
# Writing frames
# ---------------------------------------------------------------------------------------


class FrameWriter:
    """Writes whole frames: what fits now, the rest as room comes.

    Every write is the transport's ``write_some``, which never blocks: into a pipe, at
    most ``PIPE_BUF`` bytes at a time after ``poll`` said there is room, so a frame of at
    most ``PIPE_BUF`` bytes goes in whole, in one write (see ``_core.transport``).

    :attr:`broken` is set when a send cancelled mid-frame could not finish it within
    :data:`SEND_SHIELD_SECONDS`; *on_torn* was then called to make the peer see EOF
    (never a torn frame followed by more). *peer_gone* is the text of the
    ``anyio.BrokenResourceError`` raised once nobody reads the other end.
    """

    __slots__ = ("_closed", "_on_torn", "_peer_gone", "_transport", "_wwait", "broken")

    def __init__(
        self,
        transport: FdTransport,
        on_torn: Callable[[], object],
        *,
        peer_gone: str = PEER_CLOSED,
    ) -> None:
        self._transport = transport
        self._on_torn = on_torn
        self._peer_gone = peer_gone
        self._wwait: ReadinessWaiter | None = None
        self._closed = False
        self.broken: str | None = None

    def write_some(self, view: memoryview) -> int:
        """Write what fits now (maybe 0). :raises anyio.BrokenResourceError: the peer
        is gone."""
        try:
            return self._transport.write_some(view)
        except OSError as exc:
            if isinstance(exc, BrokenPipeError) or exc.errno in (errno.ECONNRESET, errno.EPIPE):
                raise anyio.BrokenResourceError(self._peer_gone) from exc
            raise

    def send_nowait(self, payload: memoryview) -> int | None:
        """Write as much of a small frame as fits now, without waiting.

        The caller has just passed its cancellation point and holds the send side (no
        other sender can start before it awaits). Returns None if all of the frame went
        out, else how many of its bytes did (maybe 0): :meth:`send` sends the rest.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if len(payload) > COALESCE_LIMIT:
            return 0
        frame = encode_header(len(payload)) + payload
        written = self.write_some(memoryview(frame))
        return None if written == len(frame) else written

    async def send(self, payload: memoryview, already: int = -1) -> None:
        """Send one frame. *already*: :meth:`send_nowait` wrote that many of its bytes,
        after the caller's cancellation point (-1: nothing was tried yet).

        If cancelled before the first byte, nothing was sent; after it, the frame is
        finished under a shield (see the class docstring).
        """
        if already < 0:
            # A send that finds room never waits, so without this a loop of sends would
            # never give the event loop a turn. Before the first byte: a cancelled send
            # sends nothing.
            await fast_checkpoint()
            already = 0
        parts, total = frame_parts(payload)
        progress = [already]  # bytes of this frame written so far
        try:
            await self._write_parts(parts, progress)
        except anyio.get_cancelled_exc_class():
            if 0 < progress[0] < total:
                await self._finish_torn_frame(parts, progress, total)
            raise

    async def _write_parts(self, parts: list[memoryview], progress: list[int]) -> None:
        done = progress[0]
        for part in parts:
            if done >= len(part):
                done -= len(part)
                continue
            await self._write_all(part[done:], progress)
            done = 0

    async def _write_all(self, view: memoryview, progress: list[int]) -> None:
        offset = 0
        while offset < len(view):
            if self._closed:
                raise anyio.ClosedResourceError
            n = self.write_some(view[offset:])
            if n:
                offset += n
                progress[0] += n
                if offset < len(view):
                    await fast_checkpoint()
                continue
            if self._wwait is None:
                self._wwait = ReadinessWaiter(self._transport.fd, writable=True)
            await self._wwait.wait()

    async def _finish_torn_frame(
        self, parts: list[memoryview], progress: list[int], total: int
    ) -> None:
        """Part of a frame went out: finish it, shielded and bounded, or break the link."""
        with anyio.move_on_after(SEND_SHIELD_SECONDS, shield=True):
            await self._write_parts(parts, progress)
        if progress[0] < total:
            self.broken = torn_send(progress[0], total)
            self._on_torn()  # closed meanwhile: the transport's fd is -1, and it does nothing

    def send_blocking(
        self,
        payload: memoryview,
        wait_writable: Poller,
        slice_ms: int,
        stopping: Callable[[], bool],
        done: list[int],
    ) -> None:
        """Send one frame of *payload* from a thread: :meth:`write_blocking` of its
        :func:`frame_parts`. :raises anyio.ClosedResourceError: *stopping()* said so
        between two slices."""
        self.write_blocking(frame_parts(payload)[0], wait_writable, slice_ms, stopping, done)

    def write_blocking(
        self,
        parts: list[memoryview],
        wait_writable: Poller,
        slice_ms: int,
        stopping: Callable[[], bool],
        done: list[int],
        *,
        once_begun: Callable[[], object] | None = None,
        stall_timeout: float = math.inf,
    ) -> None:
        """Write one frame, in *parts* (its header in the first), from a thread, waiting
        for room with *wait_writable* in slices of *slice_ms*; *done* counts its bytes
        written so far.

        *stopping()* is asked before each write, and ends the call if it says so: a
        connection's send (whose caller breaks the connection if part of the frame went
        out). With *once_begun* (a queue's put) it is asked only until the first byte is
        in: then *once_begun()* is called, and the frame is finished whatever
        *stopping()* says, as the reader makes room, since a frame left half-written
        would tear the stream that every consumer of a queue reads; only a pipe that
        takes no byte for *stall_timeout* seconds ends it early.

        :raises anyio.ClosedResourceError: *stopping()* said so (see above).
        :raises anyio.BrokenResourceError: nobody reads the other end (the *peer_gone*
            text), or the frame had begun and no byte went in for *stall_timeout*
            seconds ("a put stopped mid-item": part of the frame stays in the pipe).
        """
        total = sum(len(part) for part in parts)
        written = 0
        last_progress = 0.0
        for part in parts:
            offset = 0
            while offset < len(part):
                if (once_begun is None or not written) and stopping():
                    raise anyio.ClosedResourceError
                n = self.write_some(part[offset:])
                if n:
                    if not written and once_begun is not None:
                        once_begun()
                    offset += n
                    written += n
                    done[0] += n
                    last_progress = perf_counter()
                elif (
                    not wait_writable.poll(slice_ms)
                    and written
                    and perf_counter() - last_progress > stall_timeout
                ):
                    raise _put_stalled(stall_timeout, written, total)

    def close(self) -> None:
        """Wake a task waiting for room (it raises ``ClosedResourceError``)."""
        self._closed = True
        if self._wwait is not None:
            self._wwait.close()


# ---------------------------------------------------------------------------------------
# Queues: the exact reader
# ---------------------------------------------------------------------------------------


class ExactReader:
    """Frames of a pipe shared with other consumers: never reads past one frame.

    The caller holds the queue's reader lock across a frame: once the first byte of a
    frame is read, it must be finished before the lock goes, or the next reader would
    start mid-frame. What was read of a partial frame stays in :attr:`decoder`
    (:attr:`at_boundary` is False meanwhile). Bad framing, and the pipe closed mid-item,
    raise ``anyio.BrokenResourceError``; the queue is broken from then on.
    """

    __slots__ = ("_transport", "decoder")

    def __init__(self, transport: FdTransport) -> None:
        self._transport = transport
        self.decoder = FrameDecoder(None)

    @property
    def at_boundary(self) -> bool:
        """True unless part of a frame was read (and the frame must be finished)."""
        return self.decoder.at_boundary

    def available(self) -> int:
        """Bytes in the pipe now (``FIONREAD``)."""
        return self._transport.available()

    def read_whole(self, avail: int) -> bytes | None:
        """The common case in two reads, at a frame boundary with *avail* bytes in the
        pipe (from :meth:`available`): if the next frame is all there, read its header,
        then exactly its body, and return the body.

        Otherwise return None. Nothing was read if fewer than 4 bytes are there; else the
        bytes read went to the decoder (partial, negative or long form), and the frame is
        the lock holder's to finish.
        """
        if avail < 4:
            return None
        fd = self._transport.fd  # -1 once closed: the read fails with EBADF
        header = os.read(fd, 4)
        (size,) = unpack_short_header(header)
        if 0 <= size <= avail - 4:
            body = os.read(fd, size) if size else b""
            if len(body) == size:
                return body
            self.decoder.feed(header + body)
        else:
            self.decoder.feed(header)
        return None

    def take_whole(self) -> bytes | None:
        """At a frame boundary: the next frame's body if the frame is all in the pipe.

        Otherwise None: nothing was read if :attr:`at_boundary` is still True; else the
        bytes read went to the decoder, and the frame is the lock holder's to finish.
        Three system calls here (``FIONREAD``, header, body).
        """
        return self.read_whole(self._transport.available())

    def reset(self) -> None:
        """Forget the frame in progress (given up on: the queue is broken, or the frame
        was finished elsewhere)."""
        self.decoder = FrameDecoder(None)

    def _next(self) -> bytes | None:
        try:
            return self.decoder.next_frame()
        except WireError as exc:
            raise anyio.BrokenResourceError(_CORRUPT_QUEUE.format(exc)) from None

    def _feed(self, data: bytes) -> None:
        if not data:
            raise queue_eof(self.decoder.feed_eof())
        self.decoder.feed(data)

    def _read(self, limit: int) -> int | None:
        """Read up to *limit* more bytes of the frame in progress, never past it; how many
        (None: nothing is there now). A large body's bytes go straight into its buffer,
        which the decoder lends (no copy); other bytes are read, then fed to the
        decoder."""
        decoder = self.decoder
        # Only a large body lends its buffer: a small item (the common case, on the path
        # of every get that waited) skips asking.
        view = decoder.body_buffer(limit) if limit > SPILL_THRESHOLD else None
        if view is None:
            data = self._transport.read_some(limit)
            if data is None:
                return None
            self._feed(data)
            return len(data)
        got = None
        try:
            got = self._transport.read_into(view)
        finally:
            decoder.body_received(got or 0)
        if got == 0:
            raise queue_eof(decoder.feed_eof())
        return got

    def read_available(self, budget: int = READ_BUDGET) -> bytes | None:
        """Read no further than one frame, at most about *budget* bytes of it; return
        the frame once whole, else None (nothing more there, or the budget is spent:
        give the loop a turn, then come back)."""
        decoder = self.decoder
        if decoder.at_boundary:
            body = self.take_whole()
            if body is not None:
                return body
        while True:
            frame = self._next()
            if frame is not None:
                return frame
            if budget <= 0:
                return None
            got = self._read(min(decoder.bytes_wanted(), READ_BUDGET))
            if got is None:
                return None
            budget -= got

    def read_blocking(self, wait_readable: Poller, stall_timeout: float) -> bytes:
        """In a thread: finish the frame in progress (or read the next one), waiting for
        its bytes with *wait_readable*; each wait bounded by *stall_timeout* seconds.

        :raises anyio.BrokenResourceError: no byte came for *stall_timeout*, or as above.
        """
        decoder = self.decoder
        while True:
            frame = self._next()
            if frame is not None:
                return frame
            nothing_there = self._read(decoder.bytes_wanted()) is None
            if nothing_there and not wait_readable.poll(stall_timeout * 1000):
                raise stalled(stall_timeout, decoder.buffered)


# ---------------------------------------------------------------------------------------
# Queues on Linux: the exact reader without FIONREAD
# ---------------------------------------------------------------------------------------

#: The largest body :class:`OwnEndReader` reads without asking ``FIONREAD`` first. It
#: reads into a buffer of the claimed size, so the size is bounded by what a pipe holds
#: (64 KiB unless enlarged); a larger claim is checked against what is there, and costs
#: no memory until it is.
BLIND_BODY_LIMIT = 64 * 1024


class OwnEndReader(ExactReader):
    """An exact reader whose fast path makes two plain reads (header, body) on the pipe's
    own read end (:class:`~asyncmp._core.transport.OwnReadEnd`), which is non-blocking and this
    process's alone: each returns what is there, or ``EAGAIN``, as a blocking
    ``Queue.get()`` makes two reads. Never a byte past the frame: it asks for the header,
    then for exactly the body.

    The own end is opened by the first call. Where it can't be opened (no ``/proc``),
    and in a forked child, where it is closed (never inherited), the fast path is the
    exact reader's, with ``FIONREAD`` first.
    """

    __slots__ = ("_own",)

    def __init__(self, transport: FdTransport, own: OwnReadEnd) -> None:
        super().__init__(transport)
        self._own = own

    def take_whole(self) -> bytes | None:
        """As :meth:`ExactReader.take_whole`, in two system calls (header, body)."""
        own_fd = self._own.fd
        if own_fd < 0:
            if own_fd == UNOPENED and self._own.open() >= 0:
                return self.take_whole()
            return super().take_whole()
        try:
            header = os.read(own_fd, 4)
        except BlockingIOError:
            return None  # empty
        if len(header) < 4:
            # b"": the end of the pipe at a boundary, nothing read. 1 to 3 bytes: part of a
            # header, which is ours now: the frame is the lock holder's to finish.
            if header:
                self.decoder.feed(header)
            return None
        (size,) = unpack_short_header(header)
        if not 0 < size <= BLIND_BODY_LIMIT:
            return b"" if size == 0 else self._beyond_limit(header, size)
        try:
            body = os.read(own_fd, size)
        except BlockingIOError:
            body = b""
        if len(body) == size:
            return body
        # Part of the body, or none of it yet (or the end of the pipe, which the
        # decoder's next read finds): the frame is the lock holder's to finish.
        self.decoder.feed(header + body)
        return None

    def _beyond_limit(self, header: bytes, size: int) -> bytes | None:
        """After a fast path read *header*, whose *size* is not one to read blind (above
        :data:`BLIND_BODY_LIMIT`, which is more than a pipe holds unless enlarged, the
        long form, or corrupt): the body if ``FIONREAD`` says it is all there; else the
        decoder takes the frame from here (a claimed length costs no memory before its
        bytes are there)."""
        if size > 0 and self._transport.available() >= size:
            body = os.read(self._transport.fd, size)
            if len(body) == size:
                return body
            self.decoder.feed(header + body)
            return None
        self.decoder.feed(header)
        return None


def exact_reader(transport: FdTransport) -> ExactReader:
    """The exact reader for a queue's pipe: an :class:`OwnEndReader` where the pipe has
    an own read end (Linux), else an :class:`ExactReader`."""
    own = transport.own_end
    return ExactReader(transport) if own is None else OwnEndReader(transport, own)
