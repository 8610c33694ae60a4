"""AsyncQueue: await ``get``/``put`` on multiprocessing queues.

The fd route (POSIX ``Queue``, ``JoinableQueue``, ``SimpleQueue``)
--------------------------------------------------------------------
A multiprocessing queue is a pipe shared by every process that holds the queue, plus
a cross-process *reader lock*: a consumer takes the lock, reads exactly one frame and
releases it. Consumers in other processes may be plain synchronous code, so we play by
the same rules, without a thread per pending ``get``:

1. Wait until the pipe is readable, through the helper descriptor of ``_fdio`` (never
   touching the pipe's flags, which every worker shares).
2. Take the reader lock *without blocking*. If another process holds it, wait for it
   the way a sync consumer does: in a blocking ``acquire`` in one of asyncmp's threads,
   queued inside the kernel with the others. A getter that only polled the lock would
   lose every race against consumers queued in the kernel.
3. Read *exactly* one frame: ``FIONREAD`` says what is there, the decoder says what the
   frame still needs, and we never read more, because the next frame belongs to whoever
   takes the lock next. Once the first byte of a frame is consumed, the frame must be
   finished before the lock is released, or the next reader would start mid-frame. So
   that part is shielded from cancellation, bounded by ``stall_timeout`` without
   progress (a producer that died mid-put); a frame finished for a cancelled caller
   is kept for the next ``get``.
4. Release the lock, release the item semaphore (as ``Queue.get`` does), and unpickle
   outside the lock.

``put`` pickles in the caller, so an unpicklable object raises there and not later in
the feeder thread, then hands the pickle to the queue's own feeder thread. Waiting for
room in a bounded queue is a semaphore, which has no descriptor: a thread tries in
short time slices, and a cancelled put waits for that thread's current slice so that
"returned" and "enqueued" always agree.

The thread route (manager proxies, Windows, or on request) uses only public methods in
asyncmp's threads, with the same guarantees: a ``get`` abandoned on cancellation keeps
running and its item goes to the next ``get``.
"""

from __future__ import annotations

import errno
import inspect
import io
import multiprocessing
import multiprocessing.queues
import os
import pickle
import queue
import struct
import sys
import threading
import weakref
from collections import deque
from multiprocessing.reduction import ForkingPickler
from time import perf_counter as _perf_counter
from typing import TYPE_CHECKING, Any, Generic, NoReturn

import anyio
from anyio.abc import AsyncResource
from anyio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
)

from . import _mpinternals
from ._loop import TURN_INTERVAL, FairLock, call_soon, cancel_check, fast_checkpoint, turn_clock
from ._threads import THREAD_SLICE, BlockingCall, KeptThread
from ._wire import FrameDecoder, WireError

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:
    from typing_extensions import TypeVar

if TYPE_CHECKING or sys.platform != "win32":
    from ._fdio import FdTransport, ReadinessWaiter, open_transport, poller

if sys.platform != "win32":
    import select

    #: What polling a queue's write end says once no process holds its read end.
    _READERS_GONE = select.POLLERR | select.POLLHUP
else:  # pragma: no cover
    _READERS_GONE = 0

__all__ = ("DEFAULT_STALL_TIMEOUT", "AsyncQueue", "JoinableQueue", "Queue", "SimpleQueue")

#: What an AsyncQueue carries; ``Any`` unless the code says otherwise.
T = TypeVar("T", default=Any)

#: How long a get waits for the rest of an item whose first bytes it has read.
DEFAULT_STALL_TIMEOUT = 10.0
#: Unpickles an item's frame (the stdlib's ``Queue.get()`` uses ``ForkingPickler.loads``,
#: which is ``pickle.loads``).
_unpickle_frame = pickle.loads
_HEADER = struct.Struct("!i")
#: The most one read of a big item takes before the event loop gets a turn.
_READ_BUDGET = 4 << 20
_NO_READERS = "nobody reads this queue any more: every read end is closed"


class _Prepickled:
    """An item pickled in the caller of ``put``; unpickles to the original object.

    The feeder thread pickles this wrapper into a call of ``pickle.loads`` on the bytes,
    so every consumer, sync or async, gets the original object back, and a pickling
    error surfaced in ``put`` instead of in the feeder thread.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return pickle.loads, (self.data,)


class _Failed:
    """Thread route: the error of an item that failed to unpickle in a ``get_many``,
    kept in its place so that the next ``get`` raises it."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error

    @staticmethod
    def unwrap(item: Any) -> Any:
        if type(item) is _Failed:
            error = item.error
            raise error
        return item


class _LockHandoff:
    """The reader lock, acquired by a thread on behalf of a getter that may give up."""

    __slots__ = ("acquired", "guard")

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.acquired = False


def _queue_like(q: object) -> bool:
    """Has the blocking ``get`` and ``put`` of a queue (a manager's proxy has no more to
    tell it by), and is no asyncio queue, whose are coroutines."""
    get = getattr(q, "get", None)
    put = getattr(q, "put", None)
    return (
        callable(get)
        and callable(put)
        and not inspect.iscoroutinefunction(get)
        and not inspect.iscoroutinefunction(put)
    )


def _not_a_queue(q: object) -> TypeError:
    if isinstance(q, AsyncQueue):
        return TypeError(
            "this is already an AsyncQueue: use it as it is, or wrap its plain queue "
            "(its .queue) only once"
        )
    message = (
        "AsyncQueue wraps a multiprocessing Queue, JoinableQueue or SimpleQueue (of any "
        "context) or a Manager().Queue() proxy, "
        f"not {type(q).__module__}.{type(q).__qualname__}"
    )
    if callable(getattr(q, "recv_bytes", None)):
        message += "; for a Connection, use AsyncConnection"
    return TypeError(message)


class AsyncQueue(AsyncResource, Generic[T]):
    """Async adapter for a ``multiprocessing`` ``Queue``, ``JoinableQueue``,
    ``SimpleQueue`` (from any context) or a ``Manager().Queue()`` proxy.

    The processes on the other side keep using the plain queue (:attr:`queue`): an
    AsyncQueue belongs to the process that made it, and pickling it, or passing it to
    a spawned child, raises ``TypeError``. ``async with`` calls :meth:`aclose` on the
    way out.

    ``AsyncQueue[T]`` says what it carries: :meth:`get` returns ``T`` and :meth:`put`
    takes one (``Any`` without a type argument; nothing is checked at run time).

    :param use_threads: ``None`` picks the route: the fd route for multiprocessing
        queues on POSIX, threads for anything else. ``True`` forces threads.
    :param stall_timeout: how long a ``get`` that has read part of an item waits for
        the rest before it reports ``anyio.BrokenResourceError`` (the producer died
        mid-put).
    :raises TypeError: *q* is not a queue.
    """

    def __init__(
        self,
        q: Any,
        *,
        use_threads: bool | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        if isinstance(q, AsyncQueue) or not _queue_like(q):
            raise _not_a_queue(q)
        self._q = q
        self._stall_timeout = stall_timeout
        self._parts = None if use_threads else _mpinternals.queue_parts(q)
        self._joinable = _mpinternals.joinable_parts(q)
        self._is_mp_queue = isinstance(q, multiprocessing.queues.Queue)
        # Items taken from the queue but not yet handed out (kept across cancellation):
        # raw frames on the fd route, objects on the thread route.
        self._kept: deque[Any] = deque()
        self._get_lock = FairLock()
        self._closed = False
        self._broken: str | None = None
        self._calls: set[BlockingCall[Any]] = set()
        self._pending_get: BlockingCall[Any] | None = None
        # One thread each for the gets of the thread route and for the reader lock of the
        # fd route, kept between calls: a new thread per call costs more than an item.
        self._get_worker = KeptThread("asyncmp-queue-get")
        self._rlock_worker = KeptThread("asyncmp-queue-rlock")
        # Thread route, POSIX: the item a get_nowait() found partly written, read so far;
        # the reader lock stays taken with it until a get finishes it.
        self._partial: FrameDecoder | None = None
        # Knowing that nobody reads the queue any more (see _check_readers).
        self._feeder_error: Exception | None = None
        self._writer = _mpinternals.queue_writer(q)
        self._writer_poll: Any = None
        if self._writer is not None:
            self._writer_poll = poller(self._writer.fileno(), writable=True)
        if self._is_mp_queue:
            method = weakref.WeakMethod(self._feeder_failed)
            _mpinternals.hook_feeder_errors(q, lambda e: (m := method()) is not None and m(e))
        # get() may try _take_whole_frame() first: the fd route, open and not broken.
        self._fast_route = self._parts is not None
        if self._parts is not None:
            self._fd = self._parts.reader.fileno()
            self._transport: FdTransport = open_transport(self._fd)
            self._waiter: ReadinessWaiter | None = None
            self._decoder = FrameDecoder(None)
            self._rlock_held = False
            # Set once the lock is found held by another consumer. From then on a get
            # takes (or queues for) the lock before it waits for data, as a sync
            # consumer does; otherwise a sync consumer that waits for data while
            # holding the lock would take every item.
            self._contended = False
            self._release_scheduled = False

    # -- introspection ------------------------------------------------------------------

    @property
    def queue(self) -> Any:
        """The wrapped queue, for the processes on the other side."""
        return self._q

    @property
    def uses_threads(self) -> bool:
        return self._parts is None

    def qsize(self) -> int:
        """Items in the queue plus items this adapter took and still holds.

        :raises NotImplementedError: where the platform can't count (macOS).
        """
        return int(self._q.qsize()) + self._held()

    def empty(self) -> bool:
        return not self._held() and bool(self._q.empty())

    def _held(self) -> int:
        """Items taken from the queue that the next gets on this adapter return first."""
        call = self._pending_get  # thread route: a cancelled get's thread may hold one
        # Finished, not done: the thread may have ended before the loop heard of it.
        pending = call is not None and call.finished and call.error is None
        return len(self._kept) + pending

    def full(self) -> bool:
        return bool(self._q.full())

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._broken is not None:
            raise anyio.BrokenResourceError(self._broken)

    # -- getting ------------------------------------------------------------------------

    async def get(self, timeout: float | None = None) -> T:  # noqa: ASYNC109 (the stdlib's name)
        """Remove and return an item, waiting for one if needed.

        If cancelled (a timeout is a cancellation), no item was lost: either none was
        taken, or the item taken is kept and the next ``get`` on this adapter returns it.

        :raises queue.Empty: no item came within *timeout* seconds.
        :raises anyio.BrokenResourceError: a producer died mid-item (after
            ``stall_timeout``), or the queue's framing is corrupt.
        :raises anyio.ClosedResourceError: the adapter was closed.
        """
        if self._fast_route and not self._rlock_held:
            # The fast path: a cancellation check, then, if a whole item is in the pipe
            # and the reader lock is free, take it without a trip through the loop (a
            # full turn of the loop still comes about every millisecond). Not while this
            # adapter keeps the lock for this very get (won in a queue against other
            # consumers): the loop's turn here would let it go (_deferred_release), and
            # the consumers queued in the kernel would take it back every time.
            clock = turn_clock
            if _perf_counter() - clock.last >= TURN_INTERVAL:
                await checkpoint()
                clock.last = _perf_counter()
            else:
                await cancel_check()
            frame = self._take_whole_frame()
            if frame is not None:
                return _unpickle_frame(frame)  # type: ignore[no-any-return]
        if timeout is None:
            return await self._get()
        with anyio.move_on_after(timeout):
            return await self._get()
        raise queue.Empty

    async def _get(self) -> T:
        self._check_open()
        lock = self._get_lock
        await lock.acquire_fast()  # first come, first served
        try:
            if self._parts is not None:
                return self._unpickle(await self._get_frame())
            return await self._get_threaded()  # type: ignore[no-any-return]
        finally:
            lock.release()

    def _take_whole_frame(self) -> bytes | None:
        """The fd route's fast path: an item's frame if one is here whole, else None.

        Never waits. It takes the item only when no other task of this adapter is in a
        ``get`` (they come first), the reader lock is free, and ``FIONREAD`` says the
        whole frame is in the pipe. Anything else (a partial frame, a long header,
        contention) is left to the full path.
        """
        if self._get_lock.locked():
            return None
        if self._kept:
            return self._kept.popleft()  # type: ignore[no-any-return]
        parts = self._parts
        assert parts is not None
        if not parts.rlock.acquire(False):
            return None
        self._rlock_held = True
        avail = self._available()
        body = self._read_whole(avail)
        if body is not None:
            return self._took(body)
        if avail < 4 and not self._contended:
            self._release_rlock()
        # else: the lock stays ours, mid-frame (or queued for, as contended consumers
        # keep it while they wait): the full path goes on from here.
        return None

    def _unpickle(self, frame: bytes) -> T:
        return _unpickle_frame(frame)  # type: ignore[no-any-return]

    def get_nowait(self) -> T:
        """Return an item if one is there now.

        :raises queue.Empty: none is, or the reader lock is held elsewhere.
        """
        self._check_open()
        if self._get_lock.locked():
            raise queue.Empty
        if self._kept:
            item = self._kept.popleft()
            if self._parts is not None:
                return self._unpickle(item)
            return _Failed.unwrap(item)  # type: ignore[no-any-return]
        if self._parts is None:
            return self._get_nowait_threaded()  # type: ignore[no-any-return]
        if not self._rlock_held:
            if self._available() == 0 or not self._parts.rlock.acquire(False):
                raise queue.Empty
            self._rlock_held = True
        frame = self._read_available()
        if frame is None:
            if self._decoder.at_boundary:
                self._release_rlock()
            # else: a producer is mid-write; the lock and the partial item stay with
            # this adapter and the next get() finishes them.
            raise queue.Empty
        return self._unpickle(frame)

    async def get_many(self, max_items: int, timeout: float | None = None) -> list[T]:  # noqa: ASYNC109 (the stdlib's name)
        """Wait for at least one item, then take whatever else is there, up to
        *max_items*, without waiting longer.

        On the fd route the items after the first are read under one hold of the
        reader lock, with one ``FIONREAD``: only whole frames that are in the pipe, each
        read exactly, and unpickled once the lock is released.

        Cancellation and exceptions: as :meth:`get` (items taken before a cancellation
        are kept for the next ``get``). If an item after the first fails to unpickle,
        the items before it are returned, and the next ``get`` raises its error.

        :raises ValueError: *max_items* is less than 1.
        """
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        items = [await self.get(timeout)]
        if self._parts is None:
            while len(items) < max_items:
                try:
                    items.append(self.get_nowait())
                except queue.Empty:
                    break
                except Exception as exc:
                    self._kept.appendleft(_Failed(exc))  # for the next get() to raise
                    break
            return items
        frames = self._take_whole_frames(max_items - 1)
        for i, frame in enumerate(frames):
            try:
                items.append(self._unpickle(frame))
            except Exception:
                # Return what came before it; the next get() raises this one's error.
                self._kept.extendleft(reversed(frames[i:]))
                break
        return items

    def _take_whole_frames(self, limit: int) -> list[bytes]:
        """Up to *limit* frames that are already in the pipe whole, under one hold of the
        reader lock (the fd route; never waits)."""
        frames: list[bytes] = []
        kept = self._kept
        while kept and len(frames) < limit:
            frames.append(kept.popleft())
        parts = self._parts
        assert parts is not None
        if len(frames) == limit or self._closed or self._broken is not None:
            return frames
        if self._get_lock.locked() or not self._decoder.at_boundary:
            return frames  # other getters come first / a partial item is the next get's
        if not self._rlock_held:
            if not parts.rlock.acquire(False):
                return frames
            self._rlock_held = True
        avail = self._available()
        taken = 0
        while len(frames) < limit:
            body = self._read_whole(avail)
            if body is None:
                break  # a partial item stays with the lock, for the next get()
            avail -= 4 + len(body)
            frames.append(body)
            taken += 1
        if self._decoder.at_boundary:
            if self._contended:
                self._release_soon()
            else:
                self._release_rlock()
        if parts.sem is not None:
            for _ in range(taken):
                parts.sem.release()
        return frames

    # fd route ------------------------------------------------------------------------

    def _available(self) -> int:
        return self._transport.available()

    def _release_rlock(self) -> None:
        if self._rlock_held:
            self._rlock_held = False
            assert self._parts is not None
            self._parts.rlock.release()

    def _read_whole(self, avail: int) -> bytes | None:
        """The common case in two reads, with the lock held at a frame boundary and *avail*
        bytes in the pipe (``FIONREAD``): if the next frame is all there, read its header,
        then exactly its body, and return the body.

        Otherwise return None. Nothing was read if fewer than 4 bytes are there; else
        the bytes read went to the decoder (partial, negative or long form), and the
        frame is the lock holder's to finish.
        """
        if avail < 4:
            return None
        fd = self._fd
        header = os.read(fd, 4)
        (size,) = _HEADER.unpack(header)
        if 0 <= size <= avail - 4:
            body = os.read(fd, size) if size else b""
            if len(body) == size:
                return body
            self._decoder.feed(header + body)
        else:
            self._decoder.feed(header)
        return None

    def _read_available(self) -> bytes | None:
        """With the lock held: read no further than one frame; return it if whole."""
        decoder = self._decoder
        if decoder.at_boundary:
            body = self._read_whole(self._available())
            if body is not None:
                return self._took(body)
        budget = _READ_BUDGET
        while True:
            try:
                frame = decoder.next_frame()
            except WireError as exc:
                self._fail(f"corrupt queue framing: {exc}")
            if frame is not None:
                return self._took(frame)
            if budget <= 0:
                return None  # the caller gives the loop a turn, then comes back
            data = self._transport.read_some(min(decoder.bytes_wanted(), _READ_BUDGET))
            budget -= len(data) if data else 0
            if data is None:
                return None
            if not data:
                self._fail("the queue's pipe was closed mid-item")
            decoder.feed(data)

    def _took(self, frame: bytes) -> bytes:
        """A whole item was read: let go of the lock and count it, as ``Queue.get`` does."""
        if self._contended:
            # Keep the lock for a get that follows at once, as a sync consumer looping
            # on get() does; otherwise the consumer queued behind us wins the lock back
            # every time. Released at the loop's next turn unless a get holds it by then.
            self._release_soon()
        else:
            self._release_rlock()
        assert self._parts is not None
        if self._parts.sem is not None:
            self._parts.sem.release()
        return frame

    def _release_soon(self) -> None:
        if self._release_scheduled:
            return
        call_soon(self._deferred_release)
        self._release_scheduled = True

    def _deferred_release(self) -> None:
        self._release_scheduled = False
        if not self._get_lock.locked() and self._decoder.at_boundary:
            self._release_rlock()

    def _fail(self, reason: str) -> NoReturn:
        self._broken = reason
        self._fast_route = False
        if self._rlock_held:
            self._release_rlock()
        raise anyio.BrokenResourceError(reason)

    async def _wait_readable(self) -> None:
        if self._waiter is None:
            self._waiter = ReadinessWaiter(self._fd)
        await self._waiter.wait()

    async def _get_frame(self) -> bytes:
        if self._kept:
            await fast_checkpoint()
            return self._kept.popleft()  # type: ignore[no-any-return]
        await fast_checkpoint()
        assert self._parts is not None
        rlock = self._parts.rlock
        while True:
            self._check_open()
            if not self._rlock_held:
                if not self._contended and self._available() == 0:
                    await self._wait_readable()
                    if self._available() == 0:
                        # Readable, yet empty: another consumer took the item first.
                        # That is contention too; from now on queue for the lock.
                        self._contended = True
                    continue
                if not rlock.acquire(False):
                    # Another consumer holds the lock: queue for it in the kernel, as a
                    # sync consumer does. Waiting for data first would lose every item
                    # to a sync consumer that waits for data while holding the lock.
                    self._contended = True
                    await self._acquire_contended()
                self._rlock_held = True
                if self._closed:  # closed while the lock was being handed over
                    self._release_rlock()
                    raise anyio.ClosedResourceError
            frame = self._read_available()
            if frame is not None:
                return frame
            if not self._decoder.at_boundary:
                return await self._finish_frame()
            if self._contended:
                # Our turn, won in a queue: keep the lock and wait for the item, as the
                # sync consumer behind us would.
                try:
                    await self._wait_readable()
                except BaseException:
                    self._release_rlock()
                    raise
                continue
            # Somebody else took the item between readiness and the lock.
            self._release_rlock()

    async def _finish_frame(self) -> bytes:
        """Part of a frame is read and the lock is held: finish it, shielded."""
        frame: bytes | None = None
        with anyio.CancelScope(shield=True):
            while frame is None:
                with anyio.move_on_after(self._stall_timeout):
                    await self._wait_readable()
                    frame = self._read_available()
                    if frame is None:
                        await cancel_shielded_checkpoint()
                    continue
                self._fail(
                    f"a producer stopped mid-item: no progress for {self._stall_timeout} s "
                    f"with {self._decoder.buffered} bytes of it read"
                )
        assert frame is not None
        try:
            await checkpoint_if_cancelled()
        except BaseException:
            self._kept.append(frame)
            raise
        return frame

    async def _acquire_contended(self) -> None:
        """Wait for the reader lock in a thread, as a sync consumer would."""
        assert self._parts is not None
        rlock = self._parts.rlock
        handoff = _LockHandoff()

        def acquire(call: BlockingCall[bool]) -> bool:
            while not call.stopping:
                if rlock.acquire(True, THREAD_SLICE):
                    with handoff.guard:
                        if call.stop_requested():
                            rlock.release()
                            return False
                        handoff.acquired = True
                    return True
            return False

        call: BlockingCall[bool] = BlockingCall(
            acquire, name="asyncmp-queue-rlock", worker=self._rlock_worker
        )
        await call.start()
        self._calls.add(call)
        try:
            await call.wait()
        except BaseException:
            with handoff.guard:
                call.request_stop()
                if handoff.acquired:
                    handoff.acquired = False
                    rlock.release()
            raise
        finally:
            if call.done:
                self._calls.discard(call)
        if not call.result():
            raise anyio.ClosedResourceError

    # thread route --------------------------------------------------------------------

    async def _get_threaded(self) -> Any:
        if self._kept:
            await fast_checkpoint()
            return _Failed.unwrap(self._kept.popleft())
        call = self._pending_get
        if call is None:
            await checkpoint_if_cancelled()

            def blocking_get(c: BlockingCall[Any]) -> Any:
                while not c.stopping:
                    try:
                        return self._timed_get(THREAD_SLICE)
                    except queue.Empty:
                        continue
                raise anyio.ClosedResourceError

            call = BlockingCall(blocking_get, name="asyncmp-queue-get", worker=self._get_worker)
            await call.start()
            self._calls.add(call)
            self._pending_get = call
        await call.wait()  # if cancelled, the call goes on and the next get collects it
        self._pending_get = None
        self._calls.discard(call)
        self._check_open()
        try:
            return call.result()
        except anyio.BrokenResourceError as exc:
            self._broken = str(exc)
            raise

    def _timed_get(self, timeout: float) -> Any:
        """One get that gives up with ``queue.Empty`` after *timeout* (0: don't wait).

        A POSIX multiprocessing queue is read as the fd route reads it, only blocking:
        the reader lock, then exactly one frame, each wait for its next bytes bounded by
        ``stall_timeout``, so a producer that died mid-item can't hold this thread and
        the lock forever. Anything else goes through its own ``get``.
        """
        parts = _mpinternals.queue_parts(self._q)
        if parts is None:
            return _mpinternals.timed_get(self._q, timeout)
        rlock = parts.rlock
        decoder = self._partial
        if decoder is None:
            if not (rlock.acquire(True, timeout) if timeout > 0 else rlock.acquire(False)):
                raise queue.Empty
            decoder = FrameDecoder(None)
        # The lock is ours (taken now, or kept with a partial item by a get_nowait).
        self._partial = None
        fd = parts.reader.fileno()
        try:
            if timeout > 0 and decoder.at_boundary and not parts.reader.poll(timeout):
                raise queue.Empty
            # timeout 0 is get_nowait() in the event loop's thread: only what is there.
            frame = self._read_frame(fd, decoder, wait=timeout > 0)
            if frame is None:
                if not decoder.at_boundary:
                    self._partial = decoder  # the lock stays, for the next get
                raise queue.Empty
        finally:
            if self._partial is None:
                rlock.release()
        if parts.sem is not None:
            parts.sem.release()
        return _unpickle_frame(frame)

    def _read_frame(self, fd: int, decoder: FrameDecoder, *, wait: bool) -> bytes | None:
        """Go on with *decoder*'s frame; return it once whole.

        ``wait=False`` (in the event loop's thread): read only what is in the pipe now,
        at most ``_READ_BUDGET`` bytes, and return None if the frame is not whole by then.
        ``wait=True`` (in a thread): wait for the rest, each wait for more bytes bounded by
        ``stall_timeout``.
        """
        transport = open_transport(fd)
        waiter = poller(fd, writable=False) if wait else None
        budget = _READ_BUDGET
        try:
            while True:
                try:
                    frame = decoder.next_frame()
                except WireError as exc:
                    raise anyio.BrokenResourceError(f"corrupt queue framing: {exc}") from None
                if frame is not None or (waiter is None and budget <= 0):
                    return frame
                want = decoder.bytes_wanted()
                data = transport.read_some(want if waiter is not None else min(want, budget))
                if data is None:
                    if waiter is None:
                        return None
                    if not waiter.poll(self._stall_timeout * 1000):
                        raise anyio.BrokenResourceError(
                            f"a producer stopped mid-item: no progress for "
                            f"{self._stall_timeout} s with {decoder.buffered} bytes of it read"
                        )
                    continue
                if not data:
                    raise anyio.BrokenResourceError("the queue's pipe was closed mid-item")
                budget -= len(data)
                decoder.feed(data)
        finally:
            transport.close()

    def _get_nowait_threaded(self) -> Any:
        call = self._pending_get
        if call is not None:
            if not call.done:
                raise queue.Empty
            self._pending_get = None
            self._calls.discard(call)
            return call.result()
        return self._timed_get(0)

    # -- putting ------------------------------------------------------------------------

    def _prepare(self, obj: Any) -> Any:
        if self._is_mp_queue:
            # Pickle now: an unpicklable object raises here, not in the feeder thread.
            buf = io.BytesIO()
            ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
            return _Prepickled(buf.getvalue())
        return obj

    def _feeder_failed(self, exc: Exception) -> bool:
        """The queue's feeder thread could not write an item (in the feeder thread)."""
        if getattr(exc, "errno", None) != errno.EPIPE:
            return False  # not ours to judge: the queue prints it, as it always has
        self._feeder_error = exc
        return True

    def _check_readers(self) -> None:
        """Raise if no process holds the queue's read end any more.

        Then a put could only lose the item: the feeder thread would fail to write it
        (and print a traceback). The pipe tells: polling its write end reports an error
        (Linux) or a hangup once the last read end is closed. If the last reader goes
        after this check, the feeder's write fails; the hook records that quietly, and
        the item is lost, but the next put raises.
        """
        error = self._feeder_error
        if error is not None:
            raise anyio.BrokenResourceError(_NO_READERS) from error
        writer = self._writer
        if writer is not None and not writer.closed:
            for _, events in self._writer_poll.poll(0):
                if events & _READERS_GONE:
                    raise anyio.BrokenResourceError(_NO_READERS)

    def put_nowait(self, obj: T) -> None:
        """Put *obj* if there is room now.

        :raises queue.Full: a bounded queue is full.
        :raises pickle.PicklingError: (or what pickling raises) *obj* can't be pickled;
            nothing was put.
        :raises anyio.BrokenResourceError: no process reads the queue any more.
        """
        self._check_open()
        self._check_readers()
        item = self._prepare(obj)
        if isinstance(self._q, multiprocessing.queues.SimpleQueue):
            raise TypeError("a SimpleQueue has no put_nowait(); use await put()")
        self._q.put_nowait(item)

    async def put(self, obj: T, timeout: float | None = None) -> None:  # noqa: ASYNC109 (the stdlib's name)
        """Put *obj* into the queue, waiting for room in a bounded queue.

        If cancelled (a timeout is a cancellation), the item was not put; a put that
        returned did put it. *obj* is pickled here first, so an unpicklable object
        raises in the caller and nothing is put.

        :raises queue.Full: no room came within *timeout* seconds.
        :raises pickle.PicklingError: (or whatever pickling raises) *obj* can't be
            pickled; nothing was put.
        :raises anyio.ClosedResourceError: the adapter was closed.
        :raises anyio.BrokenResourceError: an earlier ``get`` found the queue broken, or
            no process reads the queue any more (every read end is closed; the consumer
            is gone). Then the item was not put.
        """
        self._check_open()
        self._check_readers()
        item = self._prepare(obj)
        plain_queue = self._is_mp_queue and not isinstance(
            self._q, multiprocessing.queues.JoinableQueue
        )
        if plain_queue:
            # Queue.put(block=False) only takes a semaphore and appends to the feeder's
            # buffer: it never blocks.
            await checkpoint_if_cancelled()
            try:
                self._q.put(item, False)
            except queue.Full:
                pass
            else:
                await cancel_shielded_checkpoint()
                return
        if timeout is None:
            await self._put_threaded(item)
            return
        with anyio.move_on_after(timeout):
            await self._put_threaded(item)
            return
        raise queue.Full

    async def _put_threaded(self, item: Any) -> None:
        q = self._q

        def blocking_put(c: BlockingCall[bool]) -> bool:
            if isinstance(q, multiprocessing.queues.SimpleQueue):
                try:
                    q.put(item)
                except BrokenPipeError as exc:
                    raise anyio.BrokenResourceError(_NO_READERS) from exc
                return True
            while not c.stopping:
                try:
                    q.put(item, True, THREAD_SLICE)
                    return True
                except queue.Full:
                    continue
            return False

        await checkpoint_if_cancelled()
        call: BlockingCall[bool] = BlockingCall(blocking_put, name="asyncmp-queue-put")
        await call.start()
        self._calls.add(call)
        try:
            await call.wait()
        except anyio.get_cancelled_exc_class():
            # Stop the thread and learn whether its last try got in: a put that got in
            # is reported as done, one that did not as cancelled. Never both.
            call.request_stop()
            with anyio.CancelScope(shield=True):
                await call.wait()
            self._calls.discard(call)
            if call.result():
                return
            raise
        self._calls.discard(call)
        if not call.result():
            raise anyio.ClosedResourceError

    # -- joinable queues ----------------------------------------------------------------

    def task_done(self) -> None:
        """As ``JoinableQueue.task_done()``."""
        self._q.task_done()

    async def join(self) -> None:
        """Wait until every item put has been marked done (``JoinableQueue.join``).

        If cancelled, nothing changed.

        :raises anyio.ClosedResourceError: the adapter was closed, before or during the wait.
        """
        self._check_open()
        parts = self._joinable
        q = self._q

        def blocking_join(c: BlockingCall[bool]) -> bool:
            if parts is None:
                q.join()
                return True
            cond, is_done = parts
            while not c.stopping:
                with cond:
                    if is_done():
                        return True
                    cond.wait(THREAD_SLICE)
            return False

        call: BlockingCall[bool] = BlockingCall(blocking_join, name="asyncmp-queue-join")
        await call.start()
        self._calls.add(call)
        try:
            await call.wait()
        except BaseException:
            call.request_stop()
            raise
        self._calls.discard(call)
        if not call.result():
            raise anyio.ClosedResourceError

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop this adapter and flush what this process put.

        Waiting tasks get ``anyio.ClosedResourceError``. For a multiprocessing
        ``Queue`` it then closes the queue *in this process* and waits, without
        blocking the loop, until the feeder thread has written everything this process
        put (as ``Queue.close()`` plus ``join_thread()``). Other processes keep their
        handles. Items this adapter took but did not hand out are dropped.

        If cancelled, the adapter is closed all the same; only the wait for the feeder
        stops, and the feeder goes on writing in the background. It raises nothing of
        its own.
        """
        if self._closed:
            await checkpoint()
            return
        self._closed = True
        self._fast_route = False
        if self._parts is not None and self._waiter is not None:
            self._waiter.close()
        calls = list(self._calls)
        for call in calls:
            call.request_stop()
        with anyio.CancelScope(shield=True):
            for call in calls:
                await call.wait()
            for call in calls:
                call.join()
            self._calls.clear()
            for worker in (self._get_worker, self._rlock_worker):
                thread = worker.close()
                if thread is not None:
                    thread.join()  # its calls have returned: it is on its way out
            if self._parts is not None:
                if self._rlock_held:
                    self._release_rlock()
                self._transport.close()
            if self._partial is not None:  # thread route: a partial item held the lock
                self._partial = None
                parts = _mpinternals.queue_parts(self._q)
                assert parts is not None
                parts.rlock.release()
        await self._flush()

    async def _flush(self) -> None:
        """Close the queue in this process and wait for its feeder to write it all.

        If cancelled, the feeder goes on writing in the background, as after
        ``Queue.close()`` without ``join_thread()``.
        """
        q = self._q
        if isinstance(q, multiprocessing.queues.SimpleQueue):
            q.close()
        if not isinstance(q, multiprocessing.queues.Queue):
            await checkpoint()
            return
        q.close()
        feeder = _mpinternals.feeder_thread(q)
        if feeder is None or not feeder.is_alive():
            await checkpoint()
            return

        def wait_for_feeder(c: BlockingCall[None]) -> None:
            while feeder.is_alive() and not c.stopping:
                feeder.join(THREAD_SLICE)

        call: BlockingCall[None] = BlockingCall(wait_for_feeder, name="asyncmp-queue-flush")
        await call.start()
        try:
            await call.wait()
        finally:
            call.request_stop()
            call.join()

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "an AsyncQueue can't be pickled or passed to another process: pass its .queue "
            "instead, the plain multiprocessing queue, and wrap that in an AsyncQueue there "
            "if that process is async"
        )

    def __repr__(self) -> str:
        route = "threads" if self.uses_threads else "fd"
        return f"<asyncmp.AsyncQueue route={route} queue={self._q!r}>"


def Queue(maxsize: int = 0, *, context: Any = None, **kwargs: Any) -> AsyncQueue[Any]:
    """Create a ``multiprocessing.Queue`` and its adapter in one step."""
    ctx = context if context is not None else multiprocessing.get_context()
    return AsyncQueue(ctx.Queue(maxsize), **kwargs)


def JoinableQueue(maxsize: int = 0, *, context: Any = None, **kwargs: Any) -> AsyncQueue[Any]:
    """Create a ``multiprocessing.JoinableQueue`` and its adapter in one step."""
    ctx = context if context is not None else multiprocessing.get_context()
    return AsyncQueue(ctx.JoinableQueue(maxsize), **kwargs)


def SimpleQueue(*, context: Any = None, **kwargs: Any) -> AsyncQueue[Any]:
    """Create a ``multiprocessing.SimpleQueue`` and its adapter in one step."""
    ctx = context if context is not None else multiprocessing.get_context()
    return AsyncQueue(ctx.SimpleQueue(), **kwargs)
