"""The one platform switch that picks an I/O route, kept where tests can flip it.

On POSIX a ``multiprocessing`` connection, a queue's pipe and a process sentinel are
descriptors: the fd route waits for them through ``_core.readiness`` and frames a connection's
bytes with asyncmp's own decoder. On Windows they are handles that no event loop can
poll, and a pipe is message-mode (no length prefix on the wire), so every wait runs in
asyncmp's threads and every message goes through the Connection's own ``recv_bytes``
and ``send_bytes``.

Code that chooses between the two asks :data:`POSIX_FDS` at call time, as
``_core.platform.POSIX_FDS``, never a copy of it, so the test suite can run the Windows
choices on Linux by setting it to ``False`` (see ``tests/test_platforms.py``). Code that
only type checkers need to tell apart uses ``sys.platform`` checks directly.
"""

from __future__ import annotations

import sys

__all__ = ("POSIX_FDS",)

#: True where connections, queue pipes and process sentinels are pollable POSIX
#: descriptors; False on Windows.
POSIX_FDS: bool = sys.platform != "win32"
