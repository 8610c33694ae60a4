"""The authentication handshake, run over a connection's own framing.

``_remote.auth`` builds and checks the messages, without I/O; this module sends and
receives them. It runs over the ``AsyncConnection``'s own ``send_bytes`` and
``recv_bytes``: bytes the peer sends right after it (its first messages) are already in
the connection's decoder, never lost between two readers. Every handshake message is read
with ``maxlength=256``: a longer one is rejected as soon as its header arrives, and a read
never takes more than one 64 KiB chunk from the socket before that check. The whole
exchange runs under the caller's handshake timeout.
"""

from __future__ import annotations

from multiprocessing import AuthenticationError

import anyio

from .._connection.connection import AsyncConnection
from .._core.exceptions import ProtocolError
from .auth import (
    FAILURE,
    MESSAGE_LIMIT,
    WELCOME,
    answer_challenge,
    check_verdict,
    make_challenge,
    verify_response,
)

__all__ = ("authenticate",)


async def _challenge(conn: AsyncConnection, authkey: bytes) -> None:
    """Challenge the peer; raises AuthenticationError (after telling it) if it fails."""
    frame, message = make_challenge()
    await conn.send_bytes(frame)
    response = await conn.recv_bytes(MESSAGE_LIMIT)
    try:
        verify_response(authkey, message, response)
    except AuthenticationError:
        try:
            await conn.send_bytes(FAILURE)
        except (anyio.BrokenResourceError, OSError):
            pass  # the peer is gone: it needs no verdict
        raise
    await conn.send_bytes(WELCOME)


async def _answer(conn: AsyncConnection, authkey: bytes) -> None:
    """Answer the peer's challenge; raises AuthenticationError if it rejects us."""
    frame = await conn.recv_bytes(MESSAGE_LIMIT)
    await conn.send_bytes(answer_challenge(authkey, frame))
    check_verdict(await conn.recv_bytes(MESSAGE_LIMIT))


async def authenticate(
    conn: AsyncConnection, authkey: bytes, *, listening: bool, seconds: float
) -> None:
    """Both challenges, in the order ``Listener.accept()`` and ``Client()`` use: the
    listening side challenges first. If cancelled, the handshake is left half done: close
    *conn*.

    :raises multiprocessing.AuthenticationError: a challenge failed either way, or the
        peer broke the handshake (a message longer than :data:`~.auth.MESSAGE_LIMIT`, or
        a broken frame).
    :raises TimeoutError: the handshake took more than *seconds*.
    Also what *conn*'s receives and sends raise (``ConnectionEOF`` if the peer left).
    """
    with anyio.move_on_after(seconds) as scope:
        try:
            if listening:
                await _challenge(conn, authkey)
                await _answer(conn, authkey)
            else:
                await _answer(conn, authkey)
                await _challenge(conn, authkey)
        except ProtocolError as exc:
            raise AuthenticationError(
                f"the peer broke the handshake: {exc} (the limit is {MESSAGE_LIMIT} bytes)"
            ) from exc
        return
    if scope.cancelled_caught:
        raise TimeoutError(f"the peer did not complete the handshake within {seconds:g} s")
