"""The thread route of an AsyncQueue's gets (manager proxies, Windows, or on request).

It uses only public methods, in a kept thread, with the fd route's guarantees: a ``get``
abandoned on cancellation stops at its next time slice, and an item its thread took
before that goes to the next ``get``. A POSIX multiprocessing queue is read as the fd
route reads it, only blocking (the reader lock, then exactly one frame, each wait for more
bytes bounded by ``stall_timeout``), so a producer that died mid-item can't hold the
thread and the lock forever.
"""

from __future__ import annotations

import queue
import sys
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
from anyio.lowlevel import checkpoint_if_cancelled

from .._core import mpinternals as _mpinternals
from .._core.frames import ExactReader
from .._core.loop import FairLock, fast_checkpoint
from .._core.mpinternals import QueueParts
from .._core.threads import THREAD_SLICE, BlockingCall, KeptThread, wait_or_stop
from .._core.wire import dumps
from .fdget import finish_in_thread, unpickle_frame
from .rlock import acquire_blocking
from .state import QueueState

if TYPE_CHECKING or sys.platform != "win32":
    from .._core.readiness import poller
    from .._core.transport import FdTransport, open_transport

__all__ = ("ThreadGetter",)

#: What a get's thread returns when it stopped without taking an item.
_STOPPED: Any = object()


class _Failed:
    """The error of an item that failed to unpickle in a ``get_many``, kept in its place
    so that the next ``get`` raises it."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error

    @staticmethod
    def unwrap(item: Any) -> Any:
        if type(item) is _Failed:
            error = item.error
            raise error
        return item


class ThreadGetter:
    """The gets of the thread route: objects, from the queue's own blocking calls.

    ``kept`` holds items taken but not handed out yet (each as it would be returned, or
    the error the next get raises in its place).
    """

    uses_threads = True

    def __init__(self, q: Any, parts: QueueParts | None, state: QueueState) -> None:
        self._q = q
        self._state = state
        #: Serialises this adapter's gets, first come, first served.
        self.get_lock = FairLock()
        self.kept: deque[Any] = deque()
        #: The get whose thread runs (a cancelled get's, which the next get collects).
        self._pending: BlockingCall[Any] | None = None
        # One thread for the gets, kept between calls: a new thread per call costs more
        # than an item.
        self._thread = KeptThread("asyncmp-queue-get")
        self._parts = parts  # a POSIX multiprocessing queue
        # Reads its frames; a frame a get_nowait() found partly written stays in it, with
        # the reader lock, until a get finishes it.
        self._reader: ExactReader | None = None
        self._transport: FdTransport | None = None
        if self._parts is not None:
            self._fd = self._parts.reader.fileno()
            self._transport = open_transport(self._fd)
            self._reader = ExactReader(self._transport)
            self._readable = poller(self._fd, writable=False)
        # A SimpleQueue without the fd route (Windows) has no get with a timeout of its
        # own: one is rebuilt from its reader lock and read end.
        self._simple = _mpinternals.simple_queue_ends(q)

    def held(self) -> int:
        """Items taken from the queue that the next gets return first."""
        call = self._pending  # a cancelled get's thread may hold one
        # Finished, not done: the thread may have ended before the loop heard of it.
        pending = (
            call is not None
            and call.finished
            and call.error is None
            and call.result() is not _STOPPED
        )
        return len(self.kept) + pending

    def after_get(self) -> None:
        """A get ended (nothing to do on this route)."""

    async def get(self) -> Any:
        """The next item, waiting for it in a thread. Called with the get lock held."""
        if self.kept:
            await fast_checkpoint()
            return _Failed.unwrap(self.kept.popleft())
        state = self._state
        while True:
            call = self._pending
            if call is None:
                await checkpoint_if_cancelled()

                def blocking_get(c: BlockingCall[Any]) -> Any:
                    while not c.stopping:
                        try:
                            return self.timed_get(THREAD_SLICE)
                        except queue.Empty:
                            continue
                    return _STOPPED

                call = await state.calls.start(
                    blocking_get, name="asyncmp-queue-get", worker=self._thread
                )
                self._pending = call
            # Cancelled (a timeout too): the thread stops at its next time slice, unless
            # it has taken an item by then; the next get collects that one.
            await wait_or_stop(call)
            self._pending = None
            state.check_open()
            try:
                item = call.result()
            except anyio.BrokenResourceError as exc:
                state.broken = str(exc)
                raise
            if item is not _STOPPED:
                return item
            # A get cancelled before ours stopped without an item: start a new one.

    def get_nowait(self) -> Any:
        """An item if one is there now, unless another get of this adapter waits (it
        comes first). Outside a running loop too.

        :raises queue.Empty: none is, or a get waits.
        """
        if self.get_lock.locked():
            raise queue.Empty
        if self.kept:
            return _Failed.unwrap(self.kept.popleft())
        call = self._pending
        if call is not None:
            # Finished, not done: outside a loop (or before it ran again) the loop never
            # hears of it, and the item is there all the same.
            if not call.finished:
                raise queue.Empty
            self._pending = None
            self._state.calls.forget(call)
            item = call.result()
            if item is not _STOPPED:
                return item
        return self.timed_get(0)

    def get_more(self, items: list[Any], limit: int) -> None:
        """``get_many``: append up to *limit* items that are there now, never waiting. If
        one fails to unpickle, the next get raises its error."""
        state = self._state
        while limit > 0 and not state.closed and state.broken is None:
            try:
                items.append(self.get_nowait())  # (none while other getters wait)
            except queue.Empty:
                return
            except Exception as exc:
                self.kept.appendleft(_Failed(exc))  # for the next get() to raise
                return
            limit -= 1

    def timed_get(self, timeout: float) -> Any:
        """One get that gives up with ``queue.Empty`` after *timeout* (0: don't wait; that
        is get_nowait() in the event loop's thread: only what is there)."""
        reader = self._reader
        if reader is None:
            return self._plain_timed_get(timeout)
        parts = self._parts
        assert parts is not None
        parts.reader.fileno()  # raises OSError once this process closed the read end
        rlock = parts.rlock
        # Mid-frame, the lock is ours already (kept with a partial item by a get_nowait).
        if reader.at_boundary and not acquire_blocking(rlock, timeout):
            raise queue.Empty
        try:
            if timeout > 0:
                if reader.at_boundary and not parts.reader.poll(timeout):
                    raise queue.Empty
                stall = self._state.stall_timeout
                frame: bytes | None = reader.read_blocking(self._readable, stall)
            else:
                frame = reader.read_available()
            if frame is None:
                raise queue.Empty  # (mid-frame: the lock stays, for the next get)
        except queue.Empty:
            raise
        except BaseException:  # broken: the frame begun is given up on, with the lock
            reader.reset()
            raise
        finally:
            if reader.at_boundary:
                rlock.release()
        if parts.sem is not None:
            parts.sem.release()
        return unpickle_frame(frame)

    def _plain_timed_get(self, timeout: float) -> Any:
        simple = self._simple
        if simple is None:
            return self._q.get(True, timeout) if timeout > 0 else self._q.get_nowait()
        rlock, reader = simple
        if not acquire_blocking(rlock, timeout):
            raise queue.Empty
        try:
            if not reader.poll(timeout):
                raise queue.Empty
            data = reader.recv_bytes()
        finally:
            rlock.release()
        return unpickle_frame(data)

    # -- closing ------------------------------------------------------------------------

    def stop(self) -> None:
        """First step of closing (nothing to do on this route)."""

    async def aclose(self) -> bytes | None:
        """Once the calls have returned: end the kept thread, finish a frame begun under
        the reader lock (see :meth:`_finish_partial`), and let go of the transport.
        Returns the item to put back, if any."""
        thread = self._thread.close()
        if thread is not None:
            thread.join()  # its calls have returned: it is on its way out
        frame = await self._finish_partial()
        if self._transport is not None:
            self._transport.close()
        return frame

    async def _finish_partial(self) -> bytes | None:
        """Finish a frame a get_nowait() read into, and let go of the lock.

        Or return, pickled again, the item that a cancelled get's thread took and no get
        collected, to be put back (as on the fd route; only a POSIX multiprocessing queue
        can take it back: elsewhere it is dropped). Either is taken as a get takes an
        item, its slot let go; the put-back takes a slot again."""
        reader = self._reader
        call, self._pending = self._pending, None
        if reader is not None and call is not None and call.finished and call.error is None:
            item = call.result()
            if item is not _STOPPED:
                try:
                    return dumps(item)  # (its slot was let go when the thread took it)
                except Exception:  # it pickled once, but may not again: dropped
                    return None
        if reader is None or reader.at_boundary:
            return None
        frame = await finish_in_thread(reader, self._fd, self._state)
        parts = self._parts
        assert parts is not None
        parts.rlock.release()
        if frame is not None and parts.sem is not None:
            parts.sem.release()  # taken whole, as Queue.get counts it
        return frame
