"""The worker-process side of the ``Worker`` channel of the conformance suite.

``peer(conn, control)`` runs in the child that ``asyncmp.open_worker`` starts: it plays the
peer on ``conn`` (the worker's end of the channel under test), doing what the parent asks
over ``control``, a plain Pipe of its own, and answers each command with ``("ok", value)``
or ``("error", description)``.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any


def peer(conn: Connection, control: Connection) -> None:
    while True:
        try:
            command: tuple[Any, ...] = control.recv()
        except EOFError:  # the parent is gone
            return
        if command[0] == "exit":
            conn.close()
            return
        try:
            value: Any = None
            if command[0] == "send":
                for item in command[1]:
                    conn.send_bytes(item)
            elif command[0] == "receive_until":
                value = []
                while (item := conn.recv_bytes()) != command[1]:
                    value.append(item)
            else:
                raise ValueError(f"unknown command {command[0]!r}")
        except Exception as exc:
            control.send(("error", repr(exc)))
        else:
            control.send(("ok", value))
