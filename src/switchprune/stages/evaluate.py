"""``evaluate``: accuracy, size, MACs and latency of the unpruned, gated and compacted models."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from switchprune.config import DataConfig, EvaluateConfig
from switchprune.data import load_meta, load_split, open_split, use_streaming
from switchprune.evaluation import (
    Latency,
    accuracy_from_logits,
    forward_pass,
    interleaved_latency,
    latency_batches,
    predict_logits,
    retain_freed_memory,
    size_metrics,
    state_dict_bytes,
)
from switchprune.io import COMPACT_FILE, ArtifactError, load_baseline, load_compacted, load_switched
from switchprune.models import TaskNet
from switchprune.onnx_export import (
    ONNX_FILE,
    OnnxExportError,
    export_temporary,
    onnx_pass,
    read_contract,
)
from switchprune.pruning import masked_factors
from switchprune.training import resolve_device


def run(
    cfg: EvaluateConfig,
    *,
    prepared_dir: Path,
    trained_dir: Path,
    model_dir: Path,
    data_cfg: DataConfig | None = None,
) -> dict[str, float | str]:
    """Measure the models on the test split.

    The gated model is the full-width TNN with the factors that survive thresholding (removed
    units at zero), i.e. exactly what compaction must reproduce; ``max_abs_logit_diff`` compares
    the two on every test sample. The unpruned model for size and latency is the same full-width
    TNN without gates.

    Args:
        cfg: The ``evaluate`` section.
        prepared_dir: Output of ``preprocess``.
        trained_dir: Output of ``train``.
        model_dir: Output of ``prune``.
        data_cfg: The ``data`` section: whether the test split is streamed from disk
            (``loader``) and by how many workers (default: read into memory).

    Returns:
        The flat evaluation report (see the README for every key): numbers, plus ``data_md5``,
        the DVC hash of the raw data the model was trained on. Nothing is written here: the
        caller (the command line, the component) writes the report once it is complete, so a
        failed evaluation leaves the last report as it was.
    """
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    meta = load_meta(prepared_dir)
    stream = data_cfg is not None and use_streaming(data_cfg, meta)
    test = open_split(prepared_dir, "test") if stream else load_split(prepared_dir, "test")
    labels = test.labels if not isinstance(test, TensorDataset) else test.tensors[1]
    workers = data_cfg.num_workers if stream and data_cfg is not None else 0

    def logits(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        return predict_logits(model, test, device, cfg.batch_size, dtype=dtype, num_workers=workers)

    full, factors, stored = load_switched(trained_dir)
    small, kept = load_compacted(model_dir)
    full, small = full.to(device), small.to(device)
    gates = masked_factors(factors, kept)
    full.set_factors({k: v.to(device) for k, v in gates.items()})
    gated_logits = logits(full)
    small_logits = logits(small)
    diff = _max_abs_diff_f64(full, small, gates, logits)
    full.set_factors(None)
    if not diff <= cfg.max_logit_diff:
        raise ArtifactError(
            f"{Path(model_dir) / COMPACT_FILE} is not the compaction of {Path(trained_dir)}: "
            f"max abs logit difference {diff:.3g} > evaluate.max_logit_diff "
            f"{cfg.max_logit_diff:g} (re-run prune)"
        )

    report: dict[str, Any] = {
        "test_accuracy": accuracy_from_logits(small_logits, labels),
        "gated_accuracy": accuracy_from_logits(gated_logits, labels),
        "max_abs_logit_diff": float((gated_logits - small_logits).abs().max()),
        "max_abs_logit_diff_f64": diff,
        **size_metrics(full, small, meta.in_shape),
        "bytes_before": float(state_dict_bytes(full)),
        "bytes_after": float((Path(model_dir) / COMPACT_FILE).stat().st_size),
        "n_test": float(len(labels)),
        "data_md5": meta.source_md5,
    }
    baseline = load_baseline(trained_dir)
    if baseline is not None:
        baseline = baseline.to(device)
        report["baseline_accuracy"] = accuracy_from_logits(logits(baseline), labels)
        report["accuracy_drop"] = report["baseline_accuracy"] - report["test_accuracy"]
    retain_freed_memory()  # steady forward times (see its docstring)
    report["latency_threads"] = float(torch.get_num_threads())  # fixed while timing
    predicted = _predicted(stored)
    batches = latency_batches(cfg.batch_size, *predicted.values())
    report.update(_torch_latencies(cfg, full, small, meta.in_shape, device, batches))
    report.update(_onnx_latencies(cfg, full, Path(model_dir) / ONNX_FILE, meta.in_shape, batches))
    return report | {k: 1.0 / stored["train_latency_ratio"] for k in predicted}


def _predicted(stored: dict[str, Any]) -> dict[str, int]:
    """The report key of the speedup ``train`` predicted for a latency target, to its batch.

    Every latency is timed at 1, 256, the evaluation's batch and the prediction's.

    ``latency_predicted_speedup_b<batch>`` for PyTorch, ``onnx_latency_...`` for onnxruntime:
    beside the measured ``..._speedup_b<batch>`` of the same runtime. Empty for other targets.
    """
    ratio = stored.get("train_latency_ratio")
    if not isinstance(ratio, float) or ratio <= 0:
        return {}
    batch = int(stored.get("train_latency_batch", 256))
    prefix = "onnx_latency" if stored.get("train_latency_runtime") == "onnxruntime" else "latency"
    return {f"{prefix}_predicted_speedup_b{batch}": batch}


def _max_abs_diff_f64(
    gated: TaskNet,
    small: TaskNet,
    gates: dict[str, torch.Tensor],
    logits: Callable[[torch.nn.Module, torch.dtype], torch.Tensor],
) -> float:
    """Largest logit difference of the gated and the compacted model, computed in float64.

    In float64 the compaction's exactness is separated from float32 rounding at the logits'
    scale (which alone reaches ~1e-6 for logits in the tens).
    """
    gated64, small64 = copy.deepcopy(gated).double(), copy.deepcopy(small).double()
    gated64.set_factors({k: v.double() for k, v in gates.items()})
    return float((logits(gated64, torch.float64) - logits(small64, torch.float64)).abs().max())


def _torch_latencies(
    cfg: EvaluateConfig,
    full: TaskNet,
    small: TaskNet,
    in_shape: tuple[int, ...],
    device: torch.device,
    batches: tuple[int, ...],
) -> dict[str, float]:
    """PyTorch forward times (median, IQR) of the unpruned and compacted model, in turns."""
    out: dict[str, float] = {}
    for batch in batches:
        runs = {
            "before": forward_pass(full, in_shape, batch, device),
            "after": forward_pass(small, in_shape, batch, device),
        }
        timed = interleaved_latency(runs, warmup=cfg.latency_warmup, repeats=cfg.latency_repeats)
        out.update(_latency_keys("latency_{}_{tag}_b{batch}", batch, timed))
    return out


def _onnx_latencies(
    cfg: EvaluateConfig,
    full: TaskNet,
    onnx_after: Path,
    in_shape: tuple[int, ...],
    batches: tuple[int, ...],
) -> dict[str, float]:
    """CPU times under onnxruntime: the unpruned TNN exported as prune exports, and prune's copy.

    Both take raw ``uint8`` pixels and normalise them inside, with the contract ``model.onnx``
    records, so the two graphs differ only by the network. They run on torch's thread count.
    """
    if not onnx_after.is_file():
        raise ArtifactError(f"{onnx_after} is missing (re-run prune)")
    try:
        contract = read_contract(onnx_after)
    except OnnxExportError as exc:
        raise ArtifactError(f"{onnx_after}: {exc} (re-run prune)") from exc
    onnx_models = {"before": export_temporary(full, contract), "after": onnx_after}
    out: dict[str, float] = {}
    threads = torch.get_num_threads()
    for batch in batches:
        runs = {t: onnx_pass(m, in_shape, batch, threads) for t, m in onnx_models.items()}
        timed = interleaved_latency(runs, warmup=cfg.latency_warmup, repeats=cfg.latency_repeats)
        out.update(_latency_keys("onnx_latency_{}_b{batch}_{tag}", batch, timed))
    return out


def _latency_keys(key: str, batch: int, timed: dict[str, Latency]) -> dict[str, float]:
    """One batch size's report keys: medians, spreads, speedup and the noisy flag.

    ``key`` formats a measure, the tag and the batch; ``noisy`` is 1.0 when either time cannot
    be trusted (:attr:`~switchprune.evaluation.Latency.noisy`).
    """
    before, after = timed["before"], timed["after"]
    out = {}
    for tag, t in timed.items():
        out[key.format("ms", tag=tag, batch=batch)] = t.median_ms
        out[key.format("iqr_ms", tag=tag, batch=batch)] = t.iqr_ms
    prefix = key.split("_{}")[0]
    out[f"{prefix}_speedup_b{batch}"] = before.median_ms / after.median_ms
    out[f"{prefix}_noisy_b{batch}"] = float(before.noisy or after.noisy)
    return out
