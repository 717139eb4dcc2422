"""The benchmark's tables and verdict from hand-made records, and its latency timer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_support import load_bench_script
from torch import nn

from switchprune.config import TrainConfig

R = load_bench_script("report")
M = load_bench_script("measurement")
SCORERS = ("switcher", "magnitude", "random")
META = {
    "setting": "tiny",
    "n_train": 400,
    "n_test": 100,
    "seeds": [0, 1, 2],
    "epochs": 1,
    "finetune_epochs": 1,
    "machine": "test",
    "wall_seconds": 60.0,
}


def _row(method: str, scorer: str | None, seed: int, accuracy: float, target: bool = True) -> dict:
    return {
        "dataset": "mnist",
        "arch": "mlp",
        "method": method,
        "scorer": scorer,
        "target_metric": "params" if target else None,
        "target_ratio": 0.3 if target else None,
        "seed": seed,
        "accuracy": accuracy,
        "params_ratio": 0.3 if target else 1.0,
        "macs_ratio": 0.3 if target else 1.0,
    }


def _records(switcher: list[float]) -> list[dict]:
    """Three seeds: unpruned 0.9; magnitude 0.80 ± 0.01, random 0.5, baselines 0.6."""
    rows = []
    for seed in range(3):
        rows.append(_row("unpruned", None, seed, 0.9, target=False))
        for method in ("ours", "ours+ft"):
            rows.append(_row(method, "switcher", seed, switcher[seed]))
            rows.append(_row(method, "magnitude", seed, 0.80 + 0.01 * (seed - 1)))
            rows.append(_row(method, "random", seed, 0.5))
        for method in ("slimming", "slimming+ft", "l1norm", "l1norm+ft"):
            rows.append(_row(method, None, seed, 0.6))
    return rows


def test_switcher_clearly_above_the_best_fixed_scorer_is_better() -> None:
    (cell,) = R.verdict(_records([0.85, 0.86, 0.87]), SCORERS)["cells"]
    assert cell["best_fixed"] == "magnitude"
    assert cell["switcher_minus_best"] == pytest.approx(0.06)
    assert cell["better"] and cell["within_sd"]
    assert cell["worst_seed_drop[switcher]"] == pytest.approx(0.05)
    assert cell["beats_baselines[random]"] is False
    assert cell["beats_baselines[switcher]+ft"] is True


def test_switcher_far_below_is_neither_better_nor_within_a_deviation() -> None:
    (cell,) = R.verdict(_records([0.70, 0.71, 0.72]), SCORERS)["cells"]
    assert cell["switcher_minus_best"] == pytest.approx(-0.09)
    assert not cell["better"] and not cell["within_sd"]


def test_without_the_switcher_there_is_no_comparison_to_the_best_fixed_scorer() -> None:
    rows = [r for r in _records([0.8] * 3) if r["scorer"] != "switcher"]
    (cell,) = R.verdict(rows, ("magnitude", "random"))["cells"]
    assert "best_fixed" not in cell
    md = R.markdown(rows, META, ("magnitude", "random"))
    assert "## Verdict: the learned switcher" not in md
    assert "## Ours against the Torch-Pruning baselines" in md


def test_markdown_tables_hold_the_means_of_the_records() -> None:
    rows = _records([0.85, 0.86, 0.87])
    md = R.markdown(rows, META, SCORERS)
    assert "## mlp, params target 0.3" in md
    assert "| ours[magnitude] | 80.00 ± 1.00 | 0.300 | 0.300 | 1.00 | 1.00 |" in md
    assert "| unpruned | 90.00 ± 0.00 | 1.000 | 1.000 | 1.00 | 1.00 |" in md
    assert "| mlp, params 0.3 | magnitude | +6.00 |" in md
    assert "| mlp, params 0.3 | yes | yes | yes | yes | no | no |" in md
    assert "## The paper's claims" not in md


def test_claims_get_their_own_table() -> None:
    claim = _row("claim:auto", "magnitude", 0, 0.75, target=False) | {"widths": {"fc1": 3}}
    md = R.markdown([claim], META, SCORERS)
    assert "| auto | mnist / mlp | 1.000 ± 0.000 | 75.00 ± 0.00 | {'fc1': 3} |" in md


def test_results_files_agree_with_each_other(tmp_path: Path) -> None:
    rows = _records([0.85, 0.86, 0.87])
    written = R.write_results(tmp_path, rows, META, SCORERS)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) == {"meta", "verdict", "records"}
    assert data["records"] == rows and data["meta"] == META
    assert data["verdict"] == R.verdict(rows, SCORERS)
    assert written.read_text() == R.markdown(rows, META, SCORERS) + "\n"


def test_labels_name_the_scorer_of_ours_only() -> None:
    assert M.label(_row("ours+ft", "random", 0, 0.5)) == "ours[random]+ft"
    assert M.label(_row("claim:auto", "magnitude", 0, 0.5)) == "claim:auto"
    assert M.label(_row("slimming", None, 0, 0.5)) == "slimming"


def test_interleaved_latency_times_every_model_at_both_batch_sizes() -> None:
    models = {"wide": nn.Linear(64, 512), "narrow": nn.Linear(64, 2)}
    latency = M.interleaved_latency(models, (64,), repeats=2)
    assert set(latency) == {"wide", "narrow"}
    for timing in latency.values():
        assert set(timing) == {
            f"latency_{m}_b{b}" for m in ("ms", "iqr_ms", "noisy") for b in (1, 256)
        }
        assert timing["latency_ms_b1"] > 0 and timing["latency_ms_b256"] > 0
        assert timing["latency_noisy_b1"] == 1.0  # two rounds are too few to be trusted


def test_latency_reaches_every_target_when_the_targets_hold_different_methods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The scorer controls may run at one target only: its group is larger than the others.
    rows = [_row("unpruned", None, 0, 0.9, target=False)]
    rows += [_row(m, s, 0, 0.8) | {"target_ratio": 0.3} for m, s in
             (("ours", "magnitude"), ("ours", "random"), ("l1norm", None))]  # fmt: skip
    rows += [_row(m, s, 0, 0.8) | {"target_ratio": 0.13} for m, s in
             (("ours", "magnitude"), ("l1norm", None))]  # fmt: skip
    wide, narrow = nn.Linear(64, 512), nn.Linear(64, 2)
    groups = [
        {"unpruned": wide, "ours[magnitude]": narrow, "ours[random]": wide, "l1norm": narrow},
        {"unpruned": wide, "ours[magnitude]": wide, "l1norm": narrow},
    ]
    timed = []  # what each group's (real) timing returned, in call order
    real = M.interleaved_latency
    monkeypatch.setattr(M, "interleaved_latency", lambda *a: timed.append(real(*a)) or timed[-1])
    M.add_latency(rows, groups, (64,), repeats=2)
    assert len(timed) == 2
    for row in rows[1:]:
        own = timed[0 if row["target_ratio"] == 0.3 else 1]
        assert row["latency_ms_b1"] == own[M.label(row)]["latency_ms_b1"], row
        base = own["unpruned"]["latency_ms_b256"]
        assert row["latency_speedup_b256"] == base / own[M.label(row)]["latency_ms_b256"]


def test_a_noisy_speedup_is_marked_with_its_seed_count() -> None:
    rows = [
        {"latency_speedup_b256": 2.0, "latency_noisy_b256": 1.0},
        {"latency_speedup_b256": 2.2, "latency_noisy_b256": 0.0},
    ]
    assert R._speedup(rows, 256) == "2.10 (noisy 1/2)"
    assert R._speedup(rows[1:], 256) == "2.20"


def _with_peers(ours: float, peers: dict[str, list[float]]) -> list[dict]:
    """One cell with ours[magnitude] at ``ours`` ± 0.01 over three seeds and the given peers."""
    rows = []
    for seed in range(3):
        rows.append(_row("unpruned", None, seed, 0.9, target=False))
        rows.append(_row("ours", "magnitude", seed, ours + 0.01 * (seed - 1)))
        rows.append(_row("ours+ft", "magnitude", seed, ours))
        for method, accs in peers.items():
            extra = {"strength": 1e-4, "grid": {"0.0001": 0.5}, "grid_seed": 0}
            rows.append(_row(method, None, seed, accs[seed]) | extra)
    return rows


def test_versus_wins_ties_and_loses_by_two_standard_errors() -> None:
    assert R.versus([0.80, 0.81, 0.82], [0.70, 0.71, 0.72])["outcome"] == "wins"
    assert R.versus([0.70, 0.71, 0.72], [0.80, 0.81, 0.82])["outcome"] == "loses"
    tie = R.versus([0.80, 0.81, 0.82], [0.80, 0.82, 0.81])
    assert tie["outcome"] == "ties" and tie["diff"] == pytest.approx(0.0)
    assert R.versus([0.8], [0.7])["outcome"] == "untested"


def test_verdict_compares_the_default_scorer_with_every_peer() -> None:
    peers = {"depgraph": [0.70, 0.71, 0.72], "slimming-recipe": [0.80, 0.81, 0.79],
             "iterative": [0.90, 0.91, 0.92]}  # fmt: skip
    rows = _with_peers(0.80, peers)
    (cell,) = R.verdict(rows, ("magnitude",))["cells"]
    assert cell["ours_scorer"] == "magnitude"
    assert {p: v["outcome"] for p, v in cell["vs_peers"].items()} == {
        "depgraph": "wins",
        "slimming-recipe": "ties",
        "iterative": "loses",
    }
    assert cell["vs_peers"]["depgraph"]["diff"] == pytest.approx(0.09)
    md = R.markdown(rows, META, ("magnitude",))
    assert "## Verdict: ours against the peers at the same target" in md
    assert "| mlp, params 0.3 | magnitude | +9.00 ±" in md
    assert "- against `iterative`: ours loses in 1 of 1 cells" in md
    assert "| mlp, params 0.3 | depgraph | reg = 0.0001 | 0.0001: 50.00 | 0 |" in md


def test_a_cell_without_some_scorers_is_reported_with_the_ones_that_ran() -> None:
    # A torchvision cell: the default scorer only, beside an MLP cell with every scorer.
    rows = _records([0.85, 0.86, 0.87])
    rows += [r | {"arch": "resnet18"} for r in _with_peers(0.8, {"depgraph": [0.7, 0.71, 0.72]})]
    cells = {c["arch"]: c for c in R.verdict(rows, SCORERS)["cells"]}
    assert "best_fixed" in cells["mlp"] and "best_fixed" not in cells["resnet18"]
    assert cells["resnet18"]["scorers"] == ["magnitude"]
    md = R.markdown(rows, META, SCORERS)
    assert "| resnet18, params 0.3 | – | – | yes | yes | – | – |" in md
    assert "| resnet18, params 0.3 | magnitude | +9.00 ±" in md


def test_the_scorer_controls_run_only_at_their_targets() -> None:
    setting = load_bench_script("settings").SETTINGS["default"]
    default = TrainConfig().scorer
    every = ("switcher", "magnitude", "group_norm", "random")
    (control_target,) = setting.control_targets["vgg"]
    assert setting.scorers_at("vgg", control_target, every) == every
    assert setting.scorers_at("vgg", ("params", 0.3), every) == (default,)
    assert setting.scorers_at("mlp", ("params", 0.3), every) == every
    assert setting.scorers_at("resnet18", ("macs", 0.3), every) == (default,)
    # Without the default among them, the first one asked for stands in.
    assert setting.scorers_at("vgg", ("params", 0.3), ("switcher", "random")) == ("switcher",)
