"""``asyncmp.connect`` and ``asyncmp.serve``: the stdlib's Client/Listener transport, awaited.

Peers are the stdlib's own ``Client`` and ``Listener``: in a plain thread of the test's, or
run by another Python (an md5-only one before 3.12, a negotiated-digest one since) through
``remote_peer.py``; or raw sockets that misbehave on purpose. Loopback addresses only.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import multiprocessing
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import asyncmp
from asyncmp import AsyncConnection, ConnectionEOF
from asyncmp._remote.auth import (
    CHALLENGE,
    FAILURE,
    WELCOME,
    answer_challenge,
    make_challenge,
    verify_response,
)

from .support import remote_peer
from .support.loops import FOREIGN_BACKENDS, assert_refused, from_another_loop

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="connect() and serve() are POSIX only"),
]

T = TypeVar("T")

KEY = b"asyncmp remote tests"
WRONG_KEY = b"not the key"
LOOPBACK = ("127.0.0.1", 0)
MiB = 1 << 20
PEER_SCRIPT = Path(remote_peer.__file__)
EXAMPLE = Path(__file__).parent.parent / "examples" / "remote_workers.py"
LOGGER = "asyncmp._remote"

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture
def unix_path() -> Iterator[str]:
    """A socket path in a fresh directory (short: a Unix socket path has ~100 bytes)."""
    directory = tempfile.mkdtemp(prefix="asyncmp-")
    try:
        yield os.path.join(directory, "s")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["AF_INET", "AF_UNIX"])
def address(request: pytest.FixtureRequest, unix_path: str) -> Any:
    """Where to listen: 127.0.0.1 with a port the system picks, or a Unix socket path."""
    return LOOPBACK if request.param == "AF_INET" else unix_path


class SyncPeer(Generic[T]):
    """A blocking function in a plain thread of the test's own, awaited without blocking."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._done_r, self._done_w = socket.socketpair()
        self._result: T | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-peer", daemon=True)

    def _run(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as exc:  # handed over by result()
            self._error = exc
        finally:
            self._done_w.send(b"\0")

    async def result(self, timeout: float = 10.0) -> T:
        """The function's return value (or its exception), once it is done."""
        with anyio.fail_after(timeout):
            await anyio.wait_readable(self._done_r)
        self.thread.join()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    async def close(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await anyio.wait_readable(self._done_r)
        self.thread.join(1)
        if not self.thread.is_alive():  # else a closed number could be reused under it
            self._done_r.close()
            self._done_w.close()


@contextlib.asynccontextmanager
async def sync_peer(fn: Callable[[], T]) -> AsyncIterator[SyncPeer[T]]:
    """Run *fn* in a thread during the block; the thread is joined on the way out."""
    peer = SyncPeer(fn)
    peer.thread.start()
    try:
        yield peer
    finally:
        await peer.close()


def stdlib_client(address: Any, authkey: bytes | None, *messages: Any) -> Any:
    """Connect with the stdlib, send *messages* at once, return the one reply."""
    with Client(address, authkey=authkey) as conn:
        for msg in messages:
            conn.send(msg)
        return conn.recv()


def frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read *n* bytes from a non-blocking *sock*, awaiting them (bounded)."""
    data = b""
    with anyio.fail_after(10):
        while len(data) < n:
            await anyio.wait_readable(sock)
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"EOF after {len(data)} of {n} bytes")
            data += chunk
    return data


async def recv_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("!i", await recv_exactly(sock, 4))
    return await recv_exactly(sock, size)


async def assert_serves_a_good_client(listener: Any) -> None:
    """A plain stdlib client that authenticates is accepted and served (after a bad one)."""
    async with sync_peer(lambda: stdlib_client(listener.address, KEY, "hi")) as good:
        async with await listener.accept() as conn:
            assert await conn.recv() == "hi"
            await conn.send("served")
        assert await good.result() == "served"


async def wait_for_eof(sock: socket.socket, timeout: float = 10.0) -> None:
    """Wait until the server closed *sock* (whatever it sent before is discarded)."""
    with anyio.fail_after(timeout):
        while True:
            await anyio.wait_readable(sock)
            try:
                if not sock.recv(65536):
                    return
            except ConnectionResetError:
                return


def raw_client(address: Any) -> socket.socket:
    family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(address)  # completes in the kernel: the listener's backlog takes it
    sock.setblocking(False)  # the test's own socket: read only when it is readable
    return sock


def exists(path: str) -> bool:
    return os.path.exists(path)


def mode_of_directory(path: str) -> int:
    return os.stat(os.path.dirname(path)).st_mode


def rejections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# ---------------------------------------------------------------------------------------
# Stdlib peers on either side
# ---------------------------------------------------------------------------------------


async def test_sync_client_against_async_server(address: Any) -> None:
    big = os.urandom(MiB)
    async with asyncmp.serve(address, authkey=KEY) as listener:
        # Sent right after the handshake: they may arrive with its last message, and must
        # not be lost; the big one shows the handshake's 256-byte limit is gone by then.
        messages = ("one", {"two": 2}, big)
        async with sync_peer(lambda: stdlib_client(listener.address, KEY, *messages)) as peer:
            async with await listener.accept() as conn:
                assert [await conn.recv() for _ in messages] == list(messages)
                await conn.send(("reply", len(big)))
                assert await peer.result() == ("reply", MiB)


async def test_async_client_against_sync_server(address: Any) -> None:
    family = "AF_INET" if isinstance(address, tuple) else "AF_UNIX"
    big = os.urandom(MiB)

    def serve_one(listener: Listener) -> object:
        with listener.accept() as conn:
            msg = conn.recv()
            conn.send(("echo", msg, big))
            try:
                return conn.recv()
            except EOFError:
                return "EOF"

    with Listener(address, family=family, authkey=KEY) as listener:
        async with sync_peer(lambda: serve_one(listener)) as peer:
            async with await asyncmp.connect(listener.address, authkey=KEY) as conn:
                await conn.send("hello")
                assert await conn.recv() == ("echo", "hello", big)
            assert await peer.result() == "EOF"


async def test_message_sent_with_the_last_handshake_message_is_kept(address: Any) -> None:
    # The client's last handshake message (its verdict on our answer) and its first
    # message go out in one write: one read on the server takes both, and the first
    # message must wait in the connection's decoder, not be lost.
    async with asyncmp.serve(address, authkey=KEY) as listener:
        with raw_client(listener.address) as sock:
            challenge = await recv_frame(sock)
            sock.sendall(frame(answer_challenge(KEY, challenge)))
            assert await recv_frame(sock) == WELCOME
            our_frame, our_message = make_challenge()
            sock.sendall(frame(our_frame))
            verify_response(KEY, our_message, await recv_frame(sock))
            sock.sendall(frame(WELCOME) + frame(pickle.dumps("first")))
            async with await listener.accept() as conn:
                assert await conn.recv() == "first"


async def test_async_client_against_async_server(address: Any) -> None:
    async with asyncmp.serve(address, authkey=KEY) as listener:
        async with await asyncmp.connect(listener.address, authkey=KEY) as client:
            async with await listener.accept() as server_side:
                await client.send("ping")
                assert await server_side.recv() == "ping"
                await server_side.send_bytes(b"pong")
                assert await client.recv_bytes() == b"pong"


def find_python(version: str) -> str | None:
    """An interpreter of *version* ('3.10') if one is installed: pyenv's, or on PATH."""
    pattern = os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python")
    found = sorted(glob.glob(pattern))
    return found[-1] if found else shutil.which(f"python{version}")


@pytest.fixture(
    params=[
        pytest.param("3.10", id="py3.10-md5-only"),
        pytest.param("3.13", id="py3.13-negotiated-digest"),
    ]
)
def other_python(request: pytest.FixtureRequest) -> tuple[str, tuple[int, int]]:
    version: str = request.param
    python = find_python(version)
    if python is None:
        pytest.skip(f"no Python {version} installed")
    major, minor = version.split(".")
    return python, (int(major), int(minor))


@contextlib.asynccontextmanager
async def peer_process(python: str, *args: str) -> AsyncIterator[anyio.abc.Process]:
    async with await anyio.open_process(
        [python, str(PEER_SCRIPT), *args], stdout=subprocess.PIPE
    ) as process:
        try:
            yield process
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()


async def read_line(stdout: BufferedByteReceiveStream) -> str:
    with anyio.fail_after(20):
        return (await stdout.receive_until(b"\n", 4096)).decode()


@pytest.mark.parametrize("same_key", [True, False], ids=["right-key", "wrong-key"])
async def test_other_python_client_against_async_server(
    other_python: tuple[str, tuple[int, int]], same_key: bool, caplog: pytest.LogCaptureFixture
) -> None:
    python, version = other_python
    authkey = KEY if same_key else WRONG_KEY
    async with asyncmp.serve(LOOPBACK, authkey=KEY) as listener:
        host, port = listener.address
        async with peer_process(python, "client", host, str(port), authkey.hex()) as process:
            assert process.stdout is not None
            stdout = BufferedByteReceiveStream(process.stdout)
            if same_key:
                with anyio.fail_after(20):
                    conn = await listener.accept()
                async with conn:
                    assert await conn.recv() == ("hello", version)
                    await conn.send(("welcome", version))
                    assert await conn.recv_bytes() == b"bye"
                assert await read_line(stdout) == repr(("welcome", version))
            else:
                assert await read_line(stdout) == "AuthenticationError"
        assert process.returncode == (0 if same_key else remote_peer.AUTH_FAILED)
    if not same_key:
        [message] = rejections(caplog)
        assert "digest received was wrong" in message


@pytest.mark.parametrize("same_key", [True, False], ids=["right-key", "wrong-key"])
async def test_async_client_against_other_python_server(
    other_python: tuple[str, tuple[int, int]], same_key: bool
) -> None:
    python, version = other_python
    async with peer_process(python, "server", KEY.hex()) as process:
        assert process.stdout is not None
        stdout = BufferedByteReceiveStream(process.stdout)
        port = int(await read_line(stdout))
        if same_key:
            async with await asyncmp.connect(("127.0.0.1", port), authkey=KEY) as conn:
                await conn.send("hi")
                assert await conn.recv() == ("echo", "hi", version)
        else:
            with pytest.raises(AuthenticationError, match="rejected"):
                await asyncmp.connect(("127.0.0.1", port), authkey=WRONG_KEY)
            assert await read_line(stdout) == "AuthenticationError"
    assert process.returncode == (0 if same_key else remote_peer.AUTH_FAILED)


# ---------------------------------------------------------------------------------------
# Bad peers: wrong keys, garbage, silence. None of them stops the server.
# ---------------------------------------------------------------------------------------


async def test_wrong_key_from_sync_client_is_dropped_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    async with asyncmp.serve(LOOPBACK, authkey=KEY) as listener:
        async with sync_peer(lambda: stdlib_client(listener.address, WRONG_KEY)) as bad:
            with pytest.raises(AuthenticationError, match="digest sent was rejected"):
                await bad.result()
        await assert_serves_a_good_client(listener)
    [message] = rejections(caplog)
    assert "AuthenticationError" not in message  # the message says what, not the class
    assert "digest received was wrong" in message


async def test_wrong_key_from_async_client(caplog: pytest.LogCaptureFixture) -> None:
    async with asyncmp.serve(LOOPBACK, authkey=KEY) as listener:
        with pytest.raises(AuthenticationError, match="digest sent was rejected"):
            await asyncmp.connect(listener.address, authkey=WRONG_KEY)
        async with await asyncmp.connect(listener.address, authkey=KEY) as client:
            async with await listener.accept() as conn:
                await client.send("after the bad one")
                assert await conn.recv() == "after the bad one"
    assert len(rejections(caplog)) == 1

    with Listener(LOOPBACK, authkey=KEY) as sync_listener:
        async with sync_peer(sync_listener.accept) as peer:
            with pytest.raises(AuthenticationError, match="digest sent was rejected"):
                await asyncmp.connect(sync_listener.address, authkey=WRONG_KEY)
            with pytest.raises(AuthenticationError, match="digest received was wrong"):
                await peer.result()


async def test_oversized_handshake_message_is_rejected_on_its_header(
    address: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The timeout is far away: only the header can explain a prompt drop.
    async with asyncmp.serve(address, authkey=KEY, handshake_timeout=60) as listener:
        with raw_client(listener.address) as sock:
            assert (await recv_frame(sock)).startswith(CHALLENGE)
            sock.sendall(struct.pack("!i", 1 << 30) + b"x" * 100)  # claims 1 GiB
            await wait_for_eof(sock)
        await assert_serves_a_good_client(listener)
    [message] = rejections(caplog)
    assert "1073741824" in message
    assert "256" in message


async def test_garbage_response_gets_failure_and_is_dropped(
    address: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with asyncmp.serve(address, authkey=KEY, handshake_timeout=60) as listener:
        with raw_client(listener.address) as sock:
            assert (await recv_frame(sock)).startswith(CHALLENGE)
            sock.sendall(frame(b"{sha256}" + b"\0" * 32))
            assert await recv_frame(sock) == FAILURE
            await wait_for_eof(sock)
        with raw_client(listener.address) as sock:
            assert (await recv_frame(sock)).startswith(CHALLENGE)
            sock.sendall(frame(b"GET / HTTP/1.1\r\n\r\n"))
            assert await recv_frame(sock) == FAILURE
            await wait_for_eof(sock)
        async with await asyncmp.connect(listener.address, authkey=KEY):
            async with await listener.accept():
                pass
    messages = rejections(caplog)
    assert len(messages) == 2
    assert "digest received was wrong" in messages[0]
    assert "neither a raw HMAC-MD5 nor prefixed" in messages[1]


@pytest.mark.parametrize(
    ("sent", "match"),
    [
        pytest.param(struct.pack("!i", 1 << 30), "1073741824", id="oversized"),
        pytest.param(struct.pack("!i", -5), "negative", id="bad-header"),
        pytest.param(frame(b"HTTP/1.1 400 Bad Request"), "expected a challenge", id="garbage"),
        pytest.param(frame(CHALLENGE + b"{md4}" + b"x" * 40), "no allowed digest", id="md4"),
    ],
)
async def test_client_rejects_bad_challenge(sent: bytes, match: str) -> None:
    with socket.create_server(LOOPBACK) as server_sock:
        outcome: list[BaseException] = []

        async def client() -> None:
            try:
                await asyncmp.connect(server_sock.getsockname(), authkey=KEY, handshake_timeout=60)
            except Exception as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(client)
            await anyio.wait_readable(server_sock)
            sock, _ = server_sock.accept()
            with sock:
                sock.sendall(sent)
                with anyio.fail_after(10):
                    await wait_for_eof(sock)  # the client hung up
        [exc] = outcome
        assert isinstance(exc, AuthenticationError)
        assert exc.args[0] and match in str(exc)


async def test_silent_peer_does_not_hold_up_others(address: Any) -> None:
    # No handshake timeout at all: the silent peer stays in its handshake forever, and
    # a good client is served meanwhile.
    async with asyncmp.serve(address, authkey=KEY, handshake_timeout=None) as listener:
        with raw_client(listener.address) as silent:
            assert (await recv_frame(silent)).startswith(CHALLENGE)
            await assert_serves_a_good_client(listener)
            # Still in its handshake, not dropped: no EOF for it yet.
            with pytest.raises(BlockingIOError):
                silent.recv(1)
        # Leaving serve() dropped it: see the leak check.


async def test_silent_peer_times_out(address: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with asyncmp.serve(address, authkey=KEY, handshake_timeout=0.2) as listener:
        with raw_client(listener.address) as silent:
            assert (await recv_frame(silent)).startswith(CHALLENGE)
            await wait_for_eof(silent)
        await assert_serves_a_good_client(listener)
    [message] = rejections(caplog)
    assert "did not complete the handshake within 0.2 s" in message


async def test_connect_times_out_on_a_silent_server() -> None:
    with socket.create_server(LOOPBACK) as silent:  # never even accepts
        with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
            await asyncmp.connect(silent.getsockname(), authkey=KEY, handshake_timeout=0.2)


async def test_connect_cancelled_in_handshake_leaves_nothing_open() -> None:
    with socket.create_server(LOOPBACK) as silent:
        with anyio.move_on_after(0.1) as scope:
            await asyncmp.connect(silent.getsockname(), authkey=KEY, handshake_timeout=None)
        assert scope.cancelled_caught
    # The leak check would find the connection's descriptor.


async def test_host_name_is_looked_up(anyio_backend: Any) -> None:
    if anyio_backend != "trio":
        # asyncio looks names up in its default executor, whose threads outlive the test.
        pytest.skip("the lookup's thread is only accounted for on trio")
    async with asyncmp.serve(("localhost", 0), authkey=KEY) as listener:
        host, port = listener.address
        assert host.startswith("127.")
        async with await asyncmp.connect(("localhost", port), authkey=KEY) as client:
            async with await listener.accept() as conn:
                await client.send("by name")
                assert await conn.recv() == "by name"


async def test_connect_errors(unix_path: str) -> None:
    with socket.create_server(LOOPBACK) as sock:
        free_address = sock.getsockname()  # nobody listens there once it is closed
    with pytest.raises(ConnectionRefusedError, match=r"127\.0\.0\.1"):
        await asyncmp.connect(free_address, authkey=KEY)
    with pytest.raises(FileNotFoundError):
        await asyncmp.connect(unix_path, authkey=KEY)


# ---------------------------------------------------------------------------------------
# Authkeys, trust and the bytes-only mode
# ---------------------------------------------------------------------------------------


async def test_tcp_requires_an_authkey() -> None:
    with pytest.raises(ValueError, match="needs an authkey"):
        await asyncmp.connect(("127.0.0.1", 1))
    with pytest.raises(ValueError, match="needs an authkey"):
        async with asyncmp.serve(LOOPBACK):
            pass
    with pytest.raises(ValueError, match="empty"):
        await asyncmp.connect(("127.0.0.1", 1), authkey=b"")
    with pytest.raises(TypeError, match="bytes"):
        await asyncmp.connect(("127.0.0.1", 1), authkey="text")  # type: ignore[arg-type]


async def test_unauthenticated_tcp_when_asked_for() -> None:
    async with asyncmp.serve(LOOPBACK, allow_unauthenticated=True) as listener:
        async with sync_peer(lambda: stdlib_client(listener.address, None, "hi")) as peer:
            async with await listener.accept() as conn:
                assert await conn.recv() == "hi"
                await conn.send("served")
            assert await peer.result() == "served"


async def test_unix_socket_needs_no_authkey(unix_path: str) -> None:
    async with asyncmp.serve(unix_path) as listener:
        async with await asyncmp.connect(unix_path) as client:
            async with await listener.accept() as conn:
                await client.send("hi")
                assert await conn.recv() == "hi"


@pytest.mark.parametrize("side", ["server", "client"])
async def test_bytes_only_connection_refuses_pickles(address: Any, side: str) -> None:
    async with asyncmp.serve(address, authkey=KEY, trusted=side != "server") as listener:
        async with await asyncmp.connect(
            listener.address, authkey=KEY, trusted=side != "client"
        ) as client:
            async with await listener.accept() as server_conn:
                untrusting, other = (
                    (server_conn, client) if side == "server" else (client, server_conn)
                )
                assert "bytes-only" in repr(untrusting)
                await other.send({"a": "pickle"})
                with pytest.raises(io.UnsupportedOperation, match="recv_bytes"):
                    await untrusting.recv()
                with pytest.raises(io.UnsupportedOperation):
                    untrusting.recv_nowait()
                with pytest.raises(io.UnsupportedOperation):
                    await untrusting.send("x")
                with pytest.raises(io.UnsupportedOperation):
                    async for _ in untrusting:
                        pass
                # The pickle is still there, as bytes, for a parser that trusts nothing.
                assert (await untrusting.recv_bytes()).startswith(b"\x80")
                await untrusting.send_bytes(b"raw")
                assert await other.recv_bytes() == b"raw"


# ---------------------------------------------------------------------------------------
# The listener's life
# ---------------------------------------------------------------------------------------


async def test_default_address_is_a_private_unix_path_removed_on_exit() -> None:
    async with asyncmp.serve() as listener:
        path = listener.address
        assert listener.family == "AF_UNIX"
        assert exists(path)
        assert mode_of_directory(path) & 0o077 == 0
        async with await asyncmp.connect(path):
            async with await listener.accept():
                pass
    assert not exists(path)


async def test_iteration_ends_when_closed_from_another_task(address: Any) -> None:
    steps: list[str] = []
    async with asyncmp.serve(address, authkey=KEY) as listener:
        taken: list[AsyncConnection] = []
        got_one = anyio.Event()

        async def take_all() -> None:
            async for conn in listener:
                taken.append(conn)
                got_one.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(take_all)
            async with await asyncmp.connect(listener.address, authkey=KEY):
                with anyio.fail_after(10):
                    await got_one.wait()
                await listener.aclose()  # take_all() returns
                steps.append("closed")  # closing cancels nothing of the caller's
            steps.append("iteration ended")
        assert listener.closed
        assert len(taken) == 1
        await taken[0].aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await listener.accept()
        steps.append("block done")
    assert steps == ["closed", "iteration ended", "block done"]
    if isinstance(address, str):
        assert not exists(address)


async def test_the_listener_refuses_another_loop(unix_path: str) -> None:
    """While this loop waits in ``accept()``, an ``accept()`` or ``aclose()`` from a loop in
    another thread raises RuntimeError at once (its accept waited on this loop's stream
    for ever); the listener stays open, and the next connection comes to this loop."""
    async with asyncmp.serve(unix_path) as listener:
        taken: list[AsyncConnection] = []

        async def take_one() -> None:
            taken.append(await listener.accept())

        async with anyio.create_task_group() as tg:
            tg.start_soon(take_one)
            await anyio.wait_all_tasks_blocked()
            for backend in FOREIGN_BACKENDS:
                for call in (listener.accept, listener.aclose):
                    outcome = await from_another_loop(call, backend)
                    assert_refused(outcome, "this AsyncListener")
            assert not listener.closed
            client = await asyncmp.connect(unix_path)
        async with client, taken[0] as server:
            await client.send("here")
            assert await server.recv() == "here"


async def test_error_in_the_block_comes_out_as_itself() -> None:
    with pytest.raises(KeyError, match="boom"):
        async with asyncmp.serve(LOOPBACK, authkey=KEY):
            raise KeyError("boom")


async def test_connections_nobody_took_are_closed_on_exit(unix_path: str) -> None:
    async with asyncmp.serve(unix_path) as listener:
        client = await asyncmp.connect(unix_path)
        # Wait until the listener has accepted it (no handshake on this Unix socket).
        with anyio.fail_after(10):
            while not listener._receive.statistics().current_buffer_used:
                await anyio.lowlevel.checkpoint()
    async with client:
        with pytest.raises(ConnectionEOF):
            await client.recv()


async def test_a_forked_child_does_not_keep_the_listener_open() -> None:
    ctx = multiprocessing.get_context("fork")
    # The child runs until this async end closes (a forked child holds no copy of it).
    hold, child_end = asyncmp.Pipe()
    async with asyncmp.serve(LOOPBACK, authkey=KEY) as listener:
        address = listener.address
        process = ctx.Process(target=remote_peer.wait_for_eof, args=(child_end,))
        process.start()
        child_end.close()
        # Only once the child runs its target has it closed what it inherited: a fork
        # copies the listening socket, and the child's fork hooks close that copy.
        with anyio.fail_after(10):
            assert await hold.recv_bytes() == b"ready"
    try:
        # The child still runs. Had it kept a copy of the listening socket, this would
        # connect (into its backlog) and then time out in the handshake.
        assert process.is_alive()
        with pytest.raises(ConnectionRefusedError):
            await asyncmp.connect(address, authkey=KEY, handshake_timeout=5)
    finally:
        await hold.aclose()
        aprocess = asyncmp.AsyncProcess(process)
        with anyio.fail_after(10):
            assert await aprocess.wait() == 0
        aprocess.close()


async def test_bad_arguments(unix_path: str) -> None:
    with pytest.raises(ValueError, match="AF_PIPE"):
        await asyncmp.connect(r"\\.\pipe\x")
    with pytest.raises(ValueError, match="family"):
        await asyncmp.connect(unix_path, family="AF_INET6")
    with pytest.raises(ValueError, match="host, port"):
        await asyncmp.connect(unix_path, family="AF_INET", authkey=KEY)
    with pytest.raises(ValueError, match="backlog"):
        async with asyncmp.serve(unix_path, backlog=0):
            pass
    with pytest.raises(ValueError, match="handshake_timeout"):
        async with asyncmp.serve(unix_path, handshake_timeout=0):
            pass
    assert not exists(unix_path)


async def test_address_in_use(unix_path: str) -> None:
    async with asyncmp.serve(unix_path) as listener:
        with pytest.raises(OSError, match="in use"):
            async with asyncmp.serve(unix_path):
                pass
        async with await asyncmp.connect(listener.address):  # still listening
            async with await listener.accept():
                pass


# ---------------------------------------------------------------------------------------
# The example
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["dial-in", "dial-out"])
async def test_example_remote_workers(topology: str, anyio_backend: Any) -> None:
    """Sync workers with the stdlib's Client (dial-in) or Listener (dial-out), one async
    coordinator; the example runs as a program, on this test's event-loop backend."""
    if isinstance(anyio_backend, tuple):
        backend = "uvloop" if anyio_backend[1] else anyio_backend[0]
    else:
        backend = anyio_backend
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, str(EXAMPLE), "--topology", topology, "--backend", backend],
            check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "3000 results from worker 0" in out
    assert "longest Collatz chain below 3001: 2919 (216 steps)" in out
