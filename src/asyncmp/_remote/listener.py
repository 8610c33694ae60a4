"""The listening end of ``serve()``: :class:`AsyncListener`, an async iterator of connections.

It accepts on its own non-blocking socket (``_remote.sockets``), authenticates each
connection concurrently in a task of its own (``_remote.handshake``), each under the
handshake timeout, and hands the ones that pass to the iterator. A connection that fails
is closed and logged (logger ``asyncmp._remote``, level WARNING).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from multiprocessing import AuthenticationError
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
from anyio.lowlevel import checkpoint

from .._connection.connection import AsyncConnection
from .._core.loop import LoopBinding
from .connections import wrap
from .handshake import authenticate
from .sockets import accept_socket, is_abstract, peer

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

if TYPE_CHECKING or sys.platform != "win32":
    # POSIX only; serve() refuses to run elsewhere before making a listener.
    from .._core.atfork import register_fork_owned
    from .._core.readiness import ReadinessWaiter

__all__ = ("AsyncListener",)

# Named as documented and as users configure it, not after the module's path.
logger = logging.getLogger("asyncmp._remote")


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
            and not is_abstract(self._address)
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
                    sock, address = await accept_socket(self._sock, self._waiter, self._address)
                except BaseException:
                    self._slots.release()
                    raise
                try:
                    conn = wrap(sock, self._max_message_size, self._trusted)
                except OSError as exc:  # out of descriptors, say: drop this one
                    self._slots.release()
                    logger.warning(
                        "asyncmp listener dropped a connection from %s: %s", peer(address), exc
                    )
                    continue
                # Tracked until it is handed over or dropped: a handshake task that the
                # closing listener cancels before it ever ran can't close it itself.
                self._in_handshake.add(conn)
                task_group.start_soon(self._admit, conn, address)
        except anyio.ClosedResourceError:
            pass  # the listener was closed
        except OSError as exc:
            if not self._closed:
                self._error = exc
                logger.error("asyncmp listener on %r stopped accepting: %s", self._address, exc)
        finally:
            # Ends the iteration; handshakes still in progress can't hand over any more.
            self._send.close()

    async def _admit(self, conn: AsyncConnection, address: Any) -> None:
        """Authenticate one accepted connection and hand it to the iterator, or drop it."""
        handed_over = False
        try:
            if self._authkey is not None:
                await authenticate(conn, self._authkey, listening=True, seconds=self._timeout)
            self._send.send_nowait(conn)
            handed_over = True
        except (
            AuthenticationError,
            TimeoutError,
            EOFError,
            anyio.BrokenResourceError,
            OSError,
        ) as exc:
            logger.warning("asyncmp listener dropped a connection from %s: %s", peer(address), exc)
        except anyio.ClosedResourceError:
            pass  # the listener closed while this connection was in the handshake
        except Exception:
            logger.exception("asyncmp listener dropped a connection from %s", peer(address))
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
