"""The exceptions asyncmp adds to anyio's.

asyncmp reuses anyio's exceptions wherever one fits (``ClosedResourceError``,
``BrokenResourceError``, ``BusyResourceError``, ``WouldBlock``, ``EndOfStream``) and
adds only what has no equivalent, all under :class:`AsyncmpError`.
"""

from __future__ import annotations

import anyio

__all__ = ("AsyncmpError", "ConnectionEOF", "ProtocolError", "SharedMemoryError")


class AsyncmpError(Exception):
    """Base class of the exceptions that asyncmp defines."""


class ConnectionEOF(AsyncmpError, EOFError, anyio.EndOfStream):
    """The peer closed its end: there are no more messages.

    It is an :class:`EOFError`, as ``Connection.recv()`` raises in the stdlib, and an
    :class:`anyio.EndOfStream`, as anyio streams raise, so code from either world
    catches it.
    """


class ProtocolError(AsyncmpError, anyio.BrokenResourceError):
    """The byte stream broke the wire protocol, so the connection can't be trusted.

    Raised for a length header that is negative (other than the ``-1`` escape) or above
    ``max_message_size``, before anything of that size is allocated. The connection is
    broken from then on.
    """


class SharedMemoryError(AsyncmpError):
    """A :func:`~asyncmp.shared` object could not be sent or rebuilt through shared memory.

    Raised when pickling one finds no room for its segment (``/dev/shm`` full: the
    cause is the ``OSError`` with ``ENOSPC``), when unpickling one finds its segment
    gone (received already, or sent from another machine), when a reference is not one
    asyncmp made (a foreign name, a size larger than the segment), and when one meets a
    connection to another machine (``connect()``, ``serve()``).
    """
