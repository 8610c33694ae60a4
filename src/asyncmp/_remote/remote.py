"""Across machines: ``connect()`` and ``serve()``, the async ``Client`` and ``Listener``.

``multiprocessing.connection.Client`` and ``Listener`` are the stdlib's transport
between machines: a TCP (or Unix) socket carrying the ordinary message framing, opened
by an HMAC challenge over a shared *authkey*. :func:`connect` and :func:`serve` are the
same transport for async code. A peer can be the stdlib's, on any Python version, on
either side: the handshake messages come from ``_remote.auth``, which speaks both the md5-only
handshake of Python 3.11 and older and the negotiated-digest one of 3.12 and newer.

Sockets
-------
asyncmp creates its sockets itself with the ``socket`` module; none comes from the event
loop. An event loop's transport starts reading as soon as it exists, into a buffer of
its own, so bytes of the first handshake message could end up there rather than in the
connection's decoder; and uvloop would keep a handle on the descriptor. An
``AsyncConnection`` must be the only reader of its descriptor.

A socket is non-blocking only while it connects (or, for the listening socket, for its
whole life): it is freshly made, in this process alone, and no other process holds it
yet, so its flags are nobody else's business. Readiness for ``connect()`` and
``accept()`` is awaited through ``_core.readiness.ReadinessWaiter``, as everywhere in asyncmp, so
the event loop never sees these sockets. A connected socket is made blocking again
before it becomes a ``multiprocessing.connection.Connection``, so that it is exactly
what ``Client()`` or ``Listener.accept()`` would return, and is then wrapped in an
:class:`~asyncmp.AsyncConnection`, which moves bytes with per-call ``MSG_DONTWAIT``.

The handshake
-------------
It runs over that ``AsyncConnection``'s own ``send_bytes`` and ``recv_bytes``: bytes the
peer sends right after it (its first messages) are already in the connection's decoder,
never lost between two readers. Every handshake message is read with
``maxlength=256``: a longer one is rejected as soon as its header arrives, and a read
never takes more than one 64 KiB chunk from the socket before that check. The whole
exchange runs under *handshake_timeout*.

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

import errno
import io
import logging
import math
import multiprocessing.connection
import multiprocessing.util
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing import AuthenticationError
from typing import TYPE_CHECKING, Any, NoReturn, Union

import anyio
from anyio.lowlevel import checkpoint

from .._connection.connection import AsyncConnection
from .._core.exceptions import ProtocolError
from .._core.loop import LoopBinding
from .._core.wire import DEFAULT_MAX_MESSAGE_SIZE
from .._shared.shared import refusing
from .auth import (
    FAILURE,
    MESSAGE_LIMIT,
    WELCOME,
    answer_challenge,
    check_verdict,
    make_challenge,
    verify_response,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    from anyio.abc import TaskGroup, TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

if TYPE_CHECKING or sys.platform != "win32":
    # POSIX only; connect() and serve() refuse to run elsewhere before using these.
    from .._core.atfork import register_fork_owned
    from .._core.readiness import ReadinessWaiter

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

_FAMILIES = {"AF_INET": socket.AF_INET, "AF_UNIX": getattr(socket, "AF_UNIX", None)}
#: accept() failures that concern only the connection being accepted: try the next one.
_ACCEPT_RETRY = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "EPERM",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "EINTR",
    )
    if hasattr(errno, name)
)
#: accept() failures for lack of resources: wait a little, then try again.
_ACCEPT_BACK_OFF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BACK_OFF_SECONDS = 0.1

# Named as documented and as users configure it, not after the module's path.
logger = logging.getLogger("asyncmp._remote")


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------


def _require_posix() -> None:
    if sys.platform == "win32":  # pragma: no cover
        raise NotImplementedError("asyncmp.connect() and serve() need POSIX sockets")


def _resolve_family(address: Any, family: str | int | None) -> tuple[str, Any]:
    """Return ``(family name, address)``, the family inferred as the stdlib does."""
    if isinstance(address, os.PathLike):
        address = os.fspath(address)
    if family is None:
        if isinstance(address, tuple):
            family = "AF_INET"
        elif isinstance(address, str) and address.startswith("\\\\"):
            family = "AF_PIPE"  # a Windows named pipe: refused below
        elif isinstance(address, str) or _is_abstract(address):
            family = "AF_UNIX"
        else:
            raise ValueError(f"address type of {address!r} unrecognized")
    elif isinstance(family, int):
        family = socket.AddressFamily(family).name
    if family not in _FAMILIES or _FAMILIES[family] is None:
        raise ValueError(f"family {family!r} is not supported: use 'AF_INET' or 'AF_UNIX'")
    if family == "AF_INET":
        if not (
            isinstance(address, tuple)
            and len(address) == 2
            and isinstance(address[0], str)
            and isinstance(address[1], int)
        ):
            raise ValueError(f"an AF_INET address is a (host, port) tuple, not {address!r}")
    elif not isinstance(address, (str, bytes)):
        raise ValueError(f"an AF_UNIX address is a path, not {address!r}")
    return family, address


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


def _is_ipv4_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return False
    return True


async def _inet_targets(address: tuple[str, int]) -> list[tuple[str, int]]:
    """The IPv4 socket addresses *address* names, looked up without blocking the loop."""
    host, port = address
    if not host or _is_ipv4_literal(host):
        return [(host, port)]  # nothing to look up (and no resolver thread started)
    infos = await anyio.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    targets: list[tuple[str, int]] = []
    for info in infos:
        target = (str(info[4][0]), int(info[4][1]))
        if target not in targets:
            targets.append(target)
    return targets


# ---------------------------------------------------------------------------------------
# Sockets
# ---------------------------------------------------------------------------------------


async def _wait_writable(sock: socket.socket) -> None:
    waiter = ReadinessWaiter(sock.fileno(), writable=True)
    try:
        await waiter.wait()
    finally:
        waiter.close()


async def _connect_one(family: int, target: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Non-blocking while it connects: the socket is ours alone (module docstring).
        sock.setblocking(False)
        backoff = 0.001
        while True:
            err = sock.connect_ex(target)
            if err in (0, errno.EISCONN):
                break
            if err in (errno.EINPROGRESS, errno.EALREADY, errno.EINTR):
                # TCP: the outcome is known once the socket is writable.
                await _wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == 0:
                    break
            elif err in (errno.EAGAIN, errno.EWOULDBLOCK) and family != socket.AF_INET:
                # A Unix socket whose listener's backlog is full. Nothing signals when
                # there is room (the socket polls writable at once), so retry, backing off.
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 0.1)
                continue
            raise OSError(err, f"{os.strerror(err)}: {target!r}")
        sock.setblocking(True)
        return sock
    except BaseException:
        sock.close()
        raise


async def _connect_socket(family: str, address: Any) -> socket.socket:
    if family == "AF_INET":
        targets: list[Any] = await _inet_targets(address)
        if not targets:  # pragma: no cover - getaddrinfo() raises instead
            raise OSError(f"no IPv4 address for {address!r}")
    else:
        targets = [address]
    for target in targets[:-1]:
        try:
            return await _connect_one(_FAMILIES[family] or 0, target)
        except OSError:
            continue  # the next address may answer
    return await _connect_one(_FAMILIES[family] or 0, targets[-1])


def _peer(address: Any) -> str:
    """A peer's address for a log message (a Unix socket peer usually has none)."""
    if isinstance(address, tuple) and len(address) == 2:
        return f"{address[0]}:{address[1]}"
    return repr(address) if address else "an unnamed Unix socket peer"


def _is_abstract(address: object) -> bool:
    """A Linux abstract socket name (no file): it starts with a NUL."""
    return isinstance(address, (str, bytes)) and address[:1] in ("\0", b"\0")


async def _listening_socket(family: str, address: Any, backlog: int) -> socket.socket:
    if family == "AF_INET":
        address = (await _inet_targets(address))[0]
    sock = socket.socket(_FAMILIES[family] or 0, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the stdlib does
        sock.bind(address)
        sock.listen(backlog)
        # Non-blocking for good: accept() must not block, and this socket never leaves
        # the process (a forked child closes its copy, see AsyncListener).
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _wrap(sock: socket.socket, max_message_size: int | None, trusted: bool) -> AsyncConnection:
    """Turn a connected socket into an AsyncConnection (which then owns it)."""
    sock.setblocking(True)  # what Client() and Listener.accept() hand out
    conn = multiprocessing.connection.Connection(sock.detach())
    try:
        cls = _NetworkConnection if trusted else _BytesOnlyConnection
        return cls(conn, max_message_size=max_message_size)
    except BaseException:
        conn.close()
        raise


#: Why a shared() object can't cross a connection made by connect() or serve().
_NO_SHARED_MEMORY = (
    "shared memory only works between processes on one machine: a shared() object can't "
    "cross a connection made by connect() or serve(); send the object itself"
)


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


# ---------------------------------------------------------------------------------------
# The handshake, over the connection's own framing
# ---------------------------------------------------------------------------------------


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


async def _authenticate(
    conn: AsyncConnection, authkey: bytes, *, listening: bool, seconds: float
) -> None:
    """Both challenges, in the order ``Listener.accept()`` and ``Client()`` use."""
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
    family_name, target = _resolve_family(address, family)
    _check_authkey(authkey, family_name, allow_unauthenticated)
    timeout = _check_timeout(handshake_timeout)
    sock = await _connect_socket(family_name, target)
    conn = _wrap(sock, max_message_size, trusted)
    try:
        if authkey is not None:
            await _authenticate(conn, authkey, listening=False, seconds=timeout)
    except BaseException:
        conn.close()
        raise
    return conn


class AsyncListener:
    """The listening end that :func:`serve` yields: an async iterator of connections.

    Each connection it yields has been accepted and, with an authkey, authenticated.
    Connections are authenticated concurrently, each under the handshake timeout, so a
    slow or silent peer delays no other. A connection that fails the handshake is
    closed and logged (logger ``asyncmp._remote``, level WARNING), and the listener
    goes on accepting.

    At most *backlog* accepted connections are held at once, in the handshake or
    waiting for the iterator; beyond that the listener stops accepting until the
    iterator takes one, and new peers wait in the kernel's listen backlog.

    It belongs to the event loop that opened it, which runs its background tasks: its
    awaited methods called from a loop in another thread raise ``RuntimeError`` at once,
    which says how to call them through the listener's loop instead. The connections it
    yields belong to that loop too, having been used there for the handshake (with an
    authkey), or else to the first loop that uses them.
    """

    def __init__(
        self,
        sock: socket.socket,
        family: str,
        *,
        authkey: bytes | None,
        trusted: bool,
        handshake_timeout: float,
        max_message_size: int | None,
        backlog: int,
    ) -> None:
        self._sock = sock
        self._family = family
        self._address: Any = sock.getsockname()
        self._authkey = authkey
        self._trusted = trusted
        self._timeout = handshake_timeout
        self._max_message_size = max_message_size
        self._slots = anyio.Semaphore(backlog)
        self._send: MemoryObjectSendStream[AsyncConnection]
        self._receive: MemoryObjectReceiveStream[AsyncConnection]
        self._send, self._receive = anyio.create_memory_object_stream[AsyncConnection](math.inf)
        self._in_handshake: set[AsyncConnection] = set()
        self._closed = False
        self._error: OSError | None = None
        self._scope: anyio.CancelScope | None = None
        self._owner_pid = os.getpid()
        self._unlink = (
            family == "AF_UNIX"
            and isinstance(self._address, (str, bytes))
            and bool(self._address)
            and not _is_abstract(self._address)
        )
        self._waiter = ReadinessWaiter(sock.fileno())
        self._owner = LoopBinding("this AsyncListener", "opened")
        register_fork_owned(self)

    @property
    def address(self) -> Any:
        """The address it listens on; with port 0, the port the system picked."""
        return self._address

    @property
    def family(self) -> str:
        """``'AF_INET'`` or ``'AF_UNIX'``."""
        return self._family

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the background tasks ------------------------------------------------------------

    async def _run(self, *, task_status: TaskStatus[None]) -> None:
        # The background tasks get a task group of their own, so that close() can cancel
        # them without cancelling the caller's block, which runs in serve()'s.
        async with anyio.create_task_group() as tg:
            self._scope = tg.cancel_scope
            if self._closed:
                tg.cancel_scope.cancel()
            task_status.started()
            await self._accept_loop(tg)

    async def _accept_loop(self, task_group: TaskGroup) -> None:
        try:
            while True:
                await self._slots.acquire()
                try:
                    sock, peer = await self._accept_one()
                except BaseException:
                    self._slots.release()
                    raise
                try:
                    conn = _wrap(sock, self._max_message_size, self._trusted)
                except OSError as exc:  # out of descriptors, say: drop this one
                    self._slots.release()
                    logger.warning(
                        "asyncmp listener dropped a connection from %s: %s", _peer(peer), exc
                    )
                    continue
                # Tracked until it is handed over or dropped: a handshake task that the
                # closing listener cancels before it ever ran can't close it itself.
                self._in_handshake.add(conn)
                task_group.start_soon(self._admit, conn, peer)
        except anyio.ClosedResourceError:
            pass  # the listener was closed
        except OSError as exc:
            if not self._closed:
                self._error = exc
                logger.error("asyncmp listener on %r stopped accepting: %s", self._address, exc)
        finally:
            # Ends the iteration; handshakes still in progress can't hand over any more.
            self._send.close()

    async def _accept_one(self) -> tuple[socket.socket, Any]:
        while True:
            try:
                return self._sock.accept()
            except BlockingIOError:
                await self._waiter.wait()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY:
                    await checkpoint()
                elif exc.errno in _ACCEPT_BACK_OFF:
                    logger.warning(
                        "asyncmp listener on %r can't accept now (%s); retrying",
                        self._address,
                        exc,
                    )
                    await anyio.sleep(_BACK_OFF_SECONDS)
                else:
                    raise

    async def _admit(self, conn: AsyncConnection, peer: Any) -> None:
        """Authenticate one accepted connection and hand it to the iterator, or drop it."""
        handed_over = False
        try:
            if self._authkey is not None:
                await _authenticate(conn, self._authkey, listening=True, seconds=self._timeout)
            self._send.send_nowait(conn)
            handed_over = True
        except (
            AuthenticationError,
            TimeoutError,
            EOFError,
            anyio.BrokenResourceError,
            OSError,
        ) as exc:
            logger.warning("asyncmp listener dropped a connection from %s: %s", _peer(peer), exc)
        except anyio.ClosedResourceError:
            pass  # the listener closed while this connection was in the handshake
        except Exception:
            logger.exception("asyncmp listener dropped a connection from %s", _peer(peer))
        finally:
            self._in_handshake.discard(conn)
            if not handed_over:
                conn.close()
                self._slots.release()

    # -- taking connections --------------------------------------------------------------

    async def accept(self) -> AsyncConnection:
        """Return the next authenticated connection, waiting for one if need be.

        If cancelled, no connection was taken: the next call returns it.

        :raises anyio.ClosedResourceError: the listener was closed.
        :raises anyio.BrokenResourceError: accepting failed for good (the ``OSError`` is
            its ``__cause__``), and no connection is left to hand out.
        :raises RuntimeError: called from an event loop in another thread than the
            listener's (see :class:`AsyncListener`).
        """
        self._owner.check()
        self._check_open()
        try:
            conn = await self._receive.receive()
        except anyio.EndOfStream:
            if self._error is not None and not self._closed:
                raise anyio.BrokenResourceError(
                    f"the listener stopped accepting: {self._error}"
                ) from self._error
            raise anyio.ClosedResourceError from None
        self._slots.release()
        try:
            self._check_open()
        except anyio.ClosedResourceError:
            conn.close()  # it arrived as the listener closed
            raise
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError

    def __aiter__(self) -> AsyncListener:
        return self

    async def __anext__(self) -> AsyncConnection:
        """As :meth:`accept`, with its cancellation behaviour; the iteration ends when the
        listener is closed."""
        try:
            return await self.accept()
        except anyio.ClosedResourceError:
            raise StopAsyncIteration from None

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening: close the socket, drop the connections in the handshake.

        Iterations in progress end. Connections already yielded stay open: they are
        the caller's. Leaving :func:`serve`'s block does this too.
        """
        if self._closed:
            return
        self._closed = True
        self._waiter.close()
        self._sock.close()
        self._send.close()
        if self._scope is not None:
            self._scope.cancel()
        if self._unlink and os.getpid() == self._owner_pid:
            try:
                os.unlink(self._address)
            except OSError:
                pass

    async def aclose(self) -> None:
        """As :meth:`close`; a checkpoint. Closing happens even if it is cancelled, and
        it raises nothing, but for ``RuntimeError`` from another event loop than the
        listener's (see :class:`AsyncListener`), which closes nothing."""
        self._owner.check()
        self.close()
        await checkpoint()

    def _discard_leftovers(self) -> None:
        """Close the connections nobody took, and the stream they were in."""
        for conn in self._in_handshake:
            conn.close()
        self._in_handshake.clear()
        while True:
            try:
                conn = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            conn.close()
        self._receive.close()

    def _forget_in_forked_child(self) -> None:
        # The child must neither hold the listening socket nor unlink its path.
        self._closed = True
        self._unlink = False
        self._sock.close()

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "an AsyncListener can't be pickled or passed to another process: it listens in "
            "this process; pass its .address (and the authkey) and connect() from there"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<asyncmp.AsyncListener {state} {self._family} address={self._address!r}>"


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
    family_name, target = _resolve_family(address, family)
    _check_authkey(authkey, family_name, allow_unauthenticated)
    timeout = _check_timeout(handshake_timeout)
    if backlog < 1:
        raise ValueError(f"backlog={backlog} is less than 1")
    sock = await _listening_socket(family_name, target, backlog)
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
