"""The functions the pool benchmarks run in worker processes.

A module of its own, importable by name, so that every contender's workers can load them:
anyio's and aiomultiprocess's workers are spawned, and import what they run.
"""

from __future__ import annotations

import os
import time

__all__ = ("async_identity", "async_spin", "identity", "pid", "sleep_for", "spin")


def identity(x: int) -> int:
    """The tiny task: return the argument."""
    return x


def spin(seconds: float) -> float:
    """The CPU-bound task: keep a core busy for *seconds*."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def sleep_for(seconds: float) -> int:
    """A call that runs for a while: what a cancellation interrupts."""
    time.sleep(seconds)
    return os.getpid()


def pid() -> int:
    return os.getpid()


# aiomultiprocess runs coroutine functions in its workers' own event loops.


async def async_identity(x: int) -> int:
    return x


async def async_spin(seconds: float) -> float:
    return spin(seconds)
