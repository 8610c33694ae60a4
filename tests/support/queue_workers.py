"""Child-process targets for ``test_queue.py``.

They live in an importable module so that every start method can run them. Each target
uses the plain, synchronous ``multiprocessing`` queue API (the code on the other side of
an ``AsyncQueue``), except :func:`async_put_then_exit`; the targets that play a producer
stalling or dying mid-item write raw bytes through the queue's private ``_writer``. A
target reports through its exit code, or by pickling what it saw to a file the test names.
"""

from __future__ import annotations

import os
import pickle
import queue
import sys
import time
from typing import Any

__all__ = (
    "ASYNC_PART_FAILED",
    "NO_ITEM",
    "WRONG_ITEM",
    "async_put_then_exit",
    "consume_until_none",
    "echo_until_none",
    "flush_item",
    "get_blocking",
    "get_expecting",
    "get_in_order",
    "get_simple_expecting",
    "produce",
    "put_all",
    "put_paced",
    "task_done_but_hold_the_last",
    "write_frame_in_two_parts",
    "write_partial_frame",
)

#: Exit code of a child that got an item other than the one it expected.
WRONG_ITEM = 3
#: Exit code of a child that got no item in time.
NO_ITEM = 4
#: Exit code of :func:`async_put_then_exit` when its async part raised.
ASYNC_PART_FAILED = 5


def _report(path: str, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def put_all(q: Any, items: list[Any]) -> None:
    """``q.put()`` every item, then return; a normal exit flushes the feeder thread."""
    for item in items:
        q.put(item)


def produce(
    q: Any,
    tag: int,
    count: int,
    big_every: int = 0,
    big_size: int = 0,
    pause_every: int = 0,
    pause: float = 0.0,
) -> None:
    """Put ``(tag, i, padding)`` for i in 0..count-1; every *big_every*-th item carries
    *big_size* bytes of padding (more than a pipe holds, so its frame arrives in parts).
    Pause *pause* seconds after every *pause_every*-th item, so that consumers wait."""
    big = b"b" * big_size
    for i in range(count):
        q.put((tag, i, big if big_every and i % big_every == big_every - 1 else b""))
        if pause_every and i % pause_every == pause_every - 1:
            time.sleep(pause)


def echo_until_none(q_in: Any, q_out: Any) -> None:
    """Put back on *q_out* every item got from *q_in*, the final ``None`` included."""
    while True:
        item = q_in.get()
        q_out.put(item)
        if item is None:
            return


def consume_until_none(
    q: Any, path: str, pause: float = 0.0, stall_every: int = 0, stall: float = 0.0
) -> None:
    """``q.get()`` until ``None``; pickle the list of items before it to *path*.

    With a *pause*, spend that long on each item (a consumer slower than its producer),
    and *stall* seconds on every *stall_every*-th item."""
    got = []
    while True:
        item = q.get()
        if item is None:
            break
        got.append(item)
        if stall_every and len(got) % stall_every == 0:
            time.sleep(stall)
        elif pause:
            time.sleep(pause)
    _report(path, got)


def get_expecting(q: Any, expected: Any, timeout: float) -> None:
    """One ``q.get(timeout=...)``: exit 0 if it returned *expected*, else an error code."""
    try:
        item = q.get(timeout=timeout)
    except queue.Empty:
        sys.exit(NO_ITEM)
    if item != expected:
        sys.exit(WRONG_ITEM)


def get_simple_expecting(q: Any, expected: list[Any], start: Any = None) -> None:
    """``q.get()`` (a ``SimpleQueue``'s, which has no timeout) once per item of *expected*,
    after *start* (an Event) is set if given: exit 0 if they came in that order and the
    queue is empty afterwards. A missing item blocks; the test bounds the wait and kills
    this process."""
    if start is not None and not start.wait(30):
        sys.exit(NO_ITEM)
    for want in expected:
        if q.get() != want:
            sys.exit(WRONG_ITEM)
    if not q.empty():
        sys.exit(WRONG_ITEM)


def get_in_order(q: Any, expected: list[Any], timeout: float, start: Any) -> None:
    """Once *start* (an Event) is set, plain ``q.get()`` once per item of *expected* (with
    *timeout* where the queue has one: a ``SimpleQueue`` has none, and the test bounds the
    wait), marking each done on a ``JoinableQueue``: exit 0 if they came in that order and
    the pipe is empty afterwards, nothing torn left in it. A get stuck inside a torn item
    blocks; the test kills it."""
    if not start.wait(timeout):
        sys.exit(NO_ITEM)
    simple = not hasattr(q, "qsize")
    joinable = hasattr(q, "task_done")
    for want in expected:
        try:
            item = q.get() if simple else q.get(timeout=timeout)
        except queue.Empty:
            sys.exit(NO_ITEM)
        if item != want:
            sys.exit(WRONG_ITEM)
        if joinable:
            q.task_done()
    if not q.empty():
        sys.exit(WRONG_ITEM)


def get_blocking(q: Any, path: str) -> None:
    """One plain blocking ``q.get()`` (it holds the reader lock while the queue is empty);
    pickle ``("ok", item)`` or ``("error", repr(exception))`` to *path*."""
    try:
        result: tuple[str, Any] = ("ok", q.get())
    except BaseException as exc:  # reported to the test, BlockingIOError in particular
        result = ("error", repr(exc))
    _report(path, result)


def task_done_but_hold_the_last(q: Any, count: int, holding: Any, release: Any) -> None:
    """Get *count* items and mark all but the last done; set *holding*, wait for
    *release*, then mark the last one done."""
    for _ in range(count):
        q.get(timeout=30)
    for _ in range(count - 1):
        q.task_done()
    holding.set()
    if not release.wait(30):
        sys.exit(NO_ITEM)
    q.task_done()


def _count_an_item(q: Any) -> None:
    """Take a slot of the queue's item semaphore, as ``Queue.put()`` does for each item
    (the consumer releases it); a ``SimpleQueue`` has none."""
    sem = getattr(q, "_sem", None)
    if sem is not None:
        sem.acquire()


def put_paced(q: Any, items: list[Any], pause: float) -> None:
    """``q.put()`` the items one at a time, *pause* seconds apart: a producer slower than
    its consumers, so that they are all waiting whenever an item arrives."""
    for item in items:
        q.put(item)
        time.sleep(pause)


def write_partial_frame(q: Any, frame_start: bytes) -> None:
    """Write the start of a frame raw into the queue's pipe and die at once, as a
    producer killed in the middle of a ``put`` would."""
    _count_an_item(q)
    fd = q._writer.fileno()
    view = memoryview(frame_start)
    while view:
        view = view[os.write(fd, view) :]
    os._exit(0)


def write_frame_in_two_parts(q: Any, first: bytes, rest: bytes, release: Any) -> None:
    """Write *first* raw into the queue's pipe, wait for *release*, then write *rest*:
    a producer that stalls in the middle of an item and then goes on."""
    _count_an_item(q)
    fd = q._writer.fileno()
    for part in (first, rest):
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]
        if part is first and not release.wait(30):
            sys.exit(NO_ITEM)


def flush_item(i: int, size: int) -> tuple[int, bytes]:
    """Item *i* of :func:`async_put_then_exit`."""
    return i, bytes([i % 256]) * size


def async_put_then_exit(
    q: Any, count: int, size: int, backend: str, uvloop: bool, use_threads: bool
) -> None:
    """In a fresh event loop: ``await put()`` items ``flush_item(i, size)`` for i in
    0..count-1 through an ``AsyncQueue``, then ``aclose()`` it; then leave with
    ``os._exit``, which skips the exit handlers that would otherwise flush the queue.
    Only what ``aclose()`` flushed gets through."""
    import anyio

    from asyncmp import AsyncQueue

    async def main() -> None:
        async with AsyncQueue[Any](q, use_threads=use_threads) as aq:
            for i in range(count):
                await aq.put(flush_item(i, size))

    options: dict[str, Any] = {}
    if uvloop:
        import uvloop as uvloop_module

        options["loop_factory"] = uvloop_module.new_event_loop
    try:
        anyio.run(main, backend=backend, backend_options=options)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(ASYNC_PART_FAILED)
    os._exit(0)


class FailsToUnpickle:
    """Pickles fine; unpickling it raises ValueError (``int("not a number")``)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (int, ("not a number",))
