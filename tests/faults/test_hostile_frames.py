"""Fault case 9: hostile frames.

Setup: an ``AsyncConnection`` that receives, on either route, over a socketpair or a one-way
pipe; and an ``AsyncQueue`` on either route. The peer (or a producer) writes raw bytes: a
length header nobody honest would send, and a few bytes after it.

Fault: negative lengths (``-5``, ``-2**31``); the ``-1`` escape followed by a 64-bit length of
``2**63`` or ``2**40``; a ``2**31 - 1`` header followed by one byte. Where the header is one a
limit allows (the connection's ``max_message_size``, which a queue does not have), the peer
then closes, or goes quiet.

Expected, connections: a header that is negative or above ``max_message_size`` (default
4 GiB) raises ``asyncmp.ProtocolError`` (an ``anyio.BrokenResourceError``) before anything of
that size is allocated, and every later receive raises it again. A header that the limit
allows (``2**31 - 1`` under the default limit, ``2**63`` with ``max_message_size=None``) is
taken at its word: the receive holds only the bytes that arrived and ends in ``ConnectionEOF``
"mid-message" when the peer closes. Resident memory stays bounded by the bytes received, plus
at most one read buffer (1 MiB), whatever the header claims (a buffer for a large claim may be
reserved at once, but its pages cost memory only once written).

Expected, queues: a negative length raises ``anyio.BrokenResourceError`` ("corrupt queue
framing") at once; a queue has no size limit, so a huge header waits for its body like any
item in progress and raises ``anyio.BrokenResourceError`` ("mid-item") after
``stall_timeout`` without progress. Memory stays bounded by the bytes received; the reader
lock is free afterwards; the adapter stays broken.

Lost: the connection's incoming direction, or the queue's adapter (the stream can't be
resynchronised after a hostile header); nothing else.
"""

from __future__ import annotations

import struct
import sys
import time
from typing import Any

import anyio
import pytest

import asyncmp
from asyncmp import ConnectionEOF, ProtocolError
from tests.support.io import MiB, reader_lock_is_held, write_all
from tests.support.memory import RESIDENT_KNOWN, resident
from tests.support.queues import open_queue

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="raw bytes on POSIX descriptors"),
    pytest.mark.skipif(not RESIDENT_KNOWN, reason="no way to read the resident size here"),
]
#: Resident memory the process may gain meanwhile for reasons of its own.
NOISE = 8 * MiB

ROUTES = pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
DEFAULT = asyncmp.DEFAULT_MAX_MESSAGE_SIZE


def short(n: int) -> bytes:
    return struct.pack("!i", n)


def long(n: int) -> bytes:
    return struct.pack("!i", -1) + struct.pack("!Q", n)


# (header, limit, what the receive raises); each header is followed by one byte.
HOSTILE = [
    pytest.param(short(-5), DEFAULT, "protocol", id="negative"),
    pytest.param(short(-(2**31)), None, "protocol", id="most-negative-no-limit"),
    pytest.param(long(2**63), DEFAULT, "protocol", id="long-2**63"),
    pytest.param(long(2**40), DEFAULT, "protocol", id="long-2**40"),
    pytest.param(short(2**31 - 1), MiB, "protocol", id="2**31-1-over-1MiB"),
    pytest.param(short(2**31 - 1), DEFAULT, "eof", id="2**31-1-allowed"),
    pytest.param(long(2**63), None, "eof", id="long-2**63-no-limit"),
]


@pytest.mark.parametrize(
    ("transport", "use_threads"),
    [("socket", False), ("pipe", False), ("socket", True)],
    ids=["fd-socket", "fd-pipe", "threads-socket"],
)
@pytest.mark.parametrize(("header", "limit", "expected"), HOSTILE)
async def test_hostile_header_on_a_connection(
    use_threads: bool, transport: str, header: bytes, limit: int | None, expected: str
) -> None:
    a, peer = asyncmp.Pipe(transport == "socket", max_message_size=limit, use_threads=use_threads)
    received = len(header) + 1
    try:
        write_all(peer.fileno(), header + b"\x01")
        if expected == "eof":
            peer.close()
        info: pytest.ExceptionInfo[Exception]
        before = resident()
        with anyio.fail_after(10):
            if expected == "protocol":
                with pytest.raises(ProtocolError) as info:
                    await a.recv_bytes()
            else:
                with pytest.raises(ConnectionEOF, match="mid-message") as info:
                    await a.recv_bytes()
        grown = resident() - before  # what is held of the message is still held
        assert isinstance(
            info.value, anyio.BrokenResourceError if expected == "protocol" else EOFError
        )
        # One read buffer at most (the socket route asks recv() for up to 1 MiB), and some
        # room for what else the process does meanwhile.
        assert grown < received + MiB + NOISE, f"grew {grown} bytes for {received} received"
        if expected == "protocol":
            with pytest.raises(ProtocolError):  # the stream can't be trusted any more
                await a.recv_bytes()
    finally:
        await a.aclose()
        peer.close()


STALL = 0.15
QUEUE_HOSTILE = [
    pytest.param(short(-5), "corrupt", id="negative"),
    pytest.param(short(-(2**31)), "corrupt", id="most-negative"),
    pytest.param(long(2**63), "mid-item", id="long-2**63"),
    pytest.param(short(2**31 - 1), "mid-item", id="2**31-1"),
]


@ROUTES
@pytest.mark.parametrize(("header", "expected"), QUEUE_HOSTILE)
async def test_hostile_header_in_a_queue(use_threads: bool, header: bytes, expected: str) -> None:
    async with open_queue(use_threads=use_threads, stall_timeout=STALL) as aq:
        q: Any = aq.queue
        write_all(q._writer.fileno(), header + b"\x01")  # as a rogue producer would
        before = resident()
        start = time.monotonic()
        with anyio.fail_after(STALL + 5):
            with pytest.raises(anyio.BrokenResourceError, match=expected):
                await aq.get()
        elapsed = time.monotonic() - start
        grown = resident() - before
        assert grown < MiB + NOISE, f"grew {grown} bytes for a hostile header"
        if expected == "corrupt":
            assert elapsed < STALL, "a corrupt header was only noticed by the stall timeout"
        else:
            assert elapsed >= STALL * 0.9
        assert not reader_lock_is_held(q)
        with pytest.raises(anyio.BrokenResourceError):
            await aq.get()
