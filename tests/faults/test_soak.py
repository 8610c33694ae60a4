"""The soak script (``nox -s soak``) still runs and still balances its books.

It runs for minutes outside CI; here it runs for two seconds on one event loop and one
start method, so that a change that breaks it (or its accounting) shows up in the suite.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).with_name("soak.py")
ARGS = ["--duration", "2", "--round", "2", "--backend", "asyncio", "--start-method", "fork"]
ARGS += ["--kills-per-second", "10"]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork")


def test_a_short_soak_loses_only_what_it_documents() -> None:
    result = subprocess.run(
        [sys.executable, str(SOAK), *ARGS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"soak: sent=(\d+) received=(\d+) lost=(\d+) \(documented: (\d+) in flight at \d+ "
        r"kills\) duplicates=0 cancellations=(\d+) \(\d+% of \d+ calls\) kills=(\d+)",
        summary,
    )
    assert match, summary
    sent, received, lost, documented, cancellations, kills = map(int, match.groups())
    assert sent > 0 and received > 0 and cancellations > 0 and kills > 0, summary
    assert lost == documented == sent - received <= kills, summary
