"""``prune``: threshold the factors, fold the survivors into the weights, remove the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from switchprune.config import PruneConfig, to_dict
from switchprune.evaluation import size_metrics
from switchprune.io import (
    COMPACT_FILE,
    SWITCHED_FILE,
    WIDTHS_FILE,
    ArtifactError,
    load_switched,
    replacing_dir,
    save_model,
    write_json,
)
from switchprune.models import SOURCE_FILE
from switchprune.onnx_export import ONNX_FILE, export_checked
from switchprune.pruning import compact, kept_widths, threshold_factors
from switchprune.pruning.compaction import layer_widths
from switchprune.serving import INPUT_KEY, InputContract, contract_of

# Every file prune writes in model_dir: the folder is replaced whole (the user's network
# source copy is saved beside its model).
COMPACT_FILES: tuple[str, ...] = (COMPACT_FILE, ONNX_FILE, WIDTHS_FILE, SOURCE_FILE)


def run(cfg: PruneConfig, *, trained_dir: Path, model_dir: Path) -> dict[str, float]:
    """Compact the switched task network.

    Args:
        cfg: The ``prune`` section.
        trained_dir: Output of ``train``.
        model_dir: Where the compacted model (``model.pt``: spec with the kept widths, kept
            indices, ``state_dict`` and the input contract ``"input"`` copied from
            ``switched.pt``), its ONNX copy (``model.onnx``: raw ``uint8`` input, normalised
            inside, contract in its metadata, checked against PyTorch with onnxruntime) and
            ``widths.json`` (kept/full width per group) go, with ``network.py`` for a
            network of the user's own file. The folder is replaced whole once every file is
            written; when anything fails (the ONNX check, say) it stays as it was.

    Raises:
        switchprune.io.ArtifactError: ``switched.pt`` holds no input contract (written by
            an older ``train``), or ``model_dir`` holds files prune does not write.
        switchprune.onnx_export.OnnxExportError: The ONNX copy does not match the compacted
            model (max abs logit difference above ``1e-4 + 1e-4 * max|logit|``).

    Returns:
        Parameters and MACs before and after, and their ratios.
    """
    model, factors, blob = load_switched(trained_dir)
    contract = _contract(blob, Path(trained_dir) / SWITCHED_FILE)
    # Widths are multiples of the run's train.width_multiple, whatever the compression mode.
    multiple = int(blob.get("switcher_spec", {}).get("multiple", 1))
    kept = threshold_factors(factors, cfg, multiple)
    small = compact(model, factors, kept)
    in_shape = model.spec.in_shape
    model.set_factors(None)
    metrics = size_metrics(model, small, in_shape)
    with replacing_dir(Path(model_dir), COMPACT_FILES, "prune") as staged:
        save_model(
            small,
            staged.dir / COMPACT_FILE,
            kept={k: v.clone() for k, v in kept.items()},
            full_widths=dict(model.group_sizes()),
            prune=to_dict(cfg),
            **{INPUT_KEY: contract.to_dict()},
        )
        export_checked(small, contract, staged.dir / ONNX_FILE)
        write_json(layer_widths(model, kept_widths(kept)), staged.dir / WIDTHS_FILE)
    return metrics


def _contract(blob: dict[str, Any], path: Path) -> InputContract:
    """The input contract ``train`` stored with the switched network; refused when absent."""
    try:
        contract = contract_of(blob, path)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from exc
    if contract is None:
        raise ArtifactError(
            f"{path}: no input contract ({INPUT_KEY!r}: dtype, shape, mean/std, classes); "
            "it was written by an older train: re-run train"
        )
    return contract
