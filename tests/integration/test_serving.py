"""A registered model served by MLflow's own tools: raw images in, the same classes out."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline.servers import free_port

import switchprune
from switchprune import registry
from switchprune.io import save_model
from switchprune.models import ModelSpec, TaskNet, build_model

SPEC = ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 16, "fc2": 8})
MEAN, STD = (0.3,), (0.2,)
NAME = "served-tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    save_model(model, root / "model.pt")
    (root / "meta.json").write_text(json.dumps({"mean": MEAN, "std": STD}))
    images = np.random.default_rng(0).integers(0, 256, size=(6, 1, 8, 8), dtype=np.uint8)
    registry.log_and_register(
        uri,
        registry.Registration(
            experiment="serving",
            model_name=NAME,
            alias="champion",
            model=model,
            files={"model.pt": root / "model.pt", "meta.json": root / "meta.json"},
            input_example=images[:2],
            artifact_location=str(root / "artifacts"),
            normalization=(MEAN, STD),
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
    return {"uri": uri, "images": images, "root": root, "env": env}


def expected_classes(served: dict) -> np.ndarray:
    net = switchprune.load_model(f"models:/{NAME}@champion", tracking_uri=served["uri"])
    assert isinstance(net, TaskNet)  # load_model still gives the task network itself
    x = torch.from_numpy(served["images"]).float() / 255.0
    x = (x - torch.tensor(MEAN).view(-1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1)
    with torch.no_grad():
        return net(x).argmax(1).numpy()


def classes(predictions: object) -> np.ndarray:
    if isinstance(predictions, dict):
        predictions = predictions["predictions"]
    return np.asarray(predictions, dtype=np.float64).argmax(1)


def test_requirements_name_no_unpublished_package(served: dict) -> None:
    model_dir = next((served["root"] / "artifacts").rglob("MLmodel")).parent
    reqs = (model_dir / "requirements.txt").read_text()
    lines = [line for line in reqs.split() if line]
    assert all("==" in line for line in lines), lines
    assert not any(line.split("==")[0] == "switchprune" for line in lines)
    assert (model_dir / "code" / "switchprune" / "serving.py").is_file()


def test_mlflow_models_predict_returns_load_model_classes(served: dict) -> None:
    tmp = served["root"]
    (tmp / "input.json").write_text(json.dumps({"inputs": served["images"].tolist()}))
    out = tmp / "predictions.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "predict",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-i",
            str(tmp / "input.json"),
            "-t",
            "json",
            "-o",
            str(out),
        ],
        env=served["env"],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = classes(json.loads(out.read_text()))
    assert got.tolist() == expected_classes(served).tolist()


def test_mlflow_models_serve_answers_invocations(served: dict) -> None:
    port = free_port()
    log = (served["root"] / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
        ],
        env=served["env"],
        cwd=served["root"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (served["root"] / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not come up"
            time.sleep(0.5)
        body = json.dumps({"inputs": served["images"].tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            got = classes(json.loads(r.read()))
        assert got.tolist() == expected_classes(served).tolist()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
