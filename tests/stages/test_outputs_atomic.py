"""Every stage writes its outputs whole or not at all.

Each test lets a stage succeed once, then fail midway for a real reason, and finds the first
run's outputs byte-identical, loadable, and nothing of the failed run left beside them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from folder_support import write_digits_folder
from switchprune import cli
from switchprune.config import DataConfig, ModelConfig, PruneConfig, TrainConfig
from switchprune.data import load_meta, load_split
from switchprune.io import (
    ArtifactError,
    aside_dir,
    load_baseline,
    load_compacted,
    load_switched,
    recover_dir,
    replacing_dir,
)
from switchprune.onnx_export import OnnxExportError
from switchprune.stages import preprocess, prune, train

ROOT = Path(__file__).resolve().parents[2]

# A network of the user's own that the ONNX check refuses: a Python branch on the batch size
# runs at the check's batch of 3 but not in the graph traced at a batch of 2 (or stops the
# exporter, which must keep the batch axis dynamic).
BATCH_DEPENDENT_NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.hidden = nn.Linear(in_channels * 64, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        h = torch.relu(self.hidden(x.flatten(1)))
        if x.shape[0] == 3:
            h = h * 2.0
        return self.fc(h)


def build(num_classes, in_channels):
    return Net(num_classes, in_channels)
"""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    """Entries beside ``folder`` that a staged write of it would leave behind."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def train_cfg(**overrides: Any) -> TrainConfig:
    return TrainConfig(
        epochs=1, batch_size=128, snn_hidden=8, target_ratio=0.5, device="cpu", **overrides
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "prepared"
    preprocess.run(DataConfig(), raw_dir=out.parent / "raw", prepared_dir=out)
    return out


@pytest.fixture(scope="module")
def trained(prepared: Path) -> Path:
    out = prepared.parent / "trained"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.run(
            train_cfg(),
            model_cfg=ModelConfig(arch="mlp", hidden=(24, 16)),
            prepared_dir=prepared,
            trained_dir=out,
            progress=False,
            history_path=prepared.parent / "reports" / "train_history.json",
        )
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def compact(trained: Path) -> Path:
    out = trained.parent / "compact"
    prune.run(PruneConfig(), trained_dir=trained, model_dir=out)
    return out


def test_preprocess_refuses_a_truncated_image_in_one_line_and_keeps_the_last_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_digits_folder(tmp_path / "images", per_class=15)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(dataset="folder", folder_dir=str(folder))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepared = tmp_path / "prepared"
    args = [
        "preprocess",
        "--params",
        "params.yaml",
        "--prepared-dir",
        str(prepared),
        "--metrics",
        "preprocess.json",
    ]
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_VARIABLE}
    # The good run in this process (a torch start-up less); the failing one as a real command,
    # whose whole stderr is the one line.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    assert cli.main(args) == 0
    command = [sys.executable, "-m", "switchprune", *args]
    before, report = snapshot(prepared), (tmp_path / "preprocess.json").read_bytes()

    bad = folder / "train" / "seven" / "003.png"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    failed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert failed.returncode == 2
    assert failed.stderr.startswith(f"switchprune preprocess: error: cannot read image {bad}: ")
    assert failed.stderr.count("\n") == 1, failed.stderr
    assert snapshot(prepared) == before
    assert (tmp_path / "preprocess.json").read_bytes() == report
    assert leftovers(prepared) == []
    assert len(load_split(prepared, "train")) == load_meta(prepared).n_train


def test_train_failing_in_its_second_run_keeps_the_last_models_and_history(
    prepared: Path, trained: Path, single_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = prepared.parent / "reports" / "train_history.json"
    before, history_before = snapshot(trained), history.read_bytes()
    real_fit = train.fit

    def fit_then_fail(*args: Any, switched: bool, **kwargs: Any) -> Any:
        if not switched:  # the baseline, after the switched network is trained
            raise RuntimeError("out of memory in the baseline run")
        return real_fit(*args, switched=switched, **kwargs)

    monkeypatch.setattr(train, "fit", fit_then_fail)
    with pytest.raises(RuntimeError, match="baseline run"):
        train.run(
            train_cfg(seed=1),
            model_cfg=ModelConfig(arch="mlp", hidden=(24, 16)),
            prepared_dir=prepared,
            trained_dir=trained,
            progress=False,
            history_path=history,
        )
    assert snapshot(trained) == before
    assert history.read_bytes() == history_before
    assert leftovers(trained) == [] and leftovers(history) == []
    assert load_switched(trained)[0] is not None and load_baseline(trained) is not None


def test_prune_whose_onnx_check_fails_keeps_the_last_compact_model(
    prepared: Path, compact: Path, tmp_path: Path, single_thread: None
) -> None:
    net = tmp_path / "batch_net.py"
    net.write_text(BATCH_DEPENDENT_NET)
    other = tmp_path / "trained"
    train.run(
        train_cfg(baseline=False),
        model_cfg=ModelConfig(arch=f"{net}:build"),
        prepared_dir=prepared,
        trained_dir=other,
        progress=False,
    )
    assert (other / "network.py").is_file()  # the user's network travels with its model
    before = snapshot(compact)
    with pytest.raises(OnnxExportError, match="does not match PyTorch"):
        prune.run(PruneConfig(), trained_dir=other, model_dir=compact)
    assert snapshot(compact) == before
    assert leftovers(compact) == []
    model, kept = load_compacted(compact)
    assert set(kept) <= set(model.spec.widths)


def test_evaluate_failing_midway_keeps_the_last_report(
    prepared: Path,
    trained: Path,
    compact: Path,
    tmp_path: Path,
    single_thread: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"].update(latency_warmup=1, latency_repeats=2, device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    report = tmp_path / "reports" / "evaluate.json"
    args = [
        "evaluate",
        "--params",
        str(tmp_path / "params.yaml"),
        "--prepared-dir",
        str(prepared),
        "--trained-dir",
        str(trained),
        "--metrics",
        str(report),
    ]
    assert cli.main([*args, "--model-dir", str(compact)]) == 0
    before = report.read_bytes()
    # A damaged ONNX copy is found after the accuracies, when its latency is measured.
    damaged = tmp_path / "damaged"
    shutil.copytree(compact, damaged)
    (damaged / "model.onnx").write_bytes(b"not an onnx model")
    assert cli.main([*args, "--model-dir", str(damaged)]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (
        f"switchprune evaluate: error: {damaged / 'model.onnx'}: not a readable ONNX model "
        "(DecodeError) (re-run prune)"
    )
    assert report.read_bytes() == before
    assert leftovers(report) == []


def test_a_swap_killed_between_its_renames_is_recovered_by_the_next_run(tmp_path: Path) -> None:
    """Killed after renaming the old folder aside, before renaming the new one in."""
    out = tmp_path / "out"
    with replacing_dir(out, ["a.txt"], "test") as staged:
        (staged.dir / "a.txt").write_text("old")
    # What such a kill leaves: no out/, the old folder aside, a staging folder of a dead process.
    os.replace(out, aside_dir(out))
    dead = tmp_path / ".out.999999999.x.new"
    dead.mkdir()
    (dead / "a.txt").write_text("half")
    recover_dir(out)
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_holding_other_files_is_never_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"holds 'notes.txt', which test does not write"):
        with replacing_dir(out, ["a.txt"], "test"):
            pass
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
