"""The committed ``dvc.lock`` comes from the committed code and params.

A fresh clone (with the bundled digits recreated, as ``make run`` does) must show no changed
code or parameter dependency in ``dvc status``: only outputs that a clone does not have.
Reports committed beside the lock are then those of the committed code too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from switchprune.data import export_digits

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


def test_committed_lock_matches_committed_code_and_params(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", head], cwd=clone, check=True)
    export_digits(clone / "data" / "raw" / "digits")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(
        [str(BIN / "dvc"), "status", "--json"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout or "{}")
    # The recreated digits are the recorded version (a clone has no cache: "not in cache").
    raw = status.get("data/raw/digits.dvc", [])
    assert all(
        set(e.get("changed outs", {}).values()) <= {"not in cache"}
        for e in raw
        if isinstance(e, dict)
    ), raw
    stale = _stale_dependencies(status)
    assert not stale, (
        f"dvc.lock is stale against the committed code/params: {stale}; "
        "run 'make run' and commit dvc.lock and reports/"
    )
