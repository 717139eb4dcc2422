"""Stages hand files to each other through ``switchprune.io``, never by importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

STAGES = Path(__file__).resolve().parents[2] / "src" / "switchprune" / "stages"


def _imported(path: Path) -> set[str]:
    """Every module and ``module.name`` the file's imports name, relative ones resolved."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "switchprune.stages" if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            out |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return out


def test_no_stage_imports_another_stage() -> None:
    stages = {p.stem for p in STAGES.glob("*.py")} - {"__init__"}
    assert {"preprocess", "train", "prune", "evaluate", "register", "promote"} <= stages
    stage_modules = {f"switchprune.stages.{name}" for name in stages}
    offenders = {
        name: sorted(m for m in _imported(STAGES / f"{name}.py") if m in stage_modules)
        for name in sorted(stages)
    }
    assert {k: v for k, v in offenders.items() if v} == {}
