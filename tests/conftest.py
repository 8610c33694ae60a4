"""Fixtures for the whole suite: event-loop backends, start methods, and a leak check.

Async tests opt in with ``pytestmark = pytest.mark.anyio`` and then run once per backend
(``asyncio``, ``uvloop``, ``trio``). A test that takes ``mp_context`` runs once per
multiprocessing start method that the platform offers.

Every test is wrapped in a leak check: a file descriptor, thread or child process that the test
leaves behind fails it at teardown. Threads and children get a bounded grace to finish (they are
joined, up to ``ASYNCMP_LEAK_GRACE`` seconds, default 5); descriptors get none. What lives for the
whole session is created before the first test, by ``_warm_up``, so it is part of every baseline:
the event loops' process-wide descriptors (uvloop keeps a pipe), multiprocessing's forkserver and
resource tracker. Idle workers in trio's thread cache are not counted either: trio keeps them for
reuse and ends them after 10 s idle; a busy one carries its job's name, so it is counted. A test
that must leave something behind on purpose says so with ``@pytest.mark.no_leak_check(reason)``.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest

if TYPE_CHECKING:  # kept out of run time: test_leakcheck.py runs a copy of this file alone
    from tests.support.workers import MPContext

pytest_plugins = ["pytester"]

# --- event-loop backends ------------------------------------------------------------------------

try:
    import uvloop
except ImportError:  # uvloop does not exist on Windows
    UVLOOP_OPTIONS: dict[str, Any] | None = None
else:
    UVLOOP_OPTIONS = {"loop_factory": uvloop.new_event_loop}


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(
            ("asyncio", UVLOOP_OPTIONS),
            id="uvloop",
            marks=pytest.mark.skipif(UVLOOP_OPTIONS is None, reason="uvloop is not installed"),
        ),
        pytest.param("trio", id="trio"),
    ],
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """The backend for anyio's pytest plugin: a name, or ``(name, backend_options)``."""
    return request.param


# --- multiprocessing start methods --------------------------------------------------------------

START_METHODS = [
    method
    for method in ("fork", "spawn", "forkserver")
    if method in multiprocessing.get_all_start_methods()
]


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest) -> MPContext:
    """A multiprocessing context for each start method the platform offers."""
    context: MPContext = multiprocessing.get_context(request.param)
    return context


# --- leak check ---------------------------------------------------------------------------------

_GRACE = float(os.environ.get("ASYNCMP_LEAK_GRACE", "5"))
_FD_DIR = {"linux": "/proc/self/fd", "darwin": "/dev/fd"}.get(sys.platform)
# An idle worker in trio's thread cache; while it runs a job it is renamed after the job.
_IDLE_RUNTIME_THREAD = re.compile(r"Trio thread \d+")
_SETUP_OR_CALL_FAILED = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "no_leak_check(reason): the test may leave fds, threads or child processes behind",
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # A failure's traceback keeps its frames, and what they hold, alive: no leak report then.
    if report.when in ("setup", "call") and (report.failed or hasattr(report, "wasxfail")):
        item.stash[_SETUP_OR_CALL_FAILED] = True
    return report


@dataclass(frozen=True)
class _Snapshot:
    fds: dict[int, str]  # fd -> what it refers to, so a reused number still counts as new
    threads: frozenset[threading.Thread]
    children: dict[int, str]  # pid -> description

    @classmethod
    def take(cls) -> _Snapshot:
        return cls(_open_fds(), _live_threads(), _child_processes())

    def new_since(self, before: _Snapshot) -> list[str]:
        leaks = [
            f"fd {fd} -> {what}" for fd, what in self.fds.items() if before.fds.get(fd) != what
        ]
        leaks += [f"thread {t!r}" for t in self.threads - before.threads]
        leaks += [
            f"child {what}" for pid, what in self.children.items() if pid not in before.children
        ]
        return leaks


def _open_fds() -> dict[int, str]:
    if _FD_DIR is None:  # Windows: no cheap way to list handles
        return {}
    found = {}
    for name in os.listdir(_FD_DIR):
        fd = int(name)
        try:
            if sys.platform == "linux":
                found[fd] = os.readlink(f"{_FD_DIR}/{name}")
            else:
                st = os.fstat(fd)
                found[fd] = f"{stat.filemode(st.st_mode)[0]} dev={st.st_dev} ino={st.st_ino}"
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return found


def _live_threads() -> frozenset[threading.Thread]:
    return frozenset(t for t in threading.enumerate() if not _IDLE_RUNTIME_THREAD.fullmatch(t.name))


def _child_processes() -> dict[int, str]:
    # active_children() also reaps the multiprocessing children that have exited.
    children = {p.pid: repr(p) for p in multiprocessing.active_children() if p.pid is not None}
    if sys.platform == "linux":
        for pid in _linux_children():
            children.setdefault(pid, _describe_pid(pid))
    return children


def _linux_children() -> set[int]:
    """This process's children, zombies included (the forkserver's children are not ours)."""
    me = os.getpid()
    pids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{tid}/children") as f:
                pids.update(int(pid) for pid in f.read().split())
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN, or a task just ended
        pids = {int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _ppid(pid) == me}
    return pids


def _proc_stat(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat from the state on: [state, ppid, ...]; [] if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    return data.rpartition(")")[2].split()


def _ppid(pid: str) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[1]) if fields else None


def _describe_pid(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = ""
    fields = _proc_stat(pid)
    state = fields[0] if fields else "gone"
    return f"pid {pid} state {state}: {cmdline[:120] or '?'}"


def _settle(before: _Snapshot, deadline: float) -> None:
    """Give the test's threads and multiprocessing children until `deadline` to end."""
    for thread in _live_threads() - before.threads:
        # Joined in slices: a trio cache worker that finishes its job goes idle, not away.
        while (
            thread.is_alive()
            and not _IDLE_RUNTIME_THREAD.fullmatch(thread.name)
            and (left := deadline - time.monotonic()) > 0
        ):
            thread.join(min(left, 0.05))
    for process in multiprocessing.active_children():
        if process.pid not in before.children:
            process.join(max(deadline - time.monotonic(), 0))


def _end_children(before: _Snapshot) -> None:
    """Stop and reap the children a test left behind, so they cannot disturb later tests."""
    for process in multiprocessing.active_children():
        if process.pid not in before.children:
            _stop(process)
    if sys.platform == "linux":
        for pid in _linux_children() - before.children.keys():
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _stop(process: BaseProcess) -> None:
    process.terminate()
    process.join(2)
    if process.is_alive():
        process.kill()
        process.join()


@pytest.fixture(scope="session", autouse=True)
def _warm_up() -> None:
    """Create the session-long descriptors and processes before the first baseline."""
    for backend, options in [("asyncio", {}), ("asyncio", UVLOOP_OPTIONS), ("trio", {})]:
        if options is not None:
            anyio.run(anyio.lowlevel.checkpoint, backend=backend, backend_options=options)
    if os.name == "posix":
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    if "forkserver" in START_METHODS:
        from multiprocessing import forkserver

        forkserver.ensure_running()


@pytest.fixture(autouse=True)
def _leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a new fd, thread or child process behind."""
    if request.node.get_closest_marker("no_leak_check"):
        yield
        return
    before = _Snapshot.take()
    yield
    failed = request.node.stash.get(_SETUP_OR_CALL_FAILED, False)
    _settle(before, time.monotonic() + (0 if failed else _GRACE))
    gc.collect()  # close what only garbage holds; ResourceWarnings surface in this test
    leaks = _Snapshot.take().new_since(before)
    if leaks:
        _end_children(before)
    if leaks and not failed:
        pytest.fail(
            f"the test left {len(leaks)} thing(s) behind "
            f"(threads and children were given {_GRACE:g} s to end):\n  " + "\n  ".join(leaks),
            pytrace=False,
        )
