"""The same API under trio: workers in a nursery, a cancel scope, and a crash that says how.

Nothing here is trio-specific in asyncmp: ``open_worker`` is the same async context manager
on every backend. This is plain trio code around it:

1. a nursery runs three workers at once; their results arrive on a memory channel;
2. ``trio.move_on_after`` cancels a request that takes too long: the worker is terminated at
   once and reaped before the block ends;
3. a worker that dies mid-conversation makes the pending ``recv()`` raise
   ``asyncmp.WorkerExited``, whose message carries the exit code.

    python examples/trio_worker.py [--start-method spawn]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import sys
from multiprocessing.connection import Connection
from typing import Any

import trio

import asyncmp


def worker(conn: Connection) -> None:
    """Answer ``("hash", data, rounds)`` with an iterated SHA-256 until EOF.

    ``("exit", code)`` makes it exit with *code* instead of answering.
    """
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent left its block: time to go
            return
        if request[0] == "exit":
            sys.exit(request[1])
        _, data, rounds = request
        for _ in range(rounds):
            data = hashlib.sha256(data).digest()
        conn.send(data.hex())


async def hash_in_worker(
    context: Any, data: bytes, rounds: int, results: trio.MemorySendChannel[tuple[bytes, str]]
) -> None:
    async with results, asyncmp.open_worker(worker, context=context) as w:
        await w.send(("hash", data, rounds))
        await results.send((data, await w.recv()))


async def main(start_method: str) -> None:
    context = multiprocessing.get_context(start_method)

    # 1. Fan out to three workers in a nursery; fan in over a memory channel.
    send, receive = trio.open_memory_channel[tuple[bytes, str]](0)
    async with trio.open_nursery() as nursery, receive:
        for data, rounds in [(b"trio", 300_000), (b"asyncio", 200_000), (b"uvloop", 100_000)]:
            nursery.start_soon(hash_in_worker, context, data, rounds, send.clone())
        send.close()
        async for data, digest in receive:
            print(f"1. {data.decode():>7}: {digest[:16]}...")

    # 2. A cancel scope cuts a request short; the worker is stopped, not left running.
    with trio.move_on_after(0.5) as scope:
        async with asyncmp.open_worker(worker, context=context) as w:
            await w.send(("hash", b"forever", 10**12))
            await w.recv()
    print(
        f"2. cancelled after 0.5 s: {scope.cancelled_caught}; the worker was stopped at once "
        f"(exit code {w.process.exitcode})"
    )

    # 3. A worker that dies mid-conversation: the pending recv() says how it ended.
    async with asyncmp.open_worker(worker, context=context) as w:
        await w.send(("exit", 3))
        try:
            await w.recv()
        except asyncmp.WorkerExited as exc:  # an EOFError too
            print(f"3. the pending recv() raised WorkerExited: {exc}")


if __name__ == "__main__":  # a spawned child imports this module; it must not run this part
    parser = argparse.ArgumentParser(description="asyncmp's worker API under trio.")
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=multiprocessing.get_start_method(),
    )
    args = parser.parse_args()
    trio.run(main, args.start_method)
