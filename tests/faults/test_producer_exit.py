"""Fault case 6: a producer exits right after its last put.

Setup: a ``multiprocessing.Queue`` whose ``AsyncQueue`` in this process gets; a producer
process puts items, either through an ``AsyncQueue`` of its own (on the event loop the test
runs on) or through the plain queue, and exits at once, one of five ways:

* ``async-aclose-return``: ``await aclose()``, then a normal exit;
* ``async-aclose-os_exit``: ``await aclose()``, then ``os._exit(0)``;
* ``sync-return``: a plain ``put()`` loop, then a normal exit (the stdlib flushes at exit);
* ``async-os_exit`` and ``sync-os_exit``: ``os._exit(0)`` right after the last put.

The items of the three lossless ways include some larger than a pipe holds, so the producer's
feeder thread is still writing when the producer starts to exit; those of the two lossy ways
are small, so that whatever the feeder wrote is whole.

Fault: the producer exits right after its last ``put()`` (or ``aclose()``).

Expected: the three lossless ways deliver every item, whole and in order (``aclose()`` waited
for the feeder thread, as ``Queue.close()`` plus ``join_thread()`` do, and a normal exit does
that too). The two ``os._exit`` ways deliver a prefix of the items, whole and in order, and
then nothing more.

Lost: nothing, with ``aclose()`` or a normal exit. With ``os._exit`` (or any death) before
``aclose()``: every item the feeder thread had not yet written, documented as lossy.
"""

from __future__ import annotations

import multiprocessing
import queue
import sys
from typing import Any

import anyio
import pytest

from tests.support.queues import backend_of, child, open_queue
from tests.support.workers import MPContext

from . import fault_workers
from .fault_workers import EXIT_HOWS

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="the peers are POSIX processes"),
]

LOSSLESS = ("async-aclose-return", "async-aclose-os_exit", "sync-return")


def items_for(how: str) -> list[Any]:
    if how in LOSSLESS:
        sizes = [10, 100 * 1024, 3, 200 * 1024, 0, 70 * 1024] * 4
    else:
        sizes = [10, 100, 3, 50] * 25  # 100 small items, all of them fit in the pipe
    return [(i, bytes([i % 256]) * size) for i, size in enumerate(sizes)]


async def run_producer(ctx: Any, how: str, anyio_backend: object) -> None:
    backend, on_uvloop = backend_of(anyio_backend)
    items = items_for(how)
    got: list[Any] = []
    async with open_queue(use_threads=False, ctx=ctx) as aq:
        async with child(
            fault_workers.produce_then_exit, aq.queue, items, how, backend, on_uvloop, ctx=ctx
        ) as producer:
            with anyio.fail_after(30):
                while len(got) < len(items):
                    try:
                        got.append(await aq.get(timeout=0.2))
                    except queue.Empty:
                        if not producer.is_alive():
                            break  # it is gone, and whatever it wrote has been read
        assert producer.exitcode == 0
    assert got == items[: len(got)], "an item arrived torn, twice or out of order"
    if how in LOSSLESS:
        assert len(got) == len(items), f"{len(items) - len(got)} items lost"
    else:
        print(f"{how}: {len(items) - len(got)} of {len(items)} items lost (documented)")


async def test_producer_that_closes_then_returns_loses_nothing_on_any_start_method(
    mp_context: MPContext, anyio_backend: object
) -> None:
    await run_producer(mp_context, "async-aclose-return", anyio_backend)


@pytest.mark.parametrize("how", [h for h in EXIT_HOWS if h != "async-aclose-return"])
async def test_producer_exit_right_after_put(how: str, anyio_backend: object) -> None:
    await run_producer(multiprocessing.get_context("fork"), how, anyio_backend)
