"""Fan CPU work out to worker processes over a Queue, fan the results in, stop cleanly on Ctrl-C.

The parent cuts 1..LIMIT into blocks and puts them on a bounded ``jobs`` queue; each worker
(plain multiprocessing code) takes blocks, finds the number with the longest Collatz chain in
each, and puts the answer on a ``results`` queue. The parent awaits the results, draws a
progress bar, and keeps the best answer. Both queues are ordinary ``multiprocessing`` queues
that the parent awaits through ``asyncmp.AsyncQueue``.

Ctrl-C is the parent's alone: the workers ignore SIGINT, and the parent turns it into a
message (``anyio.open_signal_receiver``) rather than an exception raised wherever the code
happens to be. It then leaves the ``open_process`` blocks with an exception, which terminates
the workers at once and reaps them, and it prints how far it got.

    python examples/pipeline.py [--backend asyncio|uvloop|trio] [--workers 4] [--limit 1000000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import asyncmp

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # anyio's dependency there

BLOCK = 10_000  # numbers per job: a few hundredths of a second of work
KNOWN = {100_000: 77_031, 300_000: 230_631, 1_000_000: 837_799}  # longest chain below the limit


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def worker(jobs: Any, results: Any) -> None:
    """Take ``(lo, hi)`` blocks until ``None``; put ``(steps, n)`` of each block's longest chain."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process: it's the parent's
    while (job := jobs.get()) is not None:
        lo, hi = job
        results.put(max((collatz_steps(n), n) for n in range(lo, hi)))


class Interrupted(Exception):
    """Ctrl-C, received as a signal by the event loop."""


@dataclass
class Run:
    """How far the pipeline got; printed even when Ctrl-C cut it short."""

    jobs: int = 0
    done: int = 0
    best: tuple[int, int] = (0, 0)
    exit_codes: list[int | None] = field(default_factory=list)


async def produce(
    jobs: asyncmp.AsyncQueue[Any], blocks: list[tuple[int, int]], workers: int
) -> None:
    for block in blocks:
        await jobs.put(block)  # waits while the bounded queue is full
    for _ in range(workers):
        await jobs.put(None)  # one "no more work" for each worker


async def main(run: Run, start_method: str, workers: int, limit: int) -> None:
    context = multiprocessing.get_context(start_method)
    blocks = [(lo, min(lo + BLOCK, limit)) for lo in range(1, limit, BLOCK)]
    run.jobs = len(blocks)
    interrupted = False

    async def stop_on_ctrl_c(scope: anyio.CancelScope) -> None:
        nonlocal interrupted
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                interrupted = True
                scope.cancel()
                return

    jobs: asyncmp.AsyncQueue[Any] = asyncmp.AsyncQueue(context.Queue(2 * workers))
    results: asyncmp.AsyncQueue[tuple[int, int]] = asyncmp.AsyncQueue(context.Queue())
    async with jobs, results, AsyncExitStack() as stack:
        processes: list[asyncmp.AsyncProcess] = []
        # Runs last, once every open_process block below has stopped and reaped its worker.
        stack.callback(lambda: run.exit_codes.extend(p.exitcode for p in processes))
        for _ in range(workers):
            processes.append(
                await stack.enter_async_context(
                    asyncmp.open_process(worker, jobs.queue, results.queue, context=context)
                )
            )
        pids = ", ".join(str(p.pid) for p in processes)
        print(f"pipeline: {workers} workers started (pids {pids}); Ctrl-C stops them", flush=True)
        with Progress(
            TextColumn("collatz"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("jobs, longest chain so far {task.fields[best]}"),
            TimeRemainingColumn(),
        ) as progress:
            task = progress.add_task("jobs", total=len(blocks), best="-")
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_on_ctrl_c, tg.cancel_scope)
                tg.start_soon(produce, jobs, blocks, workers)
                for _ in blocks:
                    run.best = max(run.best, await results.get())
                    run.done += 1
                    progress.update(task, advance=1, best=f"{run.best[1]:,} ({run.best[0]} steps)")
                tg.cancel_scope.cancel()  # stop watching for Ctrl-C
        if interrupted:
            # Leave the open_process blocks on an exception: the workers are stopped now.
            raise Interrupted


def is_interrupt(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(is_interrupt(e) for e in exc.exceptions)
    return isinstance(exc, (Interrupted, KeyboardInterrupt))


def backend_args(backend: str) -> dict[str, Any]:
    """anyio.run()'s keyword arguments for 'asyncio', 'uvloop' or 'trio'."""
    if backend == "uvloop":
        import uvloop

        return {"backend": "asyncio", "backend_options": {"loop_factory": uvloop.new_event_loop}}
    return {"backend": backend}


if __name__ == "__main__":  # a spawned child imports this module; it must not run this part
    parser = argparse.ArgumentParser(description="Fan-out, fan-in, progress bar, Ctrl-C.")
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=multiprocessing.get_start_method(),
    )
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 2))
    parser.add_argument("--limit", type=int, default=1_000_000, help="search 1 .. limit-1")
    args = parser.parse_args()
    run = Run()
    started = time.monotonic()
    try:
        anyio.run(
            main, run, args.start_method, args.workers, args.limit, **backend_args(args.backend)
        )
    except BaseException as exc:
        # Ctrl-C outside the signal receiver's watch is a KeyboardInterrupt (in an exception
        # group if a task got it); it stops the workers just as cleanly: open_process sees a
        # cancellation or the exception.
        if not is_interrupt(exc):
            raise
        print(
            f"pipeline: interrupted by Ctrl-C after {run.done} of {run.jobs} jobs; "
            f"workers stopped with exit codes {run.exit_codes}"
        )
        sys.exit(130)
    steps, start = run.best
    elapsed = time.monotonic() - started
    print(
        f"pipeline: {run.done} jobs, {args.workers} workers, {elapsed:.1f} s on {args.backend}: "
        f"the longest Collatz chain below {args.limit:,} starts at {start:,} ({steps} steps); "
        f"worker exit codes {run.exit_codes}"
    )
    if KNOWN.get(args.limit, start) != start or run.exit_codes != [0] * args.workers:
        sys.exit("pipeline: FAILED")
