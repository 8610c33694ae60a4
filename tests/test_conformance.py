"""Every channel keeps every promise: the checks of ``tests/support/conformance.py``, run
for each channel of ``tests/support/channels.py``.

The channels: ``Pipe`` on each route (descriptor readiness, threads) and transport (a duplex
socketpair, a one-way ``os.pipe``); an ``AsyncConnection`` over a fake Windows
``PipeConnection`` (message mode, no descriptor) and an ``AsyncQueue`` over a ``Queue`` on one;
``connect()`` and ``serve()`` over a Unix socket and TCP loopback (each side as the async end);
a ``Worker`` from ``open_worker()``; and ``AsyncQueue`` over a ``Queue``, ``SimpleQueue`` and
``JoinableQueue`` on the descriptor route, a ``Queue`` on the thread route and a
``Manager().Queue()`` proxy.

A check that today's code fails, for a bug that is known and being fixed, is marked
``xfail(strict=True)`` for exactly the channels it fails on, with the issue that tracks it:
it turns into a failure (and the mark must go) when the fix lands. A failure seen only now
and then is marked ``xfail(strict=False)`` until its cause is found.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .support import conformance
from .support.channels import CHANNELS, Channel

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX channels and fork"),
]

#: (check, channel id) -> why it fails today.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}
#: (check, channel id) -> why it fails now and then (not strict: it may pass).
FLAKY_FAILURES: dict[tuple[str, str], str] = {}


def channels(
    check: str, where: Callable[[Channel], bool] = lambda channel: True
) -> pytest.MarkDecorator:
    """Parametrize a test over the channels that *where* accepts, marking known failures."""
    params = []
    for channel in CHANNELS:
        if not where(channel):
            continue
        marks = []
        reason = KNOWN_FAILURES.get((check, channel.id))
        if reason is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        reason = FLAKY_FAILURES.get((check, channel.id))
        if reason is not None:
            marks.append(pytest.mark.xfail(strict=False, reason=reason))
        params.append(pytest.param(channel, id=channel.id, marks=marks))
    return pytest.mark.parametrize("channel", params)


@channels("random-receives")
async def test_receives_cancelled_at_random_lose_nothing(channel: Channel) -> None:
    await conformance.check_receives_cancelled_at_random(channel, seed=20261202)


@channels("sends", lambda channel: channel.bounded)
async def test_cancelled_sends_are_all_or_nothing(channel: Channel) -> None:
    await conformance.check_cancelled_sends_are_all_or_nothing(channel, seed=20261203)


@channels("eof", lambda channel: channel.eof_error is not None)
async def test_eof_wakes_every_receiver(channel: Channel) -> None:
    await conformance.check_eof_wakes_every_receiver(channel)


@channels("aclose-receivers")
async def test_aclose_wakes_every_receiver(channel: Channel) -> None:
    await conformance.check_close_wakes_every_waiter(channel, "aclose", "receivers")


@channels("aclose-senders", lambda channel: channel.bounded)
async def test_aclose_wakes_every_sender(channel: Channel) -> None:
    await conformance.check_close_wakes_every_waiter(channel, "aclose", "senders")


@channels("close-receivers", lambda channel: channel.has_close)
async def test_close_wakes_every_receiver(channel: Channel) -> None:
    await conformance.check_close_wakes_every_waiter(channel, "close", "receivers")


@channels("close-senders", lambda channel: channel.has_close and channel.bounded)
async def test_close_wakes_every_sender(channel: Channel) -> None:
    await conformance.check_close_wakes_every_waiter(channel, "close", "senders")


@channels("buffered")
async def test_buffered_receive_still_checkpoints(channel: Channel) -> None:
    await conformance.check_buffered_receive_still_checkpoints(channel)


@channels("leaks")
async def test_leaves_nothing_behind(channel: Channel) -> None:
    await conformance.check_leaves_nothing_behind(channel)


@channels("flags", lambda channel: channel.fds)
async def test_shared_flags_never_change(channel: Channel) -> None:
    await conformance.check_shared_flags_never_change(channel)


@channels("threads")
async def test_starts_no_thread_where_it_promises_none(channel: Channel) -> None:
    await conformance.check_starts_no_thread(channel)


# --- receives cut in the middle of a frame, at cuts that Hypothesis picks ---------------------

MODES = ("waiting", "after-readiness")
sizes = st.one_of(
    st.integers(0, 64),
    st.integers(16_380, 16_390),
    st.integers(65_530, 65_545),
    st.integers(100_000, 300_000),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[tuple[int, str]]]:
    """(message sizes, [(cut offset, mode), ...] in increasing offset order); an offset
    counts the payloads' headers and bodies (a queue's pickles are a little longer)."""
    message_sizes = draw(st.lists(sizes, min_size=1, max_size=4))
    total = sum(8 + size for size in message_sizes)
    offsets = draw(st.lists(st.integers(0, total), min_size=1, max_size=3, unique=True))
    modes = draw(st.lists(st.sampled_from(MODES), min_size=len(offsets), max_size=len(offsets)))
    return message_sizes, list(zip(sorted(offsets), modes, strict=True))


@channels("mid-frame", lambda channel: channel.encode is not None)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
@example(scenario=([200_000], [(2, "waiting"), (60_004, "after-readiness")]))
@example(scenario=([200_000], [(60_004, "waiting")]))
@example(scenario=([10, 70_000], [(18, "after-readiness"), (20_000, "waiting")]))
@example(scenario=([0, 5], [(0, "waiting"), (8, "waiting"), (21, "after-readiness")]))
async def test_receive_cancelled_mid_frame_resumes_whole(
    channel: Channel, scenario: tuple[list[int], list[tuple[int, str]]]
) -> None:
    await conformance.check_receive_cancelled_mid_frame(channel, *scenario)


@channels("another-loop")
async def test_another_loop_is_refused(channel: Channel) -> None:
    await conformance.check_another_loop_is_refused(channel)
