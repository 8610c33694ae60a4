"""Griffe extension for the docs build: show an ``@asynccontextmanager`` as what it returns.

Read from the source, ``open_worker()`` is an async generator function: an ``async`` badge
and ``-> AsyncIterator[Worker]``. What a caller gets is an async context manager. This drops
the badge and shows the return type as ``AbstractAsyncContextManager[Worker]``, which is what
type checkers infer for the decorated function (``async with open_worker(...) as worker``).
"""

from __future__ import annotations

from typing import Any

import griffe

_DECORATORS = {"asynccontextmanager", "contextlib.asynccontextmanager"}
_ITERATORS = {"AsyncIterator", "AsyncGenerator"}


def _yielded(returns: object) -> object | None:
    """``X`` from ``AsyncIterator[X]`` or ``AsyncGenerator[X, None]``, else None."""
    if not isinstance(returns, griffe.ExprSubscript):
        return None
    left = returns.left
    if not isinstance(left, griffe.ExprName) or left.name not in _ITERATORS:
        return None
    inner = returns.slice
    if isinstance(inner, griffe.ExprTuple):
        return inner.elements[0] if inner.elements else None
    return inner


class AsyncContextManagers(griffe.Extension):
    """Rewrite every ``@asynccontextmanager`` function's badge and return annotation."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if isinstance(obj, griffe.Function):
            self._rewrite(obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)  # type: ignore[arg-type]

    def _rewrite(self, func: griffe.Function) -> None:
        if not any(str(decorator.value) in _DECORATORS for decorator in func.decorators):
            return
        yielded = _yielded(func.returns)
        if yielded is None:
            return
        func.labels.discard("async")
        manager = griffe.ExprName("AbstractAsyncContextManager", parent="contextlib")
        func.returns = griffe.ExprSubscript(manager, yielded)  # type: ignore[arg-type]
