"""Await messages from multiprocessing workers: no thread, no loop stall, nothing lost.

The names are imported on first use (PEP 562): ``import asyncmp`` loads none of the
package's modules, and ``asyncmp.open_pool`` (or ``from asyncmp import open_pool``) loads
the one that defines it, with what it needs. So a pool worker, which a spawn or forkserver
start imports by its module's name (``asyncmp._pool.worker``, and this file first), loads
only what it runs, and no anyio. Type checkers and IDEs read the imports below.
"""

import typing as _typing

if _typing.TYPE_CHECKING:
    from ._connection.connection import SEND_SHIELD_SECONDS as SEND_SHIELD_SECONDS
    from ._connection.connection import AsyncConnection as AsyncConnection
    from ._connection.connection import Pipe as Pipe
    from ._core.exceptions import AsyncmpError as AsyncmpError
    from ._core.exceptions import ConnectionEOF as ConnectionEOF
    from ._core.exceptions import ProtocolError as ProtocolError
    from ._core.exceptions import SharedMemoryError as SharedMemoryError
    from ._core.wire import DEFAULT_MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE
    from ._pool.map import PoolMap as PoolMap
    from ._pool.pool import Pool as Pool
    from ._pool.pool import PoolStatistics as PoolStatistics
    from ._pool.pool import open_pool as open_pool
    from ._pool.worker import RemoteTraceback as RemoteTraceback
    from ._process.process import TERMINATE_GRACE as TERMINATE_GRACE
    from ._process.process import AsyncProcess as AsyncProcess
    from ._process.process import Worker as Worker
    from ._process.process import WorkerExited as WorkerExited
    from ._process.process import open_process as open_process
    from ._process.process import open_worker as open_worker
    from ._queue.queue import DEFAULT_STALL_TIMEOUT as DEFAULT_STALL_TIMEOUT
    from ._queue.queue import AsyncQueue as AsyncQueue
    from ._queue.queue import JoinableQueue as JoinableQueue
    from ._queue.queue import Queue as Queue
    from ._queue.queue import SimpleQueue as SimpleQueue
    from ._remote.remote import DEFAULT_BACKLOG as DEFAULT_BACKLOG
    from ._remote.remote import DEFAULT_HANDSHAKE_TIMEOUT as DEFAULT_HANDSHAKE_TIMEOUT
    from ._remote.remote import AsyncListener as AsyncListener
    from ._remote.remote import connect as connect
    from ._remote.remote import serve as serve
    from ._shared.shared import SHARED_THRESHOLD as SHARED_THRESHOLD
    from ._shared.shared import shared as shared

__all__ = (
    "DEFAULT_BACKLOG",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_STALL_TIMEOUT",
    "SEND_SHIELD_SECONDS",
    "SHARED_THRESHOLD",
    "TERMINATE_GRACE",
    "AsyncConnection",
    "AsyncListener",
    "AsyncProcess",
    "AsyncQueue",
    "AsyncmpError",
    "ConnectionEOF",
    "JoinableQueue",
    "Pipe",
    "Pool",
    "PoolMap",
    "PoolStatistics",
    "ProtocolError",
    "Queue",
    "RemoteTraceback",
    "SharedMemoryError",
    "SimpleQueue",
    "Worker",
    "WorkerExited",
    "connect",
    "open_pool",
    "open_process",
    "open_worker",
    "serve",
    "shared",
)

__version__ = "0.1.0"

#: The module that defines each name of ``__all__`` (the imports above, for the run time:
#: ``tests/test_public_api.py`` checks that the two agree).
_HOMES = {
    "SEND_SHIELD_SECONDS": "._connection.connection",
    "AsyncConnection": "._connection.connection",
    "Pipe": "._connection.connection",
    "AsyncmpError": "._core.exceptions",
    "ConnectionEOF": "._core.exceptions",
    "ProtocolError": "._core.exceptions",
    "SharedMemoryError": "._core.exceptions",
    "DEFAULT_MAX_MESSAGE_SIZE": "._core.wire",
    "PoolMap": "._pool.map",
    "Pool": "._pool.pool",
    "PoolStatistics": "._pool.pool",
    "open_pool": "._pool.pool",
    "RemoteTraceback": "._pool.worker",
    "TERMINATE_GRACE": "._process.process",
    "AsyncProcess": "._process.process",
    "Worker": "._process.process",
    "WorkerExited": "._process.process",
    "open_process": "._process.process",
    "open_worker": "._process.process",
    "DEFAULT_STALL_TIMEOUT": "._queue.queue",
    "AsyncQueue": "._queue.queue",
    "JoinableQueue": "._queue.queue",
    "Queue": "._queue.queue",
    "SimpleQueue": "._queue.queue",
    "DEFAULT_BACKLOG": "._remote.remote",
    "DEFAULT_HANDSHAKE_TIMEOUT": "._remote.remote",
    "AsyncListener": "._remote.remote",
    "connect": "._remote.remote",
    "serve": "._remote.remote",
    "SHARED_THRESHOLD": "._shared.shared",
    "shared": "._shared.shared",
}

if not _typing.TYPE_CHECKING:  # for type checkers, a name not imported above doesn't exist

    def __getattr__(name: str) -> object:
        """Import the module that defines *name*, once; the name stays here after."""
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from importlib import import_module

        value = getattr(import_module(home, __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
