"""The leak check in conftest.py fails a test that leaves something behind, and only then.

Each case runs a small inner test session in a subprocess, with a copy of conftest.py, so that
what the inner test leaks stays out of this process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py").read_text()

RunInner = Callable[[str], pytest.RunResult]


@pytest.fixture
def run_inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> RunInner:
    # A thread or child that is still there after 0.2 s is as leaked as after 5 s.
    monkeypatch.setenv("ASYNCMP_LEAK_GRACE", "0.2")
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")

    def run(source: str) -> pytest.RunResult:
        pytester.makepyfile(test_inner=source)
        # Without hypothesis's plugin an inner session starts in a fraction of the time.
        return pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-p", "no:hypothesispytest", timeout=60
        )

    return run


def test_clean_tests_pass(run_inner: RunInner) -> None:
    result = run_inner(
        """
        import os, threading
        import anyio, pytest

        def test_closes_what_it_opens(mp_context):
            r, w = os.pipe()
            os.close(r)
            os.close(w)
            thread = threading.Thread(target=os.getpid)
            thread.start()
            thread.join()
            process = mp_context.Process(target=os.getpid)
            process.start()
            process.join()
            assert process.exitcode == 0

        @pytest.mark.anyio
        async def test_worker_threads_of_the_runtime_are_not_leaks():
            await anyio.to_thread.run_sync(os.getpid)
        """
    )
    result.assert_outcomes(passed=6)


@pytest.mark.skipif(
    sys.platform not in ("linux", "darwin"), reason="fds are listed on Linux and macOS"
)
def test_leaked_fd_is_an_error(run_inner: RunInner) -> None:
    result = run_inner(
        """
        import os

        def test_leaks_a_pipe():
            os.pipe()
        """
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_pipe*", "*fd [0-9]* -> *"])


def test_leaked_thread_is_an_error(run_inner: RunInner) -> None:
    result = run_inner(
        """
        import threading

        def test_leaks_a_thread():
            threading.Thread(target=threading.Event().wait, name="leaky", daemon=True).start()
        """
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_thread*", "*thread*leaky*"])


@pytest.mark.skipif(sys.platform == "win32", reason="the inner test forks")
def test_leaked_process_is_an_error_and_is_ended(run_inner: RunInner) -> None:
    result = run_inner(
        """
        import multiprocessing, signal

        def test_leaks_a_process():
            multiprocessing.get_context("fork").Process(target=signal.pause).start()

        def test_runs_after_it():
            assert multiprocessing.active_children() == []
        """
    )
    # Had the leaked child survived, the inner session would hang at exit joining it.
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_process*", "*child*Process*"])


def test_garbage_resource_warning_is_an_error(run_inner: RunInner) -> None:
    result = run_inner(
        """
        import socket

        def test_drops_an_open_socket_in_a_cycle():
            cycle = [socket.socket()]
            cycle.append(cycle)
        """
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ResourceWarning*unclosed*socket*"])


@pytest.mark.skipif(sys.platform != "linux", reason="zombies are listed from /proc")
def test_zombie_is_an_error_and_is_reaped(run_inner: RunInner) -> None:
    result = run_inner(
        """
        import os

        zombies = []

        def test_leaves_a_zombie():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            zombies.append(pid)  # never waited for: the child stays a zombie

        def test_runs_after_it():
            try:
                os.waitpid(zombies[0], os.WNOHANG)
            except ChildProcessError:
                pass  # the leak check reaped it
            else:
                raise AssertionError("the zombie of the previous test is still there")
        """
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaves_a_zombie*", "*state Z*"])
