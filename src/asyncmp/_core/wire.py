"""Sans-IO codec for ``multiprocessing.connection``'s framing on POSIX.

The stdlib frames every message as a big-endian signed 32-bit length followed by the
payload. A payload longer than ``0x7fffffff`` bytes gets the escape length ``-1``
followed by a big-endian unsigned 64-bit length. How the sender splits its writes (one
write up to 16 KiB, header and payload apart above that) is invisible on the wire: the
reader sees one byte stream.

This module moves no bytes. :class:`FrameDecoder` is fed whatever arrived and hands out
whole payloads; :func:`encode_header` returns the bytes that go before one. It imports
neither ``os`` nor an async library, so it can be tested one byte at a time.

The decoder's states have names (:class:`DecoderState`) and its moves between them are
listed in one table (:data:`MOVES`), as h11's are. The end of the stream is one more
input: :meth:`FrameDecoder.feed_eof` says whether it came at a frame boundary (clean) or
cut a frame short, and how much of that frame was held (:class:`StreamEnd`); the readers
in ``_core.frames`` turn that into the adapter's exception.

Memory: the decoder never allocates what a header merely claims. A body larger than
:data:`SPILL_THRESHOLD` is gathered in a growing buffer as its chunks actually arrive:
the buffer grows in steps of at most :data:`BODY_GROWTH_MAX` bytes, and only when the
bytes already received fill it, so memory stays bounded by the bytes received plus one
step. The copying is spread over the chunks: completing even a huge body costs no big
copy at the end (an ``io.BytesIO`` hands over its buffer), so the caller's event loop
never stalls on it.

A reader can skip a copy: :meth:`FrameDecoder.body_buffer` lends a writable view of that
buffer for the next bytes of the body (to ``recv_into`` or ``readv`` into), and
:meth:`FrameDecoder.body_received` takes note of how many were written.
"""

from __future__ import annotations

import enum
import io
import struct
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple

__all__ = (
    "CLEAN_END",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "LONG_FORM_THRESHOLD",
    "MOVES",
    "WHOLE_BODY_MIN",
    "DecoderState",
    "FrameDecoder",
    "StreamEnd",
    "WireError",
    "dumps",
    "encode_header",
    "unpack_short_header",
)

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")

#: Payloads above this many bytes use the ``-1`` escape and a 64-bit length.
LONG_FORM_THRESHOLD = 0x7FFFFFFF
#: Default limit on one payload. Above any sane pickle, below "all of memory".
DEFAULT_MAX_MESSAGE_SIZE = 4 << 30
#: A partial body missing more than this is collected as chunks rather than by
#: re-concatenating the buffer on every feed (which would be quadratic).
SPILL_THRESHOLD = 64 * 1024
#: The body buffer grows in steps of at least this (capped by the frame's length) ...
BODY_GROWTH_MIN = 1 << 20
#: ... and at most this: growing (a realloc, zero-filling and first touching the new
#: pages) by more would hold the event loop for several milliseconds at once.
BODY_GROWTH_MAX = 2 << 20
#: A body of at least this many bytes gets its whole buffer at once (see ``_new_body``).
WHOLE_BODY_MIN = 32 << 20

_ESCAPE = _SHORT.pack(-1)

#: ``(length,)`` of a 4-byte header: a payload's length, or -1 (the long form's escape)
#: or another negative number (invalid). For a reader that has read exactly a header.
unpack_short_header = _SHORT.unpack


def dumps(obj: Any) -> bytes:
    """Pickle *obj* as ``Connection.send()`` does, into ``bytes``: a message's payload.

    ``ForkingPickler.dumps()`` returns a memoryview exported from a BytesIO. If that view
    ends up in a reference cycle (an exception's traceback that holds the frames that hold
    it), Python 3.13's garbage collector finalizes the BytesIO before the view and reports
    a BufferError. ``getvalue()`` hands over the BytesIO's own buffer, without a copy.
    """
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return buf.getvalue()


def _new_body(size: int, first: bytes) -> tuple[io.BytesIO, int]:
    """A buffer for a large body of *size* bytes that starts with *first*, and its room.

    From :data:`WHOLE_BODY_MIN` bytes on it has room for the whole body at once: a
    ``bytes(size)`` that a ``BytesIO`` holds alone, so it writes into it and hands it over
    when it is full, with no growth step and no copy at the end. An allocation that large
    is mapped fresh from the system (by glibc from 32 MiB on, always; likewise by the
    macOS and Windows allocators), so its pages cost memory only once written: a peer
    that claims 1 GiB and sends 1 MiB costs about 1 MiB. Below that size, where the
    allocator may hand out recycled memory and zero all of it at once, and where the
    system refuses the claim (:class:`MemoryError`), the buffer grows as bytes arrive
    (see :meth:`FrameDecoder.body_buffer`).
    """
    if size >= WHOLE_BODY_MIN:
        try:
            # No name may hold the bytes: with a second reference the BytesIO would copy.
            body = io.BytesIO(bytes(size))
        except (MemoryError, OverflowError):
            pass
        else:
            body.write(first)
            return body, size
    body = io.BytesIO()
    body.write(first)
    return body, len(first)


def _grow_body(body: io.BytesIO, held: int, missing: int) -> tuple[io.BytesIO, int]:
    """A growing body buffer that the *held* bytes received fill, grown for the next of
    the *missing* ones (see :meth:`FrameDecoder.body_buffer`), and its room now."""
    step = min(max(held, BODY_GROWTH_MIN), BODY_GROWTH_MAX)
    capacity = held + min(missing, step)
    if held < BODY_GROWTH_MIN:
        # A new buffer, with what arrived copied in: bytes(n) comes from calloc (fresh
        # zero pages for a big one, nothing to fill), and a BytesIO that holds the only
        # reference to its initial bytes writes into them.
        fresh = io.BytesIO(bytes(capacity))
        fresh.write(body.getvalue())
        return fresh, capacity
    # Writing a byte at the new end makes the BytesIO zero-fill up to it.
    body.seek(capacity - 1)
    body.write(b"\0")
    return body, capacity


class WireError(ValueError):
    """The byte stream is not valid framing; the stream can't be resynchronised."""


def encode_header(size: int) -> bytes:
    """Return the header that precedes a payload of *size* bytes."""
    if size < 0:
        raise ValueError(f"payload size {size} is negative")
    if size > LONG_FORM_THRESHOLD:
        return _ESCAPE + _LONG.pack(size)
    return _SHORT.pack(size)


class DecoderState(enum.Enum):
    """Where a :class:`FrameDecoder` is in its stream. :data:`MOVES` lists every move
    between these states; :meth:`FrameDecoder.feed_eof` says what the end of the stream
    means in each."""

    #: Headers and small frames are parsed from the bytes not parsed yet. At a frame
    #: boundary when there are none; an end of the stream here is clean.
    FRAMES = "frames"
    #: A large body (one missing more than :data:`SPILL_THRESHOLD` bytes when its header
    #: was parsed) arrives in a growing buffer of the decoder's own.
    BODY = "body"
    #: A large body arrives in a caller's buffer (:meth:`FrameDecoder.adopt_body`).
    BODY_IN_TARGET = "body in target"
    #: All of the body is in the caller's buffer; :meth:`FrameDecoder.take_target` hands
    #: the frame out.
    TARGET_FULL = "target full"
    #: The caller's buffer is copied back into one of the decoder's own
    #: (:meth:`FrameDecoder.give_back_body`, a step per call); bytes of the body that
    #: arrive meanwhile still go to the caller's buffer.
    GIVING_BACK = "giving back"
    #: A large body is whole in the decoder's own buffer; :meth:`FrameDecoder.next_frame`
    #: hands it out.
    BODY_WHOLE = "body whole"
    #: The stream broke the framing: every call that looks at a frame raises the same
    #: :class:`WireError` again. The stream can't be resynchronised.
    BROKEN = "broken"


FRAMES = DecoderState.FRAMES
BODY = DecoderState.BODY
BODY_IN_TARGET = DecoderState.BODY_IN_TARGET
TARGET_FULL = DecoderState.TARGET_FULL
GIVING_BACK = DecoderState.GIVING_BACK
BODY_WHOLE = DecoderState.BODY_WHOLE
BROKEN = DecoderState.BROKEN

#: Every move a :class:`FrameDecoder` makes, as ``(from, to, what makes it)``; it makes no
#: other. Small frames come and go in :data:`~DecoderState.FRAMES` without a move.
MOVES: tuple[tuple[DecoderState, DecoderState, str], ...] = (
    (FRAMES, BODY, "next_frame() parsed the header of a large body"),
    (FRAMES, BROKEN, "a header is negative or over max_message_size"),
    (BODY, BODY_WHOLE, "the body's last byte arrived"),
    (BODY, BODY_IN_TARGET, "adopt_body()"),
    (BODY_IN_TARGET, TARGET_FULL, "the body's last byte arrived"),
    (BODY_IN_TARGET, GIVING_BACK, "give_back_body()"),
    (TARGET_FULL, GIVING_BACK, "give_back_body()"),
    (TARGET_FULL, FRAMES, "take_target() handed the frame out"),
    (GIVING_BACK, BODY, "give_back_body() is done, bytes of the body are missing"),
    (GIVING_BACK, BODY_WHOLE, "give_back_body() is done, the body is whole"),
    (BODY_WHOLE, FRAMES, "next_frame() handed the frame out"),
)
_LEGAL = frozenset((old, new) for old, new, _ in MOVES)


class StreamEnd(NamedTuple):
    """How a stream ended (:meth:`FrameDecoder.feed_eof`): cleanly, at a frame boundary
    with every frame handed out, or *truncated* in the middle of a frame, of which *held*
    bytes (its header included) had arrived; None where that is not known (the stdlib's
    decoder read the stream)."""

    truncated: bool
    held: int | None = 0


#: The end of a stream at a frame boundary.
CLEAN_END = StreamEnd(truncated=False)


class FrameDecoder:
    """Turn a byte stream into payloads, h11 style: :meth:`feed`, then :meth:`next_frame`;
    :meth:`feed_eof` once a read finds the end of the stream.

    :meth:`next_frame` returns ``None`` while it needs more data.
    :meth:`bytes_wanted` says how many more bytes complete the header or frame in
    progress, so a reader that must not read ahead (a Queue's pipe is shared by
    consumers in other processes) can read exactly that many.

    The decoder is in one of the :class:`DecoderState` states (:attr:`state`); the
    attributes that hold a frame in progress mean something only in the states named
    beside them below. After a :class:`WireError` the decoder stays broken and raises it
    again.
    """

    __slots__ = (
        "_body",
        "_body_view",
        "_buf",
        "_capacity",
        "_error",
        "_given",
        "_held",
        "_limit",
        "_missing",
        "_pos",
        "_spill_header",
        "_spilled",
        "_state",
        "_target",
    )

    def __init__(self, max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size is not None and max_message_size < 0:
            raise ValueError(f"max_message_size={max_message_size} is negative")
        self._limit = max_message_size
        self._state = FRAMES
        # Unparsed bytes are self._buf[self._pos:], in every state but a large body's
        # own bytes. A bytes object plus an offset makes a complete frame one slice,
        # with no copy of the bytes after it.
        self._buf = b""
        self._pos = 0
        # From BODY to the frame's hand-out: the bytes of the large frame's header,
        # consumed from _buf but still received and not handed out.
        self._spill_header = 0
        # BODY, BODY_IN_TARGET, TARGET_FULL, GIVING_BACK: bytes of the body there so far,
        # and how many are missing (> 0 exactly while the body arrives: feed() asks).
        self._held = 0
        self._missing = 0
        # BODY: the decoder's buffer, which holds _capacity bytes (>= _held; the rest is
        # zeros, to be overwritten). GIVING_BACK: the buffer the body is copied back
        # into, _given bytes of it so far.
        self._body: io.BytesIO | None = None
        self._capacity = 0
        self._given = 0
        # BODY_IN_TARGET, TARGET_FULL, GIVING_BACK: the caller's buffer.
        self._target: memoryview | None = None
        # BODY, BODY_IN_TARGET, GIVING_BACK: the view lent by body_buffer(), if any.
        self._body_view: memoryview | None = None
        # BODY_WHOLE: the body, awaiting next_frame().
        self._spilled: bytes | None = None
        # BROKEN: what is wrong with the stream.
        self._error: WireError | None = None

    def _move(self, new: DecoderState) -> None:
        """The one place the state changes (never between small frames)."""
        if (self._state, new) not in _LEGAL:
            raise AssertionError(f"frame decoder: no move from {self._state} to {new}")
        self._state = new

    @property
    def state(self) -> DecoderState:
        return self._state

    @property
    def max_message_size(self) -> int | None:
        return self._limit

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out, headers of those frames included."""
        spilled = 0 if self._spilled is None else len(self._spilled)
        return len(self._buf) - self._pos + self._spill_header + self._held + spilled

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is held, so an EOF here is a clean one."""
        return self._state is FRAMES and self._pos == len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes that arrived. Keeps a reference to *data* when it is ``bytes``."""
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)
        if self._missing:  # a large body arrives
            take = self._missing
            if len(data) <= take:
                self._add_chunk(data)
                return
            self._add_chunk(data[:take])
            data = data[take:]
        if self._pos == len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos :] + data
        self._pos = 0

    def feed_eof(self) -> StreamEnd:
        """The stream ended (a read found no more bytes, nor ever will): say how.

        Clean (:data:`CLEAN_END`) at a frame boundary, with every byte received handed
        out in a frame; else truncated, with the bytes held (:attr:`buffered`): a reader
        calls it once :meth:`next_frame` (or :meth:`take_target`) has nothing to hand
        out, so they are those of a frame cut short. No state changes: those bytes stay
        counted, a body in a caller's buffer can still be given back, and a second call
        says the same.

        :raises WireError: the stream broke the framing before it ended.
        """
        if self._state is BROKEN:
            assert self._error is not None
            raise self._error
        if self.at_boundary:
            return CLEAN_END
        return StreamEnd(truncated=True, held=self.buffered)

    def _add_chunk(self, chunk: bytes) -> None:
        self._release_view()
        held = self._held
        if self._state is BODY:
            body = self._body
            assert body is not None
            body.seek(held)
            body.write(chunk)
            self._capacity = max(self._capacity, held + len(chunk))
        else:  # BODY_IN_TARGET, GIVING_BACK
            assert self._target is not None
            self._target[held : held + len(chunk)] = chunk
        self._held = held + len(chunk)
        self._missing -= len(chunk)
        if self._missing == 0:
            self._complete_body()

    def _complete_body(self) -> None:
        state = self._state
        if state is BODY:
            # getvalue() returns the BytesIO's own buffer, trimmed: no copy. (Joining a
            # list of chunks here would copy the whole body at once, a stall of ~100 ms
            # for 64 MiB.)
            assert self._body is not None
            self._spilled = self._body.getvalue()
            self._body = None
            self._held = self._capacity = 0
            self._move(BODY_WHOLE)
        elif state is BODY_IN_TARGET:
            self._move(TARGET_FULL)  # _held is the body's length
        # GIVING_BACK: give_back_body() moves on once all of it is back.

    def _release_view(self) -> None:
        view = self._body_view
        if view is not None:
            self._body_view = None
            view.release()

    def body_buffer(self, max_bytes: int) -> memoryview | None:
        """A writable view for the next bytes of the large body in progress, or None.

        At most *max_bytes* long, never past the end of the frame nor the buffer's
        room. Write into it, then call :meth:`body_received`; :meth:`feed` or another
        call of this method first takes the view back (released: writing to it then
        raises ValueError). Only once the bytes received fill the buffer does it grow,
        by as many as it holds (at least :data:`BODY_GROWTH_MIN`, at most
        :data:`BODY_GROWTH_MAX`), never past the end of the frame.
        """
        state = self._state
        if state is BODY and max_bytes > 0:
            return self._lend_body(max_bytes)
        if (state is BODY_IN_TARGET or state is GIVING_BACK) and self._missing and max_bytes > 0:
            assert self._target is not None
            self._release_view()
            held = self._held
            self._body_view = view = self._target[held : held + min(max_bytes, self._missing)]
            return view
        return None

    def _lend_body(self, max_bytes: int) -> memoryview:
        body = self._body
        assert body is not None
        self._release_view()
        held = self._held
        capacity = self._capacity
        if held == capacity:
            body, capacity = _grow_body(body, held, self._missing)
            self._body, self._capacity = body, capacity
        end = min(capacity, held + max_bytes)
        whole = body.getbuffer()
        view = whole[held:end]
        whole.release()  # the slice keeps the buffer exported until it is released
        self._body_view = view
        return view

    def body_received(self, n: int) -> None:
        """Take note that the first *n* bytes of the view :meth:`body_buffer` lent were
        written, and take the view back."""
        view = self._body_view
        if view is None or not 0 <= n <= len(view):
            raise ValueError("body_received() without a matching body_buffer()")
        self._release_view()
        self._held += n
        self._missing -= n
        if self._missing == 0:
            self._complete_body()

    # -- a caller's buffer for the body ------------------------------------------------

    def adopt_body(self, target: memoryview) -> bool:
        """Let the large body in progress go on in *target* (a writable byte view at least
        as long as the body), for a reader that fills a caller's buffer: what arrived of
        it is copied there now, the rest is written there by :meth:`feed` and through
        :meth:`body_buffer`. Once all of it is there, :meth:`take_target` says so.

        False (and nothing changes) if no large body is in progress or it doesn't fit. A
        reader that gives up before the body is there calls :meth:`give_back_body`.
        """
        body = self._body
        if self._state is not BODY or self._held + self._missing > len(target):
            return False
        assert body is not None
        self._release_view()
        with body.getbuffer() as buffer:
            target[: self._held] = buffer[: self._held]
        self._target = target
        self._body = None
        self._capacity = 0
        self._move(BODY_IN_TARGET)
        return True

    def take_target(self) -> int | None:
        """The length of the body that :meth:`adopt_body` let go on in a caller's
        buffer, once all of it is there (the frame is then handed out); else None."""
        if self._state is not TARGET_FULL:
            return None
        length = self._held
        self._target = None
        self._held = self._spill_header = 0
        self._move(FRAMES)
        return length

    def give_back_body(self, max_bytes: int) -> bool:
        """Copy up to *max_bytes* more of the body from the caller's buffer back into a
        buffer of the decoder's own; True once the caller's buffer is no longer used (at
        once if it never was). The frame then goes on, or :meth:`next_frame` hands it
        out, as if it had never been in the caller's buffer. Call it until it returns
        True before the caller's buffer is used for anything else.
        """
        state = self._state
        if state is BODY_IN_TARGET or state is TARGET_FULL:
            self._body, self._capacity = _new_body(self._held + self._missing, b"")
            self._given = 0
            self._move(GIVING_BACK)
        elif state is not GIVING_BACK:
            return True
        self._release_view()
        target, body = self._target, self._body
        assert target is not None and body is not None
        held, given = self._held, self._given
        step = min(max_bytes, held - given)
        body.seek(given)
        body.write(target[given : given + step])
        self._given = given = given + step
        self._capacity = max(self._capacity, given)
        if given < held:
            return False
        self._target = None
        self._given = 0
        if self._missing:
            self._move(BODY)
        else:
            self._spilled = body.getvalue()
            self._body = None
            self._held = self._capacity = 0
            self._move(BODY_WHOLE)
        return True

    def next_frame(self) -> bytes | None:
        """Return the next whole payload, or ``None`` if more bytes are needed.

        :raises WireError: the header is negative (other than the escape) or its length
            exceeds ``max_message_size``. Raised before the body is buffered.
        """
        if self._state is not FRAMES:
            return self._large_frame()
        buf = self._buf
        pos = self._pos
        end_of_data = len(buf)
        if end_of_data - pos < 4:
            return None
        size, start = self._parse_header(buf, pos, end_of_data)
        if start < 0:
            return None
        end = start + size
        if end <= end_of_data:
            if end == end_of_data:
                self._buf = b""
                self._pos = 0
            else:
                self._pos = end
            return buf[start:end]
        missing = end - end_of_data
        if missing > SPILL_THRESHOLD:
            # Header consumed; from here on chunks are collected as they come.
            first = buf[start:]
            self._buf = b""
            self._pos = 0
            self._body, self._capacity = _new_body(size, first)
            self._held = len(first)
            self._missing = missing
            self._spill_header = start - pos
            self._move(BODY)
        return None

    def _large_frame(self) -> bytes | None:
        """:meth:`next_frame` outside :data:`~DecoderState.FRAMES`."""
        state = self._state
        if state is BODY_WHOLE:
            spilled = self._spilled
            self._spilled = None
            self._spill_header = 0
            self._move(FRAMES)
            return spilled
        if state is BROKEN:
            assert self._error is not None
            raise self._error
        return None  # the body arrives (or is the caller's to take: take_target())

    def _parse_header(self, buf: bytes, pos: int, end_of_data: int) -> tuple[int, int]:
        """In :data:`~DecoderState.FRAMES`, with 4 bytes or more unparsed: return
        ``(size, payload_start)``, or ``(0, -1)`` when the header is partial."""
        (size,) = _SHORT.unpack_from(buf, pos)
        start = pos + 4
        if size < 0:
            if size != -1:
                self._fail(f"frame length {size} is negative")
            if end_of_data - pos < 12:
                return 0, -1
            (size,) = _LONG.unpack_from(buf, start)
            start += 8
        if self._limit is not None and size > self._limit:
            self._fail(f"frame length {size} exceeds max_message_size={self._limit}")
        return size, start

    def _fail(self, message: str) -> None:
        self._error = WireError(message)
        self._move(BROKEN)
        raise self._error

    def frame_length(self) -> int | None:
        """The payload length of the frame in progress, once its header has arrived."""
        state = self._state
        if state is FRAMES:
            buf = self._buf
            if len(buf) - self._pos < 4:
                return None
            size, start = self._parse_header(buf, self._pos, len(buf))
            return None if start < 0 else size
        if state is BODY_WHOLE:
            assert self._spilled is not None
            return len(self._spilled)
        if state is BROKEN:
            assert self._error is not None
            raise self._error
        return self._held + self._missing

    def bytes_wanted(self) -> int:
        """How many more bytes complete the header or frame in progress.

        0 means :meth:`next_frame` will return a payload now. Reading no more than this
        never reads into the next frame.
        """
        state = self._state
        if state is FRAMES:
            avail = len(self._buf) - self._pos
            if avail < 4:
                return 4 - avail
            size, start = self._parse_header(self._buf, self._pos, len(self._buf))
            if start < 0:
                return 12 - avail
            return max(0, start + size - len(self._buf))
        if state is BROKEN:
            assert self._error is not None
            raise self._error
        return self._missing  # 0 once the body is whole
