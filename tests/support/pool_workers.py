"""Functions that ``test_pool.py`` runs in pool workers.

They live in an importable module so that every start method can run them. A test that
must hold a call "running" gives the workers one end of a pipe and a semaphore through
the initializer (:func:`install`): :func:`hold` says ``("started", pid)`` on the pipe,
then blocks until the test releases the semaphore, so the test awaits the word instead
of guessing with a sleep. (The workers never read the shared pipe: two of them reading
one pipe at once could tear its messages.)
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import types
from multiprocessing.connection import Connection
from typing import Any

__all__ = (
    "EVENT_LOOP_LIBRARIES",
    "WORKER_SIDE",
    "NeedsTwoArgs",
    "PicklesOnlyAgain",
    "crash_leaving_grandchild",
    "echo",
    "exit_at_3",
    "exit_with",
    "fail",
    "fail_at_5",
    "fail_init",
    "fail_init_from",
    "fail_init_worker_only",
    "getpid",
    "hold",
    "hold_first",
    "initialized",
    "install",
    "install_then_fail_from",
    "kill_self",
    "loaded_modules",
    "note",
    "own_a_busy_pool",
    "pid_of",
    "raise_unpicklable",
    "raise_worker_only",
    "return_unpicklable",
    "return_worker_only",
    "set_value",
    "spin",
)

#: The modules of asyncmp that a spawn or forkserver worker may load to run a call: it
#: imports the worker module by name, and each module more is paid at every worker start.
#: (Shared-memory support is loaded only once ``shared()`` values arrive.)
WORKER_SIDE = frozenset(
    {
        "asyncmp",  # the package's facade, which imports its names on first use only
        "asyncmp._core",
        "asyncmp._core.child",
        "asyncmp._core.wire",
        "asyncmp._pool",
        "asyncmp._pool.protocol",
        "asyncmp._pool.worker",
    }
)
#: What a worker must not load either: it runs plain calls, no event loop.
EVENT_LOOP_LIBRARIES = frozenset({"anyio", "asyncio", "sniffio", "trio", "uvloop"})

_conn: Connection | None = None
_release: Any = None
_value: object = None
_init_calls = 0


def install(conn: Connection, release: Any) -> None:
    """Initializer: keep the test's pipe end and semaphore for :func:`hold` and
    :func:`note`."""
    global _conn, _release
    _conn = conn
    _release = release


def set_value(value: object) -> None:
    """Initializer: remember *value* for :func:`initialized`."""
    global _value, _init_calls
    _value = value
    _init_calls += 1


def initialized() -> tuple[object, int]:
    """What the initializer set, and how many times it ran in this worker."""
    return _value, _init_calls


def fail_init(message: str) -> None:
    raise ValueError(message)


def echo(x: int) -> int:
    return x


def getpid() -> int:
    return os.getpid()


def loaded_modules() -> list[str]:
    """The names of the modules this process has loaded."""
    return sorted(sys.modules)


def fail(message: str) -> int:
    raise ValueError(message)


def exit_with(code: int) -> int:
    sys.exit(code)


def kill_self() -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("not reached")


def hold(value: int) -> int:
    """Say ``("started", pid)`` on the test's pipe, wait for the test's release, return
    *value*."""
    assert _conn is not None
    _conn.send(("started", os.getpid()))
    if not _release.acquire(timeout=60):
        raise TimeoutError("the test never released the call")
    return value


def note(value: int) -> int:
    """Say ``("ran", value)`` on the test's pipe and return *value*."""
    assert _conn is not None
    _conn.send(("ran", value))
    return value


def return_unpicklable() -> object:
    return threading.Lock()


class PicklesOnlyAgain:
    """Can't be pickled the first time, can be from then on: a request that fails to
    pickle although each part of it pickles alone."""

    def __init__(self) -> None:
        self.tries = 0

    def __reduce__(self) -> tuple[Any, ...]:
        self.tries += 1
        if self.tries == 1:
            raise TypeError("not on the first try")
        return (PicklesOnlyAgain, ())


class NeedsTwoArgs(Exception):
    """Pickles, but can't be unpickled: its __init__ takes two arguments."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")


def raise_unpicklable() -> int:
    raise NeedsTwoArgs(1, 2)


def hold_first(x: int) -> int:
    """:func:`hold` item 0, return the others at once."""
    return hold(x) if x == 0 else x


def fail_at_5(x: int) -> int:
    if x == 5:
        raise ValueError(f"bad {x}")
    return x


def pid_of(_: int) -> int:
    return os.getpid()


def exit_at_3(x: int) -> int:
    return exit_with(3) if x == 3 else x


def crash_leaving_grandchild(code: int) -> int:
    """Fork a grandchild that sleeps for a minute, holding this worker's pipe (every
    descriptor is inherited), say ``("grandchild", pid)`` on the test's pipe, and end
    this worker with ``os._exit(code)``: the pool must see the worker's end all the
    same. The test kills the grandchild."""
    assert _conn is not None
    grandchild = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    grandchild.start()
    _conn.send(("grandchild", grandchild.pid))
    os._exit(code)


#: A module that only the worker has: what is defined in it can't be unpickled in the
#: parent (``import`` finds no such module there).
_WORKER_ONLY = "asyncmp_tests_worker_only"


def _worker_only_module() -> types.ModuleType:
    module = sys.modules.get(_WORKER_ONLY)
    if module is None:
        module = types.ModuleType(_WORKER_ONLY)
        namespace = {"__module__": _WORKER_ONLY}
        module.__dict__.update(
            WorkerOnlyError=type("WorkerOnlyError", (Exception,), namespace),
            WorkerOnlyResult=type("WorkerOnlyResult", (), namespace),
        )
        sys.modules[_WORKER_ONLY] = module
    return module


def raise_worker_only(message: str) -> int:
    """Raise an exception whose class the parent can't import."""
    raise _worker_only_module().WorkerOnlyError(message)


def return_worker_only() -> object:
    """Return an object whose class the parent can't import."""
    return _worker_only_module().WorkerOnlyResult()


def fail_init_worker_only(message: str) -> None:
    """Initializer: raise an exception whose class the parent can't import."""
    raise_worker_only(message)


def fail_init_from(directory: str, healthy: int, message: str) -> None:
    """Initializer: let the first *healthy* workers that start (counted by the files
    made in *directory*) start, then fail as :func:`fail_init_worker_only`."""
    for started in range(1000):
        try:
            fd = os.open(os.path.join(directory, str(started)), os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            continue
        os.close(fd)
        if started >= healthy:
            raise_worker_only(message)
        return
    raise AssertionError("too many workers started")


def install_then_fail_from(
    conn: Connection, release: Any, directory: str, healthy: int, message: str
) -> None:
    """Initializer: :func:`install`, then :func:`fail_init_from`."""
    install(conn, release)
    fail_init_from(directory, healthy, message)


def spin(seconds: float) -> int:
    """Say ``("started", pid)`` on the test's pipe, then keep the CPU busy for *seconds*:
    Python code running all along, as a real computation does."""
    assert _conn is not None
    _conn.send(("started", os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return 0


def own_a_busy_pool(report: Connection, method: str) -> None:
    """The owner of ``tests/support/orphans.py``: a pool of one worker of start *method*,
    busy in :func:`spin`, which says so on *report*."""
    import anyio

    import asyncmp

    async def main() -> None:
        async with asyncmp.open_pool(
            1,
            context=multiprocessing.get_context(method),
            initializer=install,
            initargs=(report, None),
        ) as pool:
            await pool.run(spin, 120.0)

    anyio.run(main)
