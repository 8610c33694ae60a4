"""Fault case 1: a receive is cancelled while it waits, right after readiness, or mid-frame.

Setup: an ``AsyncConnection`` on either route (descriptor readiness, or threads), over a
socketpair (duplex ``Pipe``) or an ``os.pipe`` (one-way ``Pipe``). The peer writes a stream of
whole frames (sizes around the 16 KiB and 64 KiB boundaries and above a pipe's capacity) in
pieces, with raw ``os.write`` calls.

Fault: Hypothesis picks the cut points in the byte stream and what each cut does to the
receive in progress:

* ``waiting``: the receive has taken every byte written so far out of the kernel buffer (at a
  frame boundary, in a header or in a body) and waits for more; it is cancelled there.
* ``after-readiness`` (descriptor route): the next bytes arrive, the receive's readiness wait
  returns, and the cancellation lands at that wake-up, before anything is read.

Expected: each cancelled receive raises the cancellation and returns nothing; after the last
cut the rest of the stream arrives, and the receives that follow return every message, whole
and in order; ``after-readiness`` leaves the new bytes unread in the kernel buffer.

Lost: nothing. Bytes of a partial message stay buffered in the connection (descriptor route),
or in the receive that goes on in its thread and hands its message to the next receive
(thread route).

Tested by ``tests/test_conformance.py::test_receive_cancelled_mid_frame_resumes_whole``, which
runs this case (``check_receive_cancelled_mid_frame`` in ``tests/support/conformance.py``) for
every channel whose peer can write raw bytes: these ``Pipe`` routes and transports, and also
``connect()``/``serve()`` and the queues.
"""

from __future__ import annotations

import sys

import anyio
import pytest

import asyncmp
from tests.support.io import settle

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptors"),
]


@pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
@pytest.mark.parametrize(
    ("cancelled", "then", "expected"),
    [(None, 10, "ProtocolError"), (10, None, "1000 bytes"), (2000, 10, "ProtocolError")],
)
async def test_each_receive_applies_its_own_maxlength(
    use_threads: bool, cancelled: int | None, then: int | None, expected: str
) -> None:
    """A receive with one *maxlength* is cancelled while it waits; the message comes, and
    the next receive, with another *maxlength*, judges it by its own (on the thread route
    the cancelled receive goes on in its thread and hands its message on)."""
    a, peer = asyncmp.Pipe(use_threads=use_threads)
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.recv_bytes, cancelled)
                await settle()
                tg.cancel_scope.cancel()
            peer.send_bytes(b"m" * 1000)
            try:
                outcome = f"{len(await a.recv_bytes(then))} bytes"
            except asyncmp.ProtocolError:
                outcome = "ProtocolError"
        assert outcome == expected
    finally:
        await a.aclose()
        peer.close()
