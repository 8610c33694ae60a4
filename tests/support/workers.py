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


#: The signals whose handling a child must not inherit from a server's parent process
#: (SIGINT last: what the child does with it depends on who started it).
INHERITED_SIGNALS = ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGCHLD", "SIGPIPE", "SIGINT")


def signal_handlers() -> dict[str, str]:
    """What this process does with each of :data:`INHERITED_SIGNALS`: ``"SIG_DFL"``,
    ``"SIG_IGN"``, ``"default_int_handler"`` or ``"a Python handler"``."""
    import signal

    def describe(handler: object) -> str:
        if handler is signal.SIG_DFL:
            return "SIG_DFL"
        if handler is signal.SIG_IGN:
            return "SIG_IGN"
        if handler is signal.default_int_handler:
            return "default_int_handler"
        return "a Python handler" if callable(handler) else repr(handler)

    return {name: describe(signal.getsignal(getattr(signal, name))) for name in INHERITED_SIGNALS}


def run_event_loops() -> list[str]:
    """Run an event loop of each kind in this process, one after another; each says which
    library runs it. A forked child that inherited its parent's running loop can't."""
    import asyncio

    import anyio
    import sniffio
    import trio

    async def which() -> str:
        await anyio.lowlevel.checkpoint()
        return sniffio.current_async_library()

    return [
        asyncio.run(which()),
        trio.run(which),
        anyio.run(which),
        anyio.run(which, backend="trio"),
    ]


def report_fresh_start(conn: Connection) -> None:
    """Send ``(signal_handlers(), run_event_loops())``: how this child started."""
    conn.send((signal_handlers(), run_event_loops()))
