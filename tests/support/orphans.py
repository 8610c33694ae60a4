"""A process whose parent is SIGKILLed: does it end with its parent, and is it cleaned up?

:func:`killed_owner` starts an *owner* process (spawned, so it starts clean), which starts
the child to watch (a pool worker, an ``open_worker`` or ``open_process`` child) and has it
say ``("started", pid)`` on a pipe once it is busy. Then the owner is SIGKILLed, as the OOM
killer or ``docker kill`` would, and reaped. The child is not this process's child, so it is
watched through a pidfd (Linux), opened while it still runs: no pid reuse can fool the
watch, and whatever the test finds, the child is SIGKILLed through that pidfd on the way
out. Its own helpers (a forkserver, a resource tracker) end once the child has.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ("ORPHAN_PATIENCE", "Orphan", "killed_owner")

#: How long a child may take to notice that its parent is gone: generous, for a loaded
#: machine (it takes milliseconds).
ORPHAN_PATIENCE = 10.0
#: How long the owner may take to start its child and report it (a spawned interpreter
#: that imports asyncmp, then a pool or a process of its own).
_OWNER_START = 60.0

_SPAWN = multiprocessing.get_context("spawn")


class Orphan:
    """The watched child, by pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)

    def ends_within(self, seconds: float) -> bool:
        """Wait up to *seconds* for the process to end; whether it did."""
        return bool(select.select([self._pidfd], [], [], seconds)[0])

    def close(self) -> None:
        """Kill the process if it still runs, and forget it."""
        if self._pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        os.close(self._pidfd)
        self._pidfd = -1


@contextlib.contextmanager
def killed_owner(target: Callable[..., object], *args: Any) -> Iterator[Orphan]:
    """Start ``target(report, *args)`` in a spawned owner process, wait for its child's
    ``("started", pid)`` on *report*, SIGKILL and reap the owner; yield the child.

    The owner and its child are gone on the way out, whatever the test found.
    """
    ours, theirs = _SPAWN.Pipe(duplex=False)
    owner = _SPAWN.Process(target=target, args=(theirs, *args), name="orphan-test-owner")
    child: Orphan | None = None
    try:
        owner.start()
        theirs.close()
        deadline = time.monotonic() + _OWNER_START
        while not ours.poll(0.1):
            assert owner.is_alive(), f"the owner ended with {owner.exitcode} first"
            assert time.monotonic() < deadline, "the owner never reported its child"
        word, pid = ours.recv()
        assert word == "started"
        child = Orphan(pid)
        owner.kill()
        owner.join()
        yield child
    finally:
        theirs.close()
        if owner.pid is not None:
            owner.kill()
            owner.join()
            owner.close()
        ours.close()
        if child is not None:
            child.close()
