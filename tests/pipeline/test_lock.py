"""A fresh clone of the committed tree: its ``dvc.lock`` and its ``dvc repro``.

The clone must show no changed code or parameter dependency in ``dvc status``, only outputs a
clone does not have: the committed reports are then those of the committed code. And
``dvc repro evaluate`` must run there as a new user runs it, on the defaults, with no server
and no network, then have nothing left to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _stale_dependencies(status: dict) -> dict[str, dict]:
    """Per stage, the changed dependencies that are not another stage's (missing) output."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outputs = {
        next(iter(o)) if isinstance(o, dict) else o
        for s in stages.values()
        for o in s.get("outs", [])
    }
    stale: dict[str, dict] = {}
    for stage, entries in status.items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            for path, what in entry.get("changed deps", {}).items():
                if path not in outputs:
                    stale.setdefault(stage, {})[path] = what
    return stale


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of HEAD, with nothing but what git holds."""
    dst = tmp_path_factory.mktemp("fresh") / "clone"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dst)], check=True)
    subprocess.run(["git", "checkout", "-q", head], cwd=dst, check=True)
    return dst


def _dvc(clone: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dvc"), *args],
        cwd=clone,
        env={**os.environ, "DVC_NO_ANALYTICS": "1", **env},
        capture_output=True,
        text=True,
        timeout=540,
    )


def test_committed_lock_matches_committed_code_and_params(clone: Path) -> None:
    proc = _dvc(clone, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout or "{}")
    stale = _stale_dependencies(status)
    assert not stale, (
        f"dvc.lock is stale against the committed code/params: {stale}; "
        "run 'make run' and commit dvc.lock and reports/"
    )


def _outs(project: Path, stage: str) -> dict[str, str]:
    """The md5 of each output of ``stage`` as ``dvc.lock`` in ``project`` records it."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}


def test_a_fresh_clone_reproduces_offline_then_has_nothing_to_do(clone: Path) -> None:
    # As after `make setup`: the environment in .venv, not activated (PATH does not name it).
    (clone / ".venv").symlink_to(BIN.parent, target_is_directory=True)
    # Any download would go through this proxy, which nothing answers; the clone's own code runs.
    offline = {
        "PATH": "/usr/bin:/bin",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "PYTHONPATH": str(clone / "src"),
    }
    first = _dvc(clone, "repro", "evaluate", **offline)
    assert first.returncode == 0, first.stdout + first.stderr
    ran = {line.split("'")[1] for line in first.stdout.splitlines() if "Running stage" in line}
    assert {"preprocess", "train", "prune"} <= ran, first.stdout
    if "evaluate" not in ran:
        # Training and compaction gave the very bytes the commit records (deterministic on
        # this kind of CPU), so the committed report is this model's and DVC keeps it.
        assert "Stage 'evaluate' didn't change" in first.stdout, first.stdout
        assert _outs(clone, "prune") == _outs(ROOT, "prune")
    report = json.loads((clone / "reports" / "evaluate.json").read_text())
    assert report["test_accuracy"] > 0.9
    # The bundled digits are prepared to the very bytes the committed lock records.
    assert _outs(clone, "preprocess") == _outs(ROOT, "preprocess")
    assert not (clone / "data" / "raw" / "digits").exists()  # the stage never writes its input

    second = _dvc(clone, "repro", "evaluate", **offline)
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout, second.stdout
    assert _dvc(clone, "status", "--json").stdout.strip() in {"{}", ""}
