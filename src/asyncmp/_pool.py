"""open_pool: run functions in worker processes from async code.

Each worker is a plain ``multiprocessing`` process running :func:`_pool_worker.serve`,
with a duplex pipe of its own. In the parent, one task per worker (in the pool's task
group) owns that pipe: it takes the next call from the pool's queue, sends it, and
awaits the reply through an :class:`AsyncConnection`, so no thread waits and nothing
polls. A caller only waits on an ``anyio.Event``.

The invariants that make cancellation lose nothing:

* A worker has at most one request (a :class:`Job`) in flight, and a reply is matched
  to the job that was sent, by id. A job whose caller went away is marked, never
  reused: its reply is dropped when it comes, so it can't reach another caller.
* A job leaves the queue only in the worker task, with no await between checking that
  it is still wanted and marking it sent. A caller that withdraws a queued job only
  flips its state; the worker task skips it.
* A caller's cancellation never awaits anything: it flips the job's state (and, with
  ``kill_on_cancel``, sends SIGKILL), and the worker task does the rest: it sees EOF,
  reaps the process and starts a replacement.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import count
from multiprocessing.reduction import ForkingPickler
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ._connection import AsyncConnection
from ._exceptions import ConnectionEOF
from ._pool_job import ABANDONED, DONE, QUEUED, SENT, WITHDRAWN, Job
from ._pool_map import PoolMap
from ._pool_worker import RemoteTraceback, serve
from ._process import TERMINATE_GRACE, AsyncProcess, WorkerExited, start_with_pipe
from ._wire import dumps

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:
    from typing_extensions import TypeVar

# run() checks its extra positional arguments against fn's parameters. ParamSpec can't do
# that here: P.args needs P.kwargs beside it, and run() takes the keyword-only option
# kill_on_cancel instead (fn's keyword arguments are not passed on). A TypeVarTuple can,
# as for open_process(); it is in typing from 3.11, in typing_extensions for 3.10.
if sys.version_info >= (3, 11):
    from typing import TypeVarTuple, Unpack
else:
    from typing_extensions import TypeVarTuple, Unpack

__all__ = ("Pool", "PoolStatistics", "open_pool")

Ts = TypeVarTuple("Ts")
R = TypeVar("R")
T = TypeVar("T")

#: How long a worker whose pipe reached EOF may take to exit before it is killed.
_EXIT_WAIT = 1.0
#: The most run() calls sent to a worker in one request, and how long they may take
#: together (on average, judging by the calls so far).
_MAX_BATCH = 32
_BATCH_SECONDS = 0.002


class _Slot:
    """One worker process, its pipe, and what it is doing."""

    __slots__ = ("calls", "conn", "doomed", "jobs", "process")

    def __init__(self, conn: AsyncConnection[Any], process: AsyncProcess) -> None:
        self.conn = conn
        self.process = process
        self.calls = 0  # calls served, chunk items counted one by one
        #: The jobs in flight, in the order the worker runs them: the first one runs.
        self.jobs: deque[Job] = deque()
        self.doomed = False  # killed (kill_on_cancel): it takes no more jobs

    async def exit_code(self) -> int:
        """The exit code of a worker whose pipe reached EOF, once it is reaped."""
        with anyio.move_on_after(_EXIT_WAIT):
            return await self.process.wait()
        self.process.kill()
        return await self.process.wait()


@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of a pool's state, from :meth:`Pool.statistics`.

    Calls of :meth:`Pool.map` count one by one, whether or not they were sent in chunks.
    """

    #: Worker processes running now.
    workers_alive: int
    #: Calls waiting for a worker (withdrawn ones not counted).
    calls_queued: int
    #: Calls sent to a worker whose reply has not come yet (their callers may have gone;
    #: quick calls sent together count from when they were sent).
    calls_running: int
    #: Calls that returned a result.
    calls_done: int
    #: Calls that raised, including those whose worker died.
    calls_failed: int
    #: Workers started to replace one that died, was killed or retired.
    workers_replaced: int


class Pool:
    """A pool of worker processes, from :func:`open_pool`.

    Its methods belong to the event loop that opened the pool; :meth:`statistics` may be
    called from anywhere in that thread.
    """

    def __init__(
        self,
        processes: int,
        context: Any,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        max_tasks_per_child: int | None,
    ) -> None:
        self._processes = processes
        self._context = context
        self._initializer = initializer
        self._initargs = initargs
        self._max_tasks_per_child = max_tasks_per_child
        self._ids = count()
        self._queue: deque[Job] = deque()
        self._idle: deque[anyio.Event] = deque()  # one per worker task waiting for a job
        self._slots: set[_Slot] = set()
        self._ready = 0
        self._all_ready = anyio.Event()
        self._closed = False
        self._broken: tuple[str, BaseException | None] | None = None
        self._queued = self._running = self._done = self._failed = self._replaced = 0
        #: How long a run() call takes in a worker, on average lately; 0 until known.
        self._call_seconds = 0.0

    @property
    def processes(self) -> int:
        """The number of worker processes."""
        return self._processes

    @property
    def max_tasks_per_child(self) -> int | None:
        """The calls after which a worker is replaced, or ``None``."""
        return self._max_tasks_per_child

    # -- the callers' side -----------------------------------------------------------

    async def run(
        self,
        fn: Callable[[Unpack[Ts]], R],
        *args: Unpack[Ts],
        kill_on_cancel: bool = False,
    ) -> R:
        """Call ``fn(*args)`` in a worker process and return its result.

        *fn* and *args* are pickled here, before anything is queued; the result is
        pickled in the worker. Calls wait for a free worker first come, first served.
        While calls are quick (well under a millisecond), a free worker takes several
        queued ones at once, to save round trips; they count as running from then on.

        If cancelled before a worker took the call, the call is withdrawn and never runs.
        If cancelled once a worker took it, ``run()`` returns at once all the same: by
        default the call goes on in its worker and its result is thrown away when it
        comes (it never reaches another caller); with ``kill_on_cancel=True`` the worker
        is killed (SIGKILL) at once, then reaped and replaced by the pool (such a call is
        always sent alone, so no other call dies with it).

        :raises Exception: what ``fn`` raised, same type and message, with the worker's
            traceback attached as its ``__cause__`` (a :class:`RemoteTraceback`). An
            exception that can't be sent back becomes a ``pickle.PicklingError`` naming it.
        :raises pickle.PicklingError: (or what pickling raises) *fn* or an argument can't
            be pickled: nothing was sent. A result that can't be pickled raises
            ``pickle.PicklingError`` for this call only.
        :raises WorkerExited: the worker died while running the call (its ``exitcode``
            says how); the pool has started a replacement.
        :raises anyio.ClosedResourceError: the pool is closed, or was closed meanwhile.
        :raises anyio.BrokenResourceError: no worker could be started (the initializer
            raised, or a worker died before it was ready).
        """
        self._check_usable()
        done = anyio.Event()
        job = Job(next(self._ids), 1, lambda _: done.set())
        job.payload = dumps((job.id, fn, [args]))
        job.fn, job.arglist = fn, [args]
        job.batchable = not kill_on_cancel
        self._enqueue(job)
        try:
            await done.wait()
        except BaseException:
            self._withdraw(job, kill=kill_on_cancel)
            raise
        return job.outcome(0)  # type: ignore[no-any-return]

    def map(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T] | AsyncIterable[T],
        *,
        ordered: bool = True,
    ) -> PoolMap[R]:
        """Call ``fn(item)`` in the workers for each item of *iterable*; iterate over the
        results.

        *iterable* may be sync or async. Items are taken only as results are consumed (a
        few chunks ahead per worker), so an endless iterable works. Calls go to the
        workers in chunks that grow while calls finish quickly (aiming at tens of
        milliseconds per chunk), which keeps tiny calls cheap. With ``ordered=True`` the
        results come in the order of the items; with ``ordered=False`` as they finish.

        Leaving the ``async for`` early (``break``, an exception, a cancellation) stops
        the map once the iterator is dropped, or at once with ``await it.aclose()`` or
        ``async with pool.map(...) as it:`` (see :class:`PoolMap`):
        calls not yet sent are withdrawn, and the results of those running are thrown
        away. A cancelled step consumed nothing: the next one returns the same result.

        :raises Exception: what ``fn`` raised for an item, at that item's place (when it
            is reached, with ``ordered=False``), as :meth:`run` raises it; the map stops.
            Also :class:`WorkerExited` (for the first item of the chunk the worker was
            running), and the pickling errors of :meth:`run`, for that item.
        :raises anyio.ClosedResourceError: the pool is closed.
        """
        self._check_usable()
        return PoolMap(self, fn, iterable, ordered)

    def statistics(self) -> PoolStatistics:
        """Return a snapshot of the pool's workers and calls. It may be called outside
        the pool's block, before or after."""
        return PoolStatistics(
            workers_alive=len(self._slots),
            calls_queued=self._queued,
            calls_running=self._running,
            calls_done=self._done,
            calls_failed=self._failed,
            workers_replaced=self._replaced,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<asyncmp.Pool {state} processes={self._processes}>"

    # -- the queue (shared with PoolMap) ---------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("the pool is closed")
        if self._broken is not None:
            raise self._broken_error()

    def _broken_error(self) -> BaseException:
        assert self._broken is not None
        message, cause = self._broken
        error = anyio.BrokenResourceError(message)
        error.__cause__ = cause
        return error

    def _new_job(self, fn: Callable[..., object], arglist: list[Any], deliver: Any) -> Job:
        """A job for *arglist*, pickled; raises what pickling raises."""
        job = Job(next(self._ids), len(arglist), deliver)
        job.payload = dumps((job.id, fn, arglist))
        job.fn, job.arglist = fn, arglist
        return job

    def _enqueue(self, job: Job) -> None:
        self._check_usable()
        self._queue.append(job)
        self._queued += job.size
        if self._idle:
            self._idle.popleft().set()

    def _withdraw(self, job: Job, *, kill: bool = False) -> None:
        """The caller no longer wants *job*. Never awaits: it may run in a cancelled
        task, or from a finalizer."""
        if job.state == QUEUED:
            job.state = WITHDRAWN
            self._queued -= job.left
        elif job.state == SENT:
            job.state = ABANDONED
            slot = job.slot
            if kill and slot is not None:
                slot.doomed = True
                slot.process.kill()

    def _complete(self, job: Job) -> None:
        """The part of *job* in flight ended (replied, or failed with ``job.error``).

        If calls of the job are left (it was cut at a worker's ``max_tasks_per_child``)
        and it is still wanted, it goes back to the front of the queue for the rest.
        """
        part = job.part
        rest = job.left - part  # calls not sent yet, still counted as queued
        self._running -= part
        if job.error is not None:
            failed = part + (rest if job.state == SENT else 0)
            self._failed += failed
            self._queued -= rest
        else:
            start = job.offset
            failed = sum(1 for i in job.errors or () if start <= i < start + part)
            self._failed += failed
            self._done += part - failed
            job.offset += part
            job.part = 0
            if rest:
                if job.state == SENT:
                    job.state = QUEUED
                    job.slot = None
                    self._queue.appendleft(job)
                    if self._idle:
                        self._idle.popleft().set()
                    return
                self._queued -= rest  # abandoned: the rest never runs
        job.payload = b""  # the arguments may be large: don't keep them
        job.fn, job.arglist = None, []
        if job.state == SENT:
            job.state = DONE
            job.deliver(job)

    def _fail_queued(self, error: Callable[[], BaseException]) -> None:
        while self._queue:
            job = self._queue.popleft()
            if job.state == QUEUED:
                self._queued -= job.left
                self._failed += job.left
                job.state = DONE
                job.error = error()
                job.deliver(job)

    def _break(self, message: str, cause: BaseException | None) -> None:
        if self._broken is None:
            self._broken = (message, cause)
        self._fail_queued(self._broken_error)
        self._all_ready.set()

    def _close(self) -> None:
        self._closed = True
        self._fail_queued(lambda: anyio.ClosedResourceError("the pool was closed"))

    # -- the workers' side -----------------------------------------------------------

    def _start_worker(self) -> _Slot:
        conn, process = start_with_pipe(
            self._context, serve, (self._initializer, self._initargs), name="asyncmp-pool-worker"
        )
        slot = _Slot(conn, process)
        self._slots.add(slot)
        return slot

    async def _worker_task(self, slot: _Slot) -> None:
        """Serve with one worker after another, until the pool closes or breaks."""
        while True:
            try:
                await self._serve(slot)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._retire(slot)
            if self._closed or self._broken is not None:
                return
            try:
                slot = self._start_worker()
            except Exception as exc:
                self._break(f"could not start a replacement worker: {exc!r}", exc)
                return
            self._replaced += 1

    async def _serve(self, slot: _Slot) -> None:
        """Wait for the worker to be ready, then run jobs until it must be retired."""
        try:
            hello = ForkingPickler.loads(await slot.conn.recv_bytes())
        except ConnectionEOF:
            exited = WorkerExited(await slot.exit_code())
            self._break(f"a pool worker ended before it was ready: {exited}", exited)
            return
        if hello[0] == "init-failed":
            exc, text = hello[1]
            exc.__cause__ = RemoteTraceback(text)
            self._break(f"the pool's initializer failed in a worker: {exc!r}", exc)
            return
        self._ready += 1
        if self._ready >= self._processes:
            self._all_ready.set()
        limit = self._max_tasks_per_child
        while not slot.doomed and (limit is None or slot.calls < limit):
            job = await self._next_job()
            # No await between the check in _next_job() and this: the jobs are ours.
            quota = None if limit is None else limit - slot.calls
            batch = self._batch(job, quota)
            for job in batch:
                job.state = SENT
                job.slot = slot
                job.part = job.left
                if quota is not None:
                    # Exactly max_tasks_per_child calls per worker: a bigger job is cut,
                    # and the rest goes back to the queue when this part is answered.
                    job.part = min(job.part, quota)
                    quota -= job.part
                self._queued -= job.part
                self._running += job.part
            slot.jobs.extend(batch)
            if len(batch) == 1:
                job = batch[0]
                if job.part == job.size:
                    payload = job.payload
                else:
                    arglist = job.arglist[job.offset : job.offset + job.part]
                    payload = dumps((job.id, job.fn, arglist))
            else:
                payload = dumps(("batch", [bytes(job.payload) for job in batch]))
            started = anyio.current_time()
            try:
                await slot.conn.send_bytes(payload)
                while slot.jobs:
                    reply = await slot.conn.recv_bytes()
                    job = slot.jobs.popleft()
                    job.elapsed += anyio.current_time() - started
                    slot.calls += job.part
                    job.read_reply(reply)
                    self._complete(job)
            except (ConnectionEOF, anyio.BrokenResourceError):
                self._worker_died(slot, await slot.exit_code())
                return
            if batch[0].batchable:
                per_call = (anyio.current_time() - started) / len(batch)
                self._call_seconds = 0.75 * self._call_seconds + 0.25 * per_call

    def _batch(self, first: Job, quota: int | None) -> list[Job]:
        """*first*, and queued run() calls to send along with it while calls are quick.

        Calls sent together wait for each other in the worker, so this only happens
        while calls take less than ``_BATCH_SECONDS / _MAX_BATCH`` on average, up to
        ``_MAX_BATCH`` of them; a call with ``kill_on_cancel`` is always sent alone, so
        killing its worker ends no other call.
        """
        batch = [first]
        if not first.batchable or not self._call_seconds:
            return batch
        size = min(_MAX_BATCH, int(_BATCH_SECONDS / self._call_seconds))
        if quota is not None:
            size = min(size, quota)
        queue = self._queue
        while len(batch) < size and queue:
            job = queue[0]
            if job.state != QUEUED:
                queue.popleft()
            elif job.batchable:
                batch.append(queue.popleft())
            else:
                break
        return batch

    def _worker_died(self, slot: _Slot, exitcode: int) -> None:
        """The first job in flight was running: it fails. The others never started: back
        to the front of the queue (or gone, if their callers went away)."""
        jobs, slot.jobs = slot.jobs, deque()
        first = jobs.popleft()
        first.error = WorkerExited(exitcode)
        self._complete(first)
        for job in reversed(jobs):
            self._running -= job.part
            if job.state == SENT:
                job.state = QUEUED
                job.slot = None
                self._queued += job.part
                job.part = 0
                self._queue.appendleft(job)
                if self._idle:
                    self._idle.popleft().set()

    async def _next_job(self) -> Job:
        while True:
            while self._queue:
                job = self._queue.popleft()
                if job.state == QUEUED:
                    return job
            wakeup = anyio.Event()
            self._idle.append(wakeup)
            try:
                await wakeup.wait()
            finally:
                if not wakeup.is_set():
                    self._idle.remove(wakeup)
                elif self._idle and self._queue:
                    # Woken, then cancelled: pass the wake-up on.
                    self._idle.popleft().set()

    async def _retire(self, slot: _Slot) -> None:
        """Stop the worker and reap it (shielded by the caller)."""
        self._slots.discard(slot)
        jobs, slot.jobs = slot.jobs, deque()
        for job in jobs:
            job.error = anyio.ClosedResourceError("the pool was closed while the call ran")
            self._complete(job)
        slot.conn.close()  # the stop request: an idle worker sees EOF and returns
        if not jobs and not slot.doomed:
            with anyio.move_on_after(TERMINATE_GRACE):
                await slot.process.wait()
        await slot.process.stop()
        slot.process.close()


@asynccontextmanager
async def open_pool(
    processes: int | None = None,
    *,
    context: Any = None,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks_per_child: int | None = None,
) -> AsyncIterator[Pool]:
    """Run a pool of *processes* worker processes for the duration of the block.

    Each worker is a process of *context* (a ``multiprocessing`` context: fork, spawn
    or forkserver; the default context if ``None``) that runs ``initializer(*initargs)``
    once, then the calls it is given. ``processes=None`` means ``os.cpu_count()``. With
    *max_tasks_per_child*, a worker is replaced after that many calls.

    Entering starts the workers and waits until each has run its initializer. Leaving
    the block, normally, by an exception or a cancellation, fails calls still queued
    with ``anyio.ClosedResourceError``, asks idle workers to stop, terminates busy ones,
    kills any that don't end within a grace, and reaps them all before the block exits.
    Leaving is shielded: a cancellation can't leave a worker behind.

    A worker that dies is replaced; the call it ran raises :class:`WorkerExited`. A
    failing initializer is not retried: it breaks the pool (see below).

    Workers ignore SIGINT (set before the initializer runs): the pool owns their lives.
    A Ctrl-C in a terminal reaches the whole process group; it interrupts the parent,
    whose block exit then stops the workers, instead of ending running calls in the
    workers with ``KeyboardInterrupt`` tracebacks.

    :raises ValueError: *processes* or *max_tasks_per_child* is below 1.
    :raises anyio.BrokenResourceError: on entering, a worker's initializer raised (its
        exception, with the worker's traceback, is the ``__cause__``) or a worker died
        before it was ready. If that happens to a replacement later, queued and later
        calls raise it instead.
    :raises OSError: (or what ``Process.start()`` raises) a worker could not start.
    """
    if processes is None:
        processes = os.cpu_count() or 1
    if processes < 1:
        raise ValueError(f"processes={processes} must be at least 1")
    if max_tasks_per_child is not None and max_tasks_per_child < 1:
        raise ValueError(f"max_tasks_per_child={max_tasks_per_child} must be at least 1 or None")
    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer={initializer!r} is not callable")
    ctx = context if context is not None else multiprocessing.get_context()
    pool = Pool(processes, ctx, initializer, tuple(initargs), max_tasks_per_child)
    # What the block or the start-up raised is re-raised after the task group has
    # ended, not inside it, so that it comes out as itself, not in an exception group.
    failure: BaseException | None = None
    tg: TaskGroup
    async with anyio.create_task_group() as tg:
        try:
            try:
                for _ in range(processes):
                    tg.start_soon(pool._worker_task, pool._start_worker())
                await pool._all_ready.wait()
                if pool._broken is not None:
                    failure = pool._broken_error()
                else:
                    yield pool
            except BaseException as exc:
                failure = exc
        finally:
            pool._close()
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
