"""Another event loop, in a thread of its own: what a test needs to show that an object
refuses a loop other than its own, at once, and says how to reach it from there.

:func:`from_another_loop` runs one awaited call in a new asyncio or trio loop in another
thread while the test's own loop goes on (its waiting tasks stay waiting), and says what
the call raised and how long it took; :func:`assert_refused` checks that it was the
``RuntimeError`` of :class:`asyncmp._core.loop.LoopBinding`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from .io import wait_until

__all__ = ("FOREIGN_BACKENDS", "PROMPT", "Outcome", "assert_refused", "from_another_loop")

#: The libraries the other loop runs (uvloop is an asyncio loop to this check).
FOREIGN_BACKENDS = ("asyncio", "trio")
#: A "no hang" bound on a call that must raise at once. The other loop gives up on the call
#: after twice this, so a call that waits fails the test instead of hanging it.
PROMPT = 5.0


@dataclass
class Outcome:
    """What one call in the other loop did."""

    backend: str
    value: Any = None
    error: BaseException | None = None
    seconds: float = math.inf


async def from_another_loop(
    call: Callable[[], Awaitable[Any]], backend: str, *, timeout: float = 2 * PROMPT
) -> Outcome:
    """``await call()`` in a new *backend* loop (``"asyncio"`` or ``"trio"``) in a thread
    of its own, while this loop goes on; return its outcome once that thread has ended.
    The other loop cancels the call after *timeout* seconds (then ``error`` is a
    ``TimeoutError``)."""
    outcome = Outcome(backend)

    async def run_call() -> None:
        start = time.monotonic()
        try:
            with anyio.fail_after(timeout):
                outcome.value = await call()
        except BaseException as exc:  # handed to the test
            outcome.error = exc
        finally:
            outcome.seconds = time.monotonic() - start

    thread = threading.Thread(
        target=anyio.run, args=(run_call,), kwargs={"backend": backend}, name="test-other-loop"
    )
    thread.start()
    try:
        # A thread's end: no event announces it (see wait_until).
        await wait_until(lambda: not thread.is_alive(), f"the {backend} loop ended", timeout + 10)
    finally:
        thread.join(timeout + 10)
    return outcome


def assert_refused(outcome: Outcome, what: str) -> None:
    """The call raised ``RuntimeError`` at once, saying that *what* ("this Pool") belongs
    to the loop it came from and how to call it from another thread."""
    error = outcome.error
    assert isinstance(error, RuntimeError), f"from {outcome.backend}: {outcome}"
    message = str(error)
    assert f"{what} belongs to the event loop that" in message, message
    assert "which still runs" in message, message
    assert "anyio.from_thread.run(" in message, message
    assert "BlockingPortal" in message, message
    assert outcome.seconds < PROMPT, f"refused only after {outcome.seconds:.1f} s"
