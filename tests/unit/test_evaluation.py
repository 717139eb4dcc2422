"""Measurements of a network: size before and after compaction, and latency."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from switchprune.evaluation import forward_pass, interleaved_latency, size_metrics
from switchprune.models import ModelSpec, build_model

# Resident memory after a 256 MiB tensor was allocated, touched and freed: first with the
# allocator's defaults, then again once retain_freed_memory() applied (one process, one start-up;
# the default measurement comes first, so it is untouched by the setting).
PROBE = """
import os, torch
from switchprune.evaluation import retain_freed_memory

def rss_after_free():
    x = torch.ones(64 * 1024 * 1024)
    del x
    pages = int(open("/proc/self/statm").read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)

returned = rss_after_free()
applied = retain_freed_memory()
print(applied, rss_after_free(), returned)
"""


def _rss_after_free() -> tuple[str, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.slow  # a fresh Python process or an MLflow store
def test_retain_freed_memory_keeps_large_blocks_in_the_process() -> None:
    applied, kept, returned = _rss_after_free()
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


class _Clock:
    """A clock whose every forward pass takes its next scripted duration (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def pass_taking(self, name: str, seconds: list[float]) -> Callable[[], None]:
        durations = iter(seconds)

        def run() -> None:
            self.calls.append(name)
            self.now += next(durations)

        return run


def test_latency_is_the_median_of_the_timed_passes_after_the_warm_up() -> None:
    # Two slow warm-up passes, then five timed ones of 10 ms with one outlier of 0.5 s: the
    # warm-up is not counted and the median ignores the outlier (the mean would be ~110 ms).
    clock = _Clock()
    run = clock.pass_taking("a", [0.5, 0.5, 0.01, 0.01, 0.5, 0.01, 0.01])
    timed = interleaved_latency({"a": run}, warmup=2, repeats=5, clock=clock)["a"]
    assert len(clock.calls) == 7
    assert timed.median_ms == pytest.approx(10.0)
    assert timed.iqr_ms == pytest.approx(0.0)  # quartiles of 10, 10, 10, 10 and 500 ms
    assert timed.repeats == 5 and timed.noisy  # too few passes to be trusted


def test_the_latency_spread_is_the_interquartile_range_of_the_repeats() -> None:
    # Timed passes of 10, 20, 30, 40 and 50 ms: quartiles 20 and 40 ms, IQR 20 ms.
    clock = _Clock()
    run = clock.pass_taking("a", [0.0, 0.01, 0.02, 0.03, 0.04, 0.05])
    timed = interleaved_latency({"a": run}, warmup=1, repeats=5, clock=clock)["a"]
    assert (timed.median_ms, timed.iqr_ms) == (pytest.approx(30.0), pytest.approx(20.0))


def test_models_are_timed_in_alternating_turns() -> None:
    clock = _Clock()
    runs = {n: clock.pass_taking(n, [0.001] * 5) for n in ("before", "after")}
    interleaved_latency(runs, warmup=1, repeats=4, clock=clock)
    assert clock.calls == ["before", "after"] + ["before", "after", "after", "before"] * 2


@pytest.mark.parametrize(
    ("durations_ms", "noisy"),
    [
        ([10.0] * 15 + [11.0] * 10, False),  # 25 steady passes
        ([10.0, 30.0] * 12, True),  # a noisy timer: IQR 20 ms on a median of 20 ms
        ([10.0] * 19, True),  # steady, but fewer than 20 passes
        ([10.0] * 15 + [12.2] * 10, True),  # IQR 2.2 ms: above 20 % of the median
    ],
    ids=["steady", "noisy-timer", "too-few", "iqr-above-a-fifth"],
)
def test_a_noisy_timer_is_flagged(durations_ms: list[float], noisy: bool) -> None:
    clock = _Clock()
    run = clock.pass_taking("a", [ms / 1000.0 for ms in durations_ms])
    timed = interleaved_latency({"a": run}, warmup=0, repeats=len(durations_ms), clock=clock)
    assert timed["a"].noisy is noisy, timed


def test_a_forward_pass_runs_the_model_on_a_fixed_batch() -> None:
    seen: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x

    run = forward_pass(Recorder(), (3, 4), 7, torch.device("cpu"))
    run(), run()
    assert seen[0].shape == (7, 3, 4) and torch.equal(seen[0], seen[1])
