"""What memory a test costs: the process's resident size, where the platform tells it."""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ("RESIDENT_KNOWN", "resident")

#: Linux reads it from /proc, macOS asks ps; elsewhere tests that need it are skipped.
RESIDENT_KNOWN = os.path.exists("/proc/self/statm") or sys.platform == "darwin"


def resident() -> int:
    """This process's resident memory now, in bytes: what it costs, as opposed to what
    it reserved (a large allocation is mapped fresh and costs memory only once written,
    which ``tracemalloc`` can't tell apart)."""
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    out = subprocess.run(
        ["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, check=True, text=True
    )
    return int(out.stdout.strip()) * 1024
