"""The MLflow registry layer against a real, temporary SQLite tracking store."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from pipeline.servers import free_port

from switchprune import registry
from switchprune.errors import redact_uri
from switchprune.io import file_digest, model_digest, save_model
from switchprune.models import ModelSpec, TaskNet, build_model
from switchprune.registry import ModelRef, Registration, RegistryError, parse_model_ref

SPEC = ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 8, "fc2": 4})
# Served models take raw uint8 pixels; the bare network inside takes normalised floats (X).
EXAMPLE = np.arange(2 * 64, dtype=np.uint8).reshape(2, 1, 8, 8)
X = np.linspace(-1.0, 1.0, 2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)

PARAMS = {"train": {"epochs": 3, "lr": 0.1}, "model": {"hidden": [8, 4]}, "seed": 0}
METRICS: dict[str, Any] = {"test_accuracy": 0.93, "params_ratio": 0.5, "kept": {"fc1": 6}}
TAGS = {"data_md5": "d41d8cd98f00b204e9800998ecf8427e", "git_commit": "abc123"}


def tiny_model(seed: int) -> TaskNet:
    torch.manual_seed(seed)
    return build_model(SPEC).eval()


def model_files(folder: Path, model: TaskNet) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / "model.pt")
    docs = {
        "widths.json": {"fc1": {"kept": 6}, "fc2": {"kept": 4}},
        "meta.json": {"dataset": "digits", "classes": 10},
        "evaluate.json": {"test_accuracy": 0.93},
    }
    for name, doc in docs.items():
        (folder / name).write_text(json.dumps(doc))
    return {name: folder / name for name in ("model.pt", *docs)}


class Store:
    """A temporary SQLite tracking store with a local artifact root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.artifacts = root / "artifacts"

    def register(self, model: TaskNet, files: dict[str, Path], **kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = dict(
            experiment="exp",
            model_name="tiny",
            alias="candidate",
            model=model,
            files=files,
            params=PARAMS,
            metrics=METRICS,
            tags=TAGS,
            input_example=EXAMPLE,
            artifact_location=str(self.artifacts),
        )
        describe = kw.pop("describe", None)
        args.update(kw)
        return registry.log_and_register(self.uri, Registration(**args), describe)

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def alias_version(client: MlflowClient, name: str, alias: str) -> int:
    return int(client.get_model_version_by_alias(name, alias).version)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def registered(store: Store, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Model ``tiny`` version 1 with alias ``candidate``, shared by the read-only tests."""
    model = tiny_model(0)
    files = model_files(tmp_path_factory.mktemp("files"), model)
    result = store.register(model, files)
    return {"model": model, "files": files, "result": result}


def test_log_and_register_creates_version_with_alias_and_metadata(
    store: Store, registered: dict[str, Any]
) -> None:
    result = registered["result"]
    assert result["version"] == 1 and result["changed"] is True
    assert result["model_uri"] == "models:/tiny/1"
    client = store.client()
    assert alias_version(client, "tiny", "candidate") == 1

    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["train.lr"] == "0.1"
    assert run.data.params["model.hidden"] == "[8, 4]"
    assert run.data.params["seed"] == "0"
    assert run.data.metrics == {"test_accuracy": 0.93, "params_ratio": 0.5, "kept.fc1": 6.0}
    sha = file_digest(registered["files"]["model.pt"])
    assert run.data.tags["data_md5"] == TAGS["data_md5"]
    assert run.data.tags["model_sha256"] == sha

    mv = client.get_model_version("tiny", "1")
    content = model_digest(registered["files"]["model.pt"])
    assert mv.tags == {**TAGS, "model_sha256": sha, "model_content_sha256": content}
    assert mv.run_id == result["run_id"]

    run_files = {a.path for a in client.list_artifacts(result["run_id"])}
    assert run_files >= {"model.pt", "widths.json", "meta.json", "evaluate.json"}
    # Everything landed under the given local artifact root, the model's extra files included.
    extra = {p.name for p in store.artifacts.rglob("extra_files/*")}
    assert extra == {"model.pt", "widths.json", "meta.json", "evaluate.json"}
    requirements = next(store.artifacts.rglob("requirements.txt")).read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    # No unpublished package: switchprune travels as the model's code instead.
    assert "switchprune" not in {r.split("==")[0] for r in requirements}
    assert all("==" in r for r in requirements)


def test_equal_weights_in_other_bytes_reuse_the_version(store: Store, tmp_path: Path) -> None:
    name, experiment = "content", "content-exp"
    model = tiny_model(3)
    files = model_files(tmp_path / "a", model)
    first = store.register(model, files, model_name=name, experiment=experiment)
    # The same tensors stored as views of one shared buffer: equal values, other file bytes.
    state = model.state_dict()
    flat = torch.cat([t.flatten() for t in state.values()])
    views, at = {}, 0
    for k, t in state.items():
        views[k] = flat[at : at + t.numel()].view_as(t)
        at += t.numel()
    other = model_files(tmp_path / "b", model)
    torch.save({"spec": model.spec.to_dict(), "state_dict": views}, other["model.pt"])
    assert file_digest(other["model.pt"]) != file_digest(files["model.pt"])
    again = store.register(model, other, model_name=name, experiment=experiment)
    assert again == {**first, "changed": False}


def test_same_model_file_reuses_version_and_new_model_adds_one(
    store: Store, tmp_path: Path
) -> None:
    name, experiment = "idem", "idem-exp"
    model_a = tiny_model(1)
    files_a = model_files(tmp_path / "a", model_a)
    first = store.register(model_a, files_a, model_name=name, experiment=experiment)
    assert (first["version"], first["changed"]) == (1, True)

    # Alias removed by hand: registering the same file again only re-sets it.
    store.client().delete_registered_model_alias(name, "candidate")
    again = store.register(
        tiny_model(1), model_files(tmp_path / "a2", model_a), model_name=name, experiment=experiment
    )
    assert again == {**first, "changed": False}
    exp = store.client().get_experiment_by_name(experiment)
    assert len(store.client().search_runs([exp.experiment_id])) == 1
    assert alias_version(store.client(), name, "candidate") == 1

    model_b = tiny_model(2)
    second = store.register(
        model_b, model_files(tmp_path / "b", model_b), model_name=name, experiment=experiment
    )
    assert (second["version"], second["changed"]) == (2, True)
    assert second["run_id"] != first["run_id"]
    assert len(store.client().search_runs([exp.experiment_id])) == 2
    assert alias_version(store.client(), name, "candidate") == 2


def test_the_description_is_drawn_only_for_a_new_version(store: Store, tmp_path: Path) -> None:
    """``describe`` (the model card, seconds to draw) runs for a new version only; its text is
    the version's description and its files join the run's artifacts."""
    name, experiment = "described", "described-exp"
    drawn: list[Path] = []

    def describe(folder: Path) -> tuple[str, dict[str, Path]]:
        drawn.append(folder)
        (folder / "card.md").write_text("# the card\n")
        return "# the card\n", {"card.md": folder / "card.md"}

    model = tiny_model(5)
    files = model_files(tmp_path / "a", model)
    first = store.register(model, files, model_name=name, experiment=experiment, describe=describe)
    assert first["changed"] is True and len(drawn) == 1
    assert not drawn[0].exists()  # its scratch folder is gone
    client = store.client()
    assert client.get_model_version(name, str(first["version"])).description == "# the card\n"
    assert "card.md" in {a.path for a in client.list_artifacts(first["run_id"])}
    again = store.register(model, files, model_name=name, experiment=experiment, describe=describe)
    assert again == {**first, "changed": False}
    assert len(drawn) == 1


def test_get_alias_version_and_set_alias(store: Store, tmp_path: Path) -> None:
    name = "aliases"
    assert registry.get_alias_version(store.uri, name, "champion") is None  # no such model
    for seed in (3, 4):
        model = tiny_model(seed)
        store.register(model, model_files(tmp_path / str(seed), model), model_name=name)
    assert registry.get_alias_version(store.uri, name, "champion") is None  # no such alias

    registry.set_alias(store.uri, name, "champion", 1)
    info = registry.get_alias_version(store.uri, name, "champion")
    assert info is not None
    assert info["version"] == 1
    assert info["metrics"]["test_accuracy"] == pytest.approx(0.93)
    assert info["tags"]["git_commit"] == "abc123"
    assert info["run_id"] == store.client().get_model_version(name, "1").run_id

    registry.set_alias(store.uri, name, "champion", 2)  # moves
    assert registry.get_alias_version(store.uri, name, "champion")["version"] == 2
    assert registry.get_alias_version(store.uri, name, "candidate")["version"] == 2

    with pytest.raises(RegistryError, match="version 7"):
        registry.set_alias(store.uri, name, "champion", 7)
    with pytest.raises(RegistryError, match="no registered model 'nope'"):
        registry.set_alias(store.uri, "nope", "champion", 1)
    with pytest.raises(RegistryError, match="invalid alias 'latest'"):
        registry.set_alias(store.uri, name, "latest", 1)
    assert registry.get_alias_version(store.uri, name, "champion")["version"] == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tiny", ModelRef("tiny", alias="champion")),
        ("switchprune-digits-mlp@candidate", ModelRef("switchprune-digits-mlp", alias="candidate")),
        ("tiny:3", ModelRef("tiny", version=3)),
        ("models:/tiny@champion", ModelRef("tiny", alias="champion")),
        ("models:/my.model/12", ModelRef("my.model", version=12)),
        ("  tiny@cand_1  ", ModelRef("tiny", alias="cand_1")),
    ],
)
def test_parse_model_ref(text: str, expected: ModelRef) -> None:
    assert parse_model_ref(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid model reference"),
        ("tiny@", "invalid model reference"),
        ("tiny:", "invalid model reference"),
        ("tiny:0", "not a positive integer"),
        ("tiny:abc", "not a positive integer"),
        ("tiny@a@b", "invalid model reference"),
        ("models:/tiny", "invalid model reference"),
        ("models:/tiny/x", "not a positive integer"),
        ("runs:/abc/model", "invalid model reference"),
        ("-bad@champion", "invalid model name"),
        ("tiny@latest", "invalid alias"),
        ("tiny@v2", "invalid alias"),
    ],
)
def test_parse_model_ref_errors(text: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        parse_model_ref(text)


def test_model_ref_refuses_alias_and_version_together() -> None:
    with pytest.raises(RegistryError, match="not both"):
        ModelRef("tiny", alias="champion", version=1)
    assert ModelRef("tiny").uri == "models:/tiny@champion"
    assert ModelRef("tiny", version=2).uri == "models:/tiny/2"


def test_version_info_resolves_and_names_what_is_unknown(
    store: Store, registered: dict[str, Any]
) -> None:
    info = registry.version_info(store.uri, ModelRef("tiny", alias="candidate"))
    assert info["name"] == "tiny"
    assert info["version"] == 1
    assert info["run_id"] == registered["result"]["run_id"]
    assert info["model_uri"] == "models:/tiny/1"
    assert "candidate" in info["aliases"]
    assert registry.version_info(store.uri, ModelRef("tiny", version=1))["version"] == 1

    with pytest.raises(RegistryError, match="no registered model 'ghost'"):
        registry.version_info(store.uri, ModelRef("ghost", alias="candidate"))
    with pytest.raises(RegistryError, match="no alias 'champion'.*candidate->v1"):
        registry.version_info(store.uri, parse_model_ref("tiny"))
    with pytest.raises(RegistryError, match="version 99, which does not exist"):
        registry.version_info(store.uri, ModelRef("tiny", version=99))


def test_download_model_version_round_trip(
    store: Store, registered: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "pulled"
    info = registry.download_model_version(store.uri, parse_model_ref("tiny@candidate"), out)
    assert info["version"] == 1
    files = registered["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name, src in files.items():
        assert (out / name).read_bytes() == src.read_bytes(), name
    # No temporary folder is left beside the destination.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pulled"]

    # Into an existing folder: files are replaced, other files are kept.
    (out / "model.pt").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    registry.download_model_version(store.uri, ModelRef("tiny", version=1), out)
    assert (out / "model.pt").read_bytes() == files["model.pt"].read_bytes()
    assert (out / "notes.txt").read_text() == "mine"

    with pytest.raises(RegistryError, match="no alias 'champion'"):
        registry.download_model_version(store.uri, ModelRef("tiny"), tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_load_model_in_a_fresh_process(store: Store, registered: dict[str, Any]) -> None:
    model = registered["model"]
    with torch.no_grad():
        expected = model(torch.from_numpy(X)).tolist()
    code = (
        "import json, sys, mlflow.pytorch, numpy as np, torch\n"
        "m = mlflow.pytorch.load_model('models:/tiny@candidate')\n"
        "x = np.linspace(-1.0, 1.0, 128, dtype=np.float32).reshape(2, 1, 8, 8)\n"
        "with torch.no_grad():\n"
        "    y = m.net(torch.from_numpy(x)).tolist()\n"
        "net = type(m.net).__module__ + '.' + type(m.net).__name__\n"
        "cls = type(m).__module__ + '.' + type(m).__name__\n"
        "print(json.dumps({'cls': cls, 'net': net, 'y': y}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    env.pop("MLFLOW_REGISTRY_URI", None)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=store.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The MLflow model is the served form (raw images in); the task network is inside.
    assert out["cls"] == "switchprune.serving.ServedModel"
    assert out["net"] == "switchprune.models.mlp.MLP"
    assert out["y"] == expected


def test_failure_after_run_start_marks_run_failed_and_registers_nothing(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("registry went away")

    monkeypatch.setattr(MlflowClient, "create_model_version", broken)
    model = tiny_model(5)
    with pytest.raises(
        RegistryError, match="while registering model 'broken' .*marked FAILED.*went away"
    ):
        store.register(model, model_files(tmp_path, model), model_name="broken", experiment="bx")
    client = store.client()
    runs = client.search_runs([client.get_experiment_by_name("bx").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_model_versions("name='broken'") == []
    assert mlflow.active_run() is None


def _break(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Make one MlflowClient method fail as a lost connection would."""

    def broken(self: MlflowClient, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError(f"{method} lost")

    monkeypatch.setattr(MlflowClient, method, broken)


def _assert_rolled_back(client: MlflowClient, model_name: str, experiment: str) -> None:
    """No version of ``model_name`` is left, and the experiment's one run is marked failed."""
    assert client.search_model_versions(f"name='{model_name}'") == []
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_alias_failure_removes_the_new_version(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _break(monkeypatch, "set_registered_model_alias")
    model = tiny_model(8)
    with pytest.raises(RegistryError, match="while setting alias 'candidate' on version 1"):
        store.register(model, model_files(tmp_path, model), model_name="noalias", experiment="na")
    client = store.client()
    _assert_rolled_back(client, "noalias", "na")
    monkeypatch.undo()
    # Nothing is left that a retry could wrongly reuse: it logs and registers afresh.
    again = store.register(
        model, model_files(tmp_path / "again", model), model_name="noalias", experiment="na"
    )
    assert again["changed"] is True
    assert alias_version(client, "noalias", "candidate") == again["version"]


def test_calls_restore_mlflow_global_state(store: Store, registered: dict[str, Any]) -> None:
    before_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    before_env.update({k: os.environ.get(k) for k in registry.FAIL_FAST_ENV})
    before_uri = mlflow.get_tracking_uri()
    registry.version_info(store.uri, ModelRef("tiny", alias="candidate"))
    after_env = {k: os.environ.get(k) for k in before_env}
    assert after_env == before_env
    assert mlflow.get_tracking_uri() == before_uri != store.uri


def test_registering_leaves_the_callers_mlflow_settings_alone(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracking, registry_uri = (f"sqlite:///{tmp_path / n}" for n in ("runs.db", "models.db"))
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(registry_uri)
    # Held by MLflow only, not by the environment it also writes them to.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    try:
        model = tiny_model(15)
        result = store.register(model, model_files(tmp_path / "f", model), model_name="guest")
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (tracking, registry_uri)
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    # The version went to the store asked for, and nothing to the caller's.
    assert store.client().get_model_version("guest", str(result["version"])).run_id
    assert not (tmp_path / "runs.db").exists() and not (tmp_path / "models.db").exists()


def test_an_unset_tracking_uri_stays_unset(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = tiny_model(16)
    store.register(model, model_files(tmp_path, model), model_name="unset")
    # MLflow still follows the environment, as it did before the call.
    later = f"sqlite:///{tmp_path / 'later.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", later)
    assert mlflow.get_tracking_uri() == later


def test_registering_inside_an_active_run_nests_the_run(store: Store, tmp_path: Path) -> None:
    client = store.client()
    experiment_id = client.create_experiment("outer", artifact_location=str(store.artifacts))
    mlflow.set_tracking_uri(store.uri)
    try:
        with mlflow.start_run(experiment_id=experiment_id) as outer:
            model = tiny_model(17)
            result = store.register(model, model_files(tmp_path, model), model_name="nested")
            assert mlflow.active_run().info.run_id == outer.info.run_id
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    run = client.get_run(result["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert run.info.status == "FINISHED"
    assert client.get_run(outer.info.run_id).info.status == "FINISHED"


def test_check_reachable_closed_port_fails_fast() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RegistryError, match=r"MLflow tracking server at .* is unreachable"):
        registry.check_reachable(uri)
    assert time.monotonic() - start < 10


def test_check_reachable_sqlite_folder(tmp_path: Path) -> None:
    registry.check_reachable(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(RegistryError, match="does not exist"):
        registry.check_reachable(f"sqlite:///{tmp_path}/missing/mlflow.db")


def test_log_and_register_unreachable_server_fails_fast(tmp_path: Path) -> None:
    model = tiny_model(6)
    files = model_files(tmp_path, model)
    start = time.monotonic()
    port = free_port()
    with pytest.raises(RegistryError, match="unreachable") as info:
        registry.log_and_register(
            f"http://alice:s3cret@127.0.0.1:{port}",
            Registration("exp", "tiny", "candidate", model, files, EXAMPLE),
        )
    assert time.monotonic() - start < 10
    assert f"http://127.0.0.1:{port}" in str(info.value) and "s3cret" not in str(info.value)


def test_log_and_register_requires_model_file(store: Store, tmp_path: Path) -> None:
    model = tiny_model(7)
    files = model_files(tmp_path, model)
    del files["model.pt"]
    with pytest.raises(RegistryError, match="'model.pt'"):
        store.register(model, files)


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert registry.resolve_tracking_uri() == f"sqlite:///{registry.project_root() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert registry.resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert registry.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_embedded_store_is_the_projects_wherever_the_stage_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("data: {}\n")
    deep = tmp_path / "reports" / "sub"
    deep.mkdir(parents=True)
    for where in (tmp_path, deep):
        monkeypatch.chdir(where)
        assert registry.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    outside.mkdir()
    monkeypatch.chdir(outside)
    assert registry.project_root() == outside.resolve()


@contextlib.contextmanager
def _health_server(status: Callable[[str, str | None], int]) -> Iterator[tuple[int, list[str]]]:
    """A local HTTP server answering ``status(path, authorization)``; yields port and paths."""
    import http.server
    import threading

    paths: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            paths.append(self.path)
            self.send_response(status(self.path, self.headers.get("Authorization")))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], paths
    finally:
        server.shutdown()
        server.server_close()


def test_check_reachable_sends_credentials_held_in_the_uri() -> None:
    """A server behind Basic auth, addressed as http://user:pass@host: reachable, not refused."""
    expected = "Basic " + base64.b64encode(b"alice:s3cr%t").decode()

    def status(path: str, auth: str | None) -> int:
        return 200 if path == "/health" and auth == expected else 401

    with _health_server(status) as (port, _paths):
        registry.check_reachable(f"http://alice:s3cr%25t@127.0.0.1:{port}")
        with pytest.raises(registry.RegistryError, match="answered 401") as info:
            registry.check_reachable(f"http://alice:wrong@127.0.0.1:{port}")
        assert "wrong" not in str(info.value)  # the password is never shown


HISTORY = [
    {"epoch": 1, "loss": 2.0, "val_accuracy": 0.5, "params_ratio": 1.0},
    {"epoch": 2, "loss": 1.0, "val_accuracy": 0.8, "params_ratio": 0.6, "baseline_loss": 1.5},
]


def card_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_card.md").write_text("# tiny\n\ncard text\n")
    (folder / "widths.png").write_bytes(b"\x89PNG fake picture")
    return {name: folder / name for name in ("model_card.md", "widths.png")}


def test_card_history_and_artifacts_reach_the_run_and_the_version(
    store: Store, tmp_path: Path
) -> None:
    model = tiny_model(11)
    result = store.register(
        model,
        model_files(tmp_path / "f", model),
        model_name="carded",
        artifacts=card_files(tmp_path / "c"),
        description="# tiny\n\ncard text\n",
        history=HISTORY,
    )
    client = store.client()
    assert client.get_model_version("carded", str(result["version"])).description == (
        "# tiny\n\ncard text\n"
    )
    run_files = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"model_card.md", "widths.png", "model.pt"} <= run_files
    # The card is the run's, not the model's: pull fetches only the model's files.
    extra = {p.name for p in store.artifacts.rglob("extra_files/*")}
    assert "model.pt" in extra and not {"model_card.md", "widths.png"} & extra
    loss = client.get_metric_history(result["run_id"], "epoch_loss")
    assert sorted((m.step, m.value) for m in loss) == [(1, 2.0), (2, 1.0)]
    base = client.get_metric_history(result["run_id"], "epoch_baseline_loss")
    assert [(m.step, m.value) for m in base] == [(2, 1.5)]


def test_a_long_history_is_logged_in_several_batches(store: Store, tmp_path: Path) -> None:
    history = [{"epoch": e, "loss": 1.0 / e, "val_accuracy": 0.5} for e in range(1, 601)]
    model = tiny_model(12)
    result = store.register(
        model, model_files(tmp_path, model), model_name="longhistory", history=history
    )
    client = store.client()
    assert len(client.get_metric_history(result["run_id"], "epoch_loss")) == 600
    assert len(client.get_metric_history(result["run_id"], "epoch_val_accuracy")) == 600


def test_description_failure_removes_the_new_version(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _break(monkeypatch, "update_model_version")
    model = tiny_model(13)
    with pytest.raises(RegistryError, match="while setting the description of version 1"):
        store.register(
            model,
            model_files(tmp_path, model),
            model_name="nodesc",
            experiment="nd",
            description="# card",
        )
    client = store.client()
    _assert_rolled_back(client, "nodesc", "nd")


def test_artifacts_named_like_model_files_are_refused(store: Store, tmp_path: Path) -> None:
    model = tiny_model(14)
    files = model_files(tmp_path, model)
    with pytest.raises(RegistryError, match="clash"):
        store.register(
            model, files, model_name="clash", artifacts={"meta.json": files["meta.json"]}
        )


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://alice:s3cret@mlflow.example:5000/api", "http://mlflow.example:5000/api"),
        ("https://alice:p@ss@mlflow.example", "https://mlflow.example"),
        ("http://mlflow.example:5000", "http://mlflow.example:5000"),
        ("sqlite:////data/mlflow.db", "sqlite:////data/mlflow.db"),
        ("http://host/path@v2", "http://host/path@v2"),
        (
            "API request to http://a:b@h:1/api failed (https://c:d@e/x)",
            "API request to http://h:1/api failed (https://e/x)",
        ),
    ],
)
def test_redact_uri_drops_credentials_only(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


def test_a_server_that_answered_is_not_asked_again_within_a_stage() -> None:
    with _health_server(lambda _path, _auth: 200) as (port, paths):
        for _ in range(3):
            registry.check_reachable(f"http://127.0.0.1:{port}")
        assert paths == ["/health"]
    # A server that never answered is asked every time, and refused every time.
    dead = f"http://127.0.0.1:{free_port()}"
    for _ in range(2):
        with pytest.raises(RegistryError, match="unreachable"):
            registry.check_reachable(dead)
