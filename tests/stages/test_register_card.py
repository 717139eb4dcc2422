"""train → prune → evaluate → register on tiny data, into a real temporary MLflow store.

The registered version's description is the model card, its numbers are the reports', and the
run holds the card, its pictures and the training history as stepped metrics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from project_support import empty_store
from switchprune import cli
from switchprune.card import format_number
from switchprune.config import (
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    PruneConfig,
    RegisterConfig,
    TrainConfig,
    to_dict,
)
from switchprune.stages import evaluate, preprocess, prune, register, train


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("card")
    prepared = root / "prepared"
    preprocess.run(DataConfig(), raw_dir=root / "raw", prepared_dir=prepared)
    train_cfg = TrainConfig(epochs=3, batch_size=128, snn_hidden=8, device="cpu")
    model_cfg = ModelConfig(hidden=(32, 16))
    train.run(
        train_cfg,
        model_cfg=model_cfg,
        prepared_dir=prepared,
        trained_dir=root / "trained",
        progress=False,
        history_path=root / "reports" / "train_history.json",
    )
    prune.run(PruneConfig(), trained_dir=root / "trained", model_dir=root / "compact")
    report = evaluate.run(
        EvaluateConfig(latency_warmup=0, latency_repeats=1, device="cpu"),
        prepared_dir=prepared,
        trained_dir=root / "trained",
        model_dir=root / "compact",
    )
    (root / "reports" / "evaluate.json").write_text(json.dumps(report))
    uri = empty_store(tmp_path_factory, root / "mlflow.db")
    (root / "params.yaml").write_text("{}\n")  # marks the project's root
    (root / "sub").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "sub")  # mlruns/ lands in the project's root all the same
        out = register.run(
            RegisterConfig(model_name="card-test", experiment="card"),
            prepared_dir=prepared,
            model_dir=root / "compact",
            evaluate_path=root / "reports" / "evaluate.json",
            history_path=root / "reports" / "train_history.json",
            params={"model": to_dict(model_cfg), "train": to_dict(train_cfg)},
            tracking_uri=uri,
            git_commit="abc",
        )
    return {"root": root, "uri": uri, "out": out, "report": report}


def _client(registered: dict[str, object]) -> MlflowClient:
    uri = str(registered["uri"])
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_the_description_is_the_card_with_the_reports_numbers(
    registered: dict[str, object],
) -> None:
    out, report = registered["out"], registered["report"]
    root = Path(str(registered["root"]))
    assert isinstance(out, dict) and isinstance(report, dict)
    assert (out["tracking_uri"], out["changed"], out["alias"]) == (
        registered["uri"],
        True,
        "candidate",
    )
    card = _client(registered).get_model_version("card-test", str(out["version"])).description
    assert card.startswith("# card-test\n")
    assert f"`{report['data_md5']}`" in card
    for before, after in (("params_before", "params_after"), ("macs_before", "macs_after")):
        row = f"| {format_number(report[before])} | {format_number(report[after])} |"
        assert row in card, row
    shown = re.search(r"\(`test_accuracy`\) \| ([^ |]+) \|", card)
    assert shown and float(shown.group(1)) == pytest.approx(report["test_accuracy"], rel=1e-5)
    widths = json.loads((root / "compact" / "widths.json").read_text())
    for group, w in widths.items():
        assert f"| `{group}` | {w['label']} | {w['full']} | {w['kept']} |" in card
    for tag in ("before", "after"):
        iqr = format_number(report[f"latency_iqr_ms_{tag}_b1"])
        assert f"{format_number(report[f'latency_ms_{tag}_b1'])} (IQR {iqr})" in card
    meta = json.loads((root / "prepared" / "meta.json").read_text())
    assert f"| 0 | {format_number(meta['mean'][0])} | {format_number(meta['std'][0])} |" in card
    assert "| `epochs` | 3 |" in card


def test_the_run_holds_the_card_pictures_and_curves(registered: dict[str, object]) -> None:
    out = registered["out"]
    root = Path(str(registered["root"]))
    assert isinstance(out, dict)
    client = _client(registered)
    run_id = str(out["run_id"])
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"model_card.md", "widths.png", "training_curves.png"} <= names
    card = client.get_model_version("card-test", str(out["version"])).description
    (logged_card,) = [p for p in (root / "mlruns").rglob("model_card.md") if run_id in str(p)]
    assert logged_card.read_text() == card
    for name in ("widths.png", "training_curves.png"):
        (png,) = [p for p in (root / "mlruns").rglob(name) if run_id in str(p)]
        assert png.read_bytes()[:4] == b"\x89PNG"
    history = json.loads((root / "reports" / "train_history.json").read_text())
    steps = client.get_metric_history(run_id, "epoch_val_accuracy")
    assert sorted((m.step, m.value) for m in steps) == [
        (r["epoch"], pytest.approx(r["val_accuracy"])) for r in history
    ]
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_widths_json_and_the_card_show_the_ungated_classifier_and_the_classes(
    registered: dict[str, object],
) -> None:
    out = registered["out"]
    root = Path(str(registered["root"]))
    assert isinstance(out, dict)
    widths = json.loads((root / "compact" / "widths.json").read_text())
    order = sorted(widths, key=lambda k: widths[k]["index"])
    assert order == ["fc1", "fc2", "classifier"]
    classifier = widths["classifier"]
    assert classifier["gated"] is False and classifier["kept"] == classifier["full"] == 10
    assert "classifier" in classifier["why"]
    assert all(widths[g]["gated"] and widths[g]["kept"] < widths[g]["full"] for g in order[:2])
    card = _client(registered).get_model_version("card-test", str(out["version"])).description
    assert f"- classifier (linear): {classifier['why']}" in card
    assert all(f"| {i} | {i} |" in card for i in range(10))  # digits: the index is the name
    assert "- `hidden`: `[32, 16]`" in card
    assert "small_input" not in card and "width_multiplier" not in card
    # The run logs the gate groups' widths only: the classifier never had a gate.
    run = _client(registered).get_run(str(out["run_id"]))
    assert {k for k in run.data.metrics if k.startswith("width_")} == {"width_fc1", "width_fc2"}
    assert {k for k in run.data.params if k.startswith("widths.")} == {"widths.fc1", "widths.fc2"}


def _snippet(card: str) -> str:
    """The Python block of the card's Loading section."""
    loading = card.split("## Loading", 1)[1]
    return loading.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_cards_loading_snippet_runs_in_a_clean_folder(
    registered: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snippet as printed, against the registry and against a pulled folder."""
    out = registered["out"]
    assert isinstance(out, dict)
    client = _client(registered)
    client.set_registered_model_alias("card-test", "champion", str(out["version"]))
    code = _snippet(client.get_model_version("card-test", str(out["version"])).description)
    assert 'switchprune.load_model("models:/card-test@champion")' in code
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SWITCHPRUNE_"))}
    env["MLFLOW_TRACKING_URI"] = str(registered["uri"])
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "snippet.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "snippet.py"], cwd=clean, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() in {str(i) for i in range(10)}
    # A pulled folder, offline: no tracking URI at all. The pull is the command's own code,
    # run here: only the snippets need fresh interpreters.
    monkeypatch.chdir(clean)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    assert cli.main(["pull", "card-test@champion", "--out", "champion"]) == 0
    (clean / "folder.py").write_text(code.replace("models:/card-test@champion", "champion/"))
    del env["MLFLOW_TRACKING_URI"]
    again = subprocess.run(
        [sys.executable, "folder.py"], cwd=clean, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip() == done.stdout.strip()
