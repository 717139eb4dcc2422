"""The four stages chained on tiny data, for a plain net, a conv net and a residual net."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from switchprune.config import DataConfig, EvaluateConfig, ModelConfig, PruneConfig, TrainConfig
from switchprune.io import BASELINE_FILE, ArtifactError, load_model_file
from switchprune.stages import evaluate, preprocess, prune, train


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    metrics = preprocess.run(DataConfig(), raw_dir=out / "raw", prepared_dir=out)
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == 1797
    return out


@pytest.mark.parametrize(
    ("model_cfg", "epochs"),
    [
        (ModelConfig(arch="mlp", hidden=(64, 32)), 4),
        (ModelConfig(arch="lenet5"), 2),
        # A quarter width: the chain's residual path is the subject, not the network's size.
        (ModelConfig(arch="resnet20", width_multiplier=0.25), 1),
    ],
    ids=["mlp", "lenet5", "resnet20"],
)
def test_chain_compresses_and_compaction_is_exact(
    prepared: Path,
    tmp_path: Path,
    model_cfg: ModelConfig,
    epochs: int,
    report_keys: set[str],
) -> None:
    cfg = TrainConfig(epochs=epochs, batch_size=128, snn_hidden=8, target_ratio=0.5, device="cpu")
    train_metrics = train.run(
        cfg,
        model_cfg=model_cfg,
        prepared_dir=prepared,
        trained_dir=tmp_path / "trained",
        checkpoint_dir=tmp_path / "ckpt",
        progress=False,
    )
    assert train_metrics["train_params_ratio"] <= 0.5 + 1e-9
    prune_metrics = prune.run(
        PruneConfig(), trained_dir=tmp_path / "trained", model_dir=tmp_path / "m"
    )
    report = evaluate.run(
        EvaluateConfig(latency_warmup=1, latency_repeats=2, device="cpu"),
        prepared_dir=prepared,
        trained_dir=tmp_path / "trained",
        model_dir=tmp_path / "m",
    )
    assert report_keys <= set(report)
    assert report["max_abs_logit_diff"] <= 1e-5
    assert report["max_abs_logit_diff_f64"] <= 1e-6
    assert report["test_accuracy"] == report["gated_accuracy"]
    assert report["params_after"] == prune_metrics["params_after"] < report["params_before"]
    assert report["params_after"] <= 0.5 * report["params_before"]
    assert report["macs_after"] < report["macs_before"]
    assert report["bytes_after"] < report["bytes_before"]
    # The compacted file is {spec, state_dict}: rebuilt without pickled code.
    model, blob = load_model_file(tmp_path / "m" / "model.pt")
    assert set(blob["spec"]["widths"]) == set(blob["kept"])
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    raw = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert isinstance(raw["state_dict"], dict)


def test_baseline_off_leaves_no_stale_baseline(prepared: Path, tmp_path: Path) -> None:
    trained = tmp_path / "trained"
    cfg = TrainConfig(epochs=1, batch_size=256, snn_hidden=4, device="cpu")
    model_cfg = ModelConfig(hidden=(16,))
    train.run(cfg, model_cfg=model_cfg, prepared_dir=prepared, trained_dir=trained, progress=False)
    assert (trained / BASELINE_FILE).is_file()
    off = TrainConfig(epochs=1, batch_size=256, snn_hidden=4, device="cpu", baseline=False)
    train.run(off, model_cfg=model_cfg, prepared_dir=prepared, trained_dir=trained, progress=False)
    assert not (trained / BASELINE_FILE).exists()
    prune.run(PruneConfig(), trained_dir=trained, model_dir=tmp_path / "m")
    report = evaluate.run(
        EvaluateConfig(latency_warmup=0, latency_repeats=1, device="cpu"),
        prepared_dir=prepared,
        trained_dir=trained,
        model_dir=tmp_path / "m",
    )
    assert "baseline_accuracy" not in report


def test_evaluate_refuses_a_compacted_model_from_another_training(
    prepared: Path, tmp_path: Path
) -> None:
    model_cfg = ModelConfig(hidden=(16,))
    for seed in (0, 1):
        cfg = TrainConfig(epochs=1, batch_size=256, snn_hidden=4, device="cpu", seed=seed,
                          baseline=False, target_ratio=0.5)  # fmt: skip
        train.run(cfg, model_cfg=model_cfg, prepared_dir=prepared,
                  trained_dir=tmp_path / f"t{seed}", progress=False)  # fmt: skip
    prune.run(PruneConfig(), trained_dir=tmp_path / "t1", model_dir=tmp_path / "m1")
    with pytest.raises(ArtifactError, match="not the compaction of"):
        evaluate.run(
            EvaluateConfig(latency_warmup=0, latency_repeats=1, device="cpu"),
            prepared_dir=prepared,
            trained_dir=tmp_path / "t0",
            model_dir=tmp_path / "m1",
        )
