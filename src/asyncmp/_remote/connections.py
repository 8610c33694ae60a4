"""The connections ``connect()`` and ``serve()`` hand out: ``AsyncConnection`` over a socket.

:func:`wrap` turns a connected socket into what ``Client()`` or ``Listener.accept()``
would return (a blocking ``multiprocessing.connection.Connection``), wrapped in an
:class:`~asyncmp.AsyncConnection`, which moves bytes with per-call ``MSG_DONTWAIT``. A
connection to another machine refuses shared-memory references both ways; one to a peer
that is not trusted (``trusted=False``) is bytes-only besides.
"""

from __future__ import annotations

import io
import multiprocessing.connection
import socket
from typing import Any, NoReturn

from .._connection.connection import AsyncConnection
from .._shared.shared import refusing

__all__ = ("wrap",)

#: Why a shared() object can't cross a connection made by connect() or serve().
_NO_SHARED_MEMORY = (
    "shared memory only works between processes on one machine: a shared() object can't "
    "cross a connection made by connect() or serve(); send the object itself"
)


def wrap(sock: socket.socket, max_message_size: int | None, trusted: bool) -> AsyncConnection:
    """Turn a connected socket into an AsyncConnection (which then owns it); on an error
    the socket is closed.

    :raises OSError: the connection could not be made (out of descriptors, say).
    """
    sock.setblocking(True)  # what Client() and Listener.accept() hand out
    conn = multiprocessing.connection.Connection(sock.detach())
    try:
        cls = _NetworkConnection if trusted else _BytesOnlyConnection
        return cls(conn, max_message_size=max_message_size)
    except BaseException:
        conn.close()
        raise


class _NetworkConnection(AsyncConnection):
    """A connection to another machine: shared memory references are refused both ways.

    Refused even when the peer is on this machine (a Unix socket): the peer of such a
    connection is, in general, elsewhere, and a reference that arrives from elsewhere
    names nothing here (or, worse, a segment meant for somebody else).
    """

    def _unpickle(self, frame: bytes) -> Any:
        with refusing(_NO_SHARED_MEMORY):
            return super()._unpickle(frame)

    def _pickle(self, obj: Any) -> bytes:
        with refusing(_NO_SHARED_MEMORY):
            return super()._pickle(obj)


class _BytesOnlyConnection(_NetworkConnection):
    """A connection to a peer that is not trusted: bytes only, never a pickle."""

    def _refuse(self, method: str) -> NoReturn:
        raise io.UnsupportedOperation(
            f"{method}() pickles, and this connection is bytes-only (trusted=False): "
            "use recv_bytes() and send_bytes()"
        )

    async def recv(self) -> Any:
        """Refused: raises ``io.UnsupportedOperation`` (this connection is bytes-only)."""
        self._refuse("recv")

    def recv_nowait(self) -> Any:
        """Refused: raises ``io.UnsupportedOperation`` (this connection is bytes-only)."""
        self._refuse("recv_nowait")

    async def send(self, obj: Any) -> None:
        """Refused: raises ``io.UnsupportedOperation`` (this connection is bytes-only)."""
        self._refuse("send")

    def __repr__(self) -> str:
        return super().__repr__().replace("AsyncConnection", "AsyncConnection bytes-only", 1)
