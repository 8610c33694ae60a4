"""What every part of an AsyncQueue shares: open or closed, broken or not, and the
blocking calls that :meth:`AsyncQueue.aclose` must stop.

The parts (the reader lock, the getters, the putter) each do one job; this small object is
all they know of one another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import anyio

from .._core.threads import ThreadCalls

if TYPE_CHECKING:
    from .._core.loop import FairLock

__all__ = ("Getter", "QueueState")


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
        self.calls = ThreadCalls()

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


class Getter(Protocol):
    """What the facade asks of a route's getter (``FdGetter`` or ``ThreadGetter``)."""

    #: True on the thread route.
    uses_threads: bool
    #: Serialises the adapter's gets, first come, first served.
    get_lock: FairLock

    def held(self) -> int:
        """Items taken from the queue that the next gets return first."""

    async def get(self) -> Any:
        """The next item, waiting for it; with the get lock held."""

    def after_get(self) -> None:
        """A get ended, its get lock released."""

    def get_nowait(self) -> Any:
        """An item if one is there now; :raises queue.Empty: none is, or a get waits (it
        comes first)."""

    def get_more(self, items: list[Any], limit: int) -> None:
        """``get_many``: append up to *limit* items that are there now, never waiting."""

    def stop(self) -> None:
        """Closing, first step (every part's, before any waits): stop waiting."""

    async def aclose(self) -> bytes | None:
        """Closing, once the calls have returned: end the kept threads, finish an item
        begun under the reader lock (or collect the one a cancelled get left), and let go
        of the lock and the transport. Return the item's frame to put back, taken as a
        get takes an item (its slot let go); None if there is none. Shielded by the
        caller."""
