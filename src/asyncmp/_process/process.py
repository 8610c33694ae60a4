"""Worker processes for async code: wait without a thread, never leak one.

:class:`AsyncProcess` waits for a ``multiprocessing.Process`` to end. On Linux it
watches a pidfd, which becomes readable once the process has exited and can be
reaped; elsewhere on POSIX it watches the process sentinel (a pipe whose write end the
child holds), then reaps. Either way the wait goes through ``_core.readiness``' helper
descriptor, and no thread is involved. On Windows a thread waits in short slices. However
many tasks wait, one watch serves them all (see :class:`AsyncProcess`).

:func:`open_process` and :func:`open_worker` tie a process's life to an ``async with``
block. Leaving the block normally lets the process finish on its own for up to
``shutdown_timeout`` seconds, then terminates it, then kills it. Leaving on an
exception or a cancellation terminates it at once and kills it after a short grace.
Whichever way the block is left, the process is reaped before the block exits: no
zombie, no orphan. A block that is never left, because this process was killed, leaves
no orphan either: the child dies with it (see ``_core.child.guard``, which the child runs
first, and :class:`Lifeline`).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
from anyio.abc import ObjectStream
from anyio.lowlevel import checkpoint

from .._connection.connection import AsyncConnection
from .._core import platform as _platform
from .._core.blocks import block_manager
from .._core.child import Owner, prepare, run, run_worker
from .._core.exceptions import ConnectionEOF
from .._core.loop import LoopBinding
from .._core.threads import THREAD_SLICE, BlockingCall

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:
    from typing_extensions import TypeVar

if TYPE_CHECKING:
    from typing_extensions import Buffer

if TYPE_CHECKING or sys.platform != "win32":
    from .._core.atfork import register_fork_owned
    from .._core.readiness import ReadinessWaiter

# The extra positional arguments of open_process() and open_worker() are checked against
# the target's parameters. ParamSpec can't do that here: its P.args needs P.kwargs beside
# it, and these functions take keyword-only options instead. A TypeVarTuple can; it is in
# typing from 3.11, and in typing_extensions (a dependency before 3.13) for 3.10.
if sys.version_info >= (3, 11):
    from typing import TypeVarTuple, Unpack
else:
    from typing_extensions import TypeVarTuple, Unpack
Ts = TypeVarTuple("Ts")

#: What a Worker's pipe carries; ``Any`` unless the code says otherwise.
T = TypeVar("T", default=Any)

if sys.platform == "win32":
    from multiprocessing.connection import PipeConnection as _WorkerEnd
else:
    from multiprocessing.connection import Connection as _WorkerEnd

__all__ = (
    "TERMINATE_GRACE",
    "AsyncProcess",
    "Lifeline",
    "Worker",
    "WorkerExited",
    "open_process",
    "open_worker",
)

#: Seconds :meth:`AsyncProcess.stop` waits after ``terminate()`` before ``kill()`` by
#: default; also the grace when an :func:`open_process` or :func:`open_worker` block is
#: left on an error or a cancellation, or after its ``shutdown_timeout``.
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

    Any number of tasks (of one event loop) may wait for the process at once. The first
    one watches it: a pidfd (Linux) or the process sentinel (elsewhere on POSIX, and for
    a forkserver's children, whose exit status comes through the sentinel) through
    ``_core.readiness``' private helper descriptor, or a thread on Windows. The others wait for
    that task; if it is cancelled, one of them takes over. What the watch holds (the
    pidfd, the helper descriptor, the thread) is shared by the waiting tasks and released
    when the last of them returns or is cancelled, or by :meth:`close`.

    Only the process that started it can wait for it: pickling an AsyncProcess, or
    passing it to a spawned child, raises ``TypeError``.

    It belongs to the event loop that opened it (:func:`open_process`, :func:`open_worker`)
    or else first awaited one of its methods, for as long as that loop runs: :meth:`wait`
    or :meth:`stop` from a loop in another thread meanwhile raises ``RuntimeError`` at
    once, which says how to call it through its own loop. Once that loop has ended, the
    next loop to use it takes it over. The methods that are not awaited are not checked.
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
        #: Tasks in wait(): the last one out releases the watch.
        self._waiting = 0
        #: Set when the task that watches for the others stops watching; None while
        #: nobody watches.
        self._watch_ended: anyio.Event | None = None
        self._waiter: ReadinessWaiter | None = None
        self._pidfd = -1
        #: The thread route's call that waits for the sentinel, while it is wanted.
        self._call: BlockingCall[None] | None = None
        #: Threads of such calls that may still run, wanted or not. A thread uses the
        #: sentinel, so close() leaves the process object open until the last one has
        #: ended, and that thread closes it: no event loop has to run by then.
        self._threads = 0
        self._threads_lock = threading.Lock()
        self._close_pending = False
        self._owner = LoopBinding("this AsyncProcess")

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
        ``async with`` block closed the process object. It may be read outside an event
        loop.
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

        Any number of tasks of one event loop may wait at once, and each gets the exit
        code; once it is known, a call returns it at once (after a checkpoint). Another
        task's :meth:`stop`, :meth:`close` or the end of the :func:`open_process` block
        meanwhile changes none of that.

        If cancelled, nothing changed: the process runs on and can be waited for again,
        and the other waiting tasks keep waiting. The last waiting task to leave, by
        returning or by a cancellation, releases the descriptors (or the thread) the
        wait used. It raises nothing of its own, but for ``RuntimeError`` from another
        event loop than its own (see :class:`AsyncProcess`), where nothing changed.
        """
        self._owner.check()
        self._waiting += 1
        try:
            while True:
                code = self.exitcode  # reaps it if it has ended (waitpid WNOHANG)
                if code is not None:
                    await checkpoint()
                    return code
                ended = self._watch_ended
                if ended is not None:
                    # Another task watches. Look again when it stops: it found the
                    # process reaped, or it was cancelled and one of us takes over.
                    await ended.wait()
                    continue
                ended = self._watch_ended = anyio.Event()
                try:
                    await self._watch()
                finally:
                    self._watch_ended = None
                    ended.set()
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._release()

    async def _watch(self) -> None:
        """Return once the process has been reaped. One task at a time watches."""
        while self.exitcode is None:
            if not _platform.POSIX_FDS:  # Windows: a sentinel is a handle
                if not self._sentinel_ready():
                    await self._wait_in_thread()
                else:
                    await anyio.sleep(_REAP_RETRY)
                continue
            if self._waiter is None:
                self._open_waiter()
            waiter = self._waiter
            assert waiter is not None
            try:
                if self._pidfd >= 0:
                    await waiter.wait()
                    if self.exitcode is None:
                        # The process has ended, yet waitpid can't reap it: it is not our
                        # child (a forkserver's). Its exit status comes through the
                        # sentinel, a moment later; wait for that instead of spinning.
                        self._close_descriptors()
                        self._waiter = ReadinessWaiter(self._process.sentinel)
                elif not self._sentinel_ready():
                    await waiter.wait()
                else:
                    # The sentinel says "gone" a moment before waitpid can reap.
                    await anyio.sleep(_REAP_RETRY)
            except anyio.ClosedResourceError:
                # close() released the descriptors: it reaped the process. Look again.
                continue

    def _open_waiter(self) -> None:
        fd = -1
        if hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(self._pid)
            except OSError:
                fd = -1
        self._pidfd = fd
        try:
            self._waiter = ReadinessWaiter(fd if fd >= 0 else self._process.sentinel)
        except BaseException:
            self._close_descriptors()
            raise

    def _sentinel_ready(self) -> bool:
        return bool(multiprocessing.connection.wait([self._process.sentinel], 0))

    def _close_descriptors(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.close()  # wakes a task waiting on it, with ClosedResourceError
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def _release(self) -> None:
        """Release what the watch holds: nobody waits any more, or close() was called."""
        self._close_descriptors()
        call, self._call = self._call, None
        if call is not None:
            call.request_stop()  # its thread ends within one time slice

    async def _wait_in_thread(self) -> None:
        """Wait in a thread, in short slices, until the sentinel is ready.

        The thread only waits: the reaping happens here, in the loop's thread, so that
        no two threads ever poll the process at once (a forkserver's child's exit status
        is read from the sentinel, and a second reader would find nothing). A call whose
        waiter was cancelled goes on for the next waiter.
        """
        call = self._call
        if call is None:
            sentinel = self._process.sentinel

            def wait_for_sentinel(call: BlockingCall[None]) -> None:
                try:
                    while not call.stopping and not multiprocessing.connection.wait(
                        [sentinel], THREAD_SLICE
                    ):
                        pass
                finally:
                    self._thread_ended()

            # Not counted by the thread limiter: one per process at most, and it may wait
            # as long as the process lives (a pool watches each of its workers so).
            call = BlockingCall(wait_for_sentinel, name="asyncmp-process-wait", limited=False)
            with self._threads_lock:
                self._threads += 1
            try:
                await call.start()
            except BaseException:
                self._thread_ended()  # cancelled while waiting for room: it never ran
                raise
            self._call = call
            call.add_done_callback(self._call_done)
        await call.wait()
        if self._call is call:
            self._call = None
        call.result()  # what the thread raised, if anything

    def _call_done(self, call: BlockingCall[None]) -> None:
        if self._call is call:
            self._call = None

    def _thread_ended(self) -> None:
        """A waiting thread has stopped using the sentinel (in that thread)."""
        with self._threads_lock:
            self._threads -= 1
            close_now = self._close_pending and not self._threads
            if close_now:
                self._close_pending = False
        if close_now:
            self._process.close()

    async def stop(self, *, grace: float = TERMINATE_GRACE) -> int:
        """Terminate, wait up to *grace* seconds, kill, and reap. Returns the exit code.

        Other tasks waiting in :meth:`wait` meanwhile get the exit code too, and several
        tasks may stop the process at once. Runs to completion even if cancelled
        (shielded): a half-stopped process is worse. It raises nothing of its own, but
        for ``RuntimeError`` from another event loop than its own (see
        :class:`AsyncProcess`), which sends no signal.
        """
        self._owner.check()
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
        """Release the process object's resources, once the process has been reaped.

        It reaps the process if it has ended. If the process still runs, it does nothing:
        the process object stays open, and waiting tasks keep waiting. Otherwise it
        closes the descriptors that waiting tasks watch, and those tasks return the exit
        code; the process object is closed at once, or on the Windows route as soon as
        the waiting thread has seen the end (within one short time slice). It raises
        nothing, and it may be called outside an event loop.
        """
        if self._closed or self.exitcode is None:
            return
        self._closed = True
        self._release()
        with self._threads_lock:
            # A thread still waits on the sentinel: the last one to end closes it.
            pending = self._close_pending = self._threads > 0
        if not pending:
            self._process.close()

    def _opened_here(self) -> None:
        """Belong to the running loop, which opened the process (and reaps it)."""
        self._owner.how = "opened"
        self._owner.claim()

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "an AsyncProcess can't be pickled or passed to another process: only the "
            "process that started it can wait for it; pass its .pid to say which one it is"
        )

    def __repr__(self) -> str:
        return f"<asyncmp.AsyncProcess pid={self.pid} exitcode={self.exitcode}>"


class Lifeline:
    """What the children of this process watch to die with it: a pipe whose write end
    only this process holds, and which nobody writes to.

    Its read end reaches end of file once every copy of the write end is closed, which
    happens when this process exits, however it ends (the kernel closes a dead process's
    descriptors). The write end is not inherited by exec'd programs (``os.pipe()``
    descriptors are not inheritable), and it is closed in every forked child by the fork
    hook of ``_core.atfork``: a child forked later (a pool's second worker, any other process)
    would otherwise keep this process's lifeline open for as long as it lives. The read
    end is left to forked children: the child it was made for may need it, and it keeps
    nothing alive.

    One lifeline serves a block's children (a pool's workers, an ``open_process`` child),
    and is closed once they are reaped. Each child gets :attr:`owner`; see
    ``_core.child.guard`` for what it does with it. On Windows there is no pipe: a child
    watches the handle of its parent process, which multiprocessing gives it.
    """

    def __init__(self) -> None:
        prepare()  # what a child's guard() needs, looked up here for forked ones
        self._read: multiprocessing.connection.Connection | None = None
        self._write: multiprocessing.connection.Connection | None = None
        if sys.platform != "win32":
            read_fd, write_fd = os.pipe()
            self._read = multiprocessing.connection.Connection(read_fd, writable=False)
            self._write = multiprocessing.connection.Connection(write_fd, readable=False)
            register_fork_owned(self)
        #: What a child needs to watch this process.
        self.owner = Owner(os.getpid(), self._read)

    def _forget_in_forked_child(self) -> None:
        if self._write is not None:
            self._write.close()
            self._write = None

    def close(self) -> None:
        """Close both ends: a child still watching (there should be none) ends too."""
        for end in (self._write, self._read):
            if end is not None:
                end.close()
        self._write = self._read = None


@block_manager("process", AsyncProcess)
@asynccontextmanager
async def open_process(
    target: Callable[[Unpack[Ts]], object],
    *args: Unpack[Ts],
    context: Any = None,
    name: str | None = None,
    shutdown_timeout: float = 5.0,
    die_with_parent: bool = True,
) -> AsyncIterator[AsyncProcess]:
    """Start ``target(*args)`` in a process for the duration of the block.

    Type checkers check *args* against *target*'s parameters.

    Leaving the block normally waits up to *shutdown_timeout* seconds for the process to
    end on its own, then terminates it, then kills it. Leaving on an exception or a
    cancellation terminates it at once and kills it after a short grace. The process is
    reaped before the block exits, and what the block raised then propagates. Tasks that
    wait for it meanwhile (:meth:`AsyncProcess.wait`, inside or outside the block) get
    its exit code.

    The child starts as a new interpreter would, before *target* runs: the Python-level
    signal handlers it inherited (a forked child gets its parent's, a server's SIGTERM
    handler among them) are back to the defaults, SIGTERM always ends it, and no event
    loop is running, so the child can run one of its own. What *target* sets then holds.
    If this process dies without leaving the block (SIGKILL, the OOM killer), the child
    is killed (SIGKILL) right away, busy or not: the block promises no orphan.
    ``die_with_parent=False`` lets it run on instead, for a child that must finish its
    work whatever happens to its parent; it is then reparented (to init, usually). See
    the shutting-down how-to for how each start method does it.

    Entering starts the process at once and is not a checkpoint; nothing starts before
    (what the call returns is not the process: using it as one, or awaiting it, raises
    an error that shows the ``async with`` line to write). Leaving is shielded
    where it must be: a cancellation can't leave the process running or unreaped.

    :raises OSError: (or what ``Process.start()`` raises) the process could not start.
    """
    ctx = context if context is not None else multiprocessing.get_context()
    lifeline = Lifeline() if die_with_parent else None
    try:
        owner = lifeline.owner if lifeline is not None else None
        process = ctx.Process(target=run, args=(owner, target, *args), name=name)
        process.start()
        aprocess = AsyncProcess(process)
        aprocess._opened_here()
        async with _reaped_on_exit(aprocess, shutdown_timeout):
            yield aprocess
    finally:
        if lifeline is not None:
            lifeline.close()


@asynccontextmanager
async def _reaped_on_exit(
    aprocess: AsyncProcess, shutdown_timeout: float, conn: AsyncConnection[Any] | None = None
) -> AsyncIterator[None]:
    """What leaving an ``open_process``/``open_worker`` block does: on an exception or a
    cancellation stop the process at once, else close *conn* (if any) and give the process
    *shutdown_timeout* to end; either way reap it and release its resources."""
    try:
        try:
            yield
        except BaseException:
            if conn is not None:
                conn.close()
            await aprocess._shutdown(0, failed=True)
            raise
        if conn is not None:
            try:
                await conn.aclose()
            except BaseException:
                # Cancelled on the way out (aclose is a checkpoint): stop it as on an
                # error, rather than leave it running unreaped.
                await aprocess._shutdown(0, failed=True)
                raise
        await aprocess._shutdown(shutdown_timeout, failed=False)
    finally:
        if conn is not None:
            conn.close()
        aprocess.close()


class Worker(ObjectStream[T]):
    """A worker process and the async end of its duplex Pipe.

    It has :class:`AsyncConnection`'s methods, and is an ``anyio.abc.ObjectStream`` as
    that is (:meth:`receive`, :meth:`send`, :meth:`send_eof`, :meth:`aclose`). When the
    worker dies, a pending or later receive raises :class:`WorkerExited` (an
    ``EOFError``, and an ``anyio.EndOfStream``) saying how it ended.
    ``async for msg in worker`` receives until the worker closes its end.

    ``Worker[T]`` says what the pipe carries, as ``AsyncConnection[T]`` does (``Any``
    without a type argument). A Worker belongs to the process that opened it: pickling
    it, or passing it to a spawned child, raises ``TypeError``.

    It belongs to the event loop that opened it, too: its awaited methods called from a
    loop in another thread raise ``RuntimeError`` at once, which says how to call them
    through the Worker's loop instead.
    """

    def __init__(self, connection: AsyncConnection[T], process: AsyncProcess) -> None:
        self._conn = connection
        self._process = process
        self._owner = LoopBinding("this Worker", "opened")

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
        self._owner.check()
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
        self._owner.check()
        try:
            return await self._conn.recv_bytes(maxlength)
        except ConnectionEOF as eof:
            raise await self._explain_eof(eof) from eof

    async def recv_bytes_into(self, buffer: Buffer, offset: int = 0) -> int:
        """As :meth:`AsyncConnection.recv_bytes_into`: the next message's bytes into
        *buffer* from byte *offset* on; returns the message's length. Raises
        :class:`WorkerExited` at EOF.

        If cancelled, no message was consumed: the next call returns the whole message.
        What was read of it into *buffer* was copied back first, so *buffer* may have
        been written to.

        :raises multiprocessing.BufferTooShort: the message doesn't fit; it was consumed,
            and is the exception's ``args[0]``, as with the stdlib.
        :raises WorkerExited: the worker closed its end or ended (after every complete
            message was delivered); the message says how it ended.
        Also what :meth:`AsyncConnection.recv_bytes_into` raises.
        """
        self._owner.check()
        try:
            return await self._conn.recv_bytes_into(buffer, offset)
        except ConnectionEOF as eof:
            raise await self._explain_eof(eof) from eof

    def recv_nowait(self) -> T:
        """As :meth:`AsyncConnection.recv_nowait`."""
        return self._conn.recv_nowait()

    async def receive(self) -> T:
        """``anyio.abc.ObjectReceiveStream`` name for :meth:`recv`.

        Cancellation and exceptions: as :meth:`recv` (the worker's end of the stream
        raises :class:`WorkerExited`, which is an ``anyio.EndOfStream``).
        """
        return await self.recv()

    async def send(self, obj: T) -> None:
        """As :meth:`AsyncConnection.send`, with its cancellation behaviour and exceptions."""
        self._owner.check()
        await self._conn.send(obj)

    async def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """As :meth:`AsyncConnection.send_bytes`, with its cancellation behaviour and
        exceptions."""
        self._owner.check()
        await self._conn.send_bytes(buf, offset, size)

    async def send_eof(self) -> None:
        """Tell the worker no more messages come, as :meth:`AsyncConnection.send_eof`
        does: ``shutdown(SHUT_WR)`` on the socket of a duplex Pipe on POSIX, so the
        worker's ``recv()`` raises ``EOFError`` while its replies still arrive here
        (nothing, on Windows, whose pipes have no half-close; close it instead).

        It waits for the sends in progress or queued before it, so their messages go
        out whole. If cancelled while waiting, nothing happened.

        :raises anyio.ClosedResourceError: the parent's end was closed.
        :raises RuntimeError: called from an event loop in another thread than the
            Worker's (see :class:`Worker`).
        """
        self._owner.check()
        await self._conn.send_eof()

    def __aiter__(self) -> Worker[T]:
        return self

    async def __anext__(self) -> T:
        # EOF ends the iteration if the worker ended well (or still runs, having closed
        # its end); a crash is not a clean end of the stream, so it raises.
        self._owner.check()
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
        :meth:`AsyncConnection.aclose`: closing happens even if cancelled; raises nothing
        (but ``RuntimeError`` from another event loop than the Worker's).
        """
        self._owner.check()
        await self._conn.aclose()

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a Worker can't be pickled or passed to another process: it is this process's "
            "handle on its worker; to reach the worker from elsewhere, give that process a "
            "plain Pipe or Queue of its own"
        )

    def __repr__(self) -> str:
        return f"<asyncmp.Worker {self._process!r}>"


def start_with_pipe(
    ctx: Any, target: Callable[..., object], args: tuple[Any, ...], *, name: str | None = None
) -> tuple[AsyncConnection[Any], AsyncProcess]:
    """Start ``target(conn, *args)`` in a process of *ctx*, ``conn`` being the plain
    worker end of a duplex Pipe; return the async end and the process.

    The parent's end is wrapped before the process starts, so that a forked child closes
    its copy and sees EOF once the parent closes this end; the child's end is closed here
    once the child has it. Used by :func:`open_worker` and the pool.
    """
    parent_end, child_end = ctx.Pipe(duplex=True)
    conn: AsyncConnection[Any] = AsyncConnection(parent_end)
    try:
        process = ctx.Process(target=target, args=(child_end, *args), name=name)
        process.start()
    except BaseException:
        conn.close()
        raise
    finally:
        child_end.close()
    return conn, AsyncProcess(process)


@block_manager("worker", Worker)
@asynccontextmanager
async def open_worker(
    target: Callable[[_WorkerEnd, Unpack[Ts]], object],
    *args: Unpack[Ts],
    context: Any = None,
    shutdown_timeout: float = 5.0,
    die_with_parent: bool = True,
) -> AsyncIterator[Worker]:
    """Run ``target(conn, *args)`` in a child, where ``conn`` is the plain worker end of a
    duplex Pipe; yield a :class:`Worker` to talk to it.

    Type checkers check *args* against *target*'s parameters after the first.

    On leaving the block the parent's end is closed first, so a worker looping on
    ``conn.recv()`` sees ``EOFError`` and can return; then the process is shut down as
    :func:`open_process` does. Leaving on an exception or a cancellation closes the
    parent's end and terminates the worker at once; either way it is reaped before the
    block exits, and tasks waiting for it meanwhile get its exit code.

    The child starts as :func:`open_process` describes: default signal handlers, no
    event loop running, and killed at once if this process dies without leaving the block
    (unless ``die_with_parent=False``).

    Entering starts the process at once and is not a checkpoint; nothing starts before
    (what the call returns is not the worker: using it as one, or awaiting it, raises
    an error that shows the ``async with`` line to write).

    One request, one reply, one connection: a timeout (or any cancellation) between
    ``await worker.send(request)`` and ``await worker.recv()`` consumed nothing, so the
    reply stays in the pipe and the next ``recv()`` returns it to whoever asks next. After
    such a timeout, leave the block (the worker is stopped) or tag each request and drop
    replies with a stale tag; the cancellation how-to shows both. The pool,
    :func:`open_pool`, does this for you.

    :raises OSError: (or what ``Process.start()`` raises) the process could not start.
    """
    ctx = context if context is not None else multiprocessing.get_context()
    lifeline = Lifeline() if die_with_parent else None
    try:
        owner = lifeline.owner if lifeline is not None else None
        conn, aprocess = start_with_pipe(ctx, run_worker, (owner, target, *args))
        aprocess._opened_here()
        worker = Worker(conn, aprocess)
        worker._owner.claim()
        async with _reaped_on_exit(aprocess, shutdown_timeout, conn):
            yield worker
    finally:
        if lifeline is not None:
            lifeline.close()
