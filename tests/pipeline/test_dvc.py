"""The real ``dvc repro`` on the project's own dvc.yaml, in a throwaway copy of the repository.

The project is the session's tiny one after its complete run (``make run``, see
tests/integration/test_local_run.py); only the stages up to ``evaluate`` run again here (no S3
or MLflow needed).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from project_support import (
    BIN,
    completed_output,
    completed_project,
    copy_completed,
    run_tool,
    tool_env,
    tool_stdout,
)
from switchprune.data import export_digits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, project_files: list[str]) -> Path:
    """A copy of the session's tiny project (a clone of this repository, tiny settings) after
    its one complete run: the tests below change it in file order."""
    done = completed_project(tmp_path_factory.getbasetemp(), project_files)
    return copy_completed(done, tmp_path_factory.mktemp("project") / "project")


def _stages_run(output: str) -> set[str]:
    return {
        s for s in ("preprocess", "train", "prune", "evaluate") if f"Running stage '{s}'" in output
    }


@pytest.fixture(scope="module")
def completed(project: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The output of the project's first run (``make run``'s ``dvc repro``, from a clone where
    ``data/raw`` holds only its ``.gitignore``); the tests below read its result in file
    order, each leaving the pipeline up to date for the next (or restored)."""
    return completed_output(tmp_path_factory.getbasetemp())


def test_repro_runs_all_stages_then_nothing(project: Path, completed: str) -> None:
    first = completed
    assert _stages_run(first) == {"preprocess", "train", "prune", "evaluate"}
    report = json.loads((project / "reports" / "evaluate.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["max_abs_logit_diff"] <= 1e-5
    assert (project / "models" / "compact" / "model.pt").is_file()
    assert (project / "dvc.lock").is_file()

    second = run_tool([str(BIN / "dvc"), "repro", "evaluate"], project)
    assert _stages_run(second) == set(), second
    status = run_tool([str(BIN / "dvc"), "status", "evaluate"], project)
    assert "up to date" in status


def test_training_curves_are_dvc_plots(project: Path, completed: str) -> None:
    history = json.loads((project / "reports" / "train_history.json").read_text())
    epochs = yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    assert {"loss", "val_accuracy", "params_ratio", "baseline_loss"} <= set(history[0])
    stage = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]
    assert "reports/train_history.json" in {o["path"] for o in stage["outs"]}

    shown = json.loads(tool_stdout([str(BIN / "dvc"), "plots", "show", "--json"], project))["data"]
    for key in ("loss", "val_accuracy", "params_ratio"):
        (plot,) = shown[key]
        assert plot["type"] == "vega" and plot["revisions"] == ["workspace"]
        spec = plot["content"]
        assert spec["encoding"]["x"]["field"] == "epoch"
        assert f'"field": "{key}"' in json.dumps(spec)  # the y axis (inside Vega-Lite layers)
        points = [(v["epoch"], v[key]) for v in spec["data"]["values"]]
        assert points == [(r["epoch"], r[key]) for r in history]
    # The history is committed like the other reports: diff the workspace against HEAD.
    run_tool(["git", "add", "-f", "reports/train_history.json", "dvc.lock"], project)
    run_tool(["git", "commit", "-qm", "curves"], project)
    diff = json.loads(tool_stdout([str(BIN / "dvc"), "plots", "diff", "HEAD", "--json"], project))
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

    out = run_tool([str(BIN / "dvc"), "repro", "evaluate"], project)
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
            env=tool_env(),
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
        run_tool([str(BIN / "dvc"), "repro", "preprocess"], project)
        again = run_tool([str(BIN / "dvc"), "repro", "preprocess"], project)
        assert _stages_run(again) == set(), again
        labels = next(idx_dir.glob("*labels-idx1-ubyte*"))
        before = read_idx(labels)
        raw = bytearray(labels.read_bytes())
        header = len(raw) - before.size
        raw[header] = (raw[header] + 1) % 10  # one label changed, still a valid class
        labels.write_bytes(bytes(raw))
        out = run_tool([str(BIN / "dvc"), "repro", "preprocess"], project)
        assert _stages_run(out) == {"preprocess"}, out
    finally:
        (project / "params.yaml").write_text(text)
