"""Sans-IO codec for ``multiprocessing.connection``'s framing on POSIX.

The stdlib frames every message as a big-endian signed 32-bit length followed by the
payload. A payload longer than ``0x7fffffff`` bytes gets the escape length ``-1``
followed by a big-endian unsigned 64-bit length. How the sender splits its writes (one
write up to 16 KiB, header and payload apart above that) is invisible on the wire: the
reader sees one byte stream.

This module moves no bytes. :class:`FrameDecoder` is fed whatever arrived and hands out
whole payloads; :func:`encode_header` returns the bytes that go before one. It imports
neither ``os`` nor an async library, so it can be tested one byte at a time.

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

import io
import struct
from multiprocessing.reduction import ForkingPickler
from typing import Any

__all__ = (
    "DEFAULT_MAX_MESSAGE_SIZE",
    "LONG_FORM_THRESHOLD",
    "WHOLE_BODY_MIN",
    "FrameDecoder",
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


class WireError(ValueError):
    """The byte stream is not valid framing; the stream can't be resynchronised."""


def encode_header(size: int) -> bytes:
    """Return the header that precedes a payload of *size* bytes."""
    if size < 0:
        raise ValueError(f"payload size {size} is negative")
    if size > LONG_FORM_THRESHOLD:
        return _ESCAPE + _LONG.pack(size)
    return _SHORT.pack(size)


class FrameDecoder:
    """Turn a byte stream into payloads, h11 style: :meth:`feed`, then :meth:`next_frame`.

    :meth:`next_frame` returns ``None`` while it needs more data.
    :meth:`bytes_wanted` says how many more bytes complete the header or frame in
    progress, so a reader that must not read ahead (a Queue's pipe is shared by
    consumers in other processes) can read exactly that many.

    After a :class:`WireError` the decoder stays broken and raises it again.
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
        "_target",
        "_target_done",
    )

    def __init__(self, max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size is not None and max_message_size < 0:
            raise ValueError(f"max_message_size={max_message_size} is negative")
        self._limit = max_message_size
        # Unparsed bytes are self._buf[self._pos:]. A bytes object plus an offset makes
        # a complete frame one slice, with no copy of the bytes after it.
        self._buf = b""
        self._pos = 0
        # A large body in progress: what arrived of it so far (_held bytes) and how many
        # bytes are missing.
        self._body: io.BytesIO | None = None
        self._held = 0
        self._missing = 0
        # The body's buffer holds _capacity bytes (>= _held; the rest is zeros, to be
        # overwritten); _body_view is the view lent by body_buffer(), if any.
        self._capacity = 0
        self._body_view: memoryview | None = None
        # A spilled body that completed and awaits next_frame().
        self._spilled: bytes | None = None
        # Header bytes of the spilled frame (in progress or awaiting next_frame()): they
        # were consumed from _buf but still count as received and not handed out.
        self._spill_header = 0
        # A caller's buffer that takes the large body in progress instead of _body
        # (adopt_body()); _target_done is the body's length once all of it is there.
        self._target: memoryview | None = None
        self._target_done = -1
        self._given = 0  # bytes of it copied back by give_back_body()
        self._error: WireError | None = None

    @property
    def max_message_size(self) -> int | None:
        return self._limit

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out, headers of those frames included."""
        spilled = 0 if self._spilled is None else len(self._spilled)
        done = max(self._target_done, 0)
        return len(self._buf) - self._pos + self._spill_header + self._held + spilled + done

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is held, so an EOF here is a clean one."""
        return (
            self._body is None
            and self._target is None
            and self._spilled is None
            and self._pos == len(self._buf)
        )

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes that arrived. Keeps a reference to *data* when it is ``bytes``."""
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)
        if self._missing:  # a large body in progress
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

    def _add_chunk(self, chunk: bytes) -> None:
        self._release_view()
        if self._target is not None:
            self._target[self._held : self._held + len(chunk)] = chunk
        else:
            body = self._body
            assert body is not None
            body.seek(self._held)
            body.write(chunk)
        self._held += len(chunk)
        self._capacity = max(self._capacity, self._held)
        self._missing -= len(chunk)
        if self._missing == 0:
            self._complete_body()

    def _complete_body(self) -> None:
        # getvalue() returns the BytesIO's own buffer, trimmed: no copy. (Joining a
        # list of chunks here would copy the whole body at once, a stall of ~100 ms for
        # 64 MiB.)
        if self._target is not None:
            self._target_done = self._held
        else:
            assert self._body is not None
            self._spilled = self._body.getvalue()
            self._body = None
        self._held = self._capacity = 0

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
        if self._target is not None and self._target_done < 0 and max_bytes > 0:
            self._release_view()
            held = self._held
            self._body_view = view = self._target[held : held + min(max_bytes, self._missing)]
            return view
        body = self._body
        if body is None or max_bytes <= 0:
            return None
        self._release_view()
        held = self._held
        capacity = self._capacity
        if held == capacity:
            step = min(max(capacity, BODY_GROWTH_MIN), BODY_GROWTH_MAX)
            capacity = held + min(self._missing, step)
            if held < BODY_GROWTH_MIN:
                # A new buffer, with what arrived copied in: bytes(n) comes from calloc
                # (fresh zero pages for a big one, nothing to fill), and a BytesIO that
                # holds the only reference to its initial bytes writes into them.
                fresh = io.BytesIO(bytes(capacity))
                fresh.write(body.getvalue())
                self._body = body = fresh
            else:
                # Writing a byte at the new end makes the BytesIO zero-fill up to it.
                body.seek(capacity - 1)
                body.write(b"\0")
            self._capacity = capacity
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
        if body is None or self._held + self._missing > len(target):
            return False
        self._release_view()
        with body.getbuffer() as buffer:
            target[: self._held] = buffer[: self._held]
        self._target = target
        self._body = None
        self._capacity = 0
        return True

    def take_target(self) -> int | None:
        """The length of the body that :meth:`adopt_body` let go on in a caller's
        buffer, once all of it is there (the frame is then handed out); else None."""
        done = self._target_done
        if done < 0:
            return None
        self._target = None
        self._target_done = -1
        self._spill_header = 0
        return done

    def give_back_body(self, max_bytes: int) -> bool:
        """Copy up to *max_bytes* more of the body from the caller's buffer back into a
        buffer of the decoder's own; True once the caller's buffer is no longer used (at
        once if it never was). The frame then goes on, or :meth:`next_frame` hands it
        out, as if it had never been in the caller's buffer. Call it until it returns
        True before the caller's buffer is used for anything else.
        """
        target = self._target
        if target is None:
            return True
        self._release_view()
        done = self._target_done
        have = self._held if done < 0 else done
        body = self._body
        if body is None:
            size = self._held + self._missing if done < 0 else done
            body, self._capacity = _new_body(size, b"")
            self._body = body
            self._given = 0
        given = self._given
        step = min(max_bytes, have - given)
        body.seek(given)
        body.write(target[given : given + step])
        self._given = given = given + step
        self._capacity = max(self._capacity, given)
        if given < have:
            return False
        self._target = None
        if done >= 0:
            self._target_done = -1
            self._spilled = body.getvalue()
            self._body = None
            self._capacity = 0
        return True

    def next_frame(self) -> bytes | None:
        """Return the next whole payload, or ``None`` if more bytes are needed.

        :raises WireError: the header is negative (other than the escape) or its length
            exceeds ``max_message_size``. Raised before the body is buffered.
        """
        spilled = self._spilled
        if spilled is not None:
            self._spilled = None
            self._spill_header = 0
            return spilled
        if self._body is not None or self._target is not None:
            return None
        buf = self._buf
        pos = self._pos
        end_of_data = len(buf)
        if end_of_data - pos < 4:
            if self._error is not None:
                raise self._error
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
        return None

    def _parse_header(self, buf: bytes, pos: int, end_of_data: int) -> tuple[int, int]:
        """Return ``(size, payload_start)``, or ``(0, -1)`` when the header is partial."""
        if self._error is not None:
            raise self._error
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
        raise self._error

    def frame_length(self) -> int | None:
        """The payload length of the frame in progress, once its header has arrived."""
        if self._spilled is not None:
            return len(self._spilled)
        if self._target_done >= 0:
            return self._target_done
        if self._body is not None or self._target is not None:
            return self._held + self._missing
        buf = self._buf
        if len(buf) - self._pos < 4:
            return None
        size, start = self._parse_header(buf, self._pos, len(buf))
        return None if start < 0 else size

    def bytes_wanted(self) -> int:
        """How many more bytes complete the header or frame in progress.

        0 means :meth:`next_frame` will return a payload now. Reading no more than this
        never reads into the next frame.
        """
        if self._spilled is not None or self._target_done >= 0:
            return 0
        if self._body is not None or self._target is not None:
            return self._missing
        avail = len(self._buf) - self._pos
        if avail < 4:
            return 4 - avail
        size, start = self._parse_header(self._buf, self._pos, len(self._buf))
        if start < 0:
            return 12 - avail
        return max(0, start + size - len(self._buf))
