"""Name what a pool call can't pickle: the function, or which argument or item.

Pickling a request fails with the error of its first part that can't be pickled, which
often doesn't say which part that is (``cannot pickle '_thread.lock' object``, with a
dozen arguments). Only then, on that failure, :func:`explain` pickles the parts one by
one, in the order the request pickles them (the function, then each argument), and
names the first that fails alone, with the original error as the ``__cause__`` and, where
it can be made with a message alone, of the same type.

A part that holds a ``shared()`` object is not pickled again as it is: each pickling of
one makes a shared memory segment, which nobody would receive. The parts are pickled in
a context that refuses ``shared()`` objects (``_shared.shared.refusing``), and a ``shared()``
argument itself is tried through the object it wraps, which is what can fail, with its
buffers left out of the trial pickle (not copied).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from .._core.exceptions import SharedMemoryError
from .._core.wire import dumps
from .._shared.shared import Shared, refusing

__all__ = ("explain",)

#: Where a function that can't be pickled by reference comes from.
_NAMELESS = ("<lambda>", "<locals>", "local object")


def explain(
    exc: Exception, fn: Callable[..., object], calls: list[tuple[Any, ...]], first: int | None
) -> Exception:
    """The error to raise for *exc*, which pickling the request for ``fn(*args)`` for
    each ``args`` of *calls* raised; *exc* itself if no one part fails alone (or a
    ``shared()`` object failed: its error says what it is).

    *first* is the index of the first call's item in a ``pool.map()``, ``None`` for
    ``pool.run()``.
    """
    if isinstance(exc, SharedMemoryError):
        return exc
    call = "pool.run(fn, *args)" if first is None else "pool.map(fn, iterable)"
    if not _pickles(fn):
        message = f"{call}: fn ({fn!r}) can't be pickled: {exc}"
        qualname = str(getattr(getattr(fn, "func", fn), "__qualname__", ""))
        if any(mark in qualname or mark in str(exc) for mark in _NAMELESS):
            message += (
                "; a worker imports fn by its module and name, so it must be defined at"
                " module level (a lambda or a function defined inside another has no such"
                " name)"
            )
        return _like(exc, message)
    for k, args in enumerate(calls):
        for j, arg in enumerate(args):
            if _pickles(arg):
                continue
            what = f"args[{j}]" if first is None else f"the item at index {first + k}"
            return _like(exc, f"{call}: {what} ({_kind(arg)}) can't be pickled: {exc}")
    return exc


def _pickles(obj: object) -> bool:
    """Whether *obj* pickles alone; a ``shared()`` object in it is not pickled (taken as
    fine): that would make a segment."""
    with refusing("not pickled while looking for what can't be"):
        try:
            if isinstance(obj, Shared):
                # What Shared.__reduce_ex__ pickles, its buffers left out of band: tried,
                # not copied (a shared() array may be most of the memory there is).
                pickle.dumps(obj.obj, protocol=5, buffer_callback=_out_of_band)
            else:
                dumps(obj)
        except SharedMemoryError:
            return True
        except Exception:
            return False
    return True


def _out_of_band(buffer: pickle.PickleBuffer) -> bool:
    return False


def _kind(obj: object) -> str:
    if isinstance(obj, Shared):
        return f"a shared() {_type_name(obj.obj)}"
    return f"of type {_type_name(obj)}"


def _type_name(obj: object) -> str:
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _like(exc: Exception, message: str) -> Exception:
    """An exception of *exc*'s type with *message* (``pickle.PicklingError`` if that type
    can't be made from a message alone), caused by *exc*."""
    try:
        error = type(exc)(message)
    except Exception:
        error = pickle.PicklingError(message)
    if str(error) != message:
        error = pickle.PicklingError(message)
    error.__cause__ = exc
    return error
