"""The command line: bad parameters are refused before any work, a tiny pipeline runs end to end."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from switchprune import cli


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny nets run fastest on one thread, and do not stall when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GOOD_PARAMS: dict[str, Any] = {
    "data": {"dataset": "digits"},
    "train": {"epochs": 2, "batch_size": 128, "snn_hidden": 8},
    "model": {"hidden": [32, 16]},
    "prune": {},
    "evaluate": {"latency_repeats": 2},
}

STAGES = [["preprocess"], ["train", "-q"], ["prune"], ["evaluate"]]


def write_params(directory: Path, params: dict[str, Any] | str) -> None:
    text = params if isinstance(params, str) else yaml.safe_dump(params)
    (directory / "params.yaml").write_text(text)


def tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The four stages run through ``main`` on the digits, in their own directory."""
    root = tmp_path_factory.mktemp("pipeline")
    write_params(root, GOOD_PARAMS)
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for argv in STAGES:
            results[argv[0]] = call(argv)
    return root, results


def test_good_run_writes_every_stage_output_and_a_full_report(
    pipeline: tuple[Path, dict[str, Any]], report_keys: set[str]
) -> None:
    root, results = pipeline
    for verb, (code, out, err) in results.items():
        assert code == 0, f"{verb}: {err}"
        assert json.loads((root / "reports" / f"{verb}.json").read_text())
        assert out.strip()  # the metrics, one per line
    for path in (
        "data/prepared/meta.json",
        "models/trained/switched.pt",
        "models/trained/baseline.pt",
        "models/compact/model.pt",
        "models/compact/widths.json",
        "checkpoints/switched.ckpt",
    ):
        assert (root / path).is_file(), path
    report = json.loads((root / "reports" / "evaluate.json").read_text())
    assert report_keys <= set(report)
    assert report["max_abs_logit_diff"] <= 1e-5
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"]
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert all(report[k] > 0 for k in report_keys if k.startswith("latency_ms"))
    train_report = json.loads((root / "reports" / "train.json").read_text())
    assert train_report["epochs"] == 2.0
    assert train_report["train_params_ratio"] <= 0.4 + 1e-9  # the default target


def test_good_run_prints_the_metrics_sorted(pipeline: tuple[Path, dict[str, Any]]) -> None:
    root, results = pipeline
    _code, out, _err = results["prune"]
    lines = out.strip().splitlines()
    keys = [line.split()[0] for line in lines]
    assert keys == sorted(json.loads((root / "reports" / "prune.json").read_text()))


def test_quiet_training_writes_nothing_to_stderr(pipeline: tuple[Path, dict[str, Any]]) -> None:
    _root, results = pipeline
    assert results["train"][2] == ""


BAD_PARAMS = [
    pytest.param("train", {"train": {"epochs": 2, "epochz": 3}}, "epochz", id="train-unknown"),
    pytest.param("train", {"train": {"epochs": "2"}}, "epochs", id="train-type-str"),
    pytest.param("train", {"train": {"batch_size": 12.0}}, "batch_size", id="train-type-float"),
    pytest.param("train", {"train": {"baseline": 1}}, "baseline", id="train-type-bool"),
    pytest.param("train", {"train": {"epochs": 0}}, "epochs", id="train-range"),
    pytest.param("train", {"train": {"target_ratio": 1.5}}, "target_ratio", id="train-ratio"),
    pytest.param("train", {"model": {"hidden": [32, 0]}}, "hidden", id="model-range"),
    pytest.param("train", {"trian": {"epochs": 2}}, "trian", id="unknown-section"),
    pytest.param("preprocess", {"data": {"datset": "digits"}}, "datset", id="data-unknown"),
    pytest.param("preprocess", {"data": {"download": 1}}, "download", id="data-type"),
    pytest.param("preprocess", {"data": {"val_fraction": 0.7}}, "val_fraction", id="data-range"),
    pytest.param("prune", {"prune": {"threshold": -1}}, "threshold", id="prune-range"),
    pytest.param(
        "evaluate", {"evaluate": {"latency_repeats": 0}}, "latency_repeats", id="evaluate-range"
    ),
]


@pytest.mark.parametrize(("verb", "params", "key"), BAD_PARAMS)
def test_bad_parameter_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    verb: str,
    params: dict[str, Any],
    key: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {**GOOD_PARAMS, **params})
    argv = [verb, "-q"] if verb == "train" else [verb]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n")
    assert lines[0].startswith(f"switchprune {verb}: error: ")
    assert key in lines[0]
    assert tree(tmp_path) == ["params.yaml"]  # no reports/, models/, checkpoints/, data/


def test_debug_variable_shows_the_whole_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from switchprune.config import ConfigError

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"prune": {"threshold": -1}})
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "1")
    with pytest.raises(ConfigError, match="threshold"):
        cli.main(["prune"])
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "0")
    assert cli.main(["prune"]) == 2


@pytest.mark.parametrize("verb", ["preprocess", "train", "prune", "evaluate"])
def test_parameters_are_checked_before_the_stage_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    import importlib

    stage = importlib.import_module(f"switchprune.stages.{verb}")
    started: list[Any] = []

    def fake_run(cfg: Any, **kwargs: Any) -> dict[str, float]:
        started.append(cfg)
        return {"ok": 1.0}

    monkeypatch.setattr(stage, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    section = {"train": "train", "preprocess": "data"}.get(verb, verb)
    write_params(tmp_path, {**GOOD_PARAMS, section: {"not_a_key": 1}})
    assert call([verb])[0] == 2
    assert started == []
    # With valid parameters the same (patched) stage does start: the check above is meaningful.
    write_params(tmp_path, {**GOOD_PARAMS, section: {}})
    assert call([verb])[0] == 0
    assert len(started) == 1
    assert json.loads((tmp_path / "reports" / f"{verb}.json").read_text()) == {"ok": 1.0}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train: {epochs: 2\nmodel: [\n", "not valid YAML"),
        ("- train\n- model\n", "must hold a mapping"),
        (None, "not found"),
        ("", "is empty"),
        ("model:\n  hidden: [8]\n", "has no section 'train'"),
        ("model:\n  hidden: [8]\ntrain:\n  epochs: 1\n  epochs: 2\n", "duplicate key"),
    ],
    ids=["invalid-yaml", "not-a-mapping", "missing", "empty", "no-section", "duplicate-key"],
)
def test_unreadable_parameter_file_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    if text is not None:
        write_params(tmp_path, text)
    code, out, err = call(["train", "-q"])
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert needle in err and "params.yaml" in err
    assert tree(tmp_path) == ([] if text is None else ["params.yaml"])


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"\x00 this is not a checkpoint \xff" * 20)


def corrupt_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def corrupt_not_a_model(path: Path) -> None:
    torch.save({"spec": {"arch": "mlp"}, "state_dict": {}}, path)


def corrupt_list(path: Path) -> None:
    torch.save([1, 2, 3], path)


@pytest.mark.parametrize(
    ("relative", "damage"),
    [
        ("models/compact/model.pt", Path.unlink),
        ("models/compact/model.pt", corrupt_garbage),
        ("models/compact/model.pt", corrupt_truncated),
        ("models/compact/model.pt", corrupt_not_a_model),
        ("models/compact/model.pt", corrupt_list),
        ("models/trained/switched.pt", Path.unlink),
        ("models/trained/switched.pt", corrupt_garbage),
    ],
    ids=[
        "compact-missing",
        "compact-garbage",
        "compact-truncated",
        "compact-not-a-model",
        "compact-list",
        "trained-missing",
        "trained-garbage",
    ],
)
def test_evaluate_with_a_missing_or_corrupt_model_is_one_line_exit_2(
    pipeline: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    relative: str,
    damage: Any,
) -> None:
    root, _results = pipeline
    for sub in ("data", "models"):
        shutil.copytree(root / sub, tmp_path / sub)
    write_params(tmp_path, GOOD_PARAMS)
    monkeypatch.chdir(tmp_path)
    damage(tmp_path / relative)
    code, out, err = call(["evaluate"])
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("switchprune evaluate: error: ")
    assert relative in lines[0]
    assert "\x1b" not in lines[0]  # readable: no terminal escape codes
    assert not (tmp_path / "reports").exists()


def _patched_prune(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, effect: Any) -> None:
    from switchprune.stages import prune

    def fake_run(cfg: Any, **kwargs: Any) -> dict[str, float]:
        return effect()

    monkeypatch.setattr(prune, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, GOOD_PARAMS)


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug() -> dict[str, float]:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    _patched_prune(monkeypatch, tmp_path, bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli.main(["prune"])


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (lambda: __import__("switchprune.registry").registry.RegistryError("server down"), 1),
        (lambda: __import__("switchprune.storage").storage.StorageError("bucket gone"), 1),
        (lambda: __import__("switchprune.io").io.ArtifactError("model.pt is corrupt"), 2),
        (lambda: __import__("switchprune.training").training.TrainingError("diverged"), 1),
    ],
    ids=["registry", "storage", "artifact", "training"],
)
def test_user_errors_are_one_line_with_their_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Any, code: int
) -> None:
    def fail() -> dict[str, float]:
        raise error()

    _patched_prune(monkeypatch, tmp_path, fail)
    got, out, err = call(["prune"])
    assert (got, out) == (code, "")
    assert len(err.splitlines()) == 1 and err.startswith("switchprune prune: error: ")


@pytest.mark.parametrize(
    "metrics",
    ["reports/prune.json", "/proc/switchprune-prune.json"],
    ids=["not-a-dir", "read-only"],
)
def test_unwritable_output_is_one_line_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metrics: str
) -> None:
    _patched_prune(monkeypatch, tmp_path, lambda: {"ok": 1.0})
    (tmp_path / "reports").write_text("a file where a folder should be")
    code, out, err = call(["prune", "--metrics", metrics])
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and metrics in err


def test_info_lines_of_the_package_reach_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    cli.configure_logging()
    logging.getLogger("switchprune.storage").info("uploaded s3://bucket/model.pt")
    assert "uploaded s3://bucket/model.pt" in capsys.readouterr().err


def test_pull_without_a_store_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out, err = call(["pull", "some-model@champion", "--out", "champion"])
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "no MLflow tracking store" in err
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no champion/


@pytest.mark.parametrize("uri", ["garbage", "the mlflow server"])
def test_a_tracking_uri_that_is_not_a_uri_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, out, err = call(["pull", "some-model@champion", "--out", "champion"])
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "is not a URI" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a fresh Python process or an MLflow store
def test_promote_exits_3_when_the_gate_refuses_and_0_when_promoted_or_unchanged(
    pipeline: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a real S3 server and an embedded MLflow store, through ``main``."""
    from pipeline.servers import S3Server

    from switchprune import storage

    root, _results = pipeline
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    strict = {"min_accuracy": 0.999, "max_accuracy_drop": 0.0, "max_params_ratio": 0.01}
    loose = {"min_accuracy": 0.0, "max_accuracy_drop": 1.0, "max_params_ratio": 1.0}
    try:
        with S3Server(tmp_path / "s3", log_path=tmp_path / "s3.log") as s3:
            for key, value in s3.environment.items():
                monkeypatch.setenv(key, value)
            storage.ensure_bucket(storage.make_client(), "switchprune-models")
            write_params(root, {**GOOD_PARAMS, "promote": strict})
            assert call(["register"])[0] == 0
            code, out, err = call(["promote"])
            assert code == cli.EXIT_REFUSED == 3
            refused = json.loads((root / "reports" / "promote.json").read_text())
            assert refused["promoted"] is False and "\npromoted " in out
            # Every failed rule, not only the first, in the report and on stderr.
            for rule in ("min_accuracy", "max_params_ratio"):
                assert rule in refused["reason"] and rule in err
            assert refused["reason"].count("; ") >= 1
            assert not list((tmp_path / "s3" / "switchprune-models").rglob("current.json"))
            write_params(root, {**GOOD_PARAMS, "promote": loose})
            code, _out, err = call(["promote"])
            assert code == 0, err
            promoted = json.loads((root / "reports" / "promote.json").read_text())
            assert (promoted["promoted"], promoted["changed"]) == (True, True)
            code, _out, err = call(["promote"])  # the champion again: nothing to change
            assert code == 0, err
            again = json.loads((root / "reports" / "promote.json").read_text())
            assert (again["promoted"], again["changed"]) == (True, False)
    finally:
        write_params(root, GOOD_PARAMS)


def test_promote_and_the_command_line_start_without_torch() -> None:
    """Promoting moves files and aliases: its process never imports torch or MLflow's PyTorch
    flavour (seconds of start-up in every release, on every pod)."""
    import subprocess
    import sys

    code = (
        "import sys; from switchprune import cli, promotion, registry; "
        "from switchprune.stages import promote; "
        "print(sorted(m for m in ('torch', 'mlflow.pytorch', 'switchprune.models') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_program_exits_with_the_commands_status_and_runs_the_collector_less(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``switchprune`` (``cli.entry``) exits with :func:`cli.main`'s status, its collector
    threshold raised and every object frozen before the exit."""
    import gc

    monkeypatch.chdir(tmp_path)  # no params.yaml here: exit status 2
    monkeypatch.setattr("sys.argv", ["switchprune", "train", "-q"])
    before = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, *before[1:])
    try:
        with pytest.raises(SystemExit) as stopped:
            cli.entry()
        assert stopped.value.code == 2
        assert "params.yaml" in capsys.readouterr().err
        assert gc.get_threshold()[0] == cli.GC_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.set_threshold(*before)
        gc.freeze()
