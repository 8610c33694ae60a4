"""Every channel asyncmp offers, behind one small interface, for the conformance suite.

A :class:`Channel` names one way to make a channel (a ``Pipe`` on one route and transport,
an ``AsyncConnection`` or an ``AsyncQueue`` over a fake Windows ``PipeConnection``, a
``connect()``/``serve()`` pair, a ``Worker``, an ``AsyncQueue`` over one kind of queue on
one route) and says what it can do. Opening it yields a :class:`Pair`:

- ``end``, the async end under test, seen through :class:`End`: ``receive()`` and
  ``send()`` of ``bytes`` (``recv_bytes``/``send_bytes`` on a connection, ``get``/``put`` on
  a queue), ``aclose()``, and the probes a check needs (is a message there to take, would a
  send wait for room);
- ``peer``, a :class:`Peer` that plays the other side with plain synchronous code, in a
  thread of this process or in the worker process: it sends payloads, writes raw bytes,
  receives until a sentinel, and ends the stream.

Leaving the ``open()`` block closes both sides and reaps what they started.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.queues
import pickle
import random
import select
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import anyio
import pytest

import asyncmp
from asyncmp import AsyncConnection, AsyncQueue, ConnectionEOF, WorkerExited
from asyncmp._core import platform as _platform

from .io import frame, wait_until, write_all
from .platform_fakes import as_connection, fake_pipe
from .queues import FORK, release_pipe

__all__ = (
    "CHANNELS",
    "Channel",
    "End",
    "Job",
    "Pair",
    "Peer",
    "payloads",
)


def payloads(seed: int, count: int, *, big_every: int = 0, big_size: int = 0) -> list[bytes]:
    """*count* payloads that carry their index in their first 4 bytes: mostly small, every
    *big_every*-th one *big_size* bytes or more, so that it arrives in several pieces."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if big_every and i % big_every == big_every - 1:
            size = big_size + rng.randrange(big_size)
        elif rng.random() < 0.1:
            size = rng.randrange(1 << 10, 20 << 10)
        else:
            size = rng.randrange(200)
        out.append(i.to_bytes(4, "big") + rng.randbytes(size))
    return out


def _writable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(0))


# --- the async end --------------------------------------------------------------------------


class End:
    """The async end under test, with one spelling for connections and queues."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    async def receive(self) -> bytes:
        raise NotImplementedError

    async def send(self, payload: bytes) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.obj.aclose()

    def close(self) -> None:
        """The sync close, where the end has one (see :attr:`Channel.has_close`)."""
        self.obj.close()

    def ready(self) -> bool:
        """A message is there to take without waiting (in the kernel or the adapter)."""
        raise NotImplementedError

    def send_would_wait(self) -> bool:
        """The next send would wait for room (the peer does not read)."""
        raise NotImplementedError

    def reader_fd(self) -> int | None:
        """The descriptor this end reads, for kernel buffer probes; None if there is none."""
        return None

    def shared_fds(self) -> list[int]:
        """The descriptors this end reads and writes: their open file descriptions are
        shared with other processes (a forked child, a queue's other users)."""
        return []


class ConnectionEnd(End):
    obj: AsyncConnection | asyncmp.Worker

    def _conn(self) -> AsyncConnection:
        return self.obj if isinstance(self.obj, AsyncConnection) else self.obj.connection

    async def receive(self) -> bytes:
        return await self.obj.recv_bytes()

    async def send(self, payload: bytes) -> None:
        await self.obj.send_bytes(payload)

    def ready(self) -> bool:
        return bool(self._conn().connection.poll(0))

    def send_would_wait(self) -> bool:
        return not _writable_now(self._conn().fileno())

    def reader_fd(self) -> int | None:
        return self._conn().fileno()

    def shared_fds(self) -> list[int]:
        return [self._conn().fileno()]


class QueueEnd(End):
    obj: AsyncQueue[bytes]

    async def receive(self) -> bytes:
        return await self.obj.get()

    async def send(self, payload: bytes) -> None:
        await self.obj.put(payload)

    def ready(self) -> bool:
        return not self.obj.empty()

    def send_would_wait(self) -> bool:
        q: Any = self.obj.queue
        if isinstance(q, multiprocessing.queues.SimpleQueue):  # no size: is the pipe full?
            writer: Any = getattr(q, "_writer")  # noqa: B009 (a private attribute)
            return not _writable_now(writer.fileno())
        return bool(q.full())

    def reader_fd(self) -> int | None:
        reader = getattr(self.obj.queue, "_reader", None)
        return None if reader is None else int(reader.fileno())

    def shared_fds(self) -> list[int]:
        ends = (getattr(self.obj.queue, name, None) for name in ("_reader", "_writer"))
        return [int(end.fileno()) for end in ends if end is not None]


# --- the peer -------------------------------------------------------------------------------


class Job:
    """One thing the peer does in the background; ``await job.result()`` waits for it."""

    def __init__(self, done: Callable[[], bool], outcome: Callable[[], Any]) -> None:
        self._done = done
        self._outcome = outcome

    def done(self) -> bool:
        return self._done()

    async def result(self, timeout: float = 20.0) -> Any:
        await wait_until(self._done, "the peer finished its job", timeout)
        return self._outcome()


class _ThreadJob(threading.Thread):
    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(name="test-peer", daemon=True)
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # handed to the test
            self.error = exc

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Peer:
    """The other side of the channel, in plain synchronous code."""

    def __init__(self) -> None:
        self._threads: list[_ThreadJob] = []
        self._stop = threading.Event()
        self.sentinel = b""

    def _start(self, fn: Callable[[], Any]) -> Job:
        thread = _ThreadJob(fn)
        self._threads.append(thread)
        thread.start()
        return Job(lambda: not thread.is_alive(), thread.outcome)

    def send(self, items: list[bytes]) -> Job:
        """Send every payload, in order, as whole messages (until :meth:`stop`)."""

        def run() -> None:
            for item in items:
                if self._stop.is_set():
                    return
                self._put(item)

        return self._start(run)

    def stop(self) -> None:
        """Let a sending job end before its last item (where the peer can)."""
        self._stop.set()

    def reserve(self, count: int) -> None:
        """Before raw writes of *count* items: take their slots, as ``put()`` does."""

    def receive_until(self, sentinel: bytes) -> Job:
        """Receive until *sentinel*; the job's result is what came before it."""

        self.sentinel = sentinel

        def run() -> list[bytes]:
            got = []
            while (item := self._get()) != sentinel:
                got.append(item)
            return got

        return self._start(run)

    def write_raw(self, data: bytes) -> Job:
        """Write *data* into the stream as it is (see :attr:`Channel.encode`)."""
        fd = self.raw_fd()
        assert fd is not None
        return self._start(lambda: write_all(fd, data))

    def raw_fd(self) -> int | None:
        return None

    def _put(self, item: bytes) -> None:
        raise NotImplementedError

    def _get(self) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """End the stream: the async end sees the peer go."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the async end closed: every job has ended (a blocked one failed)."""
        for thread in self._threads:
            thread.join(10)
            assert not thread.is_alive(), "a peer job still blocks"


class ConnectionPeer(Peer):
    def __init__(self, conn: Connection, close: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.conn = conn
        self._close = conn.close if close is None else close

    def _put(self, item: bytes) -> None:
        self.conn.send_bytes(item)

    def _get(self) -> bytes:
        return self.conn.recv_bytes()

    def raw_fd(self) -> int | None:
        return self.conn.fileno()

    def close(self) -> None:
        self._close()


class QueuePeer(Peer):
    def __init__(self, q: Any) -> None:
        super().__init__()
        self.q = q

    def _put(self, item: bytes) -> None:
        self.q.put(item)

    def _get(self) -> bytes:
        return bytes(self.q.get())

    def raw_fd(self) -> int | None:
        writer = getattr(self.q, "_writer", None)
        return None if writer is None else int(writer.fileno())

    def finish(self) -> None:
        # A job still receiving (a failed check) ends at a sentinel.
        for thread in self._threads:
            if thread.is_alive():
                self.q.put(self.sentinel)
        super().finish()

    def reserve(self, count: int) -> None:
        sem: Any = getattr(self.q, "_sem", None)
        for _ in range(count if sem is not None else 0):
            assert sem.acquire(False), "no free slot for a raw item"


class WorkerPeer(Peer):
    """The worker process of ``open_worker``, driven over a control pipe of its own."""

    def __init__(self, control: Connection) -> None:
        super().__init__()
        self.control = control
        self.closed = False
        self._busy = False

    def _command(self, *command: Any) -> Job:
        assert not self._busy, "one job at a time in the worker"
        self._busy = True
        self.control.send(command)
        reply: list[Any] = []

        def done() -> bool:
            if not reply and self.control.poll(0):
                reply.append(self.control.recv())
                self._busy = False
            return bool(reply)

        def outcome() -> Any:
            status, value = reply[0]
            if status != "ok":
                raise AssertionError(f"the worker failed: {value}")
            return value

        return Job(done, outcome)

    def send(self, items: list[bytes]) -> Job:
        return self._command("send", items)

    def receive_until(self, sentinel: bytes) -> Job:
        return self._command("receive_until", sentinel)

    def stop(self) -> None:
        pass  # the worker sends all it was asked to

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.control.send(("exit",))


# --- channels -------------------------------------------------------------------------------


@dataclass
class Pair:
    end: End
    peer: Peer


@dataclass(frozen=True)
class Channel:
    """One way to make a channel, and what it promises."""

    id: str
    open: Callable[[], contextlib.AbstractAsyncContextManager[Pair]]
    #: The peer can end the stream; pending and later receives then raise this.
    eof_error: type[BaseException] | None = ConnectionEOF
    #: A queue: a cancelled put put nothing, a get cancelled mid-item finishes the item
    #: under its shield. A connection: a send cancelled past its first byte may deliver.
    is_queue: bool = False
    #: The async end uses threads for its waits (no readiness hook to inject faults at).
    uses_threads: bool = False
    #: How a message is written raw into the stream (the stdlib's framing, of the pickle
    #: for a queue); None: the peer can't write raw bytes.
    encode: Callable[[bytes], bytes] | None = frame
    #: A fault can be injected right after the async end's readiness wait (the descriptor
    #: route). Not over TCP: there the bytes of one write were seen not all readable yet at
    #: the wake-up (now and then), so "all of it is still unread" can't be asserted.
    readiness_hook: bool = True
    #: The async end has a sync ``close()`` besides ``aclose()``.
    has_close: bool = True
    #: The calls that start no thread (see ``check_starts_no_thread``): ``receive``,
    #: ``send``, ``close``. A queue on the descriptor route puts through a kept thread, and
    #: its close flushes what was put in one.
    threadless: tuple[str, ...] = ("receive", "send", "close")
    #: A send can wait for room (nobody reads); a fake Windows pipe takes every message.
    bounded: bool = True
    #: The ends are descriptors, whose open file descriptions other processes share, so
    #: their flags (``O_NONBLOCK``) must never change; False: handles, or a manager's proxy.
    fds: bool = True
    marks: tuple[Any, ...] = field(default=())

    def param(self) -> Any:
        return pytest.param(self, id=self.id, marks=self.marks)


def _pickled_frame(payload: bytes) -> bytes:
    return frame(pickle.dumps(payload, pickle.HIGHEST_PROTOCOL))


def _pipe(duplex: bool, use_threads: bool) -> Callable[[], Any]:
    @contextlib.asynccontextmanager
    async def open_pair() -> AsyncIterator[Pair]:
        if duplex:
            a, b = asyncmp.Pipe(True, use_threads=use_threads)
            ends = [(a, b)]
        else:
            # One-way: one pipe each way, so that both directions can be checked.
            a, b = asyncmp.Pipe(False, use_threads=use_threads)
            reader, writer = multiprocessing.Pipe(False)
            a_out = AsyncConnection(writer, use_threads=use_threads)
            ends = [(a, b), (a_out, reader)]
        end, peer = _end_and_peer(ends)
        try:
            yield Pair(end, peer)
        finally:
            for async_end, _ in ends:
                await async_end.aclose()  # a peer job still blocked (a failed check) ends
            peer.finish()
            for _, sync_end in ends:
                sync_end.close()

    return open_pair


def _end_and_peer(ends: list[tuple[AsyncConnection, Connection]]) -> tuple[End, Peer]:
    """The end and peer of a duplex pipe, or of two one-way pipes (receive on the first,
    send on the second)."""
    if len(ends) == 1:
        return ConnectionEnd(ends[0][0]), ConnectionPeer(ends[0][1])
    (a_in, b_in), (a_out, b_out) = ends

    class SplitEnd(ConnectionEnd):
        async def send(self, payload: bytes) -> None:
            await a_out.send_bytes(payload)

        def send_would_wait(self) -> bool:
            return not _writable_now(a_out.fileno())

        def shared_fds(self) -> list[int]:
            return [a_in.fileno(), a_out.fileno()]

        async def aclose(self) -> None:
            await a_in.aclose()
            await a_out.aclose()

        def close(self) -> None:
            a_in.close()
            a_out.close()

    class SplitPeer(ConnectionPeer):
        def _get(self) -> bytes:
            return b_out.recv_bytes()

    return SplitEnd(a_in), SplitPeer(b_in)


@contextlib.contextmanager
def _as_on_windows() -> Iterator[None]:
    """asyncmp takes Windows' decisions, and a wait on a descriptor fails the check."""

    async def no_descriptors(obj: object) -> None:
        raise AssertionError(f"waited on descriptor {obj!r}: Windows has none to wait on")

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(_platform, "POSIX_FDS", False)
        monkeypatch.setattr(anyio, "wait_readable", no_descriptors)
        monkeypatch.setattr(anyio, "wait_writable", no_descriptors)
        yield


@contextlib.asynccontextmanager
async def _windows_pipe() -> AsyncIterator[Pair]:
    """A ``PipeConnection`` as on Windows (``tests/support/platform_fakes.py``)."""
    with _as_on_windows():
        a, b = fake_pipe()
        aconn = AsyncConnection(as_connection(a))
        peer = ConnectionPeer(as_connection(b))
        try:
            assert aconn.uses_threads
            yield Pair(ConnectionEnd(aconn), peer)
        finally:
            await aconn.aclose()
            peer.finish()
            b.close()


@contextlib.asynccontextmanager
async def _windows_queue() -> AsyncIterator[Pair]:
    """A ``Queue`` whose pipe is a fake Windows one: message mode, no descriptor."""
    with _as_on_windows():
        q: Any = FORK.Queue(8)
        release_pipe(q)
        q._reader, q._writer = fake_pipe(duplex=False)
        q._reset()  # picks up the new ends, as the Queue's constructor does
        async with _queue_pair(q, use_threads=None) as pair:
            assert pair.end.obj.uses_threads
            yield pair


def _remote(family: str, async_end: str) -> Callable[[], Any]:
    """A ``connect()``/``serve()`` pair; *async_end* says which side is tested, the other
    side's plain ``Connection`` is the peer."""

    @contextlib.asynccontextmanager
    async def open_pair() -> AsyncIterator[Pair]:
        key = b"conformance"
        async with asyncmp.serve(family=family, authkey=key) as listener:
            client = await asyncmp.connect(listener.address, authkey=key)
            try:
                server = await listener.accept()
            except BaseException:
                await client.aclose()
                raise
            mine, theirs = (client, server) if async_end == "connect" else (server, client)
            peer = ConnectionPeer(theirs.connection, theirs.close)
            try:
                yield Pair(ConnectionEnd(mine), peer)
            finally:
                await mine.aclose()
                theirs.close()
                peer.finish()

    return open_pair


@contextlib.asynccontextmanager
async def _worker() -> AsyncIterator[Pair]:
    from tests.support import conformance_workers

    control, child_control = FORK.Pipe()
    try:
        async with asyncmp.open_worker(
            conformance_workers.peer, child_control, context=FORK
        ) as worker:
            child_control.close()
            peer = WorkerPeer(control)
            try:
                yield Pair(ConnectionEnd(worker), peer)
            finally:
                peer.close()  # it ends once its job does (leaving closes our end)
    finally:
        child_control.close()
        control.close()


def _queue(kind: str, use_threads: bool, maxsize: int = 8) -> Callable[[], Any]:
    @contextlib.asynccontextmanager
    async def open_pair() -> AsyncIterator[Pair]:
        q = FORK.SimpleQueue() if kind == "SimpleQueue" else getattr(FORK, kind)(maxsize)
        async with _queue_pair(q, use_threads) as pair:
            yield pair

    return open_pair


@contextlib.asynccontextmanager
async def _queue_pair(q: Any, use_threads: bool | None) -> AsyncIterator[Pair]:
    """The async end over *q* and a peer in a child; on the way out the adapter is closed,
    the peer finished and the queue's pipe released."""
    peer = QueuePeer(q)
    aq = AsyncQueue[bytes](q, use_threads=use_threads)
    try:
        yield Pair(QueueEnd(aq), peer)
    finally:
        with anyio.CancelScope(shield=True):
            await aq.aclose()
        peer.finish()
        release_pipe(q)


@contextlib.asynccontextmanager
async def _manager_queue() -> AsyncIterator[Pair]:
    with FORK.Manager() as manager:
        q = manager.Queue(8)
        peer = QueuePeer(q)
        try:
            async with AsyncQueue[bytes](q) as aq:
                yield Pair(QueueEnd(aq), peer)
        finally:
            peer.finish()


def _channels() -> list[Channel]:
    out = []
    for use_threads, route in ((False, "fd"), (True, "threads")):
        for duplex, transport in ((True, "socketpair"), (False, "os.pipe")):
            out.append(
                Channel(
                    f"Pipe-{route}-{transport}",
                    _pipe(duplex, use_threads),
                    uses_threads=use_threads,
                    threadless=() if use_threads else ("receive", "send", "close"),
                    readiness_hook=not use_threads,
                )
            )
    out.append(
        Channel(
            "Pipe-windows",
            _windows_pipe,
            uses_threads=True,
            threadless=(),
            readiness_hook=False,
            encode=None,
            bounded=False,
            fds=False,
        )
    )
    for family, name in (("AF_UNIX", "unix"), ("AF_INET", "tcp")):
        for side in ("connect", "serve"):
            hook = family != "AF_INET"
            out.append(Channel(f"{side}-{name}", _remote(family, side), readiness_hook=hook))
    out.append(Channel("Worker", _worker, eof_error=WorkerExited, encode=None, has_close=False))
    queue: dict[str, Any] = {"eof_error": None, "is_queue": True, "has_close": False}
    for kind in ("Queue", "SimpleQueue", "JoinableQueue"):
        out.append(
            Channel(
                f"{kind}-fd",
                _queue(kind, False),
                encode=_pickled_frame,
                threadless=("receive",),
                **queue,
            )
        )
    out.append(
        Channel(
            "Queue-threads",
            _queue("Queue", True),
            uses_threads=True,
            threadless=(),
            readiness_hook=False,
            encode=_pickled_frame,
            **queue,
        )
    )
    out.append(
        Channel(
            "Queue-windows",
            _windows_queue,
            uses_threads=True,
            threadless=(),
            readiness_hook=False,
            encode=None,
            fds=False,
            **queue,
        )
    )
    out.append(
        Channel(
            "Manager-Queue",
            _manager_queue,
            uses_threads=True,
            threadless=(),
            readiness_hook=False,
            encode=None,
            fds=False,
            **queue,
        )
    )
    return out


CHANNELS = _channels() if sys.platform != "win32" else []
