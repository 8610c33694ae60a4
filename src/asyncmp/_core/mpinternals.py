"""The only module that reads ``multiprocessing``'s private attributes.

The Queue fast path needs a queue's read end (``_reader``), its cross-process reader
lock (``_rlock``) and the semaphore that counts its items (``_sem``); joining a
JoinableQueue needs ``_cond`` and ``_unfinished_tasks``; flushing needs the feeder
thread; telling that nobody reads the queue any more needs its write end (``_writer``)
and the feeder's error handler (``_on_queue_feeder_error``). None of that is public.
Every reader here is checked against the Python versions whose ``multiprocessing.queues``
we have read (3.10 to 3.14) and against the types it expects; anything it doesn't
recognise returns ``None``, and the caller then takes the thread route, which uses only
public methods.
"""

from __future__ import annotations

import copyreg
import multiprocessing.connection
import multiprocessing.managers
import multiprocessing.queues
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

from . import platform as _platform

__all__ = (
    "QueueParts",
    "feeder_thread",
    "forking_dispatch_table",
    "hook_feeder_errors",
    "joinable_parts",
    "proxy_connection",
    "queue_parts",
    "queue_wlock",
    "queue_writer",
    "resource_tracker_id",
    "resource_tracker_lock",
    "shm_calls",
    "simple_queue_ends",
)

#: The versions whose ``multiprocessing.queues`` layout this module knows.
_KNOWN = (3, 10) <= sys.version_info[:2] <= (3, 14)


@dataclass(frozen=True)
class QueueParts:
    """What the fd-driven get needs from a multiprocessing queue."""

    reader: multiprocessing.connection.Connection
    #: The cross-process lock every consumer holds while it reads one frame.
    rlock: Any
    #: Released once per item taken (Queue, JoinableQueue); None for SimpleQueue.
    sem: Any | None


def _lock_like(obj: object) -> bool:
    return callable(getattr(obj, "acquire", None)) and callable(getattr(obj, "release", None))


def _connection_like(obj: object) -> bool:
    # A Windows queue's read end is a PipeConnection, a sibling of Connection, not a
    # subclass: ask for the two methods used instead.
    return callable(getattr(obj, "poll", None)) and callable(getattr(obj, "recv_bytes", None))


def queue_parts(q: object) -> QueueParts | None:
    """Return the parts of *q* the fd route needs, or ``None`` to use threads."""
    if not _KNOWN or not _platform.POSIX_FDS:
        return None
    if isinstance(q, multiprocessing.queues.Queue):  # JoinableQueue is a subclass
        sem = getattr(q, "_sem", None)
        if not _lock_like(sem):
            return None
    elif isinstance(q, multiprocessing.queues.SimpleQueue):
        sem = None
    else:
        return None
    reader = getattr(q, "_reader", None)
    rlock = getattr(q, "_rlock", None)
    if not isinstance(reader, multiprocessing.connection.Connection) or not _lock_like(rlock):
        return None
    return QueueParts(reader=reader, rlock=rlock, sem=sem)


def joinable_parts(q: object) -> tuple[Any, Any] | None:
    """``(cond, is_done)`` of a JoinableQueue: its condition and a zero-count test."""
    if not _KNOWN or not isinstance(q, multiprocessing.queues.JoinableQueue):
        return None
    cond = getattr(q, "_cond", None)
    unfinished = getattr(q, "_unfinished_tasks", None)
    semlock = getattr(unfinished, "_semlock", None)
    is_zero = getattr(semlock, "_is_zero", None)
    if cond is None or not callable(getattr(cond, "wait", None)) or not callable(is_zero):
        return None
    return cond, is_zero


def proxy_connection(proxy: object) -> multiprocessing.connection.Connection | None:
    """The connection to its manager that *proxy* uses in the calling thread, opened now
    if the thread has none yet (a proxy opens one per thread, on its first call there);
    None if *proxy* is not a manager proxy this module knows."""
    if not _KNOWN or not isinstance(proxy, multiprocessing.managers.BaseProxy):
        return None
    tls = getattr(proxy, "_tls", None)
    connect = getattr(proxy, "_connect", None)
    if tls is None or not callable(connect):
        return None
    if getattr(tls, "connection", None) is None:
        connect()
    conn = getattr(tls, "connection", None)
    return conn if isinstance(conn, multiprocessing.connection.Connection) else None


def feeder_thread(q: object) -> threading.Thread | None:
    """The thread that writes what this process put into *q*, if it has started."""
    if not _KNOWN or not isinstance(q, multiprocessing.queues.Queue):
        return None
    thread = getattr(q, "_thread", None)
    return thread if isinstance(thread, threading.Thread) else None


def queue_writer(q: object) -> multiprocessing.connection.Connection | None:
    """The write end of *q* (a Queue or SimpleQueue) in this process, while it is open."""
    if not _KNOWN or not _platform.POSIX_FDS:
        return None
    if not isinstance(q, (multiprocessing.queues.Queue, multiprocessing.queues.SimpleQueue)):
        return None
    writer = getattr(q, "_writer", None)
    if not isinstance(writer, multiprocessing.connection.Connection) or writer.closed:
        return None
    return writer


def queue_wlock(q: object) -> Any | None:
    """The cross-process lock under which every producer writes one frame into *q*'s
    pipe (a Queue's feeder thread, a SimpleQueue's put), on POSIX; None elsewhere (on
    Windows a SimpleQueue has none: a message-mode pipe keeps writes apart)."""
    if not _KNOWN or not _platform.POSIX_FDS:
        return None
    if not isinstance(q, (multiprocessing.queues.Queue, multiprocessing.queues.SimpleQueue)):
        return None
    wlock = getattr(q, "_wlock", None)
    return wlock if _lock_like(wlock) else None


def hook_feeder_errors(q: object, handled: Callable[[Exception], bool]) -> bool:
    """Have the feeder thread of *q* offer its errors to *handled* first.

    ``Queue`` reports an error of its feeder thread (the item it could not write is
    dropped) by calling its ``_on_queue_feeder_error(e, obj)``, which prints a
    traceback. The thread takes that handler when it starts, so this works only before
    the first ``put`` of this process. *handled* returns True for an error it has dealt
    with, False to leave it to the queue's own handler. Only this process is hooked: a
    forked child inherits the attribute, and there the queue's own handler runs.

    Returns False when the hook could not be installed.
    """
    if not _KNOWN or not isinstance(q, multiprocessing.queues.Queue):
        return False
    if getattr(q, "_thread", None) is not None:
        return False  # the feeder runs already, with the handler it was given
    default = getattr(q, "_on_queue_feeder_error", None)
    if not callable(default):
        return False
    pid = os.getpid()

    def on_feeder_error(e: Exception, obj: object) -> None:
        if os.getpid() != pid or not handled(e):
            default(e, obj)

    q._on_queue_feeder_error = on_feeder_error  # type: ignore[attr-defined]
    return True


def simple_queue_ends(q: object) -> tuple[Any, Any] | None:
    """``(rlock, reader)`` of a ``SimpleQueue``: its reader lock and its read end (a
    ``Connection`` or, on Windows, a ``PipeConnection``), to rebuild a get with a timeout,
    which ``SimpleQueue`` lacks; None for anything else."""
    if not _KNOWN or not isinstance(q, multiprocessing.queues.SimpleQueue):
        return None
    rlock: Any = getattr(q, "_rlock", None)
    reader: Any = getattr(q, "_reader", None)
    if _lock_like(rlock) and _connection_like(reader):
        return rlock, reader
    return None


# What forking_dispatch_table() handed out last, and the two tables it was merged from,
# as they were then.
_merged: dict[Any, Any] | None = None
_merged_from: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})


def forking_dispatch_table() -> dict[Any, Any] | None:
    """The reducers a ``ForkingPickler`` created now would pickle with: ``copyreg``'s
    dispatch table updated with ``ForkingPickler._extra_reducers`` (connections, sockets,
    methods, ...), as its ``__init__`` copies them. Set as a ``pickle.Pickler``'s
    ``dispatch_table``, it pickles exactly as a ``ForkingPickler``, without that copy
    per pickler: the merged dict is kept while both tables stay equal to what it was
    made from (a ``register()`` since then makes a new one). Don't change it. ``None``
    if ``ForkingPickler`` doesn't look as expected (use it then)."""
    global _merged, _merged_from
    extra = getattr(ForkingPickler, "_extra_reducers", None)
    base = getattr(ForkingPickler, "_copyreg_dispatch_table", None)
    if not _KNOWN or not isinstance(extra, dict) or base is not copyreg.dispatch_table:
        return None
    merged = _merged
    seen_base, seen_extra = _merged_from
    if merged is None or base != seen_base or extra != seen_extra:
        merged = dict(base)
        merged.update(extra)
        _merged_from = (dict(base), dict(extra))
        _merged = merged
    return merged


# -- shared memory ------------------------------------------------------------------------
# POSIX shared memory objects by name: ``_posixshmem`` is the C module behind
# ``multiprocessing.shared_memory`` (absent on Windows); the resource tracker's pipe
# identifies the tracker that this process reports to, and its lock is held across a fork.

try:
    import _posixshmem  # type: ignore[import-not-found]
except ImportError:  # Windows
    _posixshmem = None


def shm_calls() -> tuple[Callable[[str, int, int], int], Callable[[str], None]] | None:
    """``(shm_open, shm_unlink)`` where POSIX shared memory exists, else None."""
    if _posixshmem is None:
        return None
    return _posixshmem.shm_open, _posixshmem.shm_unlink


def resource_tracker_id() -> tuple[int, int] | None:
    """The identity of the resource tracker this process reports to (its pipe's device
    and inode, the same in every process that shares the tracker), or None when this
    process has none running (it would start one at its first report)."""
    from multiprocessing import resource_tracker

    fd = getattr(getattr(resource_tracker, "_resource_tracker", None), "_fd", None)
    if not isinstance(fd, int):
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def resource_tracker_lock() -> Any:
    """The lock of multiprocessing's resource tracker (``ResourceTracker._lock``: a
    ``threading.Lock`` on 3.10, an ``RLock`` from 3.11), or None if it isn't there.

    ``ensure_running()``, which every ``register()`` and ``unregister()`` calls first,
    holds it while it probes the tracker's pipe or starts the tracker (``_stop()`` too);
    the message itself is written after it, outside. A process forked while another
    thread holds it inherits it locked, with no thread left to unlock it.
    """
    from multiprocessing import resource_tracker

    lock = getattr(getattr(resource_tracker, "_resource_tracker", None), "_lock", None)
    if not _KNOWN or not callable(getattr(lock, "acquire", None)):
        return None
    if not callable(getattr(lock, "release", None)):
        return None
    return lock
