"""An async HTTP service that hands CPU-bound jobs to worker processes and streams progress back.

Starlette on uvicorn. A few worker processes (``asyncmp.open_worker``) live as long as the
service. ``GET /primes?below=N`` takes an idle worker (or waits for one), has it count the
primes below N by trial division, and streams newline-delimited JSON as the worker reports:

    {"job": 1, "worker": 4242}
    {"job": 1, "progress": 0.05}
    ...
    {"job": 1, "below": 200000, "primes": 17984, "seconds": 0.31, "worker": 4242}

The event loop never waits on a worker: ``GET /stats`` answers at once while every worker is
busy. A client that goes away mid-job gets its job cancelled: the worker checks between
chunks for a cancel message, confirms, and goes back to the pool. A worker that dies, or that
does not confirm in time, is stopped, reaped and replaced. On Ctrl-C uvicorn stops
serving, the jobs in progress are cancelled and their streams end with a line that says why,
and leaving the lifespan closes every worker's pipe: each worker sees EOF, returns, and is
reaped.

    python examples/service.py [--backend asyncio|uvloop] [--port 8000] [--workers 2]
    curl -N 'http://127.0.0.1:8000/primes?below=300000'

uvicorn runs on asyncio (or uvloop), so there is no trio variant; the same pool would run
under trio with an ASGI server that supports it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from multiprocessing.connection import Connection
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import asyncmp

CHUNK = 20_000  # numbers between two looks for a cancel message: a few hundredths of a second
REPORTS = 20  # progress reports per job, at most
CANCEL_TIMEOUT = 5.0  # a worker that does not confirm a cancel by then is replaced
MAX_BELOW = 50_000_000
NDJSON = (b"content-type", b"application/x-ndjson")


# --- the worker process: plain multiprocessing code ---------------------------------------------


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


def prime_worker(conn: Connection) -> None:
    """Run ``("start", job, below)`` requests one at a time until EOF.

    Sends ``("progress", job, fraction)`` now and then, and ``("done", job, primes)`` at the
    end. A ``("cancel", job)`` that arrives meanwhile is answered with
    ``("cancelled", job, None)``; one that arrives after the job ended is ignored (the
    parent then has its "done").
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    try:
        while True:
            request = conn.recv()
            if request[0] == "start":
                run_job(conn, *request[1:])
            # else: a cancel for a job that already ended
    except (EOFError, BrokenPipeError):  # the service closed its end: time to go
        return


def run_job(conn: Connection, job: int, below: int) -> None:
    primes = 0
    reported = 0
    for lo in range(0, below, CHUNK):
        hi = min(lo + CHUNK, below)
        primes += count_primes(lo, hi)
        if conn.poll() and conn.recv() == ("cancel", job):
            conn.send(("cancelled", job, None))
            return
        step = hi * REPORTS // below
        if reported < step < REPORTS:
            reported = step
            conn.send(("progress", job, step / REPORTS))
    conn.send(("done", job, primes))


# --- the pool -----------------------------------------------------------------------------------


class Job:
    """One request's work on one worker; iterate it for events."""

    def __init__(self, job_id: int, below: int, worker: asyncmp.Worker) -> None:
        self.id = job_id
        self.below = below
        self.worker = worker
        self.started = time.monotonic()
        self.primes: int | None = None

    def __aiter__(self) -> Job:
        return self

    async def __anext__(self) -> dict[str, Any]:
        """The next progress report, then the result. Raises WorkerExited if it died."""
        if self.primes is not None:
            raise StopAsyncIteration
        kind, job_id, value = await self.worker.recv()
        assert job_id == self.id, f"a message for job {job_id} during job {self.id}"
        if kind == "progress":
            return {"job": self.id, "progress": value}
        self.primes = value
        return {
            "job": self.id,
            "below": self.below,
            "primes": value,
            "seconds": round(time.monotonic() - self.started, 3),
            "worker": self.worker.process.pid,
        }

    async def cancel(self) -> bool:
        """Tell the worker to stop, and drain its messages up to the confirmation.

        True if the worker confirmed (or had just finished) and can take the next job.
        """
        with anyio.move_on_after(CANCEL_TIMEOUT):
            try:
                await self.worker.send(("cancel", self.id))
                while True:
                    kind, job_id, _ = await self.worker.recv()
                    if job_id == self.id and kind in ("cancelled", "done"):
                        return True
            except (EOFError, OSError, anyio.BrokenResourceError):
                pass
        return False


class PrimePool:
    """Worker processes that live as long as the ``async with`` block; jobs borrow them."""

    def __init__(self, size: int, context: Any) -> None:
        self.size = size
        self.context = context
        self.stats = {"started": 0, "done": 0, "cancelled": 0, "failed": 0, "replaced": 0}
        self.workers: list[asyncmp.Worker] = []
        self._idle_send, self._idle = anyio.create_memory_object_stream[asyncmp.Worker](size)
        self._stack = AsyncExitStack()
        self._ids = itertools.count(1)
        self._closing = False
        self._streams: set[anyio.CancelScope] = set()

    async def __aenter__(self) -> PrimePool:
        async with AsyncExitStack() as stack:
            stack.push_async_exit(self)
            for _ in range(self.size):
                await self._add_worker()
            stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._idle_send.close()
        self._idle.close()
        # Each open_worker block closes its pipe: the worker sees EOF and returns.
        await self._stack.aclose()

    @contextmanager
    def until_closing(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that :meth:`close_streams` cancels: for a response in progress."""
        with anyio.CancelScope() as scope:
            if self._closing:
                scope.cancel()
            self._streams.add(scope)
            try:
                yield scope
            finally:
                self._streams.discard(scope)

    def close_streams(self) -> None:
        """The server is stopping: cancel every job, so that each response can end now."""
        self._closing = True
        for scope in self._streams:
            scope.cancel()

    @property
    def busy(self) -> int:
        """How many workers are running a job now."""
        return self.size - self._idle.statistics().current_buffer_used

    async def _add_worker(self) -> None:
        worker = await self._stack.enter_async_context(
            asyncmp.open_worker(prime_worker, context=self.context, shutdown_timeout=5.0)
        )
        self.workers.append(worker)
        self._idle_send.send_nowait(worker)

    async def _replace(self, worker: asyncmp.Worker) -> None:
        """Stop and reap a worker that can't be trusted with another job; start a new one."""
        self.workers.remove(worker)
        await worker.process.stop()
        self.stats["replaced"] += 1
        await self._add_worker()

    @asynccontextmanager
    async def job(self, below: int) -> AsyncIterator[Job]:
        """Borrow an idle worker (waiting for one if all are busy) and start a job on it.

        Leaving the block before the result arrived (the client went away, or an error)
        cancels the job; the worker goes back to the pool, or is replaced if it is broken.
        """
        worker = await self._idle.receive()
        job = Job(next(self._ids), below, worker)
        self.stats["started"] += 1
        try:
            await worker.send(("start", job.id, below))
            yield job
        finally:
            with anyio.CancelScope(shield=True):
                healthy = True
                if job.primes is not None:
                    self.stats["done"] += 1
                    outcome = f"done: {job.primes:,} primes"
                elif worker.process.is_alive() and await job.cancel():
                    self.stats["cancelled"] += 1
                    why = "the service is stopping" if self._closing else "the client went away"
                    outcome = f"cancelled: {why}"
                else:
                    self.stats["failed"] += 1
                    healthy = False
                    outcome = f"failed (worker exit code {worker.process.exitcode}); replacing it"
                print(f"service: job {job.id} (primes below {below:,}) {outcome}", flush=True)
                if healthy:
                    self._idle_send.send_nowait(worker)
                elif self._closing:
                    await worker.process.stop()
                else:
                    await self._replace(worker)


# --- HTTP ---------------------------------------------------------------------------------------


class PrimesEndpoint:
    """``GET /primes?below=N``: stream a job's events as NDJSON; cancel it if the client leaves.

    A plain ASGI app rather than a ``StreamingResponse`` over an async generator: a
    generator abandoned mid-stream is only cleaned up whenever it is garbage-collected,
    whereas here the job's block is left in this task, right when the client disconnects.
    """

    def __init__(self, pool: PrimePool) -> None:
        self.pool = pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            below = int(Request(scope).query_params.get("below", "100000"))
        except ValueError:
            below = -1
        if not 0 <= below <= MAX_BELOW:
            response = PlainTextResponse(f"below must be an integer in 0..{MAX_BELOW}\n", 400)
            await response(scope, receive, send)
            return
        start = {"type": "http.response.start", "status": 200, "headers": [NDJSON]}
        await send(start)  # at once: a client that waits for a free worker knows it is queued
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._cancel_on_disconnect, receive, tg.cancel_scope)
            with self.pool.until_closing() as closing:
                try:
                    async with self.pool.job(below) as job:
                        await self._send_line(
                            send, {"job": job.id, "worker": job.worker.process.pid}
                        )
                        async for event in job:
                            await self._send_line(send, event)
                except (asyncmp.WorkerExited, anyio.BrokenResourceError) as exc:
                    # The worker died (it is replaced); say how, and end the response.
                    await self._send_line(send, {"error": str(exc) or repr(exc)})
            if closing.cancelled_caught:
                await self._send_line(send, {"error": "the service is shutting down"})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            tg.cancel_scope.cancel()  # the response is complete: stop watching for a disconnect

    @staticmethod
    async def _send_line(send: Send, event: dict[str, Any]) -> None:
        body = json.dumps(event).encode() + b"\n"
        await send({"type": "http.response.body", "body": body, "more_body": True})

    @staticmethod
    async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()


class Server(uvicorn.Server):
    """uvicorn's server, which lets the pool end the streams in progress when it stops."""

    def __init__(self, config: uvicorn.Config, pool: PrimePool) -> None:
        super().__init__(config)
        self.pool = pool

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits (up to timeout_graceful_shutdown) for the responses in progress,
        # then cancels their tasks by force. End them now, each with its job cancelled.
        self.pool.close_streams()
        await super().shutdown(sockets=sockets)


def create_app(pool: PrimePool, url: str) -> Starlette:
    async def index(request: Request) -> Response:
        return PlainTextResponse(
            f"GET /primes?below=N streams the count of primes below N; GET /stats\n"
            f"curl -N '{url}/primes?below=300000'\n"
        )

    async def stats(request: Request) -> Response:
        workers = [w.process.pid for w in pool.workers]
        return JSONResponse({"workers": workers, "busy": pool.busy, **pool.stats})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with pool:
            pids = ", ".join(str(w.process.pid) for w in pool.workers)
            count = f"{pool.size} worker{'s' if pool.size != 1 else ''}"
            print(f"service: {count} (pids {pids}); listening on {url}", flush=True)
            yield
            workers = list(pool.workers)
        codes = [w.process.exitcode for w in workers]
        print(f"service: stopped; workers exited with codes {codes}", flush=True)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/stats", stats),
            Route("/primes", PrimesEndpoint(pool)),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU-bound jobs behind an async HTTP service.")
    parser.add_argument("--backend", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=multiprocessing.get_start_method(),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    # Bind and listen here, so that port 0 works and the printed address is the real one;
    # connections that arrive before uvicorn starts accepting wait in the backlog.
    sock = socket.create_server((args.host, args.port))
    host, port = sock.getsockname()[:2]
    pool = PrimePool(args.workers, multiprocessing.get_context(args.start_method))
    config = uvicorn.Config(
        create_app(pool, f"http://{host}:{port}"), loop=args.backend, log_level="warning"
    )
    try:
        Server(config, pool).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn raises the Ctrl-C again once it has shut down, cleanly


if __name__ == "__main__":  # a spawned child imports this module; it must not run this part
    main()
