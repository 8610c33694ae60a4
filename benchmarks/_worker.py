"""The benchmark's worker process: one forked child that produces, echoes and copies.

One worker lives for the whole run, so no trial pays for a fork and every trial talks
to a warm process. The parent drives it over a control connection: it sends a command,
runs its side of the trial on a data connection, then waits for the worker's
acknowledgement, so a trial never starts while the previous one still has bytes in
flight.

Teardown is the parent's job (:meth:`Worker.close`): it closes its ends, which makes
the worker see EOF on the control connection or a broken pipe on the data one, then
joins the process, terminating it only if it does not exit in time. The worker ignores
SIGINT, so a Ctrl-C in the terminal (which signals the whole process group) reaches the
parent alone and the parent's ``finally`` decides the order of things.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import struct
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

__all__ = ("Command", "Worker", "answer", "reap", "serve", "stop")

Connection = multiprocessing.connection.Connection

#: ("stream", transport, mode, count, obj): send *count* pickled copies of *obj*, one
#: ``send()`` each (mode "send") or as pre-framed batches written raw (mode "batch").
#: ("bytes", transport, size, count): ``send_bytes()`` a *size*-byte payload *count* times.
#: ("raw", transport, size, count): write *size* bytes *count* times, no framing.
#: ("echo", count): send back each of the next *count* messages.
Command = tuple[Any, ...]

_HEADER = struct.Struct("!i")
#: Frames per raw write in batch mode (about 100 KiB of 100-byte messages).
_FRAMES_PER_BATCH = 1024


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _Producer:
    """The worker's side: owns the far ends of the data connections."""

    def __init__(self, sock: Connection, pipe_w: Connection) -> None:
        self._conns = {"socket": sock, "pipe": pipe_w}
        self._payloads: dict[int, bytes] = {}

    def _payload(self, size: int) -> bytes:
        payload = self._payloads.get(size)
        if payload is None:
            # Real bytes, not calloc'd zero pages, so every copy touches memory.
            payload = self._payloads[size] = b"x" * size
        return payload

    def stream(self, transport: str, mode: str, count: int, obj: object) -> None:
        conn = self._conns[transport]
        if mode == "send":
            send = conn.send
            for _ in range(count):
                send(obj)
            return
        pickled = bytes(ForkingPickler.dumps(obj))
        frame = _HEADER.pack(len(pickled)) + pickled
        fd = conn.fileno()
        batches, rest = divmod(count, _FRAMES_PER_BATCH)
        batch = frame * _FRAMES_PER_BATCH
        for _ in range(batches):
            _write_all(fd, batch)
        if rest:
            _write_all(fd, frame * rest)

    def send_bytes(self, transport: str, size: int, count: int) -> None:
        conn = self._conns[transport]
        payload = self._payload(size)
        for _ in range(count):
            conn.send_bytes(payload)

    def raw(self, transport: str, size: int, count: int) -> None:
        fd = self._conns[transport].fileno()
        payload = self._payload(size)
        for _ in range(count):
            _write_all(fd, payload)

    def echo(self, count: int) -> None:
        conn = self._conns["socket"]
        for _ in range(count):
            conn.send_bytes(conn.recv_bytes())

    def run(self, cmd: Command) -> None:
        kind = cmd[0]
        if kind == "stream":
            self.stream(*cmd[1:])
        elif kind == "bytes":
            self.send_bytes(*cmd[1:])
        elif kind == "raw":
            self.raw(*cmd[1:])
        elif kind == "echo":
            self.echo(*cmd[1:])
        elif kind == "prepare":
            for size in cmd[1]:
                self._payload(size)
        else:
            raise ValueError(f"unknown command {kind!r}")


def serve(ctrl: Connection, run: Callable[[Command], Any]) -> None:
    """A forked helper's command loop: ``run(cmd)`` for each command the parent sends on
    *ctrl*, answering ``("done", what it returned)`` or ``("error", repr(exc))``, until
    ``("stop",)`` or the parent's end closes (then it returns quietly: the parent is
    tearing down)."""
    while True:
        try:
            cmd = ctrl.recv()
        except (EOFError, OSError):
            return
        if cmd[0] == "stop":
            return
        try:
            answer = ("done", run(cmd))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            return  # the parent closed its end: it is tearing down
        except Exception as exc:
            answer = ("error", repr(exc))
        try:
            ctrl.send(answer)
        except OSError:
            return


def answer(ctrl: Connection, who: str, timeout: float | None = None) -> Any:
    """The helper's answer to the command in progress (what it returned), within
    *timeout* seconds (None: however long it takes)."""
    if timeout is not None and not ctrl.poll(timeout):
        raise RuntimeError(f"{who} did not answer within {timeout} s")
    status, detail = ctrl.recv()
    if status != "done":
        raise RuntimeError(f"{who} failed: {detail}")
    return detail


def stop(
    process: multiprocessing.process.BaseProcess,
    ctrl: Connection,
    *also: Connection,
    grace: float = 5.0,
) -> None:
    """Ask a helper to stop, close *ctrl* and this process's other ends of its connections,
    then reap it (:func:`reap`). Safe to call more than once, and after Ctrl-C."""
    try:
        ctrl.send(("stop",))
    except (OSError, ValueError):
        pass
    for conn in (ctrl, *also):
        conn.close()
    reap(process, grace)


def reap(process: multiprocessing.process.BaseProcess, grace: float) -> None:
    """Join *process*, terminating it if it has not ended within *grace* seconds and
    killing it as a last resort."""
    process.join(grace)
    if process.is_alive():
        process.terminate()
        process.join(5.0)
    if process.is_alive():  # pragma: no cover - last resort
        process.kill()
        process.join()


def _worker_main(
    ctrl: Connection, sock: Connection, pipe_w: Connection, parent_ends: list[Connection]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # fork copied the parent's ends too; holding them would hide the parent's EOF.
    for conn in parent_ends:
        conn.close()
    serve(ctrl, _Producer(sock, pipe_w).run)


class Worker:
    """The parent's handle on the worker process and the connections to it."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._ctrl, child_ctrl = ctx.Pipe()
        self._sock, child_sock = ctx.Pipe()  # duplex: a socketpair, the stdlib default
        self._pipe_r, child_pipe_w = ctx.Pipe(duplex=False)  # simplex: an os.pipe
        self._process = ctx.Process(
            target=_worker_main,
            args=(child_ctrl, child_sock, child_pipe_w, [self._ctrl, self._sock, self._pipe_r]),
            name="asyncmp-bench-worker",
            daemon=True,
        )
        try:
            self._process.start()
        finally:
            for conn in (child_ctrl, child_sock, child_pipe_w):
                conn.close()

    def parent_ends(self) -> list[Connection]:
        """This process's ends of the worker's connections: a process forked later must
        close its copies, or the worker would not see EOF when the parent closes them."""
        return [self._ctrl, self._sock, self._pipe_r]

    def data(self, transport: str) -> Connection:
        """The parent's end of the data connection for *transport* ("socket"/"pipe")."""
        return self._sock if transport == "socket" else self._pipe_r

    def start(self, cmd: Command) -> None:
        self._ctrl.send(cmd)

    def finish(self) -> None:
        """Wait for the worker to acknowledge the command in progress."""
        answer(self._ctrl, "worker")

    def run(self, cmd: Command) -> None:
        self.start(cmd)
        self.finish()

    def close(self) -> None:
        """Stop the worker and reap it. Safe to call more than once, and after Ctrl-C."""
        stop(self._process, self._ctrl, self._sock, self._pipe_r)
