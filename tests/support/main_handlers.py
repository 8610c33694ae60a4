"""A program whose main module installs a signal handler as it is imported, as a server's
main module may; run as ``python -m tests.support.main_handlers METHOD``.

It prints what a pool worker started with METHOD does with SIGUSR1 and SIGTERM. A spawn
or forkserver worker imports this module too (as ``__mp_main__``), and installs the
handler itself, as a new interpreter would: that one is its own. A forked worker's copy
of the parent's is not.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _on_usr1(signum: int, frame: FrameType | None) -> None:
    """Nothing: a handler that the main module installs at import."""


signal.signal(signal.SIGUSR1, _on_usr1)


def _main(method: str) -> None:
    import multiprocessing

    import anyio

    import asyncmp
    from tests.support import workers

    async def main() -> None:
        context = multiprocessing.get_context(method)
        async with asyncmp.open_pool(1, context=context) as pool:
            handlers = await pool.run(workers.signal_handlers)
        print(handlers["SIGUSR1"], handlers["SIGTERM"], sep=",")

    anyio.run(main)


if __name__ == "__main__":
    _main(sys.argv[1])
