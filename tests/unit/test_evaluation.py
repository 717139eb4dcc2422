"""Measurements of a network: size before and after compaction, and latency."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from switchprune.evaluation import measure_latency, size_metrics
from switchprune.models import ModelSpec, build_model

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


@pytest.mark.slow  # a fresh Python process or an MLflow store
def test_retain_freed_memory_keeps_large_blocks_in_the_process() -> None:
    applied, kept = _rss_after_free("retain")
    _, returned = _rss_after_free("default")
    assert applied == "True"
    # By default the freed 256 MiB go back to the system; retained, they stay resident.
    assert kept - returned > 200, (kept, returned)


def test_size_metrics_count_weights_and_multiply_adds_per_sample() -> None:
    full = build_model(ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 12, "fc2": 6}))
    small = build_model(ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 6, "fc2": 3}))
    metrics = size_metrics(full, small, (1, 8, 8))
    # 64 -> 12 -> 6 -> 10 and 64 -> 6 -> 3 -> 10: weights plus biases; one MAC per weight.
    assert metrics == {
        "params_before": 64 * 12 + 12 + 12 * 6 + 6 + 6 * 10 + 10,
        "params_after": 64 * 6 + 6 + 6 * 3 + 3 + 3 * 10 + 10,
        "macs_before": 64 * 12 + 12 * 6 + 6 * 10,
        "macs_after": 64 * 6 + 6 * 3 + 3 * 10,
        "params_ratio": pytest.approx(451 / 928),
        "macs_ratio": pytest.approx(432 / 900),
    }
    assert all(isinstance(v, float) for v in metrics.values())


class _Sleeper(torch.nn.Module):
    """A forward pass that takes a scripted time per call."""

    def __init__(self, seconds: list[float]) -> None:
        super().__init__()
        self.seconds = seconds
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds[self.calls])
        self.calls += 1
        return x


def test_latency_is_the_median_of_the_timed_passes_after_the_warm_up() -> None:
    # Two slow warm-up passes, then five timed ones of 10 ms with one outlier of 0.5 s: the
    # warm-up is not counted and the median ignores the outlier (the mean would be ~110 ms).
    model = _Sleeper([0.5, 0.5, 0.01, 0.01, 0.5, 0.01, 0.01])
    timed = measure_latency(model, (3,), 2, torch.device("cpu"), warmup=2, repeats=5)
    assert model.calls == 7
    assert 10.0 <= timed.median_ms < 100.0
    # The quartiles of 10, 10, 10, 10 and 500 ms: the spread of the typical passes.
    assert 0.0 <= timed.iqr_ms < 50.0


def test_the_latency_spread_is_the_interquartile_range_of_the_repeats() -> None:
    # Timed passes of 10, 20, 30, 40 and 50 ms: quartiles 20 and 40 ms, IQR 20 ms.
    model = _Sleeper([0.0, 0.01, 0.02, 0.03, 0.04, 0.05])
    timed = measure_latency(model, (3,), 2, torch.device("cpu"), warmup=1, repeats=5)
    assert 28.0 <= timed.median_ms < 45.0
    assert 15.0 <= timed.iqr_ms < 35.0
