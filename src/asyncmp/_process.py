"""Worker processes for async code: wait without a thread, never leak one.

:class:`AsyncProcess` waits for a ``multiprocessing.Process`` to end. On Linux it
watches a pidfd, which becomes readable once the process has exited and can be
reaped; elsewhere on POSIX it watches the process sentinel (a pipe whose write end the
child holds), then reaps. Either way the wait goes through ``_fdio``'s helper
descriptor, and no thread is involved. On Windows a thread waits in short slices.

:func:`open_process` and :func:`open_worker` tie a process's life to an ``async with``
block. Leaving the block normally lets the process finish on its own for up to
``shutdown_timeout`` seconds, then terminates it, then kills it. Leaving on an
exception or a cancellation terminates it at once and kills it after a short grace.
Whichever way the block is left, the process is reaped before the block exits: no
zombie, no orphan.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, NoReturn

import anyio
from anyio.lowlevel import checkpoint

from . import _platform
from ._connection import AsyncConnection
from ._exceptions import ConnectionEOF
from ._threads import BlockingCall

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:
    from typing_extensions import TypeVar

if TYPE_CHECKING or sys.platform != "win32":
    from ._fdio import ReadinessWaiter

__all__ = ("AsyncProcess", "Worker", "WorkerExited", "open_process", "open_worker")

#: What a Worker's pipe carries; ``Any`` unless the code says otherwise.
T = TypeVar("T", default=Any)

#: Grace between terminate() and kill() when a block is left on an error.
TERMINATE_GRACE = 1.0
#: How long a receive that hit EOF waits for the worker's exit code to explain it.
_EXIT_CODE_WAIT = 1.0
#: The tiny window between a sentinel's EOF and the process being reapable.
_REAP_RETRY = 0.001


def describe_exit(exitcode: int | None) -> str:
    """``"worker exited with code 7"`` or ``"worker was killed by signal 9 (SIGKILL)"``."""
    if exitcode is None:
        return "worker closed its connection but is still running"
    if exitcode >= 0:
        return f"worker exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = "unknown signal"
    return f"worker was killed by signal {-exitcode} ({name})"


class WorkerExited(ConnectionEOF):
    """The worker process ended; the message says how (exit code or signal)."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(describe_exit(exitcode))
        self.exitcode = exitcode


class AsyncProcess:
    """Async handle on a started ``multiprocessing.Process``.

    Only the process that started it can wait for it: pickling an AsyncProcess, or
    passing it to a spawned child, raises ``TypeError``.
    """

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        if process.pid is None:
            raise ValueError("the process has not been started")
        if sys.platform != "win32" and process.pid == os.getpid():
            raise ValueError("an AsyncProcess can't wait for its own process")
        self._process = process
        self._pid: int = process.pid
        self._exitcode: int | None = None  # kept once reaped: it outlives close()
        self._closed = False
        self._waiter: Any = None
        self._pidfd = -1

    @property
    def process(self) -> multiprocessing.process.BaseProcess:
        """The wrapped ``multiprocessing`` process object."""
        return self._process

    @property
    def pid(self) -> int:
        """The process id."""
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """The exit code once reaped: negative for a signal, as ``Process.exitcode``.

        Reading it reaps the process if it has ended. It stays readable after the
        ``async with`` block closed the process object.
        """
        if self._exitcode is None and not self._closed:
            self._exitcode = self._process.exitcode
        return self._exitcode

    def is_alive(self) -> bool:
        return self.exitcode is None and not self._closed

    def terminate(self) -> None:
        """Send SIGTERM (TerminateProcess on Windows) if it is still running."""
        if self.exitcode is None and not self._closed:
            self._process.terminate()

    def kill(self) -> None:
        """Send SIGKILL if it is still running."""
        if self.exitcode is None and not self._closed:
            self._process.kill()

    async def wait(self) -> int:
        """Wait until the process has ended and been reaped; return its exit code.

        If cancelled, nothing changed: the process runs on and can be waited for again.
        It raises nothing of its own.
        """
        try:
            return await self._wait()
        except BaseException:
            # Don't keep descriptors open for a wait nobody is doing any more.
            self._close_waiter()
            raise

    async def _wait(self) -> int:
        while True:
            code = self.exitcode  # reaps it if it has ended (waitpid WNOHANG)
            if code is not None:
                self._close_waiter()
                await checkpoint()
                return code
            if not _platform.POSIX_FDS:  # Windows: a sentinel is a handle
                await self._wait_in_thread()
                continue
            if self._waiter is None:
                self._open_waiter()
            if self._pidfd >= 0:
                await self._waiter.wait()
                if self.exitcode is None:
                    # The process has ended, yet waitpid can't reap it: it is not our
                    # child (a forkserver's). Its exit status comes through the
                    # sentinel, a moment later; wait for that instead of spinning.
                    self._close_waiter()
                    self._waiter = ReadinessWaiter(self._process.sentinel)
            elif not self._sentinel_ready():
                await self._waiter.wait()
            else:
                # The sentinel says "gone" a moment before waitpid can reap.
                await anyio.sleep(_REAP_RETRY)

    def _open_waiter(self) -> None:
        fd = -1
        if hasattr(os, "pidfd_open") and self._process.pid is not None:
            try:
                fd = os.pidfd_open(self._process.pid)
            except OSError:
                fd = -1
        self._pidfd = fd
        self._waiter = ReadinessWaiter(fd if fd >= 0 else self._process.sentinel)

    def _sentinel_ready(self) -> bool:
        return bool(multiprocessing.connection.wait([self._process.sentinel], 0))

    def _close_waiter(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    async def _wait_in_thread(self) -> None:
        process = self._process

        def join(call: BlockingCall[None]) -> None:
            while process.exitcode is None and not call.stopping:
                process.join(0.05)

        call: BlockingCall[None] = BlockingCall(join, name="asyncmp-process-wait")
        await call.start()
        try:
            await call.wait()
        finally:
            call.request_stop()

    async def stop(self, *, grace: float = TERMINATE_GRACE) -> int:
        """Terminate, wait up to *grace* seconds, kill, and reap. Returns the exit code.

        Runs to completion even if cancelled (shielded): a half-stopped process is worse.
        It raises nothing of its own.
        """
        with anyio.CancelScope(shield=True):
            self.terminate()
            with anyio.move_on_after(grace):
                await self.wait()
            if self.exitcode is None:
                self.kill()
                await self.wait()
        code = self.exitcode
        assert code is not None
        return code

    async def _shutdown(self, patience: float, failed: bool) -> None:
        if failed:
            await self.stop()
            return
        try:
            with anyio.move_on_after(patience):
                await self.wait()
                return
        except BaseException:
            await self.stop()
            raise
        await self.stop()

    def close(self) -> None:
        """Release the process object's resources (after it has been reaped)."""
        self._close_waiter()
        if not self._closed and self.exitcode is not None:
            self._closed = True
            self._process.close()

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "an AsyncProcess can't be pickled or passed to another process: only the "
            "process that started it can wait for it; pass its .pid to say which one it is"
        )

    def __repr__(self) -> str:
        return f"<asyncmp.AsyncProcess pid={self.pid} exitcode={self.exitcode}>"


@asynccontextmanager
async def open_process(
    target: Callable[..., object],
    *args: Any,
    context: Any = None,
    name: str | None = None,
    shutdown_timeout: float = 5.0,
) -> AsyncIterator[AsyncProcess]:
    """Start ``target(*args)`` in a process for the duration of the block.

    Leaving the block normally waits up to *shutdown_timeout* seconds for the process to
    end on its own, then terminates it, then kills it. Leaving on an exception or a
    cancellation terminates it at once and kills it after a short grace. The process is
    reaped before the block exits, and what the block raised then propagates.

    Entering starts the process at once and is not a checkpoint. Leaving is shielded
    where it must be: a cancellation can't leave the process running or unreaped.

    :raises OSError: (or what ``Process.start()`` raises) the process could not start.
    """
    ctx = context if context is not None else multiprocessing.get_context()
    process = ctx.Process(target=target, args=args, name=name)
    process.start()
    aprocess = AsyncProcess(process)
    try:
        try:
            yield aprocess
        except BaseException:
            await aprocess._shutdown(0, failed=True)
            raise
        await aprocess._shutdown(shutdown_timeout, failed=False)
    finally:
        aprocess.close()


class Worker(Generic[T]):
    """A worker process and the async end of its duplex Pipe.

    It has :class:`AsyncConnection`'s methods. When the worker dies, a pending or later
    receive raises :class:`WorkerExited` (an ``EOFError``) saying how it ended.
    ``async for msg in worker`` receives until the worker closes its end.

    ``Worker[T]`` says what the pipe carries, as ``AsyncConnection[T]`` does (``Any``
    without a type argument). A Worker belongs to the process that opened it: pickling
    it, or passing it to a spawned child, raises ``TypeError``.
    """

    def __init__(self, connection: AsyncConnection[T], process: AsyncProcess) -> None:
        self._conn = connection
        self._process = process

    @property
    def process(self) -> AsyncProcess:
        """The worker process: its :attr:`~AsyncProcess.pid`, its
        :attr:`~AsyncProcess.exitcode`, :meth:`~AsyncProcess.wait` for it to end, or
        :meth:`~AsyncProcess.stop` it."""
        return self._process

    @property
    def connection(self) -> AsyncConnection[T]:
        """The parent's end of the pipe (owned by the Worker)."""
        return self._conn

    async def _explain_eof(self, eof: ConnectionEOF) -> WorkerExited:
        with anyio.move_on_after(_EXIT_CODE_WAIT):
            await self._process.wait()
        error = WorkerExited(self._process.exitcode)
        error.__cause__ = eof
        return error

    async def recv(self) -> T:
        """As :meth:`AsyncConnection.recv`; raises :class:`WorkerExited` at EOF.

        If cancelled, no message was consumed; the next call returns it.
        """
        try:
            return await self._conn.recv()
        except WorkerExited:
            raise
        except ConnectionEOF as eof:
            raise await self._explain_eof(eof) from eof

    async def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """As :meth:`AsyncConnection.recv_bytes`; raises :class:`WorkerExited` at EOF.

        If cancelled, no message was consumed; the next call returns it.
        """
        try:
            return await self._conn.recv_bytes(maxlength)
        except ConnectionEOF as eof:
            raise await self._explain_eof(eof) from eof

    def recv_nowait(self) -> T:
        """As :meth:`AsyncConnection.recv_nowait`."""
        return self._conn.recv_nowait()

    async def send(self, obj: T) -> None:
        """As :meth:`AsyncConnection.send`, with its cancellation behaviour and exceptions."""
        await self._conn.send(obj)

    async def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """As :meth:`AsyncConnection.send_bytes`, with its cancellation behaviour and
        exceptions."""
        await self._conn.send_bytes(buf, offset, size)

    def __aiter__(self) -> Worker[T]:
        return self

    async def __anext__(self) -> T:
        # EOF ends the iteration if the worker ended well (or still runs, having closed
        # its end); a crash is not a clean end of the stream, so it raises.
        try:
            return await self._conn.recv()
        except ConnectionEOF as eof:
            error = await self._explain_eof(eof)
            if error.exitcode in (0, None):
                raise StopAsyncIteration from None
            raise error from eof

    async def aclose(self) -> None:
        """Close the parent's end of the pipe: the worker's ``recv()`` sees EOF.

        The process itself is left to the :func:`open_worker` block. As
        :meth:`AsyncConnection.aclose`: closing happens even if cancelled; raises nothing.
        """
        await self._conn.aclose()

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a Worker can't be pickled or passed to another process: it is this process's "
            "handle on its worker; to reach the worker from elsewhere, give that process a "
            "plain Pipe or Queue of its own"
        )

    def __repr__(self) -> str:
        return f"<asyncmp.Worker {self._process!r}>"


@asynccontextmanager
async def open_worker(
    target: Callable[..., object],
    *args: Any,
    context: Any = None,
    shutdown_timeout: float = 5.0,
) -> AsyncIterator[Worker]:
    """Run ``target(conn, *args)`` in a child, where ``conn`` is the plain worker end of a
    duplex Pipe; yield a :class:`Worker` to talk to it.

    On leaving the block the parent's end is closed first, so a worker looping on
    ``conn.recv()`` sees ``EOFError`` and can return; then the process is shut down as
    :func:`open_process` does. Leaving on an exception or a cancellation closes the
    parent's end and terminates the worker at once; either way it is reaped before the
    block exits.

    Entering starts the process at once and is not a checkpoint.

    One request, one reply, one connection: a timeout (or any cancellation) between
    ``await worker.send(request)`` and ``await worker.recv()`` consumed nothing, so the
    reply stays in the pipe and the next ``recv()`` returns it to whoever asks next. After
    such a timeout, leave the block (the worker is stopped) or tag each request and drop
    replies with a stale tag; the cancellation how-to shows both. A worker pool,
    ``asyncmp.open_pool()``, is planned to do this for you.

    :raises OSError: (or what ``Process.start()`` raises) the process could not start.
    """
    ctx = context if context is not None else multiprocessing.get_context()
    parent_end, child_end = ctx.Pipe(duplex=True)
    # Wrap the parent's end before forking, so that a forked child closes its copy and
    # sees EOF once the parent closes this end.
    conn = AsyncConnection(parent_end)
    try:
        process = ctx.Process(target=target, args=(child_end, *args))
        process.start()
    except BaseException:
        conn.close()
        raise
    finally:
        child_end.close()
    aprocess = AsyncProcess(process)
    worker = Worker(conn, aprocess)
    try:
        try:
            yield worker
        except BaseException:
            conn.close()
            await aprocess._shutdown(0, failed=True)
            raise
        try:
            await conn.aclose()
        except BaseException:
            # Cancelled on the way out (aclose is a checkpoint): stop it as on an error,
            # rather than leave it running unreaped.
            await aprocess._shutdown(0, failed=True)
            raise
        await aprocess._shutdown(shutdown_timeout, failed=False)
    finally:
        conn.close()
        aprocess.close()
