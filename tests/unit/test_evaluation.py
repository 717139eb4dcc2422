"""Latency measurement set-up: the allocator keeps freed activation memory."""

from __future__ import annotations

import subprocess
import sys

# Resident memory after a 256 MiB tensor was allocated, touched and freed.
PROBE = """
import os, sys, torch
from switchprune.evaluation import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
x = torch.ones(64 * 1024 * 1024)
del x
pages = int(open("/proc/self/statm").read().split()[1])
print(applied, pages * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024))
"""


def _rss_after_free(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True
    ).stdout.split()
    return out[0], int(out[1])


def test_retain_freed_memory_keeps_large_blocks_in_the_process() -> None:
    applied, kept = _rss_after_free("retain")
    _, returned = _rss_after_free("default")
    assert applied == "True"
    # By default the freed 256 MiB go back to the system; retained, they stay resident.
    assert kept - returned > 200, (kept, returned)
