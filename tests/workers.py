"""Child-process targets for the tests.

They live in an importable module so that every start method can run them: spawn and
forkserver children import this module by name instead of inheriting the parent's memory.
Keep the imports light; each spawned child pays for them.
"""

from __future__ import annotations

import multiprocessing.context
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
    from typing import TypeAlias

    # What the mp_context fixture gives. Its stub lacks Process, so BaseContext is only the
    # run-time stand-in (there is no ForkContext on Windows).
    MPContext: TypeAlias = ForkContext | ForkServerContext | SpawnContext
else:
    MPContext = multiprocessing.context.BaseContext


def seed_pipe_child(conn: Connection) -> None:
    """Send ``[42, None, 'hello']``, then answer each message until the parent closes its end.

    The reply to ``msg`` is ``f"child got {msg!r}"``. EOF on ``conn`` is the clean shutdown.
    A parent that closes before reading a reply makes this child die of BrokenPipeError.
    """
    with conn:
        conn.send([42, None, "hello"])
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            conn.send(f"child got {msg!r}")


def echo_bytes(conn: Connection) -> None:
    """Send back every byte message unchanged, until EOF."""
    with conn:
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                return
            conn.send_bytes(data)


def send_n(conn: Connection, n: int, size: int) -> None:
    """Send ``n`` pickled messages ``(i, b"x" * size)`` for i in 0..n-1, then close."""
    with conn:
        payload = b"x" * size
        for i in range(n):
            conn.send((i, payload))
