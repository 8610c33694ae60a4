"""Child-process targets for ``test_guarantees.py``.

They live in an importable module so that any start method could run them; the tests
use ``fork`` for speed. Each target talks to the parent only through the connections
it is given and reports failure through its exit code.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import time
from multiprocessing.connection import Connection

__all__ = ("recv_until_eof", "slow_reader_then_writer")

#: Exit code of a worker whose messages were not the expected ones.
WRONG_MESSAGES = 3


def recv_until_eof(conn: Connection, expected: int) -> None:
    """Say ``("ready", pid)``, then ``recv()`` until EOFError; exit 0 if it got 0..expected-1."""
    conn.send(("ready", os.getpid()))
    got = []
    while True:
        try:
            got.append(conn.recv())
        except EOFError:
            break
    if got != list(range(expected)):
        sys.exit(WRONG_MESSAGES)


def send_until_broken(conn: Connection) -> None:
    """Say ``("ready", pid)``, then send until the pipe has no reader left: exit 0 on
    ``BrokenPipeError``. (A reader still open anywhere keeps it blocked: the test's
    timeout.)"""
    conn.send(("ready", os.getpid()))
    chunk = b"x" * 65536
    try:
        while True:
            conn.send_bytes(chunk)
    except BrokenPipeError:
        pass


def _read_exactly(fd: int, n: int) -> bytes:
    parts = []
    while n:
        data = os.read(fd, n)
        if not data:
            raise EOFError(f"end of file with {n} bytes still expected")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def slow_reader_then_writer(
    inbound: Connection, outbound: Connection, send_size: int, chunk: int, pause: float
) -> None:
    """Read one frame slowly, then send a big message back.

    1. Read one frame from *inbound* with raw ``os.read`` calls of at most *chunk* bytes,
       sleeping *pause* seconds after each (a slow consumer), and reply
       ``(payload_size, sha256_digest)`` on *outbound*.
    2. Send *send_size* random bytes as one message on *outbound*, then their sha256
       digest as a second message.
    """
    fd = inbound.fileno()
    (size,) = struct.unpack("!i", _read_exactly(fd, 4))
    digest = hashlib.sha256()
    remaining = size
    while remaining:
        data = os.read(fd, min(chunk, remaining))
        if not data:
            raise EOFError(f"end of file with {remaining} bytes of the message missing")
        digest.update(data)
        remaining -= len(data)
        time.sleep(pause)
    outbound.send((size, digest.digest()))

    payload = os.urandom(send_size)
    outbound.send_bytes(payload)
    outbound.send(hashlib.sha256(payload).digest())
