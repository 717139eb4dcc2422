"""A deep torchvision network through ``dvc repro``: ResNet-18 (small-image stem) on an image
folder of the digits, streamed from disk, then registered and promoted.

After one epoch its logits are in the tens, where float32 rounding of two runtimes alone differs
by more than a fixed 1e-4; the ONNX check compares the difference relative to the logits'
magnitude and must pass, and the shipped file must agree.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from pipeline.servers import S3Server

import switchprune
from folder_support import write_digits_folder
from project_support import BIN, copy_project, run_tool, tool_env, tool_stdout
from switchprune.dvcfiles import dvc_md5

pytestmark = pytest.mark.slow

STAGES = ("preprocess", "train", "prune", "evaluate")


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory, project_files: list[str]) -> Path:
    """A copy of the project after ``dvc repro evaluate`` of ResNet-18 on an image folder.

    One run serves every test here: the chain is the expensive part, the tests only read it.
    """
    project = copy_project(tmp_path_factory.mktemp("resnet18"), project_files)
    write_digits_folder(project / "data" / "folder", per_class=15, splits=("train", "test"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(
        dataset="folder", folder_dir="data/folder", loader="stream", augment="standard"
    )
    params["model"].update(arch="resnet18", small_input=True)
    # The baseline is no subject here: one training run instead of two. Batches of 16 give the
    # one epoch on 150 images enough steps for logits far above 1 (32: barely above).
    params["train"].update(
        epochs=1,
        batch_size=16,
        snn_hidden=8,
        baseline=False,
        target_metric="macs",
        target_ratio=0.5,
    )
    params["evaluate"].update(latency_warmup=0, latency_repeats=1)
    params["register"]["model_name"] = "switchprune-test-resnet18"
    params["promote"].update(min_accuracy=0.0, max_accuracy_drop=1.0, max_params_ratio=0.9)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_tool(["git", "init", "-q"], project)
    out = run_tool([str(BIN / "dvc"), "repro", "evaluate"], project)
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    assert ran == set(STAGES), out
    return project


def test_dvc_repro_of_resnet18_passes_evaluate_with_its_onnx_copy(resnet18: Path) -> None:
    report = json.loads((resnet18 / "reports" / "evaluate.json").read_text())
    assert report["test_accuracy"] == report["gated_accuracy"]
    assert report["max_abs_logit_diff_f64"] <= 1e-6
    assert report["macs_ratio"] <= 0.5 + 1e-9
    compact = resnet18 / "models" / "compact"
    model = switchprune.load_model(compact)
    x = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, size=(16, 1, 8, 8), dtype=np.uint8)
    )
    with torch.no_grad():
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(
        str(compact / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    # Unrescaled logits of a trained network: the agreement is relative to their size.
    scale = float(np.abs(expected).max())
    assert scale > 1.0
    assert float(np.abs(got - expected).max()) <= 1e-4 + 1e-4 * scale
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_image_folder_with_resnet18_streamed_then_released(resnet18: Path) -> None:
    """The image folder is the preprocess stage's data: the run's report names its version;
    the model is registered and promoted, and one changed image puts preprocess out of date."""
    folder = resnet18 / "data" / "folder"
    meta = json.loads((resnet18 / "data" / "prepared" / "meta.json").read_text())
    assert meta["storage"] == "npy" and meta["in_shape"] == [1, 8, 8]
    assert meta["class_names"] == sorted(meta["class_names"]) and len(meta["class_names"]) == 10
    report = json.loads((resnet18 / "reports" / "evaluate.json").read_text())
    assert report["data_md5"] == dvc_md5(folder)
    assert report["n_test"] == 30

    # The release steps on that result: a real S3 server and a SQLite registry.
    (resnet18 / ".s3" / "switchprune-models").mkdir(parents=True, exist_ok=True)
    with S3Server(resnet18 / ".s3", log_path=resnet18 / "s3.log") as s3:
        env = tool_env(**s3.environment, MLFLOW_TRACKING_URI=f"sqlite:///{resnet18 / 'mlflow.db'}")
        for verb in ("register", "promote"):
            done = subprocess.run(
                [str(BIN / "switchprune"), verb],
                cwd=resnet18,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-3000:]
    promote = json.loads((resnet18 / "reports" / "promote.json").read_text())
    assert promote["promoted"] is True, promote
    bucket = resnet18 / ".s3" / "switchprune-models" / "switchprune-test-resnet18"
    manifest = json.loads((bucket / "current.json").read_text())
    assert {"model.pt", "model.onnx"} <= {f["name"] for f in manifest["files"]}

    # One changed image is a new data version: preprocess (and all after it) is out of date.
    first = next((folder / "train" / "one").iterdir())
    first.write_bytes(next((folder / "train" / "two").iterdir()).read_bytes())
    status = json.loads(tool_stdout([str(BIN / "dvc"), "status", "--json"], resnet18))
    changed = [e for e in status.get("preprocess", []) if isinstance(e, dict)]
    assert any("data/folder" in e.get("changed deps", {}) for e in changed), status
