"""The asyncmp side of the migration guide (docs/howto/migrating.md), run as it is shown.

Each ``--8<--`` section below is one code block of the guide: what a call of
``loop.run_in_executor()``, ``anyio.to_process``, aiomultiprocess, aioprocessing or pebble
becomes. ``nox -s examples`` runs this file on every backend and start method and checks
what it prints, so the guide's asyncmp code runs as printed.

    python examples/migrating.py [--backend asyncio|uvloop|trio] [--start-method spawn]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
from collections.abc import Awaitable, Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import anyio

import asyncmp


# --8<-- [start:functions]
def scale(x: float, factor: float = 2.0) -> float:
    """A plain function, defined at module level: the workers import it by name."""
    return x * factor


def scale_pair(pair: tuple[float, float]) -> float:
    """starmap's shape for map(): one argument, unpacked here."""
    return scale(*pair)


async def fetch(x: int) -> int:
    """An async function, as aiomultiprocess runs them."""
    await asyncio.sleep(0.01)
    return x + 1


def fetch_sync(x: int) -> int:
    """What the pool runs instead: a plain function that runs the coroutine."""
    return asyncio.run(fetch(x))


async def fetch_all(xs: list[int]) -> list[int]:
    return list(await asyncio.gather(*(fetch(x) for x in xs)))


def fetch_batch(xs: list[int]) -> list[int]:
    """Many coroutines at once in one worker: give it a batch."""
    return asyncio.run(fetch_all(xs))


# --8<-- [end:functions]


def echo_once(conn: Connection) -> None:
    """A plain worker: send back the message that comes, then return."""
    with conn:
        conn.send(conn.recv())


def produce(q: Any, n: int) -> None:
    """A plain producer: put 0 .. n-1 on a plain multiprocessing queue."""
    for i in range(n):
        q.put(i)


async def from_executor(context: Any) -> list[object]:
    # --8<-- [start:executor]
    async with asyncmp.open_pool(2, context=context) as pool:
        y = await pool.run(scale, 3.0)
        z = await pool.run(partial(scale, factor=10.0), 3.0)  # keywords: bound with partial
        ys = [y async for y in pool.map(scale, [1.0, 2.0, 3.0])]
        with anyio.fail_after(5):  # the time limit, waiting for a worker included
            w = await pool.run(scale, 4.0)
    # --8<-- [end:executor]
    return [y, z, ys, w]


async def from_to_process(context: Any) -> list[object]:
    # --8<-- [start:to_process]
    async with asyncmp.open_pool(2, context=context) as pool:  # 2: a limiter of 2
        y = await pool.run(scale, 3.0)
        with anyio.fail_after(5):  # a timeout returns at once: the call is not shielded
            z = await pool.run(scale, 4.0, kill_on_cancel=True)  # cancellable=True
    # --8<-- [end:to_process]
    return [y, z]


async def from_aiomultiprocess(context: Any) -> list[object]:
    # --8<-- [start:aiomultiprocess]
    async with asyncmp.open_pool(2, context=context) as pool:
        y = await pool.run(fetch_sync, 1)
        ys = [y async for y in pool.map(fetch_sync, [1, 2, 3])]
        pairs = [y async for y in pool.map(scale_pair, [(1.0, 3.0), (2.0, 3.0)])]
        batches = [b async for b in pool.map(fetch_batch, [[1, 2], [3, 4]])]
    # --8<-- [end:aiomultiprocess]
    return [y, ys, pairs, batches]


async def from_aioprocessing(context: Any) -> list[object]:
    # --8<-- [start:aioprocessing]
    conn, worker_end = asyncmp.Pipe()
    async with conn, asyncmp.open_process(echo_once, worker_end, context=context) as process:
        worker_end.close()  # the child has its own copy
        await conn.send("ping")
        reply = await conn.recv()
        code = await process.wait()

    async with asyncmp.Queue(context=context) as q:
        async with asyncmp.open_process(produce, q.queue, 3, context=context):
            items = [await q.get(timeout=10) for _ in range(3)]

    async with asyncmp.open_pool(2, context=context) as pool:
        y = await pool.run(scale, 3.0)
        ys = [y async for y in pool.map(scale, [1.0, 2.0])]
    # --8<-- [end:aioprocessing]
    return [reply, code, items, y, ys]


async def from_pebble(context: Any) -> list[object]:
    # --8<-- [start:pebble]
    async with asyncmp.open_pool(2, context=context, max_tasks_per_child=100) as pool:
        with anyio.fail_after(5):
            y = await pool.run(partial(scale, factor=10.0), 3.0, kill_on_cancel=True)
    # --8<-- [end:pebble]
    return [y]


SECTIONS: dict[str, Callable[[Any], Awaitable[list[object]]]] = {
    "executor": from_executor,
    "to_process": from_to_process,
    "aiomultiprocess": from_aiomultiprocess,
    "aioprocessing": from_aioprocessing,
    "pebble": from_pebble,
}


async def main(start_method: str) -> None:
    context = multiprocessing.get_context(start_method)
    for name, section in SECTIONS.items():
        print(f"migrating: {name}: {await section(context)}")


def backend_args(backend: str) -> dict[str, Any]:
    """anyio.run()'s keyword arguments for 'asyncio', 'uvloop' or 'trio'."""
    if backend == "uvloop":
        import uvloop

        return {"backend": "asyncio", "backend_options": {"loop_factory": uvloop.new_event_loop}}
    return {"backend": backend}


if __name__ == "__main__":  # a spawned child imports this module; it must not run this part
    parser = argparse.ArgumentParser(description="The asyncmp side of the migration guide.")
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=multiprocessing.get_start_method(),
    )
    args = parser.parse_args()
    anyio.run(main, args.start_method, **backend_args(args.backend))
