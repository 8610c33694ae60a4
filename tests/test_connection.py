"""Behaviour of ``AsyncConnection`` and ``Pipe``: the API and its error handling.

Every test runs on both I/O routes (the autouse ``route`` fixture): ``fd``, descriptor
readiness through a private epoll/kqueue, and ``threads``, the stdlib's blocking calls in
asyncmp's threads (the Windows route, forced here with ``use_threads=True``); and on every
event-loop backend. The peer is a plain synchronous ``Connection``: called inline when the
call can't block (a small message fits in the kernel buffer), otherwise in a thread of the
test's own or in a child process. Cancellation, stalls, descriptor flags and fork
behaviour are tested elsewhere.
"""

from __future__ import annotations

import array
import contextlib
import multiprocessing
import os
import pickle
import socket
import struct
import sys
import threading
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any, cast

import anyio
import anyio.abc
import anyio.to_thread
import pytest

import asyncmp
from asyncmp import AsyncConnection, ConnectionEOF, ProtocolError
from asyncmp._core.frames import GreedyReader
from asyncmp._core.threads import DEFAULT_THREAD_LIMIT, thread_limiter

from .support import workers
from .support.io import wait_until
from .support.memory import RESIDENT_KNOWN, resident

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        sys.platform == "win32",
        reason="POSIX only: the fd route, and peers that write raw framing to a descriptor",
    ),
]

KiB = 1 << 10
MiB = 1 << 20

# ---------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture(params=["fd", "threads"], autouse=True)
def route(request: pytest.FixtureRequest) -> str:
    """The I/O route under test; every test in this module runs on both."""
    return cast(str, request.param)


@pytest.fixture
def use_threads(route: str) -> bool:
    return route == "threads"


@contextlib.asynccontextmanager
async def open_pipe(
    use_threads: bool,
    *,
    duplex: bool = True,
    max_message_size: int | None = asyncmp.DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncIterator[tuple[AsyncConnection, Connection]]:
    """``asyncmp.Pipe()``, with both ends closed on exit."""
    aconn, peer = asyncmp.Pipe(duplex, max_message_size=max_message_size, use_threads=use_threads)
    try:
        async with aconn:
            yield aconn, peer
    finally:
        peer.close()


class PeerThread:
    """A blocking function in a plain thread, awaited without blocking the event loop.

    Plain threads rather than ``anyio.to_thread``: the test joins what it started, and
    asyncmp's own threads stay the only ones the thread route creates.
    """

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn = fn
        self._done_r, self._done_w = socket.socketpair()
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-peer", daemon=True)

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # handed to the test by peer_thread()
            self.error = exc
        finally:
            self._done_w.send(b"\0")

    async def wait(self, timeout: float) -> bool:
        """True once the function has returned, False if it is still running after *timeout*."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            await anyio.wait_readable(self._done_r)
            return True
        return False

    def close(self) -> None:
        self.thread.join(5)
        if not self.thread.is_alive():  # else a closed number could be reused under it
            self._done_r.close()
            self._done_w.close()


@contextlib.asynccontextmanager
async def peer_thread(
    fn: Callable[[], object], *, abort: Callable[[], object], timeout: float = 10.0
) -> AsyncIterator[PeerThread]:
    """Run *fn* in a thread during the body; on exit, wait for it and re-raise its error.

    If the body fails or the thread overstays *timeout*, *abort* is called (typically
    closing the async end, so a peer blocked on it sees EOF). The body's error wins over
    the thread's.
    """
    peer = PeerThread(fn)
    peer.thread.start()
    try:
        try:
            yield peer
        except BaseException:
            abort()
            await peer.wait(timeout)
            raise
        if not await peer.wait(timeout):
            abort()
            await peer.wait(timeout)
            raise AssertionError(f"the peer thread was still running after {timeout} s")
    finally:
        peer.close()
    if peer.error is not None:
        raise peer.error


async def join_process(proc: BaseProcess, timeout: float = 20.0) -> int | None:
    """Wait for *proc* to exit without blocking the loop (killed if it overstays), reap it,
    release it; return its exit code."""
    try:
        with anyio.fail_after(timeout):
            await anyio.wait_readable(proc.sentinel)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        exitcode = proc.exitcode
        proc.close()
    return exitcode


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of *data* is out (raw bytes from the peer's side)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def frame(payload: bytes) -> bytes:
    """The stdlib's framing of one message: big-endian signed 32-bit length, payload."""
    return struct.pack("!i", len(payload)) + payload


def asyncmp_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("asyncmp")]


def open_fd_count() -> int | None:
    fd_dir = {"linux": "/proc/self/fd", "darwin": "/dev/fd"}.get(sys.platform)
    return None if fd_dir is None else len(os.listdir(fd_dir))


# ---------------------------------------------------------------------------------------
# What can be wrapped
# ---------------------------------------------------------------------------------------


async def test_duplex_pipe_carries_objects_both_ways(use_threads: bool) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        assert aconn.readable and aconn.writable
        assert peer.readable and peer.writable
        assert aconn.uses_threads is use_threads
        await aconn.send({"to": "peer", "n": 1})
        assert peer.recv() == {"to": "peer", "n": 1}
        peer.send(("to", "async", 2))
        assert await aconn.recv() == ("to", "async", 2)


async def test_simplex_pipe_async_end_is_the_receiving_one(use_threads: bool) -> None:
    async with open_pipe(use_threads, duplex=False) as (aconn, peer):
        assert aconn.readable and not aconn.writable
        assert peer.writable and not peer.readable
        peer.send([1, 2, 3])
        assert await aconn.recv() == [1, 2, 3]
        with pytest.raises(OSError, match="read-only"):
            await aconn.send("nope")
        with pytest.raises(OSError, match="read-only"):
            await aconn.send_bytes(b"nope")
        peer.send("still fine")
        assert await aconn.recv() == "still fine"


@pytest.mark.parametrize(
    ("duplex", "end"),
    [(True, 0), (True, 1), (False, 0), (False, 1)],
    ids=["duplex-first", "duplex-second", "simplex-reader", "simplex-writer"],
)
async def test_wraps_either_end_of_a_multiprocessing_pipe(
    use_threads: bool, duplex: bool, end: int
) -> None:
    ends = multiprocessing.Pipe(duplex)
    conn, peer = ends[end], ends[1 - end]
    try:
        async with AsyncConnection(conn, use_threads=use_threads) as aconn:
            assert aconn.connection is conn
            assert (aconn.readable, aconn.writable) == (conn.readable, conn.writable)
            if aconn.writable:
                await aconn.send_bytes(b"from the async end")
                assert peer.recv_bytes() == b"from the async end"
            if aconn.readable:
                peer.send_bytes(b"from the peer")
                assert await aconn.recv_bytes() == b"from the peer"
        assert conn.closed, "closing the AsyncConnection closes the Connection it owns"
    finally:
        conn.close()
        peer.close()


@pytest.mark.parametrize("family", ["AF_UNIX", "AF_INET"])
@pytest.mark.parametrize("side", ["client", "server"])
async def test_listener_and_client_connections(use_threads: bool, family: str, side: str) -> None:
    address = ("127.0.0.1", 0) if family == "AF_INET" else None
    authkey = b"asyncmp tests"
    accepted: list[Connection] = []
    with Listener(address, family=family, authkey=authkey) as listener:
        # accept() and Client() both run the authentication handshake: one needs a thread.
        acceptor = threading.Thread(target=lambda: accepted.append(listener.accept()))
        acceptor.start()
        try:
            client = Client(listener.address, family=family, authkey=authkey)
        finally:
            acceptor.join(10)
    server = accepted[0]
    conn, peer = (client, server) if side == "client" else (server, client)
    try:
        async with AsyncConnection(conn, use_threads=use_threads) as aconn:
            await aconn.send(("hello", side))
            assert peer.recv() == ("hello", side)
            peer.send(b"x" * KiB)  # small enough for any socket buffer: send() can't block
            assert await aconn.recv() == b"x" * KiB
        with pytest.raises(EOFError):
            peer.recv()
    finally:
        conn.close()
        peer.close()


async def test_seed_exchange_with_a_child_process(
    use_threads: bool, mp_context: BaseContext
) -> None:
    aconn, child_end = asyncmp.Pipe(use_threads=use_threads)
    async with aconn:
        # BaseContext has no Process attribute in typeshed; every concrete context does.
        proc: BaseProcess = cast(Any, mp_context).Process(
            target=workers.seed_pipe_child, args=(child_end,)
        )
        try:
            proc.start()
        finally:
            child_end.close()
        try:
            with anyio.fail_after(20):  # bounds a hang; spawn takes well under a second
                assert await aconn.recv() == [42, None, "hello"]
                await aconn.send("666")
                assert await aconn.recv() == "child got '666'"
        finally:
            await aconn.aclose()  # the child's recv() sees EOF, and it returns by itself
            exitcode = await join_process(proc)
    assert exitcode == 0


# ---------------------------------------------------------------------------------------
# Sending and receiving
# ---------------------------------------------------------------------------------------


def _nth_object(i: int) -> object:
    if i % 40 == 0:  # large ones: partial writes, and bodies the decoder gathers in chunks
        return bytes([i % 256]) * (150 * KiB + i)
    return (i, f"message {i}", [i] * (i % 7), {"k": i, None: 1.5}, b"\0" * (i % 5))


async def test_many_objects_both_ways_with_an_echoing_peer(use_threads: bool) -> None:
    n = 200
    async with open_pipe(use_threads) as (aconn, peer):

        def echo() -> None:
            for _ in range(n):
                peer.send(("echo", peer.recv()))

        received: list[object] = []

        async def send_all() -> None:
            for i in range(n):
                await aconn.send(_nth_object(i))

        async def receive_all() -> None:
            for _ in range(n):
                received.append(await aconn.recv())

        with anyio.fail_after(30):
            async with peer_thread(echo, abort=aconn.close):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send_all)
                    tg.start_soon(receive_all)
        assert received == [("echo", _nth_object(i)) for i in range(n)]


async def test_send_bytes_offset_and_size(use_threads: bool) -> None:
    data = b"0123456789"
    ints = array.array("i", [1, 2, 3, 4])
    async with open_pipe(use_threads) as (aconn, peer):
        cases: list[tuple[Any, int, int | None, bytes]] = [
            (data, 0, None, data),
            (data, 2, None, b"23456789"),
            (data, 2, 3, b"234"),
            (data, 10, None, b""),
            (data, 4, 0, b""),
            (bytearray(data), 5, 5, b"56789"),
            (memoryview(data), 9, 1, b"9"),
            # As in the stdlib, offset and size count bytes, not items.
            (ints, 4, 8, ints.tobytes()[4:12]),
        ]
        for buf, offset, size, expected in cases:
            await aconn.send_bytes(buf, offset, size)
            assert peer.recv_bytes() == expected, (offset, size)

        bad: list[tuple[int, int | None, str]] = [
            (-1, None, "offset is negative"),
            (11, None, "buffer length < offset"),
            (0, -1, "size is negative"),
            (5, 6, "buffer length < offset \\+ size"),
            (11, 0, "buffer length < offset"),
        ]
        for offset, size, message in bad:
            with pytest.raises(ValueError, match=message):
                await aconn.send_bytes(data, offset, size)
        assert not peer.poll(), "a rejected send_bytes() sent something"
        await aconn.send_bytes(b"after")
        assert peer.recv_bytes() == b"after"


@pytest.mark.parametrize("size", [0, 10, 100_000, 3 << 20])
async def test_recv_bytes_into_fills_the_buffer_at_the_offset(use_threads: bool, size: int) -> None:
    payload = os.urandom(size)
    buffer = bytearray(b"\xee" * (size + 10))
    async with open_pipe(use_threads) as (aconn, peer):
        async with peer_thread(lambda: peer.send_bytes(payload), abort=aconn.close):
            assert await aconn.recv_bytes_into(buffer, 7) == size
        assert buffer[7 : 7 + size] == payload
        assert buffer[:7] == b"\xee" * 7 and buffer[7 + size :] == b"\xee" * 3
        # Into an array: the offset counts bytes, as in the stdlib; then the next message.
        ints = array.array("i", [0] * 4)
        peer.send_bytes(b"\x01\x00\x00\x00")
        peer.send_bytes(b"next")
        assert await aconn.recv_bytes_into(ints, 4) == 4
        assert ints.tolist() == [0, 1, 0, 0]
        assert await aconn.recv_bytes() == b"next"


async def test_recv_bytes_into_a_short_buffer_raises_with_the_message(use_threads: bool) -> None:
    big = os.urandom(200_000)

    def send() -> None:
        for message in (big, big, big, b"after"):
            peer.send_bytes(message)

    async with open_pipe(use_threads) as (aconn, peer):
        async with peer_thread(send, abort=aconn.close):
            for buffer, offset in [(bytearray(199_999), 0), (bytearray(200_000), 1)]:
                with pytest.raises(multiprocessing.BufferTooShort) as info:
                    await aconn.recv_bytes_into(buffer, offset)
                assert info.value.args[0] == big  # consumed, and handed over whole
            assert await aconn.recv_bytes() == big
            assert await aconn.recv_bytes() == b"after"


async def test_recv_bytes_into_refuses_bad_arguments(use_threads: bool) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        peer.send_bytes(b"kept")
        with pytest.raises(ValueError, match="negative offset"):
            await aconn.recv_bytes_into(bytearray(10), -1)
        with pytest.raises(ValueError, match="offset too large"):
            await aconn.recv_bytes_into(bytearray(10), 11)
        with pytest.raises(TypeError, match="writable"):
            await aconn.recv_bytes_into(b"read-only", 0)
        with pytest.raises(TypeError):
            await aconn.recv_bytes_into(memoryview(bytearray(10))[::2], 0)  # not contiguous
        assert await aconn.recv_bytes() == b"kept"


async def test_recv_bytes_into_cancelled_mid_message_loses_nothing(use_threads: bool) -> None:
    size = 3 << 20
    payload = os.urandom(size)
    wire = frame(payload)
    cut = 1 << 20
    async with open_pipe(use_threads) as (aconn, peer):
        fd = peer.fileno()
        buffer = bytearray(size)
        write_rest = threading.Event()

        def send_in_two() -> None:
            write_all(fd, wire[:cut])
            write_rest.wait(10)
            write_all(fd, wire[cut:])

        async with peer_thread(send_in_two, abort=aconn.close):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(aconn.recv_bytes_into, buffer)
                    # Until the first part is read: then the task waits for the rest.
                    route = aconn._route
                    reader: GreedyReader = route._reader if use_threads else route.fast_reader  # type: ignore[attr-defined,assignment]
                    await wait_until(
                        lambda: reader.decoder.buffered >= cut, "the first part is read"
                    )
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
            buffer[:] = bytes(size)  # the caller's again: scribbled on
            write_rest.set()
            assert await aconn.recv_bytes() == payload


async def test_empty_messages(use_threads: bool) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        await aconn.send_bytes(b"")
        assert peer.recv_bytes() == b""
        peer.send_bytes(b"")
        peer.send_bytes(b"")
        peer.send_bytes(b"next")
        assert await aconn.recv_bytes() == b""
        assert await aconn.recv_bytes() == b""
        assert await aconn.recv_bytes() == b"next"


async def test_recv_bytes_maxlength(use_threads: bool) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        peer.send_bytes(b"x" * 10)
        assert await aconn.recv_bytes(10) == b"x" * 10, "a message of exactly maxlength is fine"
        with pytest.raises(ValueError, match="negative maxlength"):
            await aconn.recv_bytes(-1)
        peer.send_bytes(b"y" * 100)
        with pytest.raises(ProtocolError, match="exceeds") as info:
            await aconn.recv_bytes(99)
        assert isinstance(info.value, anyio.BrokenResourceError)


@pytest.mark.parametrize("cause", ["maxlength", "max_message_size"])
async def test_connection_stays_broken_after_a_protocol_error(
    use_threads: bool, cause: str
) -> None:
    """As documented: after a ProtocolError the connection can't be trusted any more."""
    async with open_pipe(use_threads, max_message_size=99) as (aconn, peer):
        peer.send_bytes(b"y" * 100)
        peer.send_bytes(b"z")
        with pytest.raises(ProtocolError):
            await (aconn.recv_bytes(99) if cause == "maxlength" else aconn.recv_bytes())
        with pytest.raises(anyio.BrokenResourceError):
            await aconn.recv_bytes()
        with pytest.raises(anyio.BrokenResourceError):
            aconn.recv_nowait()
        with pytest.raises(anyio.BrokenResourceError):
            await aconn.send("after the error")
        assert not peer.poll()


async def test_recv_nowait(use_threads: bool) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        with pytest.raises(anyio.WouldBlock):
            aconn.recv_nowait()
        peer.send("whole")
        peer.send(["second", 2])
        assert aconn.recv_nowait() == "whole"
        assert aconn.recv_nowait() == ["second", 2]
        with pytest.raises(anyio.WouldBlock):
            aconn.recv_nowait()

        # While another task is receiving, recv_nowait() doesn't jump the queue.
        got: list[object] = []

        async def receive_one() -> None:
            got.append(await aconn.recv())

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive_one)
                await anyio.wait_all_tasks_blocked()
                peer.send("for the waiting task")
                with pytest.raises(anyio.WouldBlock):
                    aconn.recv_nowait()
        assert got == ["for the waiting task"]


async def test_recv_nowait_keeps_a_partial_message(
    use_threads: bool, route: str, request: pytest.FixtureRequest
) -> None:
    obj = ["partial", "message" * 20]
    wire = frame(bytes(ForkingPickler.dumps(obj)))
    async with open_pipe(use_threads) as (aconn, peer):
        fd = peer.fileno()
        written = 0
        rescued = threading.Event()
        finished = threading.Event()

        def rescue() -> None:
            # A "no hang" bound: if recv_nowait() blocks, complete the message so it returns.
            if not finished.wait(1.0):
                write_all(fd, wire[written:])
                rescued.set()

        for cut in [2, 4, 30]:  # inside the header, right after it, inside the body
            write_all(fd, wire[written:cut])
            written = cut
            finished.clear()
            rescuer = threading.Thread(target=rescue)
            rescuer.start()
            try:
                with pytest.raises(anyio.WouldBlock):
                    aconn.recv_nowait()
            finally:
                finished.set()
                rescuer.join()
            assert not rescued.is_set()
        write_all(fd, wire[written:])
        assert aconn.recv_nowait() == obj
        with pytest.raises(anyio.WouldBlock):
            aconn.recv_nowait()


async def test_async_for_ends_at_eof(use_threads: bool) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        for i in range(5):
            peer.send(i)
        peer.close()
        with anyio.fail_after(10):
            assert [item async for item in aconn] == [0, 1, 2, 3, 4]


async def test_object_stream_names(use_threads: bool) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        stream: anyio.abc.ObjectStream[Any] = aconn
        assert isinstance(stream, anyio.abc.ObjectStream)
        await stream.send(("sent", "via", "send"))
        assert peer.recv() == ("sent", "via", "send")
        peer.send("via receive")
        assert await stream.receive() == "via receive"
        peer.close()
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()


async def test_send_eof_on_a_socket_end_half_closes(use_threads: bool) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        await aconn.send("last")
        await aconn.send_eof()
        assert peer.recv() == "last"
        # A bound against a hang: after send_eof() the EOF is readable at once.
        assert peer.poll(5), "send_eof() did not make the peer's end readable"
        with pytest.raises(EOFError):
            peer.recv()
        peer.send("the other direction still works")
        assert await aconn.recv() == "the other direction still works"


async def test_send_eof_waits_for_the_send_in_progress(use_threads: bool) -> None:
    payload = b"w" * MiB  # more than the socket buffer: the send waits mid-frame
    go = threading.Event()
    async with open_pipe(use_threads) as (aconn, peer):

        def receive_all() -> list[object]:
            go.wait(20)
            got: list[object] = [peer.recv_bytes()]
            try:
                got.append(peer.recv_bytes())
            except EOFError:
                got.append("EOF")
            return got

        with anyio.fail_after(20):
            async with peer_thread(receive_all, abort=aconn.close) as receiver:
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(aconn.send_bytes, payload)
                        await anyio.wait_all_tasks_blocked()
                        tg.start_soon(aconn.send_eof)
                        await anyio.wait_all_tasks_blocked()
                        go.set()
                finally:
                    go.set()
    assert receiver.result == [payload, "EOF"]


async def test_send_eof_on_a_pipe_end_does_nothing(use_threads: bool) -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    with reader:
        async with AsyncConnection(writer, use_threads=use_threads) as aconn:
            before = open_fd_count()
            await aconn.send_eof()
            assert open_fd_count() == before, "send_eof() on a pipe end leaked a descriptor"
            await aconn.send("sent after send_eof()")
            assert reader.recv() == "sent after send_eof()"


async def test_recv_on_a_write_only_end_raises(use_threads: bool) -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    with reader:
        async with AsyncConnection(writer, use_threads=use_threads) as aconn:
            with pytest.raises(OSError, match="write-only"):
                await aconn.recv()
            with pytest.raises(OSError, match="write-only"):
                aconn.recv_nowait()


# ---------------------------------------------------------------------------------------
# End of stream and broken peers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("duplex", [True, False], ids=["socket", "pipe"])
async def test_clean_eof_comes_after_the_messages_sent_before_it(
    use_threads: bool, duplex: bool
) -> None:
    async with open_pipe(use_threads, duplex=duplex) as (aconn, peer):
        for message in ("a", "b", "c"):
            peer.send(message)
        peer.close()
        assert [await aconn.recv() for _ in range(3)] == ["a", "b", "c"]
        with pytest.raises(ConnectionEOF) as info:
            await aconn.recv()
        assert isinstance(info.value, EOFError)
        assert isinstance(info.value, anyio.EndOfStream)
        assert isinstance(info.value, asyncmp.AsyncmpError)
        assert "mid-message" not in str(info.value)
        with pytest.raises(ConnectionEOF):  # and it stays at EOF
            await aconn.recv_bytes()


def _kernel_reports_connection_reset() -> bool:
    """Does closing a socket with unread data make its peer's recv() fail with ECONNRESET?"""
    a, b = socket.socketpair()
    with a, b:
        a.send(b"left unread")
        b.send(b"x")
        b.close()
        a.recv(1)
        try:
            a.recv(1)
        except ConnectionResetError:
            return True
        return False


async def test_connection_reset_is_eof(use_threads: bool) -> None:
    if not _kernel_reports_connection_reset():
        pytest.skip("this kernel reports a plain EOF, not ECONNRESET, for this case")
    async with open_pipe(use_threads) as (aconn, peer):
        await aconn.send("never read by the peer")
        peer.send("first")
        peer.send("second")
        peer.close()  # with unread data: the kernel resets the connection
        assert await aconn.recv() == "first"
        assert await aconn.recv() == "second"
        with pytest.raises(ConnectionEOF) as info:
            await aconn.recv()
        assert "mid-message" not in str(info.value)


@pytest.mark.parametrize("duplex", [True, False], ids=["socket", "pipe"])
@pytest.mark.parametrize(
    "partial",
    [struct.pack("!i", 1000) + b"x" * 10, struct.pack("!i", 1000)[:2]],
    ids=["in-body", "in-header"],
)
async def test_peer_dying_mid_message_is_eof_mid_message(
    use_threads: bool, duplex: bool, partial: bytes
) -> None:
    async with open_pipe(use_threads, duplex=duplex) as (aconn, peer):
        peer.send("whole one first")
        write_all(peer.fileno(), partial)
        peer.close()
        assert await aconn.recv() == "whole one first"
        with pytest.raises(ConnectionEOF, match="mid-message"):
            await aconn.recv()


@pytest.mark.parametrize("duplex", [True, False], ids=["socket", "pipe"])
async def test_send_to_a_closed_peer_is_a_broken_resource(use_threads: bool, duplex: bool) -> None:
    reader, writer = multiprocessing.Pipe(duplex)
    reader.close()
    async with AsyncConnection(writer, use_threads=use_threads) as aconn:
        with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError):
            await aconn.send("nobody listens")


# ---------------------------------------------------------------------------------------
# Hostile or oversized input
# ---------------------------------------------------------------------------------------

_HOSTILE_HEADERS = [
    pytest.param(struct.pack("!i", 2**31 - 1), MiB, id="huge"),
    pytest.param(struct.pack("!i", -5), MiB, id="negative"),
    pytest.param(struct.pack("!i", -(2**31)), None, id="negative-no-limit"),
    pytest.param(struct.pack("!i", -1) + struct.pack("!Q", 2**40), MiB, id="long-form"),
]


@pytest.mark.parametrize(("header", "limit"), _HOSTILE_HEADERS)
async def test_hostile_header_is_a_protocol_error_before_allocation(
    use_threads: bool,
    route: str,
    request: pytest.FixtureRequest,
    header: bytes,
    limit: int | None,
) -> None:
    async with open_pipe(use_threads, max_message_size=limit) as (aconn, peer):
        write_all(peer.fileno(), header + b"\0" * 64)
        tracemalloc.start()
        try:
            with anyio.fail_after(10), pytest.raises(ProtocolError) as info:
                await aconn.recv_bytes()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(info.value, anyio.BrokenResourceError)
        assert peak < MiB, f"{peak} bytes allocated for a header"


@pytest.mark.skipif(not RESIDENT_KNOWN, reason="no way to read the resident size here")
async def test_memory_stays_bounded_by_the_bytes_received(
    use_threads: bool, route: str, request: pytest.FixtureRequest
) -> None:
    # A 2 GiB claim, 1 MiB sent: the buffer may be reserved at once (fresh pages, which
    # cost nothing until written), so what counts is the resident memory.
    chunk = b"\xab" * (64 * KiB)
    chunks = 16
    received = 4 + chunks * len(chunk)
    async with open_pipe(use_threads, max_message_size=None) as (aconn, peer):
        fd = peer.fileno()

        def feed() -> None:
            write_all(fd, struct.pack("!i", 2**31 - 1))
            for _ in range(chunks):
                write_all(fd, chunk)
            peer.close()  # the receive ends in a mid-message EOF once it has read it all

        before = resident()
        with anyio.fail_after(20):
            async with peer_thread(feed, abort=aconn.close):
                with pytest.raises(ConnectionEOF, match="mid-message"):
                    await aconn.recv_bytes()
        grown = resident() - before  # the partial body is still held
        assert grown < 4 * received + 16 * MiB, f"grew {grown} bytes for {received} received"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: lambda: None, id="lambda"),
        pytest.param(threading.Lock, id="lock"),
        pytest.param(lambda: [b"x" * MiB, threading.Lock()], id="fails-late"),
    ],
)
async def test_unpicklable_object_raises_in_send_and_nothing_is_sent(
    use_threads: bool, make: Callable[[], object]
) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
            await aconn.send(make())
        await aconn.send("after")
        assert peer.recv() == "after"
        assert not peer.poll(), "the peer got bytes of the failed send"
        peer.send("back")
        assert await aconn.recv() == "back"


async def test_unpicklable_message_raises_in_recv_and_is_consumed(use_threads: bool) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        peer.send_bytes(b"not a pickle")
        peer.send("next")
        with pytest.raises(pickle.UnpicklingError):
            await aconn.recv()
        assert await aconn.recv() == "next"


async def test_negative_max_message_size_is_rejected(use_threads: bool) -> None:
    reader, writer = multiprocessing.Pipe()
    with reader, writer:
        with pytest.raises(ValueError, match="max_message_size"):
            AsyncConnection(reader, max_message_size=-1, use_threads=use_threads)
        assert not reader.closed, "a failed constructor must leave the connection to its caller"
    with pytest.raises(ValueError, match="max_message_size"):
        asyncmp.Pipe(max_message_size=-1, use_threads=use_threads)


# ---------------------------------------------------------------------------------------
# Closing
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_closing_wakes_every_waiting_receiver(use_threads: bool, how: str) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        outcomes: list[object] = []

        async def receiver() -> None:
            try:
                outcomes.append(await aconn.recv())
            except anyio.ClosedResourceError as exc:
                outcomes.append(exc)

        with anyio.fail_after(5):  # "promptly"; the thread route notices within a slice
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(receiver)
                await anyio.wait_all_tasks_blocked()
                assert outcomes == []
                if how == "close":
                    aconn.close()
                else:
                    await aconn.aclose()
        assert len(outcomes) == 3
        assert all(isinstance(o, anyio.ClosedResourceError) for o in outcomes), outcomes
        assert aconn.closed
        if use_threads and how == "close":
            # close() woke the receivers at once; the handle is closed by the receive's
            # thread when it stops, within a slice.
            await wait_until(lambda: aconn.connection.closed, "the thread closed the handle")
        assert aconn.connection.closed
        with pytest.raises(EOFError):
            peer.recv()


async def test_operations_after_close_raise_closed_resource_error(use_threads: bool) -> None:
    aconn, peer = asyncmp.Pipe(use_threads=use_threads)
    with peer:
        async with aconn:
            open_inside = not aconn.closed
        assert open_inside
        assert aconn.closed
        assert aconn.connection.closed
        calls: list[Callable[[], Awaitable[object]]] = [
            aconn.recv,
            aconn.recv_bytes,
            aconn.receive,
            lambda: aconn.send("x"),
            lambda: aconn.send_bytes(b"x"),
            aconn.send_eof,
            aconn.__anext__,  # closed is not the end of the stream: no StopAsyncIteration
        ]
        for call in calls:
            with pytest.raises(anyio.ClosedResourceError):
                await call()
        with pytest.raises(anyio.ClosedResourceError):
            aconn.recv_nowait()
        with pytest.raises(anyio.ClosedResourceError):
            aconn.fileno()
        await aconn.aclose()  # closing again is fine, either way
        aconn.close()
        assert "closed" in repr(aconn)
        with pytest.raises(EOFError):
            peer.recv()


async def test_wrapping_a_closed_connection_raises(use_threads: bool) -> None:
    reader, writer = multiprocessing.Pipe()
    reader.close()
    with writer:
        with pytest.raises(anyio.ClosedResourceError):
            AsyncConnection(reader, use_threads=use_threads)


# ---------------------------------------------------------------------------------------
# Concurrent callers
# ---------------------------------------------------------------------------------------


async def test_concurrent_receivers_are_served_first_come_first_served(
    use_threads: bool,
) -> None:
    size = 300 * KiB  # bigger than the socket buffer: each arrives in many reads
    payloads = [bytes([i]) * size for i in range(6)]
    got: list[tuple[int, bytes]] = []
    go = threading.Event()

    async with open_pipe(use_threads) as (aconn, peer):

        def send_all() -> None:
            go.wait(20)
            for payload in payloads:
                peer.send_bytes(payload)

        async def receiver(n: int) -> None:
            for _ in range(2):
                got.append((n, await aconn.recv_bytes()))

        with anyio.fail_after(20):
            async with peer_thread(send_all, abort=aconn.close):
                try:
                    async with anyio.create_task_group() as tg:
                        for n in range(3):
                            tg.start_soon(receiver, n)
                            await anyio.wait_all_tasks_blocked()
                        go.set()
                finally:
                    go.set()
    assert [(n, data[0], len(data)) for n, data in got] == [
        (0, 0, size),
        (1, 1, size),
        (2, 2, size),
        (0, 3, size),
        (1, 4, size),
        (2, 5, size),
    ]
    assert all(data == payloads[data[0]] for _, data in got), "a message came back torn"


@pytest.mark.parametrize("duplex", [True, False], ids=["socket", "pipe"])
async def test_concurrent_senders_send_whole_messages_in_order(
    use_threads: bool, duplex: bool
) -> None:
    payloads = [bytes([ord("A") + i]) * MiB for i in range(4)]
    reader, writer = multiprocessing.Pipe(duplex)
    go = threading.Event()
    with reader:
        async with AsyncConnection(writer, use_threads=use_threads) as aconn:

            def receive_all() -> list[bytes]:
                go.wait(20)
                return [reader.recv_bytes() for _ in payloads]

            with anyio.fail_after(20):
                async with peer_thread(receive_all, abort=aconn.close) as peer:
                    try:
                        async with anyio.create_task_group() as tg:
                            for payload in payloads:
                                tg.start_soon(aconn.send_bytes, payload)
                                # The first sender fills the buffer and waits mid-frame,
                                # the next ones wait their turn.
                                await anyio.wait_all_tasks_blocked()
                            go.set()
                    finally:
                        go.set()
            received = cast(list[bytes], peer.result)
    assert [(data[:1], len(data)) for data in received] == [(p[:1], MiB) for p in payloads]
    assert received == payloads, "messages were interleaved"


async def test_a_sender_cancelled_in_the_queue_sends_nothing_and_keeps_the_order(
    use_threads: bool,
) -> None:
    payloads = [bytes([ord("A") + i]) * MiB for i in range(3)]
    reader, writer = multiprocessing.Pipe()
    go = threading.Event()
    with reader:
        async with AsyncConnection(writer, use_threads=use_threads) as aconn:

            def receive_all() -> list[bytes]:
                go.wait(20)
                return [reader.recv_bytes() for _ in range(2)]

            middle = anyio.CancelScope()

            async def send_middle() -> None:
                with middle:
                    await aconn.send_bytes(payloads[1])

            with anyio.fail_after(20):
                async with peer_thread(receive_all, abort=aconn.close) as peer:
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(aconn.send_bytes, payloads[0])
                            await anyio.wait_all_tasks_blocked()  # mid-frame, holding the lock
                            tg.start_soon(send_middle)
                            await anyio.wait_all_tasks_blocked()
                            tg.start_soon(aconn.send_bytes, payloads[2])
                            await anyio.wait_all_tasks_blocked()
                            middle.cancel()
                            await anyio.wait_all_tasks_blocked()
                            go.set()
                    finally:
                        go.set()
                assert middle.cancelled_caught
                received = cast(list[bytes], peer.result)
            assert not reader.poll(0), "the cancelled message went out after all"
    assert received == [payloads[0], payloads[2]]


# ---------------------------------------------------------------------------------------
# Introspection and threads
# ---------------------------------------------------------------------------------------


async def test_introspection(use_threads: bool, route: str) -> None:
    async with open_pipe(use_threads) as (aconn, _peer):
        assert aconn.fileno() == aconn.connection.fileno()
        assert isinstance(aconn.connection, Connection)
        assert aconn.readable and aconn.writable
        assert aconn.uses_threads is use_threads
        text = repr(aconn)
        assert text.startswith("<asyncmp.AsyncConnection open")
        assert f"route={route}" in text
    assert repr(aconn).startswith("<asyncmp.AsyncConnection closed")


async def test_connection_threads_take_no_limiter_token(use_threads: bool) -> None:
    """A connection's threads (at most one per direction) are not counted by any limiter:
    with asyncmp's limiter and anyio's default one both full, it still receives and sends."""
    limiter = thread_limiter()
    default_limiter = anyio.to_thread.current_default_thread_limiter()
    saved = limiter.total_tokens, default_limiter.total_tokens
    holder = object()
    limiter.total_tokens = default_limiter.total_tokens = 1
    await limiter.acquire_on_behalf_of(holder)
    await default_limiter.acquire_on_behalf_of(holder)
    try:
        async with open_pipe(use_threads) as (aconn, peer):
            got: list[object] = []

            async def receive_one() -> None:
                got.append(await aconn.recv())

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(receive_one)
                    await anyio.wait_all_tasks_blocked()
                    await aconn.send("out")
                    assert peer.recv() == "out"
                    if use_threads:
                        assert {t.name for t in asyncmp_threads()} >= {"asyncmp-recv"}
                    else:
                        assert asyncmp_threads() == []
                    peer.send("in")
            assert got == ["in"]
            assert limiter.borrowed_tokens == default_limiter.borrowed_tokens == 1
    finally:
        limiter.release_on_behalf_of(holder)
        default_limiter.release_on_behalf_of(holder)
        limiter.total_tokens, default_limiter.total_tokens = saved


async def test_no_asyncmp_thread_outlives_aclose(use_threads: bool) -> None:
    async with open_pipe(use_threads) as (aconn, peer):
        for i in range(20):
            peer.send(i)
            assert await aconn.recv() == i
            await aconn.send(i)
            assert peer.recv() == i

        async def receive_until_closed() -> None:
            with pytest.raises(anyio.ClosedResourceError):
                await aconn.recv()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive_until_closed)
                await anyio.wait_all_tasks_blocked()
                assert bool(asyncmp_threads()) is use_threads
                await aconn.aclose()
        assert [t for t in asyncmp_threads() if t.is_alive()] == []


async def test_more_waiting_receives_than_the_thread_limit(use_threads: bool) -> None:
    """A coordinator with more workers than asyncmp's thread limit: every connection but
    the last waits for a message that doesn't come, and the last one still receives (on
    Windows every connection takes the thread route)."""
    pairs: list[tuple[AsyncConnection, Connection]] = []
    try:
        for _ in range(DEFAULT_THREAD_LIMIT + 2):
            pairs.append(asyncmp.Pipe(use_threads=use_threads))
        (last, last_peer) = pairs[-1]
        got: list[object] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for aconn, _ in pairs[:-1]:
                    tg.start_soon(aconn.recv)  # idle: nothing is sent to these
                await anyio.wait_all_tasks_blocked()
                last_peer.send("to the last one")
                got.append(await last.recv())
                tg.cancel_scope.cancel()
        assert got == ["to the last one"]
    finally:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for aconn, _ in pairs:
                    tg.start_soon(aconn.aclose)
        for _, peer in pairs:
            peer.close()
    assert [t for t in asyncmp_threads() if t.is_alive()] == []
