"""One input contract for every shipped form: raw uint8 pixels in, floats refused, same logits.

The registered model runs under MLflow's own tools (``mlflow models predict`` and a real
``mlflow models serve`` on 127.0.0.1), from a folder without the project and with an
unimportable ``switchprune`` first on the path, so only the copy shipped with the model runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pipeline.servers import ModelServer

import switchprune
from project_support import empty_store
from switchprune import registry
from switchprune.io import save_model
from switchprune.models import ModelSpec, TaskNet, build_model
from switchprune.onnx_export import ATOL, ONNX_FILE, RTOL, export_checked, session
from switchprune.serving import INPUT_KEY, InputContract, ServedModel

SPEC = ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 16, "fc2": 8})
CONTRACT = InputContract((1, 8, 8), (0.3,), (0.2,), tuple(f"digit-{i}" for i in range(10)))
NAME = "served-tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("serving")
    uri = empty_store(tmp_path_factory, root / "mlflow.db")
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    save_model(model, root / "model.pt", **{INPUT_KEY: CONTRACT.to_dict()})
    export_checked(model, CONTRACT, root / ONNX_FILE)
    images = np.random.default_rng(0).integers(0, 256, size=(6, 1, 8, 8), dtype=np.uint8)
    registry.log_and_register(
        uri,
        registry.Registration(
            experiment="serving",
            model_name=NAME,
            alias="champion",
            model=model,
            files={"model.pt": root / "model.pt", ONNX_FILE: root / ONNX_FILE},
            input_example=images[:2],
            artifact_location=str(root / "artifacts"),
        ),
    )
    # A package named switchprune that cannot be imported, ahead of the installed one: the
    # served model must run on the copy of the package that travels with it.
    shadow = root / "shadow" / "switchprune"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not the shipped package')\n")
    # Only this store: no tracking, registry or S3 settings another test left in the process.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))},
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(shadow.parent),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # `mlflow models serve` runs `uvicorn` by name: the interpreter's scripts come first.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    work = root / "elsewhere"  # no params.yaml, no src/: not the project
    work.mkdir()
    return {"uri": uri, "images": images, "root": root, "work": work, "env": env}


def loaded(served: dict) -> ServedModel:
    model = switchprune.load_model(f"models:/{NAME}@champion", tracking_uri=served["uri"])
    assert isinstance(model, ServedModel)
    return model


def expected_logits(served: dict) -> np.ndarray:
    """What ``load_model`` computes on the batch (loaded once per module)."""
    if "expected" not in served:
        with torch.no_grad():
            served["expected"] = loaded(served)(torch.from_numpy(served["images"])).numpy()
    return served["expected"]


def onnx_logits(served: dict) -> np.ndarray:
    if "onnx" not in served:
        runner = session(served["root"] / ONNX_FILE)
        served["onnx"] = runner.run(None, {"input": served["images"]})[0]
    return served["onnx"]


def logits_of(predictions: Any) -> np.ndarray:
    if isinstance(predictions, dict):
        predictions = predictions["predictions"]
    return np.asarray(predictions, dtype=np.float32)


def assert_same_logits(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_requirements_name_no_unpublished_package(served: dict) -> None:
    model_dir = next((served["root"] / "artifacts").rglob("MLmodel")).parent
    reqs = (model_dir / "requirements.txt").read_text()
    lines = [line for line in reqs.split() if line]
    assert all("==" in line for line in lines), lines
    assert not any(line.split("==")[0] == "switchprune" for line in lines)
    assert (model_dir / "code" / "switchprune" / "serving.py").is_file()


def test_load_model_takes_uint8_and_refuses_floats(served: dict) -> None:
    model = loaded(served)
    assert model.contract == CONTRACT
    x = torch.from_numpy(served["images"])
    with pytest.raises(TypeError, match=r"uint8 pixels 0\.\.255 of shape N×1×8×8"):
        model(x.float() / 255.0)
    with pytest.raises(ValueError, match="uint8.*got shape"):
        model(x[:, :, :4])
    net = switchprune.load_model(f"models:/{NAME}@champion", tracking_uri=served["uri"], raw=False)
    assert isinstance(net, TaskNet)  # raw=False: the bare network, normalised inputs
    with torch.no_grad():
        bare = net((x.float() / 255.0 - 0.3) / 0.2).numpy()
    assert_same_logits(expected_logits(served), bare)
    got = onnx_logits(served)
    assert np.abs(got - bare).max() <= ATOL + RTOL * np.abs(bare).max()


def predict_cli(served: dict, payload: dict, name: str) -> subprocess.Popen[str]:
    """``mlflow models predict`` of ``payload``, started (its answer goes to ``<name>.out``)."""
    work = served["work"]
    (work / f"{name}.json").write_text(json.dumps(payload))
    (work / f"{name}.out").unlink(missing_ok=True)
    command = [sys.executable, "-m", "mlflow", "models", "predict"]
    command += ["-m", f"models:/{NAME}@champion", "--env-manager", "local"]
    command += ["-i", str(work / f"{name}.json"), "-t", "json", "-o", str(work / f"{name}.out")]
    return subprocess.Popen(
        command,
        env=served["env"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_mlflow_models_predict_answers_uint8_and_refuses_floats(served: dict) -> None:
    # Both commands at once: independent processes, each mostly interpreter start-up.
    pixels = predict_cli(served, {"inputs": served["images"].tolist()}, "pixels")
    floats = predict_cli(served, {"inputs": (served["images"] / 255.0).tolist()}, "floats")
    _, pixels_err = pixels.communicate(timeout=300)
    _, floats_err = floats.communicate(timeout=300)

    assert pixels.returncode == 0, pixels_err[-3000:]
    got = logits_of(json.loads((served["work"] / "pixels.out").read_text()))
    assert_same_logits(got, expected_logits(served))

    assert floats.returncode != 0
    assert "expected uint8 pixels 0..255 of shape N×1×8×8" in floats_err, floats_err[-3000:]
    assert not (served["work"] / "floats.out").exists()


@pytest.fixture(scope="module")
def server(served: dict) -> Iterator[ModelServer]:
    """A real ``mlflow models serve`` of the champion."""
    with ModelServer(
        f"models:/{NAME}@champion",
        env=served["env"],
        cwd=served["work"],
        log_path=served["root"] / "serve.log",
    ) as running:
        yield running


def payloads(images: np.ndarray) -> dict[str, dict]:
    """The same batch in every JSON form MLflow's scoring server parses."""
    flat = images.reshape(len(images), -1)
    return {
        "inputs": {"inputs": images.tolist()},
        "instances": {"instances": images.tolist()},
        "dataframe_split": {
            "dataframe_split": {
                "columns": [f"p{i}" for i in range(flat.shape[1])],
                "data": flat.tolist(),
            }
        },
    }


@pytest.mark.parametrize("form", ["inputs", "instances", "dataframe_split"])
def test_serve_answers_uint8_pixels_with_the_models_logits(
    served: dict, server: ModelServer, form: str
) -> None:
    status, body = server.invoke(payloads(served["images"])[form])
    assert status == 200, body
    got = logits_of(body)
    assert_same_logits(got, expected_logits(served))  # what load_model computes
    onnx = onnx_logits(served)
    assert np.abs(got - onnx).max() <= ATOL + RTOL * np.abs(onnx).max()


@pytest.mark.parametrize("form", ["inputs", "instances", "dataframe_split"])
@pytest.mark.parametrize("kind", ["unit", "normalised", "whole"])
def test_serve_refuses_a_float_batch_naming_uint8(
    served: dict, server: ModelServer, form: str, kind: str
) -> None:
    # Pixels scaled to [0, 1] (cast to uint8, a black image), normalised pixels, and floats
    # with whole values (cast, the right image): every float batch is refused alike.
    images = served["images"].astype(np.float64)
    floats = {"unit": images / 255.0, "normalised": (images / 255.0 - 0.3) / 0.2}
    floats["whole"] = images
    status, body = server.invoke(payloads(floats[kind])[form])
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "expected uint8 pixels 0..255 of shape N×1×8×8 (NCHW), got float64" in body["message"]


def test_serve_refuses_out_of_range_pixels_and_another_shape(
    served: dict, server: ModelServer
) -> None:
    images = served["images"].astype(np.int64)
    status, body = server.invoke({"inputs": (images + 256).tolist()})
    assert status == 400 and "uint8 pixels 0..255" in body["message"], body
    status, body = server.invoke({"inputs": images[:, :, :4].tolist()})
    assert status == 400 and "got shape (6, 1, 4, 8)" in body["message"], body
