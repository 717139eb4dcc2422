"""Where unit scores come from: the learned switcher, or the magnitude and random controls.

Every scorer plugs into the same schedule (budget line, ramp, alternation, compaction): only
the order in which units are switched off differs. The controls have nothing to learn; a
claim for the switcher is a claim that it beats them.
"""

from __future__ import annotations

import torch

from switchprune.models.base import TaskNet
from switchprune.models.switcher import (
    ByGroup,
    Switcher,
    SwitcherSpec,
    UnitScorer,
    magnitude_scores,
)

SCORERS = ("switcher", "magnitude", "random")


class MagnitudeScorer(UnitScorer):
    """L2 norm of a unit's incoming weights ÷ its layer's mean, read off the TNN as it is now."""

    def scores(self, model: TaskNet, grad: bool = False, stats: ByGroup | None = None) -> ByGroup:
        """One score per unit (no gradient: nothing is learned)."""
        return magnitude_scores(model)


class RandomScorer(UnitScorer):
    """Scores drawn once, uniformly in [0, 1), from a seed: the order never changes."""

    def __init__(self, spec: SwitcherSpec, sizes: dict[str, int], seed: int = 0) -> None:
        super().__init__(spec)
        g = torch.Generator().manual_seed(seed)
        self.names = list(sizes)
        for i, size in enumerate(sizes.values()):
            self.register_buffer(f"scores_{i}", torch.rand(size, generator=g))

    def scores(self, model: TaskNet, grad: bool = False, stats: ByGroup | None = None) -> ByGroup:
        """The fixed scores, one vector per group."""
        return {name: getattr(self, f"scores_{i}") for i, name in enumerate(self.names)}


def build_scorer(spec: SwitcherSpec, model: TaskNet, seed: int = 0) -> UnitScorer:
    """The scorer ``spec.scorer`` names, for ``model``.

    Raises:
        ValueError: If the scorer is unknown.
    """
    if spec.scorer == "switcher":
        return Switcher(spec)
    if spec.scorer == "magnitude":
        return MagnitudeScorer(spec)
    if spec.scorer == "random":
        return RandomScorer(spec, model.group_sizes(), seed)
    raise ValueError(f"unknown scorer {spec.scorer!r} (known: {', '.join(SCORERS)})")
