"""The hard guarantees of :class:`asyncmp.AsyncConnection`, tested under stress.

The plain API is tested in ``test_connection.py``. This module tests what the design
promises beyond it:

1. A cancelled receive loses nothing, even cut in the middle of a frame: tested for every
   channel by ``test_conformance.py``.
2. A send cancelled mid-frame either finishes under the shield or breaks the connection
   so that the peer sees EOF; a send cancelled before its first byte sends nothing.
3. The event loop never stalls while 64 MiB go either way.
4. The shared descriptor's flags never change (uvloop's ``add_reader`` would set
   ``O_NONBLOCK``; a control test shows that it does): while a receive or a send waits,
   tested for every channel by ``test_conformance.py``; here, under a default socket
   timeout.
5. No thread per pending receive on POSIX: tested for every channel by
   ``test_conformance.py``.
6. The async end stays in this process: a forked worker holds no copy of it, nor of
   the epoll helper, so closing it here gives the worker EOF.
7. A receive (or send) that needs no waiting still honours cancellation and gives the
   loop its turn (a run of receives: tested for every channel by ``test_conformance.py``);
   receivers sharing a connection take turns.
8. EOF wakes a receive that waits, as ``ConnectionEOF``, on both routes: tested for every
   channel by ``test_conformance.py``.

Where a guarantee holds for both routes, tests run on the descriptor route
(``use_threads=False``) and the thread route (``use_threads=True``).
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup

import asyncmp
import asyncmp._core.frames
from asyncmp import AsyncConnection, ConnectionEOF

from .support import guarantee_workers
from .support.heartbeat import STALL_CPU_BOUND, STALL_WALL_BOUND, heartbeat
from .support.io import buffered, wait_until

if sys.platform != "win32":
    import fcntl

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptors and fork"),
]

ROUTES = pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
TRANSPORTS = pytest.mark.parametrize("transport", ["socket", "pipe"])
LINUX_ONLY = pytest.mark.skipif(
    sys.platform != "linux", reason="relies on Linux pipe sizing and poll semantics"
)

FORK = multiprocessing.get_context("fork") if sys.platform != "win32" else None


# --- helpers ------------------------------------------------------------------------------------


def _recv_pair(transport: str, *, use_threads: bool = False) -> tuple[AsyncConnection, Connection]:
    """An async end that receives, and the sync Connection that feeds it.

    ``socket`` is a duplex Pipe (a socketpair), ``pipe`` a one-way Pipe (``os.pipe``).
    """
    return asyncmp.Pipe(transport == "socket", use_threads=use_threads)


def _send_pair(transport: str, *, use_threads: bool = False) -> tuple[AsyncConnection, Connection]:
    """An async end that sends, and the sync Connection that reads what it sends."""
    if transport == "socket":
        return asyncmp.Pipe(use_threads=use_threads)
    reader, writer = multiprocessing.Pipe(duplex=False)
    return AsyncConnection(writer, use_threads=use_threads), reader


def _frame(payload: bytes) -> bytes:
    """The stdlib's framing of one payload below 2 GiB."""
    return struct.pack("!i", len(payload)) + payload


def _writable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(0))


def _nonblocking(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def _grow_pipe(fd: int, size: int = 1 << 20) -> None:
    """Give a pipe room for *size* bytes, so a burst of messages fits without a reader."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError as exc:  # over /proc/sys/fs/pipe-max-size or the per-user quota
        pytest.skip(f"cannot grow a pipe to {size} bytes: {exc}")


def _running_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    return True


def _running_uvloop() -> bool:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    return type(loop).__module__.startswith("uvloop")


async def _cancel_a_waiting_receive(conn: AsyncConnection) -> None:
    """Start a receive, let it wait for data, then cancel it."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(conn.recv_bytes)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()


def _join(thread: threading.Thread, timeout: float = 10.0) -> None:
    thread.join(timeout)
    assert not thread.is_alive(), f"{thread.name} did not finish within {timeout} s"


class _Producer(threading.Thread):
    """Sends messages with the stdlib's blocking ``send_bytes``."""

    def __init__(self, conn: Connection, messages: list[bytes]) -> None:
        super().__init__(name="test-producer", daemon=True)
        self.conn = conn
        self.messages = messages
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for message in self.messages:
                self.conn.send_bytes(message)
        except OSError as exc:  # the consumer gave up and closed its end
            self.error = exc


class _Reader(threading.Thread):
    """Reads with the stdlib's blocking ``recv_bytes`` until *count* messages or an error."""

    def __init__(self, conn: Connection, count: int | None = None) -> None:
        super().__init__(name="test-reader", daemon=True)
        self.conn = conn
        self.count = count
        self.messages: list[bytes] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.count is None or len(self.messages) < self.count:
                self.messages.append(self.conn.recv_bytes())
        except BaseException as exc:  # handed to the test
            self.error = exc


@asynccontextmanager
async def _task_group(timeout: float = 30.0) -> AsyncIterator[TaskGroup]:
    """A task group that fails the test rather than hang (say, on a peer that never reads)."""
    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            yield tg


# --- 1. a cancelled receive loses nothing: tests/test_conformance.py, for every channel ------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except (BrokenPipeError, ConnectionResetError):  # the reader closed: the test failed
        pass


# --- 2. a cancelled send -------------------------------------------------------------------------


@ROUTES
@TRANSPORTS
async def test_send_cancelled_mid_frame_completes_under_the_shield(
    transport: str, use_threads: bool
) -> None:
    big = random.randbytes(8 << 20)
    a, peer = _send_pair(transport, use_threads=use_threads)
    reader = _Reader(peer, count=2)
    try:
        scope = anyio.CancelScope()

        async def send() -> None:
            with scope:
                await a.send_bytes(big)

        async with _task_group() as tg:
            tg.start_soon(send)
            # Part of the frame is out and nobody reads: the send waits for room.
            await wait_until(lambda: buffered(peer.fileno()) > 0, "the send started")
            await anyio.wait_all_tasks_blocked()
            assert 0 < buffered(peer.fileno()) < len(big)
            scope.cancel()
            await anyio.wait_all_tasks_blocked()  # the send now waits under the shield
            reader.start()
        assert scope.cancelled_caught
        await a.send_bytes(b"after")  # not broken
        _join(reader)
    finally:
        await a.aclose()
        if reader.ident is not None:
            _join(reader)
        peer.close()
    assert reader.error is None
    assert len(reader.messages) == 2
    assert reader.messages[0] == big
    assert reader.messages[1] == b"after"


@ROUTES
@TRANSPORTS
async def test_send_cancelled_past_the_shield_breaks_the_connection(
    transport: str, use_threads: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(asyncmp._core.frames, "SEND_SHIELD_SECONDS", 0.05)
    big = random.randbytes(8 << 20)
    a, peer = _send_pair(transport, use_threads=use_threads)
    reader = _Reader(peer)  # until EOF or an error
    try:
        scope = anyio.CancelScope()

        async def send() -> None:
            with scope:
                await a.send_bytes(big)

        async with _task_group() as tg:
            tg.start_soon(send)
            await wait_until(lambda: buffered(peer.fileno()) > 0, "the send started")
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
        # Nobody read during the shield: the frame is torn, the connection broken.
        assert scope.cancelled_caught
        with pytest.raises(anyio.BrokenResourceError):
            await a.send_bytes(b"after")
        with pytest.raises(anyio.BrokenResourceError):
            await a.send("after")

        reader.start()
        if transport == "socket":
            # The write side was shut down: the peer sees the end while this end is open.
            reader.join(10)
            assert not reader.is_alive(), "the peer still waits for the rest of a torn frame"
    finally:
        await a.aclose()
        if reader.ident is not None:
            _join(reader)
        peer.close()

    # Never a garbage message: the torn one is not delivered (the thread route's send
    # stops at its next slice, as the fd route's does at once), then EOF.
    assert reader.messages == []
    assert isinstance(reader.error, (EOFError, OSError)), reader.error


async def test_thread_route_stops_an_abandoned_send_and_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A send cancelled past its shield on the thread route: its thread stops at its next
    slice though the peer never reads, and aclose() closes the handle while the peer is
    still there."""
    if _running_uvloop() or not _running_asyncio():
        pytest.skip("independent of the backend; run once")
    monkeypatch.setattr(asyncmp._core.frames, "SEND_SHIELD_SECONDS", 0.05)
    a, peer = asyncmp.Pipe(use_threads=True)
    try:
        async with _task_group() as tg:
            tg.start_soon(a.send_bytes, random.randbytes(8 << 20))
            await wait_until(lambda: buffered(peer.fileno()) > 0, "the send started")
            tg.cancel_scope.cancel()
        with pytest.raises(anyio.BrokenResourceError):
            await a.send_bytes(b"after")
        await a.aclose()  # the peer still does not read
        assert a.connection.closed
        assert not any(t.name == "asyncmp-send" for t in threading.enumerate())
    finally:
        peer.close()


@ROUTES
@TRANSPORTS
async def test_send_cancelled_before_it_starts_sends_nothing(
    transport: str, use_threads: bool
) -> None:
    a, peer = _send_pair(transport, use_threads=use_threads)
    try:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await a.send_bytes(b"never")
        assert scope.cancelled_caught
        with anyio.CancelScope() as scope:
            scope.cancel()
            await a.send("never")
        assert scope.cancelled_caught
        await a.send_bytes(b"first")
        assert peer.poll(10)
        assert peer.recv_bytes() == b"first"
        assert not peer.poll(0)
    finally:
        await a.aclose()
        peer.close()


@LINUX_ONLY
async def test_send_waiting_for_room_cancelled_sends_nothing() -> None:
    """A send that waits for room before its first byte leaves nothing behind."""
    a, peer = _send_pair("pipe")
    try:
        # Fill the pipe with whole frames of one page each (one atomic write apiece).
        page = b"p" * (4096 - 4)
        filled = 0
        while _writable_now(a.fileno()):
            await a.send_bytes(page)
            filled += 1
        assert buffered(peer.fileno()) == filled * 4096

        scope = anyio.CancelScope()

        async def send() -> None:
            with scope:
                await a.send_bytes(b"never")

        async with _task_group() as tg:
            tg.start_soon(send)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
        assert scope.cancelled_caught
        assert buffered(peer.fileno()) == filled * 4096

        for _ in range(filled):
            assert peer.recv_bytes() == page
        assert not peer.poll(0)
        await a.send_bytes(b"after")  # the connection is fine
        assert peer.recv_bytes() == b"after"
    finally:
        await a.aclose()
        peer.close()


# --- 3. the loop never stalls -------------------------------------------------------------------

STALL_SIZE = 64 << 20


@pytest.mark.parametrize(
    ("transport", "use_threads"),
    [("socket", False), ("pipe", False), ("socket", True)],
    ids=["fd-socket", "fd-pipe", "threads-socket"],
)
async def test_the_loop_never_stalls_on_64_mib(transport: str, use_threads: bool) -> None:
    assert FORK is not None
    if transport == "socket":
        out_end, child_in = asyncmp.Pipe(use_threads=use_threads)
        in_end, child_out = out_end, child_in
    else:
        out_end, child_in = _send_pair("pipe", use_threads=use_threads)
        in_end, child_out = _recv_pair("pipe", use_threads=use_threads)
    worker = FORK.Process(
        target=guarantee_workers.slow_reader_then_writer,
        args=(child_in, child_out, STALL_SIZE, 64 << 10, 0.0002),
        name="test-slow-peer",
    )
    worker.start()
    try:
        child_in.close()
        child_out.close()
        payload = random.randbytes(STALL_SIZE)
        digest = hashlib.sha256(payload).digest()
        gaps: dict[str, tuple[float, float]] = {}
        with anyio.fail_after(60):
            async with heartbeat(0.001) as beat:
                beat.reset()
                await out_end.send_bytes(payload)
                reply = await in_end.recv()
                gaps["sending"] = beat.worst_gap, beat.worst_cpu_gap
                beat.reset()
                received = await in_end.recv_bytes()
                gaps["receiving"] = beat.worst_gap, beat.worst_cpu_gap
            their_digest = await in_end.recv()
        print(
            "worst heartbeat gap (wall / loop-thread CPU): "
            + ", ".join(f"{k} {w * 1e3:.1f} / {c * 1e3:.1f} ms" for k, (w, c) in gaps.items())
        )
        assert reply == (STALL_SIZE, digest)
        assert len(received) == STALL_SIZE
        assert hashlib.sha256(received).digest() == their_digest
        for phase, (wall, cpu) in gaps.items():
            assert cpu < STALL_CPU_BOUND, f"{phase}: the loop was busy {cpu * 1e3:.1f} ms on end"
            assert wall < STALL_WALL_BOUND, f"{phase}: no heartbeat for {wall * 1e3:.1f} ms"
    finally:
        await out_end.aclose()
        await in_end.aclose()
        worker.join(10)
        if worker.is_alive():
            worker.kill()
            worker.join()
    assert worker.exitcode == 0


# --- 4. shared descriptors keep their flags ------------------------------------------------------


@ROUTES
async def test_a_default_socket_timeout_changes_no_flag(
    use_threads: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``socket.setdefaulttimeout()`` makes every new socket object non-blocking, and a socket
    object made over a copy of a shared descriptor would set O_NONBLOCK on the description
    behind both. Under a default timeout: creating, receiving, sending, ``send_eof()`` and
    breaking the connection after a send cancelled past its shield leave the flag clear."""
    monkeypatch.setattr(asyncmp._core.frames, "SEND_SHIELD_SECONDS", 0.05)
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)
    try:
        for path in ("send_eof", "broken"):
            a, peer = asyncmp.Pipe(use_threads=use_threads)
            try:
                fd = a.fileno()
                assert not _nonblocking(fd), "O_NONBLOCK set by Pipe()"
                peer.send("in")
                assert await a.recv() == "in"
                await a.send("out")
                assert peer.recv() == "out"
                assert not _nonblocking(fd), "O_NONBLOCK set by a receive or a send"
                if path == "send_eof":
                    await a.send_eof()
                else:
                    with anyio.move_on_after(0.5) as scope:
                        await a.send_bytes(bytes(8 << 20))  # the peer does not read
                    assert scope.cancelled_caught
                    with pytest.raises(anyio.BrokenResourceError):
                        await a.send("after")
                assert not _nonblocking(fd), f"O_NONBLOCK set by {path}"
                assert not _nonblocking(peer.fileno())
            finally:
                await a.aclose()
                peer.close()
    finally:
        socket.setdefaulttimeout(saved)


@ROUTES
async def test_a_reset_under_a_default_socket_timeout_is_eof(use_threads: bool) -> None:
    """A peer that closes (or dies) with messages of ours unread resets the socket: that is
    the end of the stream, with or without a default socket timeout."""
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)
    try:
        a, peer = asyncmp.Pipe(use_threads=use_threads)
    finally:
        socket.setdefaulttimeout(saved)
    try:
        await a.send("never read by the peer")
        peer.send("first")
        peer.close()  # with unread data: a reset on Linux, a plain end elsewhere
        assert await a.recv() == "first"
        with anyio.fail_after(10), pytest.raises(ConnectionEOF):
            await a.recv()
    finally:
        await a.aclose()
        peer.close()


async def test_control_uvloop_add_reader_sets_nonblocking() -> None:
    """The hazard the flag tests guard against is real: uvloop's add_reader sets O_NONBLOCK."""
    if not _running_uvloop():
        pytest.skip("the hazard is uvloop's")
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    try:
        assert not _nonblocking(r)
        loop.add_reader(r, lambda: None)
        try:
            assert _nonblocking(r)
        finally:
            loop.remove_reader(r)
    finally:
        os.close(r)
        os.close(w)


# --- 6. the async end stays in this process ------------------------------------------------------


def _descriptors(pid: int) -> Iterator[tuple[int, str, str]]:
    """In process *pid*: each open descriptor's (inode, link, fdinfo text)."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            ino = os.stat(f"/proc/{pid}/fd/{name}").st_ino
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                info = f.read()
        except (FileNotFoundError, NotADirectoryError):  # closed meanwhile
            continue
        yield ino, link, info


def _references(pid: int, ino: int) -> tuple[int, int]:
    """In process *pid*: (descriptors open on inode *ino*, epoll instances watching it)."""
    direct = watching = 0
    for fd_ino, link, info in _descriptors(pid):
        direct += fd_ino == ino
        if link == "anon_inode:[eventpoll]":
            watching += any(
                line.startswith("tfd:") and f" ino:{ino:x} " in f"{line} "
                for line in info.splitlines()
            )
    return direct, watching


def _readers(pid: int, ino: int) -> int:
    """Descriptors of process *pid* that read from the pipe with inode *ino*."""
    count = 0
    for fd_ino, _, info in _descriptors(pid):
        flags = next(line for line in info.splitlines() if line.startswith("flags:"))
        count += fd_ino == ino and int(flags.split()[1], 8) & os.O_ACCMODE == os.O_RDONLY
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fdinfo"), reason="needs /proc")
@ROUTES
async def test_forked_worker_holds_no_copy_of_the_async_end(use_threads: bool) -> None:
    assert FORK is not None
    a, b = asyncmp.Pipe(use_threads=use_threads)
    if not use_threads:
        # Make the epoll helper exist before the fork: a receive that waited.
        await _cancel_a_waiting_receive(a)
    ino = os.fstat(a.fileno()).st_ino
    direct, watching = _references(os.getpid(), ino)
    assert direct >= 1  # the detector sees this process's copies
    assert watching == (0 if use_threads else 1)

    async with a, _forked(guarantee_workers.recv_until_eof, b, 5) as worker:
        with anyio.fail_after(10):
            assert await a.recv() == ("ready", worker.pid)
        assert worker.pid is not None
        assert _references(worker.pid, ino) == (0, 0)
        for i in range(5):
            await a.send(i)
        await a.aclose()  # the worker's recv() now sees EOF
        worker.join(10)
        assert not worker.is_alive(), "the worker did not see EOF after the async end closed"
    assert worker.exitcode == 0


@asynccontextmanager
async def _forked(target: Any, conn: Connection, *args: object) -> AsyncIterator[Any]:
    """A forked worker running *target* with *conn* (closed here once the worker has it)
    and *args*; killed at the end if it is still alive, and joined."""
    assert FORK is not None
    worker = FORK.Process(target=target, args=(conn, *args), name=f"test-{target.__name__}")
    worker.start()
    try:
        conn.close()
        yield worker
    finally:
        if worker.is_alive():
            worker.kill()
        worker.join()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fdinfo"), reason="needs /proc")
@ROUTES
async def test_closing_the_async_end_of_a_one_way_pipe_leaves_no_reader(use_threads: bool) -> None:
    """On Linux the async end of a one-way pipe reads through a descriptor of its own
    (a second reader of the pipe). Neither a forked worker nor this process keeps any
    reader once the async end is closed: the worker's send sees EPIPE."""
    assert FORK is not None
    a, b = asyncmp.Pipe(duplex=False, use_threads=use_threads)
    ino = os.fstat(a.fileno()).st_ino
    async with a, _forked(guarantee_workers.send_until_broken, b) as worker:
        with anyio.fail_after(10):
            assert await a.recv() == ("ready", worker.pid)
        assert worker.pid is not None
        if sys.platform == "linux" and not use_threads:
            assert _readers(os.getpid(), ino) == 2, "the handed end and its own one"
        assert _readers(worker.pid, ino) == 0
        await a.aclose()
        assert _readers(os.getpid(), ino) == 0
        worker.join(10)
        assert not worker.is_alive(), "a reader of the pipe is still open somewhere"
    assert worker.exitcode == 0


# --- 7. the fast path: cancellation and fairness ------------------------------------------------


@pytest.mark.parametrize(
    ("use_threads", "where"),
    [(False, "kernel"), (False, "decoder"), (True, "kernel")],
    ids=["fd-kernel", "fd-decoder", "threads-kernel"],
)
async def test_buffered_message_still_honours_cancellation(use_threads: bool, where: str) -> None:
    a, b = asyncmp.Pipe(use_threads=use_threads)
    try:
        b.send_bytes(b"first")
        b.send_bytes(b"second")
        if where == "decoder":
            assert await a.recv_bytes() == b"first"
            assert buffered(a.fileno()) == 0  # "second" is held by the connection
            expected = [b"second"]
        else:
            assert a.connection.poll(0)
            expected = [b"first", b"second"]
        with anyio.CancelScope() as scope:
            scope.cancel()
            await a.recv_bytes()
            pytest.fail("a cancelled receive returned a message")
        assert scope.cancelled_caught
        with anyio.CancelScope() as scope:
            scope.cancel()
            await a.recv()
            pytest.fail("a cancelled receive returned a message")
        assert scope.cancelled_caught
        with anyio.fail_after(10):
            assert [await a.recv_bytes() for _ in expected] == expected
    finally:
        await a.aclose()
        b.close()


BURST = 10_000


@LINUX_ONLY
@ROUTES
async def test_fast_path_send_lets_the_loop_run(use_threads: bool) -> None:
    a, peer = _send_pair("pipe", use_threads=use_threads)
    try:
        _grow_pipe(peer.fileno())
        count = BURST if not use_threads else BURST // 50
        with anyio.fail_after(30):
            async with heartbeat(0) as beat:
                start = time.perf_counter()
                beat.reset()
                for i in range(count):
                    await a.send(i)  # always room: never waits
                ticks = beat.ticks
                took = time.perf_counter() - start
        print(f"{count} sends in {took * 1e3:.1f} ms, heartbeat ticked {ticks} times")
        assert [peer.recv() for _ in range(count)] == list(range(count))
        assert ticks >= 3, f"the loop got {ticks} turns in {took * 1e3:.1f} ms of sending"
    finally:
        await a.aclose()
        peer.close()


@LINUX_ONLY
@ROUTES
async def test_receivers_sharing_a_busy_connection_take_turns(use_threads: bool) -> None:
    a, b = _recv_pair("pipe", use_threads=use_threads)
    try:
        _grow_pipe(b.fileno())
        count = BURST if not use_threads else BURST // 50
        for i in range(count):
            b.send(i)
        b.send(None)
        b.send(None)
        shares: list[list[int]] = [[], []]

        async def receive(mine: list[int]) -> None:
            while (item := await a.recv()) is not None:
                mine.append(item)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for share in shares:
                    tg.start_soon(receive, share)
        print(f"shares: {len(shares[0])} and {len(shares[1])}")
        assert sorted(shares[0] + shares[1]) == list(range(count))
        for share in shares:
            assert share == sorted(share)
            assert len(share) >= count // 10, "one receiver starved the other"
    finally:
        await a.aclose()
        b.close()
