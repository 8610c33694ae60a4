"""Run every example on each event-loop backend (and start method) where it applies, and check
what it prints. ``nox -s examples`` runs this; so can you:

    python examples/_check.py [NAME ...]     # e.g. seed_pipe service; default: all of them

Each run is a separate process with a time limit. Interactive behaviour is driven as a person
would: Ctrl-C (SIGINT) for pipeline.py, and for service.py an HTTP client (the stdlib's
urllib, on 127.0.0.1 only) that sends requests, one of them past its time limit.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BACKENDS = ["asyncio", "trio"] if sys.platform == "win32" else ["asyncio", "uvloop", "trio"]
START_METHODS = [
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
]
LIMIT = 120.0  # seconds for one run
# The examples' output goes to a pipe here: no live progress bars, even where CI forces colour.
ENV = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class CheckFailed(Exception):
    pass


@dataclass
class Run:
    name: str
    args: list[str]
    check: Callable[[Run], str]  # returns the output; raises CheckFailed

    @property
    def title(self) -> str:
        return " ".join([self.name, *self.args])

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(HERE / self.name), *self.args]


def run_to_end(run: Run, expect_code: int = 0) -> str:
    result = subprocess.run(
        run.command,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        stdin=subprocess.DEVNULL,
        env=ENV,
    )
    output = ANSI.sub("", result.stdout + result.stderr)
    if result.returncode != expect_code:
        raise CheckFailed(f"exit code {result.returncode}, not {expect_code}\n{output}")
    if "Traceback" in output:
        raise CheckFailed(f"a traceback\n{output}")
    return output


def expect_lines(output: str, *patterns: str) -> None:
    """Each pattern matches a whole line, in this order (other lines may come between)."""
    lines = iter(output.splitlines())
    for pattern in patterns:
        if not any(re.fullmatch(pattern, line.strip()) for line in lines):
            raise CheckFailed(f"no line matching {pattern!r} (in order)\n{output}")


# --- the examples -------------------------------------------------------------------------------


def check_seed_pipe(run: Run) -> str:
    output = run_to_end(run)
    if output.splitlines() != ["[42, None, 'hello']", "child got '666'"]:
        raise CheckFailed(f"unexpected output\n{output}")
    return output


def check_seed_queue(run: Run) -> str:
    output = run_to_end(run)
    for value in "ABC":
        expect_lines(output, rf"Put {value} to queue\.\.\.", rf"Get {value} from queue\.")
    expect_lines(
        output,
        r"Get A from queue\.",
        r"Get B from queue\.",
        r"Get C from queue\.",
        r"Reader: told to stop, exiting cleanly\.",
        r"Writer exited with code 0, reader with code 0\.",
    )
    return output


def check_trio_worker(run: Run) -> str:
    output = run_to_end(run)
    for data, digest in [("trio", "92bf1c2003dc8b4b"), ("asyncio", "82e6f4f73e059f0b")]:
        expect_lines(output, rf"1\. +{data}: {digest}\.\.\.")
    expect_lines(
        output,
        r"1\. +uvloop: fe215052df4ea0c1\.\.\.",
        r"2\. cancelled after 0\.5 s: True; the worker was stopped at once \(exit code -15\)",
        r"3\. the pending recv\(\) raised WorkerExited: worker exited with code 3",
    )
    return output


def check_demo(run: Run) -> str:
    output = run_to_end(run)
    expect_lines(
        output,
        r"demo: ok: \d+ workers \(\w+\) counted 78,498 primes below 1,000,000 in [\d.]+ s on "
        r"\w+; heartbeat \d+ ticks, worst loop gap [\d.]+ ms",
    )
    return output


def check_pipeline(run: Run) -> str:
    output = run_to_end(run)
    expect_lines(
        output,
        r"pipeline: 2 workers started \(pids \d+, \d+\); Ctrl-C stops them",
        r"pipeline: 30 jobs, 2 workers, [\d.]+ s on \w+: the longest Collatz chain below "
        r"300,000 starts at 230,631 \(442 steps\); worker exit codes \[0, 0\]",
    )
    return output


def check_pipeline_ctrl_c(run: Run) -> str:
    with started(run) as example:
        example.wait_for_line(r"pipeline: 2 workers started .*")
        example.process.send_signal(signal.SIGINT)
        text = example.finish(expect_code=130)
    expect_lines(
        text,
        r"pipeline: interrupted by Ctrl-C after \d+ of 100 jobs; "
        r"workers stopped with exit codes \[-15, -15\]",
    )
    return text


def check_service(run: Run) -> str:
    """One worker: a request that timed out is followed by requests that get their own
    replies, from the worker that replaced the killed one."""
    with started(run) as example:
        line = example.wait_for_line(r"service: 1 worker; listening on http://.*")
        url = line.rpartition(" ")[2]
        if not url.startswith("http://127.0.0.1:"):
            raise CheckFailed(f"not on loopback: {line}")
        first = assert_primes(url, 30_000, 3245)
        # A request that would take minutes, with a time limit: a 504, at once.
        status, body = get_json(f"{url}/primes?below=50000000&timeout=0.3")
        if (status, body.get("error")) != (504, "timed out after 0.3 s"):
            raise CheckFailed(f"not a timeout: {status} {body}")
        for below, expected in [(20_000, 2262), (10, 4), (30_000, 3245)]:
            if assert_primes(url, below, expected) == first:
                raise CheckFailed("the timed-out request's worker was not replaced")
        status, stats = get_json(f"{url}/stats")
        counts = tuple(stats[k] for k in ("requests", "done", "timed_out", "workers_replaced"))
        if counts != (5, 4, 1, 1):
            raise CheckFailed(f"unexpected stats: {stats}")
        example.process.send_signal(signal.SIGINT)
        text = example.finish()
    expect_lines(
        text,
        r"service: primes below 50,000,000: timed out after 0\.3 s",
        r"service: stopped; 0 workers left; .*",
    )
    return text


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=LIMIT) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


def assert_primes(url: str, below: int, expected: int) -> int:
    """Check the count of primes below *below*; return the worker's pid."""
    status, body = get_json(f"{url}/primes?below={below}")
    if (status, body.get("below"), body.get("primes")) != (200, below, expected):
        raise CheckFailed(f"wrong result for primes below {below}: {status} {body}")
    return int(body["worker"])


def check_pool_progress(run: Run) -> str:
    output = run_to_end(run)
    expect_lines(
        output,
        r"pool_progress: 30 blocks, 2 workers, [\d.]+ s on \w+: the longest Collatz chain "
        r"below 300,000 starts at 230,631 \(442 steps\)",
    )
    return output


def check_migrating(run: Run) -> str:
    output = run_to_end(run)
    expect_lines(
        output,
        r"migrating: executor: \[6\.0, 30\.0, \[2\.0, 4\.0, 6\.0\], 8\.0\]",
        r"migrating: to_process: \[6\.0, 8\.0\]",
        r"migrating: aiomultiprocess: \[2, \[2, 3, 4\], \[3\.0, 6\.0\], \[\[2, 3\], \[4, 5\]\]\]",
        r"migrating: aioprocessing: \['ping', 0, \[0, 1, 2\], 6\.0, \[2\.0, 4\.0\]\]",
        r"migrating: pebble: \[30\.0\]",
    )
    return output


def check_remote_workers(run: Run) -> str:
    output = run_to_end(run)
    expect_lines(output, r"longest Collatz chain below \d+: \d+ \(\d+ steps\)")
    return output


# --- driving a process that runs while we act ---------------------------------------------------


class Driven:
    """A running example whose output lines a thread collects as they come."""

    def __init__(self, run: Run) -> None:
        self.process = subprocess.Popen(
            run.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=ENV,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = ANSI.sub("", raw)
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)  # end of output

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str) -> str:
        """The first new line that matches; fails at the end of output or after LIMIT."""
        deadline = time.monotonic() + LIMIT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise CheckFailed(
                    f"output ended first (exit code {self.process.wait()})\n{self.text}"
                )
            if re.fullmatch(pattern, line.strip()):
                return line.strip()
        raise CheckFailed(f"no line matching {pattern!r} in {LIMIT:g} s\n{self.text}")

    def finish(self, expect_code: int = 0) -> str:
        """Wait for the exit and the last line; check the exit code and for errors."""
        try:
            code = self.process.wait(LIMIT)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"did not exit in {LIMIT:g} s\n{self.text}") from None
        self._reader.join(LIMIT)
        if code != expect_code:
            raise CheckFailed(f"exit code {code}, not {expect_code}\n{self.text}")
        if "Traceback" in self.text or "ERROR" in self.text:
            raise CheckFailed(f"an error was printed\n{self.text}")
        return self.text

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(LIMIT)
        assert self.process.stdout is not None
        self.process.stdout.close()


@contextmanager
def started(run: Run) -> Iterator[Driven]:
    driven = Driven(run)
    try:
        yield driven
    finally:
        driven.close()


# --- the plan -----------------------------------------------------------------------------------


def plan() -> list[Run]:
    runs: list[Run] = []
    for backend in BACKENDS:
        for method in START_METHODS:
            args = ["--backend", backend, "--start-method", method]
            runs.append(Run("seed_pipe.py", args, check_seed_pipe))
        for method in [m for m in START_METHODS if m != "fork"]:  # the reader runs a loop
            args = ["--backend", backend, "--start-method", method]
            runs.append(Run("seed_queue.py", args, check_seed_queue))
        runs.append(Run("demo.py", ["--backend", backend, "--limit", "1000000"], check_demo))
        args = ["--backend", backend, "--workers", "2"]
        runs.append(Run("pipeline.py", [*args, "--limit", "300000"], check_pipeline))
        runs.append(Run("pipeline.py", args, check_pipeline_ctrl_c))
        runs.append(Run("remote_workers.py", ["--backend", backend], check_remote_workers))
        for method in START_METHODS:
            args = ["--backend", backend, "--start-method", method, "--workers", "2"]
            runs.append(Run("pool_progress.py", [*args, "--limit", "300000"], check_pool_progress))
            args = ["--backend", backend, "--start-method", method]
            runs.append(Run("migrating.py", args, check_migrating))
    for backend in [b for b in BACKENDS if b != "trio"]:  # uvicorn runs on asyncio
        args = ["--backend", backend, "--port", "0", "--workers", "1"]
        runs.append(Run("service.py", args, check_service))
    runs += [Run("trio_worker.py", ["--start-method", m], check_trio_worker) for m in START_METHODS]
    return runs


def main(names: list[str]) -> int:
    runs = [r for r in plan() if not names or r.name.removesuffix(".py") in names]
    missing = {n for n in names} - {r.name.removesuffix(".py") for r in runs}
    if missing:
        print(f"examples: no such example: {', '.join(sorted(missing))}")
        return 2
    failed = 0
    for run in runs:
        started_at = time.monotonic()
        try:
            run.check(run)
        except (CheckFailed, subprocess.TimeoutExpired, OSError, ValueError) as exc:
            failed += 1
            print(f"FAILED {run.title}: {exc}", flush=True)
        else:
            print(f"ok     {run.title} ({time.monotonic() - started_at:.1f} s)", flush=True)
    print(f"examples: {len(runs) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main([name.removesuffix(".py") for name in sys.argv[1:]]))
