"""open_pool: run functions in worker processes from async code.

Each worker is a plain ``multiprocessing`` process running :func:`_pool.worker.serve`,
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
  queue, and so does a job whose request it can't have received whole (the send
  failed, or was still going on when the worker ended).
* The worker's end is seen from the process itself: a watcher per worker waits for
  it and cancels what the worker task waits on. The pipe's EOF alone can come much
  later (a grandchild the worker forked holds the pipe), or never be looked for (a
  worker that dies idle). A worker that ended idle is replaced at once, before it is
  given a job (after a worker that never ran a call, only once a call is queued).
* A ``kill_on_cancel`` job is sent only to a worker with nothing in flight, and
  nothing is sent after it until it is answered: killing that worker ends no other
  call.
* A job leaves the queue only in the worker task, with no await between checking that
  it is still wanted and marking it sent. A caller that withdraws a queued job only
  flips its state; the worker task skips it.
* A caller's cancellation never awaits anything: it flips the job's state (and, with
  ``kill_on_cancel``, sends SIGKILL), and the worker task does the rest: it sees the
  worker end, reaps the process and starts a replacement.
"""

from __future__ import annotations

import functools
import inspect
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
from time import perf_counter
from types import BuiltinFunctionType, FunctionType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .._connection.connection import AsyncConnection
from .._core.blocks import block_manager
from .._core.exceptions import ConnectionEOF
from .._core.loop import LoopBinding, new_wakeup
from .._core.mpinternals import forking_dispatch_table
from .._core.wire import dumps
from .._process.process import (
    TERMINATE_GRACE,
    AsyncProcess,
    Lifeline,
    WorkerExited,
    start_with_pipe,
)
from .._shared.shared import SegmentsMade
from .job import ABANDONED, DONE, QUEUED, SENT, WITHDRAWN, Job
from .map import PoolMap
from .pickling import explain
from .worker import RemoteTraceback, serve

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

    __slots__ = (
        "calls",
        "conn",
        "doomed",
        "ended",
        "in_flight",
        "jobs",
        "process",
        "ready",
        "requests",
        "scope",
        "sending",
    )

    def __init__(self, conn: AsyncConnection[Any], process: AsyncProcess) -> None:
        self.conn = conn
        self.process = process
        self.ready = False  # it said "ready"
        self.calls = 0  # calls served, chunk items counted one by one
        #: The jobs in flight, in the order the worker runs them: the first one runs.
        self.jobs: deque[Job] = deque()
        #: The requests in flight, oldest first, whose jobs ``jobs`` holds in that order;
        #: and the calls they hold that are not answered yet.
        self.requests: deque[_Request] = deque()
        self.in_flight = 0
        #: The last request is being sent: until the send returns, the worker may not
        #: have all of it, so it can't have started its jobs.
        self.sending = False
        self.doomed = False  # killed (kill_on_cancel): it takes no more jobs
        #: The exit code, once :meth:`watch` saw the process end.
        self.ended: int | None = None
        #: What the worker task waits in while the worker lives; :meth:`watch` cancels it.
        self.scope = anyio.CancelScope()

    async def watch(self) -> None:
        """Wait for the process to end, then cancel :attr:`scope`.

        This watches the process itself (a pidfd on Linux; see :class:`AsyncProcess`),
        not only the pipe: a grandchild that the worker forked holds the worker's end of
        the pipe open, and no EOF comes while it lives. (Elsewhere it watches the
        sentinel, which such a grandchild holds open too, but for a forkserver's
        children.) One watcher per worker, so quick calls pay nothing for it.
        """
        try:
            self.ended = await self.process.wait()
        except OSError:  # no descriptor left to watch it with: the pipe's EOF tells
            return
        self.scope.cancel()

    async def exit_code(self) -> int:
        """The exit code of a worker that ended or closed its end of the pipe, once it
        is reaped (killed if it doesn't end within ``_EXIT_WAIT``)."""
        if self.ended is not None:
            return self.ended
        with anyio.move_on_after(_EXIT_WAIT):
            return await self.process.wait()
        self.process.kill()
        return await self.process.wait()

    def undelivered(self) -> int:
        """How many of the last jobs in flight the worker can't have received whole."""
        return self.requests[-1].jobs if self.sending else 0


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
    called from anywhere in that thread. From a loop in another thread, :meth:`run`,
    :meth:`map` and its iterator raise ``RuntimeError`` at once, which says how to call
    them through the pool's loop instead (``anyio.from_thread.run`` with that loop's
    token, or a ``BlockingPortal``).
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
        #: The loop that opened the pool (claimed by open_pool); PoolMap checks it too.
        self._owner = LoopBinding("this Pool", "opened")
        #: What the workers watch to die with this process (closed by open_pool).
        self._lifeline = Lifeline()

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

        A timeout around the call (``with anyio.fail_after(5): await pool.run(...)``)
        includes the time it waits for a free worker: while every worker is busy, a call
        can time out, and be withdrawn, before it starts.

        If cancelled before a worker took the call, the call is withdrawn and never runs.
        If cancelled once a worker took it, ``run()`` returns at once all the same: by
        default the call goes on in its worker and its result is thrown away when it
        comes (it never reaches another caller); with ``kill_on_cancel=True`` the worker
        is killed (SIGKILL) at once, then reaped and replaced by the pool (such a call is
        always sent alone, so no other call dies with it).

        :raises Exception: what ``fn`` raised, same type and message, with the worker's
            traceback attached as its ``__cause__`` (a :class:`RemoteTraceback`). An
            exception that can't be sent back (it doesn't pickle in the worker, or doesn't
            unpickle here: its class lives in a module only the worker imports, say)
            becomes a ``pickle.PicklingError`` that names it, its message and why, with
            the worker's traceback as its ``__cause__``.
        :raises pickle.PicklingError: (or what pickling raises, ``TypeError`` for a lock,
            say) *fn* or an argument can't be pickled: nothing was sent. The message
            names which (``args[1] (of type _thread.lock)``) and the original error is
            its ``__cause__``. A worker imports *fn* by its module and name: a lambda or
            a function defined inside another can't be sent; define it at module level
            (bind arguments with ``functools.partial`` of such a function). A result
            that can't be pickled in the worker, or unpickled here, raises
            ``pickle.PicklingError`` for this call only.
        :raises TypeError: *fn* is an async function (``async def``): the workers call
            plain functions; run it from one (``asyncio.run(fn(x))`` in a function
            defined at module level). Nothing was sent.
        :raises WorkerExited: the worker ended (its ``exitcode`` says how) after the
            call was sent to it whole and before it answered: it was running the call, or,
            if it died at the very moment the call reached it, was about to (the two
            can't be told apart). A call the worker can't have received (it had died
            before, or died while the call was being sent) runs on another worker instead.
            The pool has started a replacement.
        :raises anyio.ClosedResourceError: the pool is closed, or was closed meanwhile.
        :raises anyio.BrokenResourceError: no worker could be started (the initializer
            raised, or a worker died before it was ready).
        :raises RuntimeError: called from an event loop in another thread than the pool's
            (see :class:`Pool`); nothing was pickled or queued.
        """
        self._owner.check()
        self._check_usable()
        done = new_wakeup()
        job = Job(next(self._ids), 1, lambda _: done.set())
        # The segments that shared() arguments make: taken back if the call is never
        # sent (withdrawn, failed as the pool closes, or its pickling fails half-way).
        made = SegmentsMade()
        try:
            with made:
                job.payload = self._request(job.id, fn, [args])
        except Exception as exc:
            made.discard()
            error = explain(exc, fn, [args], None)
            if error is exc:  # nothing to add: not its own cause
                raise
            raise error from exc
        if made.segments:
            job.made = [made]
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
            running), and the pickling errors of :meth:`run`, for that item (named by
            its index in *iterable*: ``the item at index 17``; a result that can't be
            unpickled here fails its whole chunk, at its first item).
        :raises anyio.ClosedResourceError: the pool is closed.
        :raises RuntimeError: called, or iterated, from an event loop in another thread
            than the pool's (see :class:`Pool`).
        """
        self._owner.check()
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
        """The pickle of a job's request (see ``_pool.worker``); raises what pickling
        raises.

        A plain function pickles as a reference by name, the same each time: its pickle
        is made once and sent as bytes, which the worker unpickles. The request itself
        pickles as a ``ForkingPickler`` would, without making one per call.
        """
        if type(fn) is FunctionType or type(fn) is BuiltinFunctionType:
            ref = self._fn_pickles.get(fn)
            if ref is None:
                _refuse_async(fn)  # once per function: a cached one passed
                ref = dumps(fn)
                if len(self._fn_pickles) >= _FN_CACHE:
                    self._fn_pickles.clear()
                self._fn_pickles[fn] = ref
            request: tuple[Any, ...] = (job_id, ref, arglist, pickled)
        else:
            _refuse_async(fn)  # a partial or a callable object: cheap enough per request
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
            self._context,
            serve,
            (self._lifeline.owner, self._initializer, self._initargs),
            name="asyncmp-pool-worker",
        )
        slot = _Slot(conn, process)
        self._slots.add(slot)
        return slot

    async def _worker_task(self, slot: _Slot) -> None:
        """Serve with one worker after another, until the pool closes or breaks."""
        while True:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(slot.watch)
                    unused = await self._serve(slot)
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._retire(slot)
            if self._closed or self._broken is not None:
                return
            if unused:
                # It ended idle before it ran a call: rather than start worker after
                # worker in a loop while nothing is asked of them, the next call starts
                # the replacement.
                await self._wait_for_job()
            try:
                slot = self._start_worker()
            except Exception as exc:
                self._break(f"could not start a replacement worker: {exc!r}", exc)
                return
            self._replaced += 1

    async def _serve(self, slot: _Slot) -> bool:
        """Wait for the worker to be ready, then run jobs until it must be retired, or
        until it ends. True if it ended idle, before it ran a call."""
        with slot.scope:  # cancelled once the process has ended (see _Slot.watch)
            try:
                await self._converse(slot)
            except (ConnectionEOF, anyio.BrokenResourceError):
                pass  # the worker has ended, or is ending
            else:
                return False
        # The worker has ended, or closed its end of the pipe. What it sent before, its
        # first word or its replies, is in the pipe: read that first, then decide which
        # job it was running.
        code = await slot.exit_code()
        while slot.jobs or not slot.ready:
            message = self._recv_nowait(slot)
            if message is None:
                break
            if not slot.ready:
                if not self._hello(slot, message):
                    return False
            elif len(slot.jobs) > slot.undelivered():
                self._answered(slot, message)
            else:
                break
        if not slot.ready:
            exited = WorkerExited(code)
            self._break(f"a pool worker ended before it was ready: {exited}", exited)
            return False
        unused = not slot.calls and not slot.jobs
        self._worker_died(slot, code)
        return unused

    async def _converse(self, slot: _Slot) -> None:
        """Wait for the worker's first word, then send it jobs and read its replies
        until it must be retired. Raises ``ConnectionEOF`` or ``BrokenResourceError``
        if the worker goes away."""
        if not self._hello(slot, await self._recv(slot)):
            return
        limit = self._max_tasks_per_child
        # The requests in flight, oldest first. The worker answers them in order, job by
        # job, and slot.jobs holds their jobs in that order.
        requests = slot.requests
        while True:
            # Top up: a first request (waiting for a job if none is queued), then while
            # calls are quick one more, to run after it (see _batch).
            quota = None if limit is None else limit - slot.calls - slot.in_flight
            if not requests:
                if slot.doomed or quota == 0:
                    return
                batch = self._batch(await self._next_job(), quota)
            elif len(requests) < _PIPELINE and requests[-1].batchable and not slot.doomed:
                batch = self._batch(None, quota)
            else:
                batch = []
            if batch:
                # No await since the jobs were checked (in _next_job or _batch): they
                # are ours.
                payload = self._take(slot, batch, quota)
                request = _Request(batch, perf_counter())
                requests.append(request)
                slot.in_flight += request.calls
                # If this raises (BrokenResourceError: the worker is gone) or is
                # cancelled (the worker ended), the worker did not get the whole
                # request, and its jobs go to another worker (see _worker_died).
                slot.sending = True
                await slot.conn.send_bytes(payload)
                slot.sending = False
                continue
            # Then one reply, to the first job in flight. (What _recv does, inline: the
            # hot path of quick calls.)
            try:
                reply: Any = await slot.conn.recv()
            except (ConnectionEOF, anyio.BrokenResourceError, anyio.ClosedResourceError):
                raise
            except Exception as exc:
                reply = exc  # it could not be unpickled: the error of this job
            self._answered(slot, reply)

    async def _recv(self, slot: _Slot) -> Any:
        """The worker's next message, or the exception unpickling it raised."""
        try:
            return await slot.conn.recv()
        except (ConnectionEOF, anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise
        except Exception as exc:
            return exc

    def _recv_nowait(self, slot: _Slot) -> Any:
        """A message of the worker's that is in the pipe whole (or the exception
        unpickling it raised), or None."""
        try:
            return slot.conn.recv_nowait()
        except (
            anyio.WouldBlock,
            ConnectionEOF,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ):
            return None
        except Exception as exc:
            return exc

    def _hello(self, slot: _Slot, hello: Any) -> bool:
        """Take the worker's first word: True if it is ready, else break the pool."""
        if isinstance(hello, BaseException):  # it could not be unpickled
            self._break(f"a pool worker's first word could not be unpickled: {hello!r}", hello)
            return False
        if hello[0] == "init-failed":
            exc, text = hello[1]
            exc.__cause__ = RemoteTraceback(text)
            self._break(f"the pool's initializer failed in a worker: {exc!r}", exc)
            return False
        slot.ready = True
        self._ready += 1
        if self._ready >= self._processes:
            self._all_ready.set()
        return True

    def _answered(self, slot: _Slot, reply: Any) -> None:
        """Take the worker's reply (or the exception unpickling it raised) to the first
        job in flight."""
        job = slot.jobs.popleft()
        if isinstance(reply, BaseException):
            reply = _unreadable_reply(job, reply)
        requests = slot.requests
        request = requests[0]
        job.elapsed += perf_counter() - request.sent
        slot.calls += job.part
        slot.in_flight -= job.part
        job.seconds = 0.0
        job.read_reply(reply)
        request.seconds += job.seconds
        self._complete(job)
        request.jobs -= 1
        if not request.jobs:
            requests.popleft()
            if request.batchable:
                # Judged by the time in the worker, not the round trip: quick calls are
                # sent together however slow the pipe or the loop.
                per_call = request.seconds / request.calls
                self._call_seconds = 0.75 * self._call_seconds + 0.25 * per_call

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
        """The worker ended, and its replies were read. The first job left in flight, if
        the worker received it, was running: it fails. The others never started: back to
        the front of the queue (or gone, if their callers went away).

        Which job a worker runs is known only by its replies: a job sent whole is counted
        as running, even if the worker died before it read it (the moment a send returns
        and the worker's death are indistinguishable from here). A job whose send failed,
        or had not finished when the worker ended, was not received: it runs elsewhere.

        The worker is gone (reaped): the segments of the jobs that fail or were abandoned,
        which it had not received, nobody will receive; they are taken back (those it did
        receive are gone already). Those of jobs that go back to the queue are kept.
        """
        jobs, slot.jobs = slot.jobs, deque()
        if len(jobs) > slot.undelivered():
            first = jobs.popleft()
            first.error = WorkerExited(exitcode)
            first.discard_unsent(first.offset)  # the part it ran too
            self._complete(first)
        slot.requests.clear()
        slot.in_flight = 0
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
            else:  # abandoned: the calls of it not sent yet never run either
                self._queued -= job.size - job.offset - job.part
                job.discard_unsent(job.offset)

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

    async def _wait_for_job(self) -> None:
        """Return once a job is queued, without taking it: an idle worker task, if one
        waits, is woken for it."""
        while not self._queue:
            wakeup = anyio.Event()
            self._idle.append(wakeup)
            try:
                await wakeup.wait()
            finally:
                if not wakeup.is_set():
                    self._idle.remove(wakeup)
        if self._idle:
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


def _unreadable_reply(job: Job, exc: BaseException) -> BaseException:
    """The error of a job whose reply could not be unpickled here. The worker sends the
    errors of calls so that they always unpickle (see ``_pool.worker``): what failed is
    a result, of a class this process can't import, say."""
    fn = job.fn
    name = (getattr(fn, "__qualname__", None) or repr(fn)) if fn is not None else "a call"
    error = pickle.PicklingError(
        f"the reply to {name} can't be unpickled in the parent ({type(exc).__name__}: {exc})"
    )
    error.__cause__ = exc
    return error


def _refuse_async(fn: Callable[..., object]) -> None:
    """Raise ``TypeError`` if *fn* is an async function: in a worker, calling it would
    only make a coroutine, which can't even be sent back. So is a ``functools.partial``
    of one (unwrapped here, whatever the Python version's ``inspect`` does) and an
    object whose ``__call__`` is one."""
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    called = target
    if not (
        inspect.isfunction(target)
        or inspect.ismethod(target)
        or inspect.isbuiltin(target)
        or isinstance(target, type)
    ) and callable(target):
        called = type(target).__call__
    if inspect.iscoroutinefunction(called) or inspect.isasyncgenfunction(called):
        name = getattr(target, "__name__", None) or type(target).__name__
        raise TypeError(
            f"pool.run() and pool.map() call plain functions, and {name} is an async"
            " function (in a worker, calling it only makes a coroutine): run it from a"
            " plain function defined at module level, such as"
            f" `def {name}_sync(x): return asyncio.run({name}(x))`"
        )


@block_manager("pool", Pool)
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

    Use it as ``async with open_pool(...) as pool:``; nothing starts before the block is
    entered. What the call returns is not the pool: using it as one (``.run``,
    ``.map``...) or awaiting it raises an error that shows that line.

    Entering starts the workers and waits until each has run its initializer. Leaving
    the block, normally, by an exception or a cancellation, fails calls still queued
    with ``anyio.ClosedResourceError``, asks idle workers to stop, terminates busy ones,
    kills any that don't end within a grace, and reaps them all before the block exits.
    Leaving is shielded: a cancellation can't leave a worker behind.

    A worker that dies is replaced; the call it ran raises :class:`WorkerExited`, and
    the calls sent to it that it had not started run on other workers. The pool watches
    each worker process itself (on Linux through a pidfd), not only its pipe: it sees the
    end of a worker at once if the worker was idle, and, on Linux, even if a grandchild
    that the worker forked holds the pipe open (elsewhere such a grandchild holds the
    process's sentinel open too, and the end is seen once the grandchild ends, but for a
    forkserver's workers). One that dies idle is replaced before it is given a
    call (if it never ran one, only once a call is queued: workers that die as they start
    are not restarted in a loop). A failing initializer is not retried: it breaks the
    pool (see below).

    A worker starts as a new interpreter would, before the initializer runs (which may
    choose otherwise): the Python-level signal handlers a forked worker inherited (the
    parent's, a server's SIGTERM handler among them) are back to the defaults (a spawn or
    forkserver worker keeps those its main module installed as it imported it, as any new
    interpreter would), and SIGTERM always ends it, so that the pool's ``terminate()`` of a
    busy worker, or an operator's ``kill``, works; no event loop is running, so a function
    may call ``asyncio.run()`` or ``trio.run()``. Workers ignore SIGINT: the pool owns their
    lives.
    A Ctrl-C in a terminal reaches the whole process group; it interrupts the parent,
    whose block exit then stops the workers, instead of ending running calls in the
    workers with ``KeyboardInterrupt`` tracebacks. If the parent dies without leaving the
    block (SIGKILL, the OOM killer), each worker is killed (SIGKILL) at once, busy or not.

    :raises ValueError: *processes* or *max_tasks_per_child* is below 1.
    :raises anyio.BrokenResourceError: on entering, a worker's initializer raised (its
        exception, with the worker's traceback, is the ``__cause__``; one that can't be
        unpickled here comes as a ``pickle.PicklingError`` that names it and its message)
        or a worker died before it was ready. If that happens to a replacement later,
        queued and later calls raise it instead; calls running on other workers go on,
        and so does the block.
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
    pool._owner.claim()
    # What the block or the start-up raised is re-raised after the task group has
    # ended, not inside it, so that it comes out as itself, not in an exception group.
    failure: BaseException | None = None
    tg: TaskGroup
    try:
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
    finally:
        pool._lifeline.close()  # the workers are reaped by now
    if failure is not None:
        raise failure
