"""``register``: log the run and the compacted model to MLflow, register it, alias it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from switchprune.card import CARD_FILE, CardInputs, write_card
from switchprune.config import RegisterConfig
from switchprune.data import META_FILE, load_meta, open_split, raw_images
from switchprune.errors import redact_uri
from switchprune.io import COMPACT_FILE, WIDTHS_FILE, ArtifactError, load_compacted, read_json
from switchprune.models import SOURCE_FILE
from switchprune.onnx_export import ONNX_FILE

if TYPE_CHECKING:
    import numpy

    from switchprune.registry import Registration

EVALUATE_FILE = "evaluate.json"


def run(
    cfg: RegisterConfig,
    *,
    prepared_dir: Path,
    model_dir: Path,
    evaluate_path: Path,
    params: dict[str, Any],
    tracking_uri: str | None = None,
    git_commit: str | None = None,
    history_path: Path | None = None,
) -> dict[str, Any]:
    """Log params, metrics, kept widths, data hash and commit; register the model; set the alias.

    Registering the same model file again reuses its version (and only re-sets the alias).
    A new version gets the model card (see :mod:`switchprune.card`) as its description, and
    the run gets the card, its pictures and the per-epoch training history (stepped metrics).

    Args:
        cfg: The ``register`` section.
        prepared_dir: Output of ``preprocess`` (its ``meta.json`` travels with the model).
        model_dir: Output of ``prune``.
        evaluate_path: The evaluation report.
        params: Every parameter section, logged as ``section.key`` params.
        tracking_uri: MLflow tracking URI (default: ``MLFLOW_TRACKING_URI``, else the embedded
            SQLite store).
        git_commit: The commit the code came from, when the caller knows it (a Kubeflow run
            has no git checkout); by default it is asked of ``git`` in the working directory.
        history_path: The per-epoch training records written by ``train``
            (``train_history.json``); ``None``: no curves.

    Returns:
        ``model_name``, ``version``, ``run_id``, ``model_uri``, ``alias``, ``changed``,
        ``data_md5``.
    """
    from switchprune import registry

    uri = registry.resolve_tracking_uri(tracking_uri)
    registry.check_reachable(uri)
    model, _kept = load_compacted(model_dir)
    report = read_json(Path(evaluate_path))
    widths = read_json(Path(model_dir) / WIDTHS_FILE)
    # Ungated layers (the classifier, ...) are listed for the card; the logged widths are the
    # gate groups' (files without a "gated" flag list groups only).
    gated = {g: w for g, w in widths.items() if w.get("gated", True)}
    data_md5 = str(report.get("data_md5", ""))
    files = _model_files(Path(prepared_dir), Path(model_dir), Path(evaluate_path))
    meta = load_meta(prepared_dir)
    registration = registry.Registration(
        experiment=cfg.experiment,
        model_name=cfg.model_name,
        alias=cfg.alias,
        model=model,
        files=files,
        input_example=_input_example(Path(prepared_dir)),
        params={**params, "widths": {g: w["kept"] for g, w in gated.items()}},
        metrics=_metrics(report, gated),
        tags={"data_md5": data_md5, **_git_tags(git_commit)},
        normalization=(meta.mean, meta.std),
        history=_read_history(Path(history_path)) if history_path is not None else [],
    )
    card = CardInputs(
        model_name=cfg.model_name,
        spec=model.spec.to_dict(),
        widths=widths,
        report=report,
        meta=read_json(Path(prepared_dir) / META_FILE),
        params=params,
        history=registration.history,
        class_names=meta.labels,
    )
    return {
        "model_name": cfg.model_name,
        "alias": cfg.alias,
        "data_md5": data_md5,
        "tracking_uri": redact_uri(uri),
        **_register_with_card(uri, registration, card),
    }


def _register_with_card(uri: str, registration: Registration, card: CardInputs) -> dict[str, Any]:
    """Register; a new version gets the card as its description, and its files in the run."""
    from switchprune import registry

    def describe(folder: Path) -> tuple[str, dict[str, Path]]:
        card_files = write_card(folder, card)
        return card_files[CARD_FILE].read_text(encoding="utf-8"), card_files

    return registry.log_and_register(uri, registration, describe)


def _model_files(prepared_dir: Path, model_dir: Path, evaluate_path: Path) -> dict[str, Path]:
    """The files that travel with the model, by the name they get; refused if one is missing."""
    files = {
        COMPACT_FILE: model_dir / COMPACT_FILE,
        WIDTHS_FILE: model_dir / WIDTHS_FILE,
        ONNX_FILE: model_dir / ONNX_FILE,
        META_FILE: prepared_dir / META_FILE,
        EVALUATE_FILE: evaluate_path,
    }
    if not files[ONNX_FILE].is_file():
        raise ArtifactError(f"{files[ONNX_FILE]} is missing (re-run prune)")
    if (model_dir / SOURCE_FILE).is_file():
        files[SOURCE_FILE] = model_dir / SOURCE_FILE  # a user network's code travels with it
    return files


def _metrics(report: dict[str, Any], widths: dict[str, dict[str, int]]) -> dict[str, float]:
    """The report's numbers, and the kept width of every gate group as ``width_<group>``."""
    metrics = {k: float(v) for k, v in report.items() if isinstance(v, int | float)}
    metrics.update({f"width_{g}": float(w["kept"]) for g, w in widths.items()})
    return metrics


def _input_example(prepared_dir: Path) -> numpy.ndarray:
    """Up to four raw test images: served models take raw uint8 images and normalise them."""
    count = min(4, len(open_split(prepared_dir, "test")))
    return raw_images(prepared_dir, "test", range(count)).numpy()


def _read_history(path: Path) -> list[dict[str, float]]:
    """The records of ``train_history.json``, refused when it is not a list of epoch records."""
    records = read_json(path)
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and "epoch" in r for r in records
    ):
        raise ArtifactError(f"{path}: not a list of per-epoch records with an 'epoch' field")
    return records


def _git_tags(git_commit: str | None) -> dict[str, str]:
    """The given commit, else the working directory's commit and whether it was dirty."""
    return {"git_commit": git_commit} if git_commit is not None else git_state()


def git_state(cwd: Path | None = None) -> dict[str, str]:
    """The commit the code in ``cwd`` came from, and whether the working tree differed from it.

    Returns:
        ``{"git_commit", "git_dirty"}`` (``"true"``/``"false"``), or ``{"git_commit":
        "unknown"}`` outside a git checkout.
    """
    try:
        commit, dirty = (
            subprocess.run(
                args, cwd=cwd, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            for args in (
                ["git", "rev-parse", "HEAD"],
                ["git", "status", "--porcelain", "--untracked-files=no"],
            )
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown"}
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}
