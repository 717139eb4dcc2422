"""``register``, ``promote`` and ``pull`` against a real ``mlflow server`` and a real S3 server.

The MLflow server keeps its artifacts in the S3 server; promotion copies a version into another
bucket of the same server. Failure paths check that nothing moves: no manifest, no alias change,
no stray objects, local outputs intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError
from pipeline.servers import MlflowServer, S3Server, free_port

from project_support import empty_store
from switchprune import cli, load_model, registry, storage
from switchprune.config import (
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    PromoteConfig,
    PruneConfig,
    RegisterConfig,
    TrainConfig,
)
from switchprune.data import load_split, raw_images
from switchprune.io import write_json
from switchprune.stages import evaluate, preprocess, promote, prune, register, train

pytestmark = pytest.mark.slow

NAME = "switchprune-it"
S3_URI = "s3://promoted-models/team"
GATE = PromoteConfig(s3_uri=S3_URI, min_accuracy=0.3, max_accuracy_drop=0.5, max_params_ratio=0.9)


@dataclass
class Stack:
    s3: S3Server
    mlflow: MlflowServer
    work: Path
    # threshold -> register's result: each version is pruned, evaluated and registered once
    registered: dict[float, dict[str, object]] = dataclasses.field(default_factory=dict)
    _client: object | None = None

    def client(self) -> object:
        """One client for the module (a new one loads botocore's service model again)."""
        if self._client is None:
            self._client = storage.make_client(self.s3.endpoint)
        return self._client

    @property
    def model_root(self) -> Path:
        return self.s3.root / "promoted-models" / "team" / NAME


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _chain(work: Path, threshold: float) -> Path:
    """preprocess → train → prune → evaluate on tiny settings; returns the reports dir."""
    prepared, trained = work / "prepared", work / "trained"
    if not (prepared / "meta.json").exists():
        preprocess.run(DataConfig(), raw_dir=work / "raw", prepared_dir=prepared)
    if not (trained / "switched.pt").exists():
        cfg = TrainConfig(
            epochs=4,
            batch_size=128,
            snn_hidden=8,
            target_ratio=0.5,
            tnn_steps_per_snn_step=1,
            device="cpu",
        )
        train.run(
            cfg,
            model_cfg=ModelConfig(hidden=(32, 16)),
            prepared_dir=prepared,
            trained_dir=trained,
            progress=False,
        )
    model_dir = work / f"compact-{threshold}"
    reports = work / f"reports-{threshold}"
    if (reports / "evaluate.json").exists():
        return reports  # pruned and evaluated by an earlier test
    prune.run(PruneConfig(threshold=threshold), trained_dir=trained, model_dir=model_dir)
    report = evaluate.run(
        EvaluateConfig(latency_warmup=0, latency_repeats=1, device="cpu"),
        prepared_dir=prepared,
        trained_dir=trained,
        model_dir=model_dir,
    )
    write_json(report, reports / "evaluate.json")
    return reports


def _register(stack: Stack, threshold: float) -> dict[str, object]:
    """The version of ``threshold``'s model, registered by the first test that needs it."""
    if threshold in stack.registered:
        return stack.registered[threshold]
    reports = _chain(stack.work, threshold)
    result = register.run(
        RegisterConfig(model_name=NAME),
        prepared_dir=stack.work / "prepared",
        model_dir=stack.work / f"compact-{threshold}",
        evaluate_path=reports / "evaluate.json",
        params={"prune": {"threshold": threshold}},
        tracking_uri=stack.mlflow.uri,
    )
    write_json(result, reports / "register.json")
    stack.registered[threshold] = result
    return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    s3 = S3Server(root / "s3", log_path=root / "s3.log")
    (root / "s3" / "mlflow-artifacts").mkdir(parents=True)
    with s3, pytest.MonkeyPatch.context() as mp:
        for key, value in s3.environment.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        server = MlflowServer(
            empty_store(tmp_path_factory, root / "mlflow.db"),
            "s3://mlflow-artifacts/mlflow",
            env=s3.environment,
            log_path=root / "mlflow.log",
        )
        with server:
            yield Stack(s3, server, root / "work")


@pytest.fixture(scope="module")
def promoted(stack: Stack) -> dict[str, object]:
    """Version 1 registered (alias candidate) and promoted (alias champion)."""
    result = _register(stack, 0.0)
    assert result["version"] == 1
    return promote.run(
        GATE,
        register_path=stack.work / "reports-0.0" / "register.json",
        tracking_uri=stack.mlflow.uri,
        s3_client=stack.client(),
    )


def test_register_sets_candidate_and_records_data_and_code(stack: Stack, promoted: dict) -> None:
    info = registry.version_info(stack.mlflow.uri, registry.ModelRef(NAME, alias="candidate"))
    assert info["version"] == 1
    report = json.loads((stack.work / "reports-0.0" / "evaluate.json").read_text())
    assert info["tags"]["data_md5"] == report["data_md5"] != ""
    assert info["tags"]["git_commit"]
    assert info["metrics"]["test_accuracy"] == pytest.approx(report["test_accuracy"])
    assert any(k.startswith("width_") for k in info["metrics"])
    # Artifacts went to the S3 server behind MLflow.
    assert any(p.name == "model.pt" for p in (stack.s3.root / "mlflow-artifacts").rglob("*"))


def test_promote_copies_verifies_writes_manifest_and_moves_champion(
    stack: Stack, promoted: dict
) -> None:
    assert promoted["promoted"] is True and promoted["changed"] is True
    assert promoted["s3_uri"] == f"{S3_URI}/{NAME}/v1/"
    manifest = json.loads((stack.model_root / "current.json").read_text())
    assert manifest["version"] == 1
    assert (
        manifest["run_id"]
        == registry.version_info(stack.mlflow.uri, registry.ModelRef(NAME, version=1))["run_id"]
    )
    for entry in manifest["files"]:
        blob = (stack.model_root / "v1" / entry["name"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
    champion = registry.get_alias_version(stack.mlflow.uri, NAME, "champion")
    assert champion is not None and champion["version"] == 1


def test_promote_again_changes_nothing(stack: Stack, promoted: dict) -> None:
    before = _tree_digest(stack.model_root)
    mtime = (stack.model_root / "current.json").stat().st_mtime_ns
    again = promote.run(
        GATE,
        register_path=stack.work / "reports-0.0" / "register.json",
        tracking_uri=stack.mlflow.uri,
        s3_client=stack.client(),
    )
    assert again["promoted"] is True and again["changed"] is False
    assert "already" in again["reason"]
    assert _tree_digest(stack.model_root) == before
    assert (stack.model_root / "current.json").stat().st_mtime_ns == mtime


def test_gate_refusal_moves_nothing(stack: Stack, promoted: dict) -> None:
    strict = dataclasses.replace(GATE, max_params_ratio=0.01)
    _register(stack, 0.05)  # a second, different version
    before = _tree_digest(stack.model_root)
    out = promote.run(
        strict,
        register_path=stack.work / "reports-0.05" / "register.json",
        tracking_uri=stack.mlflow.uri,
        s3_client=stack.client(),
    )
    assert out["promoted"] is False
    assert "params_ratio" in out["reason"] and "max_params_ratio" in out["reason"]
    assert _tree_digest(stack.model_root) == before
    assert registry.get_alias_version(stack.mlflow.uri, NAME, "champion")["version"] == 1


@pytest.mark.parametrize("failure", ["wrong_credentials", "unreachable"])
def test_s3_failure_during_promotion_loses_nothing(
    stack: Stack, promoted: dict, failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(stack, 0.05)
    before = _tree_digest(stack.model_root)
    if failure == "wrong_credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-key")
        client = storage.make_client(stack.s3.endpoint)
    else:
        client = storage.make_client(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        promote.run(
            # Past the champion check, so that the failure is S3's.
            dataclasses.replace(GATE, not_worse_than_champion=False),
            register_path=stack.work / "reports-0.05" / "register.json",
            tracking_uri=stack.mlflow.uri,
            s3_client=client,
        )
    assert time.monotonic() - started < 30
    assert "not-the-secret-key" not in str(err.value)
    assert stack.s3.secret_key not in str(err.value)
    assert _tree_digest(stack.model_root) == before  # no v2 objects, manifest untouched
    assert not (stack.model_root / "v2").exists()
    assert registry.get_alias_version(stack.mlflow.uri, NAME, "champion")["version"] == 1


def test_mlflow_unreachable_during_registration_keeps_local_outputs(stack: Stack) -> None:
    reports = _chain(stack.work, 0.0)
    model_dir = stack.work / "compact-0.0"
    before = (_tree_digest(model_dir), _tree_digest(reports))
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(registry.RegistryError) as err:
        register.run(
            RegisterConfig(model_name=NAME),
            prepared_dir=stack.work / "prepared",
            model_dir=model_dir,
            evaluate_path=reports / "evaluate.json",
            params={},
            tracking_uri=dead,
        )
    assert time.monotonic() - started < 30
    assert dead in str(err.value) and "unreachable" in str(err.value)
    assert (_tree_digest(model_dir), _tree_digest(reports)) == before


def test_pull_by_alias_and_load_from_registry_and_s3(
    stack: Stack, promoted: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow.uri)
    assert cli.main(["pull", f"{NAME}@champion", "--out", str(tmp_path / "pulled")]) == 0
    assert {"model.pt", "widths.json", "meta.json", "evaluate.json"} <= {
        p.name for p in (tmp_path / "pulled").iterdir()
    }
    x, y = load_split(stack.work / "prepared", "test").tensors
    pixels = raw_images(stack.work / "prepared", "test", range(len(y)))
    expected = json.loads((stack.work / "reports-0.0" / "evaluate.json").read_text())
    for source in (tmp_path / "pulled", f"models:/{NAME}@champion", f"{S3_URI}/{NAME}"):
        # Raw uint8 pixels in, as every shipped form takes them; raw=False: the bare network.
        for model, inputs in ((load_model(source), pixels), (load_model(source, raw=False), x)):
            acc = float((model(inputs).argmax(1) == y).float().mean())
            assert acc == pytest.approx(expected["test_accuracy"], abs=1e-6), source


@pytest.mark.parametrize("ref", [f"{NAME}@no-such-alias", "no-such-model@champion", f"{NAME}:99"])
def test_pull_unknown_name_alias_or_version_is_one_clear_line(
    stack: Stack,
    promoted: dict,
    ref: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow.uri)
    assert cli.main(["pull", ref, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("switchprune pull: error:")
    wrong = ref.split("@")[-1] if "@" in ref and "no-such-alias" in ref else ref.split("@")[0]
    assert wrong.split(":")[0] in err[0] or "99" in err[0]
    assert not (tmp_path / "out").exists()


def test_alias_failure_after_the_manifest_puts_the_previous_manifest_back(
    stack: Stack, promoted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(stack, 0.05)
    manifest = stack.model_root / "current.json"
    before = manifest.read_bytes()
    champion_files = _tree_digest(stack.model_root / "v1")
    assert champion_files

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise registry.RegistryError("alias could not be set")

    monkeypatch.setattr(registry, "set_alias", refuse)
    with pytest.raises(registry.RegistryError):
        promote.run(
            dataclasses.replace(GATE, not_worse_than_champion=False),
            register_path=stack.work / "reports-0.05" / "register.json",
            tracking_uri=stack.mlflow.uri,
            s3_client=stack.client(),
        )
    assert json.loads(manifest.read_bytes()) == json.loads(before)
    assert registry.get_alias_version(stack.mlflow.uri, NAME, "champion")["version"] == 1
    # The objects of the version that did not become champion are gone; the champion's remain.
    left = set(_tree_digest(stack.model_root))
    assert left == {"current.json"} | {f"v1/{name}" for name in champion_files}
    assert _tree_digest(stack.model_root / "v1") == champion_files


def _champions(stack: Stack) -> tuple[int, int]:
    manifest = json.loads((stack.model_root / "current.json").read_text())
    alias = registry.get_alias_version(stack.mlflow.uri, NAME, "champion")
    return int(manifest["version"]), int(alias["version"])


def _promote(stack: Stack, threshold: float, client: object | None = None) -> dict:
    return promote.run(
        dataclasses.replace(GATE, not_worse_than_champion=False),
        register_path=stack.work / f"reports-{threshold}" / "register.json",
        tracking_uri=stack.mlflow.uri,
        s3_client=client or stack.client(),
    )


def test_concurrent_promotions_leave_s3_and_the_alias_agreeing(
    stack: Stack, promoted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import random
    import threading

    # Two registered versions: each model is registered once per module (seconds each).
    versions = {t: _register(stack, t)["version"] for t in (0.0, 0.05)}
    assert len(set(versions.values())) == 2
    real = registry.set_alias
    rng = random.Random(0)

    def slow_alias(*args: object, **kwargs: object) -> None:
        time.sleep(rng.uniform(0.0, 0.4))  # a slow registry: the other promotion overtakes
        real(*args, **kwargs)

    monkeypatch.setattr(registry, "set_alias", slow_alias)
    errors: list[BaseException] = []

    def run(threshold: float) -> None:
        try:
            _promote(stack, threshold)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    for round_ in range(6):
        order = (0.0, 0.05) if round_ % 2 else (0.05, 0.0)

        threads = [threading.Thread(target=run, args=(t,)) for t in order]
        for t in threads:
            t.start()
            time.sleep(rng.uniform(0.0, 0.2))
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        manifest_version, alias_version = _champions(stack)
        assert manifest_version == alias_version, f"round {round_}"
        assert manifest_version in versions.values()


def test_a_crash_after_the_manifest_converges_on_the_next_run(
    stack: Stack, promoted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    _promote(stack, 0.0)  # a known state: version 1 everywhere, the other one not champion
    assert _champions(stack) == (1, 1)
    version = _register(stack, 0.05)["version"]
    real = registry.set_alias

    def crash(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt  # the process dies between the manifest and the alias

    monkeypatch.setattr(registry, "set_alias", crash)
    with pytest.raises(KeyboardInterrupt):
        _promote(stack, 0.05)
    manifest_version, alias_version = _champions(stack)
    assert manifest_version == version != alias_version  # apart, as after a crash
    monkeypatch.setattr(registry, "set_alias", real)
    _promote(stack, 0.05)
    assert _champions(stack) == (version, version)


def test_alias_failure_with_s3_down_reports_both_and_converges_next_run(
    stack: Stack, promoted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    _promote(stack, 0.0)  # a known state: version 1 everywhere
    assert _champions(stack) == (1, 1)
    version = _register(stack, 0.06)["version"]
    client = storage.make_client(stack.s3.endpoint)  # its own: it loses S3 below

    def s3_down(**_kwargs: object) -> None:
        raise EndpointConnectionError(endpoint_url=stack.s3.endpoint)

    def refuse_and_lose_s3(*_args: object, **_kwargs: object) -> None:
        # The registry refuses the alias, and from then on S3 cannot be reached either.
        client.meta.events.register("before-send.s3.*", s3_down)
        raise registry.RegistryError("alias could not be set")

    monkeypatch.setattr(registry, "set_alias", refuse_and_lose_s3)
    with pytest.raises(registry.RegistryError) as err:
        _promote(stack, 0.06, client)
    assert "alias could not be set" in str(err.value) and "unreachable" in str(err.value)
    assert _champions(stack) == (version, 1)  # both faults: apart for now
    # The manifest still names the new version, so its files stayed for readers.
    manifest = json.loads((stack.model_root / "current.json").read_text())
    for entry in manifest["files"]:
        blob = (stack.model_root / f"v{version}" / entry["name"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
    monkeypatch.undo()
    _promote(stack, 0.0)  # any later promotion first makes the alias follow S3
    manifest_version, alias_version = _champions(stack)
    assert manifest_version == alias_version
