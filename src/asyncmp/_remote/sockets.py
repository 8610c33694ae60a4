"""Raw sockets for ``connect()`` and ``serve()``: addresses, connecting, listening, accepting.

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
before it becomes a ``multiprocessing.connection.Connection`` (``_remote.connections``), so
that it is exactly what ``Client()`` or ``Listener.accept()`` would return.

POSIX only: ``connect()`` and ``serve()`` refuse to run elsewhere before they get here.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

import anyio
from anyio.lowlevel import checkpoint

if TYPE_CHECKING or sys.platform != "win32":
    from .._core.readiness import ReadinessWaiter

__all__ = (
    "FAMILIES",
    "accept_socket",
    "connect_socket",
    "is_abstract",
    "listening_socket",
    "peer",
    "resolve_family",
)

#: The families served, by name; None where the platform lacks one.
FAMILIES = {"AF_INET": socket.AF_INET, "AF_UNIX": getattr(socket, "AF_UNIX", None)}
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
# Addresses
# ---------------------------------------------------------------------------------------


def resolve_family(address: Any, family: str | int | None) -> tuple[str, Any]:
    """Return ``(family name, address)``, the family inferred as the stdlib does."""
    if isinstance(address, os.PathLike):
        address = os.fspath(address)
    if family is None:
        if isinstance(address, tuple):
            family = "AF_INET"
        elif isinstance(address, str) and address.startswith("\\\\"):
            family = "AF_PIPE"  # a Windows named pipe: refused below
        elif isinstance(address, str) or is_abstract(address):
            family = "AF_UNIX"
        else:
            raise ValueError(f"address type of {address!r} unrecognized")
    elif isinstance(family, int):
        family = socket.AddressFamily(family).name
    if family not in FAMILIES or FAMILIES[family] is None:
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


def is_abstract(address: object) -> bool:
    """A Linux abstract socket name (no file): it starts with a NUL."""
    return isinstance(address, (str, bytes)) and address[:1] in ("\0", b"\0")


def peer(address: Any) -> str:
    """A peer's address for a log message (a Unix socket peer usually has none)."""
    if isinstance(address, tuple) and len(address) == 2:
        return f"{address[0]}:{address[1]}"
    return repr(address) if address else "an unnamed Unix socket peer"


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
# Connecting
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


async def connect_socket(family: str, address: Any) -> socket.socket:
    """A blocking socket connected to *address* (each of a host name's IPv4 addresses
    tried in turn). If cancelled, nothing is left open.

    :raises OSError: no address could be connected to (the last address's error).
    """
    if family == "AF_INET":
        targets: list[Any] = await _inet_targets(address)
        if not targets:  # pragma: no cover - getaddrinfo() raises instead
            raise OSError(f"no IPv4 address for {address!r}")
    else:
        targets = [address]
    for target in targets[:-1]:
        try:
            return await _connect_one(FAMILIES[family] or 0, target)
        except OSError:
            continue  # the next address may answer
    return await _connect_one(FAMILIES[family] or 0, targets[-1])


# ---------------------------------------------------------------------------------------
# Listening
# ---------------------------------------------------------------------------------------


async def listening_socket(family: str, address: Any, backlog: int) -> socket.socket:
    """A non-blocking socket bound to *address* and listening. If cancelled (while a host
    name is looked up), nothing is left open.

    :raises OSError: the address can't be bound.
    """
    if family == "AF_INET":
        address = (await _inet_targets(address))[0]
    sock = socket.socket(FAMILIES[family] or 0, socket.SOCK_STREAM)
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


async def accept_socket(
    sock: socket.socket, waiter: ReadinessWaiter, address: Any
) -> tuple[socket.socket, Any]:
    """The next connection on the listening *sock* (whose readiness *waiter* watches),
    and its peer's address. Failures that concern only the connection being accepted are
    skipped; for lack of resources it waits a little (logged, naming *address*) and tries
    again. If cancelled, no connection was accepted.

    :raises anyio.ClosedResourceError: *waiter* was closed.
    :raises OSError: accepting failed for good.
    """
    while True:
        try:
            return sock.accept()
        except BlockingIOError:
            await waiter.wait()
        except OSError as exc:
            if exc.errno in _ACCEPT_RETRY:
                await checkpoint()
            elif exc.errno in _ACCEPT_BACK_OFF:
                logger.warning(
                    "asyncmp listener on %r can't accept now (%s); retrying", address, exc
                )
                await anyio.sleep(_BACK_OFF_SECONDS)
            else:
                raise
