"""Await messages from multiprocessing workers: no thread, no loop stall, nothing lost."""

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
