"""The architecture holds: one library, thin adapters, one verb per stage everywhere.

* The library never imports an orchestrator (``kfp``, ``dvc``).
* Every Kubeflow component is a thin wrapper: a few imports, one call to
  ``switchprune.stages.<verb>.run``, the metrics loop; no other logic.
* The six verbs agree across ``dvc.yaml``, the CLI, ``stages/``, ``components/`` and
  ``params.yaml``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from components.image import IMAGE
from kfp_support import ROOT

VERBS = ("preprocess", "train", "prune", "evaluate", "register", "promote")
# ``dvc exp run`` must never register or promote: DVC runs the experiment verbs only, and the
# release verbs run in ``make release`` (pipeline/local.py).
EXPERIMENT = VERBS[:4]
RELEASE = VERBS[4:]
ORCHESTRATORS = ("kfp", "dvc")
LIBRARY = ROOT / "src" / "switchprune"


def _library_modules() -> list[str]:
    names = []
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_library_source_never_imports_an_orchestrator() -> None:
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 20
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            _imported_roots(ast.parse(path.read_text())) & {*ORCHESTRATORS}
        )
        for path in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_library_module_loads_no_orchestrator() -> None:
    modules = _library_modules()
    assert {"switchprune", "switchprune.cli", "switchprune.stages.train"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted({{m for m in sys.modules if m.split('.')[0] in {ORCHESTRATORS!r}}})\n"
        "assert not bad, bad\n"
        "print(len(sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 100  # torch, mlflow, boto3 ... were really imported


def _component(verb: str) -> tuple[ast.Module, ast.FunctionDef]:
    tree = ast.parse((ROOT / "components" / f"{verb}.py").read_text())
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert [f.name for f in funcs] == [verb], "one component per file, named like the stage"
    return tree, funcs[0]


def _statements(body: list[ast.stmt]) -> list[ast.stmt]:
    out = []
    for stmt in body:
        out.append(stmt)
        for field in ("body", "orelse", "finalbody", "handlers"):
            out.extend(_statements(getattr(stmt, field, [])))
    return out


@pytest.mark.parametrize("verb", VERBS)
def test_every_component_is_a_thin_wrapper_over_its_stage(verb: str) -> None:
    tree, func = _component(verb)
    # Decorated as a lightweight component in the project image, kfp not pip-installed.
    (decorator,) = func.decorator_list
    assert isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "dsl.component"
    kwargs = {k.arg: ast.unparse(k.value) for k in decorator.keywords}
    assert kwargs == {"base_image": "IMAGE", "install_kfp_package": "False"}
    # Only kfp and the image name at module level: heavy imports live inside the body.
    module_imports = {
        n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
        for n in tree.body
        if isinstance(n, ast.Import | ast.ImportFrom)
    }
    assert module_imports <= {"kfp", "kfp.dsl", "components.image"}

    statements = _statements(func.body)
    # Imports inside the body: the stdlib for paths, the library for everything else.
    inner = {
        (s.module if isinstance(s, ast.ImportFrom) else s.names[0].name).split(".")[0]
        for s in statements
        if isinstance(s, ast.Import | ast.ImportFrom)
    }
    assert inner <= {"pathlib", "tempfile", "switchprune"}
    # It calls switchprune.stages.<verb>.run.
    stage_alias = [
        alias.asname or alias.name
        for s in statements
        if isinstance(s, ast.ImportFrom) and s.module == "switchprune.stages"
        for alias in s.names
        if alias.name == verb
    ]
    assert len(stage_alias) == 1
    calls = [ast.unparse(n.func) for n in ast.walk(func) if isinstance(n, ast.Call)]
    assert calls.count(f"{stage_alias[0]}.run") == 1


def test_the_train_launcher_is_a_thin_wrapper_over_the_trainjob_module() -> None:
    """Same name, inputs and outputs as ``train``; its work is ``components.trainjob.run``."""
    from components.train import train
    from components.train_launcher import train as launcher

    tree = ast.parse((ROOT / "components" / "train_launcher.py").read_text())
    (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    (decorator,) = func.decorator_list
    assert {k.arg: ast.unparse(k.value) for k in decorator.keywords} == {
        "base_image": "IMAGE",
        "install_kfp_package": "False",
    }
    inner = {
        (s.module if isinstance(s, ast.ImportFrom) else s.names[0].name).split(".")[0]
        for s in _statements(func.body)
        if isinstance(s, ast.Import | ast.ImportFrom)
    }
    assert inner <= {"pathlib", "components", "switchprune"}
    calls = [ast.unparse(n.func) for n in ast.walk(func) if isinstance(n, ast.Call)]
    assert calls.count("trainjob.run") == 1
    assert launcher.component_spec.name == train.component_spec.name == "train"
    assert set(launcher.component_spec.inputs) == set(train.component_spec.inputs) | {"kubeflow"}
    assert launcher.component_spec.outputs == train.component_spec.outputs
    # What it imports from components/ is what the image copies there (see the Dockerfile).
    imported = {
        node.module
        for path in ("train_launcher.py", "trainjob.py")
        for node in ast.walk(ast.parse((ROOT / "components" / path).read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components")
    }
    copied = re.search(r"^COPY (components/.*) /opt/switchprune/components/$", _dockerfile(), re.M)
    assert copied is not None
    in_image = {f"components.{Path(f).stem}" for f in copied.group(1).split()} | {"components"}
    assert imported <= in_image, imported - in_image
    # The SDK is imported in the pod only: compiling needs kfp, not the launcher's imports.
    module_imports = {
        n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
        for n in tree.body
        if isinstance(n, ast.Import | ast.ImportFrom)
    }
    assert module_imports <= {"kfp", "kfp.dsl", "components.image"}


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_no_function_is_longer_than_80_lines() -> None:
    """Long functions are split into named steps, in the library and everything around it."""
    too_long = []
    for folder in ("src/switchprune", "pipeline", "components", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                    if length > 80:
                        too_long.append(f"{path.relative_to(ROOT)}:{node.name} {length}")
    assert not too_long


@pytest.mark.parametrize("verb", VERBS)
def test_every_component_is_named_like_its_stage_and_runs_in_the_image(verb: str) -> None:
    component = getattr(importlib.import_module(f"components.{verb}"), verb)
    assert component.component_spec.name == verb
    assert component.component_spec.implementation.container.image == IMAGE
    assert inspect.getsource(component.python_func).count(f"stages import {verb}") == 1


def _cli_subcommands() -> list[str]:
    exe = Path(sys.executable).parent / "switchprune"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("COMMAND", 2)[-1].splitlines()
    # Subcommands are indented by four spaces; wrapped help text by more.
    return [m.group(1) for line in lines if (m := re.match(r"^ {4}(\S+)", line))]


def test_the_verbs_agree_everywhere() -> None:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert list(dvc) == list(EXPERIMENT)
    local = (ROOT / "pipeline" / "local.py").read_text()
    assert all(f'"{verb}"' in local for verb in RELEASE)
    commands = _cli_subcommands()
    assert set(VERBS) <= set(commands), commands
    assert set(commands) - set(VERBS) <= {"pull"}
    # The multi-GPU train task's launcher and the TrainJob code it imports are no stages.
    helpers = {"__init__", "image", "train_launcher", "trainjob"}
    components = {p.stem for p in (ROOT / "components").glob("*.py")} - helpers
    assert components == set(VERBS)
    for verb in VERBS:
        if verb in dvc:
            assert dvc[verb]["cmd"] == f'PATH="$DVC_ROOT/.venv/bin:$PATH" switchprune {verb}'
        stage = importlib.import_module(f"switchprune.stages.{verb}")
        assert callable(stage.run)
        section = "data" if verb == "preprocess" else verb
        assert section in params, verb
        # The component takes (at least) the sections DVC tracks for the stage (``data.augment``
        # is a key of the section ``data``).
        component = getattr(importlib.import_module(f"components.{verb}"), verb)
        dict_inputs = {
            name for name, spec in component.component_spec.inputs.items() if spec.type == "Dict"
        }
        tracked = dvc[verb]["params"] if verb in dvc else [section]
        assert {p.split(".")[0] for p in tracked} <= dict_inputs, verb


def test_the_training_curves_are_a_train_output_that_register_reads() -> None:
    """Top-level plots name a train stage output; register depends on that file."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    # No stage-level plots: DVC would draw such a file once more, as a plot of its own.
    assert not any(stage.get("plots") for stage in dvc["stages"].values())
    outs = {next(iter(p)) if isinstance(p, dict) else p for p in dvc["stages"]["train"]["outs"]}
    plotted = {f for plot in dvc["plots"] for spec in plot.values() for f in spec["y"]}
    (history,) = plotted
    assert history in outs
    assert {next(iter(plot)) for plot in dvc["plots"]} == {"loss", "val_accuracy", "params_ratio"}
    assert all(spec["x"] == "epoch" for plot in dvc["plots"] for spec in plot.values())
    # The Kubeflow pipeline hands the same file from train to register.
    from components.register import register
    from components.train import train

    assert "history" in train.component_spec.outputs
    assert "history" in register.component_spec.inputs
