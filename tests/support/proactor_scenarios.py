"""asyncmp's POSIX routes under an asyncio loop without ``add_reader``, run as a script.

``ProactorEventLoop`` (Windows' default) has no ``add_reader``; neither has the
:class:`~tests.support.platform_fakes.ProactorLikeEventLoop` used here. anyio then waits on a
descriptor in a selector thread of its own. That thread lives until exit, and its exit
hook (anyio 4.16) also runs in every forked ``multiprocessing`` child, where it takes the
thread's wake-up socket out of the epoll instance the child shares with the parent; the
parent then hangs at exit. So ``test_platforms.py`` runs this in a fresh interpreter,
and the workers here come from the forkserver, never from a fork of this process.

Run: ``python -m tests.support.proactor_scenarios`` (prints ``ok``; fails with a traceback).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from typing import Any

import anyio
import anyio.abc

import asyncmp

from . import process_workers as pw
from .platform_fakes import ProactorLikeEventLoop

MiB = 1 << 20


async def connection_and_process(ctx: Any, use_threads: bool) -> None:
    aconn, child_end = asyncmp.Pipe(use_threads=use_threads)
    process = ctx.Process(target=pw.echo_until_eof, args=(child_end,))
    process.start()
    child_end.close()
    try:
        async with aconn:
            big = os.urandom(4 * MiB)  # more than the socket buffers: the send waits
            await aconn.send(big)
            assert await aconn.recv() == big
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(aconn.recv)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
            await aconn.send("after a cancelled receive")
            assert await aconn.recv() == "after a cancelled receive"
            async with anyio.create_task_group() as tg:

                async def receive_until_closed() -> None:
                    try:
                        await aconn.recv()
                    except anyio.ClosedResourceError:
                        return
                    raise AssertionError("close did not wake the receive")

                tg.start_soon(receive_until_closed)
                await anyio.wait_all_tasks_blocked()
                await aconn.aclose()
        assert await asyncmp.AsyncProcess(process).wait() == 0
    finally:
        process.join()
        process.close()


async def queue_route(ctx: Any, use_threads: bool) -> None:
    q = ctx.Queue()
    try:
        async with asyncmp.AsyncQueue[Any](q, use_threads=use_threads) as aq:
            await aq.put("item")
            assert await aq.get() == "item"
            async with anyio.create_task_group() as tg:

                async def get_until_closed() -> None:
                    try:
                        await aq.get()
                    except anyio.ClosedResourceError:
                        return
                    raise AssertionError("close did not wake the get")

                tg.start_soon(get_until_closed)
                await anyio.wait_all_tasks_blocked()
                await aq.aclose()
    finally:
        q._reader.close()
        q._writer.close()


async def remote() -> None:
    async def serve_one(*, task_status: anyio.abc.TaskStatus[Any]) -> None:
        async with asyncmp.serve(("127.0.0.1", 0), authkey=b"key") as listener:
            task_status.started(listener.address)
            async for conn in listener:
                async with conn:
                    await conn.send(await conn.recv())

    async with anyio.create_task_group() as tg:
        address = await tg.start(serve_one)
        async with await asyncmp.connect(address, authkey=b"key") as conn:
            await conn.send("over tcp")
            assert await conn.recv() == "over tcp"
        tg.cancel_scope.cancel()


async def main() -> None:
    ctx = multiprocessing.get_context("forkserver")
    with anyio.fail_after(30):
        for use_threads in (False, True):
            await connection_and_process(ctx, use_threads)
            await queue_route(ctx, use_threads)
        await remote()
    # The descriptor waits went through anyio's selector thread: add_reader was refused.
    assert any(t.name == "AnyIO socket selector" for t in threading.enumerate())


if __name__ == "__main__":
    anyio.run(main, backend="asyncio", backend_options={"loop_factory": ProactorLikeEventLoop})
    print("ok")
