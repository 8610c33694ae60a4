"""Fork hygiene: what a forked child closes before it runs a line of its own.

Forked children inherit every descriptor. The descriptors asyncmp owns (a connection's
end, a readiness waiter's helper epoll/kqueue, a pipe's own read end, a process's
lifeline, a listener's socket) are closed in a forked child by the
``os.register_at_fork`` hook of this module, so a worker never holds a copy of the
parent's end: when the parent closes its end, the worker's ``recv()`` sees EOF, as it
should.

An object asks for it with :func:`register_fork_owned`; the registry holds it weakly, so
an object that is gone needs nothing undone. The hook runs in the child only, right after
the fork; each object closes what it holds there, and does no other I/O.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ("ForkOwned", "register_fork_owned")


class ForkOwned(Protocol):
    def _forget_in_forked_child(self) -> None:
        """Close this object's descriptors in a freshly forked child, without I/O."""


_fork_owned: weakref.WeakSet[ForkOwned] = weakref.WeakSet()


def register_fork_owned(obj: ForkOwned) -> None:
    """Have *obj*'s descriptors closed in any child this process forks from now on."""
    _fork_owned.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_fork_owned):
        obj._forget_in_forked_child()
    _fork_owned.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
