"""A pool's unit of work: one request to a worker, what became of it, who gets it.

Shared by the pool (``_pool.pool``), which queues, sends and completes jobs, and the map
(``_pool.map``), which makes them from chunks of items and yields their results.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .worker import Error, RemoteTraceback

if TYPE_CHECKING:
    from .._shared.shared import SegmentsMade
    from .pool import _Slot

__all__ = ("ABANDONED", "DONE", "QUEUED", "SENT", "WITHDRAWN", "Job")

# A job's states. It leaves QUEUED only for SENT (in the worker task that takes it),
# WITHDRAWN (its caller went away: it never runs) or DONE (the pool closed or broke).
# It leaves SENT only for DONE (its outcome was delivered) or ABANDONED (its caller
# went away after it was sent: its reply, when it comes, is dropped).
QUEUED = 0
SENT = 1
DONE = 2
WITHDRAWN = 3
ABANDONED = 4


class Job:
    """One request to a worker: one or more calls of one function."""

    __slots__ = (
        "arg_bytes",
        "arglist",
        "batchable",
        "deliver",
        "elapsed",
        "error",
        "errors",
        "fn",
        "id",
        "made",
        "offset",
        "part",
        "payload",
        "pickled",
        "result_bytes",
        "seconds",
        "size",
        "slot",
        "state",
        "values",
    )

    def __init__(self, job_id: int, size: int, deliver: Callable[[Job], None]) -> None:
        self.id = job_id
        self.size = size
        #: Called once, when the job is DONE, to hand the outcome to its caller.
        self.deliver = deliver
        #: May be sent to a worker along with other calls (see Pool._batch).
        self.batchable = False
        self.payload: Any = b""
        self.state = QUEUED
        self.slot: _Slot | None = None
        self.elapsed = 0.0  # seconds from send to reply
        #: Seconds the part in flight took in the worker (from its reply; 0 if it failed).
        self.seconds = 0.0
        self.values: list[Any] = []
        self.errors: dict[int, Error] | None = None
        #: Set if the whole job failed (the worker died, the pool closed, ...).
        self.error: BaseException | None = None
        #: What the payload holds, kept to send a part of it (see Pool._serve): the
        #: calls' arguments, or with *pickled* their pickles, made one by one.
        self.fn: Callable[..., Any] | None = None
        self.arglist: list[Any] = []
        self.pickled = False
        #: The bytes of the arguments' pickles, with their shared memory (set by a map).
        self.arg_bytes = 0
        #: The shared memory that the results' pickles made, as the worker reported.
        self.result_bytes = 0
        #: Per call, the segments its arguments' pickle made (or None), if any did: taken
        #: back for the calls that will never be sent.
        self.made: list[SegmentsMade | None] | None = None
        #: Calls answered by earlier parts; calls in the part in flight.
        self.offset = 0
        self.part = 0

    @property
    def left(self) -> int:
        """Calls not yet answered."""
        return self.size - self.offset

    def discard_unsent(self, start: int) -> None:
        """Calls from *start* on will never be sent: take back the segments of their
        arguments' pickles, which no worker will receive."""
        made, self.made = self.made, None  # the calls before start were sent
        if made is None:
            return
        for segments in made[start:]:
            if segments is not None:
                segments.discard()

    def outcome(self, i: int) -> Any:
        """Return the i-th call's result, or raise its exception."""
        if self.error is not None:
            raise self.error
        if self.errors is not None and i in self.errors:
            exc, text = self.errors[i]
            if not text:  # failed here, not in the worker
                raise exc
            raise exc from RemoteTraceback(text)
        return self.values[i]

    def read_reply(self, message: Any) -> None:
        """Take the worker's reply to the part of this job in flight (unpickled, or
        the exception unpickling it raised): its values and the errors of single calls,
        or the error that ended the whole request."""
        if isinstance(message, BaseException):
            # The worker replies in the order of the jobs: this reply is this job's.
            self.error = message
            return
        if message[0] == "ok":
            _, job_id, values, errors, self.seconds, shared_bytes, pickled = message
            assert job_id == self.id, (job_id, self.id)
            self.result_bytes += shared_bytes
            if pickled:
                values, errors = _unpickle_values(values, errors)
            if self.offset == 0:
                self.values, self.errors = values, errors
            else:  # a later part of a job that was cut
                self.values.extend(values)
                if errors:
                    shifted = {self.offset + i: error for i, error in errors.items()}
                    self.errors = {**(self.errors or {}), **shifted}
        else:
            _, job_id, (error, text) = message
            error.__cause__ = RemoteTraceback(text)
            self.error = error


def _unpickle_values(
    pickles: list[bytes], errors: dict[int, Error] | None
) -> tuple[list[Any], dict[int, Error] | None]:
    """The values a worker pickled one by one; one that can't be unpickled here fails
    its own call, with the unpickling error."""
    values: list[Any] = []
    for i, data in enumerate(pickles):
        try:
            values.append(pickle.loads(data))
        except Exception as exc:
            values.append(None)
            errors = dict(errors or {})
            errors[i] = (exc, "")
    return values, errors
