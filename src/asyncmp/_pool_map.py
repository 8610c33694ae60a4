"""Pool.map: feed a pool from an iterable, with backpressure, in growing chunks.

The map has no task of its own: each step of the consumer's ``async for`` tops up the
work in flight, then waits for the next result. So items are taken from the iterable
only while the consumer keeps asking, and at most ``_AHEAD`` chunks per worker are taken
and not yet yielded; an endless iterable is fine, and once the consumer stops, nothing
more is taken.

A chunk is one request to a worker (see ``_pool_worker``). The chunk size starts at 1 and
follows how long the calls take: the map aims at chunks of ``_CHUNK_SECONDS`` each, at
most ``_MAX_CHUNK`` calls (and never more than ``max_tasks_per_child``).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ._loop import checkpoint_due, full_checkpoint, note_turn
from ._pool_job import DONE, Job

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ("PoolMap",)

R = TypeVar("R")

#: What a chunk should take in a worker, in seconds.
_CHUNK_SECONDS = 0.02
#: The largest chunk, in calls.
_MAX_CHUNK = 2048
#: Chunks taken but not yet yielded, per worker.
_AHEAD = 2


class PoolMap(AsyncIterator[R]):
    """The async iterator of results that :meth:`Pool.map` returns.

    Iterate over it with ``async for``. To stop it at once rather than when it is
    dropped, ``await it.aclose()``, or use it as an async context manager::

        async with pool.map(fn, items) as results:
            async for y in results:
                ...
    """

    def __init__(
        self,
        pool: Pool,
        fn: Callable[[Any], R],
        iterable: Iterable[Any] | AsyncIterable[Any],
        ordered: bool,
    ) -> None:
        self._stopped = True  # until set up: __del__ then has nothing to stop
        self._pool = pool
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
        self._exhausted = False
        self._wakeup: anyio.Event | None = None
        self._chunk = 1
        limit = pool.max_tasks_per_child
        self._max_chunk = _MAX_CHUNK if limit is None else min(_MAX_CHUNK, limit)
        self._limit = _AHEAD * pool.processes
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

    async def __anext__(self) -> R:
        """Return the next result.

        If cancelled, nothing was consumed: the next call returns the same result.

        :raises StopAsyncIteration: every result was yielded, or the map was stopped.
        :raises Exception: see :meth:`Pool.map`.
        """
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
            if self._jobs and self._jobs[0].state == DONE:
                return self._jobs[0]
            return None
        return self._finished.popleft() if self._finished else None

    async def _refill(self) -> None:
        """Take items and send chunks until enough are ahead or the items ran out."""
        while not self._exhausted and len(self._jobs) < self._limit:
            items = self._partial
            while len(items) < self._chunk:
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
            if not items:
                return
            self._partial = []
            self._submit(items)

    def _submit(self, items: list[tuple[Any]]) -> None:
        pool = self._pool
        try:
            job = pool._new_job(self._fn, items, self._deliver_weakly)
        except Exception:
            # Something in the chunk can't be pickled: send the items one by one, so the
            # error is that item's own, raised at its place.
            for item in items:
                self._submit_one(item)
            return
        self._jobs.append(job)
        pool._enqueue(job)

    def _submit_one(self, item: tuple[Any]) -> None:
        pool = self._pool
        try:
            job = pool._new_job(self._fn, [item], self._deliver_weakly)
        except Exception as exc:
            job = Job(-1, 1, self._deliver_weakly)
            job.state = DONE
            job.error = exc
            self._jobs.append(job)
            self._finished.append(job)
            return
        self._jobs.append(job)
        pool._enqueue(job)

    def _deliver(self, job: Job) -> None:
        if job.elapsed > 0:
            per_call = job.elapsed / job.size
            self._chunk = max(1, min(self._max_chunk, int(_CHUNK_SECONDS / per_call)))
        if not self._ordered:
            self._finished.append(job)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def _stop(self) -> None:
        """Stop the map: withdraw what is queued, abandon what runs. Never awaits."""
        if self._stopped:
            return
        self._stopped = True
        jobs, self._jobs = self._jobs, deque()
        self._finished.clear()
        self._current = None
        for job in jobs:
            self._pool._withdraw(job)

    async def aclose(self) -> None:
        """Stop the map now, as dropping it does; then close an async iterable it
        takes items from, if that has ``aclose()``. A checkpoint; raises nothing of its
        own (what the iterable's ``aclose()`` raises propagates)."""
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
