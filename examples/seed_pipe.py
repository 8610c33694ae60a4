"""The classic multiprocessing Pipe exchange, awaited instead of blocked on.

The child sends ``[42, None, 'hello']`` and then answers every message it gets. The parent
awaits each message, so its event loop keeps running other tasks meanwhile. Closing the
parent's end is how the child learns to stop: its ``recv()`` raises EOFError and it returns,
so the process is joined, never terminated.

    python examples/seed_pipe.py --backend trio --start-method spawn
"""

from __future__ import annotations

import argparse
import multiprocessing
from multiprocessing.connection import Connection
from typing import Any

import anyio

import asyncmp


def child(conn: Connection) -> None:
    conn.send([42, None, "hello"])
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent closed its end: time to go
            return
        conn.send(f"child got {msg!r}")


async def main() -> None:
    conn, worker_end = asyncmp.Pipe()
    process = multiprocessing.Process(target=child, args=(worker_end,))
    process.start()
    worker_end.close()  # the child has its own copy; ours would keep EOF from ever arriving
    try:
        print(await conn.recv())  # [42, None, 'hello']
        await conn.send("666")
        print(await conn.recv())  # child got '666'
    finally:
        await conn.aclose()
        # The child returns as soon as it sees EOF. Waiting for it takes no thread: on
        # POSIX, AsyncProcess waits on a descriptor that the process's end makes readable.
        exitcode = await asyncmp.AsyncProcess(process).wait()
    if exitcode != 0:
        raise SystemExit(f"the child exited with code {exitcode}")


def backend_args(backend: str) -> dict[str, Any]:
    """anyio.run()'s keyword arguments for 'asyncio', 'uvloop' or 'trio'."""
    if backend == "uvloop":
        import uvloop

        return {"backend": "asyncio", "backend_options": {"loop_factory": uvloop.new_event_loop}}
    return {"backend": backend}


if __name__ == "__main__":  # a spawned child imports this module; it must not run this part
    parser = argparse.ArgumentParser(description="The Pipe exchange, awaited.")
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        help="default: the platform's",
    )
    args = parser.parse_args()
    if args.start_method:
        multiprocessing.set_start_method(args.start_method)
    anyio.run(main, **backend_args(args.backend))
