"""A deep torchvision network through ``dvc repro``: its ONNX copy is checked at its own scale.

ResNet-18 (small-image stem) on the digits for one epoch has logits in the tens, where float32
rounding of two runtimes alone differs by more than a fixed 1e-4; the ONNX check compares the
difference relative to the logits' magnitude and must pass, and the shipped file must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml

import switchprune
from project_support import BIN, copy_project, run_tool

pytestmark = pytest.mark.slow


def test_dvc_repro_of_resnet18_passes_evaluate_with_its_onnx_copy(
    tmp_path: Path, project_files: list[str]
) -> None:
    copy_project(tmp_path, project_files)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["model"]["arch"] = "resnet18"
    params["train"].update(epochs=1, batch_size=64, baseline=False)
    params["evaluate"].update(latency_warmup=0, latency_repeats=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_tool(["git", "init", "-q"], tmp_path)
    run_tool([str(BIN / "dvc"), "repro", "evaluate", "--no-commit"], tmp_path)

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
