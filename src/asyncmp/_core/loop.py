"""The loop layer: the one module that knows asyncio's, trio's and anyio's internals.

Everything above it (the I/O layer, the frame engine, the adapters) asks here instead of
reaching into an event loop library, so a change in one of them lands in one place:

* :class:`Backend`: the event loop that runs the caller, and what asyncmp asks of it. It
  is chosen once per loop, the first time a thread's new loop asks, and kept per thread
  (one event loop runs per thread): :func:`current_backend` (anyio's
  ``get_async_backend()``, bound to one loop and without anyio's dispatch). The
  functions below ask it; none asks again which library runs.
* :class:`FairLock`: first come, first served, with a fast acquire that takes a free
  lock without a trip through the loop and says whether it had to wait.
* :func:`cancel_pending`: is the current task's cancellation due? A plain call, no
  coroutine: the backend reads the cancel scopes the way its own check does (anyio's
  task states on asyncio, the task's cancel status on trio), and falls back to anyio's
  public ``current_effective_deadline() == -inf``.
* The turn clock. A receive or send that finds its bytes there needs no trip through
  the loop, yet the loop must still get a turn at least every :data:`TURN_INTERVAL`.
  When it had one last is kept **per thread** (one event loop runs per thread): a second
  loop in another thread on the same fast path must not spend this loop's turns.
  :func:`fast_checkpoint`, :func:`checkpoint_due` and :func:`turn_if_due` read it,
  :func:`note_turn` and :func:`full_checkpoint` set it.
* :func:`new_wakeup`: a one-shot wake-up for one waiting task, ``anyio.Event`` without
  anyio's dispatch to the backend on every creation, wait and set.
* :func:`call_soon` (run a callback at the loop's next turn, from the loop's thread) and
  :func:`threadsafe_notifier` (what a thread calls to tell the loop it is done).
* :func:`in_trio`, :func:`wait_readable_elsewhere`, :data:`running_asyncio_loop` and
  :func:`is_selector_loop`: whether a trio task runs the caller, a wait through the
  library's own call, the asyncio loop of this thread (if any), and what kind of loop it
  is.
* :class:`LoopBinding`: which event loop an object belongs to, checked on every awaited
  call for the price of :func:`thread_id` and a comparison; a call from another loop
  that still runs raises ``RuntimeError`` instead of waiting for ever.
"""

from __future__ import annotations

import asyncio.selector_events
import math
import os
import sys
import threading
import weakref
from abc import ABC, abstractmethod
from asyncio import AbstractEventLoop
from asyncio import _get_running_loop as _asyncio_running_loop
from asyncio import current_task as _asyncio_current_task
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import Any, Protocol

import anyio
from anyio.lowlevel import checkpoint

__all__ = (
    "TURN_INTERVAL",
    "Backend",
    "FairLock",
    "LoopBinding",
    "call_soon",
    "cancel_pending",
    "checkpoint_due",
    "current_backend",
    "fast_checkpoint",
    "full_checkpoint",
    "in_trio",
    "is_selector_loop",
    "new_wakeup",
    "note_turn",
    "running_asyncio_loop",
    "thread_id",
    "threadsafe_notifier",
    "turn_clock",
    "turn_if_due",
    "wait_readable_elsewhere",
)

#: A receive or send that finds its bytes there skips the trip through the event loop,
#: but the loop still gets a turn at least this often (seconds).
TURN_INTERVAL = 0.001

#: The asyncio event loop running in this thread, or None (trio, or no loop at all).
running_asyncio_loop: Callable[[], AbstractEventLoop | None] = _asyncio_running_loop


def _no_check_yet() -> bool:
    raise RuntimeError("no cancellation check chosen in this thread yet")


class _TurnClock(threading.local):
    """Per thread: when this thread's event loop last had a full turn
    (``perf_counter()``), the :class:`Backend` chosen for the loop that ran here last, and
    that backend's :func:`cancel_pending` check (kept here too: one lookup less on the
    fast path)."""

    def __init__(self) -> None:
        self.last = 0.0
        self.backend: Backend | None = None
        self.cancel_pending: Callable[[], bool] = _no_check_yet


#: Per thread: one event loop runs per thread, and each gets its own turns.
turn_clock = _TurnClock()


def _forget_backend_in_child() -> None:
    """In a forked child, the thread that forked (the only one there) chooses its backend
    and cancellation check again: the ones chosen in the parent are bound to the parent's
    loop, which the child inherited but does not run."""
    turn_clock.backend = None
    turn_clock.cancel_pending = _no_check_yet


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_backend_in_child)


def in_trio() -> bool:
    """True if the current task runs under trio (only asks if trio was imported)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# The cancellation checks, as plain calls
# ---------------------------------------------------------------------------------------


def _public_cancel_pending() -> bool:
    return anyio.current_effective_deadline() == -math.inf


#: Before Python 3.12, ``asyncio.current_task()`` calls ``getpid()`` (a name, not an ``if``
#: on the version, so that type checkers see both branches on every version).
_CURRENT_TASK_COSTS_A_SYSTEM_CALL: bool = sys.version_info < (3, 12)


def _running_tasks_table() -> dict[AbstractEventLoop, asyncio.Task[Any]] | None:
    """asyncio's own table of the task each loop runs now, where looking a task up there
    is faster than ``asyncio.current_task()``: before Python 3.12, that function asks for
    the running loop, which costs a ``getpid()`` system call (to notice a fork), about
    0.2 µs of the fast path of every receive and get. None from 3.12 on."""
    if not _CURRENT_TASK_COSTS_A_SYSTEM_CALL:
        return None
    table = getattr(asyncio.tasks, "_current_tasks", None)
    return table if isinstance(table, dict) else None


def _asyncio_cancel_pending_for(states: Any, loop: AbstractEventLoop | None) -> Callable[[], bool]:
    """anyio's own check on asyncio (``checkpoint_if_cancelled``), as a plain call:
    *states* maps a task to its innermost cancel scope; walk out from there, up to the
    first shield. Chosen while *loop* runs in this thread.

    Where :func:`_running_tasks_table` gives one, the task is looked up there under the
    loop the check was chosen for. Called while that loop runs no task in this thread
    (it has ended, another loop or library runs now), the check raises RuntimeError and
    the caller chooses again. A forked child forgets the check chosen in its parent (see
    :func:`_forget_backend_in_child`): the table it inherits may still name the parent's
    task under the parent's loop.
    """
    data = states.data  # the WeakKeyDictionary's own dict: one Python call less
    get_state = data.get
    table = _running_tasks_table()
    task_of = table.get if table is not None else None
    # Weak: a loop that ended is not kept alive by the check chosen for it.
    loop_ref = weakref.ref(loop) if loop is not None else None

    def asyncio_cancel_pending() -> bool:
        if task_of is not None and loop_ref is not None:
            task = task_of(loop_ref())  # type: ignore[arg-type]
        else:
            task = _asyncio_current_task()  # RuntimeError: no asyncio loop runs here
        if task is None:
            raise RuntimeError("no asyncio task runs here")  # a trio guest run, say
        state = get_state(weakref.ref(task))
        if state is None:
            return False  # a task anyio never saw has no cancel scope of anyio's
        scope = state.cancel_scope
        while scope is not None:
            if scope.cancel_called:
                return True
            if scope.shield:
                return False
            scope = scope._parent_scope
        return False

    return asyncio_cancel_pending


def _trio_cancel_pending_for(trio: Any) -> Callable[[], bool]:
    """trio's own check (``checkpoint_if_cancelled``), as a plain call, which raises
    RuntimeError where no trio task runs."""
    current_task = trio.lowlevel.current_task

    def trio_cancel_pending() -> bool:
        return bool(current_task()._cancel_status.effectively_cancelled)

    return trio_cancel_pending


def _verified(make: Callable[[], Callable[[], bool]]) -> Callable[[], bool]:
    """The check *make* builds if it answers as the public question does here; else the
    public question (the library's insides are not the ones read above)."""
    try:
        check = make()
        if check() == _public_cancel_pending():
            return check
    except (ImportError, AttributeError, KeyError, TypeError, RuntimeError):  # pragma: no cover
        pass
    return _public_cancel_pending  # pragma: no cover - a future anyio or trio


# ---------------------------------------------------------------------------------------
# The backend: the event loop that runs the caller
# ---------------------------------------------------------------------------------------


class Backend(ABC):
    """The event loop that runs the caller, and what asyncmp asks of it: one object per
    loop, chosen by :func:`current_backend`, so that no function asks again which library
    runs. anyio's two backends are asyncio (with or without uvloop) and trio.

    It holds its loop weakly: a loop that has ended is not kept alive by the backend
    chosen for it (which its thread keeps until the next loop there asks).
    """

    __slots__ = ("cancel_pending", "library")

    #: The library that runs the loop, for messages: ``"asyncio"``, ``"uvloop"`` or
    #: ``"trio"``.
    library: str
    #: :func:`cancel_pending` for this loop: a plain call that raises ``RuntimeError``
    #: where this loop's tasks don't run. The check is built, and compared with anyio's
    #: public question, on the first call (in a task of the loop).
    cancel_pending: Callable[[], bool]

    def __init__(self, native: object) -> None:
        self.library = type(native).__module__.partition(".")[0]
        self.cancel_pending = self._first_cancel_pending

    def _first_cancel_pending(self) -> bool:
        if not self.is_current():
            # Chosen for a loop that ran here before: cancel_pending() chooses again.
            raise RuntimeError("another event loop runs in this thread now")
        check = self.cancel_pending = _verified(self._make_cancel_pending)
        clock = turn_clock
        if clock.backend is self:
            clock.cancel_pending = check
        return check()

    @abstractmethod
    def _make_cancel_pending(self) -> Callable[[], bool]:
        """Build the fast check (called in a task of the loop)."""

    @abstractmethod
    def loop(self) -> object | None:
        """What stands for the loop: the asyncio loop (uvloop's included), or trio's root
        task; None once it is gone."""

    @abstractmethod
    def is_current(self) -> bool:
        """True if this backend's loop runs in this thread now: the running asyncio loop,
        or the trio run, is this backend's. A few hundred nanoseconds at most: asked on
        every :func:`current_backend`. (A trio run hosted by an asyncio loop as a guest
        is not told apart from its host, as a loop nested in another's thread is not.)"""

    @abstractmethod
    def still_runs(self) -> bool:
        """True while the loop runs: an asyncio loop until it stops (``asyncio.run()``
        closes it on the way out), a trio run until it returns (its root task's coroutine
        then has no frame)."""

    @abstractmethod
    def new_wakeup(self) -> Wakeup:
        """See :func:`new_wakeup`."""

    @abstractmethod
    def call_soon(self, callback: Callable[[], object]) -> None:
        """See :func:`call_soon`."""

    @abstractmethod
    def threadsafe_notifier(self) -> Callable[[Callable[[], object]], object]:
        """See :func:`threadsafe_notifier`."""

    @abstractmethod
    async def wait_readable(self, fd: int, what: str) -> None:
        """See :func:`wait_readable_elsewhere`."""


class _AsyncioBackend(Backend):
    """An asyncio event loop (uvloop's included)."""

    __slots__ = ("_loop",)

    def __init__(self, loop: AbstractEventLoop) -> None:
        super().__init__(loop)
        self._loop = weakref.ref(loop)

    def _make_cancel_pending(self) -> Callable[[], bool]:
        from anyio._backends._asyncio import _task_states

        return _asyncio_cancel_pending_for(_task_states, self._loop())

    def loop(self) -> AbstractEventLoop | None:
        return self._loop()

    def _live(self) -> AbstractEventLoop:
        loop = self._loop()
        if loop is None:
            raise RuntimeError("the event loop is gone")
        return loop

    def is_current(self) -> bool:
        loop = _asyncio_running_loop()
        return loop is not None and loop is self._loop()

    def still_runs(self) -> bool:
        loop = self._loop()
        return loop is not None and loop.is_running()

    def new_wakeup(self) -> Wakeup:
        return _FutureWakeup(self._live())

    def call_soon(self, callback: Callable[[], object]) -> None:
        self._live().call_soon(callback)

    def threadsafe_notifier(self) -> Callable[[Callable[[], object]], object]:
        return self._live().call_soon_threadsafe

    async def wait_readable(self, fd: int, what: str) -> None:
        await anyio.wait_readable(fd)


class _TrioBackend(Backend):
    """A trio run."""

    __slots__ = ("_lowlevel", "_root", "_trio")

    def __init__(self, trio: Any, root: object) -> None:
        super().__init__(root)
        self._trio = trio
        self._lowlevel = trio.lowlevel
        self._root = weakref.ref(root)

    def _make_cancel_pending(self) -> Callable[[], bool]:
        return _trio_cancel_pending_for(self._trio)

    def loop(self) -> object | None:
        return self._root()

    def is_current(self) -> bool:
        try:
            root = self._lowlevel.current_root_task()
        except RuntimeError:
            return False
        return root is not None and root is self._root()

    def still_runs(self) -> bool:
        return getattr(getattr(self._root(), "coro", None), "cr_frame", None) is not None

    def new_wakeup(self) -> Wakeup:
        return _TrioWakeup(self._lowlevel)

    def call_soon(self, callback: Callable[[], object]) -> None:
        self._lowlevel.current_trio_token().run_sync_soon(callback)

    def threadsafe_notifier(self) -> Callable[[Callable[[], object]], object]:
        return self._lowlevel.current_trio_token().run_sync_soon  # type: ignore[no-any-return]

    async def wait_readable(self, fd: int, what: str) -> None:
        trio = self._trio
        try:
            await self._lowlevel.wait_readable(fd)
        except trio.ClosedResourceError:
            raise anyio.ClosedResourceError from None
        except trio.BusyResourceError:
            raise anyio.BusyResourceError(what) from None


def _trio_root() -> object | None:
    """trio's root task if a trio run goes on in this thread (trio imported), else None."""
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        root: object | None = trio.lowlevel.current_root_task()
    except RuntimeError:
        return None
    return root


def _choose_backend() -> Backend | None:
    """A backend for the loop that runs the caller: trio's if a trio task runs it, else the
    asyncio loop of this thread, else trio's if a trio run goes on here (a callback of the
    run); None outside any loop."""
    if in_trio():
        root = _trio_root()
        if root is not None:
            return _TrioBackend(sys.modules["trio"], root)
    loop = _asyncio_running_loop()
    if loop is not None:
        return _AsyncioBackend(loop)
    root = _trio_root()
    if root is not None:
        return _TrioBackend(sys.modules["trio"], root)
    return None


def _backend_here() -> Backend | None:
    """:func:`current_backend`, or None outside any event loop."""
    clock = turn_clock
    backend = clock.backend
    if backend is not None and backend.is_current():
        return backend
    backend = _choose_backend()
    if backend is not None:
        clock.backend = backend
        clock.cancel_pending = backend.cancel_pending
    return backend


def current_backend() -> Backend:
    """The backend of the event loop that runs the caller: the one this thread chose for
    that loop, or a new one if another loop (or library) runs here now.

    :raises RuntimeError: no event loop runs the caller.
    """
    backend = _backend_here()
    if backend is None:
        raise RuntimeError("no event loop runs here: call this from async code")
    return backend


# ---------------------------------------------------------------------------------------
# The cancellation check and the turn clock
# ---------------------------------------------------------------------------------------


def cancel_pending() -> bool:
    """True if the current task's cancellation is due: a ``checkpoint()`` now would raise
    it. No coroutine, no trip through the loop. (A ``KeyboardInterrupt`` trio holds for
    the main task is not looked at: the loop's next turn delivers it.)

    The check of the backend this thread chose last is tried first; it raises
    ``RuntimeError`` if another loop or library runs now, and the backend is chosen again.
    Asking first which one runs would cost more than the check (before Python 3.12,
    asking asyncio for its running loop is a ``getpid()`` system call).

    :raises RuntimeError: no event loop runs the caller.
    """
    clock = turn_clock
    try:
        return clock.cancel_pending()
    except RuntimeError:
        return current_backend().cancel_pending()


def checkpoint_due() -> bool:
    """True if the caller must ``await full_checkpoint()`` now: the task is cancelled, or
    this loop's turn is due. The fast path's check, as a plain call::

        if checkpoint_due():
            await full_checkpoint()
    """
    clock = turn_clock
    if perf_counter() - clock.last >= TURN_INTERVAL:
        return True
    try:
        return clock.cancel_pending()
    except RuntimeError:  # another library runs in this thread now
        return cancel_pending()


async def full_checkpoint() -> None:
    """A full trip through the loop (raising a pending cancellation), noted on the turn
    clock."""
    await checkpoint()
    turn_clock.last = perf_counter()


async def fast_checkpoint() -> None:
    """A cancellation check, plus a full trip through the loop once per interval."""
    if checkpoint_due():
        await checkpoint()
        turn_clock.last = perf_counter()


async def turn_if_due() -> None:
    """A full trip through the loop if this loop's turn is due; nothing otherwise (no
    cancellation check: for work that must go on, such as reading the rest of a frame)."""
    clock = turn_clock
    if perf_counter() - clock.last >= TURN_INTERVAL:
        await checkpoint()
        clock.last = perf_counter()


def note_turn() -> None:
    """Say that this thread's loop just had a turn (the caller came back from a wait)."""
    turn_clock.last = perf_counter()


class Wakeup(Protocol):
    """What :func:`new_wakeup` returns."""

    def set(self) -> None:
        """Wake the waiting task (if it still waits); later waits return at once."""

    def is_set(self) -> bool:
        """Whether :meth:`set` was called (and, on asyncio, the wait was not cancelled
        first)."""

    async def wait(self) -> None:
        """Wait until :meth:`set` is called. If cancelled, it was not set meanwhile, or
        was set just as the cancellation came (:meth:`is_set` says which): as
        ``anyio.Event.wait()``."""


class _FutureWakeup:
    """asyncio's: a future of the loop."""

    __slots__ = ("_future",)

    def __init__(self, loop: AbstractEventLoop) -> None:
        self._future = loop.create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def is_set(self) -> bool:
        future = self._future
        return future.done() and not future.cancelled()

    async def wait(self) -> None:
        await self._future


class _TrioWakeup:
    """trio's: the waiting task, rescheduled by set()."""

    __slots__ = ("_lowlevel", "_set", "_task")

    def __init__(self, lowlevel: Any) -> None:
        self._lowlevel = lowlevel
        self._set = False
        self._task: Any = None

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        task = self._task
        if task is not None:
            self._task = None
            self._lowlevel.reschedule(task)

    def is_set(self) -> bool:
        return self._set

    def _abort(self, _: object) -> Any:
        self._task = None
        return self._lowlevel.Abort.SUCCEEDED

    async def wait(self) -> None:
        lowlevel = self._lowlevel
        if self._set:
            await lowlevel.checkpoint()
            return
        self._task = lowlevel.current_task()
        await lowlevel.wait_task_rescheduled(self._abort)


def new_wakeup() -> Wakeup:
    """A one-shot wake-up for one task of the running event loop: what ``anyio.Event``
    does for a single waiter, cheaper to make and to use (for a wake-up per call). Make
    it, wait on it and set it in the loop's thread; one task waits on it at a time.

    :raises RuntimeError: no event loop runs the caller.
    """
    return current_backend().new_wakeup()


def call_soon(callback: Callable[[], object]) -> None:
    """Run *callback* at the current event loop's next turn (from the loop's thread).

    :raises RuntimeError: no event loop runs the caller, or it is closing.
    """
    current_backend().call_soon(callback)


def threadsafe_notifier() -> Callable[[Callable[[], object]], object]:
    """What another thread calls, without blocking, to have the current event loop run a
    callback (``call_soon_threadsafe``, or trio's ``run_sync_soon``). It raises if the
    loop is gone by then; a thread must never wait on a loop that may be gone.

    :raises RuntimeError: (this call) no event loop runs the caller.
    """
    return current_backend().threadsafe_notifier()


def is_selector_loop(loop: AbstractEventLoop | None) -> bool:
    """True for asyncio's own selector loops (they run a poll's callbacks after the tasks
    queued before it; uvloop and the proactor loop don't)."""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)


async def wait_readable_elsewhere(fd: int, what: str) -> None:
    """Wait until *fd* is readable through the async library's own call (not an asyncio
    loop's ``add_reader``). *what* names the direction in ``BusyResourceError``.

    If cancelled, nothing happened. :raises anyio.ClosedResourceError: *fd* was closed
    meanwhile. :raises anyio.BusyResourceError: another task waits on *fd*.
    """
    await current_backend().wait_readable(fd, what)


#: The calling thread's id: ``pthread_self()``, no system call. One event loop runs in a
#: thread at a time, so on the hot paths it stands for "the loop that runs this task".
thread_id: Callable[[], int] = threading.get_ident


#: Makes each claim one step: two loops that claim an object at once can't both win.
_claims = threading.Lock()


def _new_claims_lock_in_child() -> None:
    """A child forked while another thread claimed an object would inherit the lock
    taken, by a thread it does not have."""
    global _claims
    _claims = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_claims_lock_in_child)


class LoopBinding:
    """Which event loop an object belongs to: the one that opened it, or else the first
    that awaited one of its methods, for as long as that loop runs.

    The object's waits belong to that loop (a descriptor registered with it, its futures
    and events, threads that wake it), and from another loop they would never end. So
    each awaited method checks first, before it touches anything::

        if thread_id() != binding.thread:
            binding.claim()

    That costs a ``pthread_self()`` and a comparison (tens of nanoseconds; asking asyncio
    for its running loop would cost a ``getpid()`` system call before Python 3.12). A
    thread runs one loop at a time, so a call from the owner's thread comes from the
    owner, or from a loop that followed it there once it ended. Only a call from another
    thread takes the slow path, :meth:`claim`, which asks which loop runs: if the owner
    still runs, it raises ``RuntimeError`` saying how to call the object from there;
    if the owner has ended (an asyncio loop that no longer runs, a trio run that has
    returned), or nobody owned the object yet, the calling loop becomes the owner.

    Not seen: a loop nested in the owner's own thread while the owner waits for it (a
    ``trio.run()`` called from inside an asyncio task).
    """

    __slots__ = ("_owner", "_pid", "_thread_name", "how", "thread", "what")

    def __init__(self, what: str, how: str = "first used") -> None:
        #: The owner's :func:`thread_id`; 0 (no thread's) until a loop claims the object.
        self.thread = 0
        #: The object, for the message: "this AsyncConnection".
        self.what = what
        #: How the owner came to own it: "opened" or "first used".
        self.how = how
        # The owner's backend, which holds the loop weakly: an object that outlives its
        # loop does not keep the loop alive.
        self._owner: Backend | None = None
        self._thread_name = ""
        self._pid = 0

    def check(self) -> None:
        """:meth:`claim` if the caller runs in another thread than the owner."""
        if thread_id() != self.thread:
            self.claim()

    def claim(self) -> None:
        """Make the loop that runs the caller the owner, unless the owner is another loop
        that still runs. Outside any loop it does nothing.

        :raises RuntimeError: the object belongs to another event loop, which still runs.
        """
        backend = _backend_here()
        if backend is None:
            return
        loop = backend.loop()
        with _claims:
            # A forked child's copy of its parent's loop looks as if it still ran.
            owner = self._owner if self._pid == os.getpid() else None
            if owner is None or owner.loop() is not loop:
                if owner is not None and owner.still_runs():
                    raise RuntimeError(self._foreign(owner))
                self._owner = backend
                self._pid = os.getpid()
            self.thread = thread_id()
            self._thread_name = threading.current_thread().name

    def _foreign(self, owner: Backend) -> str:
        return (
            f"{self.what} belongs to the event loop that {self.how} it ({owner.library}, in "
            f"thread {self._thread_name!r}), which still runs: called from another loop, "
            "it would wait for ever. Call it in its own loop: from another thread, "
            "anyio.from_thread.run(fn, *args, token=token) with token = "
            "anyio.lowlevel.current_token() taken in that loop (no token in a thread that "
            "loop started with anyio.to_thread.run_sync()), or portal.call(fn, *args) "
            "through an anyio.from_thread.BlockingPortal that loop runs; or give this loop "
            "one of its own (once that loop has ended, the next one to use it takes it over)"
        )


class FairLock:
    """First come, first served, as ``anyio.Lock(fast_acquire=True)``, without its
    owner bookkeeping: that asks for the current task on every acquire and release,
    which on asyncio before Python 3.12 is a ``getpid()`` system call each time.

    ``release()`` hands the lock to the longest waiter. A waiter cancelled just as it
    was handed the lock passes it on; one cancelled before leaves the queue.
    """

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[anyio.Event] = deque()

    def locked(self) -> bool:
        return self._locked

    def acquire_nowait(self) -> None:
        """Take the lock now. :raises anyio.WouldBlock: it is taken."""
        if self._locked:
            raise anyio.WouldBlock
        self._locked = True

    async def acquire_fast(self) -> bool:
        """Take the lock: at once, without a trip through the loop, if it is free, else
        in turn behind the tasks that wait already. Return True if it had to wait.

        If cancelled while waiting, the lock was not taken (and is passed on if it had
        just been handed to this task).
        """
        if not self._locked:
            self._locked = True
            return False
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # it was ours already: the next in line gets it
            else:
                self._waiters.remove(event)
            raise
        return True

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # stays locked, for the one woken
        else:
            self._locked = False

    async def __aenter__(self) -> None:
        await self.acquire_fast()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()
