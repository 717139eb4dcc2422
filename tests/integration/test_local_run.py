"""``make run``'s runner end to end in throwaway copies of the repository.

Real parts only: the embedded ``rclone serve s3`` server, real ``dvc repro``/``push``/``pull``,
an MLflow SQLite store, and a fresh Python process loading the champion. One complete run is
made once (it takes most of a minute); every test starts from a copy of its result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline.servers import S3Server

from project_support import (
    BIN,
    MODEL,
    completed_project,
    copy_completed,
    run_pipeline,
    run_tool,
    tool_env,
    tool_stdout,
)
from switchprune.data import export_digits
from switchprune.dvcfiles import dvc_md5

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path_factory: pytest.TempPathFactory, project_files: list[str]) -> Path:
    """A copy of a git repository with the project's files (as committed or staged) and tiny
    settings after one complete run: every test changes its own."""
    done = completed_project(tmp_path_factory.getbasetemp(), project_files)
    return copy_completed(done, tmp_path_factory.mktemp("repo") / "project")


def test_make_run_registers_and_promotes(project: Path, tmp_path: Path) -> None:
    promote = json.loads((project / "reports" / "promote.json").read_text())
    assert promote["promoted"] is True, promote
    assert promote["version"] == 1
    report = json.loads((project / "reports" / "evaluate.json").read_text())
    # The hash of the bundled digits, exported byte-identically, is in every record.
    raw_md5 = dvc_md5(export_digits(tmp_path / "digits"))
    assert report["data_md5"] == raw_md5
    bucket = project / ".s3" / "data" / "switchprune-models" / MODEL
    manifest = json.loads((bucket / "current.json").read_text())
    assert manifest["version"] == 1
    assert manifest["data_md5"] == raw_md5
    assert {f["name"] for f in manifest["files"]} >= {"model.pt", "widths.json", "meta.json"}
    for entry in manifest["files"]:
        assert (bucket / "v1" / entry["name"]).stat().st_size == entry["size"]
    # The outputs were pushed to the DVC remote (a content-addressed cache in the bucket).
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    prepared = lock["stages"]["preprocess"]["outs"][0]["md5"]
    remote = project / ".s3" / "data" / "switchprune-dvc" / "cache" / "files" / "md5"
    assert (remote / prepared[:2] / prepared[2:]).is_file()
    assert not (project / "data" / "raw" / "digits").exists()
    # The embedded server is gone, and DVC does not point at its dead port.
    assert "endpointurl" not in (project / ".dvc" / "config.local").read_text()


def test_retraining_to_the_same_weights_keeps_the_promoted_version(project: Path) -> None:
    """``train`` reruns (its report is gone) and resumes to equal weights: no new version, and
    the promotion bucket is not written to at all (its manifest keeps its bytes and time)."""
    models = project / ".s3/data/switchprune-models" / MODEL
    manifest = models / "current.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    (project / "reports" / "train.json").unlink()
    out = run_tool([sys.executable, "pipeline/local.py"], project)
    assert "Running stage 'train'" in out, out
    assert json.loads((project / "reports" / "register.json").read_text())["version"] == 1
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before
    assert not (models / "v2").exists()


def test_champion_loads_in_a_fresh_process(project: Path) -> None:
    code = f"""
import json, mlflow, switchprune
from switchprune.data import load_split, raw_images
x, y = load_split("data/prepared", "test").tensors
raw = raw_images("data/prepared", "test", range(len(y)))
# Every form takes raw uint8 images and normalises them itself.
model = switchprune.load_model("models:/{MODEL}@champion")
acc = float((model(raw).argmax(1) == y).float().mean())
flavour = mlflow.pytorch.load_model("models:/{MODEL}@champion")
same = float((flavour(raw).argmax(1) == y).float().mean())
s3 = switchprune.load_model("s3://switchprune-models/{MODEL}")
from_s3 = float((s3(raw).argmax(1) == y).float().mean())
print(json.dumps({{"acc": acc, "flavour": same, "s3": from_s3}}))
"""
    with S3Server(project / ".s3" / "data", log_path=project / ".s3" / "test.log") as s3:
        out = run_tool(
            [sys.executable, "-c", code],
            project,
            MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
            **s3.environment,
        )
    got = json.loads(out.strip().splitlines()[-1])
    report = json.loads((project / "reports" / "evaluate.json").read_text())
    assert got["acc"] == pytest.approx(report["test_accuracy"], abs=1e-6)
    assert got["flavour"] == pytest.approx(report["test_accuracy"], abs=1e-6)
    assert got["s3"] == pytest.approx(report["test_accuracy"], abs=1e-6)


def test_dvc_pull_into_a_clean_clone(project: Path, tmp_path: Path) -> None:
    run_tool(["git", "add", "-A"], project)
    run_tool(["git", "commit", "-qm", "run", "--allow-empty"], project)
    clone = tmp_path / "clone"
    run_tool(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    with S3Server(project / ".s3" / "data", log_path=tmp_path / "s3.log") as s3:
        dvc = str(BIN / "dvc")
        run_tool([dvc, "remote", "modify", "--local", "storage", "endpointurl", s3.endpoint], clone)
        run_tool([dvc, "pull"], clone, **s3.environment)
    for split in ("train", "val", "test"):
        assert (clone / f"data/prepared/{split}.pt").read_bytes() == (
            project / f"data/prepared/{split}.pt"
        ).read_bytes()
    assert (clone / "models/compact/model.pt").read_bytes() == (
        project / "models/compact/model.pt"
    ).read_bytes()


def test_a_configured_endpoint_is_used_instead_of_the_embedded_server(
    project: Path, tmp_path: Path
) -> None:
    with S3Server(tmp_path / "theirs", log_path=tmp_path / "theirs.log") as theirs:
        out = run_tool(
            [sys.executable, "pipeline/local.py"],
            project,
            SWITCHPRUNE_S3_ENDPOINT=theirs.endpoint,
            **theirs.credentials,
        )
    assert "embedded S3 server" not in out
    # Nothing changed since the completed run: a second run reruns no stage.
    assert "Running stage" not in out, out
    # Their server now holds the DVC remote (the outputs) and the promotion bucket.
    assert any((tmp_path / "theirs" / "switchprune-dvc").rglob("*.dir"))
    assert (tmp_path / "theirs" / "switchprune-models").is_dir()
    assert theirs.secret_key not in out
    assert theirs.endpoint in (project / ".dvc" / "config.local").read_text()


def test_a_second_run_in_the_same_folder_is_refused_and_touches_nothing(project: Path) -> None:
    import fcntl

    config_local = project / ".dvc" / "config.local"
    before = config_local.read_text() if config_local.exists() else None
    with open(project / ".switchprune-run.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run in progress
        proc = run_pipeline(project)
    assert proc.returncode != 0
    assert "another run is in progress" in proc.stderr
    assert "dvc" not in proc.stdout  # refused before running anything
    after = config_local.read_text() if config_local.exists() else None
    assert after == before


@pytest.mark.parametrize(
    ("text", "needle"),
    [("train: [\n", "not valid YAML"), ("- a\n- b\n", "must hold a mapping")],
    ids=["not-yaml", "a-list"],
)
def test_make_run_with_a_bad_params_file_is_one_line_and_starts_nothing(
    project: Path, text: str, needle: str
) -> None:
    params = project / "params.yaml"
    original = params.read_text()
    params.write_text(text)
    try:
        proc = run_pipeline(project)
    finally:
        params.write_text(original)
    assert proc.returncode == 2
    assert proc.stdout == ""  # no server, no dvc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "params.yaml" in lines[0]


def test_an_experiment_registers_and_promotes_nothing(project: Path) -> None:
    """``dvc exp run -S …`` reruns the stages its parameter reaches (prune and evaluate for a
    threshold); registry versions and S3 stay put."""
    import mlflow

    manifest = project / ".s3/data/switchprune-models" / MODEL / "current.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    db = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=db, registry_uri=db)
    versions = sorted(v.version for v in client.search_model_versions(f"name='{MODEL}'"))
    out = run_tool([str(BIN / "dvc"), "exp", "run", "-S", "prune.threshold=0.5"], project)
    assert "Running stage 'prune'" in out and "Running stage 'evaluate'" in out, out
    assert "register" not in out and "promote" not in out, out
    shown = json.loads(tool_stdout([str(BIN / "dvc"), "exp", "show", "--json"], project))
    assert '"threshold": 0.5' in json.dumps(shown)
    assert sorted(v.version for v in client.search_model_versions(f"name='{MODEL}'")) == versions
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before


def test_a_release_the_gate_refuses_exits_3_naming_every_reason(project: Path) -> None:
    """A refusal is exit status 3 (not 0, not a failure's 1), and every failed rule is named."""
    manifest = project / ".s3/data/switchprune-models" / MODEL / "current.json"
    before = manifest.read_bytes()
    params_path = project / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    # Two failing rules; the champion comparison is left out, as the workspace's model may be
    # another test's experiment.
    params["promote"].update(
        min_accuracy=0.999, max_params_ratio=0.01, not_worse_than_champion=False
    )
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = subprocess.run(
            [sys.executable, "pipeline/local.py", "--release"],
            cwd=project,
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        params_path.write_text(original)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    promote = json.loads((project / "reports" / "promote.json").read_text())
    assert promote["promoted"] is False
    reasons = promote["reason"].removeprefix("refused: ").split("; ")
    assert len(reasons) == 2, promote["reason"]
    assert "min_accuracy" in reasons[0] and "max_params_ratio" in reasons[1]
    assert "promotion gate refused" in proc.stderr
    assert manifest.read_bytes() == before
