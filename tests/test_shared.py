"""``asyncmp.shared(obj)``: large buffers through shared memory, mapped on receipt, never leaked.

Every test here is wrapped in a segment check: the asyncmp segments in ``/dev/shm`` after
the test are the ones that were there before it (plus the leak check of conftest).
"""

from __future__ import annotations

import errno
import gc
import multiprocessing
import operator
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from multiprocessing.reduction import ForkingPickler
from types import FrameType
from typing import Any, ClassVar

import anyio
import pytest

import asyncmp
from asyncmp._pool import map as _pool_map
from asyncmp._pool import pickling as _pool_pickling
from asyncmp._shared import shared as _shared

from .support.shared_workers import (
    BIG,
    Blob,
    array_head,
    blob_digest,
    digest_or_echo,
    forward_from_queue,
    gated,
    install_gate,
    live_segment_bytes,
    make_blob,
    make_shared_blob,
    mapped,
    mapped_segments,
    mapping_modes,
    put_shared,
    receive_and_hold,
    receive_and_report,
    receive_then_send_shared,
    report_tracker_lock,
    segments,
    send_shared,
    send_then_wait_to_die,
    shared_4mib_blob,
    shared_blob_or_lock,
    write_then_look_again,
)
from .support.workers import MPContext

pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="lists segments in /dev/shm and /proc"
    ),
]
# The segment check sees every process's segments: a parallel run (nox -s tests) gives each
# test file to one worker, so these run one after the other; no other file makes segments.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_segment_left() -> Iterator[None]:
    before = segments()
    yield
    gc.collect()
    assert segments() - before == set()


def wait_gone(names: set[str], seconds: float = 20.0) -> None:
    """Wait (a generous no-hang bound) until none of *names* is in /dev/shm."""
    deadline = time.monotonic() + seconds
    while names & segments(every_program=True):
        left = names & segments(every_program=True)
        assert time.monotonic() < deadline, f"left in /dev/shm: {left}"
        time.sleep(0.02)


def roundtrip(obj: Any) -> Any:
    return pickle.loads(ForkingPickler.dumps(obj))


# -- in one process ------------------------------------------------------------------------


def test_large_buffer_arrives_mapped_and_intact() -> None:
    blob = make_blob()
    data = ForkingPickler.dumps(asyncmp.shared(blob))
    assert len(data) < 1024  # the buffer is not in the pickle
    (name,) = segments() - set()  # the segment exists, by name, until received
    out = pickle.loads(data)
    assert type(out) is Blob and out.label == blob.label
    assert mapped(out.buf) and not out.buf.readonly
    assert bytes(out.buf) == bytes(blob.buf)
    # Unlinked on receipt; the mapping lives while the object does.
    assert name not in segments()
    assert name in mapped_segments()
    del out
    gc.collect()
    assert name not in mapped_segments()


def test_small_buffers_stay_in_band() -> None:
    out = roundtrip(asyncmp.shared(make_blob(_shared.SHARED_THRESHOLD - 1)))
    assert type(out.buf) is bytearray
    assert not segments()


def test_buffers_a_pipe_moves_faster_stay_in_band() -> None:
    # Below about a megabyte a pipe moves the bytes faster than a new segment is made.
    out = roundtrip(asyncmp.shared(make_blob(512 * 1024)))
    assert type(out.buf) is bytearray
    assert not segments()


class CountingBuffer(bytearray):
    """A buffer exporter that records the protocols it is pickled with."""

    protocols: ClassVar[list[int]] = []

    def __reduce_ex__(self, protocol: Any) -> Any:
        CountingBuffer.protocols.append(protocol)
        return (CountingBuffer, (bytes(self),))


def test_small_buffer_exporters_are_pickled_once_as_without_shared() -> None:
    # An object exporting a buffer below the threshold (a small numpy array) is pickled
    # by the outer pickler itself, once: no trial pickling, no nested pickle.
    CountingBuffer.protocols.clear()
    out = pickle.loads(pickle.dumps(asyncmp.shared(CountingBuffer(b"abc" * 100)), protocol=2))
    assert (type(out), bytes(out)) == (CountingBuffer, b"abc" * 100)
    assert CountingBuffer.protocols == [2]
    assert not segments()


def test_objects_without_buffers_pickle_as_usual() -> None:
    value = {"a": [1, 2, 3], "b": b"x" * 1_000_000}
    assert roundtrip(asyncmp.shared(value)) == value
    assert not segments()


def test_several_buffers_keep_their_order_alignment_and_readonly() -> None:
    big_ro = Blob(bytes(make_blob(BIG + 3, 1).buf))
    small = make_blob(100, 2)
    big_rw = make_blob(BIG, 3)
    out = roundtrip(asyncmp.shared([big_ro, small, big_rw, "tail"]))
    assert [bytes(b.buf) for b in out[:3]] == [
        bytes(big_ro.buf),
        bytes(small.buf),
        bytes(big_rw.buf),
    ]
    assert out[3] == "tail"
    assert mapped(out[0].buf) and out[0].buf.readonly
    assert type(out[1].buf) is bytearray
    assert mapped(out[2].buf) and not out[2].buf.readonly
    # Both big buffers share one segment, each at an aligned offset.
    assert out[0].buf.obj is out[2].buf.obj
    del out
    gc.collect()
    assert not mapped_segments()


def test_every_pickling_makes_its_own_segment() -> None:
    wrapper = asyncmp.shared(make_blob())
    first, second = ForkingPickler.dumps(wrapper), ForkingPickler.dumps(wrapper)
    assert len(segments()) == 2
    a, b = pickle.loads(first), pickle.loads(second)
    assert a.buf.obj is not b.buf.obj
    # A reference received twice (the same bytes unpickled again): a clear error.
    with pytest.raises(asyncmp.SharedMemoryError, match="does not exist"):
        pickle.loads(first)


def test_numpy_array_arrives_without_owning_its_data() -> None:
    np = pytest.importorskip("numpy")
    arr = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
    out = roundtrip(asyncmp.shared(arr))
    assert out.flags.owndata is False
    assert (out == arr).all()


def test_large_bytes_are_refused_naming_how_to_share_them() -> None:
    # pickle copies bytes into the pickle (and can't pickle a memoryview): shared() would
    # gain nothing, and the mistake is caught where it is made.
    for data in (bytes(BIG), bytearray(BIG), memoryview(bytearray(BIG))):
        name = type(data).__name__
        with pytest.raises(TypeError, match=rf"^shared\(\) can't share a {name} of {BIG} bytes"):
            asyncmp.shared(data)
    with pytest.raises(TypeError, match=r"send numpy\.frombuffer\(data, numpy\.uint8\)"):
        asyncmp.shared(bytes(BIG))
    assert not segments()
    # What the message says to do works: the bytes arrive mapped.
    np = pytest.importorskip("numpy")
    out = roundtrip(asyncmp.shared(np.frombuffer(bytes(BIG), np.uint8)))
    assert out.flags.owndata is False and out.nbytes == BIG and not out.any()


def test_objects_with_nothing_to_share_are_returned_as_they_are() -> None:
    nothing: list[object] = [42, 1.5, 2j, True, None, "text" * BIG, b"small", bytearray(8)]
    for obj in nothing:
        assert asyncmp.shared(obj) is obj  # pickled exactly as without shared()


def test_names_fit_macos_limit() -> None:
    data = ForkingPickler.dumps(asyncmp.shared(make_blob()))
    (name,) = segments()
    assert len("/" + name) <= 31
    pickle.loads(data)


def test_macos_path_fills_through_a_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    # macOS can't write() to a shared memory object: it is sized, then filled mapped.
    monkeypatch.setattr(_shared, "FILL_BY_WRITE", False)
    writes = []
    monkeypatch.setattr(os, "pwrite", lambda *a: writes.append(a))
    blob = make_blob(BIG * 3 + 5)
    out = roundtrip(asyncmp.shared([make_blob(BIG, 2), blob]))
    assert writes == []
    assert bytes(out[1].buf) == bytes(blob.buf) and mapped(out[1].buf)


def test_windows_pickles_in_band(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_shared, "SHM", None)
    blob = make_blob()
    data = ForkingPickler.dumps(asyncmp.shared(blob))
    assert len(data) > BIG and not segments()
    out = pickle.loads(data)
    plain = pickle.loads(ForkingPickler.dumps(blob))  # as without shared()
    assert type(out.buf) is type(plain.buf) and bytes(out.buf) == bytes(blob.buf)


def test_full_dev_shm_is_a_clear_error_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(asyncmp.SharedMemoryError, match="shm-size") as info:
        ForkingPickler.dumps(asyncmp.shared(make_blob()))
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert not segments()


# -- hostile references --------------------------------------------------------------------


class Forged:
    """Unpickles as a call of asyncmp's rebuild with arguments of a test's choosing."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (_shared._rebuild, self.args)


@pytest.mark.parametrize(
    "name",
    [
        "/psm_0123456789abcdef",
        "/asyncmp-../../etc/passwd",
        "asyncmp-012345-0123456789ab",
        "/asyncmp-0123456789abcdef",
        42,
    ],
)
def test_foreign_name_is_refused_before_anything_is_opened(
    name: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[Any, ...]] = []
    assert _shared.SHM is not None
    real_open, real_unlink = _shared.SHM

    def watched_open(*args: Any) -> int:
        opened.append(args)
        return int(real_open(*args))

    monkeypatch.setattr(_shared, "SHM", (watched_open, real_unlink))
    data = pickle.dumps(Forged(name, BIG, ((0, BIG, False),), None, pickle.dumps(None)))
    with pytest.raises(asyncmp.SharedMemoryError, match="not the name of an asyncmp"):
        pickle.loads(data)
    assert opened == []


def test_size_larger_than_the_segment_maps_nothing() -> None:
    data = ForkingPickler.dumps(asyncmp.shared(make_blob()))
    (name,) = segments()
    # Claim ten times the segment's size.
    forged = pickle.dumps(
        Forged("/" + name, BIG * 10, ((0, BIG * 10, False),), None, pickle.dumps(None))
    )
    with pytest.raises(asyncmp.SharedMemoryError, match="fewer than"):
        pickle.loads(forged)
    assert not mapped_segments()
    assert name in segments()  # not unlinked either: the real message still arrives
    out = pickle.loads(data)
    assert mapped(out.buf)


@pytest.mark.parametrize(
    "layout",
    [(), ((0, BIG + 1, False),), ((-1, 10, False),), ((0, 10),), [(0, 10, False)], ((0, 10, 1),)],
)
def test_buffers_outside_the_segment_are_refused(layout: Any) -> None:
    # A name of the right form (no such segment): the layout is refused before any lookup.
    forged = pickle.dumps(Forged("/asyncmp-012345-0123456789ab", BIG, layout, None, b""))
    with pytest.raises(asyncmp.SharedMemoryError, match="buffer"):
        pickle.loads(forged)
    assert not mapped_segments()


# -- across processes ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_pipe_from_a_plain_worker_to_async_recv(mp_context: MPContext) -> None:
    aconn, child_end = asyncmp.Pipe()
    async with aconn:
        proc = mp_context.Process(target=send_shared, args=(child_end, BIG * 4, 5))
        proc.start()
        child_end.close()
        try:
            blob = await aconn.recv()
        finally:
            await anyio.to_thread.run_sync(proc.join)
        assert mapped(blob.buf) and blob.digest() == make_blob(BIG * 4, 5).digest()
        assert not segments()
        del blob


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["Queue", "SimpleQueue"])
async def test_queue_from_a_plain_worker_to_async_get(mp_context: MPContext, kind: str) -> None:
    q = getattr(mp_context, kind)()
    async with asyncmp.AsyncQueue(q) as aq:
        proc = mp_context.Process(target=put_shared, args=(q, BIG, 6))
        proc.start()
        try:
            blob = await aq.get()
        finally:
            await anyio.to_thread.run_sync(proc.join)
        assert mapped(blob.buf) and blob.digest() == make_blob(BIG, 6).digest()
        del blob


@pytest.mark.parametrize("kind", ["Pipe", "Queue", "SimpleQueue"])
def test_plain_sync_receive(mp_context: MPContext, kind: str) -> None:
    if kind == "Pipe":
        r, w = mp_context.Pipe(duplex=False)
        proc = mp_context.Process(target=send_shared, args=(w, BIG, 8))
        proc.start()
        w.close()
        blob = r.recv()
        r.close()
    else:
        q = getattr(mp_context, kind)()
        proc = mp_context.Process(target=put_shared, args=(q, BIG, 8))
        proc.start()
        blob = q.get()
        q.close()
        if kind == "Queue":
            q.join_thread()
    proc.join()
    assert mapped(blob.buf) and blob.digest() == make_blob(BIG, 8).digest()


@pytest.mark.anyio
async def test_async_senders_to_a_plain_worker(mp_context: MPContext) -> None:
    aconn, child_end = asyncmp.Pipe()
    async with aconn:
        proc = mp_context.Process(target=receive_and_report, args=(child_end,))
        proc.start()
        child_end.close()
        try:
            await aconn.send(asyncmp.shared(make_blob(BIG, 9)))
            digest, was_mapped, left = await aconn.recv()
        finally:
            await anyio.to_thread.run_sync(proc.join)
    assert (digest, was_mapped, left) == (make_blob(BIG, 9).digest(), True, [])

    q = mp_context.SimpleQueue()
    reply_r, reply_w = mp_context.Pipe(duplex=False)
    async with asyncmp.AsyncQueue(q) as aq:
        await aq.put(asyncmp.shared(make_blob(BIG, 10)))
        # The worker reads the queue through a plain get().
        proc = mp_context.Process(target=forward_from_queue, args=(q, reply_w))
        proc.start()
        reply_w.close()
        try:
            result = await anyio.to_thread.run_sync(reply_r.recv)
        finally:
            await anyio.to_thread.run_sync(proc.join)
            reply_r.close()
    assert result == (make_blob(BIG, 10).digest(), True)


# -- lifetime ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sender_killed_after_sending_message_still_arrives(mp_context: MPContext) -> None:
    aconn, child_end = asyncmp.Pipe()
    async with aconn:
        proc = mp_context.Process(target=send_then_wait_to_die, args=(child_end, BIG, 11))
        proc.start()
        child_end.close()
        try:
            # Read the "sent" marker only through the pipe's order: the blob comes first.
            frame = await aconn.recv_bytes()
            assert await aconn.recv() == "sent"
            proc.kill()
        finally:
            await anyio.to_thread.run_sync(proc.join)
        blob = pickle.loads(frame)
        assert mapped(blob.buf) and blob.digest() == make_blob(BIG, 11).digest()
        assert not segments()
        del blob


@pytest.mark.anyio
async def test_receiver_killed_while_holding_the_data_leaves_nothing(mp_context: MPContext) -> None:
    aconn, child_end = asyncmp.Pipe()
    async with aconn:
        proc = mp_context.Process(target=receive_and_hold, args=(child_end,))
        proc.start()
        child_end.close()
        try:
            await aconn.send(asyncmp.shared(make_blob(BIG, 12)))
            digest, was_mapped, held = await aconn.recv()
            assert was_mapped and len(held) == 1
            assert not segments()  # unlinked by name; only the child's mapping holds it
        finally:
            proc.kill()
            await anyio.to_thread.run_sync(proc.join)
    assert digest == make_blob(BIG, 12).digest()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_program_ending_with_messages_unread_leaves_nothing(method: str) -> None:
    before = segments(every_program=True)
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.shared_workers", method],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    made = set(result.stdout.split()) - before
    assert len(made) == 3  # while it ran, the three unread messages had their segments
    wait_gone(made)  # its resource tracker unlinks them once the program has ended


def test_forked_worker_that_exits_before_its_message_is_read() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.shared_workers", "late"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["same-tracker", "True", "mapped", "True"]
    assert "leaked" not in result.stderr


# -- forks -------------------------------------------------------------------------------------
# A process that holds received buffers, or whose threads send and receive shared objects,
# forks: a pool's replacement worker, a Process of its own.


def test_a_received_buffer_is_mapped_copy_on_write() -> None:
    out = roundtrip(asyncmp.shared(make_blob()))
    (name,) = mapped_segments()
    assert mapping_modes()[name] == "rw-p"  # private: its writes never reach the segment
    del out


def test_macos_path_maps_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    # macOS refuses a private mapping of a shared memory object: there it is mapped shared.
    monkeypatch.setattr(_shared, "MAP_COPY", False)
    out = roundtrip(asyncmp.shared(make_blob()))
    (name,) = mapped_segments()
    assert mapping_modes()[name] == "rw-s"
    out.buf[0] = 1  # still writable
    del out


def test_a_received_array_stays_private_across_fork() -> None:
    np = pytest.importorskip("numpy")
    arr = roundtrip(asyncmp.shared(np.zeros(BIG // 4, dtype=np.int64)))
    assert arr.flags.owndata is False and arr.flags.writeable
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=write_then_look_again, args=(arr, there, here))
    proc.start()
    there.close()
    try:
        assert here.poll(60)
        assert here.recv() == 999  # the child's own view sees its write
        assert arr[0] == 0  # the parent's doesn't
        arr[1] = 555  # the parent writes after the fork
        here.send("look")
        assert here.recv() == 0  # the child doesn't see that
    finally:
        here.close()  # a child still waiting for "look" gets EOF and ends
        proc.join()
    assert proc.exitcode == 0
    assert (arr[0], arr[1]) == (0, 555)
    del arr


def tracker_lock() -> Any:
    """The lock that the resource tracker's ensure_running() holds (a private name)."""
    from multiprocessing import resource_tracker

    return resource_tracker._resource_tracker._lock  # type: ignore[attr-defined]


def test_a_fork_while_another_thread_holds_the_tracker_lock_does_not_hang() -> None:
    # A thread that sends or receives a shared object holds the tracker's lock for a moment
    # (a Queue's feeder thread pickling one): a child forked in that moment used to inherit
    # it locked and hang at its first receive. Here a thread holds it until the fork has
    # happened, or until the fork hook is waiting for it.
    data = ForkingPickler.dumps(asyncmp.shared(make_blob(BIG, 15)))  # the tracker runs
    lock = tracker_lock()
    holding, release = threading.Event(), threading.Event()
    previous = sys.getprofile()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(120)

    def watch(frame: FrameType, event: str, arg: Any) -> None:  # in the forking thread
        code, module = frame.f_code.co_name, frame.f_globals.get("__name__")
        if event == "call" and code == "_before_fork" and module == _shared.__name__:
            sys.setprofile(previous)  # (not in the child)
            release.set()  # the hook takes the lock next: the fork waits for it

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    ctx = multiprocessing.get_context("fork")
    reply, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=receive_then_send_shared, args=(data, child_end))
    sys.setprofile(watch)
    try:
        proc.start()
    finally:
        sys.setprofile(previous)
        release.set()
        holder.join()
        child_end.close()
    try:
        assert reply.poll(60), "the forked child hangs in the resource tracker's lock"
        assert reply.recv() == make_blob(BIG, 15).digest()
        blob = reply.recv()
        assert mapped(blob.buf) and blob.digest() == make_blob(BIG, 16).digest()
        del blob
    finally:
        proc.kill()  # (a hung child); one that has ended is not signalled
        proc.join()
        reply.close()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10's tracker lock is not an RLock")
def test_a_thread_that_forks_holding_the_tracker_lock_keeps_it_on_both_sides() -> None:
    # (Only a signal handler or a finalizer would fork from inside ensure_running().)
    lock = tracker_lock()
    ctx = multiprocessing.get_context("fork")
    reply, child_end = ctx.Pipe(duplex=False)
    with lock:
        proc = ctx.Process(target=report_tracker_lock, args=(child_end,))
        proc.start()
        child_end.close()
        assert lock._recursion_count() == 1
    try:
        assert reply.poll(60)
        assert reply.recv() == 1  # the child's one thread holds it as the forking one did
    finally:
        proc.join()
        reply.close()
    assert lock.acquire(blocking=False)
    lock.release()


@pytest.mark.anyio
async def test_fork_pool_beside_a_thread_pickling_shared_arrays() -> None:
    # The production case: a Queue's feeder thread pickles shared() arrays while a fork
    # pool that retires each worker after one call forks replacements, each of which
    # receives a shared() argument. Each fork could catch the feeder thread in the
    # tracker's lock; the children used to hang within a few calls.
    np = pytest.importorskip("numpy")
    ctx = multiprocessing.get_context("fork")
    arr = np.arange(BIG // 4, dtype=np.float64) + 7  # 2 MiB: through shared memory
    q = ctx.Queue(2)
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            q.put(asyncmp.shared(arr))  # the feeder thread pickles it

    def consume() -> None:
        while q.get() is not None:
            pass  # received (unregistered with the tracker) and dropped

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    try:
        with anyio.fail_after(60):  # a no-hang bound: 24 calls take a few seconds
            async with asyncmp.open_pool(2, context=ctx, max_tasks_per_child=1) as pool:
                for _ in range(24):
                    assert await pool.run(array_head, asyncmp.shared(arr)) == (7.0, True)
    finally:
        stop.set()
        threads[0].join()
        q.put(None)
        threads[1].join()
        q.close()
        q.join_thread()


# -- connections to another machine ----------------------------------------------------------


@pytest.mark.anyio
async def test_network_connections_refuse_shared_both_ways(tmp_path: Any) -> None:
    address = str(tmp_path / "sock")
    async with asyncmp.serve(address) as listener:
        async with await asyncmp.connect(listener.address) as client:
            async with await listener.accept() as server_side:
                with pytest.raises(asyncmp.SharedMemoryError, match="one machine"):
                    await client.send(asyncmp.shared(make_blob()))
                assert not segments()
                # A reference sent as bytes (as a peer that does not refuse would).
                data = ForkingPickler.dumps(asyncmp.shared(make_blob()))
                await client.send_bytes(data)
                with pytest.raises(asyncmp.SharedMemoryError, match="one machine"):
                    await server_side.recv()
                assert not mapped_segments()
                # The connection goes on; shared memory is refused, not the rest.
                await client.send("still here")
                assert await server_side.recv() == "still here"
    pickle.loads(data)  # what the refused reference left, received here


# -- pools ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_pool_arguments_and_results_may_be_shared(mp_context: MPContext) -> None:
    async with asyncmp.open_pool(1, context=mp_context) as pool:
        digest, was_mapped = await pool.run(blob_digest, asyncmp.shared(make_blob(BIG, 13)))
        assert (digest, was_mapped) == (make_blob(BIG, 13).digest(), True)
        result = await pool.run(make_shared_blob, BIG, 14)
        assert type(result) is Blob and mapped(result.buf)
        assert result.digest() == make_blob(BIG, 14).digest()
        del result


def test_a_small_buffer_is_not_even_wrapped() -> None:
    small = bytearray(BIG - 1)
    assert asyncmp.shared(small) is small  # pickled exactly as without shared()
    assert asyncmp.shared(make_blob()) is not None
    wrapped: object = asyncmp.shared({"a": small})  # no buffer of its own: wrapped
    assert isinstance(wrapped, _shared.Shared)


@pytest.mark.anyio
async def test_pool_names_what_cant_be_pickled_without_pickling_shared_objects_again() -> None:
    async with asyncmp.open_pool(1) as pool:
        # The shared() argument itself: named, and no segment made.
        with pytest.raises(
            TypeError, match=r"^pool\.run\(fn, \*args\): args\[0\] \(a shared\(\) list\)"
        ):
            await pool.run(operator.is_, asyncmp.shared([make_blob(), threading.Lock()]), 1)
        assert not segments()
        # An argument after a shared() one: finding it pickles the shared() one no more,
        # and the segment the call's own pickling made before it failed is taken back.
        with pytest.raises(TypeError, match=r"^pool\.run\(fn, \*args\): args\[1\] \(of type _thr"):
            await pool.run(operator.is_, asyncmp.shared(make_blob()), threading.Lock())
        assert not segments()


def test_naming_what_cant_be_pickled_copies_no_shared_buffer() -> None:
    """Looking for the argument that can't be pickled tries a shared() one without
    copying its buffers into a pickle."""
    blob = make_blob(16 * BIG)
    args = (asyncmp.shared(blob), threading.Lock())
    cause = TypeError("cannot pickle '_thread.lock' object")
    tracemalloc.start()
    try:
        error = _pool_pickling.explain(cause, operator.is_, [args], None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(error).startswith("pool.run(fn, *args): args[1] (of type _thread.lock)")
    assert peak < 4 * BIG


async def _run_expecting(
    error: type[BaseException], pool: asyncmp.Pool, fn: Any, *args: Any
) -> None:
    with pytest.raises(error):
        await pool.run(fn, *args)


@pytest.mark.anyio
@pytest.mark.parametrize("stop", ["withdrawn", "pool-closes"])
async def test_a_run_call_never_sent_leaves_no_segment(stop: str) -> None:
    """A pool.run() call with a shared() argument that never reaches a worker (withdrawn
    while queued, or failed as the pool closes) leaves no segment behind."""
    before = segments()
    ours, theirs = asyncmp.Pipe()
    release, release_second = multiprocessing.Semaphore(0), multiprocessing.Semaphore(0)
    try:
        async with anyio.create_task_group() as outer:
            async with asyncmp.open_pool(
                1, initializer=install_gate, initargs=(theirs, release, release_second)
            ) as pool:
                closed = anyio.ClosedResourceError
                outer.start_soon(_run_expecting, closed, pool, gated, 0)  # holds the worker
                assert (await ours.recv())[0] == "started"
                if stop == "withdrawn":
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(pool.run, blob_digest, asyncmp.shared(make_blob(2 * BIG)))
                        await anyio.wait_all_tasks_blocked()
                        assert pool.statistics().calls_queued == 1
                        assert len(segments() - before) == 1
                        tg.cancel_scope.cancel()
                    assert pool.statistics().calls_queued == 0
                    assert segments() - before == set()
                else:
                    args = (asyncmp.shared(make_blob(2 * BIG)),)
                    outer.start_soon(_run_expecting, closed, pool, blob_digest, *args)
                    await anyio.wait_all_tasks_blocked()
                    assert pool.statistics().calls_queued == 1
                    del args
                # The block ends: the held worker is stopped, a queued call fails.
    finally:
        theirs.close()
        await ours.aclose()
    gc.collect()
    assert segments() - before == set()


ARRAYS = 12  # of 2 MiB each


@pytest.mark.anyio
async def test_a_map_cut_at_max_tasks_per_child_pickles_each_array_once() -> None:
    """A chunk cut at a worker's max_tasks_per_child sends the rest without pickling it
    again: a second pickle would make a second segment, never received."""
    before = segments()
    async with asyncmp.open_pool(2, max_tasks_per_child=3) as pool:
        items = [asyncmp.shared(make_blob(2 * BIG, seed)) for seed in range(ARRAYS)]
        results = [y async for y in pool.map(blob_digest, items)]
        assert results == [(make_blob(2 * BIG, seed).digest(), True) for seed in range(ARRAYS)]
        runs = [await pool.run(blob_digest, item) for item in items]
        assert runs == results
        del items, results, runs
    assert segments() - before == set()


@pytest.mark.anyio
async def test_a_result_that_cant_be_pickled_leaves_no_segment_of_the_others(
    mp_context: MPContext,
) -> None:
    """One result of a chunk can't be pickled: it fails alone, and the shared results
    beside it arrive, and no segment of a first try at pickling them is left."""
    before = segments()
    async with asyncmp.open_pool(1, context=mp_context) as pool:
        # Quick calls first, so that chunks have grown when the arrays come.
        items = [-1] * 500 + list(range(ARRAYS))
        results: list[Any] = []
        with pytest.raises(pickle.PicklingError, match="result of shared_blob_or_lock"):
            async for y in pool.map(shared_blob_or_lock, items):
                results.append(y)
        assert len(results) == 500 + 6
        assert [r.digest() for r in results[500:]] == [
            make_blob(2 * BIG, seed).digest() for seed in range(6)
        ]
        del results
    gc.collect()
    assert segments() - before == set()


@pytest.mark.anyio
async def test_an_item_that_cant_be_pickled_leaves_no_segment_of_the_others() -> None:
    """One item of a chunk can't be pickled: it fails at its place, and the shared items
    beside it are not left behind by a first try at pickling the chunk."""
    before = segments()
    async with asyncmp.open_pool(1) as pool:
        arrays: list[Any] = [asyncmp.shared(make_blob(2 * BIG, seed)) for seed in range(ARRAYS)]
        arrays[6] = (arrays[6], threading.Lock())
        items = [-1] * 500 + arrays
        results: list[Any] = []
        with pytest.raises(TypeError, match="pickle"):
            async for y in pool.map(digest_or_echo, items):
                results.append(y)
        assert results[500:] == [(make_blob(2 * BIG, seed).digest(), True) for seed in range(6)]
        del arrays, items
    gc.collect()
    assert segments() - before == set()


@pytest.mark.anyio
async def test_a_map_of_arrays_holds_a_bounded_amount_of_shared_memory() -> None:
    """However slowly the consumer goes, the arrays taken ahead of it (in /dev/shm or
    mapped by a worker) stay within the map's byte budget, plus one array."""
    size = 4 * BIG
    bound = _pool_map._AHEAD_BYTES + size
    peak = 0
    async with asyncmp.open_pool(2) as pool:
        items = (asyncmp.shared(make_blob(size, seed)) for seed in range(40))
        digests = []
        async for digest, was_mapped in pool.map(blob_digest, items):
            assert was_mapped
            digests.append(digest)
            peak = max(peak, live_segment_bytes())
            # A slow consumer: the pool may run as far ahead as it will meanwhile.
            await anyio.sleep(0.01)
            peak = max(peak, live_segment_bytes())
        assert digests == [make_blob(size, seed).digest() for seed in range(40)]
    print(f"peak {peak / BIG:.1f} MiB of shared memory, bound {bound / BIG:.1f} MiB")
    assert peak <= bound


@pytest.mark.anyio
async def test_a_map_of_shared_results_holds_a_bounded_amount_of_shared_memory() -> None:
    """Results in shared memory count against the same budget: however slowly the
    consumer goes, the results ahead of it stay within it, plus one, plus the one it
    holds."""
    size = 4 * BIG
    bound = _pool_map._AHEAD_BYTES + 2 * size
    peak = 0
    async with asyncmp.open_pool(2) as pool:
        digests = []
        async for blob in pool.map(shared_4mib_blob, range(40)):
            assert mapped(blob.buf)
            digests.append(blob.digest())
            peak = max(peak, live_segment_bytes())
            await anyio.sleep(0.01)  # a slow consumer, as above
            peak = max(peak, live_segment_bytes())
            del blob
        assert digests == [make_blob(size, seed % 4).digest() for seed in range(40)]
    print(f"peak {peak / BIG:.1f} MiB of shared memory, bound {bound / BIG:.1f} MiB")
    assert peak <= bound


@pytest.mark.anyio
@pytest.mark.parametrize("stop", ["aclose", "pool-closes"])
async def test_items_a_map_took_and_never_sent_leave_no_segment(stop: str) -> None:
    """The items a map took ahead and that were still queued when it stopped, or when
    the pool closed, leave no segment behind: no worker will ever receive them."""
    before = segments()
    ours, theirs = asyncmp.Pipe()
    release, release_second = multiprocessing.Semaphore(0), multiprocessing.Semaphore(0)
    try:
        async with asyncmp.open_pool(
            2, initializer=install_gate, initargs=(theirs, release, release_second)
        ) as pool:
            items = [asyncmp.shared(make_blob(2 * BIG, seed)) for seed in range(ARRAYS)]
            it = pool.map(gated, items)
            del items
            async with anyio.create_task_group() as tg:
                tg.start_soon(it.__anext__)
                # Both workers hold an item; the first step took two more, queued.
                started = {(await ours.recv())[1] for _ in range(2)}
                assert len(started) == 2
                assert pool.statistics().calls_queued == 2
                tg.cancel_scope.cancel()
            # With "pool-closes", the block ends now: the held workers are stopped, and
            # the queued calls fail.
            if stop == "aclose":
                await it.aclose()
                assert pool.statistics().calls_queued == 0
                for _ in range(2):
                    release.release()
                # Once a call has started on each worker, both are done with the items.
                async with anyio.create_task_group() as tg:
                    for i in range(2):
                        tg.start_soon(pool.run, gated, i, True)
                    assert len({(await ours.recv())[1] for _ in range(2)}) == 2
                    for _ in range(2):
                        release_second.release()
    finally:
        theirs.close()
        await ours.aclose()
    del it
    gc.collect()
    assert segments() - before == set()


@pytest.mark.anyio
async def test_items_sent_to_a_worker_that_ends_before_reading_them_leave_no_segment() -> None:
    """A chunk sent to a worker that never read it (stopped, then killed as the pool
    closes) leaves no segment behind: once the worker is gone, nobody will receive it."""
    before = segments()
    async with asyncmp.open_pool(1) as pool:
        pid = await pool.run(os.getpid)
        os.kill(pid, signal.SIGSTOP)  # it can't read the chunk; the pool's exit kills it
        it = pool.map(blob_digest, [asyncmp.shared(make_blob(2 * BIG, seed)) for seed in range(2)])
        async with anyio.create_task_group() as tg:
            tg.start_soon(it.__anext__)
            await anyio.wait_all_tasks_blocked()
            assert pool.statistics().calls_running == 1  # sent, in the pipe
            assert len(segments() - before) == 2  # the one sent, and the one queued
            tg.cancel_scope.cancel()
    del it
    gc.collect()
    assert segments() - before == set()


@pytest.mark.anyio
async def test_a_map_whose_worker_is_killed_leaves_no_segment() -> None:
    """The chunk that fails with WorkerExited leaves no segment behind, even the part that
    its worker never read: once the worker is gone, nobody will receive it."""
    before = segments()
    async with asyncmp.open_pool(1) as pool:
        pid = await pool.run(os.getpid)
        os.kill(pid, signal.SIGSTOP)  # it can't read the chunk
        items = [asyncmp.shared(make_blob(2 * BIG, seed)) for seed in range(2)]

        async def step() -> None:
            with pytest.raises(asyncmp.WorkerExited):
                await it.__anext__()

        async with pool.map(blob_digest, items) as it:
            del items
            async with anyio.create_task_group() as tg:
                tg.start_soon(step)
                await anyio.wait_all_tasks_blocked()
                assert pool.statistics().calls_running == 1  # sent, in the pipe
                assert len(segments() - before) == 2  # the one sent, and the one queued
                os.kill(pid, signal.SIGKILL)
        # The map stopped at the failure; its worker was reaped.
        assert segments() - before == set()
    gc.collect()
    assert segments() - before == set()


@pytest.mark.anyio
async def test_quick_calls_abandoned_in_a_killed_worker_leave_no_segment() -> None:
    """run() calls sent together to a worker, whose callers went away, leave no segment
    behind when that worker dies before it read them."""
    before = segments()
    async with asyncmp.open_pool(1) as pool:
        for _ in range(20):  # quick calls: the next ones are sent together
            pid = await pool.run(os.getpid)
        os.kill(pid, signal.SIGSTOP)  # it can't read them
        async with anyio.create_task_group() as tg:
            for seed in range(6):
                tg.start_soon(pool.run, blob_digest, asyncmp.shared(make_blob(BIG, seed)))
            await anyio.wait_all_tasks_blocked()
            assert pool.statistics().calls_running >= 2  # sent, in the pipe
            tg.cancel_scope.cancel()  # their callers go away
        os.kill(pid, signal.SIGKILL)
        assert await pool.run(os.getpid) != pid  # served once the dead worker is dealt with
        assert segments() - before == set()
    gc.collect()
    assert segments() - before == set()


@pytest.mark.anyio
@pytest.mark.parametrize("stop", ["raises", "cancelled"])
async def test_items_pickled_for_a_chunk_never_sent_leave_no_segment(
    stop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items pickled one by one for a chunk, when the async iterable raises or the step is
    cancelled before the chunk is whole, leave no segment behind once the map stops."""
    # Chunks grow to their byte bound (3 arrays) at the first result, however slow the
    # machine: the third array waits in a chunk for more when the iterable stops.
    monkeypatch.setattr(_pool_map, "_CHUNK_SECONDS", 1000.0)
    before = segments()
    waiting = anyio.Event()
    maps: list[Any] = []

    async def source() -> AsyncIterator[Any]:
        for seed in range(3):
            yield asyncmp.shared(make_blob(BIG, seed))
        if stop == "raises":
            raise RuntimeError("the source failed")
        waiting.set()
        await anyio.sleep_forever()

    async def consume(pool: asyncmp.Pool) -> None:
        async with pool.map(digest_or_echo, source()) as it:
            maps.append(it)
            async for _ in it:
                pass

    async with asyncmp.open_pool(1) as pool:
        if stop == "raises":
            with pytest.raises(RuntimeError, match="the source failed"):
                await consume(pool)
        else:
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, pool)
                await waiting.wait()
                assert len(maps[0]._pickled) == 1  # the third array, pickled, not sent
                tg.cancel_scope.cancel()
    maps.clear()
    gc.collect()
    assert segments() - before == set()
