"""One worker's conversation: the parent's side of a worker's pipe.

A :class:`Slot` is one worker process, its pipe, and what it is doing. Its worker task
(``Pool``'s, one per worker) calls :meth:`Slot.serve`: wait for the worker's first word,
then take jobs from the pool's :class:`JobQueue`, send them, and read the replies, until
the worker must be retired or ends; then :meth:`Slot.retire`. The messages are those of
``_pool.protocol``; the invariants that make cancellation lose nothing are in
``_pool.pool``'s docstring.
"""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import Any

import anyio

from .._connection.connection import AsyncConnection
from .._core.exceptions import ConnectionEOF
from .._core.wire import dumps
from .._process.process import TERMINATE_GRACE, AsyncProcess, WorkerExited
from .job import Job
from .jobqueue import JobQueue
from .protocol import BATCH, INIT_FAILED
from .worker import RemoteTraceback

__all__ = ("Slot",)

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


class _Request:
    """A request in flight: how many of its jobs are not answered yet."""

    __slots__ = ("batchable", "calls", "jobs", "seconds", "sent")

    def __init__(self, batch: list[Job], sent: float) -> None:
        self.jobs = len(batch)
        self.calls = sum(job.part for job in batch)
        self.sent = sent
        self.batchable = batch[0].batchable
        self.seconds = 0.0  # the time its jobs took in the worker, so far


class Slot:
    """One worker process, its pipe, and what it is doing.

    *queue* is the pool's, *limit* its ``max_tasks_per_child``; *on_ready* is called
    when the worker said it is ready, *on_break* when it could not be (the pool breaks).
    """

    __slots__ = (
        "_limit",
        "_on_break",
        "_on_ready",
        "_queue",
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

    def __init__(
        self,
        conn: AsyncConnection[Any],
        process: AsyncProcess,
        queue: JobQueue,
        limit: int | None,
        on_ready: Callable[[], None],
        on_break: Callable[[str, BaseException | None], None],
    ) -> None:
        self.conn = conn
        self.process = process
        self._queue = queue
        self._limit = limit
        self._on_ready = on_ready
        self._on_break = on_break
        self.ready = False  # it said READY
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

    def doom(self) -> None:
        """Kill the worker at once (a ``kill_on_cancel`` call was cancelled): it takes
        no more jobs; the worker task sees it end."""
        self.doomed = True
        self.process.kill()

    async def serve(self) -> bool:
        """Wait for the worker to be ready, then run jobs until it must be retired, or
        until it ends. True if it ended idle, before it ran a call."""
        with self.scope:  # cancelled once the process has ended (see watch)
            try:
                await self._converse()
            except (ConnectionEOF, anyio.BrokenResourceError):
                pass  # the worker has ended, or is ending
            else:
                return False
        # The worker has ended, or closed its end of the pipe. What it sent before, its
        # first word or its replies, is in the pipe: read that first, then decide which
        # job it was running.
        code = await self.exit_code()
        while self.jobs or not self.ready:
            message = self._recv_nowait()
            if message is None:
                break
            if not self.ready:
                if not self._hello(message):
                    return False
            elif len(self.jobs) > self.undelivered():
                self._answered(message)
            else:
                break
        if not self.ready:
            exited = WorkerExited(code)
            self._on_break(f"a pool worker ended before it was ready: {exited}", exited)
            return False
        unused = not self.calls and not self.jobs
        self._worker_died(code)
        return unused

    async def _converse(self) -> None:
        """Wait for the worker's first word, then send it jobs and read its replies
        until it must be retired. Raises ``ConnectionEOF`` or ``BrokenResourceError``
        if the worker goes away."""
        if not self._hello(await self._recv()):
            return
        limit = self._limit
        # The requests in flight, oldest first. The worker answers them in order, job by
        # job, and self.jobs holds their jobs in that order.
        requests = self.requests
        while True:
            # Top up: a first request (waiting for a job if none is queued), then while
            # calls are quick one more, to run after it (see _batch).
            quota = None if limit is None else limit - self.calls - self.in_flight
            if not requests:
                if self.doomed or quota == 0:
                    return
                batch = self._batch(await self._queue.next_job(), quota)
            elif len(requests) < _PIPELINE and requests[-1].batchable and not self.doomed:
                batch = self._batch(None, quota)
            else:
                batch = []
            if batch:
                # No await since the jobs were checked (in next_job or _batch): they
                # are ours.
                payload = self._take(batch, quota)
                request = _Request(batch, perf_counter())
                requests.append(request)
                self.in_flight += request.calls
                # If this raises (BrokenResourceError: the worker is gone) or is
                # cancelled (the worker ended), the worker did not get the whole
                # request, and its jobs go to another worker (see _worker_died).
                self.sending = True
                await self.conn.send_bytes(payload)
                self.sending = False
                continue
            # Then one reply, to the first job in flight. (What _recv does, inline: the
            # hot path of quick calls.)
            try:
                reply: Any = await self.conn.recv()
            except (ConnectionEOF, anyio.BrokenResourceError, anyio.ClosedResourceError):
                raise
            except Exception as exc:
                reply = exc  # it could not be unpickled: the error of this job
            self._answered(reply)

    async def _recv(self) -> Any:
        """The worker's next message, or the exception unpickling it raised."""
        try:
            return await self.conn.recv()
        except (ConnectionEOF, anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise
        except Exception as exc:
            return exc

    def _recv_nowait(self) -> Any:
        """A message of the worker's that is in the pipe whole (or the exception
        unpickling it raised), or None."""
        try:
            return self.conn.recv_nowait()
        except (
            anyio.WouldBlock,
            ConnectionEOF,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ):
            return None
        except Exception as exc:
            return exc

    def _hello(self, hello: Any) -> bool:
        """Take the worker's first word: True if it is ready, else break the pool."""
        if isinstance(hello, BaseException):  # it could not be unpickled
            message = f"a pool worker's first word could not be unpickled: {hello!r}"
            self._on_break(message, hello)
            return False
        if hello[0] == INIT_FAILED:
            exc, text = hello[1]
            exc.__cause__ = RemoteTraceback(text)
            self._on_break(f"the pool's initializer failed in a worker: {exc!r}", exc)
            return False
        self.ready = True
        self._on_ready()
        return True

    def _answered(self, reply: Any) -> None:
        """Take the worker's reply (or the exception unpickling it raised) to the first
        job in flight."""
        job = self.jobs.popleft()
        if isinstance(reply, BaseException):
            reply = _unreadable_reply(job, reply)
        requests = self.requests
        request = requests[0]
        job.elapsed += perf_counter() - request.sent
        self.calls += job.part
        self.in_flight -= job.part
        job.seconds = 0.0
        job.read_reply(reply)
        request.seconds += job.seconds
        self._queue.complete(job)
        request.jobs -= 1
        if not request.jobs:
            requests.popleft()
            if request.batchable:
                # Judged by the time in the worker, not the round trip: quick calls are
                # sent together however slow the pipe or the loop.
                self._queue.note_call_seconds(request.seconds / request.calls)

    def _take(self, batch: list[Job], quota: int | None) -> bytes:
        """Mark the jobs of *batch* sent to this worker; return the request's bytes."""
        self._queue.assign(batch, self, quota)
        self.jobs.extend(batch)
        if len(batch) > 1:
            return dumps((BATCH, [bytes(job.payload) for job in batch]))
        job = batch[0]
        if job.part == job.size:
            return job.payload  # type: ignore[no-any-return]
        assert job.fn is not None
        # A part of a job: its arguments pickled again, or, where pickling them again
        # would make new segments (shared() objects), their pickles from the first time.
        arglist = job.arglist[job.offset : job.offset + job.part]
        return self._queue.request(job.id, job.fn, arglist, job.pickled)

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
        call_seconds = self._queue.call_seconds
        if (first is not None and not first.batchable) or not call_seconds:
            return batch
        size = min(_MAX_BATCH, int(_BATCH_SECONDS / call_seconds))
        if first is None and size < 2:
            return batch
        if quota is not None:
            size = min(size, quota)
        self._queue.take_batchable(batch, size, _PIPELINE_BYTES if first is None else None)
        return batch

    def _worker_died(self, exitcode: int) -> None:
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
        jobs, self.jobs = self.jobs, deque()
        if len(jobs) > self.undelivered():
            first = jobs.popleft()
            first.error = WorkerExited(exitcode)
            first.discard_unsent(first.offset)  # the part it ran too
            self._queue.complete(first)
        self.requests.clear()
        self.in_flight = 0
        self._queue.give_back(jobs)

    async def retire(self) -> None:
        """Stop the worker and reap it (shielded by the caller)."""
        jobs, self.jobs = self.jobs, deque()
        # What the worker had not received of the calls in flight when it ended, nobody
        # ever will: their segments are taken back once it is gone (see the end).
        in_flight = [(job.made, job.offset, job.part) for job in jobs if job.made is not None]
        for job in jobs:
            job.error = anyio.ClosedResourceError("the pool was closed while the call ran")
            self._queue.complete(job)
        self.conn.close()  # the stop request: an idle worker sees EOF and returns
        if not jobs and not self.doomed:
            with anyio.move_on_after(TERMINATE_GRACE):
                await self.process.wait()
        await self.process.stop()
        self.process.close()
        for made, start, part in in_flight:
            for segments in made[start : start + part]:
                if segments is not None:
                    segments.discard()


def _unreadable_reply(job: Job, exc: BaseException) -> BaseException:
    """The error of a job whose reply could not be unpickled here. The worker sends the
    errors of calls so that they always unpickle (see ``_pool.protocol``): what failed is
    a result, of a class this process can't import, say."""
    fn = job.fn
    name = (getattr(fn, "__qualname__", None) or repr(fn)) if fn is not None else "a call"
    error = pickle.PicklingError(
        f"the reply to {name} can't be unpickled in the parent ({type(exc).__name__}: {exc})"
    )
    error.__cause__ = exc
    return error
