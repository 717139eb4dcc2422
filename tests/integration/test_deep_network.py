"""A deep torchvision network through ``dvc repro``: its ONNX copy is checked at its own scale.

ResNet-18 (small-image stem) on the digits for one epoch has logits in the tens, where float32
rounding of two runtimes alone differs by more than a fixed 1e-4; the ONNX check compares the
difference relative to the logits' magnitude and must pass, and the shipped file must agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml

import switchprune

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def test_dvc_repro_of_resnet18_passes_evaluate_with_its_onnx_copy(
    tmp_path: Path, project_files: list[str]
) -> None:
    for rel in project_files:
        if rel.startswith(("reports/", "tests/", "bench/")) or rel == "dvc.lock":
            continue
        if (ROOT / rel).is_file():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tmp_path / rel)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["model"]["arch"] = "resnet18"
    params["train"].update(epochs=1, batch_size=64, baseline=False)
    params["evaluate"].update(latency_warmup=0, latency_repeats=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    for args in (["git", "init", "-q"], [str(BIN / "dvc"), "repro", "evaluate", "--no-commit"]):
        done = subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((tmp_path / "reports" / "evaluate.json").read_text())
    assert report["test_accuracy"] == report["gated_accuracy"]
    assert report["max_abs_logit_diff_f64"] <= 1e-4
    compact = tmp_path / "models" / "compact"
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
