"""What every process that asyncmp starts does first: start as a new process would.

A pool worker (``_pool.worker.serve``) and an ``open_process`` or ``open_worker`` child
(through :func:`run`) call :func:`begin` before anything else of theirs runs. This module
is imported by the children themselves (spawn and forkserver import it by name), so it
imports neither anyio nor the rest of asyncmp.

What a child must not keep from the process that started it (its *owner*):

* **Its signal handlers.** A forked child inherits the owner's Python-level handlers: a
  server's SIGTERM handler (uvicorn, gunicorn and celery install one) would swallow the
  ``terminate()`` that stops a busy worker, and run the server's shutdown code on a copy
  of its state. In a forked child each Python-level handler is put back to what a new
  interpreter has (:func:`reset_signals`), and the owner's wakeup descriptor is
  forgotten; a spawn or forkserver child keeps the handlers its main module installed.
  SIGTERM is ``SIG_DFL`` in every child.
* **Its event loop.** A child forked inside a task would believe that the loop still runs
  in this thread, and ``asyncio.run()``, ``trio.run()`` and ``anyio.run()`` would refuse to
  start (:func:`forget_event_loops`).
* **A life of its own.** A child ends once its owner is gone, however the owner ended,
  SIGKILL included (:func:`guard`): an orphan would run its call to the end, for nobody.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple, NoReturn

__all__ = (
    "Owner",
    "begin",
    "forget_event_loops",
    "guard",
    "prepare",
    "reset_signals",
    "run",
    "run_worker",
)


class Owner(NamedTuple):
    """Whose death a child follows: the pid of the process that started it, and the read
    end of that process's lifeline, a pipe whose write end only the owner holds (``None``
    on Windows, where the owner's process handle serves)."""

    pid: int
    lifeline: Connection | None


def run(owner: Owner | None, target: Callable[..., object], *args: Any) -> None:
    """The target of an ``open_process`` child: :func:`begin`, then ``target(*args)``."""
    begin(owner)
    target(*args)


def run_worker(
    conn: Connection, owner: Owner | None, target: Callable[..., object], *args: Any
) -> None:
    """The target of an ``open_worker`` child: :func:`begin`, then ``target(conn, *args)``."""
    begin(owner)
    target(conn, *args)


def begin(owner: Owner | None, *, ignore_sigint: bool = False) -> None:
    """Start clean: die with *owner* (unless ``None``), reset the signal handlers, forget
    the event loops. A pool worker ignores SIGINT (*ignore_sigint*)."""
    if owner is not None:
        guard(owner)
    reset_signals(ignore_sigint=ignore_sigint)
    forget_event_loops()


# --- signals ------------------------------------------------------------------------------------

#: The signals a new interpreter ignores (SIGPIPE: a write to a closed pipe raises
#: BrokenPipeError instead of killing the process).
_IGNORED_AT_START = frozenset(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, name)
)


def reset_signals(*, ignore_sigint: bool = False) -> None:
    """Put each Python-level signal handler back to what a new interpreter has.

    In a child forked from its owner (the fork start method), a handler inherited from
    the owner is the owner's code, bound to the owner's state (a server's "shut down"
    flag, its event loop): it becomes ``SIG_DFL``, or ``SIG_IGN`` for SIGPIPE and SIGXFSZ,
    or ``default_int_handler`` for SIGINT. A signal the owner ignores (``SIG_IGN``) stays
    ignored, as it would across ``exec`` (``nohup`` relies on that). The wakeup
    descriptor, which belongs to the owner's event loop, is unset.

    A spawn or forkserver child is a new interpreter already: the handlers it has were
    installed by the main module as the child imported it, as they would be in any new
    interpreter, and are its own; they stay. (A forkserver's child is forked from the
    server, which started as a new interpreter and imported the main module too.)

    In every child, SIGTERM is ``SIG_DFL``: it is how asyncmp stops its children. With
    *ignore_sigint*, SIGINT is ignored. What runs next (the target, a pool's initializer)
    may choose otherwise.
    """
    if _forked_from_owner():
        _reset_inherited_handlers()
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _forked_from_owner() -> bool:
    """Whether this child was forked from its owner, so that it has the owner's handlers:
    what the start method of this process's ``multiprocessing`` Process says (``True`` if
    that can't be told: resetting is the safe side)."""
    method = getattr(multiprocessing.current_process(), "_start_method", None)
    if method is None:  # the default context's Process: the default method
        method = multiprocessing.get_start_method(allow_none=True)
    return method not in ("spawn", "forkserver")


def _reset_inherited_handlers() -> None:
    with contextlib.suppress(ValueError, OSError):  # not the main thread: nothing to reset
        signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        try:
            if not callable(signal.getsignal(signum)):
                continue  # SIG_DFL, SIG_IGN, or a handler not installed from Python
            if signum == signal.SIGINT:
                fresh: Any = signal.default_int_handler
            elif signum in _IGNORED_AT_START:
                fresh = signal.SIG_IGN
            else:
                fresh = signal.SIG_DFL
            signal.signal(signum, fresh)
        except (ValueError, OSError, RuntimeError):  # pragma: no cover - not settable here
            continue


# --- event loops --------------------------------------------------------------------------------


def forget_event_loops() -> None:
    """Forget the event loop that ran in this thread of the owner (a forked child inherits
    its state), so that the child can run one of its own.

    The one place where the child side reads other libraries' private attributes (the
    parent side has its own, ``_core.loop``, which imports anyio: a child must not have to).
    Only modules already imported are touched, each part guarded, so that a library that
    moved or renamed something breaks nothing here. In a child that inherited no loop
    (spawn, forkserver, or forked outside any loop) it changes nothing.
    """
    events = sys.modules.get("asyncio.events")
    if events is not None:
        # The running loop (Python 3.12 and later reset it at fork themselves; before,
        # only a pid check hid it), and the policy's loop of this thread: that loop's
        # selector is the owner's, shared with it across the fork.
        with contextlib.suppress(Exception):
            events._set_running_loop(None)
        with contextlib.suppress(Exception):
            policy = events._event_loop_policy
            if policy is not None and hasattr(policy, "_local"):
                policy._local = type(policy._local)()
    sniffio = sys.modules.get("sniffio")
    if sniffio is not None:
        # Which library runs here, as anyio.run() asks before it starts: trio's run() sets
        # the thread-local, anyio.run() the context variable (the task that forked the
        # child runs in a copy of that context).
        with contextlib.suppress(Exception):
            sniffio.thread_local.name = None
        with contextlib.suppress(Exception):
            sniffio.current_async_library_cvar.set(None)
    trio_run = sys.modules.get("trio._core._run")
    if trio_run is not None:
        # trio.run() refuses to start while this thread-local has a runner.
        context = getattr(trio_run, "GLOBAL_RUN_CONTEXT", None)
        for name in ("runner", "task"):
            with contextlib.suppress(Exception):
                delattr(context, name)
    anyio_loop = sys.modules.get("anyio._core._eventloop")
    if anyio_loop is not None:
        # A worker thread's claim on its loop (a child forked from anyio.to_thread).
        with contextlib.suppress(Exception):
            vars(anyio_loop.threadlocals).clear()


# --- the owner's death --------------------------------------------------------------------------


def guard(owner: Owner) -> None:
    """Have this process end (SIGKILL) as soon as *owner* is gone, whatever runs here.

    On Linux, when the owner is the parent (fork and spawn), the kernel does it:
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, which holds even while a call keeps the GIL. It
    fires when the *thread* that started the child ends, and the owner starts its
    children from its event loop's thread, which outlives them. The parent is asked
    again once it is set: an owner that died before has left this process to another
    parent already.

    Elsewhere (a forkserver's child, whose parent is the forkserver; other systems), a
    daemon thread waits for the owner's lifeline to reach end of file, which happens
    when the owner's last copy of the write end closes, that is, when it exits: the
    owner's forked children don't hold one (asyncmp closes it in every forked child).
    That thread needs the GIL to act, so a call that holds it (a C extension that never
    releases it) delays the end until it does.
    """
    if sys.platform == "linux" and os.getppid() == owner.pid and _die_with_parent():
        if os.getppid() != owner.pid:
            _die()  # the owner ended before prctl() took effect
        if owner.lifeline is not None:
            owner.lifeline.close()
        return
    watch: Callable[..., None]
    args: tuple[Any, ...]
    if owner.lifeline is not None:
        fd = owner.lifeline.fileno()
        # Which file it is, taken before anything else runs here: the watch gives up if
        # the descriptor is closed, or reused for another file, under it.
        watch, args = _watch_lifeline, (fd, _identity(fd))
    else:  # pragma: no cover - Windows: the owner's process handle
        parent = multiprocessing.parent_process()
        if parent is None:
            return
        watch, args = _watch_handle, (parent.sentinel,)
    threading.Thread(target=watch, args=args, name="asyncmp-owner-watch", daemon=True).start()


#: libc's ``prctl`` (Linux), once :func:`prepare` looked it up; False if there is none.
_prctl: Any = None


def prepare() -> None:
    """In the owner, before it starts children: look up what :func:`guard` calls, once.

    A forked child inherits it and doesn't import ``ctypes`` or resolve ``prctl`` itself
    (several milliseconds per worker start); a spawned child still does, in
    :func:`guard`. Does nothing but on Linux.
    """
    global _prctl
    if _prctl is not None:
        return
    if sys.platform == "linux":
        try:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except Exception:  # pragma: no cover - no ctypes, no prctl: the thread watches
            _prctl = False
    else:  # an else, not a fall-through: type checkers then skip it on Linux
        _prctl = False


def _die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent ends (Linux); whether it
    will."""
    prepare()
    if not _prctl:
        return False
    pr_set_pdeathsig = 1
    try:
        return bool(_prctl(pr_set_pdeathsig, 9, 0, 0, 0) == 0)  # SIGKILL (Linux)
    except Exception:  # pragma: no cover - the thread watches
        return False


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _watch_lifeline(fd: int, identity: tuple[int, int]) -> None:
    """Wait until the lifeline reaches end of file, then die (nobody writes to it:
    readable means end of file). Return if the watch can't go on."""
    if sys.platform != "win32":  # (there is no lifeline on Windows)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            events = poller.poll()
            if any(event & select.POLLNVAL for _, event in events) or _identity(fd) != identity:
                return  # pragma: no cover - closed (maybe reused) under the watch
        except OSError:  # pragma: no cover - closed under the watch (code closing every fd)
            return
        _die()


def _watch_handle(handle: int) -> None:  # pragma: no cover - Windows
    multiprocessing.connection.wait([handle])
    _die()


def _die() -> NoReturn:
    if sys.platform != "win32":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)  # pragma: no cover - Windows
