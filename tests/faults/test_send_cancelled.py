"""Fault case 2: a send is cancelled mid-frame while the reader is paused.

Setup: an ``AsyncConnection`` that sends, on either route, over a socketpair or a one-way
pipe. The peer is a raw reader thread: it reads the first ``first`` bytes of the stream, then
pauses, so the send fills the kernel buffer and waits for room with part of its frame out.
The peer's bytes are decoded afterwards with asyncmp's codec, so every complete frame it
would have delivered is seen, and so is a frame torn at the end.

Fault: the send is cancelled while it waits for room. The reader resumes either at once
(``within``: well inside the send shield) or only once the shield has run out (``late``: the
shield is shortened to 50 ms and the reader waits until the send has given up).

Expected:

* ``within``: the send finishes its frame under the shield, then raises the cancellation; the
  connection is fine, and a later send arrives after the whole message.
* ``late``: the connection is broken: later sends raise ``anyio.BrokenResourceError``. The
  peer sees the end of the stream (at once on a socket, through ``shutdown(SHUT_WR)``; on a
  pipe, once this end is closed) in the middle of the torn frame: the stdlib's ``recv()``
  raises ``EOFError`` or ``OSError("got end of file during message")``. Both routes alike: the
  thread route writes in slices, and its thread stops at the next one.

Never: a complete frame that is not a message that was sent (a garbage message).

Lost: ``late``: the message whose send was cancelled, and the connection's sending
direction. ``within``: nothing; the cancelled send was
delivered.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading

import anyio
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import asyncmp
import asyncmp._core.frames
from asyncmp import AsyncConnection
from asyncmp._core.wire import FrameDecoder
from tests.support.io import KiB, MiB, buffered, patched, settle, wait_for_event, wait_until

from .fault_workers import message

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptors"),
]

AFTER = b"sent after the cancelled one"


class PausedReader(threading.Thread):
    """Reads *first* bytes, sets :attr:`paused`, waits for :attr:`resume`, reads to EOF."""

    def __init__(self, fd: int, first: int) -> None:
        super().__init__(name="test-paused-reader", daemon=True)
        self.fd = fd
        self.first = first
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.data = bytearray()
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            while len(self.data) < self.first:
                chunk = os.read(self.fd, self.first - len(self.data))
                if not chunk:
                    break
                self.data += chunk
            self.paused.set()
            if not self.resume.wait(30):
                return
            while chunk := os.read(self.fd, 1 << 20):
                self.data += chunk
        except OSError as exc:  # a reset counts as the end too
            self.error = exc
        finally:
            self.paused.set()

    def frames(self) -> tuple[list[bytes], bool]:
        """The complete frames the peer got, and whether a torn one followed them."""
        decoder = FrameDecoder(None)
        decoder.feed(bytes(self.data))
        frames = []
        while (payload := decoder.next_frame()) is not None:
            frames.append(payload)
        return frames, not decoder.at_boundary


async def run_scenario(
    use_threads: bool, transport: str, size: int, first: int, resume: str
) -> None:
    big = message(size, size)
    shield = 5.0 if resume == "within" else 0.05
    if transport == "socket":
        a, peer = asyncmp.Pipe(use_threads=use_threads)
    else:
        reader_end, writer_end = multiprocessing.Pipe(duplex=False)
        a, peer = AsyncConnection(writer_end, use_threads=use_threads), reader_end
    reader = PausedReader(peer.fileno(), first)
    reader.start()
    broken = False
    try:
        with patched(asyncmp._core.frames, "SEND_SHIELD_SECONDS", shield), anyio.fail_after(20):
            scope = anyio.CancelScope()

            async def send() -> None:
                with scope:
                    await a.send_bytes(big)

            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                await wait_for_event(reader.paused, "the reader paused")
                # The send fills the buffer and waits for room (or it is done already).
                await wait_until(
                    lambda: buffered(peer.fileno()) > 0 or len(reader.data) >= len(big),
                    "the send started",
                )
                await settle()
                in_flight = len(reader.data) + buffered(peer.fileno())
                scope.cancel()
                if resume == "within":
                    reader.resume.set()
            reader.resume.set()
            try:
                await a.send_bytes(AFTER)
            except anyio.BrokenResourceError:
                broken = True
            if transport == "socket" and broken:
                # The write side was shut down: the peer sees the end while this end is open.
                await wait_until(lambda: not reader.is_alive(), "the peer saw the end")
    finally:
        await a.aclose()
        reader.resume.set()
        reader.join(10)
        peer.close()
    assert not reader.is_alive()
    frames, torn = reader.frames()
    assert all(f in (big, AFTER) for f in frames), "the peer got a garbage message"
    mid_frame = 0 < in_flight < len(big) + 4
    if resume == "late" and mid_frame:
        # Nobody read during the shield: the frame could not be finished.
        assert broken, "a torn frame was left on a connection that still takes sends"
    if not broken:
        assert frames == [big, AFTER]
        assert not torn
        return
    assert resume == "late", "the send broke the connection though the reader came back in time"
    assert mid_frame, "broken though no frame was torn"
    assert frames == []
    assert torn, "the peer saw a clean end where the frame was torn"


@pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    transport=st.sampled_from(["socket", "pipe"]),
    size=st.integers(1 * MiB, 6 * MiB),
    first=st.integers(0, 256 * KiB),
    resume=st.sampled_from(["within", "late"]),
)
@example(transport="pipe", size=4 * MiB, first=0, resume="late")
@example(transport="socket", size=4 * MiB, first=3, resume="late")
@example(transport="socket", size=2 * MiB, first=100 * KiB, resume="within")
async def test_send_cancelled_mid_frame_completes_or_breaks_never_garbles(
    use_threads: bool, transport: str, size: int, first: int, resume: str
) -> None:
    await run_scenario(use_threads, transport, size, first, resume)
