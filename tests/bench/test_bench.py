"""The benchmark's code end to end on its tiny setting, so that ``make bench`` never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_support import load_bench_script

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("depgraph", "slimming-recipe", "iterative")
GRIDS = load_bench_script("recipes").GRIDS
MNIST = ROOT.parent / "shared" / "data" / "mnist-t10k"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MNIST.is_dir(), reason=f"needs the MNIST test set in {MNIST}"),
]
KEYS = {
    "dataset",
    "arch",
    "method",
    "scorer",
    "target_metric",
    "target_ratio",
    "seed",
    "accuracy",
    "params_ratio",
    "macs_ratio",
}

META_KEYS = {
    "setting",
    "seeds",
    "epochs",
    "finetune_epochs",
    "n_train",
    "n_test",
    "archs",
    "arch_seeds",
    "arch_epochs",
    "control_targets",
    "scorers",
    "recipes",
    "recipe_grids",
    "recipe_choices",
    "default_scorer",
    "machine",
    "allocator",
    "workers",
    "train_seconds",
    "wall_seconds",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bench/run.py`` as ``make bench`` runs it: a script, training in two worker processes."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--setting", "tiny", "--out", str(out), "--mnist-dir", str(MNIST), "--workers", "2"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_in_process_run_gives_the_same_records(
    results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load_bench_script("run")
    argv = ["--setting", "tiny", "--out", str(tmp_path), "--mnist-dir", str(MNIST)]
    assert bench.main(argv + ["--workers", "1", "--no-claims"]) == 0
    pooled = json.loads((results / "results.json").read_text())["records"]
    local = json.loads((tmp_path / "results.json").read_text())["records"]
    key = ("arch", "method", "scorer", "target_metric", "target_ratio", "seed")

    def accuracies(records: list) -> dict:
        return {
            tuple(r[k] for k in key): r["accuracy"]
            for r in records
            if not r["method"].startswith("claim:")
        }

    # Training is seeded and deterministic: the pool changes where, not what.
    assert accuracies(local) == accuracies(pooled)
    assert not any(r["method"].startswith("claim:") for r in local)
    assert "## The paper's claims" not in (tmp_path / "results.md").read_text()


def test_one_record_per_run_with_every_scorer_baseline_and_recipe(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    assert set(data) == {"meta", "verdict", "records"}
    assert set(data["meta"]) == META_KEYS
    assert data["meta"]["setting"] == "tiny" and data["meta"]["workers"] == 2
    records = data["records"]
    assert all(KEYS <= set(r) for r in records)
    runs = [r for r in records if not r["method"].startswith("claim:")]
    targets = {(r["target_metric"], r["target_ratio"]) for r in runs if r["target_ratio"]}
    assert targets == {("params", 0.3), ("params", 0.13)}
    for metric, ratio in targets:
        here = [r for r in runs if (r["target_metric"], r["target_ratio"]) == (metric, ratio)]
        ours = {(r["method"], r["scorer"]) for r in here if r["method"].startswith("ours")}
        assert ours == {
            (m, s)
            for m in ("ours", "ours+ft")
            for s in ("switcher", "magnitude", "group_norm", "random")
        }
        baselines = {r["method"] for r in here if r["scorer"] is None}
        assert baselines == {"slimming", "slimming+ft", "l1norm", "l1norm+ft"} | set(RECIPES)
        for r in (r for r in here if r["method"] in RECIPES):
            assert r["strength"] in GRIDS[r["method"]] and r["grid_seed"] == 0
            assert set(r["grid"]) == {str(v) for v in GRIDS[r["method"]]}
        for r in here:
            # Every pruned model meets the target it was given (within a unit's cost).
            assert r[f"{metric}_ratio"] <= ratio + 1e-9, r
            assert r[f"{metric}_ratio"] > 0.5 * ratio, r
            assert 0.0 <= r["accuracy"] <= 1.0
            assert r["latency_ms_b1"] > 0 and r["latency_ms_b256"] > 0
    unpruned = [r for r in runs if r["method"] == "unpruned"]
    assert len(unpruned) == 1 and unpruned[0]["params_ratio"] == 1.0


def test_verdict_and_markdown_come_from_the_records(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    md = (results / "results.md").read_text()
    assert "## mlp, params target 0.13" in md
    assert "## Verdict: the learned switcher against the best fixed scorer" in md
    assert "## Verdict: ours against the peers at the same target" in md
    assert "## The peer recipes' chosen strengths" in md
    choices = data["meta"]["recipe_choices"]
    assert {(c["recipe"], c["target_ratio"]) for c in choices} == {
        (r, t) for r in RECIPES for t in (0.3, 0.13)
    }
    cells = data["verdict"]["cells"]
    assert len(cells) == 2
    for cell in cells:
        assert cell["best_fixed"] in {"magnitude", "group_norm", "random"}
        assert set(cell["vs_peers"]) == {*RECIPES, "slimming+ft", "l1norm+ft"}
        records = [
            r
            for r in data["records"]
            if r["target_ratio"] == cell["target_ratio"] and r["method"] == "ours"
        ]
        by_scorer = {r["scorer"]: r["accuracy"] for r in records}
        best = max(by_scorer[s] for s in ("magnitude", "group_norm", "random"))
        assert cell["switcher_minus_best"] == pytest.approx(by_scorer["switcher"] - best)
        assert by_scorer[cell["best_fixed"]] == best


def test_paper_claims_are_measured(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    claims = [r for r in data["records"] if r["method"].startswith("claim:")]
    none = [r for r in claims if r["method"] == "claim:none"]
    auto = [r for r in claims if r["method"] == "claim:auto"]
    assert none and auto
    # The paper's no-penalty mode has no pressure: on so short a run nothing switches off.
    assert all(r["params_ratio"] > 0.9 for r in none)
    assert {r["dataset"] for r in auto} == {"mnist", "digits"}
    assert {r["arch"] for r in auto} >= {"mlp-narrow", "mlp-wide"}
    assert all(0.0 < r["params_ratio"] <= 1.0 for r in auto)
    assert "## The paper's claims" in (results / "results.md").read_text()


def test_ablations_write_one_row_per_variant(tmp_path: Path) -> None:
    module = load_bench_script("ablations")
    argv = ["--setting", "tiny", "--out", str(tmp_path), "--mnist-dir", str(MNIST)]
    # In this process: the script and its worker pool run as ``make bench`` runs them in the
    # results fixture (bench/run.py, the same pool).
    assert module.main([*argv, "--workers", "1", "--threads", "1"]) == 0
    records = json.loads((tmp_path / "ablations.json").read_text())["records"]
    assert {r["variant"] for r in records} == set(module.VARIANTS)
    md = (tmp_path / "ablations.md").read_text()
    assert all(f"| {v} |" in md for v in module.VARIANTS)


def test_archs_bench_measures_pruned_against_unpruned(tmp_path: Path) -> None:
    """``bench/archs.py`` (``make bench-archs``) on a few hundred images, one epoch."""
    argv = ["--archs", "resnet18", "--epochs", "1", "--limit", "300", "--ratio", "0.5"]
    argv += ["--width", "0.25"]  # a quarter-width ResNet-18: the same code, a fraction of the time
    # Its ``main`` in this process: the script's body without another torch start-up (the
    # results fixture already runs a benchmark script as a command).
    assert load_bench_script("archs").main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "archs.json").read_text())
    (row,) = report["rows"]
    assert row["arch"] == "resnet18" and row["tnn_lr"] == 0.05 and row["width_multiplier"] == 0.25
    assert row["macs_ratio"] <= 0.5 + 1e-9
    assert row["mac_reduction"] == pytest.approx(1 / row["macs_ratio"])
    assert row["latency_ms"]["pruned"]["latency_ms_b256"] > 0
    assert "| resnet18 | 0 |" in (tmp_path / "archs.md").read_text()
