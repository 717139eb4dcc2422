"""The benchmark's scripts live outside the package: one loader imports them by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
# The scripts import their sibling modules by name, as when run as ``python bench/<name>.py``.
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))


def load_bench_script(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` as module ``switchprune_bench_<name>``."""
    spec = importlib.util.spec_from_file_location(
        f"switchprune_bench_{name}", ROOT / "bench" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
