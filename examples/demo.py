"""CPU-bound workers stream results into an async consumer; the event loop never stalls.

A few worker processes count the primes below three million by trial division, a chunk at a
time, and send each chunk's count as soon as it is done. The parent awaits those messages
(``async for`` over each ``asyncmp.open_worker``), draws a progress bar, and runs a heartbeat
that ticks every few milliseconds and records how late each tick is. A receive that blocked
the loop would show up as a gap as long as a chunk takes (~0.2 s); an awaited one leaves the
heartbeat on time. It ends with one summary line, and fails if the count is wrong or the loop
stalled.

    python examples/demo.py [--backend asyncio|uvloop|trio] [--start-method spawn]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import anyio
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

import asyncmp

CHUNK = 50_000  # numbers per message: about 0.2 s of work near 3 million
TICK = 0.005  # seconds between heartbeats
STALL = 0.1  # a heartbeat this late means the loop was blocked (noise on a busy machine is less)
PRIMES_BELOW = {1_000_000: 78_498, 2_000_000: 148_933, 3_000_000: 216_816}


def count_primes(lo: int, hi: int) -> int:
    """The primes in [lo, hi), by trial division: slow on purpose."""
    count = 0
    for n in range(max(lo, 2), hi):
        if n < 4:
            count += 1
            continue
        if n % 2 == 0:
            continue
        d = 3
        while d * d <= n:
            if n % d == 0:
                break
            d += 2
        else:
            count += 1
    return count


def worker(conn: Connection, chunks: list[tuple[int, int]]) -> None:
    """Send ``(numbers checked, primes found)`` for each chunk, then return."""
    if hasattr(os, "nice"):
        os.nice(5)  # background work: the parent's event loop goes first for the CPU
    for lo, hi in chunks:
        conn.send((hi - lo, count_primes(lo, hi)))


class Heartbeat:
    """Ticks every TICK seconds and keeps the worst lateness of a tick: the loop's longest gap."""

    def __init__(self) -> None:
        self.ticks = 0
        self.worst_gap = 0.0

    async def run(self) -> None:
        while True:
            before = anyio.current_time()
            await anyio.sleep(TICK)
            self.worst_gap = max(self.worst_gap, anyio.current_time() - before - TICK)
            self.ticks += 1


async def main(backend: str, start_method: str, limit: int, workers: int) -> None:
    context = multiprocessing.get_context(start_method)
    chunks = [(lo, min(lo + CHUNK, limit)) for lo in range(0, limit, CHUNK)]
    heartbeat = Heartbeat()
    primes = 0
    exit_codes: list[int | None] = []
    started = time.monotonic()
    progress = Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(bar_width=20),
        TaskProgressColumn(),
        TextColumn("{task.fields[primes]:>8,} primes"),
        TextColumn("{task.fields[note]}"),
        auto_refresh=False,  # redrawn by a task on the event loop: a stalled loop would show
    )

    async def run_worker(index: int, task: TaskID) -> None:
        nonlocal primes
        mine = chunks[index::workers]  # interleaved: each gets small and large numbers
        progress.update(task, total=sum(hi - lo for lo, hi in mine))
        mine_found = 0
        async with asyncmp.open_worker(worker, mine, context=context) as w:
            progress.update(task, note=f"pid {w.process.pid}")
            async for numbers, found in w:  # each chunk's count, the moment it is ready
                primes += found
                mine_found += found
                progress.update(task, advance=numbers, primes=mine_found)
                progress.update(overall, advance=numbers, primes=primes)
        exit_codes.append(w.process.exitcode)

    async def redraw() -> None:
        while True:
            note = f"worst loop gap {heartbeat.worst_gap * 1e3:.1f} ms"
            progress.update(overall, note=note)
            progress.refresh()
            await anyio.sleep(0.1)

    with progress:
        rows = [progress.add_task(f"worker {i}", primes=0, note="") for i in range(workers)]
        overall = progress.add_task("all", total=limit, primes=0, note="")
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat.run)
            tg.start_soon(redraw)
            async with anyio.create_task_group() as workers_tg:
                for index, row in enumerate(rows):
                    workers_tg.start_soon(run_worker, index, row)
            tg.cancel_scope.cancel()
        progress.refresh()

    elapsed = time.monotonic() - started
    expected = PRIMES_BELOW.get(limit)
    summary = (
        f"{workers} workers ({start_method}) counted {primes:,} primes below {limit:,} in "
        f"{elapsed:.1f} s on {backend}; heartbeat {heartbeat.ticks} ticks, "
        f"worst loop gap {heartbeat.worst_gap * 1e3:.1f} ms"
    )
    problems = []
    if expected is not None and primes != expected:
        problems.append(f"expected {expected:,} primes")
    if exit_codes != [0] * workers:
        problems.append(f"worker exit codes {exit_codes}")
    if heartbeat.worst_gap >= STALL:
        problems.append(f"the loop stalled for {heartbeat.worst_gap * 1e3:.0f} ms")
    if problems:
        raise SystemExit(f"demo: FAILED ({'; '.join(problems)}): {summary}")
    print(f"demo: ok: {summary}")


def backend_args(backend: str) -> dict[str, Any]:
    """anyio.run()'s keyword arguments for 'asyncio', 'uvloop' or 'trio'."""
    if backend == "uvloop":
        import uvloop

        return {"backend": "asyncio", "backend_options": {"loop_factory": uvloop.new_event_loop}}
    return {"backend": backend}


if __name__ == "__main__":  # a spawned child imports this module; it must not run this part
    parser = argparse.ArgumentParser(
        description="CPU-bound workers, an event loop that never waits."
    )
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=multiprocessing.get_start_method(),
    )
    parser.add_argument("--limit", type=int, default=3_000_000, help="count the primes below this")
    parser.add_argument(
        "--workers", type=int, default=min(4, max(2, os.cpu_count() or 2)), help="worker processes"
    )
    args = parser.parse_args()
    anyio.run(
        main,
        args.backend,
        args.start_method,
        args.limit,
        args.workers,
        **backend_args(args.backend),
    )
