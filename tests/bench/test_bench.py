"""The benchmark's code end to end on its tiny setting, so that ``make bench`` never rots."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT.parent / "shared" / "data" / "mnist-t10k"

pytestmark = pytest.mark.slow


def _bench_module():
    spec = importlib.util.spec_from_file_location("switchprune_bench", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    bench = _bench_module()
    assert bench.main(["--setting", "tiny", "--out", str(out), "--mnist-dir", str(MNIST)]) == 0
    return out


def test_writes_json_markdown_and_plots(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    expected = {"digits", "mnist"} if MNIST.is_dir() else {"digits"}
    assert set(data["summary"]) == expected
    for plot in data["meta"]["plots"]:
        assert (results / plot).read_bytes().startswith(b"\x89PNG")
    assert any(p.startswith("accuracy_vs_macs_") for p in data["meta"]["plots"])
    assert any(p.startswith("widths_") for p in data["meta"]["plots"])
    md = (results / "results.md").read_text()
    for ds in expected:
        assert f"## {ds}" in md
    assert "| TNN / method | accuracy % | params | MACs | params ratio | MACs ratio " in md
    assert "## Ablations" in md


def test_every_method_is_measured_and_baselines_match_ours(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    for cell in data["cells"]:
        methods = cell["methods"]
        assert set(methods) == {
            "unpruned",
            "ours",
            "ours+ft",
            "slimming@params",
            "slimming@macs",
            "l1norm@params",
            "l1norm@macs",
        }
        ours = methods["ours"]
        assert ours["params"] < methods["unpruned"]["params"]
        # Matched baselines fit the budget ours reached.
        for name in ("slimming@params", "l1norm@params"):
            assert methods[name]["params"] <= ours["params"]
        for name in ("slimming@macs", "l1norm@macs"):
            assert methods[name]["macs"] <= ours["macs"]
        for m in methods.values():
            assert 0.0 <= m["accuracy"] <= 1.0
            assert m["latency_ms_b1"] > 0 and m["latency_ms_b256"] > 0
    variants = data["ablations"]["variants"]
    assert variants["paper: no penalty"]["params_ratio"][0] == pytest.approx(1.0)
    assert variants["default (k=8)"]["params_ratio"][0] <= 0.3 + 1e-9
