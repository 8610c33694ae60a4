"""examples/service.py, end to end: a real server on loopback, driven by a real HTTP client.

The service runs as users run it (``python examples/service.py --port 0``), in a process of
its own, and prints the address it listens on. httpx talks to it over 127.0.0.1, on each
event-loop backend; the service's own loop is uvloop when the client's is, asyncio otherwise
(uvicorn has no trio). Each test ends by stopping the service with SIGINT, as Ctrl-C would,
and checks that it shut down cleanly: every worker returned on EOF (exit code 0) and was
reaped before the service exited, and nothing printed a traceback.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.text import TextReceiveStream

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="Ctrl-C is SIGINT here"),
    # httpx and httpcore iterate a response body with async generators inside their own
    # objects; one that stops early is left for the garbage collector, and trio warns about
    # it. A known httpx issue, not this project's: our own generators are closed with
    # aclosing().
    pytest.mark.filterwarnings(
        r"ignore:Async generator 'http(x|core)\.[^']*' was garbage collected:ResourceWarning"
    ),
]

SERVICE = Path(__file__).resolve().parent.parent / "examples" / "service.py"
#: A generous bound for what should take well under a second.
PROMPT = 30.0
#: A job that would take minutes: only a cancellation ends it in time.
ENDLESS = 50_000_000


def primes_below(n: int) -> int:
    """An independent count: the sieve of Eratosthenes."""
    if n < 3:
        return 0
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for p in range(2, math.isqrt(n - 1) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, n, p)))
    return sum(sieve)


@dataclass
class Service:
    url: str
    process: anyio.abc.Process
    output: list[str] = field(default_factory=list)
    stopping: bool = False

    def stop(self) -> None:
        """Ctrl-C, once: a second one would make uvicorn skip the lifespan's shutdown."""
        if not self.stopping:
            self.stopping = True
            self.process.send_signal(signal.SIGINT)


def service_backend(anyio_backend: Any) -> str:
    return "uvloop" if isinstance(anyio_backend, tuple) else "asyncio"


@asynccontextmanager
async def run_service(anyio_backend: Any, workers: int) -> AsyncIterator[Service]:
    """Start the service, yield it once it listens, then stop it with SIGINT and check."""
    command = [sys.executable, "-u", str(SERVICE), "--port", "0", "--workers", str(workers)]
    command += ["--backend", service_backend(anyio_backend)]
    async with await anyio.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        assert process.stdout is not None
        service = Service("", process)
        listening = anyio.Event()

        async def read_output() -> None:
            assert process.stdout is not None
            pending = ""
            async for text in TextReceiveStream(process.stdout):
                *lines, pending = (pending + text).split("\n")
                service.output += lines
                for line in lines:
                    if match := re.search(r"listening on (http://127\.0\.0\.1:\d+)", line):
                        service.url = match[1]
                        listening.set()
            if pending:
                service.output.append(pending)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_output)
                with anyio.fail_after(PROMPT):
                    await listening.wait()
                yield service
                service.stop()
                with anyio.fail_after(PROMPT):
                    assert await process.wait() == 0, "\n".join(service.output)
        finally:
            if process.returncode is None:
                process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
    output = "\n".join(service.output)
    assert f"service: stopped; workers exited with codes {[0] * workers}" in output, output
    assert "Traceback" not in output and "ERROR" not in output, output


async def ndjson(response: Any) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON lines of a streamed response, as they arrive.

    It reads ``aiter_raw()``, one generator that ``aclosing`` closes, rather than
    ``aiter_lines()``, whose inner generators are left for the garbage collector when the
    client stops reading early (trio then warns).
    """
    pending = b""
    async with aclosing(response.aiter_raw()) as chunks:
        async for chunk in chunks:
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                yield json.loads(line)
    assert not pending, pending


async def stream_events(
    client: Any, url: str, below: int, events: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    async with client.stream("GET", f"{url}/primes", params={"below": below}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        async with aclosing(ndjson(response)) as events_in:
            async for event in events_in:
                events.append(event)
    return events


def client() -> Any:
    return httpx.AsyncClient(timeout=PROMPT)


async def test_jobs_stream_progress_and_results(anyio_backend: Any) -> None:
    limits = [30_000, 60_000, 100_000]  # three jobs, two workers: one job waits its turn
    async with run_service(anyio_backend, workers=2) as service, client() as http:
        results: dict[int, list[dict[str, Any]]] = {below: [] for below in limits}
        async with anyio.create_task_group() as tg:
            for below in limits:
                tg.start_soon(stream_events, http, service.url, below, results[below])
        for below, events in results.items():
            first, *progress, last = events
            assert set(first) == {"job", "worker"}
            fractions = [event["progress"] for event in progress]
            assert fractions == sorted(fractions) and all(0 < f < 1 for f in fractions)
            assert last["below"] == below
            assert last["primes"] == primes_below(below)
            assert last["worker"] == first["worker"]
            assert {event["job"] for event in events} == {first["job"]}
        stats = (await http.get(f"{service.url}/stats")).json()
        assert stats["started"] == stats["done"] == 3
        assert stats["cancelled"] == stats["failed"] == stats["replaced"] == stats["busy"] == 0
        assert len(stats["workers"]) == 2
        # A bad request is refused, and the service goes on.
        response = await http.get(f"{service.url}/primes", params={"below": "many"})
        assert response.status_code == 400


async def test_the_loop_answers_while_every_worker_is_busy(anyio_backend: Any) -> None:
    async with run_service(anyio_backend, workers=1) as service, client() as http:
        async with (
            http.stream("GET", f"{service.url}/primes", params={"below": 500_000}) as r,
            aclosing(ndjson(r)) as events_in,
        ):
            assert "worker" in await anext(events_in)  # the job is running
            with anyio.fail_after(PROMPT):
                stats = (await http.get(f"{service.url}/stats")).json()
            assert stats["busy"] == 1
            events = [event async for event in events_in]
        assert events[-1]["primes"] == primes_below(500_000)


async def test_client_that_disconnects_mid_job_gets_it_cancelled(anyio_backend: Any) -> None:
    """With one worker, the next job can only run once the abandoned one was cancelled."""
    async with run_service(anyio_backend, workers=1) as service, client() as http:
        async with (
            http.stream("GET", f"{service.url}/primes", params={"below": ENDLESS}) as r,
            aclosing(ndjson(r)) as events_in,
        ):
            first = await anext(events_in)
            assert set(first) == {"job", "worker"}  # the worker has the job
        # Leaving the block closed the connection mid-stream.
        with anyio.fail_after(PROMPT):
            events = await stream_events(http, service.url, 30_000, [])
        assert events[-1]["primes"] == primes_below(30_000)
        assert events[-1]["worker"] == first["worker"]  # the same worker, not a replacement
        stats = (await http.get(f"{service.url}/stats")).json()
        assert (stats["started"], stats["done"], stats["cancelled"]) == (2, 1, 1)
        assert stats["failed"] == stats["replaced"] == 0
        assert stats["workers"] == [first["worker"]]
    assert (
        f"service: job {first['job']} (primes below {ENDLESS:,}) cancelled: the client went away"
        in service.output
    )


async def test_worker_that_dies_mid_job_is_reported_and_replaced(anyio_backend: Any) -> None:
    async with run_service(anyio_backend, workers=1) as service, client() as http:
        async with (
            http.stream("GET", f"{service.url}/primes", params={"below": ENDLESS}) as r,
            aclosing(ndjson(r)) as events_in,
        ):
            first = await anext(events_in)
            os.kill(first["worker"], signal.SIGKILL)  # a crash, mid-job
            events = [event async for event in events_in]
        assert events[-1] == {"error": "worker was killed by signal 9 (SIGKILL)"}
        with anyio.fail_after(PROMPT):
            events = await stream_events(http, service.url, 30_000, [])
        assert events[-1]["primes"] == primes_below(30_000)
        stats = (await http.get(f"{service.url}/stats")).json()
        assert (stats["started"], stats["done"], stats["failed"], stats["replaced"]) == (2, 1, 1, 1)
        assert stats["workers"] == [events[-1]["worker"]] != [first["worker"]]
    assert (
        f"service: job {first['job']} (primes below {ENDLESS:,}) failed (worker exit code -9); "
        "replacing it" in service.output
    )


async def test_stopping_ends_the_streams_in_progress(anyio_backend: Any) -> None:
    events: list[dict[str, Any]] = []
    async with client() as http:
        async with run_service(anyio_backend, workers=1) as service:
            async with (
                http.stream("GET", f"{service.url}/primes", params={"below": ENDLESS}) as r,
                aclosing(ndjson(r)) as events_in,
            ):
                events.append(await anext(events_in))
                service.stop()  # Ctrl-C, mid-job
                events += [event async for event in events_in]
    assert events[-1] == {"error": "the service is shutting down"}
    assert (
        f"service: job {events[0]['job']} (primes below {ENDLESS:,}) cancelled: "
        "the service is stopping" in service.output
    )
