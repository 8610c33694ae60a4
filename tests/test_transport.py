"""The byte transports (``asyncmp._core.transport``).

A closed transport forgets its descriptor's number (trio's ``_FdHolder``): once the number
is given to another file, a late read or write on the transport fails with ``EBADF`` and
never touches that file.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Callable, Iterator

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptors")

if sys.platform != "win32":
    from asyncmp._core.transport import FdTransport, open_transport


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


def _socket_transport(fds: list[int]) -> tuple[FdTransport, int]:
    a, b = socket.socketpair()
    fds.extend((a.detach(), b.detach()))
    return open_transport(fds[-2]), fds[-2]


@pytest.mark.parametrize("make", [_pipe_transport, _socket_transport], ids=["pipe", "socket"])
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
