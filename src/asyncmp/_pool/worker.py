"""What runs inside a pool's worker processes, and the messages it exchanges.

This module is imported by the workers themselves (spawn and forkserver import it by
name), so it imports only the standard library, ``_core.wire`` and ``_core.child``: each
module more is paid at every worker start. ``asyncmp/__init__.py``, which runs first,
imports its names on first use, so a worker loads no anyio and nothing of the parent's
side (``tests/test_layers.py`` checks); the shared-memory module is loaded only when
``shared()`` values arrive.

The conversation over a worker's duplex pipe, its messages and their tags, is described
in ``_pool.protocol``, beside the tags both sides use.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from time import perf_counter
from typing import Any

from .._core.child import Owner, begin
from .._core.wire import dumps
from .protocol import BATCH, FAILED, INIT_FAILED, OK, READY

__all__ = ("RemoteTraceback", "portable_error", "serve")

#: ``(exception, the worker's formatted traceback)``.
Error = tuple[BaseException, str]


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a pool worker, as text.

    A call's exception is re-raised in the caller with one of these as its
    ``__cause__``, so the report shows where in the worker it was raised.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\n--- traceback in the pool worker ---\n{self.text}"


class _PickledError(Exception):
    """An exception of the worker's, pickled here, on its way to the parent.

    It unpickles there as that exception; where that fails (its class lives in a module
    only the worker imports, say), as a ``pickle.PicklingError`` that names it and says
    why. So the reply that carries it unpickles in any case, and an exception that can't
    fails only the call it belongs to, with its text. It stands where the exception
    stood in an :data:`Error`, and nothing but the parent's unpickler ever sees it.
    """

    def __init__(self, data: bytes, summary: str) -> None:
        super().__init__(summary)
        self.data = data
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickle_error, (self.data, self.summary))


def _unpickle_error(data: bytes, summary: str) -> BaseException:
    """Unpickle an exception that a worker sent (in the parent), or say why it can't be."""
    try:
        exc: BaseException = ForkingPickler.loads(data)
    except Exception as why:
        why_text = f"{type(why).__name__}: {why}"
        return pickle.PicklingError(
            f"{summary}, which can't be unpickled in the parent ({why_text})"
        )
    return exc


def portable_error(exc: BaseException, what: str) -> Error:
    """*exc* and its traceback as text, in a form that pickles, and unpickles wherever
    the parent can (if it can't, it gets a ``pickle.PicklingError`` naming *exc*)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    summary = f"{what} raised {type(exc).__qualname__}: {exc}"
    try:
        # Pickled once, here. Whether it unpickles (an exception whose __init__ takes
        # other arguments than it passes to BaseException pickles fine and fails to
        # unpickle) is for the parent to find out, where it matters.
        data = dumps(exc)
    except Exception as why:
        why_text = f"{type(why).__name__}: {why}"
        message = f"{summary}, which can't be sent back from the worker ({why_text})"
        return pickle.PicklingError(message), text
    return _PickledError(data, summary), text


def _describe(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


_SHARED_MODULE = "asyncmp._shared.shared"


def _reply(
    job_id: int, fn: object, values: list[Any], errors: dict[int, Error] | None, seconds: float
) -> bytes:
    """The reply's bytes; a result that can't be pickled fails its own call only.

    Every value is pickled once: a second pickle of a ``shared()`` object would make a
    second segment, and the first would stay in ``/dev/shm`` until the program ends.
    """
    # asyncmp._shared.shared (this package's, whatever its name) is loaded here if something in
    # this process can make a segment: a wrapper exists only once shared() was called.
    # Looked up, not imported: this module imports nothing that imports anyio.
    shared: Any = sys.modules.get(_SHARED_MODULE)
    if shared is None:
        try:
            return dumps((OK, job_id, values, errors, seconds, 0, False))
        except Exception:
            return _reply_value_by_value(job_id, fn, values, errors, seconds, None)
    if values and type(values[0]) is shared.Shared:
        # Results of their own in shared memory (a function that returns shared(...)):
        # pickled one by one from the start, so that one that fails needs none of the
        # others pickled again, and their bytes are known (a map counts them).
        return _reply_value_by_value(job_id, fn, values, errors, seconds, shared)
    made = shared.SegmentsMade.standing()
    made.segments.clear()
    try:
        return dumps((OK, job_id, values, errors, seconds, 0, False))
    except Exception:
        made.discard()  # segments of values pickled before one failed: never sent
    return _reply_value_by_value(job_id, fn, values, errors, seconds, shared)


#: The pickle that stands for the value of a call that failed.
_NONE = dumps(None)


def _reply_value_by_value(
    job_id: int,
    fn: object,
    values: list[Any],
    errors: dict[int, Error] | None,
    seconds: float,
    shared: Any,
) -> bytes:
    """A reply with each value pickled on its own: one that can't be pickled fails its
    own call, and takes back the segments it made before it failed."""
    errors = dict(errors or {})
    pickles: list[bytes] = []
    nbytes = 0
    made = None if shared is None else shared.SegmentsMade.standing()
    for i, value in enumerate(values):
        if made is not None:
            made.segments.clear()
        try:
            data = dumps(value)
        except Exception as why:
            if made is not None:
                made.discard()
            data = _NONE
            error = pickle.PicklingError(
                f"the result of {_describe(fn)}, a {type(value).__qualname__}, can't be "
                f"sent back from the worker ({type(why).__name__}: {why})"
            )
            errors[i] = (error, "".join(traceback.format_exception(error)))
        else:
            if made is not None:
                nbytes += made.nbytes
        pickles.append(data)
    return dumps((OK, job_id, pickles, errors or None, seconds, nbytes, True))


def serve(
    conn: Connection,
    owner: Owner,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
) -> None:
    """A worker's whole life: start clean, run the initializer, then serve requests
    until EOF.

    An exception from a call goes back to the caller; ``SystemExit`` and other
    ``BaseException``\\ s end the worker, as they would end a plain process, and the
    caller gets ``WorkerExited``.

    Before the initializer (which may choose otherwise), the worker starts as a new
    interpreter would (see ``_core.child``): it dies with *owner*, the signal handlers it
    inherited are back to the defaults (SIGTERM ends it: that is how the pool stops a
    busy worker), and no event loop runs. SIGINT is ignored: the parent owns the worker's
    life, and a Ctrl-C in a terminal, which reaches the whole process group, must not end
    running calls with a traceback here; the parent's block exit stops the workers.
    """
    begin(owner, ignore_sigint=True)
    hello: tuple[str, object] = (READY, os.getpid())
    if initializer is not None:
        try:
            initializer(*initargs)
        except Exception as exc:
            hello = (INIT_FAILED, portable_error(exc, f"the initializer {_describe(initializer)}"))
    try:
        conn.send_bytes(dumps(hello))
    except OSError:
        return  # the pool closed before this worker was ready (a replacement it no longer needs)
    if hello[0] == INIT_FAILED:
        return
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the stop request (the parent closed its end, maybe with replies unread)
        try:
            _handle(conn, request)
        except OSError:
            return  # the parent closed its end while a call ran: nobody waits for replies


def _handle(conn: Connection, request: bytes) -> None:
    """Run one request (a job, or a batch of them) and send the replies."""
    parts = [request]
    try:
        message = ForkingPickler.loads(request)
        if message[0] == BATCH:
            parts = message[1]
    except Exception as exc:
        _send_failed(conn, exc)
        return
    for part in parts:
        if part is not request:
            try:
                message = ForkingPickler.loads(part)
            except Exception as exc:
                _send_failed(conn, exc)
                continue
        _run_job(conn, message)


def _send_failed(conn: Connection, exc: Exception) -> None:
    error = portable_error(exc, "reading the request")
    conn.send_bytes(dumps((FAILED, None, error)))


def _run_job(
    conn: Connection,
    job: tuple[int, Callable[..., Any] | bytes, list[Any], bool],
) -> None:
    start = perf_counter()
    job_id, fn_or_pickle, arglist, pickled = job
    fn: Callable[..., Any]
    if isinstance(fn_or_pickle, bytes):
        try:
            fn = ForkingPickler.loads(fn_or_pickle)
        except Exception as exc:
            _send_failed(conn, exc)  # as if the whole request could not be read
            return
    else:
        fn = fn_or_pickle
    values: list[Any] = []
    errors: dict[int, Error] | None = None
    if pickled:
        values, errors = _run_pickled(fn, arglist)
    else:
        for i, args in enumerate(arglist):
            try:
                values.append(fn(*args))
            except Exception as exc:
                values.append(None)
                if errors is None:
                    errors = {}
                errors[i] = portable_error(exc, _describe(fn))
    reply = _reply(job_id, fn, values, errors, perf_counter() - start)
    conn.send_bytes(reply)  # raises OSError if the parent left


def _run_pickled(
    fn: Callable[..., Any], pickles: list[bytes]
) -> tuple[list[Any], dict[int, Error] | None]:
    """Unpickle every call's arguments first (mapping their segments, if any), then make
    the calls. Arguments that can't be unpickled fail their own call."""
    errors: dict[int, Error] = {}
    arglist: list[Any] = []
    for i, data in enumerate(pickles):
        try:
            arglist.append(ForkingPickler.loads(data))
        except Exception as exc:
            arglist.append(None)
            errors[i] = portable_error(exc, "reading the arguments")
    values: list[Any] = []
    for i, args in enumerate(arglist):
        if i in errors:
            values.append(None)
            continue
        try:
            values.append(fn(*args))
        except Exception as exc:
            values.append(None)
            errors[i] = portable_error(exc, _describe(fn))
        args = arglist[i] = None  # the call is done: its arguments (and segments) may go
    return values, errors or None
