"""Helpers of the tests that run the project's tools in a throwaway copy of the repository."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool_env(**extra: str) -> dict[str, str]:
    """A tool's environment: this environment's scripts first, no service settings of the
    caller's (each test names its own), no telemetry, and a git identity."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "SWITCHPRUNE_"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    for key in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{key}_NAME"] = "test"
        env[f"GIT_{key}_EMAIL"] = "test@example.invalid"
    env.update(extra)
    return env


def run_tool(args: list[str], cwd: Path, **extra: str) -> str:
    """Run ``args`` in ``cwd`` with :func:`tool_env`; it must succeed. Its output."""
    proc = subprocess.run(
        args, cwd=cwd, env=tool_env(**extra), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def tool_stdout(args: list[str], cwd: Path, **extra: str) -> str:
    """Run ``args`` in ``cwd`` with :func:`tool_env`; it must succeed. Its stdout alone (tools
    such as DVC may warn on stderr)."""
    proc = subprocess.run(
        args, cwd=cwd, env=tool_env(**extra), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def run_pipeline(project: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``make run``'s runner in ``project``: its result, whatever its status."""
    return subprocess.run(
        [sys.executable, "pipeline/local.py"],
        cwd=project,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def copy_project(dst: Path, project_files: list[str]) -> Path:
    """The project's files (committed, staged or new) in ``dst``: no reports, tests or lock."""
    for rel in project_files:
        if rel.startswith(("reports/", "tests/")) or rel == "dvc.lock":
            continue
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


def commit_all(repo: Path) -> None:
    """``git init`` ``repo`` if needed and commit everything in it."""
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run_tool(args, repo)


MODEL = "switchprune-test-mlp"  # the registered name of the tiny project's model


def tiny_project(dst: Path, project_files: list[str]) -> Path:
    """A git repository in ``dst`` with the project's files and settings a run takes seconds on."""
    copy_project(dst, project_files)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["model"]["hidden"] = [32, 16]
    params["train"].update(
        epochs=3, batch_size=128, snn_hidden=8, target_ratio=0.5, tnn_steps_per_snn_step=1
    )
    params["evaluate"].update(latency_warmup=1, latency_repeats=2)
    params["register"]["model_name"] = MODEL
    params["promote"].update(min_accuracy=0.3, max_accuracy_drop=0.5, max_params_ratio=0.9)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(dst)
    return dst


def shared_dir(basetemp: Path) -> Path:
    """The folder of this test session that every pytest-xdist worker sees (``basetemp``'s
    parent under xdist, ``basetemp`` itself without it): things built once go there."""
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def completed_project(basetemp: Path, project_files: list[str]) -> Path:
    """The :func:`tiny_project` after one complete ``pipeline/local.py`` run, built once per
    session: a run is most of a minute, and every test that needs one starts from a copy
    (:func:`copy_completed`). ``basetemp`` is pytest's; its parent is shared by the
    pytest-xdist workers of one session, which build it under a file lock."""
    shared = shared_dir(basetemp)
    built = shared / "completed-project"
    done = shared / "completed-project.done"
    with FileLock(str(shared / "completed-project.lock")):
        if not done.exists():
            if built.exists():
                shutil.rmtree(built)  # a build that failed in another worker
            built.mkdir()
            tiny_project(built, project_files)
            run = run_pipeline(built, timeout=300)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            done.write_text(run.stdout + run.stderr)
    return built


def completed_output(basetemp: Path) -> str:
    """What the run of :func:`completed_project` printed (its ``dvc repro`` among it)."""
    return (shared_dir(basetemp) / "completed-project.done").read_text()


def copy_completed(src: Path, dst: Path) -> Path:
    """A copy of the completed project ``src`` in ``dst`` (which must not exist) that is its
    own: the absolute paths MLflow recorded (artifact locations in its SQLite store, model
    metadata, the register report) are moved along."""
    shutil.copytree(src, dst, symlinks=True)
    old, new = str(src), str(dst)
    db = sqlite3.connect(dst / "mlflow.db")
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for _, column, kind, *_ in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                if kind.upper().startswith(("TEXT", "VARCHAR")):
                    db.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                        f'WHERE instr("{column}", ?) > 0',
                        (old, new, old),
                    )
        db.commit()
    finally:
        db.close()
    for path in [*(dst / "mlruns").rglob("*"), *(dst / "reports").glob("*.json")]:
        if path.is_file() and path.stat().st_size < 1 << 20:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            if old in text:
                path.write_text(text.replace(old, new), encoding="utf-8")
    return dst


def empty_store(tmp_path_factory: pytest.TempPathFactory, db: Path) -> str:
    """An empty MLflow SQLite store at ``db`` (its URI): a copy of one made once per session and
    shared by its workers, as a new store runs every schema migration (seconds each time)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    shared = shared_dir(tmp_path_factory.getbasetemp())
    template = shared / "mlflow-empty.db"
    with FileLock(str(shared / "mlflow-empty.lock")):
        if not template.exists():
            scratch = shared / "mlflow-empty.db.tmp"
            scratch.unlink(missing_ok=True)
            store = SqlAlchemyStore(f"sqlite:///{scratch}", str(shared / "mlflow-empty-artifacts"))
            store.engine.dispose()
            scratch.rename(template)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"
