"""A pool's job queue: the jobs waiting for a worker, what became of the calls, and
whether the pool still takes calls.

The callers' side (``Pool.run``, a ``PoolMap``) makes jobs here, queues them and
withdraws them; the worker tasks (``_pool.conversation``) wait here for the next job,
take jobs, and complete them. Nothing here does I/O or awaits, but for the one wait of an
idle worker task (:meth:`JobQueue.next_job`): scheduling is bookkeeping, as in httpcore's
connection pool.
"""

from __future__ import annotations

import functools
import inspect
import io
import pickle
from collections import deque
from collections.abc import Callable, Sequence
from itertools import count
from types import BuiltinFunctionType, FunctionType
from typing import Any, Literal, overload

import anyio

from .._core.loop import LoopBinding
from .._core.mpinternals import forking_dispatch_table
from .._core.wire import dumps
from .job import Assignee, Job

__all__ = ("JobQueue", "forking_dumps")

#: The most functions whose pickles a queue keeps (see JobQueue.request).
_FN_CACHE = 256


class JobQueue:
    """The queue of a pool's jobs, the counts of its calls, and its closed or broken state.

    It belongs to the event loop that opened the pool (:attr:`owner`).
    """

    def __init__(self) -> None:
        self._ids = count()
        self._queue: deque[Job] = deque()
        self._idle: deque[anyio.Event] = deque()  # one per worker task waiting for a job
        self._closed = False
        self._broken: tuple[str, BaseException | None] | None = None
        #: Calls waiting, running (sent, not answered), done, failed.
        self.queued = self.running = self.done = self.failed = 0
        #: How long a run() call takes in a worker, on average lately; 0 until known.
        self.call_seconds = 0.0
        #: Plain functions -> their pickles (references to them by name).
        self._fn_pickles: dict[Callable[..., Any], bytes] = {}
        #: The loop that opened the pool (claimed by open_pool); a PoolMap checks it too.
        self.owner = LoopBinding("this Pool", "opened")

    # -- closed or broken ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def check_usable(self) -> None:
        """:raises anyio.ClosedResourceError: the pool is closed.
        :raises anyio.BrokenResourceError: the pool is broken."""
        if self._closed:
            raise anyio.ClosedResourceError("the pool is closed")
        if self._broken is not None:
            raise self.broken_error()

    def broken_error(self) -> BaseException:
        """The error that calls of a broken pool raise."""
        assert self._broken is not None
        message, cause = self._broken
        error = anyio.BrokenResourceError(message)
        error.__cause__ = cause
        return error

    def mark_broken(self, message: str, cause: BaseException | None) -> None:
        """No worker can be started: fail what is queued, and what comes later."""
        if self._broken is None:
            self._broken = (message, cause)
        self._fail_queued(self.broken_error)

    def close(self) -> None:
        """The pool closes: fail what is queued, and refuse what comes later."""
        self._closed = True
        self._fail_queued(lambda: anyio.ClosedResourceError("the pool was closed"))

    def _fail_queued(self, error: Callable[[], BaseException]) -> None:
        while self._queue:
            job = self._queue.popleft()
            if job.queued:
                self.queued -= job.left
                self.failed += job.left
                job.discard_unsent(job.offset)
                job.finish(error())

    # -- the callers' side -----------------------------------------------------------

    def new_job(
        self,
        fn: Callable[..., object],
        arglist: list[Any],
        deliver: Callable[[Job], None],
        *,
        pickled: bool = False,
    ) -> Job:
        """A job for *arglist* (with *pickled*, the pickles of its entries, from
        :func:`forking_dumps`), pickled; raises what pickling raises."""
        job = Job(next(self._ids), len(arglist), deliver)
        job.payload = self.request(job.id, fn, arglist, pickled)
        job.fn, job.arglist, job.pickled = fn, arglist, pickled
        return job

    def request(
        self, job_id: int, fn: Callable[..., object], arglist: list[Any], pickled: bool = False
    ) -> bytes:
        """The pickle of a job's request (see ``_pool.protocol``); raises what pickling
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
        return forking_dumps(request)

    def enqueue(self, job: Job) -> None:
        """Queue *job* for the next free worker.

        :raises anyio.ClosedResourceError: the pool is closed.
        :raises anyio.BrokenResourceError: the pool is broken."""
        self.check_usable()
        self._queue.append(job)
        self.queued += job.size
        self._wake_one()

    def withdraw(self, job: Job, *, kill: bool = False) -> None:
        """The caller no longer wants *job* (see :meth:`Job.withdraw`). Never awaits: it
        may run in a cancelled task, or from a finalizer."""
        self.queued -= job.withdraw(kill=kill)

    # -- the workers' side -----------------------------------------------------------

    @overload
    async def next_job(self, *, take: Literal[True] = True) -> Job: ...
    @overload
    async def next_job(self, *, take: Literal[False]) -> None: ...
    async def next_job(self, *, take: bool = True) -> Job | None:
        """Wait until a job is queued, and take it off the queue (withdrawn jobs are
        skipped). With ``take=False``, return ``None`` once a job is queued, without taking
        it: an idle worker task, if one waits, is woken for it instead.

        A worker task that was woken and then cancelled passes the wake-up on.
        """
        while True:
            if take:
                while self._queue:
                    job = self._queue.popleft()
                    if job.queued:
                        return job
            elif self._queue:
                self._wake_one()
                return None
            wakeup = anyio.Event()
            self._idle.append(wakeup)
            try:
                await wakeup.wait()
            finally:
                if not wakeup.is_set():
                    self._idle.remove(wakeup)
                elif take and self._queue:
                    self._wake_one()

    def take_batchable(self, batch: list[Job], size: int, room: int | None) -> None:
        """Take queued jobs that may be sent together into *batch*, up to *size* jobs in
        all, and with *room*, of at most that many bytes; stop at the first that may not."""
        queue = self._queue
        while len(batch) < size and queue:
            job = queue[0]
            if not job.queued:
                queue.popleft()
            elif not job.batchable or (room is not None and len(job.payload) > room):
                break
            else:
                batch.append(queue.popleft())
                if room is not None:
                    room -= len(job.payload)

    def assign(self, batch: list[Job], slot: Assignee, quota: int | None) -> None:
        """The jobs of *batch*, taken from the queue, go to *slot*: all the calls left of
        each, or with *quota*, no more than that many calls in all (exactly
        ``max_tasks_per_child`` per worker: a bigger job is cut, and the rest goes back
        to the queue when this part is answered)."""
        for job in batch:
            part = job.left
            if quota is not None:
                part = min(part, quota)
                quota -= part
            job.assign(slot, part)
            self.queued -= part
            self.running += part

    def complete(self, job: Job) -> None:
        """The part of *job* in flight ended (replied, or failed with ``job.error``).

        If calls of the job are left (it was cut at a worker's ``max_tasks_per_child``)
        and it is still wanted, it goes back to the front of the queue for the rest.
        """
        part = job.part
        start = job.offset
        rest = job.size - start - part  # calls not sent yet, still counted as queued
        self.running -= part
        if job.error is not None:
            failed = part + (rest if job.sent else 0)
            self.failed += failed
            self.queued -= rest
            job.discard_unsent(start + part)
        else:
            failed = 0
            if job.errors:
                failed = sum(1 for i in job.errors if start <= i < start + part)
                self.failed += failed
            self.done += part - failed
            job.answered()
            if rest:
                if job.sent:
                    job.requeue()
                    self._queue.appendleft(job)
                    self._wake_one()
                    return
                self.queued -= rest  # abandoned: the rest never runs
                job.discard_unsent(job.offset)
        job.release()
        if job.sent:
            job.finish()

    def give_back(self, jobs: Sequence[Job]) -> None:
        """Jobs sent to a worker that died before it started them: back to the front of
        the queue, in their order (or gone, if their callers went away)."""
        for job in reversed(jobs):
            self.running -= job.part
            if job.sent:
                self.queued += job.part
                job.requeue()
                self._queue.appendleft(job)
                self._wake_one()
            else:  # abandoned: the calls of it not sent yet never run either
                self.queued -= job.size - job.offset - job.part
                job.discard_unsent(job.offset)

    def note_call_seconds(self, per_call: float) -> None:
        """A request of quick calls took *per_call* seconds per call in its worker."""
        self.call_seconds = 0.75 * self.call_seconds + 0.25 * per_call

    def _wake_one(self) -> None:
        if self._idle:
            self._idle.popleft().set()


def forking_dumps(obj: Any) -> bytes:
    """*obj* pickled as a ``ForkingPickler`` would, without making one per call."""
    table = forking_dispatch_table()
    if table is None:
        return dumps(obj)
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf)
    pickler.dispatch_table = table
    pickler.dump(obj)
    return buf.getvalue()


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
