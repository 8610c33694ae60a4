"""open_pool: run functions in worker processes from async code.

Each worker is a plain ``multiprocessing`` process running :func:`_pool_worker.serve`,
with a duplex pipe of its own. In the parent, one task per worker (in the pool's task
group) owns that pipe: it takes the next call from the pool's queue, sends it, and
awaits the reply through an :class:`AsyncConnection`, so no thread waits and nothing
polls. A caller only waits on a one-shot wake-up (``anyio.Event``, made cheaper).

While calls are quick, the worker task sends several in one request, and one request
ahead while the worker runs the one before (a pipeline two deep), so the worker finds
its next calls waiting. Quickness is judged by the time calls take in the worker, which
reports it with each reply, not by the round trip.

The invariants that make cancellation lose nothing:

* A worker runs the jobs (:class:`Job`) sent to it in order and answers each in turn;
  a reply is matched to the first job in flight, by id. A job whose caller went away
  is marked, never reused: its reply is dropped when it comes, so it can't reach
  another caller. If the worker dies, the replies it sent are read first: the first
  job left unanswered is the one it was running, the ones after it go back to the
  queue.
* A ``kill_on_cancel`` job is sent only to a worker with nothing in flight, and
  nothing is sent after it until it is answered: killing that worker ends no other
  call.
* A job leaves the queue only in the worker task, with no await between checking that
  it is still wanted and marking it sent. A caller that withdraws a queued job only
  flips its state; the worker task skips it.
* A caller's cancellation never awaits anything: it flips the job's state (and, with
  ``kill_on_cancel``, sends SIGKILL), and the worker task does the rest: it sees EOF,
  reaps the process and starts a replacement.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import sys
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import count
from multiprocessing.reduction import ForkingPickler
from time import perf_counter
from types import BuiltinFunctionType, FunctionType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ._connection import AsyncConnection
from ._exceptions import ConnectionEOF
from ._loop import new_wakeup
from ._mpinternals import forking_dispatch_table
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
#: Requests in flight per worker while calls are quick: the worker finds the next one
#: waiting when it is done with one. One sent ahead has at most _PIPELINE_BYTES, so it
#: fits in the pipe's buffer without the worker reading it: the worker task never waits
#: to send while the worker waits for it to read replies.
_PIPELINE = 2
_PIPELINE_BYTES = 4096
#: The most functions whose pickles a pool keeps (see Pool._request).
_FN_CACHE = 256


class _Request:
    """A request in flight: how many of its jobs are not answered yet."""

    __slots__ = ("batchable", "calls", "jobs", "seconds", "sent")

    def __init__(self, batch: list[Job], sent: float) -> None:
        self.jobs = len(batch)
        self.calls = sum(job.part for job in batch)
        self.sent = sent
        self.batchable = batch[0].batchable
        self.seconds = 0.0  # the time its jobs took in the worker, so far


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
        #: Plain functions -> their pickles (references to them by name).
        self._fn_pickles: dict[Callable[..., Any], bytes] = {}

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
        While calls are quick (well under a millisecond in the worker), a worker takes
        several queued ones at once, and takes the next ones while it still runs those,
        to save round trips; they count as running from then on.

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
        done = new_wakeup()
        job = Job(next(self._ids), 1, lambda _: done.set())
        job.payload = self._request(job.id, fn, [args])
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
        milliseconds per chunk), which keeps tiny calls cheap. Bytes bound them too: a
        chunk holds about 4 MiB of arguments at most (their pickles, with the shared
        memory of ``shared()`` objects, and results that are ``shared()`` objects), and
        the map takes items ahead of the consumer only while it holds less than 16 MiB
        (one call more at most, or one chunk per worker if that is more), so a map over
        ``shared()`` arrays fits a small ``/dev/shm``. Each item is pickled once. With
        ``ordered=True`` the results come in the order of the items; with
        ``ordered=False`` as they finish. A result already there is returned without a
        trip through the event loop, but the loop gets a turn about every millisecond.

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

    def _new_job(
        self,
        fn: Callable[..., object],
        arglist: list[Any],
        deliver: Any,
        *,
        pickled: bool = False,
    ) -> Job:
        """A job for *arglist* (with *pickled*, the pickles of its entries, from
        :meth:`_dumps`), pickled; raises what pickling raises."""
        job = Job(next(self._ids), len(arglist), deliver)
        job.payload = self._request(job.id, fn, arglist, pickled)
        job.fn, job.arglist, job.pickled = fn, arglist, pickled
        return job

    def _request(
        self, job_id: int, fn: Callable[..., object], arglist: list[Any], pickled: bool = False
    ) -> bytes:
        """The pickle of a job's request (see ``_pool_worker``); raises what pickling
        raises.

        A plain function pickles as a reference by name, the same each time: its pickle
        is made once and sent as bytes, which the worker unpickles. The request itself
        pickles as a ``ForkingPickler`` would, without making one per call.
        """
        if type(fn) is FunctionType or type(fn) is BuiltinFunctionType:
            ref = self._fn_pickles.get(fn)
            if ref is None:
                ref = dumps(fn)
                if len(self._fn_pickles) >= _FN_CACHE:
                    self._fn_pickles.clear()
                self._fn_pickles[fn] = ref
            request: tuple[Any, ...] = (job_id, ref, arglist, pickled)
        else:
            request = (job_id, fn, arglist, pickled)
        return self._dumps(request)

    @staticmethod
    def _dumps(obj: Any) -> bytes:
        """*obj* pickled as a ``ForkingPickler`` would, without making one per call."""
        table = forking_dispatch_table()
        if table is None:
            return dumps(obj)
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf)
        pickler.dispatch_table = table
        pickler.dump(obj)
        return buf.getvalue()

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
            job.discard_unsent(job.offset)
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
        start = job.offset
        rest = job.size - start - part  # calls not sent yet, still counted as queued
        self._running -= part
        if job.error is not None:
            failed = part + (rest if job.state == SENT else 0)
            self._failed += failed
            self._queued -= rest
            job.discard_unsent(start + part)
        else:
            failed = 0
            if job.errors:
                failed = sum(1 for i in job.errors if start <= i < start + part)
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
                job.discard_unsent(job.offset)
        job.payload = b""  # the arguments may be large: don't keep them
        job.fn, job.arglist, job.made = None, [], None
        if job.state == SENT:
            job.state = DONE
            job.deliver(job)

    def _fail_queued(self, error: Callable[[], BaseException]) -> None:
        while self._queue:
            job = self._queue.popleft()
            if job.state == QUEUED:
                self._queued -= job.left
                self._failed += job.left
                job.discard_unsent(job.offset)
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
        # The requests in flight, oldest first. The worker answers them in order, job by
        # job, and slot.jobs holds their jobs in that order.
        requests: deque[_Request] = deque()
        in_flight = 0  # calls sent and not answered
        broken = False  # a send found the worker gone
        try:
            while True:
                # Top up: a first request (waiting for a job if none is queued), then
                # while calls are quick one more, to run after it (see _batch).
                quota = None if limit is None else limit - slot.calls - in_flight
                if not requests:
                    if slot.doomed or quota == 0:
                        return
                    batch = self._batch(await self._next_job(), quota)
                elif (
                    len(requests) < _PIPELINE
                    and requests[-1].batchable
                    and not slot.doomed
                    and not broken
                ):
                    batch = self._batch(None, quota)
                else:
                    batch = []
                if batch:
                    # No await since the jobs were checked (in _next_job or _batch):
                    # they are ours.
                    payload = self._take(slot, batch, quota)
                    request = _Request(batch, perf_counter())
                    requests.append(request)
                    in_flight += request.calls
                    try:
                        await slot.conn.send_bytes(payload)
                    except anyio.BrokenResourceError:
                        # The worker is gone. Its replies to the calls it ran may still
                        # be in the pipe: read them, up to the EOF, which then says
                        # which call it was running.
                        broken = True
                    continue
                # Then one reply, to the first job in flight.
                try:
                    reply: Any = await slot.conn.recv()
                except (ConnectionEOF, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    raise
                except Exception as exc:
                    reply = exc  # it could not be unpickled: the error of this job
                job = slot.jobs.popleft()
                request = requests[0]
                now = perf_counter()
                job.elapsed += now - request.sent
                slot.calls += job.part
                in_flight -= job.part
                job.seconds = 0.0
                job.read_reply(reply)
                request.seconds += job.seconds
                self._complete(job)
                request.jobs -= 1
                if not request.jobs:
                    requests.popleft()
                    if request.batchable:
                        # Judged by the time in the worker, not the round trip: quick
                        # calls are sent together however slow the pipe or the loop.
                        per_call = request.seconds / request.calls
                        self._call_seconds = 0.75 * self._call_seconds + 0.25 * per_call
        except (ConnectionEOF, anyio.BrokenResourceError):
            self._worker_died(slot, await slot.exit_code())

    def _take(self, slot: _Slot, batch: list[Job], quota: int | None) -> bytes:
        """Mark the jobs of *batch* sent to *slot*; return the request's bytes."""
        for job in batch:
            job.state = SENT
            job.slot = slot
            job.part = job.left
            if quota is not None:
                # Exactly max_tasks_per_child calls per worker: a bigger job is cut, and
                # the rest goes back to the queue when this part is answered.
                job.part = min(job.part, quota)
                quota -= job.part
            self._queued -= job.part
            self._running += job.part
        slot.jobs.extend(batch)
        if len(batch) > 1:
            return dumps(("batch", [bytes(job.payload) for job in batch]))
        job = batch[0]
        if job.part == job.size:
            return job.payload  # type: ignore[no-any-return]
        assert job.fn is not None
        # A part of a job: its arguments pickled again, or, where pickling them again
        # would make new segments (shared() objects), their pickles from the first time.
        arglist = job.arglist[job.offset : job.offset + job.part]
        return self._request(job.id, job.fn, arglist, job.pickled)

    def _batch(self, first: Job | None, quota: int | None) -> list[Job]:
        """*first*, and queued run() calls to send along with it while calls are quick;
        or, with *first* ``None``, queued quick run() calls to send to a worker that
        runs quick ones already, to run after them.

        Calls sent together wait for each other in the worker, so this only happens
        while calls take less than ``_BATCH_SECONDS / _MAX_BATCH`` on average, up to
        ``_MAX_BATCH`` of them (a request sent ahead only while they take less than
        half of ``_BATCH_SECONDS``, and only of at most ``_PIPELINE_BYTES``). A call
        with ``kill_on_cancel`` is always sent alone to a worker with nothing else to
        do, so killing its worker ends no other call.
        """
        batch = [] if first is None else [first]
        if (first is not None and not first.batchable) or not self._call_seconds:
            return batch
        size = min(_MAX_BATCH, int(_BATCH_SECONDS / self._call_seconds))
        if first is None and size < 2:
            return batch
        if quota is not None:
            size = min(size, quota)
        room = _PIPELINE_BYTES if first is None else None
        queue = self._queue
        while len(batch) < size and queue:
            job = queue[0]
            if job.state != QUEUED:
                queue.popleft()
            elif not job.batchable or (room is not None and len(job.payload) > room):
                break
            else:
                batch.append(queue.popleft())
                if room is not None:
                    room -= len(job.payload)
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
        # What the worker had not received of the calls in flight when it ended, nobody
        # ever will: their segments are taken back once it is gone (see the end).
        in_flight = [(job.made, job.offset, job.part) for job in jobs if job.made is not None]
        for job in jobs:
            job.error = anyio.ClosedResourceError("the pool was closed while the call ran")
            self._complete(job)
        slot.conn.close()  # the stop request: an idle worker sees EOF and returns
        if not jobs and not slot.doomed:
            with anyio.move_on_after(TERMINATE_GRACE):
                await slot.process.wait()
        await slot.process.stop()
        slot.process.close()
        for made, start, part in in_flight:
            for segments in made[start : start + part]:
                if segments is not None:
                    segments.discard()


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
