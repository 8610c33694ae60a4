"""The reader-lock protocol of a multiprocessing queue, as an async consumer plays it.

Every consumer of a multiprocessing queue, in any process, takes the queue's reader lock
(``Queue._rlock``), reads exactly one frame and lets the lock go. Consumers in other
processes may be plain synchronous code, so an async consumer plays by the same rules,
without a thread per pending ``get``. :class:`ReaderLock` is that protocol, and nothing
else; it knows neither pipes nor frames, so it can be tested alone with a fake lock.

* **Take without blocking** (:meth:`ReaderLock.take_nowait`): the common case, no thread.
* **Queue for it when contended** (:meth:`ReaderLock.take_contended`): once another
  consumer is found holding the lock, this adapter waits for it the way a sync consumer
  does, in a blocking ``acquire`` in a kept thread, queued inside the kernel with the
  others. A getter that only polled the lock would lose every race against consumers
  queued in the kernel. The thread hands the lock over under a guard, so a getter that
  gives up (cancelled) either never gets it or lets it go at once: never both, never kept.
* **Keep it while contended** (:meth:`ReaderLock.item_done`): after an item, a contended
  lock is kept until the event loop's next turn, for a get that follows at once (as a
  sync consumer looping on ``get()`` keeps its place), and let go then unless the owner
  still uses it (a get runs, or an item is half read: the lock is **never** let go in the
  middle of a frame, or the next reader would start inside it). Uncontended, it goes at
  once.
* **Outside a loop** (a sync method called after the loop ended) there is no next turn:
  the lock goes at once. A release scheduled in a loop that has ended since never runs,
  so the next loop schedules its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
from anyio.lowlevel import current_token

from .._core.loop import call_soon
from .._core.threads import THREAD_SLICE, BlockingCall, KeptThread, run_blocking
from .state import QueueState

__all__ = ("ReaderLock", "acquire_blocking")


def acquire_blocking(lock: Any, timeout: float) -> bool:
    """Take *lock* in a thread, waiting up to *timeout* seconds (0: don't wait).

    The one blocking take of a queue's reader lock, for every thread-route get."""
    return bool(lock.acquire(True, timeout) if timeout > 0 else lock.acquire(False))


class _Handoff:
    """The reader lock, acquired by a thread on behalf of a getter that may give up."""

    __slots__ = ("acquired", "guard")

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.acquired = False


class ReaderLock:
    """A queue's cross-process reader lock, as held by one async adapter.

    :param lock: the cross-process lock (``acquire(block, timeout)``, ``release()``).
    :param in_use: says whether the owner still needs the lock: a get of the owner is
        running, or an item is half read. A deferred release leaves the lock then.
    """

    __slots__ = ("_in_use", "_scheduled", "_thread", "contended", "held", "lock")

    def __init__(self, lock: Any, in_use: Callable[[], bool]) -> None:
        self.lock = lock
        self._in_use = in_use
        #: True while this adapter holds the lock.
        self.held = False
        #: Set once the lock is found held by another consumer. From then on a get takes
        #: (or queues for) the lock before it waits for data, as a sync consumer does;
        #: otherwise a sync consumer that waits for data while holding the lock would
        #: take every item.
        self.contended = False
        #: The event loop in which a release is scheduled, if any.
        self._scheduled: Any = None
        # Kept between calls: a new thread per contended acquire costs more than an item.
        self._thread = KeptThread("asyncmp-queue-rlock")

    def take_nowait(self) -> bool:
        """Take the lock if it is free now; True if this adapter holds it."""
        if self.lock.acquire(False):
            self.held = True
            return True
        return False

    async def take_contended(self, state: QueueState) -> None:
        """Another consumer holds the lock: queue for it in the kernel, in a kept
        thread, as a sync consumer does, and take it.

        If cancelled, the lock is not held (a lock the thread won meanwhile is let go).
        :raises anyio.ClosedResourceError: the adapter was closed meanwhile.
        """
        self.contended = True
        lock = self.lock
        handoff = _Handoff()

        def acquire(call: BlockingCall[bool]) -> bool:
            while not call.stopping:
                if lock.acquire(True, THREAD_SLICE):
                    with handoff.guard:
                        if call.stop_requested():
                            lock.release()
                            return False
                        handoff.acquired = True
                    return True
            return False

        def give_back(call: BlockingCall[bool]) -> None:
            # Cancelled: a lock the thread won meanwhile is let go, under the guard, so
            # that the thread either sees the stop and lets go itself, or hands it over.
            with handoff.guard:
                if handoff.acquired:
                    handoff.acquired = False
                    lock.release()

        call = await run_blocking(
            acquire,
            name="asyncmp-queue-rlock",
            worker=self._thread,
            calls=state.calls,
            on_stop=give_back,
        )
        if not call.result():
            raise anyio.ClosedResourceError
        self.held = True
        if state.closed:  # closed while the lock was being handed over
            self.release()
            raise anyio.ClosedResourceError

    def release(self) -> None:
        """Let go of the lock now, if held."""
        if self.held:
            self.held = False
            self.lock.release()

    def released_elsewhere(self) -> None:
        """A thread that finished an item for this adapter let go of the lock itself, once
        the item was whole (:attr:`held` said it was this adapter's meanwhile, so that
        nothing in the loop let it go, or took it, a second time)."""
        self.held = False

    def item_done(self) -> None:
        """A whole item was read: let go of the lock, at the loop's next turn if contended.

        Contended, the lock is kept for a get that follows at once, as a sync consumer
        looping on ``get()`` keeps it; otherwise the consumer queued behind this one would
        win it back every time."""
        if self.contended:
            self.release_soon()
        elif self.held:  # release(), inlined: the fast path of every get comes here
            self.held = False
            self.lock.release()

    def release_soon(self) -> None:
        """Let go of the lock at the loop's next turn, unless the owner uses it by then
        (then the owner calls this again when done). Outside a running loop, at once."""
        try:
            loop = current_token().native_token
        except RuntimeError:  # anyio.NoEventLoopError (a RuntimeError) where it exists
            # No loop, so no next turn: a release scheduled in a loop that has ended
            # never ran either.
            self._scheduled = None
            self.release()
            return
        if self._scheduled is loop:
            return  # (one scheduled in a loop that has ended since never runs)
        try:
            call_soon(self._deferred_release)
        except RuntimeError:  # the loop is closing: no next turn is coming
            self.release()
            return
        self._scheduled = loop

    def _deferred_release(self) -> None:
        self._scheduled = None
        if not self._in_use():
            self.release()

    def close(self) -> threading.Thread | None:
        """End the kept thread once its call has returned; return it, to join."""
        return self._thread.close()
