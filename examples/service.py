"""An async HTTP service that hands CPU-bound requests to a pool of worker processes.

Starlette on uvicorn, and ``asyncmp.open_pool``: the workers live as long as the service.
``GET /primes?below=N`` counts the primes below N by trial division in a worker and answers
with JSON:

    {"below": 200000, "primes": 17984, "seconds": 0.31, "worker": 4242}

Every request has a time limit (``&timeout=S``, else ``--timeout``). A request that runs out
of time gets a 504 at once; its call is cancelled with ``kill_on_cancel=True``, so its worker
is killed and the pool starts a replacement, and no later request ever gets its late reply.
A client that goes away mid-request has its call cancelled the same way.

The event loop never waits on a worker: ``GET /stats`` answers at once while every worker is
busy. A worker that dies mid-request makes that request fail with a 502 that says how; the
pool replaces it. On Ctrl-C uvicorn stops serving, the requests in progress end with a 503,
and leaving the lifespan stops and reaps every worker.

    python examples/service.py [--backend asyncio|uvloop] [--port 8000] [--workers 2]
    curl 'http://127.0.0.1:8000/primes?below=300000&timeout=0.5'

uvicorn runs on asyncio (or uvloop), so there is no trio variant; the pool runs under trio
just the same with an ASGI server that supports it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import asyncmp

MAX_BELOW = 50_000_000
MAX_TIMEOUT = 3600.0


# --- what runs in the workers: a plain function ---------------------------------------------------


def count_primes(below: int) -> tuple[int, int]:
    """The number of primes below *below*, by trial division (slow on purpose), and the
    pid of the worker that counted them."""
    count = 0
    for n in range(2, below):
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
    return count, os.getpid()


# --- the service ----------------------------------------------------------------------------------


class Service:
    """The pool, the requests in progress, and what became of the requests so far."""

    def __init__(self, workers: int, context: Any, timeout: float) -> None:
        self.workers = workers
        self.context = context
        self.timeout = timeout
        self.pool: asyncmp.Pool | None = None
        self.stats = {"requests": 0, "done": 0, "timed_out": 0, "cancelled": 0, "failed": 0}
        self._closing = False
        self._requests: set[anyio.CancelScope] = set()

    @contextmanager
    def until_closing(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that :meth:`close_requests` cancels: for a request in progress."""
        with anyio.CancelScope() as scope:
            if self._closing:
                scope.cancel()
            self._requests.add(scope)
            try:
                yield scope
            finally:
                self._requests.discard(scope)

    def close_requests(self) -> None:
        """The server is stopping: end every request in progress now."""
        self._closing = True
        for scope in self._requests:
            scope.cancel()

    async def primes(self, below: int, seconds: float) -> tuple[int, dict[str, Any]]:
        """Count the primes below *below* in a worker, within *seconds*: the HTTP status
        and the JSON body."""
        assert self.pool is not None
        self.stats["requests"] += 1
        started = time.monotonic()
        try:
            with anyio.fail_after(seconds):
                # Cancelled (the time is up, the client left, the service stops): run()
                # returns at once; kill_on_cancel kills the worker rather than let it
                # finish a job nobody wants, and the pool starts another.
                primes, pid = await self.pool.run(count_primes, below, kill_on_cancel=True)
        except TimeoutError:
            self.stats["timed_out"] += 1
            self.log(f"primes below {below:,}: timed out after {seconds:g} s")
            return 504, {"below": below, "error": f"timed out after {seconds:g} s"}
        except asyncmp.WorkerExited as exc:
            self.stats["failed"] += 1
            self.log(f"primes below {below:,}: failed, {exc}")
            return 502, {"below": below, "error": str(exc)}
        except BaseException:
            self.stats["cancelled"] += 1
            why = "the service is stopping" if self._closing else "the client went away"
            self.log(f"primes below {below:,}: cancelled, {why}")
            raise
        self.stats["done"] += 1
        seconds = round(time.monotonic() - started, 3)
        return 200, {"below": below, "primes": primes, "seconds": seconds, "worker": pid}

    @staticmethod
    def log(message: str) -> None:
        print(f"service: {message}", flush=True)


# --- HTTP -----------------------------------------------------------------------------------------


class PrimesEndpoint:
    """``GET /primes?below=N&timeout=S``: count in a worker; cancel if the client leaves.

    A plain ASGI app rather than a Starlette route: a route's task is not cancelled when
    the client disconnects, whereas here a task watches for ``http.disconnect`` and
    cancels the request, which cancels its call in the pool.
    """

    def __init__(self, service: Service) -> None:
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = Request(scope).query_params
        try:
            below = int(params.get("below", "100000"))
            timeout = float(params.get("timeout", self.service.timeout))
        except ValueError:
            below, timeout = -1, 0.0
        if not (0 <= below <= MAX_BELOW and 0 < timeout <= MAX_TIMEOUT):
            text = f"below must be an integer in 0..{MAX_BELOW}, timeout in (0, {MAX_TIMEOUT:g}]\n"
            await PlainTextResponse(text, 400)(scope, receive, send)
            return
        status, body = 503, {"below": below, "error": "the service is shutting down"}
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._cancel_on_disconnect, receive, tg.cancel_scope)
            with self.service.until_closing():
                status, body = await self.service.primes(below, timeout)
            await JSONResponse(body, status)(scope, receive, send)
            tg.cancel_scope.cancel()  # answered: stop watching for a disconnect

    @staticmethod
    async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()


class Server(uvicorn.Server):
    """uvicorn's server, which ends the requests in progress when it stops."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits (up to timeout_graceful_shutdown) for the responses in progress,
        # then cancels their tasks by force. Answer them now, with a 503.
        self.service.close_requests()
        await super().shutdown(sockets=sockets)


def create_app(service: Service, url: str) -> Starlette:
    async def index(request: Request) -> Response:
        return PlainTextResponse(
            "GET /primes?below=N&timeout=S counts the primes below N; GET /stats\n"
            f"curl '{url}/primes?below=300000&timeout=0.5'\n"
        )

    async def stats(request: Request) -> Response:
        assert service.pool is not None
        pool = service.pool.statistics()
        workers = {"workers_alive": pool.workers_alive, "workers_replaced": pool.workers_replaced}
        return JSONResponse({**service.stats, "busy": pool.calls_running, **workers})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with asyncmp.open_pool(service.workers, context=service.context) as pool:
            service.pool = pool
            count = f"{pool.processes} worker{'s' if pool.processes != 1 else ''}"
            service.log(f"{count}; listening on {url}")
            yield
        # Leaving the block stopped every worker and reaped it.
        alive = pool.statistics().workers_alive
        service.log(f"stopped; {alive} workers left; {json.dumps(service.stats)}")

    return Starlette(
        routes=[
            Route("/", index),
            Route("/stats", stats),
            Route("/primes", PrimesEndpoint(service)),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU-bound requests behind an async HTTP service.")
    parser.add_argument("--backend", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=multiprocessing.get_start_method(),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    args = parser.parse_args()
    if not 0 < args.timeout <= MAX_TIMEOUT or not math.isfinite(args.timeout):
        parser.error(f"--timeout must be in (0, {MAX_TIMEOUT:g}]")

    # Bind and listen here, so that port 0 works and the printed address is the real one;
    # connections that arrive before uvicorn starts accepting wait in the backlog.
    sock = socket.create_server((args.host, args.port))
    host, port = sock.getsockname()[:2]
    service = Service(args.workers, multiprocessing.get_context(args.start_method), args.timeout)
    config = uvicorn.Config(
        create_app(service, f"http://{host}:{port}"), loop=args.backend, log_level="warning"
    )
    try:
        Server(config, service).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn raises the Ctrl-C again once it has shut down, cleanly


if __name__ == "__main__":  # a spawned child imports this module; it must not run this part
    main()
