"""The stages on an image folder, training and evaluating from streamed splits."""

from __future__ import annotations

from pathlib import Path

import torch

from folder_support import write_digits_folder
from switchprune.config import DataConfig, EvaluateConfig, ModelConfig, PruneConfig, TrainConfig
from switchprune.data import load_meta
from switchprune.io import SWITCHED_FILE
from switchprune.stages import evaluate, preprocess, prune, train


def test_folder_chain_streams_and_matches_memory(
    tmp_path: Path, report_keys: set[str], single_thread: None
) -> None:
    folder = write_digits_folder(
        tmp_path / "folder", per_class=20, splits=("train", "test"), sizes=((8, 8), (10, 9))
    )
    base = DataConfig(dataset="folder", folder_dir=str(folder), image_size=12)
    prepared = tmp_path / "prepared"
    counts = preprocess.run(base, raw_dir=tmp_path / "raw", prepared_dir=prepared)
    assert (counts["n_train"], counts["n_val"], counts["n_test"]) == (180, 20, 30)
    assert load_meta(prepared).in_shape == (1, 12, 12)

    cfg = TrainConfig(epochs=2, batch_size=32, target_ratio=0.5, device="cpu")
    runs = {}
    for loader in ("memory", "stream"):
        data = DataConfig(
            dataset="folder",
            folder_dir=str(folder),
            image_size=12,
            loader=loader,  # type: ignore[arg-type]
            augment="standard",
            num_workers=1 if loader == "stream" else 0,
        )
        trained = tmp_path / f"trained-{loader}"
        runs[loader] = train.run(
            cfg,
            model_cfg=ModelConfig(arch="lenet5"),
            prepared_dir=prepared,
            trained_dir=trained,
            progress=False,
            data_cfg=data,
        )
    assert runs["memory"]["val_accuracy"] == runs["stream"]["val_accuracy"]
    a = torch.load(tmp_path / "trained-memory" / SWITCHED_FILE, weights_only=True)
    b = torch.load(tmp_path / "trained-stream" / SWITCHED_FILE, weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])

    trained = tmp_path / "trained-stream"
    prune.run(PruneConfig(), trained_dir=trained, model_dir=tmp_path / "m")
    reports = {
        loader: evaluate.run(
            EvaluateConfig(latency_warmup=1, latency_repeats=2, device="cpu"),
            prepared_dir=prepared,
            trained_dir=trained,
            model_dir=tmp_path / "m",
            data_cfg=DataConfig(
                dataset="folder",
                folder_dir=str(folder),
                loader=loader,  # type: ignore[arg-type]
            ),
        )
        for loader in ("memory", "stream")
    }
    assert report_keys <= set(reports["stream"])
    assert reports["stream"]["n_test"] == 30
    for key in ("test_accuracy", "gated_accuracy", "baseline_accuracy", "max_abs_logit_diff_f64"):
        assert reports["stream"][key] == reports["memory"][key], key
    assert reports["stream"]["max_abs_logit_diff_f64"] <= 1e-6
