"""``prune``: threshold the factors, fold the survivors into the weights, remove the rest."""

from __future__ import annotations

from pathlib import Path

from switchprune.config import PruneConfig, to_dict
from switchprune.evaluation import size_metrics
from switchprune.io import COMPACT_FILE, WIDTHS_FILE, load_switched, save_model, write_json
from switchprune.onnx_export import ONNX_FILE, export_checked
from switchprune.pruning import compact, kept_widths, threshold_factors


def run(cfg: PruneConfig, *, trained_dir: Path, model_dir: Path) -> dict[str, float]:
    """Compact the switched task network.

    Args:
        cfg: The ``prune`` section.
        trained_dir: Output of ``train``.
        model_dir: Where the compacted model (``model.pt``: spec with the kept widths, kept
            indices, ``state_dict``), its ONNX copy (``model.onnx``, checked against PyTorch
            with onnxruntime) and ``widths.json`` (kept/full width per group) go.

    Raises:
        switchprune.onnx_export.OnnxExportError: The ONNX copy does not match the compacted
            model (max abs logit difference above 1e-4); no ``model.onnx`` is left.

    Returns:
        Parameters and MACs before and after, and their ratios.
    """
    model, factors, _blob = load_switched(trained_dir)
    kept = threshold_factors(factors, cfg)
    small = compact(model, factors, kept)
    in_shape = model.spec.in_shape
    model.set_factors(None)
    metrics = size_metrics(model, small, in_shape)
    model_dir = Path(model_dir)
    save_model(
        small,
        model_dir / COMPACT_FILE,
        kept={k: v.clone() for k, v in kept.items()},
        full_widths=dict(model.group_sizes()),
        prune=to_dict(cfg),
    )
    export_checked(small, in_shape, model_dir / ONNX_FILE)
    full = model.group_sizes()
    write_json(
        {g: {"kept": w, "full": full[g]} for g, w in kept_widths(kept).items()},
        model_dir / WIDTHS_FILE,
    )
    return metrics
