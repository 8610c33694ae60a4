"""The thread fallback, for handles the event loop can't watch.

Windows pipe handles, a Queue's semaphore and manager proxies have no descriptor to
poll, so a blocking call has to run in a thread. This module runs each such call so
that the async caller keeps asyncmp's guarantees:

* **Nothing is lost on cancellation.** A :class:`BlockingCall` runs to completion in
  its own thread whatever happens to the task that started it. Its outcome is kept
  until somebody collects it, so an adapter stores an abandoned call and hands its
  result to the next caller instead of starting a new one.
* **A private limiter.** Threads are counted by a :class:`anyio.CapacityLimiter` of
  asyncmp's own (per event loop), not anyio's default one, so a burst of pending
  receives can't starve ``anyio.to_thread`` users, or the reverse. An owner whose
  threads are bounded by the owner itself (a connection has at most one thread per
  direction) passes ``limited=False``: its waits, which may be idle for as long as the
  peer is silent, must not take the room that active calls elsewhere need.
* **No thread outlives its owner.** Each call runs in a daemon thread named
  ``asyncmp-…``; it never blocks interpreter exit. Blocking functions are written as
  loops of short time slices that check :attr:`BlockingCall.stopping`, so an owner
  that closes can ask its thread to stop and wait for it.
* **One way to run a call.** :class:`ThreadCalls` is an owner's set of calls in flight:
  it builds and starts each (:meth:`ThreadCalls.start`), keeps it until it has finished,
  and is what the owner's close stops and waits for. :func:`wait_or_stop` waits for a
  call and, if the wait is cancelled, asks the call to stop; :func:`run_blocking` does
  all of it in one step.
* **A thread per call only when calls are rare.** Starting a thread costs far more than
  a small item takes to arrive. An owner that makes the same kind of call over and over
  (an adapter's gets) gives its calls a :class:`KeptThread`: one thread that runs them one
  after the other, and ends when it has been idle for a moment, or when its owner closes.

The thread tells the loop it is done with a non-blocking ``call_soon_threadsafe`` (or
trio's ``run_sync_soon``): a thread must never wait on a loop that may be gone.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import anyio
from anyio.lowlevel import RunVar

from .loop import threadsafe_notifier

__all__ = (
    "DEFAULT_THREAD_LIMIT",
    "THREAD_SLICE",
    "BlockingCall",
    "KeptThread",
    "ThreadCalls",
    "run_blocking",
    "thread_limiter",
    "wait_or_stop",
)

T = TypeVar("T")

#: How many asyncmp threads may run at once in one event loop by default.
DEFAULT_THREAD_LIMIT = 64
#: How long one time slice of a blocking call lasts: how often a thread blocked on a
#: lock, a semaphore, a poll or a join checks whether its owner asked it to give up.
THREAD_SLICE = 0.05
#: How long a kept thread waits for its owner's next call before it ends.
_KEPT_IDLE = 0.05
_limiter: RunVar[anyio.CapacityLimiter] = RunVar("asyncmp_thread_limiter")


def thread_limiter() -> anyio.CapacityLimiter:
    """The limiter that caps asyncmp's threads in the current event loop."""
    try:
        return _limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(DEFAULT_THREAD_LIMIT)
        _limiter.set(limiter)
        return limiter


class KeptThread:
    """A thread that runs its owner's blocking calls one after the other.

    It starts with the first call, waits up to ``idle`` seconds for the next one once a
    call is done, and then ends; the next call starts it again. :meth:`close` ends it
    for good once the call it runs (if any) has returned.
    """

    def __init__(self, name: str, *, idle: float = _KEPT_IDLE) -> None:
        self._name = name
        self._idle = idle
        self._jobs: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        """Run *job* in the worker's thread, after the jobs before it."""
        with self._cond:
            if self._closed:
                raise anyio.ClosedResourceError  # its owner is closed
            self._jobs.append(job)
            if self._thread is None:
                thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                thread.start()
                self._thread = thread
            else:
                self._cond.notify()

    def _loop(self) -> None:
        cond, jobs = self._cond, self._jobs
        while True:
            with cond:
                if not jobs and not self._closed:
                    cond.wait(self._idle)
                if not jobs:
                    # Idle (or closed): end. submit() starts a new thread for the next job.
                    self._thread = None
                    return
                job = jobs.popleft()
            job()

    @property
    def thread(self) -> threading.Thread | None:
        """The worker's thread while it runs."""
        return self._thread

    def close(self) -> threading.Thread | None:
        """Let the thread end once its jobs are done; return it, to join."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            return self._thread


class BlockingCall(Generic[T]):
    """One blocking function running in its own thread, with its outcome kept.

    Start it with :meth:`start`, wait with :meth:`wait` (cancellable, and the call goes
    on), collect with :meth:`result`. The function receives this object, so it can poll
    :attr:`stopping` between time slices.
    """

    def __init__(
        self,
        fn: Callable[[BlockingCall[T]], T],
        *,
        name: str,
        worker: KeptThread | None = None,
        limited: bool = True,
    ) -> None:
        self._fn = fn
        self._limited = limited
        self._name = name
        self._worker = worker
        self._submitted = False
        self._result: T | None = None
        self._error: BaseException | None = None
        self._finished = threading.Event()
        self._done = anyio.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._notify: Callable[[Callable[[], object]], object] | None = None
        self._callbacks: list[Callable[[BlockingCall[T]], object]] = []

    @property
    def stopping(self) -> bool:
        """True once the owner asked the call to give up at its next time slice."""
        return self._stop.is_set()

    def stop_requested(self) -> bool:
        """Like :attr:`stopping`, as a call (re-read each time, never narrowed)."""
        return self._stop.is_set()

    @property
    def done(self) -> bool:
        """True once the event loop has heard that the call finished."""
        return self._done.is_set()

    @property
    def finished(self) -> bool:
        """True once the function has returned or raised, as seen from any thread (the
        loop may not have heard yet)."""
        return self._finished.is_set()

    async def start(self) -> None:
        """Start the thread once the limiter has room (at once if not *limited*).

        If cancelled while waiting for room, no thread was started.
        """
        limiter: anyio.CapacityLimiter | None = None
        if self._limited:
            limiter = thread_limiter()
            await limiter.acquire_on_behalf_of(self)
            self._limiter = limiter
        try:
            self._launch()
        except BaseException:
            if limiter is not None:
                self._limiter = None
                limiter.release_on_behalf_of(self)
            raise

    def start_now(self) -> None:
        """Start the thread at once, without awaiting: for a call made with
        ``limited=False`` by a caller that must not wait (one on its way out of a
        cancellation). In the event loop's thread only."""
        if self._limited:
            raise RuntimeError("only a call made with limited=False starts without waiting")
        self._launch()

    def _launch(self) -> None:
        self._notify = threadsafe_notifier()
        if self._worker is not None:
            self._worker.submit(self._run)
            self._submitted = True
        else:
            thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread = thread
            thread.start()

    def _run(self) -> None:
        try:
            self._result = self._fn(self)
        except BaseException as exc:  # handed to the awaiting task
            # Keep the exception, not its frames' locals. A stdlib call that failed with a
            # memoryview exported from a BytesIO in a local (SimpleQueue.put pickles with
            # ForkingPickler.dumps) otherwise leaves a cycle that crashes the garbage
            # collector of CPython 3.12.1 ("deallocated BytesIO object has exported buffers").
            traceback.clear_frames(exc.__traceback__)
            self._error = exc
        finally:
            self._finished.set()
            notify = self._notify
            assert notify is not None
            try:
                notify(self._on_loop_done)
            except Exception:  # the loop is gone: nobody is waiting any more
                pass

    def _on_loop_done(self) -> None:
        if self._limiter is not None:
            self._limiter.release_on_behalf_of(self)
            self._limiter = None
        self._done.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[BlockingCall[T]], object]) -> None:
        """Run ``callback(self)`` in the event loop once the call has finished, even if
        nobody awaits it any more (an abandoned call still gets cleaned up)."""
        if self._done.is_set():
            callback(self)
        else:
            self._callbacks.append(callback)

    def remove_done_callback(self, callback: Callable[[BlockingCall[T]], object]) -> None:
        """Forget *callback* if it has not run yet (a waiter that gave up)."""
        try:
            self._callbacks.remove(callback)
        except ValueError:
            pass

    async def wait(self) -> None:
        """Wait until the function has returned or raised.

        If cancelled, the call goes on in its thread; its outcome is kept. Once it
        returns, the thread has ended too (on a :class:`KeptThread`: the call has returned,
        and the thread may go on to the next call).
        """
        await self._done.wait()
        if self._thread is not None:
            # The thread signalled from its last lines: this join is immediate.
            self._thread.join()
        # On a KeptThread, the call has returned; the thread goes on to the next one.

    @property
    def error(self) -> BaseException | None:
        """What the function raised, once it has finished (None if it returned)."""
        return self._error

    def result(self) -> T:
        """Return what the function returned, or raise what it raised."""
        if not self._finished.is_set():
            raise RuntimeError("the blocking call has not finished")
        if self._error is not None:
            error = self._error
            raise error
        return self._result  # type: ignore[return-value]

    def request_stop(self) -> None:
        """Ask the function to give up at its next time slice."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Block until the call's own thread has ended (on a KeptThread: until the call has
        returned); True if it did within *timeout*."""
        if self._thread is None:
            return not self._submitted or self._finished.wait(timeout)
        self._thread.join(timeout)
        return not self._thread.is_alive()


class ThreadCalls:
    """The blocking calls an owner has in flight: what its close stops and waits for.

    Each call is kept from the moment it starts until the event loop hears that it has
    finished (or the owner collects it first, outside a loop: :meth:`forget`).
    """

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: set[BlockingCall[Any]] = set()

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[BlockingCall[Any]]:
        return iter(list(self._calls))

    async def start(
        self,
        fn: Callable[[BlockingCall[T]], T],
        *,
        name: str,
        worker: KeptThread | None = None,
        limited: bool = True,
    ) -> BlockingCall[T]:
        """Build a :class:`BlockingCall` of *fn*, start it and keep it until it has finished.

        If cancelled while waiting for the limiter, no thread was started and nothing is kept.
        """
        call = BlockingCall(fn, name=name, worker=worker, limited=limited)
        await call.start()
        self._keep(call)
        return call

    def start_now(
        self, fn: Callable[[BlockingCall[T]], T], *, name: str, worker: KeptThread | None = None
    ) -> BlockingCall[T]:
        """As :meth:`start`, without awaiting (``limited=False``): for a caller on its way
        out of a cancellation. In the event loop's thread only."""
        call = BlockingCall(fn, name=name, worker=worker, limited=False)
        call.start_now()
        self._keep(call)
        return call

    def _keep(self, call: BlockingCall[Any]) -> None:
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

    def forget(self, call: BlockingCall[Any]) -> None:
        """Stop keeping *call*: its owner collected it (finished, though the loop may not
        have heard yet)."""
        self._calls.discard(call)

    def stop(self) -> list[BlockingCall[Any]]:
        """Ask every call to give up at its next time slice; return them."""
        calls = list(self._calls)
        for call in calls:
            call.request_stop()
        return calls

    async def wait(self, calls: list[BlockingCall[Any]] | None = None) -> None:
        """Wait until *calls* (those :meth:`stop` returned; None: every call kept now) have
        returned and their threads have ended (on a :class:`KeptThread`: the call has
        returned), then keep none. Shield it: if cancelled, the calls go on and are still
        kept."""
        if calls is None:
            calls = list(self._calls)
        for call in calls:
            await call.wait()
        for call in calls:
            call.join()
        self._calls.clear()


async def wait_or_stop(
    call: BlockingCall[T], on_stop: Callable[[BlockingCall[T]], object] | None = None
) -> None:
    """Wait until *call* has finished.

    If the wait is cancelled (or anything else ends it), the call is asked to give up at
    its next time slice, ``on_stop(call)`` runs (to undo what the thread may have done
    meanwhile), and the exception goes on; the call's outcome is kept, for whoever
    collects it.
    """
    try:
        await call.wait()
    except BaseException:
        call.request_stop()
        if on_stop is not None:
            on_stop(call)
        raise


async def run_blocking(
    fn: Callable[[BlockingCall[T]], T],
    *,
    name: str,
    worker: KeptThread | None = None,
    limited: bool = True,
    calls: ThreadCalls | None = None,
    on_stop: Callable[[BlockingCall[T]], object] | None = None,
) -> BlockingCall[T]:
    """Run *fn* in a thread and wait for it; return the finished call, for its
    :meth:`~BlockingCall.result`.

    The call is kept in *calls* (if given) while it runs, so the owner's close can stop
    it. If cancelled, the call is asked to stop and *on_stop* runs, as in
    :func:`wait_or_stop`, and the cancellation goes on (before the thread started: no
    thread was started).
    """
    if calls is not None:
        call = await calls.start(fn, name=name, worker=worker, limited=limited)
    else:
        call = BlockingCall(fn, name=name, worker=worker, limited=limited)
        await call.start()
    await wait_or_stop(call, on_stop)
    return call
