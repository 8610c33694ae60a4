"""Across machines: ``connect()`` and ``serve()``, the async ``Client`` and ``Listener``.

``multiprocessing.connection.Client`` and ``Listener`` are the stdlib's transport
between machines: a TCP (or Unix) socket carrying the ordinary message framing, opened
by an HMAC challenge over a shared *authkey*. :func:`connect` and :func:`serve` are the
same transport for async code. A peer can be the stdlib's, on any Python version, on
either side: the handshake messages come from ``_remote.auth``, which speaks both the md5-only
handshake of Python 3.11 and older and the negotiated-digest one of 3.12 and newer.

This module holds the public functions and their arguments' checks; the parts they are
made of have modules of their own:

* ``_remote.sockets``: raw sockets, made by asyncmp itself (never by the event loop),
  non-blocking only while nobody else can hold them; connecting, listening, accepting.
* ``_remote.connections``: a connected socket made into an :class:`~asyncmp.AsyncConnection`
  that refuses shared memory (and, for ``trusted=False``, pickles).
* ``_remote.auth`` (the messages, no I/O) and ``_remote.handshake`` (the exchange, over the
  connection's own framing, under *handshake_timeout*).
* ``_remote.listener``: :class:`AsyncListener`, which accepts and authenticates
  connections concurrently (re-exported here, where ``asyncmp`` takes it from).

Security
--------
``recv()`` unpickles, and unpickling runs code the sender chooses: **a connection whose
messages you unpickle trusts its peer with your process.** The authkey is what makes a
peer trusted, so TCP requires one (``allow_unauthenticated=True`` opts out, for a
network you trust completely); a Unix socket is guarded by its file permissions and
needs none (``serve()``'s default path is in a directory that only its user can enter;
a path of your choosing is as open as its directory and your umask make it). The
authkey authenticates, it does not encrypt: across an untrusted network, run the
connection through a tunnel (SSH, a VPN, TLS termination). For a peer you do not
trust, pass ``trusted=False``: the connection is bytes-only, ``recv()`` and ``send()``
raise ``io.UnsupportedOperation``, and ``recv_bytes()`` / ``send_bytes()`` carry data
that you parse yourself. Also lower *max_message_size* then: it bounds what one
message may make you allocate.
"""

from __future__ import annotations

import math
import multiprocessing.util
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Union

import anyio

from .._connection.connection import AsyncConnection
from .._core.wire import DEFAULT_MAX_MESSAGE_SIZE
from .connections import wrap
from .handshake import authenticate
from .listener import AsyncListener as AsyncListener
from .sockets import connect_socket, listening_socket, resolve_family

if TYPE_CHECKING:
    from typing import TypeAlias

__all__ = (
    "DEFAULT_BACKLOG",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "AsyncListener",
    "connect",
    "serve",
)

#: Address of a listener: ``(host, port)`` for TCP, a path (or an abstract name starting
#: with a NUL) for a Unix socket.
Address: TypeAlias = Union[tuple[str, int], str, bytes, "os.PathLike[str]"]

#: How long the authentication handshake may take, in seconds, by default.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: The listening socket's backlog, and how many accepted connections a listener holds at
#: once (in the handshake, or authenticated and waiting for the iterator) by default.
DEFAULT_BACKLOG = 128


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------


def _require_posix() -> None:
    if sys.platform == "win32":  # pragma: no cover
        raise NotImplementedError("asyncmp.connect() and serve() need POSIX sockets")


def _check_authkey(authkey: bytes | None, family: str, allow_unauthenticated: bool) -> None:
    if authkey is None:
        if family == "AF_INET" and not allow_unauthenticated:
            raise ValueError(
                "a TCP connection needs an authkey: anyone who can reach the port could "
                "otherwise send pickles to unpickle (pass allow_unauthenticated=True only "
                "on a network you trust completely)"
            )
        return
    if not isinstance(authkey, bytes):
        raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
    if not authkey:
        raise ValueError("authkey is empty: pass a secret, or None for no authentication")


def _check_timeout(handshake_timeout: float | None) -> float:
    if handshake_timeout is None:
        return math.inf
    if not handshake_timeout > 0:
        raise ValueError(f"handshake_timeout={handshake_timeout} is not positive")
    return handshake_timeout


# ---------------------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------------------


async def connect(
    address: Address,
    *,
    family: str | int | None = None,
    authkey: bytes | None = None,
    allow_unauthenticated: bool = False,
    trusted: bool = True,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncConnection:
    """Connect to a listener, as ``multiprocessing.connection.Client()`` does, and
    return the :class:`AsyncConnection`.

    The listener can be :func:`serve`'s or a stdlib ``Listener`` (any Python version).
    If cancelled, nothing is left open.

    :param address: ``(host, port)`` for TCP, a path for a Unix socket. A host name is
        looked up without blocking the loop.
    :param family: ``'AF_INET'`` or ``'AF_UNIX'`` (or the ``socket`` constant); by
        default inferred from *address*, as the stdlib does.
    :param authkey: the shared secret; the handshake runs if it is not ``None``, and it
        must match the listener's. Required for TCP unless *allow_unauthenticated*.
    :param trusted: ``False`` makes the connection bytes-only: ``recv()`` and ``send()``
        raise ``io.UnsupportedOperation``, since unpickling a message runs code the peer
        chooses.
    :param handshake_timeout: seconds the handshake may take (``None``: no limit).
        Connecting itself waits as long as the operating system does; put the call in
        a cancel scope to bound it.
    :param max_message_size: as for :class:`AsyncConnection`.
    :raises multiprocessing.AuthenticationError: the listener rejected the authkey, sent
        one that doesn't match ours, or broke the handshake (a message that is not the
        expected one, or longer than 256 bytes).
    :raises TimeoutError: the handshake did not finish within *handshake_timeout*.
    :raises ConnectionEOF: the listener closed the connection during the handshake.
    :raises OSError: the connection could not be made (``ConnectionRefusedError``,
        ``FileNotFoundError`` ...).
    :raises ValueError: a TCP *address* without an *authkey*; an empty *authkey*.
    """
    _require_posix()
    family_name, target = resolve_family(address, family)
    _check_authkey(authkey, family_name, allow_unauthenticated)
    timeout = _check_timeout(handshake_timeout)
    sock = await connect_socket(family_name, target)
    conn = wrap(sock, max_message_size, trusted)
    try:
        if authkey is not None:
            await authenticate(conn, authkey, listening=False, seconds=timeout)
    except BaseException:
        conn.close()
        raise
    return conn


@asynccontextmanager
async def serve(
    address: Address | None = None,
    *,
    family: str | int | None = None,
    authkey: bytes | None = None,
    backlog: int = DEFAULT_BACKLOG,
    allow_unauthenticated: bool = False,
    trusted: bool = True,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncIterator[AsyncListener]:
    """Listen for connections, as ``multiprocessing.connection.Listener`` does.

    ::

        async with asyncmp.serve(("0.0.0.0", 6000), authkey=key) as listener:
            async with anyio.create_task_group() as tg:
                async for conn in listener:
                    tg.start_soon(handle, conn)

    The value is an :class:`AsyncListener`, an async iterator of accepted and
    authenticated connections; clients can be :func:`connect`'s or the stdlib's
    ``Client()`` (any Python version). Leaving the block closes the listener and every
    connection it accepted that nobody took; the connections it yielded are the
    caller's to close.

    Entering is cancellable while a host name is looked up; nothing is left open then.
    Leaving the block on a cancellation closes the listener as any exit does.

    The block runs background tasks: like a task group, it must be entered and left in
    the same task, and nest with other task groups rather than overlap them.

    :param address: ``(host, port)`` (port 0 picks a free one: see
        :attr:`AsyncListener.address`) or a Unix socket path, which must not exist yet
        and is removed on exit. ``None``: a fresh path in a temporary directory, or
        ``('127.0.0.1', 0)`` with ``family='AF_INET'``.
    :param family: ``'AF_INET'`` or ``'AF_UNIX'``; by default inferred from *address*.
    :param authkey: the shared secret every client must prove it knows. Required for
        TCP unless *allow_unauthenticated*.
    :param backlog: the listen backlog, and the most connections held at once in the
        handshake or waiting for the iterator.
    :param trusted: ``False`` yields bytes-only connections (see :func:`connect`).
    :param handshake_timeout: seconds a peer gets to complete the handshake
        (``None``: no limit, which lets silent peers use up the backlog).
    :param max_message_size: as for :class:`AsyncConnection`.
    :raises OSError: the address can't be bound (``OSError`` with ``EADDRINUSE`` ...).
    :raises ValueError: a TCP *address* without an *authkey*; an empty *authkey*.
    """
    _require_posix()
    if address is None:
        address = ("127.0.0.1", 0) if family in ("AF_INET", socket.AF_INET) else None
        if address is None:
            # In a directory of this process's own (mode 0700), removed at exit.
            address = os.path.join(
                multiprocessing.util.get_temp_dir(), f"asyncmp-{secrets.token_hex(8)}"
            )
    family_name, target = resolve_family(address, family)
    _check_authkey(authkey, family_name, allow_unauthenticated)
    timeout = _check_timeout(handshake_timeout)
    if backlog < 1:
        raise ValueError(f"backlog={backlog} is less than 1")
    sock = await listening_socket(family_name, target, backlog)
    try:
        listener = AsyncListener(
            sock,
            family_name,
            authkey=authkey,
            trusted=trusted,
            handshake_timeout=timeout,
            max_message_size=max_message_size,
            backlog=backlog,
        )
    except BaseException:
        sock.close()
        raise
    listener._owner.claim()
    body_error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(listener._run)
            try:
                yield listener
            except Exception as exc:
                # Raised again below, outside the task group, so that it reaches the
                # caller as itself rather than inside an ExceptionGroup.
                body_error = exc
            finally:
                listener.close()
    finally:
        listener.close()
        listener._discard_leftovers()
    if body_error is not None:
        raise body_error
