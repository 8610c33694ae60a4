"""Workers on other machines: plain multiprocessing on their side, async on the coordinator's.

The workers are ordinary synchronous programs using the stdlib's
``multiprocessing.connection``; only the coordinator is async. It hands out jobs, and
each worker streams its results back one message at a time while the coordinator's
event loop serves every worker at once. Two ways to wire it up:

* ``dial-in`` (default): the coordinator listens with ``asyncmp.serve()`` and each
  worker connects with ``multiprocessing.connection.Client``.
* ``dial-out``: each worker listens with ``multiprocessing.connection.Listener`` and
  the coordinator connects to each with ``asyncmp.connect()``.

Here the workers are local processes on loopback; on real machines they would run the
same functions with the coordinator's host and port. Both sides share an authkey, and
every connection starts with the stdlib's HMAC handshake: the messages are pickles, and
unpickling trusts the sender, so only a peer that knows the key gets that far. (The key
travels here as a process argument; between machines, hand it out the way you hand out
any secret. The connection is not encrypted: across an untrusted network, tunnel it.)

    python examples/remote_workers.py --topology dial-out --backend trio --workers 4
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import secrets
from contextlib import AsyncExitStack
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

import asyncmp

#: Jobs are ranges of numbers; a result is (number, its Collatz step count).
JOB_SIZE = 250


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


# --- the worker side: synchronous, stdlib only ------------------------------------------


def work(conn: Connection, worker_id: int) -> None:
    """Say hello, then take jobs until told to stop, streaming one result per number."""
    conn.send(("hello", worker_id, os.getpid()))
    while (job := conn.recv()) is not None:
        start, stop = job
        for n in range(start, stop):
            conn.send((n, collatz_steps(n)))
        conn.send(None)  # this job is done


def dial_in_worker(address: Any, authkey: bytes, worker_id: int) -> None:
    """Connect to the coordinator and work."""
    with Client(address, authkey=authkey) as conn:
        work(conn, worker_id)


def dial_out_worker(report: Connection, authkey: bytes, worker_id: int) -> None:
    """Listen, tell the coordinator where, and work for the one that connects."""
    with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
        report.send(listener.address)
        report.close()
        with listener.accept() as conn:
            work(conn, worker_id)


# --- the coordinator: async -------------------------------------------------------------


async def drive(
    conn: asyncmp.AsyncConnection,
    jobs: MemoryObjectReceiveStream[range],
    results: dict[int, int],
    greetings: list[str],
) -> None:
    """Feed one worker jobs until there are none left, collecting what it streams back."""
    async with conn, jobs:
        _, worker_id, pid = await conn.recv()
        greetings.append(f"worker {worker_id} (pid {pid})")
        async for job in jobs:
            await conn.send((job.start, job.stop))
            while (result := await conn.recv()) is not None:
                n, steps = result
                results[n] = steps
        await conn.send(None)  # no more jobs: the worker returns


async def coordinate(
    topology: str, n_workers: int, n_numbers: int, context: Any = None
) -> dict[int, int]:
    """Run *n_workers* workers over the numbers 1 .. *n_numbers*; return every result."""
    authkey = secrets.token_bytes(32)
    send_jobs, receive_jobs = anyio.create_memory_object_stream[range](math.inf)
    with send_jobs:
        for start in range(1, n_numbers + 1, JOB_SIZE):
            send_jobs.send_nowait(range(start, min(start + JOB_SIZE, n_numbers + 1)))
    results: dict[int, int] = {}
    greetings: list[str] = []
    with receive_jobs:
        if topology == "dial-in":
            await dial_in(authkey, n_workers, context, receive_jobs, results, greetings)
        else:
            await dial_out(authkey, n_workers, context, receive_jobs, results, greetings)
    print(f"{len(results)} results from {', '.join(sorted(greetings))}")
    return results


async def dial_in(
    authkey: bytes,
    n_workers: int,
    context: Any,
    jobs: MemoryObjectReceiveStream[range],
    results: dict[int, int],
    greetings: list[str],
) -> None:
    """Listen; start the workers, which connect; drive each connection that comes in."""
    async with asyncmp.serve(("127.0.0.1", 0), authkey=authkey) as listener:
        async with AsyncExitStack() as workers:
            processes = [
                await workers.enter_async_context(
                    asyncmp.open_process(
                        dial_in_worker, listener.address, authkey, worker_id, context=context
                    )
                )
                for worker_id in range(n_workers)
            ]
            async with anyio.create_task_group() as tg:
                accepted = 0
                async for conn in listener:  # authenticated: safe to unpickle from
                    tg.start_soon(drive, conn, jobs.clone(), results, greetings)
                    accepted += 1
                    if accepted == n_workers:
                        break
            await check_exit_codes(processes)


async def dial_out(
    authkey: bytes,
    n_workers: int,
    context: Any,
    jobs: MemoryObjectReceiveStream[range],
    results: dict[int, int],
    greetings: list[str],
) -> None:
    """Start the workers, which listen; connect to each and drive the connection."""
    async with AsyncExitStack() as workers:
        processes = []
        async with anyio.create_task_group() as tg:
            for worker_id in range(n_workers):
                report, report_end = asyncmp.Pipe(duplex=False)
                async with report:
                    processes.append(
                        await workers.enter_async_context(
                            asyncmp.open_process(
                                dial_out_worker, report_end, authkey, worker_id, context=context
                            )
                        )
                    )
                    report_end.close()  # the worker has its own copy
                    address = await report.recv()  # where the worker listens
                conn = await asyncmp.connect(address, authkey=authkey)
                tg.start_soon(drive, conn, jobs.clone(), results, greetings)
        await check_exit_codes(processes)


async def check_exit_codes(processes: list[asyncmp.AsyncProcess]) -> None:
    for process in processes:
        if (code := await process.wait()) != 0:
            raise SystemExit(f"worker pid {process.pid} exited with code {code}")


async def main(topology: str, n_workers: int, n_numbers: int, start_method: str | None) -> None:
    context = multiprocessing.get_context(start_method)
    results = await coordinate(topology, n_workers, n_numbers, context)
    assert sorted(results) == list(range(1, n_numbers + 1)), "a number is missing"
    longest = max(results, key=results.__getitem__)
    print(f"longest Collatz chain below {n_numbers + 1}: {longest} ({results[longest]} steps)")


def backend_args(backend: str) -> dict[str, Any]:
    """anyio.run()'s keyword arguments for 'asyncio', 'uvloop' or 'trio'."""
    if backend == "uvloop":
        import uvloop

        return {"backend": "asyncio", "backend_options": {"loop_factory": uvloop.new_event_loop}}
    return {"backend": backend}


if __name__ == "__main__":  # a spawned worker imports this module; it must not run this part
    parser = argparse.ArgumentParser(description="Sync workers, async coordinator, on loopback.")
    parser.add_argument("--topology", choices=["dial-in", "dial-out"], default="dial-in")
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--numbers", type=int, default=3000)
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        help="default: the platform's",
    )
    args = parser.parse_args()
    anyio.run(
        main,
        args.topology,
        args.workers,
        args.numbers,
        args.start_method,
        **backend_args(args.backend),
    )
