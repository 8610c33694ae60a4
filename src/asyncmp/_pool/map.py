"""Pool.map: feed a pool from an iterable, with backpressure, in growing chunks.

The map has no task of its own: each step of the consumer's ``async for`` tops up the
work in flight, then waits for the next result. So items are taken from the iterable
only while the consumer keeps asking, and at most ``_AHEAD`` chunks per worker are taken
and not yet yielded; an endless iterable is fine, and once the consumer stops, nothing
more is taken.

A chunk is one request to a worker (see ``_pool.protocol``). The chunk size starts at 1 and
follows how long the calls take: the map aims at chunks of ``_CHUNK_SECONDS`` each, at
most ``_MAX_CHUNK`` calls (and never more than ``max_tasks_per_child``).

Bytes bound chunks too, for ``shared()`` arrays above all: each one holds shared memory
(``/dev/shm``, often 64 MiB in a container) from the moment its item is pickled until the
worker is done with it. A call counts the bytes of its arguments' pickle, with the
shared memory their ``shared()`` objects made, and the shared memory its result made
(the worker reports it for results that are ``shared()`` objects themselves; until
results come, a call counts what the last ones cost). A chunk holds calls up to
``_CHUNK_BYTES`` (at least one call; judged by the calls before it while items are
pickled a chunk at a time, exactly once they are pickled one by one), and a map takes
more items only while the chunks it took and has not yet yielded hold less than
``_AHEAD_BYTES``, or while it has fewer than one per worker. So what a map holds ahead of
its consumer is at most ``_AHEAD_BYTES`` plus one call, or one chunk per worker if that
is more (calls larger than the budget still run on every worker). Results that are not
in shared memory are not counted: they are objects in this process, at most ``_AHEAD``
chunks per worker of them.

Every item is pickled once. Items are pickled a chunk at a time (one pickle for many
tiny items is what keeps them cheap) until a pickle makes a shared memory segment; from
then on each item is pickled on its own, and a chunk is a list of those pickles. Cutting
such a chunk at a worker's ``max_tasks_per_child``, or leaving out an item that can't be
pickled, then pickles nothing again: a second pickle of a ``shared()`` object would make
a second segment, and the first would stay in ``/dev/shm`` until the program ends. The
first chunks hold one item each, so a map over ``shared()`` objects switches after its
first item. A chunk pickle that made a segment anyway (such items came later), or that
failed half-way, takes back the segments it made, and its items are pickled one by one.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._core.loop import checkpoint_due, full_checkpoint, note_turn, thread_id
from .._shared.shared import SegmentsMade
from .job import Job
from .jobqueue import JobQueue, forking_dumps
from .pickling import explain

__all__ = ("PoolMap",)

R = TypeVar("R")

#: What a chunk should take in a worker, in seconds.
_CHUNK_SECONDS = 0.02
#: The largest chunk, in calls.
_MAX_CHUNK = 2048
#: Chunks taken but not yet yielded, per worker.
_AHEAD = 2
#: The bytes of calls in one chunk, at most (one call at least): their arguments'
#: pickles, with their shared memory, and their results' shared memory.
_CHUNK_BYTES = 4 * 1024 * 1024
#: The bytes of calls a map takes ahead of its consumer, at most (one call more, or one
#: chunk per worker if that is more): in chunks taken and not wholly yielded.
_AHEAD_BYTES = 16 * 1024 * 1024


class _Pickled:
    """An item pickled on its own: its pickle, its bytes with its shared memory, the
    segments it made (to take back if it is never sent); or why it can't be pickled."""

    __slots__ = ("data", "error", "made", "nbytes")

    def __init__(
        self, data: bytes, nbytes: int, made: SegmentsMade | None, error: Exception | None
    ) -> None:
        self.data = data
        self.nbytes = nbytes
        self.made = made
        self.error = error


class PoolMap(AsyncIterator[R]):
    """The async iterator of results that :meth:`Pool.map` returns.

    Iterate over it with ``async for``. To stop it at once rather than when it is
    dropped, ``await it.aclose()``, or use it as an async context manager::

        async with pool.map(fn, items) as results:
            async for y in results:
                ...

    It belongs to the pool's event loop: a step or ``aclose()`` from a loop in another
    thread raises ``RuntimeError`` at once (see :class:`Pool`).
    """

    def __init__(
        self,
        jobs: JobQueue,
        fn: Callable[[Any], R],
        iterable: Iterable[Any] | AsyncIterable[Any],
        ordered: bool,
        workers: int,
        max_tasks_per_child: int | None,
    ) -> None:
        self._stopped = True  # until set up: __del__ then has nothing to stop
        self._queue = jobs  # the pool's
        self._owner = jobs.owner  # the loop that opened the pool
        self._fn = fn
        self._sync: Iterator[Any] | None = None
        self._async: AsyncIterator[Any] | None = None
        if isinstance(iterable, AsyncIterable):
            self._async = aiter(iterable)
        else:
            self._sync = iter(iterable)
        self._ordered = ordered
        #: Jobs taken and not wholly yielded, in the order they were taken.
        self._jobs: deque[Job] = deque()
        #: Jobs that finished, in the order they finished (ordered=False only).
        self._finished: deque[Job] = deque()
        self._current: Job | None = None  # the job being yielded from
        self._index = 0  # the next call of _current to yield
        self._partial: list[tuple[Any]] = []  # items taken for a chunk not yet sent
        self._submitted = 0  # items taken from the iterable: the index of the next one
        #: The same, pickled one by one (see the module's docstring), and their bytes.
        self._pickled: list[_Pickled] = []
        self._pickled_bytes = 0.0
        self._one_by_one = False  # items are pickled one by one from now on
        self._arg_bytes = 0.0  # a call's arguments' bytes, lately
        self._result_bytes = 0.0  # a call's result's shared memory, lately
        self._exhausted = False
        self._wakeup: anyio.Event | None = None
        self._chunk = 1
        limit = max_tasks_per_child
        self._max_chunk = _MAX_CHUNK if limit is None else min(_MAX_CHUNK, limit)
        self._limit = _AHEAD * workers
        self._workers = workers
        # Jobs reach the map through a weak reference: the pool's queue must not keep a
        # map alive that its consumer dropped, or dropping it could not stop it.
        deliver = weakref.WeakMethod(self._deliver)

        def deliver_if_alive(job: Job) -> None:
            method = deliver()
            if method is not None:
                method(job)

        self._deliver_weakly = deliver_if_alive
        self._stopped = False

    def __aiter__(self) -> PoolMap[R]:
        return self

    if not TYPE_CHECKING:  # type checkers go on seeing a map as not awaitable

        def __await__(self) -> object:
            raise TypeError(
                "pool.map() returns an async iterator of the results, not an awaitable:"
                " iterate over it with `async for result in pool.map(fn, items):`, or"
                " collect them with `[result async for result in pool.map(fn, items)]`"
            )

    async def __anext__(self) -> R:
        """Return the next result.

        If cancelled, nothing was consumed: the next call returns the same result.

        :raises StopAsyncIteration: every result was yielded, or the map was stopped.
        :raises Exception: see :meth:`Pool.map`.
        """
        if thread_id() != self._owner.thread:  # the check(), inlined: once per result
            self._owner.claim()
        # A result already here is returned without a trip through the loop, but the loop
        # still gets a turn about every millisecond (as a Queue's get does), or a consumer
        # going through buffered results would starve every other task.
        if checkpoint_due():
            await full_checkpoint()
        while not self._stopped:
            job = self._current
            if job is not None:
                if self._index < job.size:
                    i = self._index
                    self._index += 1
                    try:
                        return job.outcome(i)  # type: ignore[no-any-return]
                    except BaseException:
                        self._stop()
                        raise
                self._current = None
                if self._ordered:
                    self._jobs.popleft()
                else:
                    self._jobs.remove(job)
            await self._refill()
            job = self._next_finished()
            if job is not None:
                self._current = job
                self._index = 0
                continue
            if not self._jobs and self._exhausted:
                break
            wakeup = self._wakeup = anyio.Event()
            await wakeup.wait()
            note_turn()
        self._stop()
        raise StopAsyncIteration

    def _next_finished(self) -> Job | None:
        if self._ordered:
            if self._jobs and self._jobs[0].done:
                return self._jobs[0]
            return None
        return self._finished.popleft() if self._finished else None

    async def _refill(self) -> None:
        """Take items and send chunks until enough are ahead or the items ran out."""
        while not self._exhausted and self._may_take():
            calls = self._chunk_calls()
            if self._one_by_one:
                pickled = self._pickled
                while len(pickled) < calls and not self._chunk_full():
                    try:
                        item = await self._next_item()
                    except StopAsyncIteration:
                        self._exhausted = True
                        break
                    self._pickle_one((item,), self._submitted)
                    self._submitted += 1
            else:
                items = self._partial
                while len(items) < calls:
                    if self._sync is not None:
                        try:
                            item = next(self._sync)
                        except StopIteration:
                            self._exhausted = True
                            break
                    else:
                        assert self._async is not None
                        try:
                            item = await self._async.__anext__()
                        except StopAsyncIteration:
                            self._exhausted = True
                            break
                    items.append((item,))
                    self._submitted += 1
            if not self._partial and not self._pickled:
                return
            self._send()

    async def _next_item(self) -> Any:
        """:raises StopAsyncIteration: the items ran out."""
        if self._sync is not None:
            try:
                return next(self._sync)
            except StopIteration:
                raise StopAsyncIteration from None
        assert self._async is not None
        return await self._async.__anext__()

    def _ahead_bytes(self) -> float:
        """The bytes of the calls taken and not wholly yielded."""
        estimate = self._result_bytes
        return sum(
            job.arg_bytes + (job.result_bytes if job.done else estimate * job.size)
            for job in self._jobs
        )

    def _may_take(self) -> bool:
        """Whether to take another chunk: fewer than ``_AHEAD`` per worker are ahead, and
        they hold less than ``_AHEAD_BYTES``, or there are fewer than one per worker."""
        ahead = len(self._jobs)
        if ahead >= self._limit:
            return False
        return ahead < self._workers or self._ahead_bytes() < _AHEAD_BYTES

    def _chunk_calls(self) -> int:
        """The calls of the next chunk: as many as take ``_CHUNK_SECONDS``, as far as
        ``_CHUNK_BYTES`` of calls like the last ones go."""
        calls = self._chunk
        per_call = self._arg_bytes + self._result_bytes
        if per_call * calls > _CHUNK_BYTES:
            calls = max(1, int(_CHUNK_BYTES / per_call))
        return calls

    def _chunk_full(self) -> bool:
        """Whether the items pickled one by one make a chunk, by their bytes."""
        taken = self._pickled_bytes
        if not taken:
            return False
        if taken >= _CHUNK_BYTES:
            return True
        return len(self._jobs) >= self._workers and self._ahead_bytes() + taken >= _AHEAD_BYTES

    def _pickle_one(self, args: tuple[Any], index: int) -> None:
        """Pickle the arguments of the item at *index* for a chunk of pickles."""
        made = SegmentsMade()
        try:
            with made:
                data = forking_dumps(args)
        except Exception as exc:
            made.discard()  # what it made before it failed
            error = explain(exc, self._fn, [args], index)
            self._pickled.append(_Pickled(b"", 0, None, error))
            return
        if made.segments:
            self._one_by_one = True
        nbytes = len(data) + made.nbytes
        self._pickled.append(_Pickled(data, nbytes, made if made.segments else None, None))
        self._pickled_bytes += nbytes + self._result_bytes

    def _send(self) -> None:
        """Send the items taken: one chunk, or the chunks and errors of the items
        pickled one by one."""
        items = self._partial
        if items:
            self._partial = []
            start = self._submitted - len(items)  # the index of the first (taken last)
            made = SegmentsMade()
            try:
                with made:
                    job = self._queue.new_job(self._fn, items, self._deliver_weakly)
            except Exception:
                # Something in the chunk can't be pickled: one by one, so that the error
                # is that item's own, raised at its place.
                made.discard()
            else:
                if not made.segments or len(items) == 1:
                    if made.segments:  # shared() objects: pickled one by one from now on
                        self._one_by_one = True
                    job.arg_bytes = len(job.payload) + made.nbytes
                    self._arg_bytes = job.arg_bytes / len(items)
                    if made.segments:
                        job.made = [made]
                    self._add(job)
                    return
                # shared() objects in a chunk that may have to be cut: one by one.
                made.discard()
                self._one_by_one = True
            for index, args in enumerate(items, start):
                self._pickle_one(args, index)
        pickled, self._pickled = self._pickled, []
        self._pickled_bytes = 0.0
        run: list[_Pickled] = []
        for entry in pickled:
            if entry.error is None:
                run.append(entry)
            else:
                self._send_pickled(run)
                run = []
                self._add_failed(entry.error, 1)
        self._send_pickled(run)

    def _send_pickled(self, run: list[_Pickled]) -> None:
        """Send items pickled one by one as one chunk."""
        if not run:
            return
        made = [entry.made for entry in run]
        try:
            job = self._queue.new_job(
                self._fn, [entry.data for entry in run], self._deliver_weakly, pickled=True
            )
        except Exception as exc:  # the function can't be pickled (or is async)
            for segments in made:
                if segments is not None:
                    segments.discard()
            self._add_failed(explain(exc, self._fn, [], 0), len(run))
            return
        job.arg_bytes = sum(entry.nbytes for entry in run)
        self._arg_bytes = job.arg_bytes / len(run)
        if any(segments is not None for segments in made):
            job.made = made
        self._add(job)

    def _add(self, job: Job) -> None:
        self._jobs.append(job)
        try:
            self._queue.enqueue(job)
        except BaseException:  # the pool is closed: never sent
            job.discard_unsent(0)
            raise

    def _add_failed(self, error: Exception, size: int) -> None:
        """A job of *size* calls that failed with *error* before it was sent."""
        job = Job.failed(size, error, self._deliver_weakly)
        self._jobs.append(job)
        self._finished.append(job)

    def _deliver(self, job: Job) -> None:
        if job.elapsed > 0:
            per_call = job.elapsed / job.size
            self._chunk = max(1, min(self._max_chunk, int(_CHUNK_SECONDS / per_call)))
        if job.error is None:
            self._result_bytes = job.result_bytes / job.size
        if not self._ordered:
            self._finished.append(job)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def _stop(self) -> None:
        """Stop the map: withdraw what is queued, abandon what runs, take back the
        segments of items pickled and not sent. Never awaits."""
        if self._stopped:
            return
        self._stopped = True
        jobs, self._jobs = self._jobs, deque()
        self._finished.clear()
        self._current = None
        for job in jobs:
            self._queue.withdraw(job)
        # Items pickled one by one and not sent yet (a step was cancelled, or an async
        # iterable raised, while it took the rest of their chunk): never sent now.
        pickled, self._pickled = self._pickled, []
        self._pickled_bytes = 0.0
        for entry in pickled:
            if entry.made is not None:
                entry.made.discard()

    async def aclose(self) -> None:
        """Stop the map now, as dropping it does; then close an async iterable it
        takes items from, if that has ``aclose()``. A checkpoint; raises nothing of its
        own (what the iterable's ``aclose()`` raises propagates), but for the
        ``RuntimeError`` of a call from another event loop than the pool's."""
        self._owner.check()
        self._stop()
        source = self._async
        self._async = None
        closer = getattr(source, "aclose", None)
        if closer is not None:
            await closer()
        else:
            await anyio.lowlevel.checkpoint()

    def __del__(self) -> None:
        self._stop()

    async def __aenter__(self) -> PoolMap[R]:
        """Return the map itself."""
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the map with :meth:`aclose` (the map stops even if that is cancelled)."""
        await self.aclose()
