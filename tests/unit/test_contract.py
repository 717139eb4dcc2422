"""The input contract: stored by train, copied by prune, applied by every shipped form."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import switchprune
from switchprune.config import DataConfig, EvaluateConfig, ModelConfig, PruneConfig, TrainConfig
from switchprune.data import META_FILE, load_meta, load_split, raw_images
from switchprune.io import (
    BASELINE_FILE,
    COMPACT_FILE,
    SWITCHED_FILE,
    ArtifactError,
    load_torch,
    save_torch,
)
from switchprune.models import TaskNet
from switchprune.onnx_export import ONNX_FILE, read_contract, session
from switchprune.serving import INPUT_KEY, InputContract, ServedModel, as_uint8_batch
from switchprune.stages import evaluate, preprocess, prune, train

CONTRACT = InputContract((1, 8, 8), (0.3,), (0.2,), tuple(str(i) for i in range(10)))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    prepared, trained, model_dir = root / "prepared", root / "trained", root / "m"
    preprocess.run(DataConfig(), raw_dir=root / "raw", prepared_dir=prepared)
    train.run(
        TrainConfig(epochs=1, batch_size=128, snn_hidden=8, target_ratio=0.5, device="cpu"),
        model_cfg=ModelConfig(arch="mlp", hidden=(32, 16)),
        prepared_dir=prepared,
        trained_dir=trained,
        progress=False,
    )
    prune.run(PruneConfig(), trained_dir=trained, model_dir=model_dir)
    return {"prepared": prepared, "trained": trained, "model": model_dir, "root": root}


def test_train_stores_and_prune_copies_the_contract(chain: dict[str, Path]) -> None:
    meta = load_meta(chain["prepared"])
    expected = {
        "dtype": "uint8",
        "layout": "NCHW",
        "shape": [1, 8, 8],
        "mean": list(meta.mean),
        "std": list(meta.std),
        "classes": list(meta.labels),
    }
    for path in (
        chain["trained"] / SWITCHED_FILE,
        chain["trained"] / BASELINE_FILE,
        chain["model"] / COMPACT_FILE,
    ):
        assert load_torch(path)[INPUT_KEY] == expected, path
    assert read_contract(chain["model"] / ONNX_FILE).to_dict() == expected


def test_every_form_takes_raw_pixels_with_the_same_result(chain: dict[str, Path]) -> None:
    prepared, model_dir = chain["prepared"], chain["model"]
    x, y = load_split(prepared, "test").tensors
    pixels = raw_images(prepared, "test", range(len(y)))
    model = switchprune.load_model(model_dir)
    assert isinstance(model, ServedModel)
    net = switchprune.load_model(model_dir, raw=False)
    assert isinstance(net, TaskNet)
    with torch.no_grad():
        served, bare = model(pixels), net(x)
    # The normalisation inside is the prepared data's, operation for operation.
    assert torch.equal(served, bare)
    onnx = session(model_dir / ONNX_FILE).run(None, {"input": pixels.numpy()})[0]
    assert np.abs(onnx - bare.numpy()).max() <= 1e-4 + 1e-4 * bare.abs().max().item()
    assert (onnx.argmax(1) == bare.argmax(1).numpy()).all()
    with pytest.raises(TypeError, match="expected uint8"):
        model(x)  # normalised floats
    with pytest.raises(TypeError, match="expected uint8"):
        model(pixels.float() / 255.0)
    with pytest.raises(TypeError, match="expected uint8"):
        model(pixels.long())


def test_evaluate_times_the_uint8_graphs(chain: dict[str, Path]) -> None:
    report = evaluate.run(
        EvaluateConfig(latency_warmup=1, latency_repeats=2, device="cpu"),
        prepared_dir=chain["prepared"],
        trained_dir=chain["trained"],
        model_dir=chain["model"],
    )
    for batch in (1, 256):
        for tag in ("before", "after"):
            assert report[f"onnx_latency_ms_b{batch}_{tag}"] > 0.0


def test_prune_refuses_a_switched_file_without_contract(
    chain: dict[str, Path], tmp_path: Path
) -> None:
    trained = tmp_path / "trained"
    trained.mkdir()
    blob = load_torch(chain["trained"] / SWITCHED_FILE)
    del blob[INPUT_KEY]
    save_torch(blob, trained / SWITCHED_FILE)
    with pytest.raises(ArtifactError, match="no input contract.*re-run train"):
        prune.run(PruneConfig(), trained_dir=trained, model_dir=tmp_path / "m")
    assert not (tmp_path / "m" / COMPACT_FILE).exists()


def test_an_older_model_file_uses_its_meta_or_is_refused(
    chain: dict[str, Path], tmp_path: Path
) -> None:
    blob = load_torch(chain["model"] / COMPACT_FILE)
    contract = InputContract.from_dict(blob.pop(INPUT_KEY))
    save_torch(blob, tmp_path / COMPACT_FILE)
    with pytest.raises(ArtifactError, match="no input contract.*raw=False"):
        switchprune.load_model(tmp_path)
    assert isinstance(switchprune.load_model(tmp_path, raw=False), TaskNet)
    # Registered and pulled folders carry the prepared data's meta.json: the same statistics.
    shutil.copyfile(chain["prepared"] / META_FILE, tmp_path / META_FILE)
    model = switchprune.load_model(tmp_path)
    assert isinstance(model, ServedModel) and model.contract == contract


def test_a_malformed_or_misfitting_contract_is_refused(tiny_net) -> None:
    with pytest.raises(ValueError, match="one value per channel"):
        InputContract((3, 8, 8), (0.5,), (0.2,), ("a",))
    with pytest.raises(ValueError, match="std positive"):
        InputContract((1, 8, 8), (0.5,), (0.0,), ("a",))
    with pytest.raises(ValueError, match="dtype/layout"):
        InputContract((1, 8, 8), (0.5,), (0.2,), ("a",), dtype="float32")
    with pytest.raises(ValueError, match="expected keys"):
        InputContract.from_dict({"shape": [1, 8, 8]})
    assert InputContract.from_dict(CONTRACT.to_dict()) == CONTRACT
    net = tiny_net("mlp")  # 5 classes
    with pytest.raises(ValueError, match="does not fit the network"):
        ServedModel(net, CONTRACT)


def test_a_request_is_uint8_pixels_or_refused() -> None:
    pixels = np.arange(2 * 64).reshape(2, 1, 8, 8)
    for accepted in (pixels, pixels.astype(np.uint8), pixels.tolist(), torch.from_numpy(pixels)):
        got = as_uint8_batch(accepted, CONTRACT)
        assert got.dtype == np.uint8 and np.array_equal(got, pixels)
    flat = pd.DataFrame(pixels.reshape(2, -1))
    assert np.array_equal(as_uint8_batch(flat, CONTRACT), pixels)
    column = pd.DataFrame({"image": list(pixels.tolist())})
    assert np.array_equal(as_uint8_batch(column, CONTRACT), pixels)
    for floats in (pixels / 255.0, pixels.astype(np.float32), pixels > 3):
        with pytest.raises(TypeError, match=r"expected uint8 pixels 0\.\.255 of shape N×1×8×8"):
            as_uint8_batch(floats, CONTRACT)
    with pytest.raises(ValueError, match="values from -1 to"):
        as_uint8_batch(pixels - 1, CONTRACT)
    with pytest.raises(ValueError, match="got shape"):
        as_uint8_batch(pixels[0], CONTRACT)
