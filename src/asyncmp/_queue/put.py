"""The put side of an AsyncQueue: pickling, the feeder's errors, the no-readers check,
the frame writer of a ``SimpleQueue``, the threaded put, ``join`` and the final flush.

``put`` pickles in the caller, so an unpicklable object raises there and not later in the
feeder thread, then hands the pickle to the queue's own feeder thread. Waiting for room in
a bounded queue is a semaphore, which has no descriptor: a thread tries in short time
slices, and a cancelled put waits for that thread's current slice so that "returned" and
"enqueued" always agree. A ``SimpleQueue`` has no feeder: its put writes the frame from a
thread, ``PIPE_BUF`` bytes at a time as the pipe has room, under the queue's write lock;
it gives up on cancellation until its first byte, and finishes the frame after it (see
:func:`write_frame`).

An item that :meth:`AsyncQueue.aclose` gives back to the queue (one a cancelled ``get``
left to a thread, or one it finished itself) goes back as a put of its own
(:class:`_PutBack`): its frame, as it was read, written whole by a daemon thread that waits
for room as long as that takes, and that the process waits for at exit, as it waits for a
``Queue``'s feeder thread, unless no other process holds the queue's read end (Linux,
through ``/proc``): nothing could ever read the item then. Nobody needs to read the queue
at the moment ``aclose()`` runs.
"""

from __future__ import annotations

import errno
import io
import math
import multiprocessing.queues
import multiprocessing.util
import os
import pickle
import queue
import socket
import stat
import sys
import threading
import weakref
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.lowlevel import cancel_shielded_checkpoint, checkpoint, checkpoint_if_cancelled

from .._core import mpinternals as _mpinternals
from .._core.frames import FrameWriter
from .._core.loop import threadsafe_notifier
from .._core.mpinternals import QueueParts
from .._core.threads import THREAD_SLICE, BlockingCall, run_blocking, wait_or_stop
from .._core.wire import dumps, encode_header
from .state import QueueState

if TYPE_CHECKING or sys.platform != "win32":
    from .._core.atfork import register_fork_owned
    from .._core.readiness import poller
    from .._core.transport import pipe_write_end, socket_over_dup

if sys.platform != "win32":
    import select

    #: What polling a queue's write end says once no process holds its read end.
    _READERS_GONE = select.POLLERR | select.POLLHUP
else:  # pragma: no cover
    _READERS_GONE = 0

__all__ = ("Putter", "write_frame")


_NO_READERS = "nobody reads this queue any more: every read end is closed"


class _Prepickled:
    """An item pickled in the caller of ``put``; unpickles to the original object.

    The feeder thread pickles this wrapper into a call of ``pickle.loads`` on the bytes,
    so every consumer, sync or async, gets the original object back, and a pickling
    error surfaced in ``put`` instead of in the feeder thread.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return pickle.loads, (self.data,)


class _Stoppable(Protocol):
    """What :func:`write_frame` asks of the call it runs in: may it give up?"""

    @property
    def stopping(self) -> bool: ...


class FrameOut:
    """A queue pipe's write end as a frame writer, made once for the puts of an adapter
    (or a put-back) and used by one put at a time, under the queue's write lock."""

    __slots__ = ("room", "writer")

    def __init__(self, fd: int) -> None:
        self.writer = FrameWriter(pipe_write_end(fd), on_torn=_nothing, peer_gone=_NO_READERS)
        self.room = poller(fd, writable=True)


def write_frame(
    c: _Stoppable,
    out: FrameOut,
    wlock: Any,
    frame: bytes,
    stall_timeout: float,
    on_begun: Callable[[], object],
) -> bool:
    """Write one whole *frame* into a queue's pipe, as a producer does, in a thread.

    The queue's write lock is taken, and the pipe's room waited for, in short time
    slices; until the first byte is written a stop request ends the call (returning
    False) with nothing written. Each write is at most ``PIPE_BUF`` bytes after
    ``poll()`` said the pipe is writable, so it never blocks: a pipe that polls
    writable has room for that much, and such a write is atomic. A frame of at most
    ``PIPE_BUF`` bytes so goes in whole in one write. A longer one can't be written at
    once (how much room a pipe has is not known exactly, and a frame may be larger than
    the pipe), so once its first byte is in, it is finished whatever is asked, as the
    consumers make room: a frame left half-written would tear the stream that every
    consumer of the queue reads. *on_begun* is called then. Only a pipe that takes no
    byte for *stall_timeout* seconds ends it early, with ``anyio.BrokenResourceError``
    (the pipe then holds part of the frame, as after a producer that died mid-put); with
    ``math.inf`` it waits for room as long as that takes. A pipe whose every read end is
    closed ends it with ``anyio.BrokenResourceError`` too (nobody can read the frame).

    The writing is the frame engine's (``FrameWriter.write_blocking``), as for a
    connection's thread route: this adds the write lock.
    """
    while not wlock.acquire(True, THREAD_SLICE):
        if c.stopping:
            return False
    try:
        try:
            out.writer.write_blocking(
                [memoryview(frame)],
                out.room,
                int(THREAD_SLICE * 1000),
                lambda: c.stopping,
                [0],
                once_begun=on_begun,
                stall_timeout=stall_timeout,
            )
        except anyio.ClosedResourceError:
            return False  # stopped before the first byte: nothing written
        return True
    finally:
        wlock.release()


class _NeverStops:
    """A put-back is never asked to give up: it ends once its frame is in the pipe."""

    stopping = False


#: The put-backs in flight in this process, which its exit waits for.
_put_backs: set[_PutBack] = set()
#: The process whose exit waits for them (a child forked since has none of its own yet).
_exit_hooked_pid: int | None = None


#: How long exit waits for a put-back between two looks for another reader of its pipe.
_EXIT_RECHECK = 0.25


def _read_elsewhere(inode: int) -> bool:
    """Whether a process other than this one may hold the pipe *inode* open for reading.

    Linux only, through ``/proc``: each process's descriptors link to ``pipe:[inode]``,
    and the ``flags`` of their ``fdinfo`` tell a read end from a write end. Elsewhere, or
    without ``/proc``, it answers True (a reader may exist). A process that vanishes
    meanwhile holds nothing. Nor does, as far as this can know, one whose descriptors this
    process may not read (another user's, or one outside its reach even for root, as a
    container's init often is): only a deliberate step (a change of user, a descriptor
    passed over a socket) could give it the pipe, and counting such processes as readers
    would make every exit wait, as in most containers and for every user who is not root.
    It runs only at exit, only while a put-back is pending.
    """
    if sys.platform == "linux":
        return _proc_shows_a_reader(inode)
    else:  # an else, not a fall-through: type checkers then skip it on Linux
        return True


def _proc_shows_a_reader(inode: int) -> bool:
    """:func:`_read_elsewhere` on Linux."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True  # no procfs: nothing tells
    me, parent = str(os.getpid()), str(os.getppid())
    if parent in pids:  # most often the reader: look there first
        pids.remove(parent)
        pids.insert(0, parent)
    target = f"pipe:[{inode}]"
    for pid in pids:
        if pid == me:
            continue
        base = f"/proc/{pid}"
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:  # gone (FileNotFoundError, ProcessLookupError), or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(f"{base}/fd/{fd}") != target:
                    continue
                with open(f"{base}/fdinfo/{fd}") as info:
                    flags = next(line for line in info if line.startswith("flags:"))
            except PermissionError:  # not ours to read (see above)
                break
            except (OSError, StopIteration):  # closed meanwhile, or the process is gone
                continue
            if int(flags.split()[1], 8) & 0o3 != os.O_WRONLY:  # O_ACCMODE (Linux)
                return True
    return False


def _wait_for_put_backs() -> None:
    """At exit: wait until every put-back is in the pipe, whole (as multiprocessing waits
    for a Queue's feeder thread), but only while another process may read it: once none
    holds the pipe's read end (:func:`_read_elsewhere`), nothing ever could, and what the
    daemon thread leaves in the pipe harms nobody; the process exits without it."""
    for put_back in list(_put_backs):
        put_back.join_at_exit()


def _hook_exit() -> None:
    """Have this process wait for its put-backs when it exits. Through multiprocessing's
    exit finalizers, not ``atexit``: a forked multiprocessing child runs those and then
    leaves with ``os._exit``, skipping ``atexit``. At priority 0, as soon as the
    finalizers of queues and pools (10 and up) have run, and before multiprocessing
    terminates this process's daemonic children, which may be the consumers that read the
    item (a Queue's feeder thread is waited for after that, at -5)."""
    global _exit_hooked_pid
    pid = os.getpid()
    if _exit_hooked_pid != pid:
        multiprocessing.util.Finalize(None, _wait_for_put_backs, exitpriority=0)
        _exit_hooked_pid = pid


class _PutBack:
    """One item going back into a queue: its whole frame, written by a daemon thread of
    its own, as a producer's put.

    The thread takes a slot of a bounded queue first (waiting for room, as ``Queue.put()``
    does; the item's slot was let go when it was taken), then the queue's write lock, and
    writes the frame (:func:`write_frame`) as consumers make room, for as long as that
    takes: it never gives up in the middle of the frame, so nothing can leave part of it
    in the pipe, except the end of the process itself, which waits for it (see
    :func:`_hook_exit`) unless it ends without its exit handlers (``os._exit``, a signal),
    as a producer killed mid-put, or no other process holds the queue's read end
    (:func:`_wait_for_put_backs`). The thread ends early, the item dropped, once no process
    at all holds the queue's read end (nobody could ever read it).

    It writes to a duplicate of the queue's write end, which stays open when the queue is
    closed in this process meanwhile (``Queue.close()`` lets the feeder thread close the
    queue's own), and is closed in a forked child, which has no such thread.
    """

    def __init__(self, fd: int, wlock: Any, sem: Any | None, frame: bytes) -> None:
        self._fd = os.dup(fd)
        self._inode = os.fstat(self._fd).st_ino  # the pipe's, both ends alike
        self._wlock = wlock
        self._sem = sem
        self._frame = frame
        self._thread: threading.Thread | None = None
        register_fork_owned(self)

    def start(self) -> None:
        """Start the thread (it owns the descriptor from now on)."""
        _hook_exit()
        _put_backs.add(self)
        thread = threading.Thread(target=self._run, name="asyncmp-queue-putback", daemon=True)
        self._thread = thread
        thread.start()

    def join_at_exit(self) -> None:
        """Wait until the frame is in the pipe, as long as another process may read it."""
        thread = self._thread
        if thread is None:
            return
        thread.join(_EXIT_RECHECK)
        while thread.is_alive() and _read_elsewhere(self._inode):
            thread.join(_EXIT_RECHECK)

    def _run(self) -> None:
        sem = self._sem
        try:
            if sem is not None:
                sem.acquire()  # room in a bounded queue, as Queue.put() waits for it
            try:
                write_frame(
                    _NeverStops(), FrameOut(self._fd), self._wlock, self._frame, math.inf, _nothing
                )
            except (anyio.BrokenResourceError, OSError):
                # Every read end is closed (the write fails with EPIPE, or poll says so):
                # nobody can read the item, and nothing it leaves matters to anybody.
                if sem is not None:
                    sem.release()
        finally:
            self._frame = b""
            self.close()
            _put_backs.discard(self)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def _forget_in_forked_child(self) -> None:
        _put_backs.discard(self)  # the thread is not in the child: its exit can't wait
        self.close()


def _nothing() -> None:
    pass


class _Interrupter:
    """Ends a blocking call that waits on a manager connection, from another thread.

    The thread arms it with the connection it is about to wait on; :meth:`fire` shuts
    that connection down (both directions), which makes the pending ``recv`` return
    end-of-file at once. Shutting down, not closing: the descriptor stays the waiting
    thread's until it lets go of it. The connection is this thread's own (a proxy opens
    one per thread), shared with no other process.
    """

    __slots__ = ("_conn", "_fired", "_guard")

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._conn: Any = None
        self._fired = False

    def arm(self, conn: Any) -> bool:
        """In the waiting thread: watch *conn*; False if there is nothing to interrupt."""
        if conn is None:
            return False
        try:
            fd = conn.fileno()
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                return False
        except (OSError, ValueError):
            return False
        with self._guard:
            self._conn = conn
            fired = self._fired
        if fired:
            self._shutdown(conn)
        return True

    def disarm(self) -> None:
        with self._guard:
            self._conn = None

    def fire(self) -> None:
        with self._guard:
            self._fired = True
            conn = self._conn
            if conn is None:
                return
            self._shutdown(conn)

    @staticmethod
    def _shutdown(conn: Any) -> None:
        try:
            # Never socket.socket(fileno=): under a default timeout it would make the
            # descriptor non-blocking (see _core.transport.socket_over_dup).
            sock = socket_over_dup(conn.fileno())
        except (OSError, ValueError):
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.close()


class Putter:
    """Everything an AsyncQueue does to put: ``put``, ``put_nowait``, ``join`` and the
    flush on close. The adapter's docstrings say what each promises."""

    def __init__(self, q: Any, parts: QueueParts | None, state: QueueState) -> None:
        self._q = q
        self._state = state
        self._is_mp_queue = isinstance(q, multiprocessing.queues.Queue)
        self._is_simple = isinstance(q, multiprocessing.queues.SimpleQueue)
        self._joinable = _mpinternals.joinable_parts(q)
        # The joins of a proxy, which wait in a call that only shutting its connection ends.
        self._interrupters: dict[BlockingCall[Any], _Interrupter] = {}
        # Knowing that nobody reads the queue any more (see check_readers).
        self.feeder_error: Exception | None = None
        self._writer = _mpinternals.queue_writer(q)
        self._wlock = _mpinternals.queue_wlock(q)
        #: The semaphore that bounds the queue (None: a SimpleQueue, or insides unknown).
        self._sem = parts.sem if parts is not None else None
        #: An item aclose() gives back, to go in once the flush is done.
        self._put_back: _PutBack | None = None
        # A SimpleQueue's put writes its frame itself, under the queue's write lock; this
        # adapter does the same, so that a put can give up before its first byte.
        self._writes_frames = self._is_simple and self._writer is not None
        self._writes_frames = self._writes_frames and self._wlock is not None
        self._writer_poll: Any = None
        #: The frame writer of this adapter's puts (a SimpleQueue's), made at the first.
        self._out: FrameOut | None = None
        if self._writer is not None:
            self._writer_poll = poller(self._writer.fileno(), writable=True)
        if self._is_mp_queue:
            method = weakref.WeakMethod(self._feeder_failed)
            _mpinternals.hook_feeder_errors(q, lambda e: (m := method()) is not None and m(e))

    def _feeder_failed(self, exc: Exception) -> bool:
        """The queue's feeder thread could not write an item (in the feeder thread)."""
        if getattr(exc, "errno", None) != errno.EPIPE:
            return False  # not ours to judge: the queue prints it, as it always has
        self.feeder_error = exc
        return True

    def check_readers(self) -> None:
        """Raise if no process holds the queue's read end any more.

        Then a put could only lose the item: the feeder thread would fail to write it
        (and print a traceback). The pipe tells: polling its write end reports an error
        (Linux) or a hangup once the last read end is closed. If the last reader goes
        after this check, the feeder's write fails; the hook records that quietly, and
        the item is lost, but the next put raises.
        """
        error = self.feeder_error
        if error is not None:
            raise anyio.BrokenResourceError(_NO_READERS) from error
        writer = self._writer
        if writer is not None and not writer.closed:
            for _, events in self._writer_poll.poll(0):
                if events & _READERS_GONE:
                    raise anyio.BrokenResourceError(_NO_READERS)

    def _prepare(self, obj: Any) -> Any:
        if self._is_mp_queue:
            # Pickle now: an unpicklable object raises here, not in the feeder thread.
            buf = io.BytesIO()
            ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
            return _Prepickled(buf.getvalue())
        return obj

    def put_nowait(self, obj: Any) -> None:
        self._state.check_open()
        self.check_readers()
        item = self._prepare(obj)
        if self._is_simple:
            raise TypeError("a SimpleQueue has no put_nowait(); use await put()")
        self._q.put_nowait(item)

    async def put(self, obj: Any, timeout: float | None) -> None:  # noqa: ASYNC109
        self._state.check_open()
        self.check_readers()
        if self._writes_frames:
            # A SimpleQueue has no feeder thread: its put writes the frame itself.
            payload = dumps(obj)
            frame = encode_header(len(payload)) + payload
            await self._with_timeout(self._put_frame, frame, timeout)
            return
        item = self._prepare(obj)
        if self._is_mp_queue and not isinstance(self._q, multiprocessing.queues.JoinableQueue):
            # Queue.put(block=False) only takes a semaphore and appends to the feeder's
            # buffer: it never blocks.
            await checkpoint_if_cancelled()
            try:
                self._q.put(item, False)
            except queue.Full:
                pass
            else:
                await cancel_shielded_checkpoint()
                return
        await self._with_timeout(self._put_threaded, item, timeout)

    @staticmethod
    async def _with_timeout(
        put: Callable[[Any], Any],
        item: Any,
        timeout: float | None,  # noqa: ASYNC109
    ) -> None:
        if timeout is None:
            await put(item)
            return
        with anyio.move_on_after(timeout):
            await put(item)
            return
        raise queue.Full

    async def _put_frame(self, frame: bytes) -> None:
        """Write *frame* into the queue's pipe from a thread (:func:`write_frame`).

        Returns once the frame is in the pipe, or once it has begun: then it is written
        whole in the background and counts as put (as ``Queue.put`` counts an item
        handed to its feeder), and the next put of this adapter, and ``aclose()``,
        come after it. If cancelled before the first byte, nothing is written.
        """
        writer, wlock = self._writer, self._wlock
        assert writer is not None and wlock is not None
        out = self._out
        if out is None:
            out = self._out = FrameOut(writer.fileno())
        stall = self._state.stall_timeout
        begun = anyio.Event()
        notify = threadsafe_notifier()

        def on_begun() -> None:
            try:
                notify(begun.set)
            except Exception:  # the loop is gone: nobody waits for this
                pass

        def finished(call: BlockingCall[bool]) -> None:
            begun.set()
            error = call.error
            if isinstance(error, anyio.BrokenResourceError) and "mid-item" in str(error):
                # Part of a frame is in the pipe for good: this adapter can't put again.
                self._state.broken = str(error)

        await checkpoint_if_cancelled()
        call = await self._state.calls.start(
            lambda c: write_frame(c, out, wlock, frame, stall, on_begun), name="asyncmp-queue-put"
        )
        call.add_done_callback(finished)
        try:
            await wait_or_stop(call)
        except anyio.get_cancelled_exc_class():
            # The thread stops if it has not written anything yet; a frame it has begun
            # is finished in the background, and the put counts as done. Never both.
            with anyio.CancelScope(shield=True):
                await begun.wait()  # one of the two, within a time slice
            if not call.done:
                return  # begun: it goes in whole
            if call.error is None and call.result():
                return
            raise
        if not call.result():
            raise anyio.ClosedResourceError

    def put_back(self, frame: bytes) -> bool:
        """In :meth:`aclose`, before the flush: give the item whose *frame* (its payload, as
        read) this adapter took and did not hand out back to the queue, for its consumers.

        It goes back as a put of its own (:class:`_PutBack`): once the flush is done (so
        after what this process put), a thread of its own writes the frame whole, waiting
        for a slot of a bounded queue and for readers as long as that takes, and the
        process waits for it at exit. Nothing here waits, and nobody needs to read now.
        The frame is taken as the consumers count it: its slot let go and, on a
        ``JoinableQueue``, still an unfinished task (this puts it back without counting
        it as a new one). Returns False if the item can't go back (the queue has no pipe
        this process can write to: a manager's proxy, Windows; or its write end is closed
        in this process already): then it is dropped."""
        writer, wlock = self._writer, self._wlock
        if writer is None or writer.closed or wlock is None:
            return False
        whole = encode_header(len(frame)) + frame
        self._put_back = _PutBack(writer.fileno(), wlock, self._sem, whole)
        return True

    async def _put_threaded(self, item: Any) -> None:
        q = self._q

        def blocking_put(c: BlockingCall[bool]) -> bool:
            if self._is_simple:
                try:
                    q.put(item)
                except BrokenPipeError as exc:
                    raise anyio.BrokenResourceError(_NO_READERS) from exc
                return True
            while not c.stopping:
                try:
                    q.put(item, True, THREAD_SLICE)
                    return True
                except queue.Full:
                    continue
            return False

        await checkpoint_if_cancelled()
        call = await self._state.calls.start(blocking_put, name="asyncmp-queue-put")
        try:
            await wait_or_stop(call)
        except anyio.get_cancelled_exc_class():
            # The thread stops; learn whether its last try got in: a put that got in is
            # reported as done, one that did not as cancelled. Never both.
            with anyio.CancelScope(shield=True):
                await call.wait()
            if call.result():
                return
            raise
        if not call.result():
            raise anyio.ClosedResourceError

    async def join(self) -> None:
        self._state.check_open()
        parts = self._joinable
        q = self._q
        interrupt = _Interrupter()

        def blocking_join(c: BlockingCall[bool]) -> bool:
            if parts is None:
                # A proxy (or a queue whose insides are unknown) offers only a join() that
                # blocks until every task is done. Its call waits on the connection to
                # the manager that this thread opens; interrupt() shuts that connection
                # down, which ends the wait here (the manager's side finds the connection
                # gone when the tasks are done).
                armed = interrupt.arm(_mpinternals.proxy_connection(q))
                if c.stopping:
                    return False
                if not armed:  # nothing to interrupt (not a proxy over a socket): block
                    q.join()
                    return True
                try:
                    q.join()
                except (OSError, EOFError):
                    if c.stop_requested():
                        return False
                    raise
                return True
            cond, is_done = parts
            while not c.stopping:
                with cond:
                    if is_done():
                        return True
                    cond.wait(THREAD_SLICE)
            return False

        interrupters = self._interrupters

        def finished(call: BlockingCall[bool]) -> None:
            interrupt.disarm()
            interrupters.pop(call, None)

        call = await self._state.calls.start(blocking_join, name="asyncmp-queue-join")
        interrupters[call] = interrupt
        call.add_done_callback(finished)
        await wait_or_stop(call, lambda _: interrupt.fire())
        if not call.result():
            raise anyio.ClosedResourceError

    # -- closing ------------------------------------------------------------------------

    def stop(self) -> None:
        """First step of closing (every part's, before any waits; after the calls were
        asked to stop, so that a join it interrupts knows it was stopped): end the joins
        that wait on a manager's connection."""
        for interrupter in self._interrupters.values():
            interrupter.fire()

    async def aclose(self, frame: bytes | None) -> None:
        """Once the calls have returned: give the item whose *frame* is given (if any)
        back to the queue (:meth:`put_back`), then close the queue in this process and
        wait for its feeder to write it all, and start the put-back, which never waits
        for it.

        If cancelled, the feeder goes on writing in the background, as after
        ``Queue.close()`` without ``join_thread()``, and the put-back starts all the same.
        """
        self._interrupters.clear()
        if frame is not None:
            self.put_back(frame)
        try:
            await self._flush_feeder()
        finally:
            put_back, self._put_back = self._put_back, None
            if put_back is not None:
                put_back.start()

    async def _flush_feeder(self) -> None:
        q = self._q
        if self._is_simple:
            q.close()
        if not self._is_mp_queue:
            await checkpoint()
            return
        q.close()
        feeder = _mpinternals.feeder_thread(q)
        if feeder is None or not feeder.is_alive():
            await checkpoint()
            return

        def wait_for_feeder(c: BlockingCall[None]) -> None:
            while feeder.is_alive() and not c.stopping:
                feeder.join(THREAD_SLICE)

        # If cancelled, the thread stops within a time slice; it is joined then.
        await run_blocking(wait_for_feeder, name="asyncmp-queue-flush", on_stop=BlockingCall.join)
