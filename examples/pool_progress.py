"""Stream the results of ``pool.map`` into a progress bar as they finish.

The longest Collatz chain below a limit, found block by block in a pool of worker
processes. ``pool.map(..., ordered=False)`` yields each block's answer as soon as a worker
has it, whatever the order of the blocks, so the bar moves as the work is done; the map
takes blocks from the range only as workers free up.

    python examples/pool_progress.py [--backend asyncio|uvloop|trio] [--workers 2]
                                     [--limit 1000000] [--start-method spawn]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from typing import Any

import anyio
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import asyncmp

BLOCK = 10_000  # numbers per call: a few hundredths of a second of work
KNOWN = {100_000: 77_031, 300_000: 230_631, 1_000_000: 837_799}  # longest chain below the limit


def longest_chain(block: tuple[int, int]) -> tuple[int, int]:
    """``(steps, n)`` for the n in ``range(*block)`` with the longest Collatz chain."""
    best = (0, 0)
    for n in range(*block):
        steps, m = 0, n
        while m != 1:
            m = m // 2 if m % 2 == 0 else 3 * m + 1
            steps += 1
        best = max(best, (steps, n))
    return best


async def main(start_method: str, workers: int, limit: int) -> tuple[int, int, int]:
    """Return ``(steps, start, blocks)`` of the longest chain below *limit*."""
    blocks = [(lo, min(lo + BLOCK, limit)) for lo in range(1, limit, BLOCK)]
    best = (0, 0)
    context = multiprocessing.get_context(start_method)
    async with asyncmp.open_pool(workers, context=context) as pool:
        with Progress(
            TextColumn("collatz"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("blocks, longest chain so far {task.fields[best]}"),
            TimeRemainingColumn(),
        ) as progress:
            task = progress.add_task("blocks", total=len(blocks), best="-")
            async with pool.map(longest_chain, blocks, ordered=False) as results:
                async for steps, start in results:
                    best = max(best, (steps, start))
                    progress.update(task, advance=1, best=f"{best[1]:,} ({best[0]} steps)")
    return best[0], best[1], len(blocks)


def backend_args(backend: str) -> dict[str, Any]:
    """anyio.run()'s keyword arguments for 'asyncio', 'uvloop' or 'trio'."""
    if backend == "uvloop":
        import uvloop

        return {"backend": "asyncio", "backend_options": {"loop_factory": uvloop.new_event_loop}}
    return {"backend": backend}


if __name__ == "__main__":  # a spawned child imports this module; it must not run this part
    parser = argparse.ArgumentParser(description="pool.map results into a progress bar.")
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=multiprocessing.get_start_method(),
    )
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 2))
    parser.add_argument("--limit", type=int, default=1_000_000, help="search 1 .. limit-1")
    args = parser.parse_args()
    started = time.monotonic()
    steps, start, blocks = anyio.run(
        main, args.start_method, args.workers, args.limit, **backend_args(args.backend)
    )
    elapsed = time.monotonic() - started
    print(
        f"pool_progress: {blocks} blocks, {args.workers} workers, {elapsed:.1f} s on "
        f"{args.backend}: the longest Collatz chain below {args.limit:,} starts at {start:,} "
        f"({steps} steps)"
    )
    if KNOWN.get(args.limit, start) != start:
        raise SystemExit("pool_progress: FAILED")
