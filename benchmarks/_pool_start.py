"""5e's measuring process: the time from ``open_pool(2)`` to the first result, cold.

``_pools.py`` runs ``python -c "..." HERE PACKAGE METHOD BACKEND`` once per trial (HERE
being this directory, for the ``-c`` code to import this module from): a fresh
interpreter that imports the asyncmp package at PACKAGE (a directory) by its own name, before
the clock starts, so that the pool's spawned or forkserver workers import that same copy
(they are given this process's ``sys.path``). A forkserver is started first, untimed, as it
is after a program's first pool. Then the clock runs from ``open_pool(2, context=METHOD)``
until ``pool.run(os.getpid)`` has returned (entering the pool waits for both workers), on
BACKEND's event loop. It prints ``[wall seconds, CPU seconds of this process]`` as JSON.

This module imports nothing at the top that a worker would not: it is never imported by one
(the workers' main module is the ``-c`` string, which they don't import), but it stays small.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import sys
from pathlib import Path
from time import perf_counter, process_time
from typing import Any

__all__ = ("main",)


def main(argv: list[str]) -> int:
    package, method, backend = argv
    pkg = Path(package)
    sys.path.insert(0, str(pkg.parent))
    asyncmp: Any = importlib.import_module(pkg.name)
    if Path(asyncmp.__file__).resolve().parent != pkg.resolve():
        raise SystemExit(f"imported {pkg.name} from {asyncmp.__file__}, not from {pkg}")
    import anyio

    context = multiprocessing.get_context(method)
    if method == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()

    async def ready() -> tuple[float, float]:
        wall, cpu = perf_counter(), process_time()
        async with asyncmp.open_pool(2, context=context) as pool:
            await pool.run(os.getpid)
            return perf_counter() - wall, process_time() - cpu

    options: dict[str, Any] = {}
    if backend == "uvloop":
        import uvloop

        backend, options = "asyncio", {"loop_factory": uvloop.new_event_loop}
    print(json.dumps(anyio.run(ready, backend=backend, backend_options=options)))
    return 0
