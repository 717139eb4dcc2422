"""``train``: alternating SNN/TNN training, plus the same TNN trained plainly as a baseline.

Run by ``torchrun``, both trainings are data-parallel (:mod:`switchprune.distributed`); only rank
0 writes the models and the history.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from switchprune import distributed, latency
from switchprune.config import DataConfig, EvaluateConfig, ModelConfig, TrainConfig, to_dict
from switchprune.data import load_meta, load_split, open_split, use_streaming
from switchprune.evaluation import torch_threads
from switchprune.io import (
    BASELINE_FILE,
    SWITCHED_FILE,
    check_replaceable,
    replacing_dir,
    save_model,
    write_json,
)
from switchprune.models import SOURCE_FILE, ModelSpec, spec_from_config
from switchprune.serving import INPUT_KEY, InputContract
from switchprune.training import FitResult, fit, resolve_device

# Every file train writes in trained_dir: the folder is replaced whole (the user's network
# source copy is saved beside its model).
TRAINED_FILES: tuple[str, ...] = (SWITCHED_FILE, BASELINE_FILE, SOURCE_FILE)
# The per-epoch checkpoints in checkpoint_dir, of the switched and the baseline run.
CHECKPOINT_FILES: tuple[str, str] = ("switched.ckpt", "baseline.ckpt")


def run(
    cfg: TrainConfig,
    *,
    model_cfg: ModelConfig,
    prepared_dir: Path,
    trained_dir: Path,
    checkpoint_dir: Path | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    progress: bool = True,
    data_cfg: DataConfig | None = None,
    history_path: Path | None = None,
    log_epochs: bool = False,
    evaluate_cfg: EvaluateConfig | None = None,
) -> dict[str, float]:
    """Train the switched task network (and the baseline when ``cfg.baseline``).

    Args:
        cfg: The ``train`` section.
        model_cfg: The ``model`` section (architecture and widths).
        prepared_dir: Output of ``preprocess``.
        trained_dir: Where ``switched.pt`` (full-width TNN, its factors, the switcher) and
            ``baseline.pt`` go, each with the input contract (``"input"``, see
            :class:`~switchprune.serving.InputContract`), and ``network.py`` for a network of
            the user's own file. Replaced whole after both runs, with ``history_path``.
        checkpoint_dir: Per-epoch checkpoints: an interrupted run resumes to the same result.
        on_checkpoint: Called on rank 0 with each new checkpoint's path (to copy it away).
        progress: Show progress bars.
        data_cfg: The ``data`` section: in memory or streamed (``loader``), ``DataLoader``
            workers and augmentation of the training batches (default: in memory, none).
        history_path: Where the per-epoch records go (JSON list, see :func:`history_records`);
            ``None``: not written.
        log_epochs: Log one INFO line per epoch (where no progress bar is seen).
        evaluate_cfg: The ``evaluate`` section: what a latency target is measured with.

    Returns:
        Validation accuracy, reached compression and time per epoch of both runs (the same on
        every rank of a data-parallel run).

    Raises:
        switchprune.io.ArtifactError: ``trained_dir`` holds files train does not write
            (refused before training).
    """
    prepared_dir, trained_dir = Path(prepared_dir), Path(trained_dir)
    check_replaceable(trained_dir, TRAINED_FILES, "train")
    with (
        distributed.session(resolve_device(cfg.device)) as device,
        torch_threads(distributed.threads(cfg.threads)),
    ):
        distributed.check_batch_size(cfg.batch_size, distributed.world_size())  # before any work
        train_set, val_set, spec, contract = _read(prepared_dir, model_cfg, data_cfg)
        # The switched and the baseline run differ only in ``switched`` and their checkpoint.
        timing = _timing(evaluate_cfg)
        fit_once = partial(fit, spec, train_set, val_set, cfg, device=device, data=data_cfg)
        train_once = partial(
            _fit_checkpointed,
            partial(fit_once, progress=progress, log_epochs=log_epochs, timing=timing),
            checkpoint_dir,
            on_checkpoint,
        )
        result = train_once(switched=True)
        assert result.switcher is not None and result.factors is not None
        metrics = {k: float(v) for k, v in result.metrics.items()}
        base = None
        if cfg.baseline:
            base = train_once(switched=False)
            metrics.update(_baseline_metrics(metrics, base.metrics))
        # Written only now: a failure in either run leaves the last outputs whole, and a
        # baseline from other settings does not survive the swap to be evaluated as this run's.
        if distributed.is_main():
            _write_outputs(
                cfg,
                result,
                base,
                contract,
                trained_dir=trained_dir,
                history_path=history_path,
                timing=timing,
            )
        distributed.barrier()  # no rank reports done before the files are there
        return metrics


def _timing(evaluate_cfg: EvaluateConfig | None) -> latency.Setting:
    """What a latency target's table is measured with: the ``evaluate`` settings."""
    if evaluate_cfg is None:
        return latency.Setting()
    e = evaluate_cfg
    return latency.Setting(runtime=e.runtime, batch=e.batch_size, threads=e.threads)


def _fit_checkpointed(
    fit_once: Callable[..., FitResult],
    checkpoint_dir: Path | None,
    on_checkpoint: Callable[[Path], None] | None,
    *,
    switched: bool,
) -> FitResult:
    """``fit_once`` with its run's checkpoint, handed to ``on_checkpoint`` after every epoch."""
    if checkpoint_dir is None:
        return fit_once(switched=switched)
    path = Path(checkpoint_dir) / CHECKPOINT_FILES[0 if switched else 1]
    hook = on_checkpoint if distributed.is_main() else None
    return fit_once(
        switched=switched,
        checkpoint_path=path,
        on_epoch_end=(lambda _epoch: hook(path)) if hook is not None else None,
    )


def _read(
    prepared_dir: Path, model_cfg: ModelConfig, data_cfg: DataConfig | None
) -> tuple[Any, Any, ModelSpec, dict[str, Any]]:
    """The training and validation splits, the network's spec and the input contract."""
    meta = load_meta(prepared_dir)
    read = open_split if data_cfg is not None and use_streaming(data_cfg, meta) else load_split
    spec = spec_from_config(model_cfg, meta.in_shape, meta.num_classes)
    # The model files carry their input contract: prune and every shipped form read it there.
    contract = {INPUT_KEY: InputContract.from_meta(meta).to_dict()}
    return read(prepared_dir, "train"), read(prepared_dir, "val"), spec, contract


def _write_outputs(
    cfg: TrainConfig,
    result: FitResult,
    base: FitResult | None,
    contract: dict[str, Any],
    *,
    trained_dir: Path,
    history_path: Path | None,
    timing: latency.Setting,
) -> None:
    """Replace ``trained_dir`` (and the history file) with both runs' models, whole."""
    assert result.switcher is not None
    # A latency target's prediction for the final widths, for evaluate to set beside its own.
    predicted: dict[str, Any] = {}
    if "train_latency_ratio" in result.metrics:
        predicted = {
            "train_latency_ratio": result.metrics["train_latency_ratio"],
            "train_latency_runtime": timing.runtime,
            "train_latency_batch": timing.batch,
        }
    with replacing_dir(trained_dir, TRAINED_FILES, "train") as staged:
        save_model(
            result.model,
            staged.dir / SWITCHED_FILE,
            factors=result.factors,
            switcher_spec=result.switcher.spec.to_dict(),
            switcher_state=result.switcher.state_dict(),
            train=to_dict(cfg),
            **predicted,
            **contract,
        )
        if base is not None:
            save_model(base.model, staged.dir / BASELINE_FILE, train=to_dict(cfg), **contract)
        if history_path is not None:
            records = history_records(result.history, base.history if base is not None else [])
            write_json(records, staged.file(Path(history_path)))


def _baseline_metrics(
    switched: Mapping[str, float], baseline: Mapping[str, float]
) -> dict[str, float]:
    """The baseline's validation accuracy and epoch time, and the switched run's time ratio."""
    out = {}
    if "val_accuracy" in baseline:
        out["baseline_val_accuracy"] = float(baseline["val_accuracy"])
    out["baseline_epoch_seconds"] = float(baseline["epoch_seconds"])
    if baseline["epoch_seconds"] > 0:
        out["epoch_seconds_ratio"] = switched["epoch_seconds"] / baseline["epoch_seconds"]
    return out


def history_records(
    switched: Sequence[Mapping[str, float]], baseline: Sequence[Mapping[str, float]] = ()
) -> list[dict[str, float]]:
    """One record per epoch, numbered from 1, the baseline's values prefixed ``baseline_``.

    A flat list of records with an ``epoch`` field is what ``dvc plots`` reads directly.

    Args:
        switched: ``FitResult.history`` of the switched run (``epoch`` counted from 0).
        baseline: ``FitResult.history`` of the baseline run (may be empty).

    Returns:
        ``[{"epoch": 1, "loss": ..., "val_accuracy": ..., "params_ratio": ...,
        "baseline_loss": ..., ...}, ...]``.
    """
    by_epoch: dict[int, dict[str, float]] = {}
    for prefix, history in (("", switched), ("baseline_", baseline)):
        for record in history:
            epoch = int(record["epoch"]) + 1
            row = by_epoch.setdefault(epoch, {"epoch": epoch})
            row.update({f"{prefix}{k}": float(v) for k, v in record.items() if k != "epoch"})
    return [by_epoch[e] for e in sorted(by_epoch)]
