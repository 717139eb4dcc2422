"""Each Kubeflow component's function, called directly with real KFP artifact objects.

The six components run in order on tiny settings, each reading the artifacts the previous ones
wrote: ``preprocess`` fetches the data version from a DVC remote on a real S3 server,
``register`` logs to a temporary SQLite MLflow store, ``promote`` copies to the S3 server.
Sections are passed the way a KFP ``dict`` parameter delivers them (every number a float).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from components.evaluate import evaluate
from components.preprocess import preprocess
from components.promote import promote
from components.prune import prune
from components.register import register
from components.train import train
from kfp.dsl import Artifact, Dataset, Metrics, Model
from kfp_support import MODEL_NAME, DvcRemote, tiny_params
from mlflow.tracking import MlflowClient

from switchprune import registry, storage
from switchprune.config import ConfigError, TrainConfig, from_struct, load_params, to_dict
from switchprune.io import read_json

pytestmark = pytest.mark.slow


def as_struct(value: Any) -> Any:
    """``value`` as a protobuf Struct carries it: every number a float."""
    if isinstance(value, dict):
        return {k: as_struct(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_struct(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def artifact(cls: type, path: Path) -> Any:
    art = cls()
    art.path = str(path)
    return art


def numeric(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


class Chain:
    """The artifacts of one run of the six components."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sections = {k: as_struct(v) for k, v in tiny_params().items() if k != "kubeflow"}
        self.prepared = artifact(Dataset, root / "prepared")
        self.trained = artifact(Model, root / "trained")
        self.compact = artifact(Model, root / "compact")
        self.report = artifact(Artifact, root / "report" / "evaluate.json")
        self.history = artifact(Artifact, root / "history" / "train_history.json")
        self.train_log = ""
        self.registration = artifact(Artifact, root / "registration" / "register.json")
        self.promotion = artifact(Artifact, root / "promotion" / "promote.json")
        self.metrics = {
            verb: artifact(Metrics, root / "metrics" / verb)
            for verb in ("preprocess", "train", "prune", "evaluate", "register", "promote")
        }


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, dvc_remote: DvcRemote) -> Iterator[Chain]:
    root = tmp_path_factory.mktemp("components")
    c = Chain(root)
    s = c.sections
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the SQLite store's artifacts (mlruns/) land here
        (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        preprocess.python_func(
            data=s["data"],
            dvc_remote=dvc_remote.url,
            data_md5=dvc_remote.md5,
            prepared=c.prepared,
            metrics=c.metrics["preprocess"],
        )
        log = io.StringIO()
        with contextlib.redirect_stderr(log):  # the component's log handler writes to stderr
            train.python_func(
                data=s["data"],
                model=s["model"],
                train=s["train"],
                evaluate=s["evaluate"],
                prepared=c.prepared,
                trained=c.trained,
                history=c.history,
                metrics=c.metrics["train"],
            )
        c.train_log = log.getvalue()
        prune.python_func(
            prune=s["prune"], trained=c.trained, compact=c.compact, metrics=c.metrics["prune"]
        )
        evaluate.python_func(
            evaluate=s["evaluate"],
            data=s["data"],
            prepared=c.prepared,
            trained=c.trained,
            compact=c.compact,
            report=c.report,
            metrics=c.metrics["evaluate"],
        )
        sections = {k: s[k] for k in ("data", "model", "train", "prune", "evaluate", "promote")}
        register.python_func(
            register=s["register"],
            **sections,
            git_commit="0123abc",
            prepared=c.prepared,
            compact=c.compact,
            report=c.report,
            history=c.history,
            registration=c.registration,
            metrics=c.metrics["register"],
        )
        promote.python_func(
            promote=s["promote"],
            registration=c.registration,
            promotion=c.promotion,
            metrics=c.metrics["promote"],
        )
        yield c
    torch.set_num_threads(threads)


def test_preprocess_writes_the_splits_of_the_requested_data_version(
    chain: Chain, dvc_remote: DvcRemote
) -> None:
    meta = read_json(Path(chain.prepared.path) / "meta.json")
    assert meta["source_md5"] == dvc_remote.md5
    assert {p.name for p in Path(chain.prepared.path).iterdir()} >= {
        "train.pt",
        "val.pt",
        "test.pt",
    }
    counts = chain.metrics["preprocess"].metadata
    assert counts["n_train"] + counts["n_val"] + counts["n_test"] == 1797
    assert counts["num_classes"] == 10


def test_preprocess_refuses_a_version_the_remote_does_not_hold(
    dvc_remote: DvcRemote, tmp_path: Path
) -> None:
    out = artifact(Dataset, tmp_path / "prepared")
    with pytest.raises(storage.StorageError, match="no such version"):
        preprocess.python_func(
            data={},
            dvc_remote=dvc_remote.url,
            data_md5="0" * 32 + ".dir",
            prepared=out,
            metrics=artifact(Metrics, tmp_path / "m"),
        )
    assert not (tmp_path / "prepared").exists()


def test_train_and_prune_write_models_and_log_their_numbers(chain: Chain) -> None:
    assert {p.name for p in Path(chain.trained.path).iterdir()} == {"switched.pt", "baseline.pt"}
    assert "val_accuracy" in chain.metrics["train"].metadata
    assert (Path(chain.compact.path) / "model.pt").is_file()
    widths = read_json(Path(chain.compact.path) / "widths.json")
    assert set(widths) and all(w["kept"] <= w["full"] for w in widths.values())
    pruned = chain.metrics["prune"].metadata
    assert pruned["params_after"] < pruned["params_before"]
    assert pruned["params_ratio"] == pytest.approx(pruned["params_after"] / pruned["params_before"])


def test_train_logs_one_line_per_epoch_and_writes_the_history(chain: Chain) -> None:
    epochs = 4  # tiny_params
    for run in ("train", "baseline"):
        lines = [ln for ln in chain.train_log.splitlines() if f" {run} epoch " in ln]
        assert [ln.split(" epoch ")[1].split(":")[0] for ln in lines] == [
            f"{e}/{epochs}" for e in range(1, epochs + 1)
        ], chain.train_log
        assert all(ln.startswith("INFO switchprune.training:") for ln in lines)
    history = json.loads(Path(chain.history.path).read_text())
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    assert history[-1]["val_accuracy"] == chain.metrics["train"].metadata["val_accuracy"]
    assert "baseline_loss" in history[0]


def test_evaluate_writes_the_whole_report_and_logs_only_its_numbers(chain: Chain) -> None:
    report = json.loads(Path(chain.report.path).read_text())
    assert report["data_md5"] == read_json(Path(chain.prepared.path) / "meta.json")["source_md5"]
    logged = chain.metrics["evaluate"].metadata
    assert "data_md5" not in logged
    assert logged == numeric(report)
    assert report["max_abs_logit_diff"] <= 1e-5
    assert report["params_after"] == chain.metrics["prune"].metadata["params_after"]


def test_register_logs_the_sections_and_the_given_commit(chain: Chain) -> None:
    registered = read_json(Path(chain.registration.path))
    assert registered["model_name"] == MODEL_NAME and registered["version"] == 1
    assert chain.metrics["register"].metadata == numeric(registered)
    uri = registry.resolve_tracking_uri()
    info = registry.version_info(uri, registry.ModelRef(MODEL_NAME, alias="candidate"))
    assert info["version"] == 1
    assert info["tags"]["git_commit"] == "0123abc"
    assert info["tags"]["data_md5"] == read_json(Path(chain.report.path))["data_md5"]
    report = read_json(Path(chain.report.path))
    assert info["metrics"]["test_accuracy"] == pytest.approx(report["test_accuracy"])
    # Every key of every section, recorded as a DVC run records it (4, not 4.0).
    logged = MlflowClient(tracking_uri=uri).get_run(info["run_id"]).data.params
    configs = load_params(chain.root / "params.yaml")
    expected = {
        f"{name}.{key}": json.dumps(value) if isinstance(value, list) else str(value)
        for name in ("data", "model", "train", "prune", "evaluate", "promote")
        for key, value in to_dict(configs[name]).items()
    }
    assert {k: v for k, v in logged.items() if k in expected} == expected
    assert logged["train.epochs"] == "4" and logged["model.hidden"] == "[32, 16]"
    # The model card is the version's description; the curves are stepped metrics.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    card = client.get_model_version(MODEL_NAME, "1").description
    assert card.startswith(f"# {MODEL_NAME}") and report["data_md5"] in card
    steps = client.get_metric_history(info["run_id"], "epoch_loss")
    assert sorted(m.step for m in steps) == [1, 2, 3, 4]


def test_promote_copies_to_s3_and_moves_champion(chain: Chain, dvc_remote: DvcRemote) -> None:
    promoted = read_json(Path(chain.promotion.path))
    assert promoted["promoted"] is True, promoted
    assert promoted["version"] == 1
    assert chain.metrics["promote"].metadata == numeric(promoted)
    assert "promoted" not in chain.metrics["promote"].metadata  # a bool is not a metric
    manifest = json.loads(
        (dvc_remote.root / "kfp-models" / "team" / MODEL_NAME / "current.json").read_text()
    )
    assert manifest["version"] == 1 and manifest["git_commit"] == "0123abc"
    champion = registry.get_alias_version(
        f"sqlite:///{chain.root / 'mlflow.db'}", MODEL_NAME, "champion"
    )
    assert champion is not None and champion["version"] == 1


def test_sections_survive_the_struct_transport_and_stay_validated() -> None:
    cfg = from_struct(TrainConfig, {"epochs": 30.0, "batch_size": 64.0, "tnn_lr": 1.0})
    assert cfg == TrainConfig(epochs=30, batch_size=64, tnn_lr=1.0)
    assert type(cfg.epochs) is int
    with pytest.raises(ConfigError, match=r"\[train\] epochs must be an integer, got 2.5"):
        from_struct(TrainConfig, {"epochs": 2.5})
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        from_struct(TrainConfig, {"epoch": 3.0})
