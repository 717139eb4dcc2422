"""Thresholding of switcher factors and compaction of the task network."""

from switchprune.pruning.compaction import compact, fold_factors, masked_factors
from switchprune.pruning.masks import kept_widths, threshold_factors

__all__ = ["compact", "fold_factors", "kept_widths", "masked_factors", "threshold_factors"]
