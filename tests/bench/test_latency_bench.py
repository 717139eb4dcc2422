"""``make bench-latency``: latency targets against MACs targets at equal measured speedup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_support import ROOT, load_bench_script

from model_support import flop_timer
from switchprune import latency

B = load_bench_script("latency_target")
MNIST = ROOT.parent / "shared" / "data" / "mnist-t10k"


def _row(seed: int, metric: str, ratio: float, speedup: float, accuracy: float) -> dict:
    return {
        "arch": "resnet18",
        "seed": seed,
        "target_metric": metric,
        "target_ratio": ratio,
        "speedup": speedup,
        "accuracy": accuracy,
        "noisy": 0.0,
        **({"predicted_speedup": 1.0 / ratio} if metric == "latency" else {}),
    }


def test_accuracy_at_equal_speedup_is_read_off_the_macs_runs() -> None:
    macs = [_row(0, "macs", 0.5, 1.5, 0.99), _row(0, "macs", 0.3, 2.5, 0.97)]
    assert B.at_equal_speedup(macs, 2.0) == pytest.approx(0.98)
    assert B.at_equal_speedup(macs, 3.0) == pytest.approx(0.96)  # extended past the end
    macs.append(_row(0, "macs", 0.2, 3.5, 0.90))
    assert B.at_equal_speedup(macs, 3.0) == pytest.approx(0.935)  # the two around it
    with pytest.raises(ValueError, match="two MACs targets"):
        B.at_equal_speedup(macs[:1], 2.0)


def test_the_summary_sets_each_latency_target_against_its_seeds_macs_runs() -> None:
    rows = []
    for seed, (measured, acc) in enumerate([(1.8, 0.985), (2.2, 0.975)]):
        rows += [_row(seed, "macs", 0.5, 1.5, 0.99), _row(seed, "macs", 0.3, 2.5, 0.97)]
        rows.append(_row(seed, "latency", 0.5, measured, acc))
    (s,) = B.summarize(rows)
    assert s["requested_speedup"] == 2.0 and s["runs"] == 2
    assert s["measured_speedup"][0] == pytest.approx(2.0)
    assert s["measured_vs_requested"] == pytest.approx(0.0)
    assert s["predicted_vs_measured"] == pytest.approx((2 / 1.8 + 2 / 2.2) / 2 - 1)
    assert s["accuracy"][0] == pytest.approx(0.98)
    assert s["macs_accuracy_at_equal_speedup"][0] == pytest.approx((0.984 + 0.976) / 2)
    assert "| resnet18 | 2.00× | 2.00 ± 0.28× |" in B.markdown(
        [s],
        {"machine": "m", "threads": 2, "seeds": [0, 1], "epochs": 1, "n_train": 1,
         "n_test": 1, "wall_seconds": 60},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not MNIST.is_dir(), reason="the shared MNIST files are beside the checkout")
def test_the_tiny_setting_runs_end_to_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(latency, "time_passes", flop_timer)  # a table in seconds, not minutes
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "unused"))
    assert B.main(["--setting", "tiny", "--out", str(tmp_path), "--threads", "1"]) == 0
    body = json.loads((tmp_path / "latency.json").read_text())
    kinds = [(r["target_metric"], r["target_ratio"]) for r in body["runs"]]
    assert kinds == [("latency", 0.5), ("macs", 0.6), ("macs", 0.3)]
    (summary,) = body["summary"]
    latency_run = body["runs"][0]
    # On a device whose time is its FLOPs, the prediction is the compacted network's own.
    assert latency_run["predicted_speedup"] >= 2.0 - 1e-9
    assert summary["arch"] == "resnet18" and summary["runs"] == 1
    assert "| resnet18 | 2.00× |" in (tmp_path / "latency.md").read_text()
    assert latency.cache_dir() == tmp_path / "unused" / "latency"  # the caller's, restored
