"""What every part of an AsyncQueue shares: open or closed, broken or not, and the
blocking calls that :meth:`AsyncQueue.aclose` must stop.

The parts (the reader lock, the getters, the putter) each do one job; this small object is
all they know of one another.
"""

from __future__ import annotations

from typing import Any, NoReturn

import anyio

from ._threads import BlockingCall

__all__ = ("THREAD_SLICE", "QueueState")

#: How often a thread blocked on a lock or semaphore checks whether to give up (seconds).
THREAD_SLICE = 0.05


class QueueState:
    """The adapter's open/closed/broken state and its calls in flight."""

    __slots__ = ("broken", "calls", "closed", "stall_timeout")

    def __init__(self, stall_timeout: float) -> None:
        #: How long a reader or writer waits for progress in the middle of an item.
        self.stall_timeout = stall_timeout
        self.closed = False
        #: Why the queue can't be used any more (set once, by whichever part found it).
        self.broken: str | None = None
        #: Blocking calls in flight, which closing stops and waits for.
        self.calls: set[BlockingCall[Any]] = set()

    def check_open(self) -> None:
        """:raises anyio.ClosedResourceError: closed. :raises anyio.BrokenResourceError: broken."""
        if self.closed:
            raise anyio.ClosedResourceError
        if self.broken is not None:
            raise anyio.BrokenResourceError(self.broken)

    def fail(self, reason: str) -> NoReturn:
        """Mark the queue broken for *reason*, and raise that."""
        self.broken = reason
        raise anyio.BrokenResourceError(reason)
