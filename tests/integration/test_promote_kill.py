"""A real ``switchprune promote`` killed (SIGKILL) at every step converges on the next run.

The killed process is the real command (``cli.main``) in its own process, forked from a server
that imported the command's modules once, with one library function wrapped to count its calls
(``storage.put_object``: the marker, each file, the manifest; ``registry.set_alias``) and kill
the process right before or after the N-th. SIGKILL runs no clean-up at all, so S3 and the
registry are left exactly as the step left them.

S3 is a real ``rclone serve s3`` on 127.0.0.1 and the registry a real MLflow SQLite store. Three
versions are registered once; every case gets its own S3 prefix with version 1 promoted
(``champion``), kills a promotion of version 2, checks what readers see meanwhile, then runs
``switchprune promote`` again and checks that S3's manifest and the alias agree on version 2,
that every listed file is stored with its size and SHA-256, and that no incomplete version
folder is left behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import select
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

from project_support import empty_store
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

# Forks a child per request (one JSON line on stdin: argv, function, when, nth, cwd, env, log):
# the child wraps the function, runs `switchprune promote` as the command line does, and kills
# itself right before or after the N-th call. The server answers with the child's wait status.
# Importing the command's modules once here, not per kill, saves an interpreter start-up and
# MLflow's import in every case; nothing here opens a store or a connection before the fork.
FORK_SERVER = textwrap.dedent(
    """
    import json, os, signal, sys, tempfile, traceback

    import mlflow.store.model_registry.sqlalchemy_store
    import mlflow.store.tracking.sqlalchemy_store
    from switchprune import cli, promotion, registry, storage
    from switchprune.stages import promote

    def child(job):
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        tempfile.tempdir = None  # TMPDIR from the job's environment
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        function, when, nth = job["function"], job["when"], job["nth"]
        module = {"put_object": storage, "set_alias": registry}[function]
        real = getattr(module, function)
        calls = 0

        def wrapped(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == nth and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*args, **kwargs)
            if calls == nth and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(module, function, wrapped)
        code = cli.main(job["argv"])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                child(job)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(99)
        _, status = os.waitpid(pid, 0)
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
    """
)


class ForkServer:
    """The :data:`FORK_SERVER` process: :meth:`run` returns a child's exit code (negative: the
    signal that ended it)."""

    def __init__(self, folder: Path) -> None:
        script = folder / "fork_server.py"
        script.write_text(FORK_SERVER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=folder,
        )

    def run(self, argv: list[str], function: str, when: str, nth: int, **job: Any) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"argv": argv, "function": function, "when": when, "nth": nth, **job}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        assert ready, "the promotion neither reached its kill point nor ended within 120 s"
        answer = self.proc.stdout.readline()
        assert answer, f"the fork server died (exit {self.proc.poll()})"
        return int(json.loads(answer))

    def close(self) -> None:
        # Every child was waited for: nothing is left to clean up, and the interpreter's own
        # exit (MLflow's exit handlers) takes seconds.
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


_cases = itertools.count()


@dataclass
class Stack:
    s3: S3Server
    tracking_uri: str
    root: Path
    files: dict[int, dict[str, tuple[int, str]]]  # version -> name -> (size, sha256)
    forks: ForkServer

    def client(self) -> Any:
        """One client for every check (a new one loads botocore's service model again)."""
        return self._client

    @functools.cached_property
    def _client(self) -> Any:
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
    forks = ForkServer(root)  # started first: its imports overlap the registrations below
    tracking_uri = empty_store(tmp_path_factory, root / "mlflow.db")
    with (
        S3Server(root / "s3", log_path=root / "s3.log") as s3,
        pytest.MonkeyPatch.context() as mp,
        contextlib.closing(forks),
    ):
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
        yield Stack(s3, tracking_uri, root, files, forks)


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
    # A killed process cannot remove its scratch folder: keep it in the test's own folder.
    scratch = scene.folder / "tmp"
    scratch.mkdir(exist_ok=True)
    log = scene.folder / "killed.log"
    code = scene.stack.forks.run(
        argv,
        function,
        when,
        nth,
        cwd=str(scene.folder),
        env={**scene.stack.env(), "TMPDIR": str(scratch)},
        log=str(log),
    )
    # Killed at the step, not finished (or failed) before reaching it.
    assert code == -signal.SIGKILL, (code, log.read_text()[-3000:])


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
