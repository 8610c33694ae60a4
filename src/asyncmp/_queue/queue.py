"""AsyncQueue: await ``get``/``put`` on multiprocessing queues.

A multiprocessing queue is a pipe shared by every process that holds the queue, plus a
cross-process *reader lock*: a consumer takes the lock, reads exactly one frame and lets
it go. Consumers and producers in other processes may be plain synchronous code, so an
AsyncQueue plays by the same rules, without a thread per pending ``get``.

:class:`AsyncQueue` is a thin facade. Each job is a part of its own:

* :mod:`.rlock`: the reader-lock protocol (take without blocking; once
  contended, queue for it in the kernel from a kept thread; keep it until the loop's
  next turn; never let it go mid-frame).
* :mod:`.fdget`: the fd route's gets (POSIX ``Queue``, ``JoinableQueue``,
  ``SimpleQueue``): the fast path, exact frame reads, the rest of a cancelled get's item
  read in a kept thread and kept for the next get.
* :mod:`.threadget`: the thread route's gets (manager proxies, Windows, or on
  request), in a kept thread, with the same guarantees.
* :mod:`.put`: pickling, the feeder's errors, the no-readers check, the frame
  writer of a ``SimpleQueue``, threaded puts, ``join``, the flush on close, and the
  put-back of an item the adapter took and did not hand out.

The route is chosen once, when the adapter is made: its getter.
"""

from __future__ import annotations

import inspect
import multiprocessing
import queue
import sys
from typing import Any, Generic, NoReturn

import anyio
from anyio.abc import AsyncResource
from anyio.lowlevel import checkpoint

from .._core import mpinternals as _mpinternals
from .._core.loop import LoopBinding, checkpoint_due, full_checkpoint, thread_id
from .fdget import FdGetter, unpickle_frame
from .put import Putter
from .state import Getter, QueueState
from .threadget import ThreadGetter

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:
    from typing_extensions import TypeVar

__all__ = ("DEFAULT_STALL_TIMEOUT", "AsyncQueue", "JoinableQueue", "Queue", "SimpleQueue")

#: What an AsyncQueue carries; ``Any`` unless the code says otherwise.
T = TypeVar("T", default=Any)

#: How long a get waits for the rest of an item whose first bytes it has read.
DEFAULT_STALL_TIMEOUT = 10.0


_WRAPS = (
    "AsyncQueue wraps a multiprocessing Queue, JoinableQueue or SimpleQueue (of any "
    "context) or a Manager().Queue() proxy"
)
_ALREADY_WRAPPED = (
    "this is already an AsyncQueue: use it as it is, or wrap its plain queue (its .queue) only once"
)
_NOT_PICKLABLE = (
    "an AsyncQueue can't be pickled or passed to another process: pass its .queue "
    "instead, the plain multiprocessing queue, and wrap that in an AsyncQueue there "
    "if that process is async"
)


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
    """The error for an object that is no queue AsyncQueue can wrap, with what to do."""
    if isinstance(q, AsyncQueue):
        return TypeError(_ALREADY_WRAPPED)
    hint = "; for a Connection, use AsyncConnection" if hasattr(q, "recv_bytes") else ""
    what = f"{type(q).__module__}.{type(q).__qualname__}"
    return TypeError(f"{_WRAPS}, not {what}{hint}")


class AsyncQueue(AsyncResource, Generic[T]):
    """Async adapter for a ``multiprocessing`` ``Queue``, ``JoinableQueue``,
    ``SimpleQueue`` (from any context) or a ``Manager().Queue()`` proxy.

    The processes on the other side keep using the plain queue (:attr:`queue`): an
    AsyncQueue belongs to the process that made it, and pickling it, or passing it to
    a spawned child, raises ``TypeError``. ``async with`` calls :meth:`aclose` on the
    way out.

    ``AsyncQueue[T]`` says what it carries: :meth:`get` returns ``T`` and :meth:`put`
    takes one (``Any`` without a type argument; nothing is checked at run time).

    An AsyncQueue belongs to the event loop that first awaits one of its methods, for as
    long as that loop runs: an awaited method called from a loop in another thread
    meanwhile raises ``RuntimeError`` at once, which says how to call it through its own
    loop (``anyio.from_thread.run`` with that loop's token, or a ``BlockingPortal``). Once
    that loop has ended, the next loop to use it takes it over. The methods that are not
    awaited are not checked.

    :param use_threads: ``None`` picks the route: the fd route for multiprocessing
        queues on POSIX, threads for anything else. ``True`` forces threads.
    :param stall_timeout: how long a ``get`` that has read part of an item waits for
        the rest (or, once it was cancelled, the thread that reads the rest for it) before
        it reports ``anyio.BrokenResourceError`` (the producer died mid-put).
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
        self._state = QueueState(stall_timeout)
        # What the parts need of a POSIX multiprocessing queue, found once (None: not one).
        parts = _mpinternals.queue_parts(q)
        # The route, chosen once: its getter. _fast is the fd getter, whose whole frames
        # get() may take without a trip through the loop.
        self._fast: FdGetter | None = None
        self._getter: Getter
        if parts is not None and not use_threads:
            self._getter = self._fast = FdGetter(parts, self._state)
        else:
            self._getter = ThreadGetter(q, parts, self._state)
        self._putter = Putter(q, parts, self._state)
        self._owner = LoopBinding("this AsyncQueue")

    # -- introspection ------------------------------------------------------------------

    @property
    def queue(self) -> Any:
        """The wrapped queue, for the processes on the other side."""
        return self._q

    @property
    def uses_threads(self) -> bool:
        """True on the thread route, chosen when the adapter was made."""
        return self._getter.uses_threads

    def qsize(self) -> int:
        """Items in the queue plus items this adapter took and still holds.

        May be called outside a running event loop.

        :raises NotImplementedError: where the platform can't count (macOS).
        """
        return int(self._q.qsize()) + self._getter.held()

    def empty(self) -> bool:
        """True if neither the queue nor this adapter holds an item. May be called
        outside a running event loop."""
        return not self._getter.held() and bool(self._q.empty())

    def full(self) -> bool:
        """As ``Queue.full()``. May be called outside a running event loop."""
        return bool(self._q.full())

    # -- getting ------------------------------------------------------------------------

    async def get(self, timeout: float | None = None) -> T:  # noqa: ASYNC109 (the stdlib's name)
        """Remove and return an item, waiting for one if needed.

        If cancelled (a timeout is a cancellation), it returns at once, and no item was
        lost: either none was taken, or the item taken is kept and the next ``get`` on this
        adapter returns it. Cancelled in the middle of an item, it leaves the rest to one
        of asyncmp's threads, which lets go of the queue's reader lock as soon as the item
        is whole (each wait for more bytes bounded by ``stall_timeout``); a ``get`` before
        then waits for the item. (On the thread route the cancelled get's thread stops at
        its next time slice, within about 50 ms; an item it takes before that is the one
        kept.)

        :raises queue.Empty: no item came within *timeout* seconds.
        :raises anyio.BrokenResourceError: a producer died mid-item (after
            ``stall_timeout``), or the queue's framing is corrupt.
        :raises anyio.ClosedResourceError: the adapter was closed.
        :raises RuntimeError: called from another event loop than the one this adapter
            belongs to, while that one still runs (see :class:`AsyncQueue`).
        """
        if thread_id() != self._owner.thread:  # the check(), inlined: the hot path
            self._owner.claim()
        fast = self._fast
        if fast is not None and fast.may_take_fast():
            # The fast path: a cancellation check, then, if a whole item is in the pipe
            # and the reader lock is free, take it without a trip through the loop (a
            # full turn of the loop still comes about every millisecond).
            if checkpoint_due():  # fast_checkpoint(), inlined: one coroutine less
                await full_checkpoint()
            frame = fast.take_whole_frame()
            if frame is not None:
                return unpickle_frame(frame)  # type: ignore[no-any-return]
        if timeout is None:
            return await self._get()
        with anyio.move_on_after(timeout):
            return await self._get()
        raise queue.Empty

    async def _get(self) -> T:
        self._state.check_open()
        getter = self._getter
        lock = getter.get_lock
        await lock.acquire_fast()  # first come, first served
        try:
            return await getter.get()  # type: ignore[no-any-return]
        finally:
            lock.release()
            getter.after_get()

    def get_nowait(self) -> T:
        """Return an item if one is there now.

        May be called outside a running event loop (after it ended, for example): an
        item it reads is returned, and the reader lock is let go at once. Like every
        method of the adapter, it is not for another thread while a loop uses the
        adapter.

        :raises queue.Empty: none is, or the reader lock is held elsewhere.
        :raises anyio.ClosedResourceError: the adapter was closed.
        :raises anyio.BrokenResourceError: the queue's framing is corrupt.
        """
        self._state.check_open()
        return self._getter.get_nowait()  # type: ignore[no-any-return]

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
        self._getter.get_more(items, max_items - 1)
        return items

    # -- putting ------------------------------------------------------------------------

    def put_nowait(self, obj: T) -> None:
        """Put *obj* if there is room now. May be called outside a running event loop.

        :raises queue.Full: a bounded queue is full.
        :raises pickle.PicklingError: (or what pickling raises) *obj* can't be pickled;
            nothing was put.
        :raises anyio.BrokenResourceError: no process reads the queue any more.
        """
        self._putter.put_nowait(obj)

    async def put(self, obj: T, timeout: float | None = None) -> None:  # noqa: ASYNC109 (the stdlib's name)
        """Put *obj* into the queue, waiting for room in a bounded queue.

        If cancelled (a timeout is a cancellation), the item was not put; a put that
        returned did put it. *obj* is pickled here first, so an unpicklable object
        raises in the caller and nothing is put.

        A ``Queue`` or ``JoinableQueue`` hands the item to the queue's feeder thread, as
        ``Queue.put()`` does. A ``SimpleQueue`` has no feeder: on POSIX the put writes
        the item's frame into the pipe from one of asyncmp's threads, under the queue's
        write lock, and waits for room before the first byte, where a cancellation
        stops it with nothing written. A frame of at most ``PIPE_BUF`` bytes goes in
        whole in one write. A longer one (the pipe may be smaller than the item) goes
        in as the consumers make room; once its first byte is in, the put counts as
        done and returns even if cancelled, and the rest is written in the background,
        because a frame left half-written would tear the stream every consumer reads.
        The next put and :meth:`aclose` wait for it; if nobody reads the queue for
        ``stall_timeout`` seconds meanwhile, the item is lost, the pipe holds part of
        it (consumers see a producer that stopped mid-item), and this adapter is
        broken. (On Windows a ``SimpleQueue`` put is the stdlib's, in a thread, which
        a cancellation can't stop.)

        :raises queue.Full: no room came within *timeout* seconds.
        :raises pickle.PicklingError: (or whatever pickling raises) *obj* can't be
            pickled; nothing was put.
        :raises anyio.ClosedResourceError: the adapter was closed.
        :raises anyio.BrokenResourceError: an earlier ``get`` found the queue broken, or
            no process reads the queue any more (every read end is closed; the consumer
            is gone). Then the item was not put.
        :raises RuntimeError: as for :meth:`get`; nothing was pickled.
        """
        if thread_id() != self._owner.thread:  # the check(), inlined: the hot path
            self._owner.claim()
        await self._putter.put(obj, timeout)

    # -- joinable queues ----------------------------------------------------------------

    def task_done(self) -> None:
        """As ``JoinableQueue.task_done()``. May be called outside a running event loop."""
        self._q.task_done()

    async def join(self) -> None:
        """Wait until every item put has been marked done (``JoinableQueue.join``).

        If cancelled, nothing changed, and the wait stops at once: a multiprocessing
        ``JoinableQueue`` is waited for in a thread in short time slices; a manager's
        proxy, whose ``join()`` can only block, is waited for on a connection to the
        manager of that thread's own, which cancelling (or :meth:`aclose`) shuts down.
        (Where that connection is not a socket, a Windows named pipe, the thread can't
        be interrupted and lasts until every item is done.)

        :raises anyio.ClosedResourceError: the adapter was closed, before or during the wait.
        :raises RuntimeError: as for :meth:`get`.
        """
        self._owner.check()
        await self._putter.join()

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop this adapter and flush what this process put. (Called from another event
        loop than its own, it closes nothing and raises ``RuntimeError``: see
        :class:`AsyncQueue`.)

        Waiting tasks get ``anyio.ClosedResourceError``. For a multiprocessing
        ``Queue`` it then closes the queue *in this process* and waits, without
        blocking the loop, until the feeder thread has written everything this process
        put (as ``Queue.close()`` plus ``join_thread()``). Other processes keep their
        handles. Items this adapter took whole but did not hand out are dropped, except
        the item of a cancelled ``get`` that no later ``get`` took (one it left to a thread
        mid-item, or on the thread route one its thread took), which is put back as below
        where the queue's pipe can be written (not for a manager's proxy, nor on Windows).

        It never lets go of the reader lock in the middle of an item. If a
        ``get_many()`` or ``get_nowait()`` read into an item a producer is still
        writing, it waits for the rest (each wait for more bytes bounded by
        ``stall_timeout``) and puts the item back, whole, at the end of the queue, for
        the other consumers. It waits the same way for the item of a ``get`` cancelled
        mid-item, and puts that back too. If the rest does not come in time, it gives up and lets
        go of the lock mid-item, as a get does after a producer that stopped mid-item:
        that item is lost, and so is the queue (the next reader elsewhere starts inside
        the item's remaining bytes, if any ever come). Likewise it waits for a
        ``SimpleQueue`` put that has begun writing its item (see :meth:`put`).

        Putting an item back waits for nobody to read it, and never leaves part of it in
        the pipe. It is a put of its own, after everything this process put (once the
        feeder is flushed): one of asyncmp's threads, a daemon like the feeder, writes the
        item's frame whole (as it was read; on the thread route pickled again), waiting
        for a slot of a bounded queue and for consumers to make room as long as that
        takes, with no ``stall_timeout``. It counts as one item in the queue again, and
        not as a new task of a ``JoinableQueue``. The consumers, in any process, get it
        after the items before it. The process waits for that thread at exit, as
        multiprocessing waits for a ``Queue``'s feeder thread, so a process that exits
        while nobody reads the queue waits until somebody does, unless no other process
        holds the queue's read end (on Linux, checked through ``/proc``; elsewhere it
        always waits): nothing could ever read the item then, and the process exits at
        once, dropping it. One that ends without its exit handlers (``os._exit()``, a
        signal) may leave part of the item in the pipe, as a producer killed mid-put
        does. If no process holds the queue's read end any more, the item is dropped.

        If cancelled, the adapter is closed all the same; those two waits still run to
        their end, the put-back starts, and only the wait for the feeder stops, the
        feeder going on writing in the background. It raises nothing of its own.
        """
        self._owner.check()
        state = self._state
        if state.closed:
            await checkpoint()
            return
        state.closed = True
        getter, putter = self._getter, self._putter
        # Every part stops waiting, and every call is asked to stop, before any waits.
        # The calls first: a join that the putter interrupts must find itself stopped.
        calls = state.calls.stop()
        getter.stop()
        putter.stop()
        with anyio.CancelScope(shield=True):
            await state.calls.wait(calls)
            # Never let go of the reader lock mid-item: the getter finishes the item, and
            # the putter puts it back (in the background, once the flush is done).
            frame = await getter.aclose()
        await putter.aclose(frame)

    def __reduce__(self) -> NoReturn:
        raise TypeError(_NOT_PICKLABLE)

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
