"""The frame engine (``asyncmp._core.frames``) over real pipes, without an adapter.

The exact reader is the queue's: it must never read past the frame in progress, because
the next frame in a shared pipe belongs to whoever takes the reader lock next. Each test
checks what is left in the pipe afterwards. Frames arrive whole, split at every byte,
and with the header in the long form.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import threading
from collections.abc import Iterator

import anyio
import pytest

from asyncmp import ConnectionEOF, ProtocolError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptors")

if sys.platform != "win32":
    from asyncmp._core import frames as _frames
    from asyncmp._core import transport as _transport
    from asyncmp._core.frames import (
        ExactReader,
        FrameWriter,
        GreedyReader,
        OwnEndReader,
        frame_parts,
        stdlib_recv_error,
    )
    from asyncmp._core.readiness import poller
    from asyncmp._core.transport import open_transport, own_read_end
    from asyncmp._core.wire import CLEAN_END, DecoderState, StreamEnd


def frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def long_frame(payload: bytes) -> bytes:
    """The long form (the -1 escape and a 64-bit length), which the stdlib only writes
    above 2 GiB, but which a reader must take for any length."""
    return struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload


class Pipe:
    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.open = [self.r, self.w]

    def close_writer(self) -> None:
        self.open.remove(self.w)
        os.close(self.w)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    try:
        yield p
    finally:
        for fd in p.open:
            os.close(fd)


def exact_reader(fd: int) -> ExactReader:
    return ExactReader(open_transport(fd))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def leftover(r: int) -> bytes:
    """What is still in the pipe (without blocking)."""
    n = open_transport(r).available()
    return os.read(r, n) if n else b""


# --- the exact reader -----------------------------------------------------------------------------


def test_read_whole_takes_one_frame_in_two_reads_and_no_more(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, frame(b"first") + frame(b"second"))
    reader = exact_reader(r)
    assert reader.read_whole(reader.available()) == b"first"
    assert reader.at_boundary
    assert leftover(r) == frame(b"second")


def test_read_whole_reads_nothing_below_a_header(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, b"\x00\x00")
    reader = exact_reader(r)
    assert reader.read_whole(reader.available()) is None
    assert reader.at_boundary
    assert leftover(r) == b"\x00\x00"


def test_read_whole_leaves_a_partial_frame_in_the_decoder(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    data = frame(b"x" * 100)
    os.write(w, data[:50])
    reader = exact_reader(r)
    assert reader.read_whole(reader.available()) is None
    assert not reader.at_boundary  # the header was read: the frame is ours to finish
    os.write(w, data[50:] + frame(b"next"))
    assert reader.read_available() == b"x" * 100
    assert leftover(r) == frame(b"next")


def test_a_large_item_is_read_into_its_buffer_and_no_further(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # From 32 MiB on, the body's bytes go straight into the buffer that becomes the
    # payload (no copy through bytes objects), never past the frame: the next frame
    # stays in the pipe for whoever takes the reader lock next.
    r, w = pipe.r, pipe.w
    size = (32 << 20) + 12345
    payload = bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)
    reader = exact_reader(r)
    cls = type(reader._transport)
    some, into = cls.read_some, cls.read_into
    read_some_bytes: list[int] = []
    read_into_bytes: list[int] = []

    def record_some(self: object, max_bytes: int) -> bytes | None:
        data = some(self, max_bytes)  # type: ignore[arg-type]
        read_some_bytes.append(len(data or b""))
        return data

    def record_into(self: object, buf: memoryview) -> int | None:
        got = into(self, buf)  # type: ignore[arg-type]
        read_into_bytes.append(got or 0)
        return got

    monkeypatch.setattr(cls, "read_some", record_some)
    monkeypatch.setattr(cls, "read_into", record_into)

    def write() -> None:
        try:
            write_all(w, frame(payload) + frame(b"next"))
        except BrokenPipeError:
            pass  # the test failed and closed the read end

    got = None
    writer = threading.Thread(target=write)
    writer.start()
    try:
        poll = poller(r, writable=False)
        while got is None:
            got = reader.read_available()
            if got is None:
                poll.poll(5000)
    finally:
        if writer.is_alive() and got is None:
            pipe.open.remove(r)
            os.close(r)  # the writer, blocked on a full pipe, gets EPIPE
        writer.join()
    assert got == payload
    assert sum(read_into_bytes) > size - (1 << 20)  # the body, past its first bytes
    assert sum(read_some_bytes) < (1 << 20)
    assert reader.at_boundary
    assert leftover(r) == frame(b"next")


@pytest.mark.parametrize("form", ["short", "long"])
def test_read_available_one_byte_at_a_time_never_reads_ahead(pipe: Pipe, form: str) -> None:
    r, w = pipe.r, pipe.w
    payloads = [b"", b"a", b"hello" * 30]
    encode = frame if form == "short" else long_frame
    stream = b"".join(encode(p) for p in payloads)
    reader = exact_reader(r)
    got: list[bytes] = []
    for i in range(len(stream)):
        os.write(w, stream[i : i + 1])
        result = reader.read_available()
        if result is not None:
            got.append(bytes(result))
            # Exactly at the end of a frame: nothing of the next one was read.
            assert reader.at_boundary
            assert stream[: i + 1] == b"".join(encode(p) for p in got)
        assert leftover(r) == b"", "the reader left a byte that was there"
    assert got == payloads


def test_read_available_never_reads_past_one_frame(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, long_frame(b"one") + frame(b"two"))
    reader = exact_reader(r)
    assert reader.read_available() == b"one"
    assert leftover(r) == frame(b"two")


def test_read_available_keeps_to_its_budget(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    data = frame(b"y" * 40_000)
    os.write(w, data[:20_000])
    reader = exact_reader(r)
    assert reader.read_available(budget=0) is None
    assert reader.decoder.buffered == 4, "a spent budget reads no more than the header"
    assert reader.read_available() is None
    assert reader.decoder.buffered == 20_000
    os.write(w, data[20_000:] + frame(b"next"))
    assert reader.read_available() == b"y" * 40_000
    assert leftover(r) == frame(b"next")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack("!i", -5), "corrupt queue framing: frame length -5 is negative"),
        (frame(b"abc")[:5], "the queue's pipe was closed mid-item"),
    ],
    ids=["negative-header", "eof-mid-item"],
)
def test_read_available_refuses_bad_framing(pipe: Pipe, data: bytes, message: str) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, data)
    reader = exact_reader(r)
    pipe.close_writer()
    with pytest.raises(anyio.BrokenResourceError, match=message):
        while reader.read_available() is None:
            pass


def test_read_blocking_waits_for_the_rest(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    data = frame(b"z" * 1000) + frame(b"after")
    os.write(w, data[:10])
    reader = exact_reader(r)
    writer = threading.Timer(0.05, os.write, (w, data[10:]))  # the rest, a moment later
    writer.start()
    try:
        assert reader.read_blocking(poller(r, writable=False), stall_timeout=30) == b"z" * 1000
    finally:
        writer.join()
    assert leftover(r) == frame(b"after")


def test_read_blocking_gives_up_after_the_stall_timeout(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, frame(b"q" * 100)[:20])
    reader = exact_reader(r)
    with pytest.raises(anyio.BrokenResourceError, match=r"no progress for 0\.05 s with 20 bytes"):
        reader.read_blocking(poller(r, writable=False), stall_timeout=0.05)


# --- the greedy reader and the writer ------------------------------------------------------------


def test_greedy_reader_takes_many_frames_from_one_read(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, frame(b"a") + frame(b"b") + frame(b"c")[:3])
    transport = open_transport(r)
    reader = GreedyReader(transport, None)
    assert reader.take_frame() == b"a"
    assert leftover(r) == b"", "a connection's reader reads everything there"
    assert reader.recv_frame_nowait(None) == b"b"
    with pytest.raises(anyio.WouldBlock):
        reader.recv_frame_nowait(None)
    os.write(w, frame(b"c")[3:])
    assert reader.take_frame() == b"c"


def test_greedy_reader_eof_and_bad_frames(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, frame(b"x" * 10) + frame(b"y" * 3)[:5])
    reader = GreedyReader(open_transport(r), None)
    with pytest.raises(ProtocolError, match="message of 10 bytes exceeds maxlength=5"):
        reader.recv_frame_nowait(5)
    assert reader.recv_frame_nowait(None) == b"x" * 10
    pipe.close_writer()
    with pytest.raises(ConnectionEOF, match=r"mid-message \(5 bytes of it held\)"):
        reader.recv_frame_nowait(None)


# --- the end of the stream, classified by the decoder -------------------------------------------

PEER_CLOSED = "the peer closed the connection"

#: Where a stream ends: at a frame boundary, in a header, in a small body, and in a large
#: body (more than SPILL_THRESHOLD missing), which the readers read into its buffer. All
#: fit in a pipe (64 KiB), so the writer needs no thread.
EOF_CUTS = {
    "boundary": (frame(b"a"), 0),
    "header": (frame(b"a") + frame(b"b")[:2], 2),
    "small-body": (frame(b"a") + frame(b"bcd")[:6], 6),
    "large-body": (frame(b"a") + frame(b"x" * (1 << 20))[:60_000], 60_000),
}


@pytest.mark.parametrize("cut", EOF_CUTS)
def test_greedy_reader_ends_cleanly_only_at_a_frame_boundary(pipe: Pipe, cut: str) -> None:
    data, held = EOF_CUTS[cut]
    os.write(pipe.w, data)
    pipe.close_writer()
    reader = GreedyReader(open_transport(pipe.r), None)
    assert reader.recv_frame_nowait(None) == b"a"
    expected = PEER_CLOSED
    if held:
        expected += f" mid-message ({held} bytes of it held)"
    for _ in range(2):  # and the same again
        with pytest.raises(ConnectionEOF) as info:
            reader.recv_frame_nowait(None)
        assert str(info.value) == expected
    assert reader.decoder.feed_eof() == (
        CLEAN_END if not held else StreamEnd(truncated=True, held=held)
    )


@pytest.mark.anyio
async def test_greedy_reader_ends_mid_body_in_the_callers_buffer_and_gives_it_back(
    pipe: Pipe,
) -> None:
    data, held = EOF_CUTS["large-body"]
    write_all(pipe.w, data[5:])
    pipe.close_writer()
    reader = GreedyReader(open_transport(pipe.r), None)
    target = bytearray(2 << 20)
    with pytest.raises(ConnectionEOF, match=rf"mid-message \({held} bytes of it held\)"):
        await reader.recv_frame_into(memoryview(target))
    # The body went back into the decoder's own buffer: the caller's is the caller's.
    assert reader.decoder.state is DecoderState.BODY
    assert reader.decoder.feed_eof() == StreamEnd(truncated=True, held=held)


@pytest.mark.parametrize("cut", EOF_CUTS)
@pytest.mark.parametrize("how", ["read_available", "read_blocking"])
def test_exact_reader_breaks_at_the_end_of_its_pipe(pipe: Pipe, cut: str, how: str) -> None:
    data, held = EOF_CUTS[cut]
    os.write(pipe.w, data)
    pipe.close_writer()
    reader = exact_reader(pipe.r)
    assert reader.read_available() == b"a"
    end = CLEAN_END if not held else StreamEnd(truncated=True, held=held)
    with pytest.raises(anyio.BrokenResourceError, match="the queue's pipe was closed mid-item"):
        if how == "read_blocking":
            reader.read_blocking(poller(pipe.r, writable=False), stall_timeout=30)
        else:
            while reader.read_available() is None:
                pass
    assert reader.decoder.feed_eof() == end


@pytest.mark.parametrize(
    ("error", "expected", "message"),
    [
        (EOFError(), ConnectionEOF, PEER_CLOSED),
        (ConnectionResetError(errno.ECONNRESET, "reset"), ConnectionEOF, PEER_CLOSED),
        (ConnectionAbortedError(errno.ECONNABORTED, "aborted"), ConnectionEOF, PEER_CLOSED),
        (OSError("got end of file during message"), ConnectionEOF, f"{PEER_CLOSED} mid-message"),
        (OSError("bad message length"), ProtocolError, "message exceeds the limit of 7 bytes"),
    ],
    ids=["eof", "reset", "aborted", "mid-message", "too-long"],
)
def test_what_the_stdlib_decoder_raised_is_classified_as_ours(
    error: OSError | EOFError, expected: type[Exception], message: str
) -> None:
    """The thread route on Windows, where the stdlib's recv_bytes() decodes the stream."""
    got = stdlib_recv_error(error, 7)
    assert type(got) is expected
    assert str(got) == message


def test_other_stdlib_errors_go_up_as_they_are() -> None:
    assert stdlib_recv_error(OSError(errno.EIO, "input/output error"), 7) is None


def test_frame_parts_coalesce_small_payloads_only() -> None:
    small = memoryview(b"s" * 100)
    big = memoryview(b"b" * 100_000)
    parts, total = frame_parts(small)
    assert [bytes(p) for p in parts] == [frame(b"s" * 100)] and total == 104
    parts, total = frame_parts(big)
    assert len(parts) == 2 and total == 100_004
    assert b"".join(bytes(p) for p in parts) == frame(b"b" * 100_000)


def test_writer_sends_a_frame_from_a_thread_in_slices(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    payload = b"p" * 200_000  # more than the pipe holds: the writer waits for room
    writer = FrameWriter(open_transport(w), on_torn=lambda: None)
    done = [0]
    received = bytearray()

    def drain() -> None:
        while len(received) < len(payload) + 4:
            received.extend(os.read(r, 65536))

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        writer.send_blocking(memoryview(payload), poller(w, writable=True), 50, bool, done)
    finally:
        reader.join(30)
    assert done == [len(payload) + 4]
    assert bytes(received) == frame(payload)


# --- the exact reader's fast path: the pipe's own read end, or FIONREAD --------------------------

#: The fast paths: FIONREAD (every POSIX), the pipe's own read end (Linux), and an own
#: read end that can't be opened (no /proc, faked), where the reader falls back to FIONREAD.
FAST_PATHS = ["fionread", "own-end", "own-end-refused"]


@pytest.fixture(params=FAST_PATHS)
def fast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    kind: str = request.param
    if kind != "fionread" and sys.platform != "linux":
        pytest.skip("the own read end is Linux only")
    if kind == "own-end-refused":

        def refuse(*args: object, **kwargs: object) -> int:
            raise PermissionError(errno.EACCES, "no /proc here")

        monkeypatch.setattr(os, "open", refuse)
    return kind


def fast_reader(fd: int, kind: str) -> ExactReader:
    transport = open_transport(fd)
    if kind == "fionread":
        return ExactReader(transport)
    reader = _frames.exact_reader(transport)
    assert isinstance(reader, OwnEndReader)
    return reader


def test_take_whole_takes_one_frame_and_no_more(pipe: Pipe, fast_path: str) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, frame(b"first") + frame(b"") + frame(b"third"))
    reader = fast_reader(r, fast_path)
    assert reader.take_whole() == b"first"
    assert reader.at_boundary
    assert reader.take_whole() == b""
    assert leftover(r) == frame(b"third")


def test_take_whole_on_an_empty_pipe_reads_nothing(pipe: Pipe, fast_path: str) -> None:
    r, w = pipe.r, pipe.w
    reader = fast_reader(r, fast_path)
    assert reader.take_whole() is None
    assert reader.at_boundary
    os.write(w, frame(b"late"))
    assert reader.take_whole() == b"late"
    pipe.close_writer()
    assert reader.take_whole() is None, "the end of the pipe at a boundary: nothing read"
    assert reader.at_boundary


@pytest.mark.parametrize(
    "cut", [2, 4, 50], ids=["in-the-header", "after-the-header", "in-the-body"]
)
def test_take_whole_leaves_a_partial_frame_to_finish(pipe: Pipe, fast_path: str, cut: int) -> None:
    """A frame not all there: nothing read, or what was read is in the decoder, for the
    lock holder to finish; never a byte of the next frame, whichever the path."""
    r, w = pipe.r, pipe.w
    data = frame(b"x" * 100)
    os.write(w, data[:cut])
    reader = fast_reader(r, fast_path)
    assert reader.take_whole() is None
    held = reader.decoder.buffered  # what was read of it: the frame is ours to finish
    assert reader.at_boundary == (held == 0)
    assert held <= cut
    os.write(w, data[cut:] + frame(b"next"))
    assert reader.read_available() == b"x" * 100
    assert reader.at_boundary
    assert leftover(r) == frame(b"next")


@pytest.mark.skipif(sys.platform != "linux", reason="F_SETPIPE_SZ")
def test_take_whole_of_a_body_above_the_blind_limit(pipe: Pipe, fast_path: str) -> None:
    """A body longer than the fast path reads blind: taken whole if it is all there, and
    a claimed length costs no memory before its bytes are there."""
    r, w = pipe.r, pipe.w
    import fcntl

    fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: room for the whole frame
    big = b"z" * (_frames.BLIND_BODY_LIMIT + 1)
    os.write(w, frame(big) + frame(b"next"))
    reader = fast_reader(r, fast_path)
    assert reader.take_whole() == big
    assert leftover(r) == frame(b"next")
    os.write(w, struct.pack("!i", 2**31 - 1) + b"abc")
    assert reader.take_whole() is None
    assert reader.decoder.buffered in (0, 4), "no more than the header read"


# --- the pipe's own read end (Linux) ------------------------------------------------------------

LINUX = pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/fd reopens a pipe on Linux")


def _nonblocking(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def _open_on(fd: int, ino: int) -> bool:
    """Whether descriptor number *fd* is open here on the pipe with inode *ino*."""
    try:
        return os.fstat(fd).st_ino == ino
    except OSError:
        return False


@LINUX
def test_own_read_end_is_nonblocking_and_leaves_the_handed_descriptor_alone(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    own = own_read_end(r)
    assert own is not None
    assert own.fd == _transport.UNOPENED, "opened by the first read, not before"
    try:
        assert own.open() == own.fd
        assert own.fd not in (r, w, -1)
        assert _nonblocking(own.fd)
        assert not _nonblocking(r), "the description other processes share changed"
        with pytest.raises(BlockingIOError):
            os.read(own.fd, 1)  # empty: EAGAIN, where a read of r would wait
        os.write(w, b"abc")
        assert os.read(own.fd, 10) == b"abc", "the same pipe"
        assert own_read_end(w) is None, "a write end has none"
    finally:
        own.close()
    assert own.fd == -1


@LINUX
def test_own_read_end_is_closed_with_its_transport_and_when_dropped(pipe: Pipe) -> None:
    ino = os.fstat(pipe.r).st_ino
    transport = open_transport(pipe.r)
    assert transport.own_end is not None
    os.write(pipe.w, b"x")
    assert transport.read_some(10) == b"x"
    fd = transport.own_end.fd
    assert fd >= 0, "opened by the read"
    assert _open_on(fd, ino)
    transport.close()
    assert not _open_on(fd, ino)
    assert _open_on(pipe.r, ino), "the handed descriptor is its owner's"

    own = own_read_end(pipe.r)
    assert own is not None
    fd = own.open()
    del own  # no other reference: collected now
    assert not _open_on(fd, ino)


@LINUX
def test_a_socket_or_a_refused_reopen_has_no_own_end(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    a, b = socket.socketpair()
    with a, b:
        assert own_read_end(a.fileno()) is None

    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "no /proc here")

    monkeypatch.setattr(os, "open", refuse)
    transport = open_transport(pipe.r)
    reader = _frames.exact_reader(transport)
    os.write(pipe.w, frame(b"still") + frame(b"and again"))
    assert reader.take_whole() == b"still", "the exact reader's fast path, with FIONREAD"
    assert transport.own_end is not None
    assert transport.own_end.fd == -1, "tried once"
    assert transport.read_some(100) == frame(b"and again"), "FIONREAD's reads"


@LINUX
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_holds_no_own_end_and_reads_all_the_same(pipe: Pipe) -> None:
    """The own end is one more reader of the pipe: a child that kept it would keep a
    writer from seeing EPIPE after every reader it knows of is gone. The fork hook closes
    it in the child, where the reader's fast path goes on without it."""
    r, w = pipe.r, pipe.w
    ino = os.fstat(r).st_ino
    reader = _frames.exact_reader(open_transport(r))
    assert isinstance(reader, OwnEndReader)
    own = reader._transport.own_end
    assert own is not None
    os.write(w, frame(b"first") + frame(b"in the child") + frame(b"in the parent"))
    assert reader.take_whole() == b"first"
    own_fd = own.fd
    assert own_fd >= 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            if own.fd != -1 or _open_on(own_fd, ino):
                code = 3
            elif reader.take_whole() != b"in the child":
                code = 4
        except BaseException:
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _open_on(own_fd, ino), "the parent keeps its own"
    assert reader.take_whole() == b"in the parent"
