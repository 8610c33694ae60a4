"""Child-process targets for ``test_misuse.py``: what a child sees when it was handed an
asyncmp adapter instead of the plain object.

They live in an importable module so that every start method can run them.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any

__all__ = ("AsyncFetcher", "fetch", "noop", "report_inherited_connection")


def noop(*args: Any) -> None:
    """Do nothing: a target for a process that must not get as far as starting."""


def report_inherited_connection(inherited: Any, report: Connection) -> None:
    """Use *inherited* (an ``AsyncConnection`` a forked child got from its parent) and send
    back ``(exception type name, message)`` of what that raised, or ``None``."""
    with report:
        try:
            inherited.recv_nowait()
        except Exception as exc:
            report.send((type(exc).__name__, str(exc)))
        else:
            report.send(None)


async def fetch(x: int) -> int:
    """An async function: what a pool can't call as it is."""
    return x


class AsyncFetcher:
    """An object whose ``__call__`` is an async function: what a pool can't call either."""

    async def __call__(self, x: int) -> int:
        return x
