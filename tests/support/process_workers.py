"""Child-process targets for ``test_process.py``.

They live in an importable module so that every start method can run them. Targets that
must be running (or must have installed a signal disposition) before the test goes on say
``"ready"`` on a connection the test gives them; the test awaits that word instead of
guessing with a sleep.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

__all__ = (
    "EXIT",
    "KILL",
    "echo_until_eof",
    "exit_with",
    "ignore_sigterm_then_hang",
    "kill_self",
    "own_a_busy_child",
    "own_an_echoing_child",
    "report_and_echo",
    "report_and_spin",
    "report_and_spin_worker",
    "say_ready_then_hang",
    "send_then_return",
    "worker_ignoring_sigterm_and_eof",
)

#: Messages that make :func:`echo_until_eof` die mid-conversation.
EXIT = "exit"
KILL = "kill"


def exit_with(code: int) -> None:
    """Return (exit code 0) or ``sys.exit(code)``."""
    if code:
        sys.exit(code)


def kill_self() -> None:
    """Die of SIGKILL: the exit code is ``-SIGKILL``."""
    os.kill(os.getpid(), signal.SIGKILL)


def _hang() -> None:
    while True:
        time.sleep(3600)


def say_ready_then_hang(ready: Connection) -> None:
    """Say ``"ready"``, then sleep until a signal ends the process (SIGTERM does)."""
    ready.send("ready")
    ready.close()
    _hang()


def ignore_sigterm_then_hang(ready: Connection) -> None:
    """Ignore SIGTERM, say ``"ready"``, then sleep: only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.send("ready")
    ready.close()
    _hang()


def echo_until_eof(conn: Connection) -> None:
    """Send back every message until EOF, then return (exit code 0).

    ``(EXIT, code)`` makes it exit at once with *code*, and ``KILL`` makes it die of
    SIGKILL, both without a reply: a crash in the middle of a conversation.
    """
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if isinstance(msg, tuple) and msg[0] == EXIT:
            os._exit(msg[1])
        if msg == KILL:
            os.kill(os.getpid(), signal.SIGKILL)
        conn.send(msg)


def worker_ignoring_sigterm_and_eof(conn: Connection) -> None:
    """A runaway worker: ignores SIGTERM, says ``"ready"``, never reads: only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn.send("ready")
    _hang()


def send_then_return(conn: Connection, count: int) -> None:
    """Send ``0 .. count-1``, then return: the parent sees EOF after the last one."""
    for i in range(count):
        conn.send(i)


def send_then_exit(conn: Connection, count: int, code: int) -> None:
    """Send 0 .. count-1, then end the process at once with *code* (a crash)."""
    for i in range(count):
        conn.send(i)
    os._exit(code)


def report_and_spin(report: Connection, seconds: float) -> None:
    """Say ``("started", pid)`` on *report*, then keep the CPU busy for *seconds*: Python
    code running all along, as a real computation does."""
    report.send(("started", os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def report_and_spin_worker(conn: Connection, report: Connection, seconds: float) -> None:
    """:func:`report_and_spin` as an ``open_worker`` target."""
    report_and_spin(report, seconds)


def report_and_echo(report: Connection, conn: Connection) -> None:
    """Say ``("started", pid)`` on *report*, then :func:`echo_until_eof` on *conn*."""
    report.send(("started", os.getpid()))
    echo_until_eof(conn)


def own_a_busy_child(report: Connection, method: str, opener: str) -> None:
    """The owner of ``tests/support/orphans.py``: an ``open_process`` or ``open_worker``
    child of start *method*, busy in :func:`report_and_spin`, which says so on *report*."""
    import anyio

    import asyncmp

    context = multiprocessing.get_context(method)

    async def main() -> None:
        if opener == "open_process":
            async with asyncmp.open_process(
                report_and_spin, report, 120.0, context=context
            ) as process:
                await process.wait()
        else:
            async with asyncmp.open_worker(
                report_and_spin_worker, report, 120.0, context=context
            ) as worker:
                await worker.process.wait()

    anyio.run(main)


def own_an_echoing_child(
    report: Connection, conn: Connection, method: str, die_with_parent: bool
) -> None:
    """The owner of ``tests/support/orphans.py``: an ``open_process`` child of start
    *method* that answers on *conn* (:func:`report_and_echo`)."""
    import anyio

    import asyncmp

    async def main() -> None:
        async with asyncmp.open_process(
            report_and_echo,
            report,
            conn,
            context=multiprocessing.get_context(method),
            die_with_parent=die_with_parent,
        ) as process:
            await process.wait()

    anyio.run(main)
