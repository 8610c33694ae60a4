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

The pool's parts each have a module: the job queue and its counts (``_pool.jobqueue``),
a job and its state changes (``_pool.job``), one worker's conversation
(``_pool.conversation``), the messages it exchanges (``_pool.protocol``), map
(``_pool.map``), and what runs in the worker (``_pool.worker``).

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

import multiprocessing
import os
import sys
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .._core.blocks import block_manager
from .._core.loop import new_wakeup
from .._process.process import Lifeline, start_with_pipe
from .._shared.shared import SegmentsMade
from .conversation import Slot
from .jobqueue import JobQueue
from .map import PoolMap
from .pickling import explain
from .worker import serve

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
        #: The jobs waiting, the counts of the calls, closed or broken.
        self._jobs = JobQueue()
        self._slots: set[Slot] = set()
        self._ready = 0
        #: Set once every worker said it is ready, or the pool broke.
        self._all_ready = anyio.Event()
        self._replaced = 0
        #: The loop that opened the pool (claimed by open_pool); a PoolMap checks it too.
        self._owner = self._jobs.owner
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
        jobs = self._jobs
        jobs.check_usable()
        done = new_wakeup()
        # The segments that shared() arguments make: taken back if the call is never
        # sent (withdrawn, failed as the pool closes, or its pickling fails half-way).
        made = SegmentsMade()
        try:
            with made:
                job = jobs.new_job(fn, [args], lambda _: done.set())
        except Exception as exc:
            made.discard()
            error = explain(exc, fn, [args], None)
            if error is exc:  # nothing to add: not its own cause
                raise
            raise error from exc
        if made.segments:
            job.made = [made]
        job.batchable = not kill_on_cancel
        jobs.enqueue(job)
        try:
            await done.wait()
        except BaseException:
            jobs.withdraw(job, kill=kill_on_cancel)
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
        self._jobs.check_usable()
        return PoolMap(
            self._jobs, fn, iterable, ordered, self._processes, self._max_tasks_per_child
        )

    def statistics(self) -> PoolStatistics:
        """Return a snapshot of the pool's workers and calls. It may be called outside
        the pool's block, before or after."""
        jobs = self._jobs
        return PoolStatistics(
            workers_alive=len(self._slots),
            calls_queued=jobs.queued,
            calls_running=jobs.running,
            calls_done=jobs.done,
            calls_failed=jobs.failed,
            workers_replaced=self._replaced,
        )

    def __repr__(self) -> str:
        state = "closed" if self._jobs.closed else "open"
        return f"<asyncmp.Pool {state} processes={self._processes}>"

    # -- the workers' side -----------------------------------------------------------

    def _start_worker(self) -> Slot:
        conn, process = start_with_pipe(
            self._context,
            serve,
            (self._lifeline.owner, self._initializer, self._initargs),
            name="asyncmp-pool-worker",
        )
        slot = Slot(
            conn, process, self._jobs, self._max_tasks_per_child, self._worker_ready, self._break
        )
        self._slots.add(slot)
        return slot

    async def _worker_task(self, slot: Slot) -> None:
        """Serve with one worker after another, until the pool closes or breaks."""
        jobs = self._jobs
        while True:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(slot.watch)
                    unused = await slot.serve()
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    self._slots.discard(slot)
                    await slot.retire()
            if jobs.closed or jobs.broken:
                return
            if unused:
                # It ended idle before it ran a call: rather than start worker after
                # worker in a loop while nothing is asked of them, the next call starts
                # the replacement.
                await jobs.next_job(take=False)
            try:
                slot = self._start_worker()
            except Exception as exc:
                self._break(f"could not start a replacement worker: {exc!r}", exc)
                return
            self._replaced += 1

    def _worker_ready(self) -> None:
        self._ready += 1
        if self._ready >= self._processes:
            self._all_ready.set()

    def _break(self, message: str, cause: BaseException | None) -> None:
        self._jobs.mark_broken(message, cause)
        self._all_ready.set()


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
                    if pool._jobs.broken:
                        failure = pool._jobs.broken_error()
                    else:
                        yield pool
                except BaseException as exc:
                    failure = exc
            finally:
                pool._jobs.close()
                tg.cancel_scope.cancel()
    finally:
        pool._lifeline.close()  # the workers are reaped by now
    if failure is not None:
        raise failure
