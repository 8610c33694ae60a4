"""The promises every channel keeps, as functions that take a :class:`Channel`.

Each ``check_*`` function opens the channel, exercises one promise and closes it again;
``tests/test_conformance.py`` runs every check for every channel in ``CHANNELS``. A new
channel passes them all before it ships. The promises (docs/howto/cancellation.md,
docs/faults.md):

1. Receives cancelled at random, thousands of them, lose and duplicate nothing, and the
   messages arrive in order; a receive cut in the middle of a frame resumes it whole.
2. A cancelled send or put happened completely or not at all: the peer sees whole messages
   only, and the stream stays framed. A queue's cancelled put put nothing.
3. The peer's end of the stream wakes every pending receive with the documented error, and
   every later receive raises it too.
4. Closing our end wakes every waiter, receivers and senders, with ``ClosedResourceError``,
   and every later call raises it.
5. A receive that finds a message already there still honours a cancellation that is
   already pending, and lets the loop's other tasks run.
6. Nothing is left behind once the channel is closed: no descriptor, thread or process.
7. The channel belongs to the event loop that uses it: an awaited call from a loop in
   another thread meanwhile raises ``RuntimeError`` at once, naming the fix, and changes
   nothing here.
8. The flags of the shared open file descriptions never change: ``O_NONBLOCK`` (which
   uvloop's ``add_reader`` sets and never restores) would break every other process that
   uses them, a forked child or a queue's plain consumer. Checked while a receive waits,
   while a send waits for room, and after each call and the close.
9. A channel on the descriptor route starts no thread: not to receive, to send, to wait for
   room or to close. (A channel that uses threads is seen to start them: the control.)
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import gc
import multiprocessing
import os
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import nullcontext
from types import FrameType

import anyio
import anyio.lowlevel
import pytest

import asyncmp

from .channels import Channel, Job, Pair, payloads
from .io import (
    KiB,
    Writer,
    after_readiness,
    buffered,
    reader_lock_is_held,
    settle,
    wait_until,
    write_all,
)
from .loops import FOREIGN_BACKENDS, assert_refused, from_another_loop

__all__ = (
    "check_another_loop_is_refused",
    "check_buffered_receive_still_checkpoints",
    "check_cancelled_sends_are_all_or_nothing",
    "check_close_wakes_every_waiter",
    "check_eof_wakes_every_receiver",
    "check_leaves_nothing_behind",
    "check_receive_cancelled_mid_frame",
    "check_receives_cancelled_at_random",
    "check_shared_flags_never_change",
    "check_starts_no_thread",
)

END = b"\xff\xff\xff\xffend of the stream"
#: At most this much is written for an ``after-readiness`` cut: it fits in any kernel
#: buffer, so it is all there, unread, when the cancellation lands.
PIECE = 4096
WAITERS = 3


def _index(payload: bytes) -> int:
    return int.from_bytes(payload[:4], "big")


# --- 1. receives cancelled at random ----------------------------------------------------------


async def check_receives_cancelled_at_random(
    channel: Channel, *, seed: int, count: int = 2000
) -> None:
    """The peer sends *count* messages (1 in 100 of 100-200 KiB, so that it arrives in
    pieces and receives are cut in the middle of it); every receive runs under a random
    deadline, a third of them already past. Every message arrives once, whole, in order."""
    rng = random.Random(seed)
    sent = payloads(seed, count, big_every=100, big_size=100 * KiB)
    received: list[bytes] = []
    cancelled = 0
    async with channel.open() as pair:
        job = pair.peer.send([*sent, END])
        with anyio.fail_after(60):
            while not received or received[-1] != END:
                roll = rng.random()
                if roll < 0.3:
                    delay = 0.0  # cancelled at the first checkpoint
                elif roll < 0.85:
                    delay = rng.uniform(0, 0.0005)
                else:
                    delay = rng.uniform(0.0005, 0.005)
                with anyio.move_on_after(delay) as scope:
                    received.append(await pair.end.receive())
                cancelled += scope.cancelled_caught
            await job.result()
        received.pop()
        # Nothing was kept twice: the next message is the next one sent.
        job = pair.peer.send([b"after"])
        with anyio.fail_after(20):
            assert await pair.end.receive() == b"after"
            await job.result()
        # No get left a queue's reader lock taken: a plain consumer elsewhere can read.
        if hasattr(pair.end.obj, "queue") and hasattr(pair.end.obj.queue, "_rlock"):
            await wait_until(
                lambda: not reader_lock_is_held(pair.end.obj.queue), "the reader lock is free"
            )
    assert [_index(m) for m in received] == list(range(count)), f"seed={seed}"
    pairs = zip(received, sent, strict=True)
    assert [i for i, (got, want) in enumerate(pairs) if got != want] == [], f"seed={seed}"
    assert cancelled >= count // 10, f"only {cancelled} receives were cancelled"


async def check_receive_cancelled_mid_frame(
    channel: Channel, message_sizes: list[int], cuts: list[tuple[int, str]]
) -> None:
    """The peer writes the stream of framed messages raw, in pieces; at each cut (an offset
    in the stream, in increasing order) a receive in progress is cancelled:

    * ``waiting``: the receive has taken every byte written so far out of the kernel
      buffer (at a frame boundary, in a header or in a body) and waits for more.
    * ``after-readiness`` (descriptor route): the next bytes arrive, the receive's
      readiness wait returns, and the cancellation lands at that wake-up, before anything
      is read; the new bytes stay unread in the kernel buffer.

    A queue's get cut in the middle of an item returns at once, and the rest of the item is
    read in the background: it is written right after the cancellation, and the item is
    kept for the next get. Then the rest of the stream arrives: every message whole, in
    order."""
    assert channel.encode is not None
    messages = [
        i.to_bytes(4, "big") + bytes([i % 251]) * size for i, size in enumerate(message_sizes)
    ]
    frames = [channel.encode(m) for m in messages]
    stream = b"".join(frames)
    bounds = [0]
    for f in frames:
        bounds.append(bounds[-1] + len(f))
    got: list[bytes] = []
    writers: list[Writer] = []
    async with channel.open() as pair:
        fd, peer_fd = pair.end.reader_fd(), pair.peer.raw_fd()
        assert fd is not None and peer_fd is not None
        pair.peer.reserve(len(frames) + 1)
        pos = 0
        try:
            with anyio.fail_after(30):
                for cut, mode in cuts:
                    if cut < pos:  # a queue's cancelled get already took the frame
                        continue
                    await wait_until(
                        lambda: not any(w.is_alive() for w in writers), "the earlier writes ended"
                    )
                    at_boundary = pos in bounds
                    inject = (
                        mode == "after-readiness"
                        and channel.readiness_hook
                        and cut > pos
                        and (at_boundary or not channel.is_queue)
                    )
                    scope = anyio.CancelScope()

                    async def receive(scope: anyio.CancelScope = scope) -> None:
                        with scope:
                            while True:
                                got.append(await pair.end.receive())

                    async def cancel_at_wake_up(scope: anyio.CancelScope = scope) -> None:
                        scope.cancel()
                        await anyio.lowlevel.checkpoint()

                    # Armed before the receive starts, so that its very wait is the one hooked.
                    with after_readiness(cancel_at_wake_up) if inject else nullcontext([]) as fired:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(receive)
                            if inject and channel.is_queue:
                                # A get cut mid-item left the rest of it to a background
                                # read: the receive takes that item first, and only then
                                # waits for readiness (the wait hooked here).
                                whole = bounds.index(pos)
                                await wait_until(
                                    lambda n=whole: len(got) == n,  # type: ignore[misc]
                                    "the receive took every whole item written",
                                )
                            await settle()
                            if inject:
                                assert not fired
                                piece = stream[pos : min(cut, pos + PIECE)]
                                write_all(peer_fd, piece)
                                await wait_until(lambda: bool(fired), "the receive woke up")
                                # The fault landed before the read: the piece is all there.
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
                                if channel.is_queue and pos not in bounds:
                                    # The rest of the item is read in the background.
                                    end_of_frame = bounds[bisect.bisect(bounds, pos)]
                                    writer = Writer(peer_fd, stream[pos:end_of_frame])
                                    writers.append(writer)
                                    writer.start()
                                    pos = end_of_frame
                    assert scope.cancelled_caught
                # Two writers at once would interleave their bytes in the pipe. The rest of
                # an item cut by a cancelled get may still be going in: on the thread route
                # the get's thread goes on reading it after the get returned.
                await wait_until(
                    lambda: not any(w.is_alive() for w in writers), "the earlier writes ended"
                )
                writer = Writer(peer_fd, stream[pos:] + channel.encode(END))
                writers.append(writer)
                writer.start()
                while (received := await pair.end.receive()) != END:
                    got.append(received)
        finally:
            if any(w.is_alive() for w in writers):
                await pair.end.aclose()  # a writer still blocked (the check failed) ends
            for w in writers:
                w.finish()
    assert [w.error for w in writers] == [None] * len(writers)
    assert [_index(m) for m in got] == list(range(len(messages)))
    assert [i for i, (g, m) in enumerate(zip(got, messages, strict=True)) if g != m] == []


# --- 2. cancelled sends -----------------------------------------------------------------------


def _filler_size(channel: Channel) -> int:
    """Messages that fill a connection's buffers in a send or two (and leave the next one
    waiting in the middle of a frame); a bounded queue's items
    small enough that its feeder thread can write them all into the pipe (``aclose()``
    waits for that)."""
    return KiB if channel.is_queue else 1 << 20


@contextlib.contextmanager
def _rescue_after(seconds: float, pair: Pair) -> Iterator[list[Job]]:
    """For a check whose waiters may not wake (a known bug): after *seconds*, the peer
    starts reading until ``END``, which lets a blocked send finish, so that the check fails
    rather than hangs. Yields a list that holds the peer's job once it started."""
    rescue: list[Job] = []
    timer = threading.Timer(seconds, lambda: rescue.append(pair.peer.receive_until(END)))
    timer.start()
    try:
        yield rescue
    finally:
        timer.cancel()
        timer.join()


async def _send_until_blocked(
    pair: Pair, scope: anyio.CancelScope, returned: _Returned, size: int
) -> None:
    """Send numbered messages of *size* bytes, recording each whose send returned, until
    *scope* is cancelled; nobody reads, so one send ends up waiting for room. Before each
    send, ``returned`` notes whether the channel was full already."""
    with scope:
        while True:
            i = len(returned)
            assert i < 2000, "the channel never filled up"
            returned.started_full = pair.end.send_would_wait()
            await pair.end.send(i.to_bytes(4, "big") + b"f" * size)
            returned.append(i)


class _Returned(list[int]):
    """The numbers of the sends that returned, and whether the current one started on a
    full channel (then it waits for room)."""

    started_full = False


async def _until_blocked(pair: Pair, returned: _Returned, queue: bool) -> None:
    """Return once the sender waits: no send returns while the loop is idle. A queue's put
    must have started on a full queue (a put that got a slot may still be finishing in its
    thread); a connection's send may also wait in the middle of its frame."""
    while True:
        if queue:
            await wait_until(lambda: returned.started_full, "a put waits for room")
        else:
            await wait_until(pair.end.send_would_wait, "the channel is full")
        before = len(returned)
        for _ in range(3):
            await settle()
        if len(returned) == before and (returned.started_full or not queue):
            return


async def check_cancelled_sends_are_all_or_nothing(channel: Channel, *, seed: int) -> None:
    """First a send that waits for room (nobody reads) is cancelled, and the peer starts
    reading; then sends of random sizes (1 in 25 of 300-600 KiB, so that a cancellation can cut
    one in the middle) run under random deadlines while the peer reads. The peer gets whole
    messages only, in order, each one whose send returned; a message whose send was
    cancelled is there whole or not at all (a queue: not at all, the put did not happen)."""
    rng = random.Random(seed)
    returned = _Returned()
    cancelled: list[int] = []
    async with channel.open() as pair:
        scope = anyio.CancelScope()
        # A connection's send past its first byte finishes under the shield, while the
        # peer reads; a queue's put gives up at once.
        bound = 1 if channel.is_queue else asyncmp.SEND_SHIELD_SECONDS + 20
        with _rescue_after(bound, pair) as rescue:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_send_until_blocked, pair, scope, returned, _filler_size(channel))
                await _until_blocked(pair, returned, channel.is_queue)
                first = len(returned)
                scope.cancel()
                if not channel.is_queue:
                    reader = pair.peer.receive_until(END)
        assert not rescue, "a cancelled send did not return until the peer read"
        assert len(returned) == first, "a send cancelled while it waited for room returned"
        if channel.is_queue:
            reader = pair.peer.receive_until(END)
        size = _filler_size(channel)
        sent = {i: i.to_bytes(4, "big") + b"f" * size for i in range(first + 1)}
        cancelled.append(first)

        more = payloads(seed, 200, big_every=25, big_size=300 * KiB)
        with anyio.fail_after(60):
            for n, payload in enumerate(more, start=first + 1):
                item = n.to_bytes(4, "big") + payload[4:]
                sent[n] = item
                delay = 0.0 if rng.random() < 0.3 else rng.uniform(0, 0.001)
                with anyio.move_on_after(delay) as scope:
                    await pair.end.send(item)
                (cancelled if scope.cancelled_caught else returned).append(n)
            await pair.end.send(END)
            got = await reader.result(timeout=60)
    indices = [_index(m) for m in got]
    assert indices == sorted(set(indices)), "out of order, or twice"
    assert [i for i, m in zip(indices, got, strict=True) if m != sent[i]] == [], "torn"
    missing = sorted(set(returned) - set(indices))
    assert missing == [], f"sends that returned were not delivered: {missing[:10]}"
    if channel.is_queue:
        assert set(indices) == set(returned), "a cancelled put put its item"
    assert len(cancelled) > 10, f"only {len(cancelled)} sends were cancelled"


# --- 3. EOF -------------------------------------------------------------------------------------


async def check_eof_wakes_every_receiver(channel: Channel) -> None:
    """The peer sends one message and ends the stream while receivers wait: one of them gets
    the message, the others the channel's EOF error, and so does every later receive."""
    eof = channel.eof_error
    assert eof is not None
    results: list[object] = []
    async with channel.open() as pair:

        async def receive() -> None:
            try:
                results.append(await pair.end.receive())
            except Exception as exc:
                results.append(exc)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(WAITERS):
                    tg.start_soon(receive)
                await settle()
                await pair.peer.send([b"last"]).result()
                await wait_until(lambda: len(results) == 1, "a receiver got the message")
                pair.peer.close()
            assert results[0] == b"last"
            errors = results[1:]
            assert all(isinstance(e, eof) for e in errors), errors
            with pytest.raises(eof):
                await pair.end.receive()


# --- 4. closing our end -------------------------------------------------------------------------


async def check_close_wakes_every_waiter(channel: Channel, how: str, waiting: str) -> None:
    """Receivers wait for a message, or senders for room (nobody reads); ``aclose()`` (or
    ``close()``) of our end wakes each one with ``ClosedResourceError`` at once, and later
    calls raise it."""
    results: list[str] = []
    async with channel.open() as pair:
        end = pair.end

        returned = _Returned()

        async def call() -> None:
            try:
                if waiting == "receivers":
                    await end.receive()
                else:
                    await _send_until_blocked(
                        pair, anyio.CancelScope(), returned, _filler_size(channel)
                    )
            except Exception as exc:
                results.append(type(exc).__name__)
            else:
                results.append("returned")

        with _rescue_after(1, pair) as rescue:
            async with anyio.create_task_group() as tg:
                for _ in range(WAITERS):
                    tg.start_soon(call)
                if waiting == "senders":
                    await _until_blocked(pair, returned, channel.is_queue)
                await settle()
                assert results == [], "a call did not wait"
                if how == "close":
                    end.close()
                else:
                    await end.aclose()
        assert not rescue, "closing did not wake the waiters; they waited for the peer"
        assert results == ["ClosedResourceError"] * WAITERS
        with pytest.raises(anyio.ClosedResourceError):
            await end.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await end.send(b"after")
        await end.aclose()  # again: nothing happens


# --- 5. buffered receives still checkpoint ------------------------------------------------------


async def check_buffered_receive_still_checkpoints(channel: Channel) -> None:
    """A receive in a scope that is already cancelled raises the cancellation and takes
    nothing, though messages are there (in the kernel, or taken in by an earlier read); and
    a run of receives that never wait gives the loop's other tasks their turns."""
    async with channel.open() as pair:
        end = pair.end
        with anyio.fail_after(20):
            await pair.peer.send([b"first", b"second"]).result()
            await wait_until(end.ready, "the messages are there")
            for expected in (b"first", b"second"):
                with anyio.CancelScope() as scope:
                    scope.cancel()
                    await end.receive()
                    pytest.fail("a cancelled receive returned a message")
                assert scope.cancelled_caught
                assert await end.receive() == expected

        # Other tasks run while receives find their messages there, without waiting.
        ticks = 0
        turns_while_ready = 0

        async def counter() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.lowlevel.checkpoint()

        count = 20_000
        job = pair.peer.send([i.to_bytes(4, "big") for i in range(count)] + [END])
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(counter)
                while True:
                    ready = end.ready()
                    before = ticks
                    if await end.receive() == END:
                        break
                    turns_while_ready += ready and ticks > before
                    # Some work per message, as a consumer does: the peer keeps ahead, so
                    # that most receives find their message there, however fast this
                    # process reads compared with the peer writing.
                    _busy(50e-6)
                    if turns_while_ready >= 3:
                        break
                tg.cancel_scope.cancel()
            assert turns_while_ready >= 3, "receives that found a message never let the loop run"
            pair.peer.stop()
            while not (job.done() and not end.ready()):
                with anyio.move_on_after(0.1):
                    await end.receive()


def _busy(seconds: float) -> None:
    """Use the CPU for *seconds*, holding the event loop."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


# --- 6. nothing left behind ---------------------------------------------------------------------


async def _eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether *predicate* holds within *timeout* seconds (a "no hang" bound)."""
    with anyio.move_on_after(timeout):
        while not predicate():  # noqa: ASYNC110 (what it waits for announces nothing)
            await anyio.sleep(0.01)
        return True
    return False


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")} if sys.platform == "linux" else set()


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(("asyncmp", "test-peer"))}


async def check_leaves_nothing_behind(channel: Channel) -> None:
    """A message each way, then close: every descriptor, thread and process the channel
    made is gone."""
    fds, threads = _fds(), _threads()
    children = {p.pid for p in multiprocessing.active_children()}
    async with channel.open() as pair:
        with anyio.fail_after(20):
            job = pair.peer.receive_until(END)
            await pair.end.send(b"out")
            await pair.end.send(END)
            assert await job.result() == [b"out"]
            await pair.peer.send([b"in"]).result()
            assert await pair.end.receive() == b"in"
    del pair, job  # what they hold (a manager, through its proxy) can go
    await wait_until(lambda: not (_threads() - threads), "the channel's threads ended", 5)
    await wait_until(
        lambda: not ({p.pid for p in multiprocessing.active_children()} - children),
        "the channel's processes ended",
        5,
    )

    def closed() -> bool:
        gc.collect()  # what only garbage holds
        return not (_fds() - fds)

    if not await _eventually(closed):
        left = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in _fds() - fds}
        pytest.fail(f"descriptors left open: {left}")


# --- 7. another event loop ----------------------------------------------------------------------


async def check_another_loop_is_refused(channel: Channel) -> None:
    """A message each way makes the channel this loop's; then, while a receive of this loop
    waits, a receive, a send and ``aclose()`` from a loop in another thread (asyncio, then
    trio) each raise ``RuntimeError`` at once, saying how to call the channel through this
    loop. Nothing changed: the waiting receive gets the next message, the end is open, and
    the peer gets this loop's sends and nothing from the other loop."""
    async with channel.open() as pair:
        end = pair.end
        kinds = (asyncmp.Worker, asyncmp.AsyncQueue, asyncmp.AsyncConnection)
        what = "this " + next(kind.__name__ for kind in kinds if isinstance(end.obj, kind))
        with anyio.fail_after(20):
            await _peer_gets(pair, b"before")

        async def refused() -> None:
            for backend in FOREIGN_BACKENDS:
                for call in (end.receive, lambda: end.send(b"foreign"), end.aclose):
                    assert_refused(await from_another_loop(call, backend), what)

        with anyio.fail_after(60):
            await _receive_while(pair, refused, b"mine")
        with anyio.fail_after(20):
            await _peer_gets(pair, b"after")


async def _receive_while(pair: Pair, during: Callable[[], Awaitable[None]], payload: bytes) -> None:
    """A receive waits while *during()* runs, and gets nothing meanwhile; then the peer
    sends *payload*, which it gets."""
    got: list[bytes] = []

    async def receive() -> None:
        got.append(await pair.end.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        await settle()
        await during()
        assert got == []
        await pair.peer.send([payload]).result()
    assert got == [payload]


async def _peer_gets(pair: Pair, payload: bytes) -> None:
    """Send *payload*, then the end marker: the peer gets *payload* alone."""
    job = pair.peer.receive_until(END)
    await pair.end.send(payload)
    await pair.end.send(END)
    assert await job.result() == [payload]


# --- 8. and 9. what each call leaves alone ----------------------------------------------------


async def _each_call(channel: Channel, pair: Pair, look: Callable[[str, str], None]) -> None:
    """Run the calls of a conversation on *pair*, and *look* at what they left, naming the
    call (``receive``, ``send``, ``close``) and the moment: while a receive waits and after
    it, after a send, while a send waits for room and after it (a channel that can fill
    up), after a cancelled receive, and after the close."""
    end = pair.end

    async def while_it_waits() -> None:
        look("receive", "while a receive waits")

    with anyio.fail_after(30):
        await _receive_while(pair, while_it_waits, b"in")
        look("receive", "after a receive")
        await _peer_gets(pair, b"out")
        look("send", "after a send")

    if channel.bounded:
        returned = _Returned()
        scope = anyio.CancelScope()
        bound = 1 if channel.is_queue else asyncmp.SEND_SHIELD_SECONDS + 20
        with _rescue_after(bound, pair) as rescue:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_send_until_blocked, pair, scope, returned, _filler_size(channel))
                await _until_blocked(pair, returned, channel.is_queue)
                look("send", "while a send waits for room")
                scope.cancel()
                if not channel.is_queue:  # the send past its first byte ends as it reads
                    reader = pair.peer.receive_until(END)
        assert not rescue, "a cancelled send did not return until the peer read"
        if channel.is_queue:
            reader = pair.peer.receive_until(END)
        with anyio.fail_after(60):
            await end.send(END)
            await reader.result(timeout=60)
        look("send", "after a send that waited for room")

    # Last before the close: a queue's get cancelled on the thread route leaves its thread
    # waiting, to take the next item (and keep it for the next get), which the peer
    # would then miss.
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(end.receive)
            await settle()
            scope.cancel()
    look("receive", "after a cancelled receive")

    await end.aclose()
    look("close", "after the close")


def _nonblocking(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


async def check_shared_flags_never_change(channel: Channel) -> None:
    """``O_NONBLOCK`` of the open file descriptions behind both ends (the async end's and
    the peer's descriptors) stays as it was, through every call of :func:`_each_call`. They
    are watched through copies (``dup()``), which share the description and outlive the
    close."""
    async with channel.open() as pair:
        fds = pair.end.shared_fds()
        peer_fd = pair.peer.raw_fd()
        if peer_fd is not None:
            fds.append(peer_fd)
        assert fds, "the channel has no descriptor"
        copies = [os.dup(fd) for fd in fds]
        try:
            before = [_nonblocking(fd) for fd in copies]

            def look(call: str, moment: str) -> None:
                now = [_nonblocking(fd) for fd in copies]
                assert now == before, f"O_NONBLOCK changed {moment}: {before} -> {now}"

            await _each_call(channel, pair, look)
        finally:
            for fd in copies:
                os.close(fd)


_ASYNCMP = os.path.dirname(asyncmp.__file__) + os.sep


def _started_by_asyncmp() -> bool:
    """Whether the thread being started is the channel's: asyncmp's code is on the stack.
    (The peer's threads and what they start are not, nor a loop's own: trio's guest mode,
    which anyio's test runner uses, gets its I/O events in a thread of its own.)"""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_ASYNCMP):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _thread_starts() -> Iterator[list[str]]:
    """Record the name of every thread that asyncmp starts meanwhile."""
    started: list[str] = []
    start = threading.Thread.start

    def recording_start(thread: threading.Thread) -> None:
        if _started_by_asyncmp():
            started.append(thread.name)
        start(thread)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(threading.Thread, "start", recording_start)
        yield started


async def check_starts_no_thread(channel: Channel) -> None:
    """No call of :func:`_each_call` that the channel promises to make without a thread
    (:attr:`Channel.threadless`) starts one. A channel that uses threads is seen to start
    them (the recording works)."""
    async with channel.open() as pair:
        with _thread_starts() as started:
            seen = 0

            def look(call: str, moment: str) -> None:
                nonlocal seen
                new, seen = started[seen:], len(started)
                if call in channel.threadless:
                    assert new == [], f"threads started by a {call}, {moment}: {new}"

            await _each_call(channel, pair, look)
            if channel.uses_threads:
                assert started, "a channel that uses threads was seen to start none"
