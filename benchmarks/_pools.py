"""5. Pools: asyncmp's ``open_pool`` against the other ways async code runs functions in
worker processes.

Every trial runs in an event loop of its own, with a pool of its own: the pool is
started and warmed up (each worker has run a call, so spawned workers have imported what
they run) before the clock starts, and closed after it stops. Only the calls are timed
(but in 5e, which times the start).

* 5a. Tiny tasks (``fn`` returns its argument), 2 workers: asyncmp's ``pool.map``,
  ``anyio.to_process.run_sync`` in a task group with a ``CapacityLimiter(2)`` (the
  baseline), aiomultiprocess's ``Pool(2).map`` and ``trio_parallel.run_sync`` with a
  limiter of 2, where they are installed.
* 5b. The same calls made one at a time from 100 concurrent tasks: asyncmp's ``pool.run``.
* 5c. CPU-bound throughput: 1 ms tasks, one worker per core; asyncmp's ``pool.map``
  against ``ProcessPoolExecutor`` and ``loop.run_in_executor`` (the baseline).
* 5d. A cancelled running call (a 0.5 s sleep in the worker, cancelled 50 ms in): the
  time until the cancelled call returns. asyncmp keeps the worker (checked); anyio's
  call is not cancellable once running; trio-parallel and anyio's ``cancellable=True``
  kill the worker.
* 5e. Start: the time from ``open_pool(2)`` to the first result of a trivial call, with
  spawn and forkserver workers, each trial in a fresh interpreter (see ``_pool_start.py``),
  for the installed asyncmp and each candidate alike.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import statistics
import sys
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import anyio
import anyio.to_process
from _cases import Impl, Timing, run_on, since, start_timing
from _pool_fns import async_identity, async_spin, identity, pid, sleep_for, spin
from _report import Table, Target, Value, play_round, series_of, trial_size

import asyncmp

__all__ = ("pool_tables",)

#: The run() benchmark's concurrent callers.
CALLERS = 100
#: The CPU-bound task, in seconds.
CPU_TASK = 0.001
#: The cancellation benchmark: the call's length, and when it is cancelled.
CANCEL_CALL = 0.5
CANCEL_AFTER = 0.05
#: The start benchmark's start methods.
START_METHODS = ("spawn", "forkserver")
#: 5e's measuring process: ``python -c START_CODE HERE PACKAGE METHOD BACKEND`` (see
#: ``_pool_start.py``). A ``-c`` main module has no file, so a spawned or forkserver worker
#: imports no main module: it imports what asyncmp's worker imports, and nothing else.
START_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import _pool_start;"
    " sys.exit(_pool_start.main(sys.argv[2:]))"
)
HERE = Path(__file__).resolve().parent
_DUP2 = os.POSIX_SPAWN_DUP2


@dataclass(frozen=True)
class PoolContender:
    key: str
    label: str
    backend: str | None
    family: str
    #: calls to time -> (wall seconds, CPU seconds); runs an event loop of its own
    trial: Callable[[int], Timing]


def _has(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ImportError:
        return False


# --- asyncmp --------------------------------------------------------------------------------------


async def _time_calls(
    call: Callable[[int], Coroutine[Any, Any, None]], n: int, callers: int | None
) -> Timing:
    """Warm up (both workers started), then time *n* calls: a task each, or *callers*
    tasks making theirs one after the other."""

    async def caller(calls: int) -> None:
        for i in range(calls):
            await call(i)

    async with anyio.create_task_group() as tg:
        for i in range(2):
            tg.start_soon(call, i)
    start = start_timing()
    async with anyio.create_task_group() as tg:
        if callers is None:
            for i in range(n):
                tg.start_soon(call, i)
        else:
            for _ in range(callers):
                tg.start_soon(caller, n // callers)
    return since(start)


def _open_pool(impl: Impl, processes: int) -> Any:
    """*impl*'s pool. A candidate copy is imported under a private name, which only a
    forked worker knows: its workers are forked."""
    if impl.tag:
        return impl.open_pool(processes, context=multiprocessing.get_context("fork"))
    return asyncmp.open_pool(processes)


async def _asyncmp_map(
    n: int, impl: Impl, processes: int, fn: Callable[[Any], Any], arg: Any
) -> Timing:
    async with _open_pool(impl, processes) as pool:
        async for _ in pool.map(fn, [arg] * (processes * 4)):
            pass
        start = start_timing()
        async for _ in pool.map(fn, [arg] * n):
            pass
        return since(start)


async def _asyncmp_run(n: int, impl: Impl) -> Timing:
    async with _open_pool(impl, 2) as pool:
        for i in range(4):
            await pool.run(identity, i)

        async def caller(calls: int) -> None:
            for i in range(calls):
                await pool.run(identity, i)

        start = start_timing()
        async with anyio.create_task_group() as tg:
            for _ in range(CALLERS):
                tg.start_soon(caller, n // CALLERS)
        return since(start)


def _start_trial(impl: Impl, method: str, backend: str) -> Timing:
    """5e: one trial in a fresh interpreter, which imports *impl*'s package by its own name
    (so spawned workers find it too, a candidate's included) and times ``open_pool(2)`` to
    the first result of a trivial call. Its errors go to this stderr.

    ``os.posix_spawn``, not ``subprocess``: a new ``Popen`` reaps the processes of earlier
    ``Popen`` objects that were collected unreaped (anyio's workers), under the feet of
    the asyncio child watcher that waits for them ("Unknown child process pid")."""
    assert impl.package is not None
    argv = [sys.executable, "-c", START_CODE, str(HERE), str(impl.package), method, backend]
    r, w = os.pipe()
    try:
        pid = os.posix_spawn(sys.executable, argv, os.environ, file_actions=[(_DUP2, w, 1)])
    finally:
        os.close(w)
    with open(r, "rb") as out:
        printed = out.read()
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status != 0:
        raise RuntimeError(f"the {method} start trial failed (exit status {status})")
    wall, cpu = json.loads(printed)
    return float(wall), float(cpu)


class WorkerNotKept(Exception):
    pass


async def _asyncmp_cancel(_: int, impl: Impl) -> Timing:
    async with _open_pool(impl, 1) as pool:
        before = await pool.run(pid)
        start = start_timing()
        timing = (0.0, 0.0)

        async def call(scope: anyio.CancelScope) -> None:
            nonlocal timing
            with scope:
                await pool.run(sleep_for, CANCEL_CALL)
            timing = since(start)  # perf_counter: uvloop's clock ticks in milliseconds

        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, scope)
            await anyio.sleep(CANCEL_AFTER)  # the call is running in the worker by now
            assert pool.statistics().calls_running == 1
            start = start_timing()
            scope.cancel()
        if await pool.run(pid) != before or pool.statistics().workers_replaced:
            raise WorkerNotKept("asyncmp's worker was replaced after a cancelled call")
        return timing


# --- anyio.to_process -----------------------------------------------------------------------------


async def _anyio_tasks(n: int, callers: int | None) -> Timing:
    limiter = anyio.CapacityLimiter(2)

    async def call(i: int) -> None:
        await anyio.to_process.run_sync(identity, i, limiter=limiter)

    return await _time_calls(call, n, callers)


async def _anyio_cancel(_: int, cancellable: bool) -> Timing:
    limiter = anyio.CapacityLimiter(1)
    await anyio.to_process.run_sync(pid, limiter=limiter)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                await anyio.to_process.run_sync(
                    sleep_for, CANCEL_CALL, cancellable=cancellable, limiter=limiter
                )

            tg.start_soon(call)
            await anyio.sleep(CANCEL_AFTER)
            start = start_timing()
            scope.cancel()
    return since(start)


# --- aiomultiprocess, trio-parallel, ProcessPoolExecutor -----------------------------------------


async def _aiomp_map(n: int, processes: int, fn: Callable[[Any], Any], arg: Any) -> Timing:
    import aiomultiprocess

    async with aiomultiprocess.Pool(processes) as pool:
        await pool.map(fn, [arg] * (processes * 4))
        start = start_timing()
        await pool.map(fn, [arg] * n)
        timing = since(start)
        pool.close()
        await pool.join()
    return timing


async def _aiomp_run(n: int) -> Timing:
    import aiomultiprocess

    async with aiomultiprocess.Pool(2) as pool:
        await pool.map(async_identity, range(8))

        async def caller(calls: int) -> None:
            for i in range(calls):
                await pool.apply(async_identity, (i,))

        start = start_timing()
        async with anyio.create_task_group() as tg:
            for _ in range(CALLERS):
                tg.start_soon(caller, n // CALLERS)
        timing = since(start)
        pool.close()
        await pool.join()
    return timing


async def _trio_parallel_tasks(n: int, callers: int | None) -> Timing:
    import trio
    import trio_parallel

    limiter = trio.CapacityLimiter(2)
    async with trio_parallel.open_worker_context() as context:  # this run's own workers

        async def call(i: int) -> None:
            await context.run_sync(identity, i, limiter=limiter)

        return await _time_calls(call, n, callers)


async def _trio_parallel_cancel(_: int) -> Timing:
    import trio_parallel

    async with trio_parallel.open_worker_context() as context:
        await context.run_sync(pid)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    await context.run_sync(sleep_for, CANCEL_CALL, kill_on_cancel=True)

                tg.start_soon(call)
                await anyio.sleep(CANCEL_AFTER)
                start = start_timing()
                scope.cancel()
        return since(start)


async def _executor_map(n: int, processes: int) -> Timing:
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(processes) as executor:
        await asyncio.gather(
            *(loop.run_in_executor(executor, spin, CPU_TASK) for _ in range(processes * 4))
        )
        start = start_timing()
        await asyncio.gather(*(loop.run_in_executor(executor, spin, CPU_TASK) for _ in range(n)))
        return since(start)


# --- the tables -----------------------------------------------------------------------------------


@dataclass
class PoolBench:
    table: Table
    contenders: list[PoolContender]
    value: Callable[[float, int], float]
    probe: int
    n_min: int
    n_max: int
    fixed_n: int | None = None
    #: with *fixed_n*: run each contender once, untimed, before the rounds
    warm_up: bool = False


def _benches(backends: tuple[str, ...], impls: tuple[Impl, ...]) -> list[PoolBench]:
    cores = os.cpu_count() or 1
    aiomp = _has("aiomultiprocess")
    trio_parallel = _has("trio_parallel") and "trio" in backends

    def rate(seconds: float, n: int) -> float:
        return n / seconds

    def millis(seconds: float, n: int) -> float:
        return seconds * 1e3

    def ours(
        what: str, trial: Callable[[str, Impl], Callable[[int], Timing]], infix: str = ""
    ) -> list[PoolContender]:
        return [
            PoolContender(
                f"{impl.name}{infix}-{b}",
                f"{impl.name} {what} ({b})",
                b,
                impl.family,
                trial(b, impl),
            )
            for b in backends
            for impl in impls
        ]

    def peer(key: str, label: str, fn: Callable[..., Any], *args: Any) -> PoolContender:
        """Another way to run functions in processes: ``fn(n, *args)``, trio-parallel's on
        trio, the others' on asyncio; its family is its key (anyio's for "anyio-cancellable")."""
        backend = "trio" if key == "trio-parallel" else "asyncio"
        family = key.removesuffix("-cancellable")
        label = f"{label} ({backend})"
        return PoolContender(key, label, backend, family, lambda n: run_on(backend, fn, n, *args))

    def tiny(callers: int | None) -> list[PoolContender]:
        """The anchor's and the other pools' rows of 5a (*callers* None) and 5b."""
        found = [peer("anyio", "anyio.to_process.run_sync, limiter 2", _anyio_tasks, callers)]
        if aiomp and callers is None:
            found.append(
                peer(
                    "aiomultiprocess", "aiomultiprocess Pool.map", _aiomp_map, 2, async_identity, 0
                )
            )
        elif aiomp:
            found.append(peer("aiomultiprocess", "aiomultiprocess Pool.apply", _aiomp_run))
        if trio_parallel:
            label = "trio_parallel.run_sync, limiter 2"
            found.append(peer("trio-parallel", label, _trio_parallel_tasks, callers))
        return found

    tiny_map = ours(
        "pool.map", lambda b, impl: lambda n: run_on(b, _asyncmp_map, n, impl, 2, identity, 0)
    ) + tiny(None)
    tiny_run = ours("pool.run", lambda b, impl: lambda n: run_on(b, _asyncmp_run, n, impl)) + tiny(
        CALLERS
    )

    cpu = ours(
        "pool.map",
        lambda b, impl: lambda n: run_on(b, _asyncmp_map, n, impl, cores, spin, CPU_TASK),
    )
    cpu.append(peer("executor", "ProcessPoolExecutor + run_in_executor", _executor_map, cores))
    if aiomp:
        label = "aiomultiprocess Pool.map"
        cpu.append(peer("aiomultiprocess", label, _aiomp_map, cores, async_spin, CPU_TASK))

    cancel = ours(
        "pool.run, worker kept", lambda b, impl: lambda n: run_on(b, _asyncmp_cancel, n, impl)
    )
    kills = "anyio.to_process.run_sync(cancellable=True), kills"
    cancel += [
        peer("anyio", "anyio.to_process.run_sync, not cancellable", _anyio_cancel, False),
        peer("anyio-cancellable", kills, _anyio_cancel, True),
    ]
    if trio_parallel:
        label = "trio_parallel kill_on_cancel=True, kills"
        cancel.append(peer("trio-parallel", label, _trio_parallel_cancel))

    def started(method: str) -> Callable[[str, Impl], Callable[[int], Timing]]:
        return lambda b, impl: lambda n: _start_trial(impl, method, b)

    start = [
        contender
        for method in START_METHODS
        for contender in ours(
            f"{method}: open_pool(2) to a first result", started(method), f"-{method}"
        )
    ]

    def bench(
        contenders: list[PoolContender],
        value: Callable[[float, int], float],
        probe: int,
        n_min: int,
        n_max: int,
        *,
        baseline: str | None,
        fixed_n: int | None = None,
        warm_up: bool = False,
        **table: Any,
    ) -> PoolBench:
        return PoolBench(
            Table(series=series_of(contenders), baseline=baseline, **table),
            contenders,
            value,
            probe,
            n_min,
            n_max,
            fixed_n,
            warm_up,
        )

    def timed(contenders: list[PoolContender], warm_up: bool = False, **table: Any) -> PoolBench:
        """A bench of one timed event per trial, in milliseconds, with no anchor."""
        return bench(
            contenders,
            millis,
            1,
            1,
            1,
            fixed_n=1,
            warm_up=warm_up,
            unit="ms",
            higher_is_better=False,
            ratio_label="ratio",
            baseline=None,
            **table,
        )

    return [
        bench(
            tiny_map,
            rate,
            200,
            200,
            2_000_000,
            id="pool-map",
            title="5a. Pool: tiny tasks (fn returns its argument), 2 workers",
            unit="calls/s",
            higher_is_better=True,
            ratio_label="x anyio",
            baseline="anyio",
            op="call",
            params={"workers": 2, "task": "identity"},
        ),
        bench(
            tiny_run,
            rate,
            200,
            CALLERS * 2,
            2_000_000,
            id="pool-run",
            title=f"5b. Pool: tiny tasks, one call at a time from {CALLERS} concurrent tasks,"
            " 2 workers",
            unit="calls/s",
            higher_is_better=True,
            ratio_label="x anyio",
            baseline="anyio",
            op="call",
            params={"workers": 2, "task": "identity", "callers": CALLERS},
        ),
        bench(
            cpu,
            rate,
            200,
            200,
            200_000,
            id="pool-cpu",
            title=f"5c. Pool: CPU-bound tasks of {CPU_TASK * 1e3:g} ms, one worker per core"
            f" ({cores})",
            unit="tasks/s",
            higher_is_better=True,
            ratio_label="x executor",
            baseline="executor",
            op="task",
            params={"workers": cores, "task_seconds": CPU_TASK},
        ),
        timed(
            cancel,
            id="pool-cancel",
            title=f"5d. Pool: cancel a running call ({CANCEL_CALL:g} s, cancelled after"
            f" {CANCEL_AFTER * 1e3:g} ms): time until the call returns",
            op="cancel",
            params={"call_seconds": CANCEL_CALL, "cancel_after_seconds": CANCEL_AFTER},
        ),
        timed(
            start,
            warm_up=True,
            id="pool-start",
            title="5e. Pool: time from open_pool(2) to the first result of a trivial call, in a"
            " fresh interpreter, spawn and forkserver workers (the forkserver already running)",
            op="start",
            params={"workers": 2, "methods": list(START_METHODS), "call": "os.getpid"},
        ),
    ]


def pool_tables(
    backends: tuple[str, ...],
    impls: tuple[Impl, ...],
    rounds: int,
    trial_seconds: float,
    rng: Any,
    log: Callable[[str], None],
    notes: list[str],
) -> tuple[list[Table], list[Target]]:
    """Run the pool benchmarks, interleaved and shuffled round by round."""
    benches = _benches(backends, impls)
    sizes: list[dict[str, int]] = []
    for bench in benches:
        log(f"calibrating {bench.table.id}")
        found: dict[str, int] = {}
        for c in bench.contenders:
            if bench.fixed_n is not None:
                if bench.warm_up:
                    c.trial(bench.fixed_n)
                found[c.key] = bench.fixed_n
                continue
            seconds, _ = c.trial(bench.probe)
            n = trial_size(seconds, bench.probe, trial_seconds, bench.n_min, bench.n_max)
            found[c.key] = math.ceil(n / CALLERS) * CALLERS
        sizes.append(found)
        for s in bench.table.series:
            s.n_per_trial = found[s.key]
    for r in range(rounds):
        for bench, n_of in zip(benches, sizes, strict=True):

            def measure(
                c: PoolContender, bench: PoolBench = bench, n_of: dict[str, int] = n_of
            ) -> Value:
                n = n_of[c.key]
                try:
                    seconds, cpu_seconds = c.trial(n)
                except WorkerNotKept as exc:
                    notes.append(str(exc))
                    raise
                return bench.value(seconds, n), cpu_seconds / n * 1e6

            play_round(bench.table, bench.contenders, rng, measure)
        log(f"pool round {r + 1}/{rounds} done")
    return [b.table for b in benches], _targets([b.table for b in benches])


def _targets(tables: list[Table]) -> list[Target]:
    goals = {"pool-map": 20.0, "pool-run": 3.0, "pool-cpu": 0.95}
    targets: list[Target] = []
    for table in tables:
        for s in table.series:
            if s.family != "asyncmp":
                continue
            if table.id in goals:
                what = f"{s.key} / {table.baseline}"
                targets.append(Target(table.id, s.key, what, ">=", goals[table.id], s.ratio))
            elif table.id == "pool-cancel":
                median = statistics.median(s.values)
                targets.append(
                    Target(table.id, s.key, f"{s.key} time to return", "<=", 50.0, median, "ms")
                )
    return targets
