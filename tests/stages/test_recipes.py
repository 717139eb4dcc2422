"""Every architecture family trains on its defaults (``tnn_lr: auto``) without diverging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from switchprune.config import DataConfig, ModelConfig, TrainConfig
from switchprune.data import load_meta, load_split
from switchprune.models import spec_from_config
from switchprune.stages import preprocess
from switchprune.training import fit


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TensorDataset, TensorDataset]:
    out = tmp_path_factory.mktemp("digits")
    preprocess.run(DataConfig(), raw_dir=out / "raw", prepared_dir=out)
    train, val = load_split(out, "train"), load_split(out, "val")
    return out, train, val


@pytest.mark.parametrize(
    ("model_cfg", "epochs"),
    [
        (ModelConfig(arch="mlp"), 3),
        (ModelConfig(arch="lenet5"), 5),
        (ModelConfig(arch="resnet20", width_multiplier=0.5), 3),
        (ModelConfig(arch="resnet18", width_multiplier=0.25), 3),
    ],
    ids=["mlp", "lenet5", "resnet20", "resnet18"],
)
def test_default_recipe_learns(digits, model_cfg: ModelConfig, epochs: int) -> None:
    """Package defaults but the budget: finite losses, and well above chance (10 %)."""
    prepared, train, val = digits
    meta = load_meta(prepared)
    torch.manual_seed(0)
    spec = spec_from_config(model_cfg, meta.in_shape, meta.num_classes)
    cfg = TrainConfig(epochs=epochs, batch_size=32, device="cpu", baseline=False, tnn_lr="auto")
    result = fit(spec, train, val, cfg, switched=True, progress=False)
    losses = [r["loss"] for r in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert result.history[-1]["val_accuracy"] >= 0.5, result.history
