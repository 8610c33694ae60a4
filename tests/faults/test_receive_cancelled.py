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
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import asyncmp
from tests.support.io import Writer, after_readiness, buffered, frame, settle, wait_until, write_all

from .fault_workers import message

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="a peer that writes raw framing to a fd"),
]

MODES = ("waiting", "after-readiness")
#: At most this much is written for an ``after-readiness`` cut: it fits in any kernel
#: buffer, so it is all there, unread, when the cancellation lands.
PIECE = 4096
END = b"end of the stream"

sizes = st.one_of(
    st.integers(0, 64),
    st.integers(16_380, 16_390),
    st.integers(65_530, 65_545),
    st.integers(100_000, 300_000),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[str, list[int], list[tuple[int, str]]]:
    """(transport, message sizes, [(cut offset, mode), ...] in increasing offset order)."""
    transport = draw(st.sampled_from(["socket", "pipe"]))
    message_sizes = draw(st.lists(sizes, min_size=1, max_size=4))
    total = sum(4 + size for size in message_sizes)
    offsets = draw(st.lists(st.integers(0, total), min_size=1, max_size=3, unique=True))
    modes = draw(st.lists(st.sampled_from(MODES), min_size=len(offsets), max_size=len(offsets)))
    return transport, message_sizes, list(zip(sorted(offsets), modes, strict=True))


async def run_scenario(
    use_threads: bool, transport: str, message_sizes: list[int], cuts: list[tuple[int, str]]
) -> None:
    messages = [message(i, size) for i, size in enumerate(message_sizes)]
    stream = b"".join(frame(m) for m in messages)
    a, b = asyncmp.Pipe(transport == "socket", use_threads=use_threads)
    got: list[bytes] = []
    writers: list[Writer] = []
    try:
        fd, peer_fd = a.fileno(), b.fileno()
        pos = 0
        with anyio.fail_after(20):
            for cut, mode in cuts:
                scope = anyio.CancelScope()

                async def receive(scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        while True:
                            got.append(await a.recv_bytes())

                async def cancel_at_wake_up(scope: anyio.CancelScope = scope) -> None:
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()

                inject = mode == "after-readiness" and not use_threads and cut > pos
                # Armed before the receive starts, so its very wait is the one hooked.
                with after_readiness(cancel_at_wake_up) if inject else nullcontext([]) as fired:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(receive)
                        await settle()
                        if inject:
                            assert not fired
                            piece = stream[pos : min(cut, pos + PIECE)]
                            write_all(peer_fd, piece)
                            await wait_until(lambda: bool(fired), "the receive woke up")
                            # The fault landed before the read: the piece is all still there.
                            assert buffered(fd) == len(piece)
                            pos += len(piece)
                        else:
                            writer = Writer(peer_fd, stream[pos:cut])
                            writers.append(writer)
                            writer.start()
                            await wait_until(
                                lambda w=writer: not w.is_alive() and buffered(fd) == 0,  # type: ignore[misc]
                                "the receive took every byte written",
                            )
                            await settle()
                            scope.cancel()
                            pos = cut
                assert scope.cancelled_caught
            writer = Writer(peer_fd, stream[pos:] + frame(END))
            writers.append(writer)
            writer.start()
            while (received := await a.recv_bytes()) != END:
                got.append(received)
    finally:
        await a.aclose()  # a writer still blocked (the test failed) now fails and ends
        for writer in writers:
            writer.finish()
        b.close()
    assert [w.error for w in writers] == [None] * len(writers)
    assert len(got) == len(messages)
    assert [i for i, (g, m) in enumerate(zip(got, messages, strict=True)) if g != m] == []


@pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenario=scenarios())
@example(scenario=("pipe", [200_000], [(2, "waiting"), (60_004, "after-readiness")]))
@example(scenario=("socket", [10, 70_000], [(14, "after-readiness"), (20_000, "waiting")]))
@example(scenario=("pipe", [0, 5], [(0, "waiting"), (4, "waiting"), (13, "after-readiness")]))
async def test_cancelled_receive_loses_nothing(
    use_threads: bool, scenario: tuple[str, list[int], list[tuple[int, str]]]
) -> None:
    await run_scenario(use_threads, *scenario)
