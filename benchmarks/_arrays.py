"""7. Large arrays: ``asyncmp.shared()`` against pickling them through the pipe.

One worker process, a plain sync ``multiprocessing`` one (fork), holds a numpy array of
each size and sends it to the async parent when told to "go"; every trial is one array,
and its time runs from the parent's "go" to the array in hand, every page of it read once
(the contents are checked on every page). Reading each page is part of having the array:
a mapped array's pages are faulted in on first touch, where a copied one's were touched
while it was copied. The contenders, one at a time, each array freed before the next:

* ``shared(arr)`` sent with ``conn.send()`` on a ``Pipe()`` (socketpair) and received with
  asyncmp's ``await conn.recv()``, and put with ``Queue.put()`` and taken with asyncmp's
  ``await AsyncQueue.get()``, on each event loop;
* the anchor: the same array pickled through the pipe, ``conn.send(arr)`` received with
  asyncmp's ``await conn.recv()`` (asyncio);
* a raw copy of the same bytes through the socketpair, no framing and no pickle, read
  with ``os.readv()`` into a buffer allocated and touched beforehand;
* a ``memcpy`` of the same bytes in one process (the worker), into a buffer allocated and
  touched beforehand: the physical limit.

While an asyncmp contender receives, a heartbeat task sleeps 1 ms at a time and records
the longest interval between its wake-ups (the loop's worst stall as a user sees it,
scheduling noise included) and the most CPU time the loop thread spent within one
interval (the stall the receiving code itself causes). It stops when the array is in
hand, before its pages are read: reading them is the user's work, not the receive's.

Small messages: numpy arrays of 100 bytes to 64 KiB sent with ``conn.send()`` one after
the other, with and without ``shared()``, received with asyncmp's ``recv()``: below the
size at which buffers go into shared memory, ``shared()`` must cost nothing.

Memory: the worker holds one array of each size for the whole section (1.25 GiB in the
full run); a trial adds at most about two more copies of one array (a pickled 1 GiB array
is a 1 GiB pickle in the worker, and a 1 GiB buffer then a 1 GiB array in the parent), and
frees them before the next starts.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from time import perf_counter, thread_time
from typing import Any

import anyio
import numpy as np
from _cases import Impl, Timing, _dup, read_exactly, run_on, since, start_timing, time_awaits
from _report import Table, Target, Value, play_round, series_of, trial_size
from _worker import answer, serve, stop

__all__ = ("ArrayWorker", "array_tables")

Connection = multiprocessing.connection.Connection

#: The array sizes of the full run, and of a quick one.
SIZES = (256 << 20, 1 << 30)
QUICK_SIZES = (16 << 20, 64 << 20)
#: The small messages: numpy arrays of these many bytes.
SMALL_SIZES = (100, 4 << 10, 64 << 10)
#: The heartbeat's sleep while an asyncmp contender receives.
BEAT = 0.001
PAGE = 4096
#: The contents: every array is this pattern repeated (251 is prime: no page repeats it).
_PERIOD = 251
#: How long the parent waits for the worker's answer before it calls the run broken.
_ANSWER_TIMEOUT = 120.0

#: The targets of the issue: shared() against the anchor, the raw copy, memcpy; the loop.
SPEEDUP_VS_PICKLED = 5.0
WITHIN_MEMCPY = 3.0
MAX_GAP_MS = 5.0


def _pattern(size: int) -> Any:
    return np.resize(np.arange(_PERIOD, dtype=np.uint8), size)


def _expected_pages(size: int) -> Any:
    """What reading one byte per page of a *size*-byte array gives."""
    return (np.arange(0, size, PAGE, dtype=np.int64) % _PERIOD).astype(np.uint8)


def _read_pages(arr: Any, size: int, expected: Any) -> None:
    """Read one byte of every page (faulting in a mapped array), and check them."""
    if arr.nbytes != size or not np.array_equal(arr[::PAGE], expected):
        raise AssertionError(f"the {size}-byte array arrived damaged")


# ---------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _copy_into_fresh_segment(src: Any) -> float:
    """Seconds to create a POSIX shared-memory segment and write *src* into it (with
    ``pwrite``, the fastest way in, which needs no page fault): what any ``shared()`` that
    gives each message a segment of its own must at least do. Its pages are new, so the
    system allocates and accounts each one, 4 KiB at a time, as it is first written."""
    path = f"/dev/shm/asyncmp-bench-{os.getpid()}"
    view = memoryview(src).cast("B")
    t0 = perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, len(view))
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done : done + (64 << 20)], done)
        seconds = perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return seconds


class _Sender:
    """The worker's side: the arrays, and the commands that send them."""

    def __init__(self, sock: Connection, q: Any) -> None:
        self._sock = sock
        self._q = q
        self._arrays: dict[int, Any] = {}

    def run(self, cmd: tuple[Any, ...]) -> Any:
        """Run *cmd*; what it measured, if anything."""
        kind, sock, q, arrays = cmd[0], self._sock, self._q, self._arrays
        if kind == "prepare":
            self._arrays = {size: _pattern(size) for size in cmd[1]}
        elif kind == "shared":  # (kind, transport, size, module)
            shared = sys.modules[cmd[3]].shared
            if cmd[1] == "queue":
                q.put(shared(arrays[cmd[2]]))
            else:
                sock.send(shared(arrays[cmd[2]]))
        elif kind == "pickled":
            sock.send(arrays[cmd[1]])
        elif kind == "raw":
            _write_all(sock.fileno(), memoryview(arrays[cmd[1]]).cast("B"))
        elif kind == "memcpy":
            src = arrays[cmd[1]]
            dst = np.empty_like(src)
            dst.fill(1)  # every page faulted in before the clock starts
            t0 = perf_counter()
            np.copyto(dst, src)
            seconds = perf_counter() - t0
            del dst
            return seconds
        elif kind == "fresh-shm":
            return _copy_into_fresh_segment(arrays[cmd[1]])
        elif kind == "stream":  # (kind, size, count, module or None)
            obj = _pattern(cmd[1])
            send = sock.send
            if cmd[3] is None:
                for _ in range(cmd[2]):
                    send(obj)
            else:
                shared = sys.modules[cmd[3]].shared
                for _ in range(cmd[2]):
                    send(shared(obj))
        else:
            raise ValueError(f"unknown command {kind!r}")
        return None


def _worker_main(ctrl: Connection, sock: Connection, q: Any, parent_ends: list[Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for conn in parent_ends:
        conn.close()
    q.cancel_join_thread()  # at exit, an item nobody reads must not keep the worker
    serve(ctrl, _Sender(sock, q).run)


class ArrayWorker:
    """The parent's handle on the worker, its socketpair and its Queue."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.ctrl, child_ctrl = ctx.Pipe()
        self.sock, child_sock = ctx.Pipe()  # duplex: a socketpair, the stdlib default
        self.queue = ctx.Queue()
        self._process = ctx.Process(
            target=_worker_main,
            args=(child_ctrl, child_sock, self.queue, [self.ctrl, self.sock]),
            name="asyncmp-bench-arrays",
            daemon=True,
        )
        try:
            self._process.start()
        finally:
            child_ctrl.close()
            child_sock.close()

    def parent_ends(self) -> list[Connection]:
        """This process's ends: a process forked later must close its copies."""
        return [self.ctrl, self.sock, self.queue._reader]

    def go(self, cmd: tuple[Any, ...]) -> None:
        self.ctrl.send(cmd)

    def finish(self) -> Any:
        """The worker's answer to the command in progress (what it measured, if anything)."""
        return answer(self.ctrl, "the array worker", _ANSWER_TIMEOUT)

    def run(self, cmd: tuple[Any, ...]) -> Any:
        self.go(cmd)
        return self.finish()

    def close(self) -> None:
        """Stop the worker and reap it. Safe to call more than once, and after Ctrl-C."""
        stop(self._process, self.ctrl, self.sock, grace=10.0)
        self.queue._reader.close()
        self.queue._writer.close()


# ---------------------------------------------------------------------------------------
# The contenders
# ---------------------------------------------------------------------------------------

#: (seconds from "go" to the array in hand, CPU seconds of this process, worst interval
#: between heartbeats, most loop-thread CPU within one interval), the last two None for
#: the contenders without an event loop.
Result = tuple[float, float, float | None, float | None]


class Heartbeat:
    """Sleeps ``BEAT`` at a time and records the loop's longest interval between beats,
    and the most CPU time the loop thread spent within one."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self._last = (perf_counter(), thread_time())

    def _beat(self) -> None:
        now = (perf_counter(), thread_time())
        self.wall = max(self.wall, now[0] - self._last[0])
        self.cpu = max(self.cpu, now[1] - self._last[1])
        self._last = now

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self._last = (perf_counter(), thread_time())
        task_status.started()
        while True:
            await anyio.sleep(BEAT)
            self._beat()

    def stop(self) -> tuple[float, float]:
        self._beat()  # the interval in progress counts too
        return self.wall, self.cpu


async def _receive(
    worker: ArrayWorker, cmd: tuple[Any, ...], size: int, expected: Any, recv: Any
) -> Result:
    """Say "go", await *recv*, stop the heartbeat, then read every page."""
    heart = Heartbeat()
    async with anyio.create_task_group() as tg:
        await tg.start(heart.run)
        t0 = start_timing()
        worker.go(cmd)
        arr = await recv()
        wall, cpu = heart.stop()
        tg.cancel_scope.cancel()
    _read_pages(arr, size, expected)
    seconds, cpu_seconds = since(t0)
    del arr
    worker.finish()
    return seconds, cpu_seconds, wall, cpu


async def _via_pipe(
    cls: type[Any], worker: ArrayWorker, cmd: tuple[Any, ...], size: int, expected: Any
) -> Result:
    async with cls(_dup(worker.sock)) as aconn:
        return await _receive(worker, cmd, size, expected, aconn.recv)


async def _via_queue(
    cls: type[Any], worker: ArrayWorker, cmd: tuple[Any, ...], size: int, expected: Any
) -> Result:
    aq = cls(worker.queue)
    try:
        return await _receive(worker, cmd, size, expected, aq.get)
    finally:
        await aq.aclose()
        worker.queue._closed = False  # aclose() closed the queue in this process: reopen


def _raw(worker: ArrayWorker, size: int, expected: Any) -> Result:
    fd = worker.sock.fileno()
    arr = np.ones(size, dtype=np.uint8)  # allocated and touched before the clock starts
    view = memoryview(arr).cast("B")
    t0 = start_timing()
    worker.go(("raw", size))
    read_exactly(fd, view)
    _read_pages(arr, size, expected)
    seconds, cpu_seconds = since(t0)
    worker.finish()
    view.release()
    return seconds, cpu_seconds, None, None


def _memcpy(worker: ArrayWorker, size: int, expected: Any) -> Result:
    seconds = worker.run(("memcpy", size))
    return seconds, 0.0, None, None


def _fresh_shm(worker: ArrayWorker, size: int, expected: Any) -> Result:
    seconds = worker.run(("fresh-shm", size))
    return seconds, 0.0, None, None


def _module_of(impl: Impl) -> str:
    """The package an asyncmp copy was imported as: the worker finds its shared() there."""
    return str(impl.cls.__module__).partition(".")[0]


@dataclass(frozen=True)
class ArrayContender:
    key: str
    label: str
    backend: str | None
    family: str
    #: (worker, size, the bytes expected on each page) -> its result
    trial: Callable[[ArrayWorker, int, Any], Result]
    #: "shared", "pickled", "raw", "memcpy" or "floor"
    role: str


def _array_contenders(backends: tuple[str, ...], impls: tuple[Impl, ...]) -> list[ArrayContender]:
    found: list[ArrayContender] = []
    for impl in impls:
        module = _module_of(impl)
        if not hasattr(sys.modules.get(module), "shared"):
            continue  # a candidate from before shared()
        routes = [("pipe", "Pipe: await conn.recv()", _via_pipe, impl.cls, "socket")]
        if impl.queue_cls is not None:
            routes.append(("queue", "Queue: await aq.get()", _via_queue, impl.queue_cls, "queue"))
        for route, how, via, cls, transport in routes:
            found += [
                ArrayContender(
                    f"{impl.name}-{route}-{b}",
                    f"{impl.name} shared(), {how} [{b}]",
                    b,
                    impl.family,
                    lambda w, size, exp, b=b, via=via, cls=cls, t=transport, m=module: run_on(
                        b, via, cls, w, ("shared", t, size, m), size, exp
                    ),
                    "shared",
                )
                for b in backends
            ]
    anchor = "asyncio" if "asyncio" in backends else backends[0]
    found.append(
        ArrayContender(
            "pickled",
            f"pickled, Pipe: asyncmp await conn.recv() [{anchor}]",
            anchor,
            "sync",
            lambda w, size, exp: run_on(
                anchor, _via_pipe, impls[0].cls, w, ("pickled", size), size, exp
            ),
            "pickled",
        )
    )
    found.append(
        ArrayContender(
            "raw",
            "raw socketpair copy into a preallocated buffer",
            None,
            "raw",
            _raw,
            "raw",
        )
    )
    found.append(
        ArrayContender(
            "memcpy", "memcpy in one process (the physical limit)", None, "raw", _memcpy, "memcpy"
        )
    )
    if os.path.isdir("/dev/shm"):
        found.append(
            ArrayContender(
                "fresh-shm",
                "memcpy into a new shared-memory segment (the floor of a segment per message)",
                None,
                "raw",
                _fresh_shm,
                "floor",
            )
        )
    return found


async def _stream(
    cls: type[Any], worker: ArrayWorker, size: int, n: int, module: str | None
) -> Timing:
    expected = _pattern(size)
    async with cls(_dup(worker.sock)) as aconn:
        worker.go(("stream", size, n + 1, module))
        elapsed, last = await time_awaits(n, aconn.recv)
    worker.finish()
    if not np.array_equal(last, expected):
        raise AssertionError(f"a {size}-byte array arrived damaged")
    return elapsed


@dataclass(frozen=True)
class StreamContender:
    key: str
    label: str
    backend: str
    family: str
    module: str | None  #: whose shared() wraps each message; None: none does
    cls: type[Any]


def _stream_contenders(backends: tuple[str, ...], impls: tuple[Impl, ...]) -> list[StreamContender]:
    found: list[StreamContender] = []
    for b in backends:
        found.append(
            StreamContender(f"plain-{b}", f"conn.send(arr) [{b}]", b, "sync", None, impls[0].cls)
        )
        for impl in impls:
            module = _module_of(impl)
            if not hasattr(sys.modules.get(module), "shared"):
                continue
            found.append(
                StreamContender(
                    f"{impl.name}-shared-{b}",
                    f"conn.send({impl.name}.shared(arr)) [{b}]",
                    b,
                    impl.family,
                    module,
                    impl.cls,
                )
            )
    return found


# ---------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------


def _size_name(size: int) -> str:
    if size >= 1 << 30:
        return f"{size >> 30}GiB"
    if size >= 1 << 20:
        return f"{size >> 20}MiB"
    if size >= 1 << 10:
        return f"{size >> 10}KiB"
    return f"{size}B"


def _human(size: int) -> str:
    name = _size_name(size)
    return f"{name[:-3]} {name[-3:]}" if name.endswith("iB") else f"{size}-byte"


@dataclass
class _Rounds:
    """Per round: contender key -> value, for ratios paired within a round."""

    values: list[dict[str, float]] = field(default_factory=list)

    def ratio(self, num: str, den: str) -> float:
        return statistics.median(got[num] / got[den] for got in self.values)


def array_tables(
    worker: ArrayWorker,
    backends: tuple[str, ...],
    impls: tuple[Impl, ...],
    rounds: int,
    quick: bool,
    trial_seconds: float,
    rng: Any,
    log: Callable[[str], None],
) -> tuple[list[Table], list[Target]]:
    """Run the large-array and small-message tables, interleaved and shuffled by round."""
    sizes = QUICK_SIZES if quick else SIZES
    worker.run(("prepare", sizes))
    contenders = _array_contenders(backends, impls)
    time_tables: list[Table] = []
    gap_tables: list[Table] = []
    for i, size in enumerate(sizes):
        human = _human(size)
        time_tables.append(
            Table(
                id=f"arrays-{_size_name(size)}",
                title=f"7{'ac'[i]}. A {human} numpy array from a worker process to the async"
                ' parent: time from "go" to the array in hand, every page read',
                unit="ms",
                higher_is_better=False,
                ratio_label="time / pickled",
                params={"array_bytes": size},
                series=series_of(contenders, 1),
                baseline="pickled",
                op="array",
            )
        )
        gap_tables.append(
            Table(
                id=f"arrays-gap-{_size_name(size)}",
                title=f"7{'bd'[i]}. Worst event-loop gap while receiving a {human} array"
                f" (a heartbeat sleeping {BEAT * 1e3:g} ms; CPU: the loop thread's most"
                " within one interval)",
                unit="ms",
                higher_is_better=False,
                ratio_label="ratio",
                params={"array_bytes": size, "heartbeat_seconds": BEAT},
                series=series_of((c for c in contenders if c.backend is not None), 1),
                baseline=None,
                op="interval",
            )
        )
    expected = {size: _expected_pages(size) for size in sizes}
    streams = _stream_contenders(backends, impls)
    small_tables = [
        Table(
            id=f"arrays-small-{_size_name(size)}",
            title=f"7{'efg'[j]}. Small messages: {_human(size)} numpy arrays, conn.send() one"
            " after the other, with and without shared(), received with asyncmp's recv()",
            unit="msgs/s",
            higher_is_better=True,
            ratio_label="x plain",
            params={"array_bytes": size},
            series=series_of(streams),
            baseline=f"plain-{streams[0].backend}",
        )
        for j, size in enumerate(SMALL_SIZES)
    ]
    small_n: list[dict[str, int]] = []
    for size, table in zip(SMALL_SIZES, small_tables, strict=True):
        log(f"calibrating {table.id}")
        found: dict[str, int] = {}
        for c in streams:
            probe = 2000
            seconds, _ = run_on(c.backend, _stream, c.cls, worker, size, probe, c.module)
            found[c.key] = trial_size(seconds, probe, trial_seconds, 200, 1_000_000)
        small_n.append(found)
        for s in table.series:
            s.n_per_trial = found[s.key]

    def big(c: ArrayContender, size: int, gaps: Table) -> Value:
        seconds, cpu_seconds, wall, cpu = c.trial(worker, size, expected[size])
        gc.collect()
        if wall is not None and cpu is not None:
            gap = gaps.get(c.key)
            assert gap is not None
            gap.values.append(wall * 1e3)
            gap.cpu.append(cpu * 1e6)
        return seconds * 1e3, cpu_seconds * 1e6

    def small(c: StreamContender, size: int, n_of: dict[str, int]) -> Value:
        n = n_of[c.key]
        seconds, cpu_seconds = run_on(c.backend, _stream, c.cls, worker, size, n, c.module)
        return n / seconds, cpu_seconds / n * 1e6

    big_rounds = [_Rounds() for _ in sizes]
    small_rounds = [_Rounds() for _ in SMALL_SIZES]
    for r in range(rounds):
        start = perf_counter()
        for size, table, gaps, by_round in zip(
            sizes, time_tables, gap_tables, big_rounds, strict=True
        ):
            got = play_round(table, contenders, rng, partial(big, size=size, gaps=gaps))
            by_round.values.append(got)
        for size, table, n_of, by_round in zip(
            SMALL_SIZES, small_tables, small_n, small_rounds, strict=True
        ):
            measure = partial(small, size=size, n_of=n_of)
            by_round.values.append(play_round(table, streams, rng, measure))
        log(f"arrays round {r + 1}/{rounds} done in {perf_counter() - start:.1f} s")

    targets: list[Target] = []
    for table, gaps, by_round in zip(time_tables, gap_tables, big_rounds, strict=True):
        for c in contenders:
            if c.role != "shared":
                continue
            targets += [
                Target(table.id, c.key, f"{c.key}: {what}", op, goal, by_round.ratio(num, den))
                for what, op, goal, num, den in (
                    ("pickled time / its time", ">=", SPEEDUP_VS_PICKLED, "pickled", c.key),
                    ("raw copy time / its time", ">=", 1.0, "raw", c.key),
                    ("its time / memcpy time", "<=", WITHIN_MEMCPY, c.key, "memcpy"),
                )
            ]
        for s in gaps.series:
            if s.key == "pickled":
                what, op, goal = "reference: pickled, worst loop gap", "ref", 0.0
                targets.append(Target(gaps.id, s.key, what, op, goal, s.median, unit="ms"))
                continue
            targets += [
                Target(gaps.id, s.key, f"{s.key} {what}", "<=", MAX_GAP_MS, value, unit="ms")
                for what, value in (
                    ("worst loop gap", s.median),
                    ("loop-thread CPU in one interval", statistics.median(s.cpu) / 1e3),
                )
            ]
    for table, by_round in zip(small_tables, small_rounds, strict=True):
        for sc in streams:
            if sc.module is None:
                continue
            base = f"plain-{sc.backend}"
            what = f"{sc.key} / {base}"
            targets.append(Target(table.id, sc.key, what, ">=", 1.0, by_round.ratio(sc.key, base)))
    tables = [t for pair in zip(time_tables, gap_tables, strict=True) for t in pair]
    return tables + small_tables, targets
