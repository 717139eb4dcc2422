"""The real ``dvc repro`` on the project's own dvc.yaml, in a throwaway copy of the repository.

Only the stages up to ``evaluate`` run here (no S3 or MLflow needed); the whole chain with
``register`` and ``promote`` runs in tests/integration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from switchprune.data import export_digits

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.invalid")
    return env


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository holding the project's pipeline files, with a tiny training budget."""
    dst = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, dst / name)
    (dst / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", dst / ".dvc" / "config")
    shutil.copytree(
        ROOT / "src", dst / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["model"]["hidden"] = [32, 16]
    params["train"].update(epochs=3, batch_size=128, snn_hidden=8, baseline=True)
    params["evaluate"].update(latency_warmup=0, latency_repeats=1)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # As in a clone: data/raw holds only its .gitignore; preprocess exports the bundled digits.
    (dst / "data" / "raw").mkdir(parents=True)
    shutil.copy(ROOT / "data" / "raw" / ".gitignore", dst / "data" / "raw" / ".gitignore")
    _run(["git", "init", "-q"], dst)
    _run(["git", "add", "-A"], dst)
    _run(["git", "commit", "-qm", "init"], dst)
    return dst


def _stdout(args: list[str], cwd: Path) -> str:
    """A command's stdout alone (DVC may warn on stderr)."""
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _stages_run(output: str) -> set[str]:
    return {
        s for s in ("preprocess", "train", "prune", "evaluate") if f"Running stage '{s}'" in output
    }


@pytest.fixture(scope="module")
def completed(project: Path) -> str:
    """The output of the project's first ``dvc repro evaluate``; the tests below read its
    result in file order, each leaving the pipeline up to date for the next (or restored)."""
    return _run([str(BIN / "dvc"), "repro", "evaluate"], project)


def test_repro_runs_all_stages_then_nothing(project: Path, completed: str) -> None:
    first = completed
    assert _stages_run(first) == {"preprocess", "train", "prune", "evaluate"}
    report = json.loads((project / "reports" / "evaluate.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["max_abs_logit_diff"] <= 1e-5
    assert (project / "models" / "compact" / "model.pt").is_file()
    assert (project / "dvc.lock").is_file()

    second = _run([str(BIN / "dvc"), "repro", "evaluate"], project)
    assert _stages_run(second) == set(), second
    status = _run([str(BIN / "dvc"), "status", "evaluate"], project)
    assert "up to date" in status


def test_training_curves_are_dvc_plots(project: Path, completed: str) -> None:
    history = json.loads((project / "reports" / "train_history.json").read_text())
    epochs = yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    assert {"loss", "val_accuracy", "params_ratio", "baseline_loss"} <= set(history[0])
    stage = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]
    assert "reports/train_history.json" in {o["path"] for o in stage["outs"]}

    shown = json.loads(_stdout([str(BIN / "dvc"), "plots", "show", "--json"], project))["data"]
    for key in ("loss", "val_accuracy", "params_ratio"):
        (plot,) = shown[key]
        assert plot["type"] == "vega" and plot["revisions"] == ["workspace"]
        spec = plot["content"]
        assert spec["encoding"]["x"]["field"] == "epoch"
        assert f'"field": "{key}"' in json.dumps(spec)  # the y axis (inside Vega-Lite layers)
        points = [(v["epoch"], v[key]) for v in spec["data"]["values"]]
        assert points == [(r["epoch"], r[key]) for r in history]
    # The history is committed like the other reports: diff the workspace against HEAD.
    _run(["git", "add", "-f", "reports/train_history.json", "dvc.lock"], project)
    _run(["git", "commit", "-qm", "curves"], project)
    diff = json.loads(_stdout([str(BIN / "dvc"), "plots", "diff", "HEAD", "--json"], project))
    assert not diff.get("errors"), diff["errors"]
    for key in ("loss", "val_accuracy", "params_ratio"):
        (plot,) = diff["data"][key]
        assert sorted(plot["revisions"]) == ["HEAD", "workspace"]
        values = plot["content"]["data"]["values"]
        assert sorted({v["rev"] for v in values}) == ["HEAD", "workspace"]
        assert len(values) == 2 * len(history)


def test_changing_the_threshold_reruns_only_the_stages_after_training(
    project: Path, completed: str
) -> None:
    trained = (project / "models" / "trained" / "switched.pt").read_bytes()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prune"]["threshold"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = _run([str(BIN / "dvc"), "repro", "evaluate"], project)
    assert _stages_run(out) == {"prune", "evaluate"}, out
    assert (project / "models" / "trained" / "switched.pt").read_bytes() == trained
    prune = json.loads((project / "reports" / "prune.json").read_text())
    assert prune["params_after"] < prune["params_before"]


def test_a_bad_parameter_keeps_the_last_good_report(project: Path, completed: str) -> None:
    good = (project / "reports" / "train.json").read_text()
    text = (project / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params["train"]["epochs"] = 0  # refused by the train stage
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = subprocess.run(
            [str(BIN / "dvc"), "repro", "evaluate"],
            cwd=project,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode != 0
        assert "[train] epochs must be >= 1" in proc.stdout + proc.stderr
        assert (project / "reports" / "train.json").read_text() == good
    finally:
        (project / "params.yaml").write_text(text)


def test_changed_idx_labels_rerun_preprocess(project: Path, tmp_path: Path) -> None:
    """IDX files outside the project are still the stage's data: a changed label reruns it."""
    from switchprune.data import read_idx

    idx_dir = tmp_path / "idx"
    export_digits(idx_dir)
    text = (project / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params["data"].update(dataset="idx", idx_dir=str(idx_dir))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        _run([str(BIN / "dvc"), "repro", "preprocess"], project)
        again = _run([str(BIN / "dvc"), "repro", "preprocess"], project)
        assert _stages_run(again) == set(), again
        labels = next(idx_dir.glob("*labels-idx1-ubyte*"))
        before = read_idx(labels)
        raw = bytearray(labels.read_bytes())
        header = len(raw) - before.size
        raw[header] = (raw[header] + 1) % 10  # one label changed, still a valid class
        labels.write_bytes(bytes(raw))
        out = _run([str(BIN / "dvc"), "repro", "preprocess"], project)
        assert _stages_run(out) == {"preprocess"}, out
    finally:
        (project / "params.yaml").write_text(text)
