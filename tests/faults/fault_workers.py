"""Child-process targets of the fault-injection suite.

They live in an importable module so that every start method can run them (spawn and
forkserver children import this module by name). Imports stay light: each spawned child
pays for them; the targets that run an event loop import asyncmp and anyio themselves.
A target reports through its exit code, through an Event, or over a Connection it is given.
"""

from __future__ import annotations

import os
import queue
import random
import sys
import time
import zlib
from multiprocessing.connection import Connection
from typing import Any

__all__ = (
    "ASYNC_PART_FAILED",
    "EXIT_HOWS",
    "aclose_after_a_cancelled_get_then_exit",
    "get_until_none",
    "hold_then_wait_to_be_killed",
    "message",
    "produce_then_exit",
    "put_big_items",
    "put_big_then_wait",
    "send_then_wait",
    "soak_consumer",
    "soak_item_ok",
    "soak_producer",
    "wait_to_be_killed",
    "write_item_in_two_parts",
)

#: Exit code of a target whose async part raised.
ASYNC_PART_FAILED = 5
#: How :func:`produce_then_exit` leaves: through ``AsyncQueue`` or the plain queue, with
#: or without ``aclose()``, by returning normally or by ``os._exit``.
EXIT_HOWS = (
    "async-aclose-return",
    "async-aclose-os_exit",
    "sync-return",
    "async-os_exit",
    "sync-os_exit",
)
#: How long a target that waits to be killed waits at most (a test that failed to kill it
#: must not leave it behind for good).
_MAX_WAIT = 60.0


def message(i: int, size: int) -> bytes:
    """Message *i*: *size* pseudo-random bytes seeded by *i*, so a torn, shifted or swapped
    copy does not compare equal."""
    return random.Random(i).randbytes(size)


def wait_to_be_killed(ready: Any) -> None:
    """Set *ready*, then wait (bounded) for the test to kill this process."""
    ready.set()
    time.sleep(_MAX_WAIT)
    sys.exit(1)


def hold_then_wait_to_be_killed(held: Any, ready: Any) -> None:
    """Hold *held* (a queue, a connection: its descriptors stay open in this process), set
    *ready*, and wait to be killed without reading anything."""
    wait_to_be_killed(ready)


def send_then_wait(conn: Connection, sizes: list[int], sent: Any) -> None:
    """``send_bytes(message(i, size))`` for each size, set *sent*, then wait to be killed.

    Every send returned before *sent* is set: the messages are whole in the kernel buffer
    (the test keeps them small enough to fit) when the process dies.
    """
    for i, size in enumerate(sizes):
        conn.send_bytes(message(i, size))
    wait_to_be_killed(sent)


def put_big_then_wait(q: Any, size: int) -> None:
    """``q.put()`` one item of *size* bytes, then wait to be killed while the queue's feeder
    thread writes it (a pipe holds far less, so the feeder blocks until somebody reads)."""
    q.put(b"\x5a" * size)
    time.sleep(_MAX_WAIT)
    sys.exit(1)


def put_big_items(q: Any, count: int, size: int) -> None:
    """``q.put()`` *count* items of *size* bytes, then exit normally (which flushes)."""
    for i in range(count):
        q.put(bytes([i]) * size)


def write_item_in_two_parts(q: Any, first: bytes, rest: bytes, written: Any, release: Any) -> None:
    """Take a slot of the queue as ``put()`` does, write *first* raw into the queue's pipe,
    set *written*, wait for *release*, then write *rest*: a producer that stalls in the
    middle of an item, and says where it stalls."""
    sem = getattr(q, "_sem", None)
    if sem is not None:
        sem.acquire()
    fd = q._writer.fileno()
    for part in (first, rest):
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]
        if part is first:
            written.set()
            if not release.wait(_MAX_WAIT):
                sys.exit(1)


def _run_async(main: Any, backend: str, uvloop: bool) -> None:
    """``anyio.run(main)`` in a thread of its own: a child forked from a running event loop
    inherits the loop's thread-local state, and anyio would refuse to start another."""
    import threading

    import anyio

    options: dict[str, Any] = {}
    if uvloop:
        import uvloop as uvloop_module

        options["loop_factory"] = uvloop_module.new_event_loop
    errors: list[BaseException] = []

    def run() -> None:
        try:
            anyio.run(main, backend=backend, backend_options=options)
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="child-event-loop")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def aclose_after_a_cancelled_get_then_exit(
    q: Any, frame: bytes, split: int, stall: float, closed: Any, backend: str, uvloop: bool
) -> None:
    """Be the producer and the consumer of *frame* (a raw frame larger than the pipe): write
    its first *split* bytes (which fit the pipe), cancel a ``get()`` of an ``AsyncQueue``
    once it has read them, write the rest (the adapter's thread reads it), ``aclose()``
    with nobody else reading, set *closed*, and return normally: the exit handlers run.
    *stall* is the adapter's ``stall_timeout``."""
    import anyio
    import anyio.to_thread

    from asyncmp import AsyncQueue

    sem = getattr(q, "_sem", None)
    if sem is not None:
        sem.acquire()  # the item's slot, as put() takes it
    fd = q._writer.fileno()

    def write(part: bytes) -> None:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]

    def nothing_buffered() -> bool:
        import array
        import fcntl
        import termios

        count = array.array("i", [0])
        fcntl.ioctl(q._reader.fileno(), termios.FIONREAD, count, True)
        return count[0] == 0

    async def main() -> None:
        aq = AsyncQueue[Any](q, stall_timeout=stall)
        write(frame[:split])
        async with anyio.create_task_group() as tg:
            tg.start_soon(aq.get)
            with anyio.fail_after(_MAX_WAIT):
                # The get has read the first part (bytes in a pipe announce nothing).
                while not nothing_buffered():  # noqa: ASYNC110
                    await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
        await anyio.to_thread.run_sync(write, frame[split:])
        await aq.aclose()
        closed.set()

    try:
        _run_async(main, backend, uvloop)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(ASYNC_PART_FAILED)


def make_a_queue_then_aclose_after_a_cancelled_get(
    method: str, frame: bytes, split: int, stall: float, closed: Any, backend: str, uvloop: bool
) -> None:
    """:func:`aclose_after_a_cancelled_get_then_exit` on a ``Queue`` of the start method
    *method* made here, so that no other process ever holds its read end."""
    import multiprocessing

    q = multiprocessing.get_context(method).Queue()
    aclose_after_a_cancelled_get_then_exit(q, frame, split, stall, closed, backend, uvloop)


def produce_then_exit(
    q: Any, items: list[Any], how: str, backend: str = "asyncio", uvloop: bool = False
) -> None:
    """Put *items*, then leave the way *how* names (one of :data:`EXIT_HOWS`)."""
    if how.startswith("sync"):
        for item in items:
            q.put(item)
    else:
        from asyncmp import AsyncQueue

        async def main() -> None:
            aq = AsyncQueue[Any](q)
            for item in items:
                await aq.put(item)
            if "aclose" in how:
                await aq.aclose()

        try:
            _run_async(main, backend, uvloop)
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            os._exit(ASYNC_PART_FAILED)
    if how.endswith("os_exit"):
        os._exit(0)


def get_until_none(q: Any, report: Connection, pause: float = 0.0) -> None:
    """Plain blocking ``q.get()`` until ``None``; send ``("item", x)`` for each item, and
    ``("error", repr)`` (then stop) if a get raises, BlockingIOError in particular. Spend
    *pause* seconds on each item (a consumer that is not always waiting)."""
    with report:
        while True:
            try:
                item = q.get()
            except BaseException as exc:  # reported to the test
                report.send(("error", repr(exc)))
                return
            if item is None:
                report.send(("done", None))
                return
            report.send(("item", item))
            time.sleep(pause)


# -- soak ---------------------------------------------------------------------------------


def _soak_payload(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        size = rng.randrange(64)
    elif roll < 0.9:
        size = rng.randrange(64 * 1024)
    elif roll < 0.99:
        size = rng.randrange(1 << 20)
    else:
        size = rng.randrange(4 << 20)
    return rng.randbytes(size)


def soak_item_ok(item: Any) -> bool:
    """True if a soak item ``(tag, seq, crc, payload)`` arrived intact."""
    return isinstance(item, tuple) and len(item) == 4 and zlib.crc32(item[3]) == item[2]


def soak_producer(conn: Connection, tag: int, count: int, seed: int, progress: Any) -> None:
    """Send *count* items ``(tag, seq, crc32(payload), payload)`` of random sizes.

    Before each send, ``progress[tag]`` is set to ``seq + 1``: the number of items this
    producer has started to send. A producer killed at any moment has delivered items
    ``0 .. progress[tag] - 2`` for sure; item ``progress[tag] - 1`` was in flight.
    """
    from multiprocessing.reduction import ForkingPickler

    rng = random.Random(seed)
    with conn:
        for seq in range(count):
            payload = _soak_payload(rng)
            data = ForkingPickler.dumps((tag, seq, zlib.crc32(payload), payload))
            progress[tag] = seq + 1
            conn.send_bytes(data)


def soak_consumer(q: Any, report: Connection) -> None:
    """Plain blocking ``q.get()`` until ``None``; then send the ``(tag, seq)`` of every
    item, and the number of items that arrived corrupt."""
    got: list[tuple[int, int]] = []
    corrupt = 0
    with report:
        while True:
            try:
                item = q.get(timeout=120)
            except queue.Empty:
                break
            if item is None:
                break
            if soak_item_ok(item):
                got.append((item[0], item[1]))
            else:
                corrupt += 1
        report.send((got, corrupt))
