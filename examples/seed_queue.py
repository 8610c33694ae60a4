"""The classic writer and reader processes over a Queue, with an async reader that ends cleanly.

The writer is plain multiprocessing code: it puts 'A', 'B' and 'C' with a short random pause
after each. The reader runs an event loop of its own and awaits ``asyncmp.AsyncQueue.get()``,
so it could serve other tasks meanwhile. In the classic version the reader loops forever and
the parent can only ``terminate()`` it; here, once the writer has exited, the parent puts a
``None`` that tells the reader to stop, and both processes are joined with exit code 0.
``asyncmp.open_process`` still guarantees that neither outlives the parent's block.

The reader runs an event loop, so it is started with spawn or forkserver: a child forked from
inside a running event loop can't start another one.

    python examples/seed_queue.py --backend trio --start-method forkserver
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time
from typing import Any

import anyio

import asyncmp

STOP = None  # what the parent puts once the writer is done


def say(line: str) -> None:
    """Print a whole line in one write: lines from several processes never run together."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def write(q: Any) -> None:
    say(f"Process to write: {os.getpid()}")
    for value in ["A", "B", "C"]:
        say(f"Put {value} to queue...")
        q.put(value)
        time.sleep(random.random() / 10)


def read(q: Any, backend: str) -> None:
    """The reader process: an event loop that awaits the queue until it gets STOP."""
    say(f"Process to read: {os.getpid()}")
    anyio.run(read_async, q, **backend_args(backend))


async def read_async(q: Any) -> None:
    async with asyncmp.AsyncQueue[str | None](q) as aq:
        while (value := await aq.get()) is not STOP:
            say(f"Get {value} from queue.")
    say("Reader: told to stop, exiting cleanly.")


async def main(backend: str, start_method: str) -> None:
    context = multiprocessing.get_context(start_method)
    async with asyncmp.AsyncQueue[str | None](context.Queue()) as q:
        async with (
            asyncmp.open_process(write, q.queue, context=context, name="writer") as writer,
            asyncmp.open_process(read, q.queue, backend, context=context, name="reader") as reader,
        ):
            await writer.wait()
            await q.put(STOP)  # instead of reader.terminate()
            await reader.wait()
    print(f"Writer exited with code {writer.exitcode}, reader with code {reader.exitcode}.")
    if (writer.exitcode, reader.exitcode) != (0, 0):
        raise SystemExit(1)


def backend_args(backend: str) -> dict[str, Any]:
    """anyio.run()'s keyword arguments for 'asyncio', 'uvloop' or 'trio'."""
    if backend == "uvloop":
        import uvloop

        return {"backend": "asyncio", "backend_options": {"loop_factory": uvloop.new_event_loop}}
    return {"backend": backend}


if __name__ == "__main__":  # a spawned child imports this module; it must not run this part
    parser = argparse.ArgumentParser(description="Writer and async reader over a Queue.")
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    parser.add_argument(
        "--start-method",
        choices=[
            m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
        ],
        default="spawn",
    )
    args = parser.parse_args()
    anyio.run(main, args.backend, args.start_method, **backend_args(args.backend))
