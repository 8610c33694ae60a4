"""Fault case 5: a peer is killed after sending complete messages.

Setup: an ``asyncmp.Pipe`` whose async end receives, over a socketpair (duplex) or an
``os.pipe`` (one-way), on either route; the other end goes to a child process (every start
method on the descriptor route, fork on the thread route). The child sends six messages with
``send_bytes`` (sizes around the stdlib's 16 KiB split, small enough together to sit whole in
the kernel buffer), says so through an Event, and waits. The parent receives the first two.

Fault: the child is SIGKILLed and reaped, with four whole messages still unread.

Expected: the four messages are delivered, whole and in order, after the peer's death; then
one documented "peer gone" error follows: ``ConnectionEOF`` (an ``EOFError`` and an
``anyio.EndOfStream``) without "mid-message" in it, raised again by every later receive.
``async for`` would end there instead.

Lost: nothing that was sent. (What a killed peer was in the middle of sending is case 12's
business: the torn message, reported as ``ConnectionEOF`` "mid-message".)
"""

from __future__ import annotations

import multiprocessing
import signal
import sys

import anyio
import pytest

import asyncmp
from asyncmp import ConnectionEOF
from tests.support.io import wait_for_event
from tests.support.workers import MPContext

from . import fault_workers
from .fault_workers import message

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and POSIX descriptors"),
]

TRANSPORTS = pytest.mark.parametrize("transport", ["socket", "pipe"])
SIZES = [0, 1, 100, 16384, 16385, 20000]


async def kill_after_sending(ctx: MPContext, transport: str, use_threads: bool) -> None:
    a, b = asyncmp.Pipe(transport == "socket", use_threads=use_threads)
    sent = ctx.Event()
    child = ctx.Process(
        target=fault_workers.send_then_wait, args=(b, SIZES, sent), name="test-sender"
    )
    try:
        child.start()
        b.close()  # the child's end lives in the child only
        with anyio.fail_after(20):
            got = [await a.recv_bytes() for _ in range(2)]
            await wait_for_event(sent, "the child sent everything")
            child.kill()  # the fault
            await anyio.to_thread.run_sync(child.join)
            assert child.exitcode == -signal.SIGKILL
            while len(got) < len(SIZES):
                got.append(await a.recv_bytes())
            with pytest.raises(ConnectionEOF) as first:
                await a.recv_bytes()
            with pytest.raises(ConnectionEOF):
                await a.recv()  # and it stays at the end
    finally:
        await a.aclose()
        b.close()
        if child.is_alive():
            child.kill()
        child.join()
    assert got == [message(i, size) for i, size in enumerate(SIZES)]
    assert "mid-message" not in str(first.value)
    assert isinstance(first.value, EOFError)
    assert isinstance(first.value, anyio.EndOfStream)


@TRANSPORTS
async def test_messages_of_a_killed_peer_are_delivered_then_eof(
    mp_context: MPContext, transport: str
) -> None:
    await kill_after_sending(mp_context, transport, use_threads=False)


@TRANSPORTS
async def test_messages_of_a_killed_peer_are_delivered_then_eof_on_threads(
    transport: str,
) -> None:
    await kill_after_sending(multiprocessing.get_context("fork"), transport, use_threads=True)
