"""The registry layer against a real ``mlflow server`` whose artifacts live in a real S3 server.

``rclone serve s3`` stores every object as a plain file under its root, so where the artifacts
landed is checked on disk. The client process talks to MLflow only (artifacts are proxied by
the server), and the S3 credentials must never show up in the run or the registry.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from pipeline.servers import MlflowServer, S3Server

from project_support import empty_store
from switchprune import registry
from switchprune.io import save_model
from switchprune.models import ModelSpec, TaskNet, build_model
from switchprune.registry import ModelRef, Registration, parse_model_ref

pytestmark = pytest.mark.slow

BUCKET = "mlflow-bucket"
PREFIX = "artifacts"
NAME = "tiny-served"
SPEC = ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 8, "fc2": 4})
# Served models take raw uint8 pixels; the bare network inside takes normalised floats (X).
EXAMPLE = np.arange(2 * 64, dtype=np.uint8).reshape(2, 1, 8, 8)
X = np.linspace(-1.0, 1.0, 2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)


@dataclass
class Stack:
    s3: S3Server
    mlflow: MlflowServer
    root: Path

    @property
    def bucket_dir(self) -> Path:
        return self.s3.root / BUCKET


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A fresh S3 server and an MLflow server storing artifacts in it; S3 env set meanwhile."""
    root = tmp_path_factory.mktemp("registry-server")
    s3 = S3Server(root / "s3", log_path=root / "s3.log")
    (root / "s3" / BUCKET).mkdir(parents=True)  # a bucket is a folder under the root
    with s3, pytest.MonkeyPatch.context() as mp:
        for key, value in s3.environment.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        server = MlflowServer(
            empty_store(tmp_path_factory, root / "mlflow.db"),
            f"s3://{BUCKET}/{PREFIX}",
            env=s3.environment,
            log_path=root / "mlflow.log",
        )
        with server:
            yield Stack(s3, server, root)


def tiny_model(seed: int) -> TaskNet:
    torch.manual_seed(seed)
    return build_model(SPEC).eval()


def model_files(folder: Path, model: TaskNet) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / "model.pt")
    (folder / "widths.json").write_text(json.dumps({"fc1": {"kept": 8}, "fc2": {"kept": 4}}))
    (folder / "meta.json").write_text(json.dumps({"dataset": "digits"}))
    return {n: folder / n for n in ("model.pt", "widths.json", "meta.json")}


def register(stack: Stack, model: TaskNet, files: dict[str, Path]) -> dict[str, Any]:
    return registry.log_and_register(
        stack.mlflow.uri,
        Registration(
            experiment="served",
            model_name=NAME,
            alias="candidate",
            model=model,
            files=files,
            params={"train": {"epochs": 2}, "model": {"hidden": [8, 4]}},
            metrics={"test_accuracy": 0.91, "params_ratio": 0.6},
            tags={"data_md5": "0" * 32, "git_commit": "deadbeef"},
            input_example=EXAMPLE,
        ),
    )


@contextlib.contextmanager
def captured() -> Iterator[dict[str, str]]:
    """What is written to stdout and stderr meanwhile, by Python or straight to the file
    descriptors (as ``capfd`` sees it, for a module-scoped fixture): ``out`` and ``err``."""
    seen: dict[str, str] = {}
    streams = {"out": (1, io.StringIO()), "err": (2, io.StringIO())}
    files = {key: tempfile.TemporaryFile() for key in streams}
    saved = {key: os.dup(fd) for key, (fd, _) in streams.items()}
    try:
        for key, (fd, _) in streams.items():
            os.dup2(files[key].fileno(), fd)
        with (
            contextlib.redirect_stdout(streams["out"][1]),
            contextlib.redirect_stderr(streams["err"][1]),
        ):
            yield seen
    finally:
        for key, (fd, text) in streams.items():
            os.dup2(saved[key], fd)
            os.close(saved[key])
            files[key].seek(0)
            seen[key] = text.getvalue() + files[key].read().decode(errors="replace")
            files[key].close()


@pytest.fixture(scope="module")
def registered(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model = tiny_model(0)
    files = model_files(tmp_path_factory.mktemp("files"), model)
    with captured() as output:
        result = register(stack, model, files)
    return {"model": model, "files": files, "result": result, "output": output}


def test_register_alias_and_artifacts_in_s3(stack: Stack, registered: dict[str, Any]) -> None:
    result = registered["result"]
    assert (result["version"], result["changed"]) == (1, True)
    info = registry.get_alias_version(stack.mlflow.uri, NAME, "candidate")
    assert info is not None and info["version"] == 1
    assert info["run_id"] == result["run_id"]
    assert info["metrics"] == {"test_accuracy": 0.91, "params_ratio": 0.6}
    assert info["tags"]["git_commit"] == "deadbeef"

    # The objects are plain files under the S3 server's root, below the configured prefix.
    stored = [p for p in stack.bucket_dir.rglob("*") if p.is_file()]
    assert stored and all(p.relative_to(stack.bucket_dir).parts[0] == PREFIX for p in stored)
    original = registered["files"]["model.pt"].read_bytes()
    copies = [p for p in stored if p.name == "model.pt"]
    assert len(copies) == 2  # the run's artifact and the model version's extra file
    assert all(p.read_bytes() == original for p in copies)
    assert any(p.name == "MLmodel" for p in stored)
    assert any(p.name == "model.pth" for p in stored)  # the pickled module

    # Registering the same file again through the server reuses the version.
    again = register(stack, tiny_model(0), registered["files"])
    assert again == {**result, "changed": False}


def test_download_by_alias(stack: Stack, registered: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "pulled"
    info = registry.download_model_version(
        stack.mlflow.uri, parse_model_ref(f"models:/{NAME}@candidate"), out
    )
    assert info["version"] == 1
    assert sorted(info["files"]) == sorted(registered["files"])
    for name, src in registered["files"].items():
        assert (out / name).read_bytes() == src.read_bytes(), name


def test_load_model_in_a_fresh_process(stack: Stack, registered: dict[str, Any]) -> None:
    with torch.no_grad():
        expected = registered["model"](torch.from_numpy(X)).tolist()
    code = (
        "import json, mlflow.pytorch, numpy as np, torch\n"
        f"m = mlflow.pytorch.load_model('models:/{NAME}@candidate')\n"
        "x = np.linspace(-1.0, 1.0, 128, dtype=np.float32).reshape(2, 1, 8, 8)\n"
        "with torch.no_grad():\n"
        "    y = m.net(torch.from_numpy(x)).tolist()\n"
        "print(json.dumps({'cls': type(m).__name__, 'net': type(m.net).__name__, 'y': y}))\n"
    )
    # No S3 endpoint or credentials: the artifacts come through the MLflow server.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.pop("SWITCHPRUNE_S3_ENDPOINT", None)
    env["MLFLOW_TRACKING_URI"] = stack.mlflow.uri
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=stack.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cls"] == "ServedModel" and out["net"] == "MLP"  # raw images in, the net inside
    assert out["y"] == expected


def test_no_credentials_in_params_or_tags(stack: Stack, registered: dict[str, Any]) -> None:
    secrets = {stack.s3.access_key, stack.s3.secret_key}
    client = MlflowClient(tracking_uri=stack.mlflow.uri, registry_uri=stack.mlflow.uri)
    run = client.get_run(registered["result"]["run_id"])
    version = client.get_model_version(NAME, "1")
    model = client.get_registered_model(NAME)
    texts = [
        *run.data.params.items(),
        *run.data.tags.items(),
        *(version.tags or {}).items(),
        *(model.tags or {}).items(),
    ]
    assert run.data.params and run.data.tags  # something was fetched
    leaked = [(k, v) for k, v in texts if any(s in k or s in str(v) for s in secrets)]
    assert leaked == []
    assert not any("AWS_" in k or "SECRET" in k.upper() for k, _ in texts)


def test_unknown_alias_names_it(stack: Stack, registered: dict[str, Any]) -> None:
    with pytest.raises(registry.RegistryError, match="no alias 'champion'"):
        registry.version_info(stack.mlflow.uri, ModelRef(NAME))
    with pytest.raises(registry.RegistryError, match="no registered model 'ghost'"):
        registry.version_info(stack.mlflow.uri, ModelRef("ghost", version=1))


def test_stdout_stays_clean(registered: dict[str, Any]) -> None:
    assert registered["result"]["version"] == 1
    output = registered["output"]
    assert output["out"] == ""  # MLflow's "View run ... at <url>" lines went to stderr
    assert "View run" in output["err"]
