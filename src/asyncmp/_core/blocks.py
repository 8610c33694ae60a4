"""What ``open_pool()``, ``open_worker()`` and ``open_process()`` return: an async context
manager that says so when it is used as what its block yields.

``pool = asyncmp.open_pool()`` starts nothing and gives no pool: the pool exists inside
``async with``. Without this wrapper, ``pool.run`` then fails with ``'_AsyncGenerator
ContextManager' object has no attribute 'run'``, which names neither the mistake nor the
fix. The wrapper passes ``__aenter__`` and ``__aexit__`` through to the
``@asynccontextmanager`` it wraps, and turns the use of a public name of the object the
block yields (and ``await``) into an error that shows the ``async with`` line to write.

Type checkers see neither ``__getattr__`` nor ``__await__`` (both are defined only when
``TYPE_CHECKING`` is false), so ``open_pool().run`` and ``await open_pool()`` stay type
errors, as they are for any async context manager.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Generic, ParamSpec, TypeVar

__all__ = ("BlockManager", "block_manager")

T = TypeVar("T")
P = ParamSpec("P")


class BlockManager(Generic[T]):
    """An async context manager whose block gets a *T*; using it as a *T* says to enter it.

    Enter it once, as the context manager it wraps allows.
    """

    __slots__ = ("_hint", "_manager", "_names", "_opener", "_var")

    def __init__(
        self, manager: AbstractAsyncContextManager[T], opener: str, var: str, names: frozenset[str]
    ) -> None:
        self._manager = manager
        self._opener = opener
        self._names = names
        self._var = var
        self._hint = f"async with asyncmp.{opener}(...) as {var}:"

    async def __aenter__(self) -> T:
        return await self._manager.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._manager.__aexit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<asyncmp.{self._opener}() block, not entered: {self._hint}>"

    if not TYPE_CHECKING:

        def __getattr__(self, name: str) -> object:
            # Only for names that normal lookup did not find; the slots are always set.
            if name.startswith("_") or name not in self._names:
                raise AttributeError(
                    f"{type(self).__name__!r} object has no attribute {name!r}", name=name
                )
            raise AttributeError(
                f"asyncmp.{self._opener}() returns an async context manager, not the object"
                f" with .{name}: use it as `{self._hint}`, then {self._var}.{name} inside"
                " the block",
                name=name,
                obj=self,
            )

        def __await__(self) -> object:
            raise TypeError(
                f"asyncmp.{self._opener}() can't be awaited: it returns an async context"
                f" manager; use it as `{self._hint}`"
            )


def block_manager(
    var: str, yields: type[object]
) -> Callable[[Callable[P, AbstractAsyncContextManager[T]]], Callable[P, BlockManager[T]]]:
    """Decorate an ``@asynccontextmanager`` function (above that decorator) whose block
    gets a *yields*, bound as *var* in the hint: calling it returns a
    :class:`BlockManager`."""
    names = frozenset(name for name in dir(yields) if not name.startswith("_"))

    def decorate(
        opener: Callable[P, AbstractAsyncContextManager[T]],
    ) -> Callable[P, BlockManager[T]]:
        @functools.wraps(opener)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> BlockManager[T]:
            return BlockManager(opener(*args, **kwargs), opener.__name__, var, names)

        return wrapper

    return decorate
