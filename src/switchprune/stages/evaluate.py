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
    accuracy_from_logits,
    measure_latency,
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
    latency_ms,
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

    full, factors, _ = load_switched(trained_dir)
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
    report.update(_torch_latencies(cfg, full, small, meta.in_shape, device))
    report.update(_onnx_latencies(cfg, full, Path(model_dir) / ONNX_FILE, meta.in_shape))
    return report


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
) -> dict[str, float]:
    """PyTorch forward times (median, IQR) of the unpruned and compacted model; their ratio."""
    out = {}
    for batch in (1, 256):
        for tag, model in (("before", full), ("after", small)):
            timed = measure_latency(
                model,
                in_shape,
                batch,
                device,
                warmup=cfg.latency_warmup,
                repeats=cfg.latency_repeats,
            )
            out[f"latency_ms_{tag}_b{batch}"] = timed.median_ms
            out[f"latency_iqr_ms_{tag}_b{batch}"] = timed.iqr_ms
        out[f"latency_speedup_b{batch}"] = (
            out[f"latency_ms_before_b{batch}"] / out[f"latency_ms_after_b{batch}"]
        )
    return out


def _onnx_latencies(
    cfg: EvaluateConfig, full: TaskNet, onnx_after: Path, in_shape: tuple[int, ...]
) -> dict[str, float]:
    """CPU times under onnxruntime: the unpruned TNN exported as prune exports, and prune's copy.

    Both take raw ``uint8`` pixels and normalise them inside, with the contract ``model.onnx``
    records, so the two graphs differ only by the network.
    """
    if not onnx_after.is_file():
        raise ArtifactError(f"{onnx_after} is missing (re-run prune)")
    try:
        contract = read_contract(onnx_after)
    except OnnxExportError as exc:
        raise ArtifactError(f"{onnx_after}: {exc} (re-run prune)") from exc
    onnx_models = {"before": export_temporary(full, contract), "after": onnx_after}
    out = {}
    for batch in (1, 256):
        for tag, onnx_model in onnx_models.items():
            out[f"onnx_latency_ms_b{batch}_{tag}"] = latency_ms(
                onnx_model,
                in_shape,
                batch,
                warmup=cfg.latency_warmup,
                repeats=cfg.latency_repeats,
                threads=cfg.threads or None,
            )
    return out
