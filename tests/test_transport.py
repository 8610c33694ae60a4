"""The byte transports (``asyncmp._core.transport``) and the one frame writer above them.

A closed transport forgets its descriptor's number (trio's ``_FdHolder``): once the number
is given to another file, a late read or write on the transport fails with ``EBADF`` and
never touches that file. The queue's put and a connection's thread route write frames
through the same :meth:`FrameWriter.write_blocking`, and only the transport writes into a
descriptor.
"""

from __future__ import annotations

import ast
import errno
import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptors")

if sys.platform != "win32":
    from asyncmp._core.frames import FrameWriter
    from asyncmp._core.readiness import poller
    from asyncmp._core.transport import FdTransport, open_transport, pipe_write_end

SRC = Path(__file__).resolve().parents[1] / "src" / "asyncmp"


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Descriptors a test opened; closed after it, whatever is left of them."""
    opened: list[int] = []
    try:
        yield opened
    finally:
        for fd in opened:
            try:
                os.close(fd)
            except OSError:
                pass


def _reuse(number: int, fds: list[int]) -> int:
    """Give *number* to another file, as the process does with the next file it opens once
    the owner closed it: the write end of a new pipe (``dup2`` closes what *number* was).
    Returns that pipe's read end."""
    r, w = os.pipe()
    fds.extend((r, number))
    os.dup2(w, number, inheritable=False)
    os.close(w)
    return r


def _pipe_transport(fds: list[int]) -> tuple[FdTransport, int]:
    r, w = os.pipe()
    fds.extend((r, w))
    return open_transport(w), w


def _pipe_write_end(fds: list[int]) -> tuple[FdTransport, int]:
    r, w = os.pipe()
    fds.extend((r, w))
    transport = pipe_write_end(w)
    assert transport.own_end is None
    assert transport.write_some(memoryview(b"ok")) == 2 and os.read(r, 10) == b"ok"
    return transport, w


def _socket_transport(fds: list[int]) -> tuple[FdTransport, int]:
    a, b = socket.socketpair()
    fds.extend((a.detach(), b.detach()))
    return open_transport(fds[-2]), fds[-2]


@pytest.mark.parametrize(
    "make",
    [_pipe_transport, _pipe_write_end, _socket_transport],
    ids=["pipe", "pipe-write-end", "socket"],
)
def test_a_closed_transport_forgets_its_number(
    make: Callable[[list[int]], tuple[FdTransport, int]], fds: list[int]
) -> None:
    transport, number = make(fds)
    transport.close()
    assert transport.fd == -1
    fds.remove(number)
    other = _reuse(number, fds)  # the number is another file's now
    with pytest.raises(OSError) as written:
        transport.write_some(memoryview(b"late"))
    assert written.value.errno == errno.EBADF
    for late_read in (
        lambda: transport.read_some(4),
        lambda: transport.read_into(memoryview(bytearray(4))),
        transport.available,
    ):
        with pytest.raises(OSError) as read:
            late_read()
        assert read.value.errno == errno.EBADF
    os.write(number, b"!")
    assert os.read(other, 100) == b"!", "nothing of the transport's went to the other file"
    transport.close()  # idempotent


def _writer(w: int) -> FrameWriter:
    return FrameWriter(open_transport(w), on_torn=lambda: None, peer_gone="gone")


def test_write_blocking_once_begun_finishes_the_frame_whatever_stopping_says(
    fds: list[int],
) -> None:
    """A queue's put: a frame larger than the pipe, asked to stop at once; once its first
    byte is in, it is finished, whole, as the reader makes room."""
    r, w = os.pipe()
    fds.extend((r, w))
    frame = b"f" * (1 << 20)
    begun: list[int] = []
    asked = [0]

    def stopping() -> bool:
        asked[0] += 1
        return bool(begun)  # stop, as soon as it has begun

    received = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 65536):  # until the write end is closed
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    done = [0]
    try:
        _writer(w).write_blocking(
            [memoryview(frame)],
            poller(w, writable=True),
            50,
            stopping,
            done,
            once_begun=lambda: begun.append(done[0]),
        )
    finally:
        fds.remove(w)
        os.close(w)
        reader.join(30)
    assert begun == [0], "called once, at the first byte"
    assert asked[0] == 1, "asked only before the first byte"
    assert done == [len(frame)] and bytes(received) == frame


def test_write_blocking_without_once_begun_stops_mid_frame(fds: list[int]) -> None:
    """A connection's send: asked before each write, even mid-frame."""
    r, w = os.pipe()
    fds.extend((r, w))
    done = [0]
    with pytest.raises(anyio.ClosedResourceError):
        _writer(w).write_blocking(
            [memoryview(b"x" * (1 << 20))], poller(w, writable=True), 1, lambda: done[0] > 0, done
        )
    assert 0 < done[0] < 1 << 20


def test_write_blocking_once_begun_gives_up_on_a_pipe_nobody_reads(fds: list[int]) -> None:
    r, w = os.pipe()
    fds.extend((r, w))
    with pytest.raises(anyio.BrokenResourceError, match="a put stopped mid-item"):
        _writer(w).write_blocking(
            [memoryview(b"x" * (1 << 20))],
            poller(w, writable=True),
            10,
            lambda: False,
            [0],
            once_begun=lambda: None,
            stall_timeout=0.05,
        )


def test_write_blocking_says_who_is_gone(fds: list[int]) -> None:
    r, w = os.pipe()
    fds.append(w)
    os.close(r)
    with pytest.raises(anyio.BrokenResourceError, match=r"^gone$"):
        _writer(w).write_blocking(
            [memoryview(b"x")], poller(w, writable=True), 10, lambda: False, [0]
        )


def _writes_to_descriptors(path: Path) -> list[int]:
    """Lines of *path* that call ``os.write`` or ``os.writev``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("write", "writev")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "os"
        ):
            lines.append(node.lineno)
    return lines


def test_only_the_transport_writes_into_descriptors() -> None:
    """One frame writer: every write into a pipe goes through ``_core.transport``, which
    writes at most ``PIPE_BUF`` bytes at a time, after ``poll`` said there is room."""
    writers = {
        str(path.relative_to(SRC)): lines
        for path in sorted(SRC.rglob("*.py"))
        if (lines := _writes_to_descriptors(path))
    }
    assert list(writers) == ["_core/transport.py"], writers


def _write_to_a_pipe_nobody_reads(make: str) -> None:  # in a forked child
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a program that resets it has it
    r, w = os.pipe()
    os.close(r)
    transport = pipe_write_end(w) if make == "pipe_write_end" else open_transport(w)
    try:
        transport.write_some(memoryview(b"x"))
    except BrokenPipeError:
        os._exit(0)
    os._exit(1)


@pytest.mark.parametrize("make", ["pipe_write_end", "open_transport"])
def test_a_pipe_nobody_reads_raises_before_writing(make: str) -> None:
    # Every read end closed: the write end polls POLLERR, and the transport raises what
    # the write would raise without writing, so a process whose SIGPIPE is at its
    # default does not die of it (the queue's put looked before writing, as before).
    process = multiprocessing.get_context("fork").Process(
        target=_write_to_a_pipe_nobody_reads, args=(make,)
    )
    process.start()
    process.join(30)
    assert process.exitcode == 0
