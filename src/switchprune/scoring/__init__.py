"""Scoring: which units of a task network are on.

:mod:`~switchprune.scoring.units` describes units (statistics, magnitude);
:mod:`~switchprune.scoring.scorers` scores them (the switcher and the controls), places the
budget line and gates scores into factors.
"""

from switchprune.scoring.scorers import (
    MIN_FACTOR,
    PRIOR_RANGE,
    SCORERS,
    MagnitudeScorer,
    RandomScorer,
    Switcher,
    SwitcherSpec,
    UnitScorer,
    budget_offset,
    build_scorer,
    hard_widths,
    kept_count,
    ramped_target,
)
from switchprune.scoring.units import N_STATS, ByGroup, magnitude_scores, unit_statistics

__all__ = [
    "MIN_FACTOR",
    "N_STATS",
    "PRIOR_RANGE",
    "SCORERS",
    "ByGroup",
    "MagnitudeScorer",
    "RandomScorer",
    "Switcher",
    "SwitcherSpec",
    "UnitScorer",
    "budget_offset",
    "build_scorer",
    "hard_widths",
    "kept_count",
    "magnitude_scores",
    "ramped_target",
    "unit_statistics",
]
