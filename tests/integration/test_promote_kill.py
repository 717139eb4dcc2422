"""A real ``switchprune promote`` killed (SIGKILL) at every step converges on the next run.

The killed process is the real command in its own interpreter, started through a small wrapper
that counts the calls of one library function (``storage.put_object``: the marker, each file,
the manifest; ``registry.set_alias``) and kills its own process right before or after the N-th.
SIGKILL runs no clean-up at all, so S3 and the registry are left exactly as the step left them.

S3 is a real ``rclone serve s3`` on 127.0.0.1 and the registry a real MLflow SQLite store. Three
versions are registered once; every case gets its own S3 prefix with version 1 promoted
(``champion``), kills a promotion of version 2, checks what readers see meanwhile, then runs
``switchprune promote`` again and checks that S3's manifest and the alias agree on version 2,
that every listed file is stored with its size and SHA-256, and that no incomplete version
folder is left behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pipeline.servers import S3Server

from switchprune import cli, promotion, registry, storage
from switchprune.config import PromoteConfig
from switchprune.io import save_model, write_json
from switchprune.models import ModelSpec, build_model
from switchprune.promotion import INCOMPLETE_MARKER
from switchprune.registry import ModelRef, Registration

pytestmark = pytest.mark.slow

NAME = "kill-me"
BUCKET = "promoted"
ALIAS = "champion"
SPEC = ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 8, "fc2": 4})
EXAMPLE = np.arange(2 * 64, dtype=np.uint8).reshape(2, 1, 8, 8)
FILES = ("meta.json", "model.pt", "widths.json")
# Each version is more accurate than the one before, so the gate (with its champion check)
# passes whichever of them is champion.
ACCURACY = {1: 0.90, 2: 0.92, 3: 0.94}
GATE = {
    "alias": ALIAS,
    "min_accuracy": 0.5,
    "max_accuracy_drop": 0.5,
    "max_params_ratio": 0.9,
    "max_logit_diff": 1e-4,
    "not_worse_than_champion": True,
}
DEFAULT_WINDOW = PromoteConfig().remove_incomplete_after  # an hour

# Kills the process right before or after the N-th call of storage.put_object or
# registry.set_alias, then runs `switchprune promote` with the remaining arguments.
KILLER = textwrap.dedent(
    """
    import os, signal, sys

    from switchprune import cli, registry, storage

    function, when, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    module = {"put_object": storage, "set_alias": registry}[function]
    real = getattr(module, function)
    calls = 0

    def wrapped(*args, **kwargs):
        global calls
        calls += 1
        if calls == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if calls == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, function, wrapped)
    sys.exit(cli.main(sys.argv[4:]))
    """
)

_cases = itertools.count()


@dataclass
class Stack:
    s3: S3Server
    tracking_uri: str
    root: Path
    files: dict[int, dict[str, tuple[int, str]]]  # version -> name -> (size, sha256)

    def client(self) -> Any:
        return storage.make_client(self.s3.endpoint)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_VARIABLE}
        return {**env, **self.s3.environment, "MLFLOW_TRACKING_URI": self.tracking_uri}


@dataclass
class Case:
    """One promotion scene: its own S3 prefix, params files and reports folders."""

    stack: Stack
    folder: Path
    s3_uri: str

    @property
    def prefix(self) -> str:
        return self.s3_uri.removeprefix(f"s3://{BUCKET}/")

    def params(self, window: float) -> Path:
        path = self.folder / f"params-{window:g}.yaml"
        section = {**GATE, "s3_uri": self.s3_uri, "remove_incomplete_after": window}
        path.write_text(yaml.safe_dump({"promote": section}))
        return path

    def reports(self, version: int) -> Path:
        folder = self.folder / f"reports-v{version}"
        write_json({"model_name": NAME, "version": version}, folder / "register.json")
        return folder

    def argv(self, version: int, window: float = DEFAULT_WINDOW) -> list[str]:
        reports = self.reports(version)
        return [
            "promote",
            "--params",
            str(self.params(window)),
            "--reports-dir",
            str(reports),
            "--metrics",
            str(reports / "promote.json"),
        ]


def _files(folder: Path, seed: int) -> tuple[torch.nn.Module, dict[str, Path]]:
    torch.manual_seed(seed)
    model = build_model(SPEC).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / "model.pt")
    (folder / "widths.json").write_text(json.dumps({"fc1": {"kept": 8}, "fc2": {"kept": 4}}))
    (folder / "meta.json").write_text(json.dumps({"dataset": "digits", "seed": seed}))
    return model, {name: folder / name for name in FILES}


def _digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The S3 server, a SQLite MLflow store, and versions 1..3 registered (different content)."""
    root = tmp_path_factory.mktemp("promote-kill")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    with S3Server(root / "s3", log_path=root / "s3.log") as s3, pytest.MonkeyPatch.context() as mp:
        for key, value in s3.environment.items():
            mp.setenv(key, value)
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        files: dict[int, dict[str, tuple[int, str]]] = {}
        for version in ACCURACY:
            model, paths = _files(root / f"files-{version}", seed=version)
            result = registry.log_and_register(
                tracking_uri,
                Registration(
                    experiment="promote-kill",
                    model_name=NAME,
                    alias="candidate",
                    model=model,
                    files=paths,
                    params={"model": {"hidden": [8, 4]}},
                    metrics={
                        "test_accuracy": ACCURACY[version],
                        "baseline_accuracy": ACCURACY[version],
                        "params_ratio": 0.6,
                        "max_abs_logit_diff_f64": 0.0,
                    },
                    tags={"data_md5": "0" * 32, "git_commit": "deadbeef"},
                    input_example=EXAMPLE,
                    artifact_location=str(root / "mlruns"),
                ),
            )
            assert result["version"] == version
            # What the registry hands out for this version is what S3 must end up holding.
            pulled = root / f"pulled-{version}"
            registry.download_model_version(tracking_uri, ModelRef(NAME, version=version), pulled)
            files[version] = {p.name: _digest(p) for p in sorted(pulled.iterdir())}
            assert set(files[version]) == set(FILES)
        yield Stack(s3, tracking_uri, root, files)


@pytest.fixture
def case(stack: Stack, tmp_path: Path) -> Case:
    """A fresh prefix where version 1 is promoted and ``champion``, as after a release."""
    scene = Case(stack, tmp_path, f"s3://{BUCKET}/case-{next(_cases)}")
    registry.set_alias(stack.tracking_uri, NAME, ALIAS, 1)
    cfg = PromoteConfig(**{**GATE, "s3_uri": scene.s3_uri})
    out = promotion.promote(cfg, NAME, 1, tracking_uri=stack.tracking_uri, client=stack.client())
    assert out["promoted"] is True
    assert _state(scene) == (1, 1)
    return scene


# --------------------------------------------------------------------------------------------
# What S3 and the registry hold


def _keys(scene: Case) -> dict[str, int]:
    """Every object under the model's folder, relative to it, with its size."""
    base = f"{scene.prefix}/{NAME}/"
    listed = storage.list_objects(scene.stack.client(), BUCKET, base)
    return {o["Key"][len(base) :]: o["Size"] for o in listed}


def _manifest(scene: Case) -> dict[str, Any]:
    body = scene.stack.client().get_object(Bucket=BUCKET, Key=f"{scene.prefix}/{NAME}/current.json")
    return json.loads(body["Body"].read())


def _state(scene: Case) -> tuple[int, int]:
    """(the version S3's manifest names, the version the alias names)."""
    alias = registry.get_alias_version(scene.stack.tracking_uri, NAME, ALIAS)
    assert alias is not None
    return int(_manifest(scene)["version"]), int(alias["version"])


def _assert_manifest_files_stored(scene: Case) -> int:
    """Every file the manifest lists is in S3 with its size and SHA-256: the registered ones."""
    manifest = _manifest(scene)
    version = int(manifest["version"])
    client = scene.stack.client()
    listed = {}
    for entry in manifest["files"]:
        assert entry["key"] == f"{scene.prefix}/{NAME}/v{version}/{entry['name']}"
        data = client.get_object(Bucket=BUCKET, Key=entry["key"])["Body"].read()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"])
        listed[entry["name"]] = (entry["size"], entry["sha256"])
    assert listed == scene.stack.files[version]
    return version


def _markers(scene: Case) -> set[str]:
    """The version folders holding the incomplete marker."""
    suffix = "/" + INCOMPLETE_MARKER
    return {k.removesuffix(suffix) for k in _keys(scene) if k.endswith(suffix)}


def _kill(scene: Case, argv: list[str], function: str, when: str, nth: int) -> None:
    script = scene.folder / "killer.py"
    script.write_text(KILLER)
    # A killed process cannot remove its scratch folder: keep it in the test's own folder.
    scratch = scene.folder / "tmp"
    scratch.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(script), function, when, str(nth), *argv],
        cwd=scene.folder,
        env={**scene.stack.env(), "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Killed at the step, not finished (or failed) before reaching it.
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


def _recover(scene: Case, version: int, window: float) -> dict[str, Any]:
    """``switchprune promote`` again (what ``make release`` runs); it must succeed."""
    argv = scene.argv(version, window)
    assert cli.main(argv) == 0
    out = json.loads(Path(argv[-1]).read_text())
    assert out["promoted"] is True and out["version"] == version
    return out


# --------------------------------------------------------------------------------------------
# Kill points of a promotion of version 2 over champion version 1


@dataclass(frozen=True)
class KillPoint:
    function: str
    when: str
    nth: int
    manifest: int  # the version S3's manifest names once the process is dead
    alias: int  # the version the alias names then
    marker: bool  # whether v2/ holds the incomplete marker then
    uploaded: int  # how many of the version's files are in v2/ then


_N = len(FILES)
KILL_POINTS = {
    "after-marker": KillPoint("put_object", "after", 1, 1, 1, True, 0),
    **{
        f"after-file-{i}": KillPoint("put_object", "after", 1 + i, 1, 1, True, i)
        for i in range(1, _N + 1)
    },
    "after-manifest": KillPoint("put_object", "after", _N + 2, 2, 1, True, _N),
    # Past the manifest and the marker's removal: only the alias is behind.
    "before-alias": KillPoint("set_alias", "before", 1, 2, 1, False, _N),
    # The alias moved; the final reconciliation did not run.
    "after-alias": KillPoint("set_alias", "after", 1, 2, 2, False, _N),
}


# Before the manifest, the recovery either reuses the dead promotion's objects (its marker is
# younger than the window) or removes them first (window passed); from the manifest on, the
# version is current and its folder never removed, so the window matters less.
WINDOWS = {"within-window": DEFAULT_WINDOW, "window-passed": 0.0}
SCENES = [
    pytest.param(point, window, id=f"{name}-{label}")
    for name, point in KILL_POINTS.items()
    for label, window in WINDOWS.items()
    if point.function == "put_object" or label == "within-window"
]


@pytest.mark.parametrize(("point", "window"), SCENES)
def test_promote_killed_at_a_step_converges_on_the_next_run(
    case: Case, point: KillPoint, window: float
) -> None:
    _kill(case, case.argv(2, window), point.function, point.when, point.nth)

    # Meanwhile readers see one whole version: the manifest's files are all there.
    assert _state(case) == (point.manifest, point.alias)
    _assert_manifest_files_stored(case)
    assert _markers(case) == ({"v2"} if point.marker else set())
    uploaded = [k for k in _keys(case) if k.startswith("v2/") and not k.endswith(INCOMPLETE_MARKER)]
    assert len(uploaded) == point.uploaded

    _recover(case, 2, window)
    assert _state(case) == (2, 2)
    assert _assert_manifest_files_stored(case) == 2
    # Nothing incomplete is left: not a dead folder, not a marker in the folder made current.
    assert _markers(case) == set()
    assert {k.split("/")[0] for k in _keys(case)} == {"current.json", "v1", "v2"}
    # The previous champion's folder is whole, as promoted.
    v1 = {k.removeprefix("v1/"): size for k, size in _keys(case).items() if k.startswith("v1/")}
    assert v1 == {name: size for name, (size, _) in case.stack.files[1].items()}

    # And a further run has nothing left to do.
    again = _recover(case, 2, window)
    assert again["changed"] is False


def test_incomplete_folder_is_left_within_the_window_and_removed_after_it(case: Case) -> None:
    # A promotion of version 3 dies after its first file, before its manifest.
    _kill(case, case.argv(3), "put_object", "after", 2)
    assert _state(case) == (1, 1)
    assert _markers(case) == {"v3"}
    dead = {k: size for k, size in _keys(case).items() if k.startswith("v3/")}
    assert len(dead) == 2  # the marker and one file

    # Within the window it may be a promotion still running elsewhere: left alone.
    _recover(case, 2, DEFAULT_WINDOW)
    assert _state(case) == (2, 2)
    assert {k: s for k, s in _keys(case).items() if k.startswith("v3/")} == dead
    assert _markers(case) == {"v3"}

    # Once the window has passed, the next promotion removes it, and only it.
    _recover(case, 2, 0.0)
    assert _state(case) == (2, 2)
    assert _assert_manifest_files_stored(case) == 2
    assert _markers(case) == set()
    assert {k.split("/")[0] for k in _keys(case)} == {"current.json", "v1", "v2"}


def test_a_version_made_current_is_not_swept_later_as_incomplete(case: Case) -> None:
    # Killed between writing version 2's manifest and removing its marker.
    _kill(case, case.argv(2, 0.0), "put_object", "after", _N + 2)
    assert _state(case) == (2, 1)
    assert _markers(case) == {"v2"}
    # The release runs again, then later ones promote version 3, the window long passed.
    _recover(case, 2, 0.0)
    _recover(case, 3, 0.0)
    _recover(case, 3, 0.0)
    assert _state(case) == (3, 3)
    assert _assert_manifest_files_stored(case) == 3
    # Version 2 was promoted and champion: its folder stays whole, like version 1's.
    for version in (1, 2):
        folder = {
            k.removeprefix(f"v{version}/"): size
            for k, size in _keys(case).items()
            if k.startswith(f"v{version}/")
        }
        assert folder == {name: size for name, (size, _) in case.stack.files[version].items()}
    assert _markers(case) == set()
