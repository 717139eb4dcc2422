"""Helpers of the tests that run the project's tools in a throwaway copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
