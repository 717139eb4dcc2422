"""Which units survive: thresholding with safeguards."""

from __future__ import annotations

import torch

from switchprune.config import PruneConfig


def threshold_factors(
    factors: dict[str, torch.Tensor], cfg: PruneConfig, multiple: int = 1
) -> dict[str, torch.Tensor]:
    """Indices of the units to keep in each group.

    A unit is kept when its factor exceeds ``cfg.threshold`` (relative to the group's largest
    factor when ``cfg.relative``). A group keeps at least ``cfg.min_units`` (the largest
    factors), so a layer is never emptied, and its width is rounded up to a multiple of
    ``multiple`` (at most the whole group).

    Args:
        factors: One non-negative factor vector per group.
        cfg: Threshold and safeguards.
        multiple: ``train.width_multiple`` of the run that made the factors (a budget line
            already keeps multiples; the paper's modes get them here).

    Returns:
        Sorted ``int64`` indices per group.
    """
    kept: dict[str, torch.Tensor] = {}
    for name, s in factors.items():
        s = s.detach().float().cpu()
        size = s.numel()
        tau = cfg.threshold * float(s.max()) if cfg.relative else cfg.threshold
        count = int((s > tau).sum())
        target = max(count, min(cfg.min_units, size))
        target = min(size, -(-target // multiple) * multiple)
        # Stable ranking so ties (e.g. many exact zeros) resolve by index, deterministically.
        order = torch.argsort(-s, stable=True)
        kept[name] = torch.sort(order[:target]).values.to(torch.int64)
    return kept


def kept_widths(kept: dict[str, torch.Tensor]) -> dict[str, int]:
    """Number of kept units per group."""
    return {name: int(idx.numel()) for name, idx in kept.items()}
