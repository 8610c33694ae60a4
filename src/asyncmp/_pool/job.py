"""A pool's unit of work: one request to a worker, what became of it, who gets it.

Made and queued by the job queue (``_pool.jobqueue``), sent and answered by a worker's
conversation (``_pool.conversation``), made from chunks of items and yielded by the map
(``_pool.map``). A job's state changes only through its methods (``assign()``,
``requeue()``, ``withdraw()``, ``finish()``...), each of which checks the state it leaves.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .protocol import OK
from .worker import Error, RemoteTraceback

if TYPE_CHECKING:
    from .._shared.shared import SegmentsMade

__all__ = ("ABANDONED", "DONE", "QUEUED", "SENT", "WITHDRAWN", "Assignee", "Job")

# A job's states. It leaves QUEUED only for SENT (in the worker task that takes it),
# WITHDRAWN (its caller went away: it never runs) or DONE (the pool closed or broke).
# It leaves SENT only for DONE (its outcome was delivered) or ABANDONED (its caller
# went away after it was sent: its reply, when it comes, is dropped).
QUEUED = 0
SENT = 1
DONE = 2
WITHDRAWN = 3
ABANDONED = 4


class Assignee(Protocol):
    """What a job knows of the worker it was sent to: how to kill it."""

    def doom(self) -> None:
        """Kill the worker at once (``kill_on_cancel``); it takes no more jobs."""


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
        #: May be sent to a worker along with other calls (see Slot._batch).
        self.batchable = False
        self.payload: Any = b""
        self.state = QUEUED
        self.slot: Assignee | None = None
        self.elapsed = 0.0  # seconds from send to reply
        #: Seconds the part in flight took in the worker (from its reply; 0 if it failed).
        self.seconds = 0.0
        self.values: list[Any] = []
        self.errors: dict[int, Error] | None = None
        #: Set if the whole job failed (the worker died, the pool closed, ...).
        self.error: BaseException | None = None
        #: What the payload holds, kept to send a part of it (see Slot._take): the
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

    @classmethod
    def failed(cls, size: int, error: BaseException, deliver: Callable[[Job], None]) -> Job:
        """A job of *size* calls that failed with *error* before it was sent: DONE, and
        never queued (its *deliver* is not called)."""
        job = cls(-1, size, deliver)
        job.state = DONE
        job.error = error
        return job

    @property
    def left(self) -> int:
        """Calls not yet answered."""
        return self.size - self.offset

    @property
    def queued(self) -> bool:
        """Waiting for a worker, still wanted."""
        return self.state == QUEUED

    @property
    def sent(self) -> bool:
        """A part of it is in a worker, still wanted."""
        return self.state == SENT

    @property
    def done(self) -> bool:
        """Its outcome was delivered (or it failed before it was sent)."""
        return self.state == DONE

    # -- state changes ---------------------------------------------------------------

    def assign(self, slot: Assignee, part: int) -> None:
        """QUEUED -> SENT: *part* calls of it, from :attr:`offset` on, go to *slot*."""
        assert self.state == QUEUED, self.state
        self.state = SENT
        self.slot = slot
        self.part = part

    def requeue(self) -> None:
        """SENT -> QUEUED: the part in flight was not run (its worker died before it got
        it) or was answered with calls left (it was cut): back in the queue."""
        assert self.state == SENT, self.state
        self.state = QUEUED
        self.slot = None
        self.part = 0

    def answered(self) -> None:
        """The part in flight was answered: its calls count as done."""
        self.offset += self.part
        self.part = 0

    def withdraw(self, *, kill: bool = False) -> int:
        """Its caller went away. QUEUED -> WITHDRAWN: it never runs, and the calls left,
        which this returns, leave the queue; SENT -> ABANDONED: its reply will be dropped
        (with *kill*, its worker is killed at once), and this returns 0. Else nothing."""
        if self.state == QUEUED:
            self.state = WITHDRAWN
            left = self.left
            self.discard_unsent(self.offset)
            return left
        if self.state == SENT:
            self.state = ABANDONED
            slot = self.slot
            if kill and slot is not None:
                slot.doom()
        return 0

    def release(self) -> None:
        """Nothing more of it will be sent: drop its arguments, which may be large."""
        self.payload = b""
        self.fn, self.arglist, self.made = None, [], None

    def finish(self, error: BaseException | None = None) -> None:
        """-> DONE, with *error* if given, and deliver the outcome to its caller (if it is
        still wanted: a withdrawn or abandoned job is never delivered)."""
        if self.state not in (QUEUED, SENT):
            return
        if error is not None:
            self.error = error
        self.state = DONE
        self.deliver(self)

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
        if message[0] == OK:
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
