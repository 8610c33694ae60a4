"""Other platforms' code paths, run on Linux.

Each difference between the platforms is decided in one place that a test can switch,
and the stand-ins of ``tests/support/platform_fakes.py`` play the other platform's objects:

* **Windows pipes** (``windows`` fixture): ``asyncmp._core.platform.POSIX_FDS`` is False, as on
  Windows, and waiting on a descriptor fails the test. Connections and queues then take
  the thread route with the Connection's own ``recv_bytes``/``send_bytes``, over fake
  message-mode ``PipeConnection`` ends that have no descriptor.
* **macOS ``Queue.qsize()``** raises ``NotImplementedError``: a queue that does.
* **kqueue** (``kqueue`` fixture): ``ReadinessWaiter`` opens its helper through
  ``asyncmp._core.readiness.KQUEUE``, here a kqueue stand-in built on epoll.
* **Proactor and selector event loops**: asyncio loops whose ``add_reader`` family raises
  ``NotImplementedError``, as ``ProactorEventLoop``'s does, and a plain
  ``SelectorEventLoop``.

The spawn start method (the default on macOS and Windows) is covered end to end by the
``mp_context`` tests of ``test_connection.py``, ``test_queue.py`` and ``test_process.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

import asyncmp
from asyncmp import AsyncConnection, AsyncProcess, AsyncQueue, ConnectionEOF, ProtocolError
from asyncmp._core import platform as _platform
from asyncmp._core import readiness as _readiness
from asyncmp._core.threads import thread_limiter

from .support import process_workers as pw
from .support.io import wait_until
from .support.platform_fakes import (
    KQ_EV_ADD,
    KQ_EV_CLEAR,
    KQ_EV_DELETE,
    KQ_EV_ONESHOT,
    KQ_FILTER_READ,
    KQ_FILTER_WRITE,
    FakeKqueueModule,
    FakePipeConnection,
    ProactorLikeEventLoop,
    as_connection,
    fake_pipe,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform != "linux", reason="plays other platforms on Linux"),
]

KiB = 1 << 10
MiB = 1 << 20
FORK: Any = multiprocessing.get_context("fork") if sys.platform != "win32" else None
KINDS = ["Queue", "JoinableQueue", "SimpleQueue"]


async def blocked() -> None:
    """Let every other task run until it waits (threads are not waited for)."""
    await anyio.wait_all_tasks_blocked()


# ---------------------------------------------------------------------------------------
# Windows: no descriptors, message-mode pipes
# ---------------------------------------------------------------------------------------


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take asyncmp's Windows decisions, and fail any wait on a descriptor."""
    monkeypatch.setattr(_platform, "POSIX_FDS", False)

    async def no_descriptors(obj: object) -> None:
        raise AssertionError(f"waited on descriptor {obj!r}: Windows has none to wait on")

    monkeypatch.setattr(anyio, "wait_readable", no_descriptors)
    monkeypatch.setattr(anyio, "wait_writable", no_descriptors)


@pytest.fixture
def fake_ends() -> Iterator[tuple[FakePipeConnection, FakePipeConnection]]:
    a, b = fake_pipe()
    yield a, b
    a.close()
    b.close()


@pytest.mark.usefixtures("windows")
async def test_windows_pipe_takes_the_thread_route_and_its_own_calls(
    fake_ends: tuple[FakePipeConnection, FakePipeConnection],
) -> None:
    a, peer = fake_ends
    with anyio.fail_after(10):
        async with AsyncConnection(as_connection(a)) as aconn:
            assert aconn.uses_threads
            assert "route=threads" in repr(aconn)
            assert aconn.fileno() == a.fileno()  # the handle, passed through untouched
            await aconn.send({"n": 1})
            await aconn.send_bytes(b"xraw!", 1, 3)
            # One message per send and nothing else: no length prefix of ours.
            assert a.sends == 2
            assert peer.recv() == {"n": 1}
            assert peer.recv_bytes() == b"raw"
            with pytest.raises(anyio.WouldBlock):
                aconn.recv_nowait()
            big = os.urandom(MiB)
            peer.send_bytes(big)
            peer.send_bytes(b"")
            peer.send("last")
            assert await aconn.recv_bytes() == big
            assert await aconn.recv_bytes() == b""
            assert aconn.recv_nowait() == "last"
            await aconn.send_eof()  # no half-close on a Windows pipe: nothing happens
            peer.send("still open")
            assert await aconn.recv() == "still open"
    assert a.closed
    assert not peer.closed


@pytest.mark.usefixtures("windows")
async def test_windows_peer_close_delivers_what_was_sent_then_eof(
    fake_ends: tuple[FakePipeConnection, FakePipeConnection],
) -> None:
    a, peer = fake_ends
    with anyio.fail_after(10):
        async with AsyncConnection(as_connection(a)) as aconn:
            peer.send(1)
            peer.send(2)
            peer.close()  # from here on the fake's poll() raises BrokenPipeError
            assert [msg async for msg in aconn] == [1, 2]
            with pytest.raises(ConnectionEOF):
                aconn.recv_nowait()
            with pytest.raises(ConnectionEOF):
                await aconn.recv()
            with pytest.raises(anyio.BrokenResourceError):
                await aconn.send("nobody reads")


@pytest.mark.usefixtures("windows")
async def test_windows_cancelled_receive_leaves_its_message_to_the_next(
    fake_ends: tuple[FakePipeConnection, FakePipeConnection],
) -> None:
    a, peer = fake_ends
    with anyio.fail_after(10):
        async with AsyncConnection(as_connection(a)) as aconn:
            for early in (False, True):
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(aconn.recv)
                        await blocked()
                        if early:
                            # Cancelled with the thread's receive still waiting.
                            scope.cancel()
                            peer.send("first")
                        else:
                            # Cancelled with the message on its way into the thread.
                            peer.send("first")
                            scope.cancel()
                peer.send("second")
                assert await aconn.recv() == "first"
                assert await aconn.recv() == "second"
                with pytest.raises(anyio.WouldBlock):
                    aconn.recv_nowait()


@pytest.mark.usefixtures("windows")
async def test_windows_close_wakes_a_waiting_receive() -> None:
    a, peer = fake_pipe()
    try:
        with anyio.fail_after(10):
            aconn = AsyncConnection(as_connection(a))
            async with anyio.create_task_group() as tg:

                async def receive() -> None:
                    with pytest.raises(anyio.ClosedResourceError):
                        await aconn.recv()

                tg.start_soon(receive)
                await blocked()
                await aconn.aclose()
        assert a.closed
    finally:
        peer.close()


@pytest.mark.usefixtures("windows")
async def test_windows_message_over_the_limit_is_a_protocol_error(
    fake_ends: tuple[FakePipeConnection, FakePipeConnection],
) -> None:
    a, peer = fake_ends
    with anyio.fail_after(10):
        async with AsyncConnection(as_connection(a), max_message_size=KiB) as aconn:
            peer.send_bytes(b"x" * KiB)
            assert await aconn.recv_bytes() == b"x" * KiB
            peer.send_bytes(b"x" * 200)
            with pytest.raises(ProtocolError, match="exceeds maxlength=100"):
                await aconn.recv_bytes(100)
            # The stream can't be trusted any more, whatever comes next.
            peer.send("fine")
            with pytest.raises(ProtocolError):
                await aconn.recv()
            with pytest.raises(anyio.BrokenResourceError):
                await aconn.send("no")


@pytest.mark.usefixtures("windows")
async def test_windows_one_way_pipe() -> None:
    reader, writer = fake_pipe(duplex=False)
    with anyio.fail_after(10):
        async with AsyncConnection(as_connection(reader)) as r:
            async with AsyncConnection(as_connection(writer)) as w:
                await w.send("across")
                assert await r.recv() == "across"
                with pytest.raises(OSError, match="read-only"):
                    await r.send("wrong way")
                with pytest.raises(OSError, match="write-only"):
                    await w.recv()


@pytest.mark.usefixtures("windows")
async def test_windows_refuses_the_fd_route(
    fake_ends: tuple[FakePipeConnection, FakePipeConnection],
) -> None:
    with pytest.raises(ValueError, match="use_threads=False"):
        AsyncConnection(as_connection(fake_ends[0]), use_threads=False)


@pytest.mark.usefixtures("windows")
async def test_windows_pipe_factory_and_worker_take_threads() -> None:
    """asyncmp.Pipe() and open_worker() on Windows' route: threads for the connection and
    for the process wait, the stdlib's own framing (a real Pipe here)."""
    aconn, peer = asyncmp.Pipe()
    with anyio.fail_after(20):
        async with aconn:
            assert aconn.uses_threads
            await aconn.send("ping")
            assert peer.recv() == "ping"
            peer.send_bytes(b"pong")
            assert await aconn.recv_bytes() == b"pong"
        peer.close()
        async with asyncmp.open_worker(pw.send_then_return, 3, context=FORK) as worker:
            assert worker.connection.uses_threads
            assert [msg async for msg in worker] == [0, 1, 2]
            assert await worker.process.wait() == 0


@pytest.mark.usefixtures("windows")
async def test_windows_process_wait_runs_in_a_thread() -> None:
    process = FORK.Process(target=pw.exit_with, args=(3,))
    process.start()
    try:
        with anyio.fail_after(20):
            assert await AsyncProcess(process).wait() == 3
    finally:
        process.join()
        process.close()


@pytest.mark.usefixtures("windows")
async def test_windows_pool_watches_its_workers_with_threads_the_limiter_does_not_count() -> None:
    """A pool watches each worker process for as long as it lives: on Windows' route in
    a thread each, which must not take the room that calls elsewhere need."""
    with anyio.fail_after(20):
        async with asyncmp.open_pool(1, context=FORK) as pool:
            pid = await pool.run(os.getpid)
            assert thread_limiter().borrowed_tokens == 0
            # The watch sees the idle worker's death: the pool replaces it.
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: pool.statistics().workers_replaced == 1, "replaced")
            assert await pool.run(os.getpid) != pid


# Queues ---------------------------------------------------------------------------------


def windows_queue(kind: str, maxsize: int = 0) -> Any:
    """A fork-context queue whose pipe is a fake Windows one: message-mode, no descriptor,
    a read end that is no ``Connection`` (a PipeConnection is its sibling)."""
    q: Any = getattr(FORK, kind)() if kind == "SimpleQueue" else getattr(FORK, kind)(maxsize)
    q._reader.close()
    q._writer.close()
    q._reader, q._writer = fake_pipe(duplex=False)
    if kind == "SimpleQueue":
        q._poll = q._reader.poll
    else:
        q._reset()  # picks up the new ends, as the Queue's constructor does
    return q


@pytest.fixture(params=KINDS)
async def win_queue(request: pytest.FixtureRequest, windows: None) -> AsyncIterator[Any]:
    q = windows_queue(request.param, maxsize=0 if request.param == "SimpleQueue" else 2)
    yield q
    q._reader.close()
    q._writer.close()


async def test_windows_queue_takes_the_thread_route_and_its_own_calls(win_queue: Any) -> None:
    q = win_queue
    bounded = not isinstance(q, multiprocessing.queues.SimpleQueue)
    with anyio.fail_after(10):
        async with AsyncQueue[Any](q) as aq:
            assert aq.uses_threads
            with pytest.raises(queue.Empty):
                aq.get_nowait()
            await aq.put({"n": 1})
            await aq.put("two")
            if bounded:
                with pytest.raises(queue.Full):
                    aq.put_nowait("three")
                with pytest.raises(queue.Full):
                    await aq.put("three", timeout=0.01)
            assert await aq.get() == {"n": 1}
            assert await aq.get_many(5) == ["two"]
            q.put("plain")
            assert await aq.get() == "plain"
            await aq.put("async")
            assert q.get() == "async"
            if isinstance(q, multiprocessing.queues.JoinableQueue):
                for _ in range(4):
                    aq.task_done()
                await aq.join()
            # Its thread goes on waiting (and would keep an item for the next get).
            with pytest.raises(queue.Empty):
                await aq.get(timeout=0.01)


async def test_windows_cancelled_get_leaves_its_item_to_the_next(win_queue: Any) -> None:
    with anyio.fail_after(10):
        async with AsyncQueue[Any](win_queue) as aq:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(aq.get)
                    await blocked()
                    scope.cancel()
            win_queue.put("kept")
            win_queue.put("next")
            assert await aq.get() == "kept"
            assert await aq.get() == "next"


async def test_windows_close_wakes_a_waiting_get(win_queue: Any) -> None:
    with anyio.fail_after(10):
        aq = AsyncQueue[Any](win_queue)
        async with anyio.create_task_group() as tg:

            async def get() -> None:
                with pytest.raises(anyio.ClosedResourceError):
                    await aq.get()

            tg.start_soon(get)
            await blocked()
            await aq.aclose()


@contextlib.asynccontextmanager
async def queue_adapter(*, use_threads: bool) -> AsyncIterator[AsyncQueue[Any]]:
    """asyncmp.Queue() with its pipe released on the way out."""
    aq = asyncmp.Queue(context=FORK, use_threads=use_threads)
    try:
        async with aq:
            yield aq
    finally:
        aq.queue._reader.close()
        aq.queue._writer.close()


# ---------------------------------------------------------------------------------------
# macOS: Queue.qsize() raises NotImplementedError
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
@pytest.mark.parametrize("kind", ["Queue", "JoinableQueue"])
async def test_macos_queue_without_qsize(
    monkeypatch: pytest.MonkeyPatch, kind: str, use_threads: bool
) -> None:
    q: Any = getattr(FORK, kind)(2)

    def qsize() -> int:
        raise NotImplementedError  # what sem_getvalue() makes of it on macOS

    monkeypatch.setattr(q, "qsize", qsize)
    try:
        with anyio.fail_after(10):
            async with AsyncQueue[Any](q, use_threads=use_threads) as aq:
                with pytest.raises(NotImplementedError):
                    aq.qsize()
                assert aq.empty()
                assert not aq.full()
                await aq.put(1)
                await aq.put(2)
                assert aq.full()
                with pytest.raises(queue.Full):
                    await aq.put(3, timeout=0.01)
                assert await aq.get() == 1
                assert await aq.get() == 2
                assert not aq.full()
                # A get cancelled while the item arrives: taken and kept, or not taken.
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(aq.get)
                        await blocked()
                        q.put(3)
                        scope.cancel()
                with pytest.raises(NotImplementedError):
                    aq.qsize()
                assert await aq.get() == 3
                assert aq.empty()
    finally:
        q._reader.close()
        q._writer.close()


# ---------------------------------------------------------------------------------------
# kqueue (macOS, BSD)
# ---------------------------------------------------------------------------------------


@pytest.fixture
def kqueue(monkeypatch: pytest.MonkeyPatch) -> FakeKqueueModule:
    """Have ReadinessWaiter use kqueue (the stand-in) instead of epoll."""
    module = FakeKqueueModule()
    api: _readiness.KqueueAPI = module  # the stand-in offers what asyncmp uses of select
    monkeypatch.setattr(_readiness, "KQUEUE", api)
    return module


def test_fake_kqueue_follows_kqueue_rules() -> None:
    """The stand-in's semantics, the ones asyncmp relies on and a few around them."""
    kq_module = FakeKqueueModule()
    r, w = os.pipe()
    kq = kq_module.kqueue()
    try:
        ev = kq_module.kevent
        kq.control([ev(r, KQ_FILTER_READ, KQ_EV_ADD)], 0, 0)
        assert kq.control(None, 4, 0) == []
        os.write(w, b"ab")
        # Level-triggered: reported again while the data is there.
        for _ in range(2):
            (event,) = kq.control(None, 4, 0)
            assert (event.ident, event.filter) == (r, KQ_FILTER_READ)
        kq.control([ev(r, KQ_FILTER_READ, KQ_EV_DELETE)], 0, 0)
        assert kq.control(None, 4, 0) == []
        with pytest.raises(FileNotFoundError):
            kq.control([ev(r, KQ_FILTER_READ, KQ_EV_DELETE)], 0, 0)
        kq.control([ev(r, KQ_FILTER_READ, KQ_EV_ADD | KQ_EV_ONESHOT)], 0, 0)
        assert len(kq.control(None, 4, 0)) == 1
        assert kq.control(None, 4, 0) == []  # one shot, and the registration is gone
        kq.control([ev(r, KQ_FILTER_READ, KQ_EV_ADD | KQ_EV_CLEAR)], 0, 0)
        assert len(kq.control(None, 4, 0)) == 1
        assert kq.control(None, 4, 0) == []  # reported once until something changes
        os.write(w, b"c")
        assert len(kq.control(None, 4, 0)) == 1
        kq.control([ev(r, KQ_FILTER_READ, KQ_EV_DELETE)], 0, 0)
        kq.control([ev(w, KQ_FILTER_WRITE, KQ_EV_ADD)], 0, 0)
        (event,) = kq.control(None, 4, 0)
        assert (event.ident, event.filter) == (w, KQ_FILTER_WRITE)
        with pytest.raises(OSError):
            kq.control([ev(1 << 30, KQ_FILTER_READ, KQ_EV_ADD)], 0, 0)  # EBADF
        with pytest.raises(ValueError):
            kq.control(None, -1, 0)
    finally:
        kq.close()
        os.close(r)
        os.close(w)
    assert kq.closed
    with pytest.raises(ValueError):
        kq.control(None, 1, 0)


def nonblocking_pipe() -> tuple[int, int]:
    """A pipe of the test's own: O_NONBLOCK on it harms nobody."""
    r, w = os.pipe()
    for fd in (r, w):
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return r, w


async def wait_in_task(tg: anyio.abc.TaskGroup, waiter: _readiness.ReadinessWaiter) -> list[str]:
    """Start ``waiter.wait()`` in a task; the list says ``"ready"`` or ``"closed"`` once it
    returned, and stays empty while it waits."""
    outcome: list[str] = []

    async def wait() -> None:
        try:
            await waiter.wait()
        except anyio.ClosedResourceError:
            outcome.append("closed")
        else:
            outcome.append("ready")

    tg.start_soon(wait)
    await blocked()
    return outcome


async def test_kqueue_waiter_reads(kqueue: FakeKqueueModule) -> None:
    r, w = nonblocking_pipe()
    try:
        waiter = _readiness.ReadinessWaiter(r)
        (kq,) = kqueue.opened
        assert kq.changes == [(r, KQ_FILTER_READ, KQ_EV_ADD)]
        assert waiter.fileno() == kq.fileno()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                outcome = await wait_in_task(tg, waiter)
                assert outcome == []  # nothing to read: still waiting
                os.write(w, b"x")
            assert outcome == ["ready"]
            await waiter.wait()  # level-triggered: ready while the byte is unread
            assert os.read(r, 1) == b"x"
            async with anyio.create_task_group() as tg:
                outcome = await wait_in_task(tg, waiter)
                assert outcome == []
                waiter.close()
            assert outcome == ["closed"]
        assert kq.closed
        with pytest.raises(anyio.ClosedResourceError):
            await waiter.wait()
    finally:
        os.close(r)
        os.close(w)


async def test_kqueue_waiter_writes(kqueue: FakeKqueueModule) -> None:
    r, w = nonblocking_pipe()
    try:
        waiter = _readiness.ReadinessWaiter(w, writable=True)
        assert kqueue.opened[0].changes == [(w, KQ_FILTER_WRITE, KQ_EV_ADD)]
        with anyio.fail_after(10):
            await waiter.wait()  # an empty pipe has room
            with pytest.raises(BlockingIOError):
                while True:
                    os.write(w, b"x" * 4096)
            async with anyio.create_task_group() as tg:
                outcome = await wait_in_task(tg, waiter)
                assert outcome == []  # full: still waiting
                with pytest.raises(BlockingIOError):
                    while True:
                        os.read(r, 65536)
            assert outcome == ["ready"]
        waiter.close()
        assert kqueue.opened[0].closed
    finally:
        os.close(r)
        os.close(w)


async def test_kqueue_connection_queue_and_process(kqueue: FakeKqueueModule) -> None:
    """The fd route end to end with kqueue helpers: a message bigger than the socket
    buffers (so the send waits for room), a queue, a worker's exit."""
    with anyio.fail_after(20):
        async with asyncmp.open_worker(pw.echo_until_eof, context=FORK) as worker:
            assert not worker.connection.uses_threads
            big = os.urandom(4 * MiB)
            await worker.send(big)
            assert await worker.recv() == big
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(worker.recv)
                    await blocked()
                    scope.cancel()
            await worker.send("after a cancelled receive")
            assert await worker.recv() == "after a cancelled receive"
        assert worker.process.exitcode == 0
        async with queue_adapter(use_threads=False) as aq:
            assert not aq.uses_threads
            await aq.put("item")
            assert await aq.get() == "item"
            got: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def get() -> None:
                    got.append(await aq.get())

                tg.start_soon(get)
                await blocked()
                await aq.put("wakes the get")
            assert got == ["wakes the get"]
    filters = {change[1] for kq in kqueue.opened for change in kq.changes}
    assert filters == {KQ_FILTER_READ, KQ_FILTER_WRITE}
    assert all(kq.closed for kq in kqueue.opened)


# ---------------------------------------------------------------------------------------
# Windows' Proactor loop and a plain selector loop (asyncio only)
# ---------------------------------------------------------------------------------------


def _proactor() -> asyncio.AbstractEventLoop:
    return ProactorLikeEventLoop()


def test_posix_routes_under_a_proactor_like_loop() -> None:
    """The fd routes, a process wait and serve()/connect() under a loop that refuses
    add_reader: anyio waits in a selector thread of its own. In a fresh interpreter: that
    thread, once started, would hang this one at exit after its next fork (see the script)."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.proactor_scenarios"],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


class TestEventLoops:
    """Windows' routes under a Proactor-like loop, and the POSIX ones under a plain
    SelectorEventLoop (the one Windows users may pick instead of the Proactor)."""

    @pytest.fixture(
        scope="class",
        params=[
            pytest.param(("asyncio", {"loop_factory": _proactor}), id="proactor-like"),
            pytest.param(("asyncio", {"loop_factory": asyncio.SelectorEventLoop}), id="selector"),
        ],
    )
    @classmethod
    def anyio_backend(cls, request: pytest.FixtureRequest) -> object:
        return request.param

    @pytest.mark.parametrize("use_threads", [False, True], ids=["fd", "threads"])
    async def test_connection_queue_and_process(
        self, anyio_backend: Any, use_threads: bool
    ) -> None:
        if anyio_backend[1]["loop_factory"] is _proactor:
            pytest.skip("in a fresh interpreter: test_posix_routes_under_a_proactor_like_loop")
        with anyio.fail_after(20):
            async with asyncmp.open_worker(pw.echo_until_eof, context=FORK) as worker:
                big = os.urandom(4 * MiB)
                await worker.send(big)
                assert await worker.recv() == big
                async with anyio.create_task_group() as tg:

                    async def receive_then_close() -> None:
                        with pytest.raises(anyio.ClosedResourceError):
                            await worker.recv()

                    tg.start_soon(receive_then_close)
                    await blocked()
                    await worker.connection.aclose()
                assert await worker.process.wait() == 0
            async with queue_adapter(use_threads=use_threads) as aq:
                await aq.put("item")
                assert await aq.get() == "item"

    async def test_remote_connection(self, anyio_backend: Any) -> None:
        if anyio_backend[1]["loop_factory"] is _proactor:
            pytest.skip("in a fresh interpreter: test_posix_routes_under_a_proactor_like_loop")
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                listener = await tg.start(_serve_echo)
                async with await asyncmp.connect(listener, authkey=b"key") as conn:
                    await conn.send("over tcp")
                    assert await conn.recv() == "over tcp"
                tg.cancel_scope.cancel()

    @pytest.mark.usefixtures("windows")
    async def test_windows_routes_never_wait_on_a_descriptor(
        self, fake_ends: tuple[FakePipeConnection, FakePipeConnection]
    ) -> None:
        a, peer = fake_ends
        with anyio.fail_after(10):
            async with AsyncConnection(as_connection(a)) as aconn:
                peer.send("hi")
                assert await aconn.recv() == "hi"
                await aconn.send("back")
                assert peer.recv() == "back"
            q = windows_queue("Queue")
            try:
                async with AsyncQueue[Any](q) as aq:
                    await aq.put(1)
                    assert await aq.get() == 1
            finally:
                q._reader.close()
                q._writer.close()


async def _serve_echo(*, task_status: anyio.abc.TaskStatus[Any]) -> None:
    async with asyncmp.serve(("127.0.0.1", 0), authkey=b"key") as listener:
        task_status.started(listener.address)
        async for conn in listener:
            async with conn:
                await conn.send(await conn.recv())
