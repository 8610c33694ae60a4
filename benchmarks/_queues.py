"""The Queue benchmarks: producer processes, the consumers, and the idle-CPU probe.

One ``multiprocessing.Queue`` (fork context) and aioprocessing's ``AioQueue``, which
wraps a queue of its own, are created before four producer processes are forked once
for the whole run; every trial drains exactly the items its producers put, so the
queues are empty between trials. The parent drives each producer over a control pipe
and waits for its acknowledgement after the trial, as with the connection worker.

Producer commands, ``(kind, queue, count, obj)``:

* ``put``: ``q.put(obj)`` *count* times; the producer's feeder thread writes them.
* ``fill``: the same frames the feeder writes, pre-framed and written raw in batches of
  about 100 KiB, taking the item semaphore per item and the write lock per batch, as
  ``put()`` and the feeder do. The consumer alone sets the pace.
* ``hold``: take the reader lock and keep it until told ``("release",)``.
* ``hold_get``: ``Queue.get()``'s own steps (take the reader lock, block reading one
  item, release the item semaphore and the lock), with a message to the parent once the
  lock is held: a sync consumer blocked in ``get()`` on an empty queue, at a known time.

Teardown (:meth:`QueueProducers.close`) sends each producer ``stop``, closes the control
pipes and joins, terminating a producer that does not exit in time (one blocked writing
into a full pipe after a Ctrl-C). Producers ignore SIGINT and never wait at exit for a
feeder thread whose items nobody will read (``cancel_join_thread()``).

The asyncmp consumers create an ``AsyncQueue`` per trial and ``aclose()`` it, which,
as documented, closes the queue *in this process* (``Queue.close()``: nothing but a flag
here, since the parent never puts); :meth:`QueueSource.reopen` clears that flag so the
next contender can use the same queue.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import queue
import signal
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from importlib.util import find_spec
from multiprocessing.reduction import ForkingPickler
from typing import Any

import anyio
import anyio.to_thread
from _cases import (
    Contender,
    Impl,
    Timing,
    check,
    on,
    since,
    start_timing,
    time_awaits,
    time_calls,
)
from _worker import serve

__all__ = (
    "AIO_KEY",
    "GET_MANY",
    "QUEUE_ITEM",
    "QueueProducers",
    "QueueSource",
    "fanin_contenders",
    "get_contenders",
    "idle_contenders",
    "queue_name",
)

Connection = multiprocessing.connection.Connection
#: (kind, queue name, count, obj): see the module docstring.
QueueCommand = tuple[Any, ...]

#: b"x" * 85 pickles to exactly 100 bytes.
QUEUE_ITEM = b"x" * 85
#: The batch size of the get_many() rows.
GET_MANY = 100
#: The contender that reads aioprocessing's own queue.
AIO_KEY = "aioprocessing-asyncio"
#: The producers the idle probe uses: one holds the reader lock, the other puts.
BLOCKER, PUTTER = 0, 1

_HEADER = struct.Struct("!i")
#: Frames per raw write for "fill" (about 100 KiB of 100-byte items).
_FRAMES_PER_BATCH = 1024
#: How long the parent waits for a producer's answer before it calls the run broken.
_ANSWER_TIMEOUT = 60.0


def queue_name(c: Contender) -> str:
    """The queue a contender reads: aioprocessing's own, or the shared one."""
    return "aio" if c.key == AIO_KEY else "main"


# ---------------------------------------------------------------------------------------
# The producer processes
# ---------------------------------------------------------------------------------------


def _fill(q: Any, count: int, obj: object) -> None:
    pickled = bytes(ForkingPickler.dumps(obj))
    frame = _HEADER.pack(len(pickled)) + pickled
    fd = q._writer.fileno()
    sem, wlock = q._sem, q._wlock
    left = count
    while left:
        k = min(left, _FRAMES_PER_BATCH)
        for _ in range(k):
            if not sem.acquire(False):
                raise RuntimeError("the queue is full")
        view = memoryview(frame * k)
        with wlock:
            while view:
                view = view[os.write(fd, view) :]
        left -= k


def _hold(q: Any, ctrl: Connection) -> None:
    with q._rlock:
        ctrl.send(("holding", None))
        ctrl.recv()  # ("release",)


def _hold_get(q: Any, ctrl: Connection) -> None:
    # Queue.get(block=True, timeout=None), step by step.
    with q._rlock:
        ctrl.send(("holding", None))
        res = q._recv_bytes()
    q._sem.release()
    ForkingPickler.loads(res)


def _run(cmd: QueueCommand, *, ctrl: Connection, queues: dict[str, Any]) -> None:
    kind, name = cmd[0], cmd[1]
    q = queues[name]
    if kind == "put":
        count, obj = cmd[2], cmd[3]
        put = q.put
        for _ in range(count):
            put(obj)
    elif kind == "fill":
        _fill(q, cmd[2], cmd[3])
    elif kind == "hold":
        _hold(q, ctrl)
    elif kind == "hold_get":
        _hold_get(q, ctrl)
    else:
        raise ValueError(f"unknown command {kind!r}")


def _producer_main(ctrl: Connection, queues: dict[str, Any], inherited: list[Connection]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # fork copied the parent's ends of every control pipe made so far (and of the
    # connection worker's); holding them would hide the parent's EOF from their peers.
    for conn in inherited:
        conn.close()
    for q in queues.values():
        q.cancel_join_thread()  # at exit, don't wait to flush items nobody will read
    serve(ctrl, partial(_run, ctrl=ctrl, queues=queues))


@dataclass
class QueueSource:
    """What a queue consumer reads: the shared queue, and aioprocessing's."""

    q: Any  #: the multiprocessing.Queue the producers put into
    aio: Any | None  #: aioprocessing's AioQueue, or None if it is not installed

    def reopen(self) -> None:
        """Undo the ``Queue.close()`` of an ``AsyncQueue.aclose()`` in this process."""
        self.q._closed = False

    def readers(self) -> list[Connection]:
        found = [self.q._reader]
        if self.aio is not None:
            found.append(self.aio._obj._reader)
        return found


def _aio_queue(ctx: Any) -> Any | None:
    if find_spec("aioprocessing") is None:
        return None
    from aioprocessing import AioQueue  # type: ignore[import-untyped]

    return AioQueue(context=ctx)


def _split(count: int, parts: int) -> list[int]:
    share, rest = divmod(count, parts)
    return [share + (i < rest) for i in range(parts)]


class QueueProducers:
    """The parent's handle on the producer processes and the queues they fill."""

    def __init__(self, count: int = 4, inherited: Sequence[Connection] = ()) -> None:
        ctx = multiprocessing.get_context("fork")
        self.source = QueueSource(ctx.Queue(), _aio_queue(ctx))
        queues = {"main": self.source.q}
        if self.source.aio is not None:
            queues["aio"] = self.source.aio._obj
        self._ctrls: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        try:
            for i in range(count):
                ours, theirs = ctx.Pipe()
                self._ctrls.append(ours)
                process = ctx.Process(
                    target=_producer_main,
                    args=(theirs, queues, [*inherited, *self._ctrls]),
                    name=f"asyncmp-bench-producer-{i}",
                    daemon=True,
                )
                try:
                    process.start()
                finally:
                    theirs.close()
                self._processes.append(process)
        except BaseException:
            self.close()
            raise

    @property
    def count(self) -> int:
        return len(self._processes)

    def send(self, i: int, cmd: QueueCommand) -> None:
        self._ctrls[i].send(cmd)

    def expect(self, i: int, status: str = "done") -> None:
        """Wait for producer *i*'s next message and check that it says *status*."""
        conn = self._ctrls[i]
        if not conn.poll(_ANSWER_TIMEOUT):
            raise RuntimeError(f"producer {i} did not answer within {_ANSWER_TIMEOUT} s")
        got, detail = conn.recv()
        if got != status:
            raise RuntimeError(f"producer {i}: expected {status!r}, got {got!r}: {detail}")

    async def expect_async(self, i: int, status: str = "done") -> None:
        """:meth:`expect`, letting the event loop run meanwhile."""
        await _until(self._ctrls[i].poll, f"an answer from producer {i}")
        self.expect(i, status)

    def trial(
        self, cmd: QueueCommand, producers: int, consume: Callable[[QueueSource], Timing]
    ) -> Timing:
        """Have *producers* of them share ``cmd``'s count, and consume meanwhile."""
        kind, name, count, obj = cmd
        shares = _split(count, producers)
        for i, share in enumerate(shares):
            self.send(i, (kind, name, share, obj))
        timing = consume(self.source)
        for i in range(producers):
            self.expect(i)
        return timing

    def close(self) -> None:
        """Stop the producers and reap them. Safe to call more than once, and after Ctrl-C."""
        for conn in self._ctrls:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
            conn.close()
        # An idle producer exits at once. One blocked on the queue (writing into a full
        # pipe, or reading an empty one in "hold_get") after a Ctrl-C never will, and
        # holds nothing worth waiting for.
        deadline = time.monotonic() + 0.5
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process in self._processes:
            process.join(5.0)
            if process.is_alive():  # pragma: no cover - last resort
                process.kill()
                process.join()
        self._processes.clear()
        self._ctrls.clear()
        for reader in self.source.readers():
            reader.close()
        self.source.q._writer.close()
        if self.source.aio is not None:
            self.source.aio._obj._writer.close()


async def _until(ready: Callable[[], bool], what: str) -> None:
    """Poll *ready* with the loop running. Outside every timed window, so polling costs
    nothing measured; handing the descriptors to the loop instead could set O_NONBLOCK
    on them (uvloop does), and the queue's pipe is shared."""
    try:
        with anyio.fail_after(_ANSWER_TIMEOUT):
            while not ready():  # noqa: ASYNC110 (see above)
                await anyio.sleep(0.001)
    except TimeoutError:
        raise RuntimeError(f"no sign of {what} within {_ANSWER_TIMEOUT} s") from None


# ---------------------------------------------------------------------------------------
# 4a-c. Throughput: get() of ~100-byte pickles
# ---------------------------------------------------------------------------------------


def _sync_get(src: QueueSource, n: int, expected: object) -> Timing:
    elapsed, last = time_calls(n, src.q.get)
    check(last, expected)
    return elapsed


async def _asyncmp_get(cls: type[Any], src: QueueSource, n: int, expected: object) -> Timing:
    aq = cls(src.q)
    try:
        elapsed, last = await time_awaits(n, aq.get)
    finally:
        await aq.aclose()
        src.reopen()
    check(last, expected)
    return elapsed


async def _asyncmp_get_many(cls: type[Any], src: QueueSource, n: int, expected: object) -> Timing:
    aq = cls(src.q)
    try:
        await aq.get()
        get_many = aq.get_many
        left = n
        t0 = start_timing()
        while left:
            items = await get_many(min(GET_MANY, left))
            left -= len(items)
        elapsed = since(t0)
    finally:
        await aq.aclose()
        src.reopen()
    check(items[-1], expected)
    return elapsed


async def _executor_get(src: QueueSource, n: int, expected: object) -> Timing:
    loop = asyncio.get_running_loop()
    elapsed, last = await time_awaits(n, loop.run_in_executor, None, src.q.get)
    check(last, expected)
    return elapsed


async def _to_thread_get(src: QueueSource, n: int, expected: object) -> Timing:
    elapsed, last = await time_awaits(n, anyio.to_thread.run_sync, src.q.get)
    check(last, expected)
    return elapsed


async def _aioprocessing_get(src: QueueSource, n: int, expected: object) -> Timing:
    aio = src.aio
    assert aio is not None
    try:
        elapsed, last = await time_awaits(n, aio.coro_get)
    finally:
        # The AioQueue lives for the whole run; its thread pool, for one trial.
        executor = aio.__dict__.pop("_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
    check(last, expected)
    return elapsed


def _asyncmp_rows(
    impls: tuple[Impl, ...],
    backends: tuple[str, ...],
    get_many: bool,
) -> list[Contender]:
    found: list[Contender] = []
    for impl in impls:
        if impl.queue_cls is None:
            continue
        family = impl.family
        for b in backends:
            found.append(
                Contender(
                    f"{impl.name}-{b}",
                    f"{impl.name} get() [{b}]",
                    b,
                    on(b, partial(_asyncmp_get, impl.queue_cls)),
                    family,
                )
            )
        if get_many:
            found += [
                Contender(
                    f"{impl.name}-get_many-{b}",
                    f"{impl.name} get_many({GET_MANY}) [{b}]",
                    b,
                    on(b, partial(_asyncmp_get_many, impl.queue_cls)),
                    family,
                )
                for b in backends
            ]
    return found


def get_contenders(
    backends: tuple[str, ...], impls: tuple[Impl, ...], with_aioprocessing: bool
) -> list[Contender]:
    """Contenders for get throughput from one producer (4a, 4b).

    The sync loop and ``run_in_executor`` always run; the others when their event loop
    is among *backends*.
    """
    found = [Contender("sync", "sync q.get() loop", None, _sync_get, "sync")]
    found += _asyncmp_rows(impls, backends, get_many=True)
    found.append(
        Contender(
            "executor-asyncio",
            "run_in_executor(q.get) [asyncio]",
            "asyncio",
            on("asyncio", _executor_get),
            "thread",
        )
    )
    found += [
        Contender(
            f"to_thread-{b}",
            f"anyio.to_thread.run_sync(q.get) [{b}]",
            b,
            on(b, _to_thread_get),
            "thread",
        )
        for b in ("asyncio", "trio")
        if b in backends
    ]
    if with_aioprocessing and "asyncio" in backends:
        found.append(
            Contender(
                AIO_KEY,
                "aioprocessing AioQueue.coro_get() [asyncio]",
                "asyncio",
                on("asyncio", _aioprocessing_get),
                "thread",
            )
        )
    return found


def fanin_contenders(backends: tuple[str, ...], impls: tuple[Impl, ...]) -> list[Contender]:
    """Contenders for fan-in from four producers (4c): asyncmp against the sync loop."""
    found = [Contender("sync", "sync q.get() loop", None, _sync_get, "sync")]
    return found + _asyncmp_rows(impls, backends, get_many=True)


# ---------------------------------------------------------------------------------------
# 4d. Idle CPU while a get() waits and another process holds the reader lock
# ---------------------------------------------------------------------------------------
# An idle consumer is "source=QueueProducers, n=1, arg=window seconds".


def _sync_idle(producers: QueueProducers, n: int, window: float) -> Timing:
    q = producers.source.q
    producers.send(BLOCKER, ("hold_get", "main"))
    producers.expect(BLOCKER, "holding")
    t0 = start_timing()
    try:
        q.get(timeout=window)
    except queue.Empty:
        pass
    else:
        raise AssertionError("got an item while another process held the reader lock")
    elapsed = since(t0)
    producers.send(PUTTER, ("put", "main", 1, QUEUE_ITEM))  # for the blocked consumer
    producers.expect(PUTTER)
    producers.expect(BLOCKER)
    return elapsed


async def _contend(aq: Any, producers: QueueProducers) -> None:
    """Put *aq* in the state it keeps once it has found the reader lock held by another
    consumer: from then on a get() queues for the lock (in a thread, as a sync consumer
    does in the kernel) before it waits for data."""
    producers.send(BLOCKER, ("hold", "main"))
    await producers.expect_async(BLOCKER, "holding")
    producers.send(PUTTER, ("put", "main", 1, QUEUE_ITEM))
    await producers.expect_async(PUTTER)
    reader = producers.source.q._reader
    await _until(reader.poll, "the item in the queue's pipe")  # the feeder writes it
    got: list[object] = []

    async def get() -> None:
        got.append(await aq.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(get)
        # Data is there and the lock is held: the get is now queued for the lock.
        await anyio.wait_all_tasks_blocked()
        producers.send(BLOCKER, ("release",))
    await producers.expect_async(BLOCKER)
    check(got, [QUEUE_ITEM])


async def _asyncmp_idle(
    cls: type[Any], contended: bool, producers: QueueProducers, n: int, window: float
) -> Timing:
    src = producers.source
    aq = cls(src.q)
    try:
        if contended:
            await _contend(aq, producers)
        producers.send(BLOCKER, ("hold_get", "main"))
        await producers.expect_async(BLOCKER, "holding")
        got: list[object] = []

        async def get() -> None:
            got.append(await aq.get())

        with anyio.fail_after(window + _ANSWER_TIMEOUT):
            async with anyio.create_task_group() as tg:
                t0 = start_timing()
                tg.start_soon(get)
                await anyio.sleep(window)
                elapsed = since(t0)
                # Two items: the blocked sync consumer takes the first, the getter the second.
                producers.send(PUTTER, ("put", "main", 2, QUEUE_ITEM))
        producers.expect(PUTTER)
        producers.expect(BLOCKER)
    finally:
        await aq.aclose()
        src.reopen()
    check(got, [QUEUE_ITEM])
    return elapsed


def idle_contenders(backends: tuple[str, ...], impls: tuple[Impl, ...]) -> list[Contender]:
    """The idle probe's rows: a sync reference, then asyncmp in both of its states."""
    found = [
        Contender(
            "sync",
            "sync q.get(timeout=...), blocked on the lock (reference)",
            None,
            _sync_idle,
            "sync",
        )
    ]
    for impl in impls:
        if impl.queue_cls is None:
            continue
        family = impl.family
        for contended, state, what in (
            (False, "fresh", "new adapter: waits for data"),
            (True, "contended", "after contention: queued for the lock"),
        ):
            found += [
                Contender(
                    f"{impl.name}-{state}-{b}",
                    f"{impl.name} get(), {what} [{b}]",
                    b,
                    on(b, partial(_asyncmp_idle, impl.queue_cls, contended)),
                    family,
                )
                for b in backends
            ]
    return found
