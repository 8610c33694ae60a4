"""Await messages from multiprocessing workers: no thread, no loop stall, nothing lost."""

from __future__ import annotations

from ._connection import SEND_SHIELD_SECONDS as SEND_SHIELD_SECONDS
from ._connection import AsyncConnection as AsyncConnection
from ._connection import Pipe as Pipe
from ._exceptions import AsyncmpError as AsyncmpError
from ._exceptions import ConnectionEOF as ConnectionEOF
from ._exceptions import ProtocolError as ProtocolError
from ._wire import DEFAULT_MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE

__all__ = (
    "DEFAULT_MAX_MESSAGE_SIZE",
    "SEND_SHIELD_SECONDS",
    "AsyncConnection",
    "AsyncmpError",
    "ConnectionEOF",
    "Pipe",
    "ProtocolError",
)

__version__ = "0.1.0"
