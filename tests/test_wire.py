"""The sans-IO codec in ``asyncmp._core.wire`` against the stdlib's own framing.

Reference bytes come from a real ``multiprocessing.connection.Connection``; what we
encode is read back by one. The decoder is fed one byte at a time and at chunk
boundaries Hypothesis chooses, and after every step its whole observable state
(``buffered``, ``at_boundary``, ``bytes_wanted()``, ``frame_length()``, and what
``feed_eof()`` would make of an end of the stream there) is compared with a model computed
from the frame offsets.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import multiprocessing
import os
import pickle
import random
import struct
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncmp._core import wire as _wire
from asyncmp._core.wire import (
    BODY_GROWTH_MIN,
    CLEAN_END,
    DEFAULT_MAX_MESSAGE_SIZE,
    LONG_FORM_THRESHOLD,
    MOVES,
    SPILL_THRESHOLD,
    DecoderState,
    FrameDecoder,
    StreamEnd,
    WireError,
    encode_header,
)

from .support.memory import RESIDENT_KNOWN, resident

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: Sizes around every threshold of the stdlib writer (16 KiB) and of the decoder.
EDGE_SIZES = (
    0,
    1,
    3,
    4,
    12,
    16383,
    16384,
    16385,
    SPILL_THRESHOLD - 1,
    SPILL_THRESHOLD,
    SPILL_THRESHOLD + 1,
    SPILL_THRESHOLD + 13,
    200 * KiB,
)


def payload(index: int, size: int) -> bytes:
    """Distinct, reproducible bytes for message *index*: swapped or torn frames show."""
    return random.Random(index * 1_000_003 + size).randbytes(size)


def long_header(size: int) -> bytes:
    """The ``-1`` escape and a 64-bit length: legal framing for any size."""
    return struct.pack("!iQ", -1, size)


def check_payload(got: bytes | None, expected: bytes, index: int) -> None:
    """Compare payloads without letting pytest diff hundreds of KiB."""
    if got is None:
        raise AssertionError(f"frame {index}: got None, expected {len(expected)} bytes")
    if got != expected:
        where = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        raise AssertionError(
            f"frame {index}: got {len(got)} bytes, expected {len(expected)}; first difference "
            f"at offset {where}"
        )


@dataclass(frozen=True)
class Stream:
    """A byte stream of frames and the decoder state expected at any offset in it."""

    payloads: tuple[bytes, ...]
    long_form: tuple[bool, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    data: bytes

    @classmethod
    def build(cls, frames: Iterable[tuple[int, bool]]) -> Stream:
        """*frames* are ``(size, long_form)``; the payload of frame i is ``payload(i, size)``."""
        payloads: list[bytes] = []
        long_form: list[bool] = []
        starts: list[int] = []
        ends: list[int] = []
        parts: list[bytes] = []
        offset = 0
        for index, (size, long) in enumerate(frames):
            body = payload(index, size)
            header = long_header(size) if long else encode_header(size)
            payloads.append(body)
            long_form.append(long)
            starts.append(offset)
            offset += len(header) + size
            ends.append(offset)
            parts += (header, body)
        return cls(tuple(payloads), tuple(long_form), tuple(starts), tuple(ends), b"".join(parts))

    def check(self, decoder: FrameDecoder, fed: int, handed: int) -> None:
        """Check *decoder* after it got ``data[:fed]`` and handed out *handed* frames."""
        consumed = self.ends[handed - 1] if handed else 0
        state = f"fed={fed} handed={handed}"
        assert decoder.buffered == fed - consumed, state
        assert decoder.at_boundary is (fed == consumed), state
        if handed == len(self.payloads):
            avail, long, size, end = fed - consumed, False, 0, 0
        else:
            avail = fed - self.starts[handed]
            long = self.long_form[handed]
            size = len(self.payloads[handed])
            end = self.ends[handed]
        if avail < 4:
            wanted, length = 4 - avail, None
        elif long and avail < 12:
            wanted, length = 12 - avail, None
        else:
            wanted, length = max(0, end - fed), size
        assert decoder.bytes_wanted() == wanted, state
        assert decoder.frame_length() == length, state
        # The stream could end here: clean only at a frame boundary. It changes nothing.
        held = fed - consumed
        eof = CLEAN_END if held == 0 else StreamEnd(truncated=True, held=held)
        assert decoder.feed_eof() == eof, state


def run_decoder(stream: Stream, chunks: Iterable[bytes], max_message_size: int | None) -> None:
    """Feed *chunks* (which must add up to ``stream.data``), checking the model throughout."""
    decoder = FrameDecoder(max_message_size)
    fed = handed = 0
    stream.check(decoder, fed, handed)
    for chunk in chunks:
        decoder.feed(chunk)
        fed += len(chunk)
        stream.check(decoder, fed, handed)
        while (frame := decoder.next_frame()) is not None:
            assert handed < len(stream.payloads), "decoder made up a frame"
            check_payload(frame, stream.payloads[handed], handed)
            handed += 1
            stream.check(decoder, fed, handed)
    assert fed == len(stream.data)
    assert handed == len(stream.payloads)


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- the stdlib as reference -----------------------------------------------------------


def stdlib_wire(send: Callable[[Connection[Any, Any]], None]) -> bytes:
    """What a real stdlib Connection writes when *send* runs on it (in a thread)."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            send(writer)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            writer.close()

    thread = threading.Thread(target=write)
    thread.start()
    chunks: list[bytes] = []
    try:
        while data := os.read(reader.fileno(), 256 * KiB):
            chunks.append(data)
    finally:
        reader.close()  # unblocks a writer stuck on a full pipe if reading failed
        thread.join()
    assert not errors, errors
    return b"".join(chunks)


def stdlib_read(data: bytes, receive: Callable[[Connection[Any, Any]], Any]) -> list[Any]:
    """Write *data* into a pipe (in a thread) and call *receive* on a stdlib Connection
    on the read end until EOF."""
    rfd, wfd = os.pipe()
    reader: Connection[Any, Any] = Connection(rfd, writable=False)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view) :]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            os.close(wfd)

    thread = threading.Thread(target=write)
    thread.start()
    received: list[Any] = []
    try:
        while True:
            try:
                received.append(receive(reader))
            except EOFError:
                break
    finally:
        reader.close()
        thread.join()
    assert not errors, errors
    return received


class WriteRecorder:
    """Stands in for ``Connection._send``: records each write, without keeping big ones."""

    def __init__(self, keep_up_to: int) -> None:
        self.keep_up_to = keep_up_to
        self.writes: list[bytes | int] = []

    def __call__(self, buf: bytes | memoryview) -> None:
        n = len(buf)
        self.writes.append(bytes(buf) if n <= self.keep_up_to else n)


def recording_connection(keep_up_to: int) -> tuple[Connection[Any, Any], WriteRecorder]:
    """A stdlib Connection whose writes go to a :class:`WriteRecorder`, not to its fd."""
    conn: Connection[Any, Any] = Connection(os.open(os.devnull, os.O_WRONLY), readable=False)
    recorder = WriteRecorder(keep_up_to)
    setattr(conn, "_send", recorder)  # noqa: B010 - assigning a method; mypy refuses the dot
    return conn, recorder


# -- constants and encode_header -------------------------------------------------------


def test_constants() -> None:
    assert LONG_FORM_THRESHOLD == 0x7FFFFFFF
    assert SPILL_THRESHOLD == 0x1_0000
    assert DEFAULT_MAX_MESSAGE_SIZE == 0x1_0000_0000
    assert issubclass(WireError, ValueError)
    assert FrameDecoder().max_message_size == DEFAULT_MAX_MESSAGE_SIZE
    assert FrameDecoder(None).max_message_size is None
    assert FrameDecoder(0).max_message_size == 0


def test_encode_header() -> None:
    for size in (0, 1, 255, 256, 16384, 16385, 2**24, 2**31 - 1):
        assert encode_header(size) == struct.pack("!i", size), size
    for size in (2**31, 2**31 + 1, 2**32, 5 * GiB, 2**63, 2**64 - 1):
        assert encode_header(size) == struct.pack("!i", -1) + struct.pack("!Q", size), size
    for size in (-1, -2, -(2**31)):
        with pytest.raises(ValueError, match="negative"):
            encode_header(size)


def test_negative_max_message_size_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        FrameDecoder(-1)


# -- wire compatibility with the stdlib -------------------------------------------------

STDLIB_SIZES = (0, 1, 3, 16383, 16384, 16385, 65535, 65536, 65537, 200_000, MiB)


def test_decodes_what_stdlib_send_bytes_writes() -> None:
    payloads = [payload(i, size) for i, size in enumerate(STDLIB_SIZES)]

    def send(conn: Connection[Any, Any]) -> None:
        for body in payloads:
            conn.send_bytes(body)

    wire = stdlib_wire(send)
    stream = Stream.build((size, False) for size in STDLIB_SIZES)
    # The stdlib writes the header apart from the payload above 16 KiB; the stream is
    # the same, and it is ours.
    assert wire == stream.data
    run_decoder(stream, [wire], max_message_size=None)
    run_decoder(stream, split(wire, range(0, len(wire), 4093)), max_message_size=MiB)
    run_decoder(stream, split(wire, stream.starts), max_message_size=None)
    run_decoder(stream, split(wire, [s + d for s in stream.starts for d in (2, 4)]), None)


def test_decodes_stdlib_bytes_one_byte_at_a_time() -> None:
    sizes = (0, 1, 16384, 16385, 0, SPILL_THRESHOLD + 1, 5)

    def send(conn: Connection[Any, Any]) -> None:
        for i, size in enumerate(sizes):
            conn.send_bytes(payload(i, size))

    wire = stdlib_wire(send)
    stream = Stream.build((size, False) for size in sizes)
    assert wire == stream.data
    run_decoder(stream, one_byte_at_a_time(wire), max_message_size=None)


def test_decodes_what_stdlib_send_pickles() -> None:
    objects: list[object] = [None, 1, "x" * 20_000, {"a": [1, 2.5, b"\0"]}, bytes(100_000)]

    def send(conn: Connection[Any, Any]) -> None:
        for obj in objects:
            conn.send(obj)

    wire = stdlib_wire(send)
    decoder = FrameDecoder()
    received: list[object] = []
    for chunk in split(wire, range(0, len(wire), 1000)):
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            received.append(pickle.loads(frame))
    assert received == objects
    assert decoder.at_boundary


@pytest.mark.parametrize(
    ("size", "writes"),
    [(0, 1), (16383, 1), (16384, 1), (16385, 2), (200_000, 2)],
)
def test_stdlib_write_split_decodes_write_by_write(size: int, writes: int) -> None:
    body = payload(0, size)
    conn, recorder = recording_connection(keep_up_to=1 << 30)
    try:
        conn.send_bytes(body)
    finally:
        conn.close()
    # One write up to 16 KiB, header and payload apart above it.
    assert len(recorder.writes) == writes
    chunks = [w for w in recorder.writes if isinstance(w, bytes)]
    assert len(chunks) == writes
    assert chunks[0][:4] == encode_header(size)
    decoder = FrameDecoder()
    frames: list[bytes] = []
    for chunk in chunks:
        decoder.feed(chunk)
        if (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert len(frames) == 1
    check_payload(frames[0], body, 0)
    assert decoder.at_boundary


@pytest.mark.skipif(sys.maxsize < 2**32, reason="needs a 64-bit address space")
@pytest.mark.parametrize("size", [2**31 - 1, 2**31, 2**31 + 1])
def test_long_header_matches_stdlib(size: int) -> None:
    try:
        # Anonymous, lazily zero-filled: nothing touches the pages, nothing is sent.
        big = mmap.mmap(-1, 2**31 + 1)
    except OSError as exc:  # pragma: no cover - depends on the machine's overcommit
        pytest.skip(f"cannot map 2 GiB of address space: {exc}")
    conn, recorder = recording_connection(keep_up_to=12)
    try:
        conn.send_bytes(big, 0, size)
    finally:
        conn.close()
        big.close()
    *headers, body_length = recorder.writes
    assert body_length == size
    assert all(isinstance(h, bytes) for h in headers)
    header = b"".join(h for h in headers if isinstance(h, bytes))
    assert header == encode_header(size)
    assert len(header) == (4 if size <= LONG_FORM_THRESHOLD else 12)

    # The decoder reads the length from that header and waits for the body...
    decoder = FrameDecoder(None)
    decoder.feed(header)
    assert decoder.next_frame() is None
    assert decoder.frame_length() == size
    assert decoder.bytes_wanted() == size
    assert decoder.buffered == len(header)
    # ... and checks it against the limit, one byte short of which it refuses.
    refusing = FrameDecoder(size - 1)
    refusing.feed(header)
    with pytest.raises(WireError, match=f"frame length {size} exceeds"):
        refusing.next_frame()
    accepting = FrameDecoder(size)
    accepting.feed(header)
    assert accepting.next_frame() is None


def test_long_header_for_a_small_frame() -> None:
    # The stdlib reader takes -1 + Q for any size, so a small frame may use it too.
    body = payload(0, 100)
    frame = long_header(100) + body
    decoder = FrameDecoder(99)
    decoder.feed(frame)
    with pytest.raises(WireError, match="frame length 100 exceeds max_message_size=99"):
        decoder.next_frame()
    for limit in (100, None, DEFAULT_MAX_MESSAGE_SIZE):
        stream = Stream.build([(100, True)])
        assert stream.data == frame
        run_decoder(stream, [frame], limit)
        run_decoder(stream, one_byte_at_a_time(frame), limit)


def test_long_header_bytes_wanted_steps() -> None:
    frame = long_header(100) + payload(0, 100)
    decoder = FrameDecoder()
    wanted: list[int] = []
    for i in range(len(frame)):
        wanted.append(decoder.bytes_wanted())
        decoder.feed(frame[i : i + 1])
    assert wanted == [4, 3, 2, 1, 8, 7, 6, 5, 4, 3, 2, 1, *range(100, 0, -1)]
    assert decoder.bytes_wanted() == 0
    check_payload(decoder.next_frame(), frame[12:], 0)


def test_long_header_length_is_read_not_assumed() -> None:
    header = encode_header(2**31)
    decoder = FrameDecoder(2**31 - 1)
    decoder.feed(header[:11])
    assert decoder.next_frame() is None  # the 64-bit length is not complete yet
    decoder.feed(header[11:])
    with pytest.raises(WireError, match="frame length 2147483648 exceeds"):
        decoder.next_frame()


STDLIB_READ_FRAMES = (
    (0, False),
    (1, False),
    (16384, False),
    (16385, False),
    (0, True),
    (100, True),
    (SPILL_THRESHOLD + 1, True),
    (200_000, False),
)


def test_stdlib_reads_what_we_encode() -> None:
    stream = Stream.build(STDLIB_READ_FRAMES)
    received = stdlib_read(stream.data, lambda conn: conn.recv_bytes())
    assert len(received) == len(stream.payloads)
    for index, (got, expected) in enumerate(zip(received, stream.payloads, strict=True)):
        check_payload(got, expected, index)


def test_stdlib_unpickles_what_we_encode() -> None:
    objects: list[object] = [None, "x" * 20_000, {"a": (1, 2.5)}, list(range(10_000))]
    pickles = [bytes(ForkingPickler.dumps(obj)) for obj in objects]
    wire = b"".join(encode_header(len(p)) + p for p in pickles)
    assert stdlib_read(wire, lambda conn: conn.recv()) == objects


def test_exact_reads_from_a_real_pipe_leave_the_next_frame_alone() -> None:
    """Reading bytes_wanted() at a time from the fd never reads into the next frame:
    the stdlib can still receive the frame after the ones we took."""
    sizes = (0, 5, 16385, SPILL_THRESHOLD + 1, 200_000)
    sentinel = b"the next frame belongs to someone else"
    reader, writer = multiprocessing.Pipe(duplex=False)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for i, size in enumerate(sizes):
                writer.send_bytes(payload(i, size))
            writer.send_bytes(sentinel)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    try:
        decoder = FrameDecoder()
        frames: list[bytes] = []
        while len(frames) < len(sizes):
            wanted = decoder.bytes_wanted()
            if wanted == 0:
                frame = decoder.next_frame()
                assert frame is not None
                frames.append(frame)
                continue
            data = os.read(reader.fileno(), wanted)
            assert data
            decoder.feed(data)
        assert decoder.at_boundary
        assert reader.recv_bytes() == sentinel
    finally:
        reader.close()  # unblocks a writer stuck on a full pipe if reading failed
        thread.join()
        writer.close()
    assert not errors, errors
    for index, (got, size) in enumerate(zip(frames, sizes, strict=True)):
        check_payload(got, payload(index, size), index)


# -- any chunking, chosen by Hypothesis -------------------------------------------------

sizes_st = st.one_of(
    st.sampled_from(EDGE_SIZES),
    st.integers(0, 200 * KiB),
    st.integers(0, 40),
)
frames_st = st.lists(st.tuples(sizes_st, st.booleans()), max_size=4)


@settings(max_examples=100, deadline=None)
@given(frames=frames_st, data=st.data())
def test_any_chunking_yields_the_payloads(
    frames: list[tuple[int, bool]], data: st.DataObject
) -> None:
    stream = Stream.build(frames)
    total = len(stream.data)
    cuts = data.draw(st.lists(st.integers(0, total), max_size=30), label="cuts")
    # Cuts next to frame starts land inside and around headers.
    near = data.draw(
        st.lists(st.tuples(st.integers(0, max(0, len(frames) - 1)), st.integers(-2, 14))),
        label="cuts near headers",
    )
    cuts += [stream.starts[i] + d for i, d in near if stream.starts]
    limit = data.draw(st.sampled_from([None, 200 * KiB, DEFAULT_MAX_MESSAGE_SIZE]), label="limit")
    run_decoder(stream, split(stream.data, cuts), limit)


@settings(max_examples=40, deadline=None)
@given(frames=st.lists(st.tuples(st.integers(0, 300), st.booleans()), max_size=6))
def test_one_byte_at_a_time_small_frames(frames: list[tuple[int, bool]]) -> None:
    stream = Stream.build(frames)
    run_decoder(stream, one_byte_at_a_time(stream.data), max_message_size=300)


@settings(max_examples=100, deadline=None)
@given(frames=frames_st, data=st.data())
def test_reading_bytes_wanted_never_reads_past_the_frame(
    frames: list[tuple[int, bool]], data: st.DataObject
) -> None:
    """Read at most bytes_wanted() at a time (Hypothesis shortens some reads, then every
    read is exactly bytes_wanted()); 0 means next_frame() returns a frame now."""
    stream = Stream.build(frames)
    shorter = iter(data.draw(st.lists(st.integers(1, 2 * SPILL_THRESHOLD), max_size=16)))
    decoder = FrameDecoder(None)
    pos = handed = 0
    while handed < len(stream.payloads):
        wanted = decoder.bytes_wanted()
        if wanted == 0:
            check_payload(decoder.next_frame(), stream.payloads[handed], handed)
            handed += 1
            continue
        assert decoder.next_frame() is None
        assert decoder.bytes_wanted() == wanted  # next_frame() moved no boundary
        n = min(wanted, next(shorter, wanted))
        assert pos + n <= stream.ends[handed], "bytes_wanted() reaches into the next frame"
        decoder.feed(stream.data[pos : pos + n])
        pos += n
    assert pos == len(stream.data)
    assert decoder.at_boundary
    assert decoder.bytes_wanted() == 4
    assert decoder.next_frame() is None


# -- state details ----------------------------------------------------------------------


def test_frame_length_follows_the_frame_in_progress() -> None:
    big = SPILL_THRESHOLD * 3
    body = payload(0, big)
    header = encode_header(big)
    decoder = FrameDecoder()
    assert decoder.frame_length() is None
    decoder.feed(header[:3])
    assert decoder.frame_length() is None
    decoder.feed(header[3:] + body[:10])
    assert decoder.frame_length() == big
    assert decoder.next_frame() is None  # the body is now collected as chunks
    assert decoder.frame_length() == big
    decoder.feed(body[10:-1])
    assert decoder.next_frame() is None
    assert decoder.frame_length() == big
    # The last byte completes the body; the next header arrives with it.
    decoder.feed(body[-1:] + encode_header(7) + b"1234")
    assert decoder.frame_length() == big  # the completed body still awaits next_frame()
    assert decoder.bytes_wanted() == 0
    assert not decoder.at_boundary
    assert decoder.buffered == len(header) + big + 4 + 4
    check_payload(decoder.next_frame(), body, 0)
    assert decoder.frame_length() == 7
    assert decoder.bytes_wanted() == 3
    decoder.feed(b"567")
    assert decoder.next_frame() == b"1234567"
    assert decoder.frame_length() is None
    assert decoder.at_boundary


def test_limit_is_inclusive() -> None:
    decoder = FrameDecoder(5)
    decoder.feed(encode_header(5) + b"12345" + encode_header(6))
    assert decoder.next_frame() == b"12345"
    with pytest.raises(WireError, match="frame length 6 exceeds max_message_size=5"):
        decoder.next_frame()
    empty = FrameDecoder(0)
    empty.feed(encode_header(0) * 3)
    assert [empty.next_frame() for _ in range(4)] == [b"", b"", b"", None]


def test_feed_copies_mutable_buffers() -> None:
    data = bytearray(encode_header(3) + b"abc")
    decoder = FrameDecoder()
    decoder.feed(data)
    data[4:] = b"XYZ"
    view_source = bytearray(encode_header(2) + b"de")
    decoder.feed(memoryview(view_source))
    view_source[4:] = b"!!"
    assert decoder.next_frame() == b"abc"
    assert decoder.next_frame() == b"de"


def test_feeding_nothing_changes_nothing() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"")
    decoder.feed(bytearray())
    assert decoder.at_boundary
    assert decoder.buffered == 0
    assert decoder.bytes_wanted() == 4
    decoder.feed(encode_header(SPILL_THRESHOLD + 2) + b"x")
    assert decoder.next_frame() is None  # collecting chunks now
    decoder.feed(b"")
    assert decoder.buffered == 4 + 1
    assert decoder.bytes_wanted() == SPILL_THRESHOLD + 1


# -- hostile input ----------------------------------------------------------------------


def assert_broken(decoder: FrameDecoder, match: str) -> None:
    """The decoder keeps raising, whatever arrives next."""
    for _ in range(2):
        with pytest.raises(WireError, match=match):
            decoder.next_frame()
        with pytest.raises(WireError, match=match):
            decoder.bytes_wanted()
        with pytest.raises(WireError, match=match):
            decoder.frame_length()
        decoder.feed(encode_header(1) + b"x")


@pytest.mark.parametrize("length", [-2, -3, -256, -(2**31)])
def test_negative_length_is_rejected(length: int) -> None:
    header = struct.pack("!i", length)
    decoder = FrameDecoder(None)
    decoder.feed(encode_header(1) + b"a" + header[:3])
    assert decoder.next_frame() == b"a"
    assert decoder.next_frame() is None
    decoder.feed(header[3:])
    with pytest.raises(WireError, match=f"frame length {length} is negative"):
        decoder.next_frame()
    assert_broken(decoder, "is negative")


@pytest.mark.parametrize(
    ("header", "limit"),
    [
        pytest.param(long_header(2**63), DEFAULT_MAX_MESSAGE_SIZE, id="long-2**63"),
        pytest.param(long_header(2**64 - 1), DEFAULT_MAX_MESSAGE_SIZE, id="long-2**64-1"),
        pytest.param(long_header(2**40), DEFAULT_MAX_MESSAGE_SIZE, id="long-2**40"),
        pytest.param(
            long_header(DEFAULT_MAX_MESSAGE_SIZE + 1), DEFAULT_MAX_MESSAGE_SIZE, id="long-limit+1"
        ),
        pytest.param(long_header(2**40), MiB, id="long-2**40-1MiB"),
        pytest.param(encode_header(2**31 - 1), MiB, id="short-2**31-1-1MiB"),
        pytest.param(encode_header(MiB + 1), MiB, id="short-limit+1"),
    ],
)
def test_oversized_frame_is_rejected_before_allocation(header: bytes, limit: int) -> None:
    decoder = FrameDecoder(limit)
    tracemalloc.start()
    try:
        decoder.feed(header)  # the header alone: no body has arrived
        with pytest.raises(WireError, match=f"exceeds max_message_size={limit}"):
            decoder.next_frame()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * KiB
    assert_broken(decoder, "exceeds max_message_size")


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(encode_header(2**31 - 1), id="short-2**31-1"),
        pytest.param(long_header(2**63), id="long-2**63"),
        pytest.param(long_header(2**64 - 1), id="long-2**64-1"),
    ],
)
def test_unlimited_huge_frame_holds_only_what_arrived(
    monkeypatch: pytest.MonkeyPatch, header: bytes
) -> None:
    # The growing buffer; the whole-body one is allocated at once, and costs memory only
    # once written (test_a_claimed_whole_body_costs_only_what_arrived).
    monkeypatch.setattr(_wire, "WHOLE_BODY_MIN", 2**64)
    claimed: int = struct.unpack("!i" if len(header) == 4 else "!iQ", header)[-1]
    pieces = [bytes([i % 256]) * 64 for i in range(64)]  # 4 KiB, allocated before tracing
    decoder = FrameDecoder(None)
    tracemalloc.start()
    try:
        decoder.feed(header + b"\x01")
        assert decoder.next_frame() is None
        received = len(header) + 1
        assert decoder.buffered == received
        for piece in pieces:
            decoder.feed(piece)
            received += len(piece)
            assert decoder.next_frame() is None
            assert decoder.buffered == received
            assert decoder.bytes_wanted() == claimed - (received - len(header))
            assert decoder.frame_length() == claimed
            assert not decoder.at_boundary
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MiB


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([SPILL_THRESHOLD + 1, 300_000, 2_500_000]),
    first=st.integers(4, 200_000),
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(1, 3_000_000), st.floats(0, 1)), max_size=80
    ),
)
def test_body_buffer_and_feed_interleaved_give_the_payload(
    size: int, first: int, steps: list[tuple[bool, int, float]]
) -> None:
    payload = random.Random(size).randbytes(size)
    frame = encode_header(size) + payload + encode_header(3) + b"end"
    decoder = FrameDecoder()
    decoder.feed(frame[:first])
    pos = min(first, len(frame))
    got = [f for f in iter(decoder.next_frame, None)]
    for use_view, n, fraction in [*steps, *[(False, 1 << 30, 1.0)] * 2]:
        view = decoder.body_buffer(n) if use_view else None
        if view is None:
            decoder.feed(frame[pos : pos + n])
            pos += len(frame[pos : pos + n])
        else:
            assert 0 < len(view) <= n
            k = int(len(view) * fraction)
            view[:k] = frame[pos : pos + k]
            pos += k
            decoder.body_received(k)
            with pytest.raises(ValueError):
                view[:1] = b"x"  # taken back
        got += iter(decoder.next_frame, None)
        assert decoder.buffered == pos - sum(len(f) + 4 for f in got)
    assert got == [payload, b"end"]
    assert decoder.at_boundary


def test_body_buffer_grows_only_by_what_arrived(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_wire, "WHOLE_BODY_MIN", 2**64)
    claimed = 2**40
    decoder = FrameDecoder(None)
    decoder.feed(struct.pack("!iQ", -1, claimed) + b"\x01")
    assert decoder.next_frame() is None
    held = 1
    for _ in range(40):
        view = decoder.body_buffer(1 << 30)
        assert view is not None
        # Room for what arrived again (at least BODY_GROWTH_MIN), never the claim.
        n = len(view)
        assert n <= max(held, BODY_GROWTH_MIN)
        view[:] = b"\x02" * n
        decoder.body_received(n)
        held += n
        if held > 16 * MiB:
            break
    assert decoder.buffered == 12 + held
    assert decoder.frame_length() == claimed


# --- a body in a caller's buffer, and a whole-body buffer ----------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    size=st.sampled_from([SPILL_THRESHOLD + 1, 300_000, 2_500_000]),
    whole=st.booleans(),
    first=st.integers(SPILL_THRESHOLD // 2, 200_000),
    steps=st.lists(st.tuples(st.booleans(), st.integers(1, 900_000)), max_size=12),
    give_back_after=st.one_of(st.none(), st.integers(0, 14)),
    give_back_step=st.integers(1, 3_000_000),
)
def test_a_body_adopted_by_a_caller_buffer_arrives_there_or_is_given_back(
    size: int,
    whole: bool,
    first: int,
    steps: list[tuple[bool, int]],
    give_back_after: int | None,
    give_back_step: int,
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        if whole:  # the whole-body buffer, at sizes a test can afford
            patch.setattr(_wire, "WHOLE_BODY_MIN", 0)
        _adopt_and_maybe_give_back(size, first, steps, give_back_after, give_back_step)


def _adopt_and_maybe_give_back(
    size: int,
    first: int,
    steps: list[tuple[bool, int]],
    give_back_after: int | None,
    give_back_step: int,
) -> None:
    payload = random.Random(size).randbytes(size)
    frame = encode_header(size) + payload + encode_header(3) + b"end"
    first = min(first, 4 + size - SPILL_THRESHOLD - 1)  # a large body, still in progress
    decoder = FrameDecoder()
    decoder.feed(frame[:first])
    pos = first
    assert decoder.next_frame() is None
    target = bytearray(size + 7)
    assert decoder.adopt_body(memoryview(target)[5:])
    assert not decoder.adopt_body(memoryview(target)[5:])  # once
    assert decoder.frame_length() == size
    given_back = False
    for i, (use_view, n) in enumerate([*steps, *[(False, 1 << 30)] * 2]):
        if give_back_after == i and not given_back:
            while not decoder.give_back_body(give_back_step):
                pass
            given_back = True
            target[:] = b"\xff" * len(target)  # the caller's buffer is the caller's again
        view = decoder.body_buffer(n) if use_view else None
        if view is None:
            decoder.feed(frame[pos : pos + n])
            pos += len(frame[pos : pos + n])
        else:
            k = len(view)
            view[:] = frame[pos : pos + k]
            pos += k
            decoder.body_received(k)
        assert decoder.buffered == pos - (4 + size + 4 if decoder.frame_length() == 3 else 0)
    if given_back:
        assert decoder.take_target() is None
        assert decoder.next_frame() == payload
    else:
        assert decoder.next_frame() is None  # the body is the caller's to take
        assert decoder.take_target() == size
        assert target[5 : 5 + size] == payload
    assert decoder.next_frame() == b"end"
    assert decoder.at_boundary and decoder.buffered == 0


def test_a_body_complete_in_a_caller_buffer_can_still_be_given_back() -> None:
    size = SPILL_THRESHOLD * 3
    payload = random.Random(1).randbytes(size)
    decoder = FrameDecoder()
    decoder.feed(encode_header(size) + payload[:1000])
    assert decoder.next_frame() is None
    target = bytearray(size)
    assert decoder.adopt_body(memoryview(target))
    decoder.feed(payload[1000:])
    assert decoder.buffered == 4 + size and not decoder.at_boundary
    while not decoder.give_back_body(10_000):
        pass
    target[:] = bytes(size)
    assert decoder.take_target() is None
    assert decoder.next_frame() == payload
    assert decoder.at_boundary


def test_a_body_is_adopted_only_by_a_buffer_that_holds_it() -> None:
    decoder = FrameDecoder()
    size = SPILL_THRESHOLD * 2
    decoder.feed(encode_header(size) + b"x" * 100)
    assert decoder.next_frame() is None
    assert not decoder.adopt_body(memoryview(bytearray(size - 1)))
    small = FrameDecoder()
    small.feed(encode_header(10) + b"x")
    assert not small.adopt_body(memoryview(bytearray(100)))  # not a large body
    assert small.give_back_body(1)  # nothing to give back


def test_a_whole_body_buffer_is_handed_over_without_a_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_wire, "WHOLE_BODY_MIN", 0)
    size = 3 * MiB
    payload = random.Random(2).randbytes(size)
    decoder = FrameDecoder()
    decoder.feed(encode_header(size) + payload[:1000])
    assert decoder.next_frame() is None
    view = decoder.body_buffer(1 << 30)
    assert view is not None and len(view) == size - 1000  # all the room at once
    window = ctypes.c_char.from_buffer(view)
    address = ctypes.addressof(window)
    del window  # it holds the view exported
    view[:] = payload[1000:]
    decoder.body_received(size - 1000)
    frame = decoder.next_frame()
    assert frame == payload
    # The bytes handed out are the buffer that was written: no copy at the end.
    assert frame is not None
    assert ctypes.cast(ctypes.c_char_p(frame), ctypes.c_void_p).value == address - 1000


@pytest.mark.skipif(not RESIDENT_KNOWN, reason="no way to read the resident size here")
@pytest.mark.parametrize("claimed", [64 * MiB, GiB, 2**31 - 1, 2**40])
def test_a_claimed_whole_body_costs_only_what_arrived(claimed: int) -> None:
    header = encode_header(claimed)
    piece = b"\x07" * (256 * KiB)
    decoder = FrameDecoder(None)
    before = resident()
    decoder.feed(header + piece)
    assert decoder.next_frame() is None
    for _ in range(3):  # 1 MiB in all, half of it through body_buffer()
        view = decoder.body_buffer(len(piece) // 2)
        assert view is not None
        view[:] = piece[: len(view)]
        decoder.body_received(len(view))
        decoder.feed(piece[: len(piece) // 2])
    grown = resident() - before
    assert decoder.buffered == len(header) + MiB
    assert grown < 16 * MiB, f"holding 1 MiB of a {claimed}-byte claim took {grown} bytes"


# --- the end of the stream, and the states ------------------------------------------------------


def state_of(decoder: FrameDecoder) -> DecoderState:
    """``decoder.state``, read anew (a type checker would keep an earlier reading)."""
    return decoder.state


@settings(max_examples=60, deadline=None)
@given(frames=frames_st, data=st.data())
def test_feed_eof_is_clean_only_at_a_frame_boundary(
    frames: list[tuple[int, bool]], data: st.DataObject
) -> None:
    """The stream ends anywhere (at frame ends, Hypothesis makes sure, and in between),
    after chunks Hypothesis chooses: clean exactly where every byte went out in a frame,
    else truncated with the bytes of the frame cut short. It may be said again, and
    moves nothing."""
    stream = Stream.build(frames)
    total = len(stream.data)
    cut = data.draw(st.one_of(st.sampled_from([0, *stream.ends]), st.integers(0, total)))
    cuts = data.draw(st.lists(st.integers(0, cut), max_size=10), label="cuts")
    decoder = FrameDecoder(None)
    handed = 0
    for chunk in split(stream.data[:cut], cuts):
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            check_payload(frame, stream.payloads[handed], handed)
            handed += 1
    held = cut - (stream.ends[handed - 1] if handed else 0)
    state = decoder.state
    end = decoder.feed_eof()
    if held == 0:
        assert end is CLEAN_END and not end.truncated
        assert decoder.at_boundary
    else:
        assert end == StreamEnd(truncated=True, held=held)
    assert decoder.feed_eof() == end
    assert decoder.state is state
    assert decoder.next_frame() is None
    assert decoder.buffered == held


def test_feed_eof_in_a_caller_buffer_leaves_the_body_to_give_back() -> None:
    size = SPILL_THRESHOLD * 3
    body = payload(0, size)
    decoder = FrameDecoder()
    decoder.feed(encode_header(size) + body[:1000])
    assert decoder.next_frame() is None
    target = bytearray(size)
    assert decoder.adopt_body(memoryview(target))
    decoder.feed(body[1000:5000])
    assert state_of(decoder) is DecoderState.BODY_IN_TARGET
    end = decoder.feed_eof()
    assert end == StreamEnd(truncated=True, held=4 + 5000)
    while not decoder.give_back_body(1000):
        assert state_of(decoder) is DecoderState.GIVING_BACK
        assert decoder.feed_eof() == end
    target[:] = bytes(size)  # the caller's buffer is the caller's again
    assert state_of(decoder) is DecoderState.BODY
    assert decoder.feed_eof() == end
    decoder.feed(body[5000:])
    assert decoder.next_frame() == body
    assert decoder.feed_eof() is CLEAN_END


def test_feed_eof_after_bad_framing_raises_the_framing_error() -> None:
    decoder = FrameDecoder(10)
    decoder.feed(encode_header(11))
    with pytest.raises(WireError, match="frame length 11 exceeds max_message_size=10"):
        decoder.next_frame()
    assert decoder.state is DecoderState.BROKEN
    for _ in range(2):
        with pytest.raises(WireError, match="frame length 11 exceeds max_message_size=10"):
            decoder.feed_eof()


def test_the_states_of_large_frames_follow_the_table_of_moves() -> None:
    """Each way a large frame can go, state by state; every move is one of MOVES."""
    size = SPILL_THRESHOLD * 2
    body = payload(1, size)
    seen: list[DecoderState] = []

    def step(decoder: FrameDecoder) -> None:
        if decoder.state is not seen[-1]:
            assert (seen[-1], decoder.state) in {(a, b) for a, b, _ in MOVES}
            seen.append(decoder.state)

    S = DecoderState
    # In the decoder's own buffer.
    decoder = FrameDecoder()
    seen[:] = [decoder.state]
    decoder.feed(encode_header(size) + body[:10])
    assert decoder.next_frame() is None
    step(decoder)
    decoder.feed(body[10:])
    step(decoder)
    assert decoder.next_frame() == body
    step(decoder)
    assert seen == [S.FRAMES, S.BODY, S.BODY_WHOLE, S.FRAMES]
    # In a caller's buffer, taken from there.
    decoder.feed(encode_header(size) + body[:10])
    assert decoder.next_frame() is None
    seen[:] = [S.FRAMES, decoder.state]
    assert decoder.adopt_body(memoryview(bytearray(size)))
    step(decoder)
    decoder.feed(body[10:])
    step(decoder)
    assert decoder.take_target() == size
    step(decoder)
    assert seen == [S.FRAMES, S.BODY, S.BODY_IN_TARGET, S.TARGET_FULL, S.FRAMES]
    # Whole in a caller's buffer, then given back.
    decoder.feed(encode_header(size) + body[:10])
    assert decoder.next_frame() is None
    seen[:] = [S.FRAMES, decoder.state]
    assert decoder.adopt_body(memoryview(bytearray(size)))
    step(decoder)
    decoder.feed(body[10:])
    step(decoder)
    while not decoder.give_back_body(SPILL_THRESHOLD):
        step(decoder)
    step(decoder)
    assert decoder.next_frame() == body
    step(decoder)
    assert seen == [
        *(S.FRAMES, S.BODY, S.BODY_IN_TARGET, S.TARGET_FULL),
        *(S.GIVING_BACK, S.BODY_WHOLE, S.FRAMES),
    ]
    assert decoder.at_boundary and decoder.buffered == 0


def test_the_table_of_moves_joins_every_state_and_leaves_broken_alone() -> None:
    ways = {state: {new for old, new, _ in MOVES if old is state} for state in DecoderState}
    assert ways[DecoderState.BROKEN] == set()
    reached = {DecoderState.FRAMES}
    for _ in DecoderState:
        reached |= {new for state in reached for new in ways[state]}
    assert reached == set(DecoderState)
    for state in set(DecoderState) - {DecoderState.BROKEN}:
        back = {state}
        for _ in DecoderState:
            back |= {new for s in back for new in ways[s]}
        assert DecoderState.FRAMES in back, f"{state} never gets back to FRAMES"
