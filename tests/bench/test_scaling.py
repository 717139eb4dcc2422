"""The scaling benchmark's on-paper estimate and its table, from hand-made records."""

from __future__ import annotations

import pytest
from bench_support import load_bench_script

S = load_bench_script("scaling")


def test_the_estimate_is_a_ring_all_reduce_over_the_slowest_link() -> None:
    rows = S.estimate({"resnet18": 40_000_000, "resnet50": 100_000_000})
    assert len(rows) == len(S.PAPER) * len(S.LINKS)
    for row in rows:
        n, bandwidth = S.LINKS[row["setup"]]
        size = 40e6 if row["network"] == "resnet18" else 100e6
        assert row["all_reduce_ms"] == pytest.approx(2 * (n - 1) / n * size / bandwidth * 1e3)
        compute, comm = row["compute_ms"], row["all_reduce_ms"]
        assert row["efficiency_no_overlap"] == pytest.approx(compute / (compute + comm))
        assert row["efficiency_full_overlap"] == pytest.approx(compute / max(compute, comm))
    # More GPUs over a slower link cost more: two nodes are never the more efficient setup.
    one, two = (r for r in rows if r["network"] == "resnet50")
    assert two["all_reduce_ms"] > one["all_reduce_ms"]
    assert two["efficiency_no_overlap"] < one["efficiency_no_overlap"]


def test_the_table_gives_each_network_its_efficiency() -> None:
    records = []
    for arch, rate in zip(S.ARCHS, (1000.0, 200.0, 50.0), strict=True):
        for n, speed in ((1, rate), (2, 1.5 * rate)):
            records.append(
                {
                    "arch": arch,
                    "processes": n,
                    "samples_per_second": speed,
                    "bytes_per_step": 4_000_000,
                    "all_reduce_ms": 2.0 if n == 2 else 0.0,
                    "steps_per_epoch": 4,
                }
            )
    meta = {
        "machine": "test",
        "torch": "x",
        "samples": 512,
        "batch": 100,
        "epochs": 2,
        "date": "today",
        "torchvision_bytes": {"resnet18": 46_000_000, "resnet50": 100_000_000},
    }
    text = S._markdown(records, S.estimate(meta["torchvision_bytes"]), meta)
    # 1.5x the one-process rate on two processes: efficiency 0.75; a step of 100 samples at
    # 1,500 samples/s lasts 66.7 ms, of which 2 ms (3.0 %) is the all-reduce.
    assert "| mlp | 4.00 | 1000 | 1500 | 0.75 | 2.00 | 3.0% |" in text
    assert "| resnet18 | 4.00 | 50 | 75 | 0.75 | 2.00 | 0.1% |" in text
    assert text.count("| resnet50 |") == len(S.LINKS)
