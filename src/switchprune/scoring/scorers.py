"""Which units are on: scores, the budget line placed on them, the gates of the factors.

Scores come from the learned switcher, or from the magnitude, group-norm and random controls.

Every scorer plugs into the same schedule (budget line, ramp, alternation, compaction): only the
order in which units are switched off differs. The controls have nothing to learn; a claim for
the switcher is a claim that it beats them.

Exact zeros switch units off with no extra machinery: in ``relu`` mode (the paper's
``penalty``/``none`` compression) the factor is ``ReLU(score)``; in ``budget`` mode a compression
target sets an offset, the line below which units are off (:func:`budget_offset`). The
switcher's last bias starts at 1 and its last weights near 0, so every factor starts near 1 and
the task network starts unchanged; in ``budget`` mode it adds the log magnitude score to its
bounded output (the prior), so it starts from the magnitude order and learns what improves on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from switchprune.cost import CostModel
from switchprune.models.base import TaskNet
from switchprune.scoring.units import (
    N_STATS,
    ByGroup,
    depths,
    group_norm_scores,
    magnitude_scores,
    unit_statistics,
)

SCORERS = ("switcher", "magnitude", "group_norm", "random")
# Largest change, in log magnitude, that a prior switcher's learned part makes to a score.
PRIOR_RANGE = 0.5
# Smallest factor of a group's last unit in ``relu`` mode (a group is never emptied).
MIN_FACTOR = 1e-3


@dataclass(frozen=True)
class SwitcherSpec:
    """Rebuild information for a scorer.

    Attributes:
        hidden: Hidden width of the switcher's head.
        mode: ``relu`` (the switcher's own zeros) or ``budget`` (a target sets the line).
        multiple: ``budget`` mode keeps a multiple of this many units per group (see
            :func:`kept_count`).
        scorer: Where scores come from: ``switcher`` (learned), or the fixed controls
            ``magnitude``, ``group_norm`` and ``random``.
        prior: The switcher's score is its bounded learned output plus the log of the unit's
            magnitude score (``budget`` mode).
    """

    hidden: int = 32
    mode: str = "relu"
    multiple: int = 1
    scorer: str = "switcher"
    prior: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A ``weights_only``-safe mapping."""
        return {
            "hidden": self.hidden,
            "mode": self.mode,
            "multiple": self.multiple,
            "scorer": self.scorer,
            "prior": self.prior,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SwitcherSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            int(data["hidden"]),
            str(data.get("mode", "relu")),
            int(data.get("multiple", 1)),
            str(data.get("scorer", "switcher")),
            bool(data.get("prior", False)),
        )


def kept_count(above: int, size: int, multiple: int) -> int:
    """How many units a ``budget``-mode group keeps when ``above`` of them score above the line.

    The count is rounded to the nearest multiple of ``multiple`` (at least one multiple, at most
    the whole group), so that compacted layers get widths that vectorised kernels handle well.
    """
    if multiple <= 1:
        return min(size, max(1, above))
    rounded = max(multiple, (above + multiple // 2) // multiple * multiple)
    return min(size, rounded)


class UnitScorer(nn.Module):
    """Scores every gated unit of a task network; the gate turns scores into factors.

    Subclasses define :meth:`scores`. The offset is the line at or below which units are off
    (0 in ``relu`` mode; set by the compression target in ``budget`` mode).
    """

    def __init__(self, spec: SwitcherSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("offset", torch.zeros(()))

    def forward(self, model: TaskNet, grad: bool = False, stats: ByGroup | None = None) -> ByGroup:
        """Factors for every gate group of ``model`` (arguments as for :meth:`scores`)."""
        return self.factors(self.scores(model, grad, stats))

    def factors(self, scores: ByGroup) -> ByGroup:
        """Each group's scores through :meth:`gate`: exactly 0 for the units that are off."""
        return {k: self.gate(v) for k, v in scores.items()}

    def on_units(self, scores: torch.Tensor) -> torch.Tensor:
        """Which units of a group are on: above the offset, plus the top unit (never empty).

        In ``budget`` mode with a width multiple, the count is rounded (:func:`kept_count`)
        and the best-scored units fill it.
        """
        above = scores > self.offset
        top = torch.zeros_like(above)
        if scores.numel():
            top[scores.argmax()] = True
        on = above | top
        if self.spec.mode == "budget" and self.spec.multiple > 1 and scores.numel():
            count = kept_count(int(above.sum()), scores.numel(), self.spec.multiple)
            on = torch.zeros_like(above)
            on[torch.argsort(scores.detach(), descending=True, stable=True)[:count]] = True
        return on

    def kept_factors(self, scores: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """Factors of the units that are on (fixed scorers: 1, the unit unchanged)."""
        return torch.ones_like(scores)

    def gate(self, scores: torch.Tensor) -> torch.Tensor:
        """Factors from scores: exactly 0 for units that are off (see :meth:`on_units`)."""
        on = self.on_units(scores)
        return torch.where(on, self.kept_factors(scores, on), torch.zeros_like(scores))

    def scores(self, model: TaskNet, grad: bool = False, stats: ByGroup | None = None) -> ByGroup:
        """One score vector per gate group of ``model``, by group name.

        Args:
            model: The task network whose weights are read.
            grad: Keep the graph into the task network's weights (otherwise they are read
                detached). Only a learned scorer reads weights through a graph.
            stats: Precomputed :meth:`statistics` of ``model`` as it is now.
        """
        raise NotImplementedError

    def statistics(self, model: TaskNet) -> ByGroup | None:
        """Inputs of :meth:`scores` that can be reused while ``model`` is unchanged, or None."""
        return None

    def place_line(self, scores: ByGroup, costs: CostModel, metric: str, budget: float) -> None:
        """Set the offset so that the units above it cost at most ``budget`` (``metric``)."""
        self.offset.fill_(budget_offset(scores, costs, metric, budget, self.spec.multiple))

    def trainable_factors(
        self, scores: ByGroup, temperature: float, generator: torch.Generator
    ) -> ByGroup:
        """Factors of an SNN step, through which the task loss reaches the scores.

        ``relu`` mode: the deterministic gate; units that are off pass their gradient straight
        through, so the loss can raise a unit back above the line. ``budget`` mode: each unit is
        on with probability ``sigmoid((score - offset) / T)``, ``T`` being ``temperature``
        standard deviations of the scores, sampled (Gumbel-sigmoid, hard forward, relaxed
        backward), so the switcher learns what dropping a unit near the line does to the loss
        rather than what scaling it does.
        """
        if self.spec.mode != "budget":
            out = {}
            for k, v in scores.items():
                f = self.gate(v)
                out[k] = f + (v - v.detach()) * (f == 0)
            return out
        flat = torch.cat([v.detach() for v in scores.values()])
        t = temperature * float(flat.std()) + 1e-6
        out = {}
        for k, v in scores.items():
            u = torch.rand(v.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(v.device)
            soft = torch.sigmoid((v - self.offset) / t + torch.log(u) - torch.log1p(-u))
            hard = soft > 0.5
            if not bool(hard.any()):
                hard[v.detach().argmax()] = True  # a sampled layer is never emptied either
            kept = self.kept_factors(v, hard)
            out[k] = (hard.to(v.dtype) + soft - soft.detach()) * kept
        return out


class Switcher(UnitScorer):
    """The switcher network (SNN): maps a task network's weights to one factor per unit.

    One MLP head, shared by every unit, reads each unit's statistics
    (:func:`~switchprune.scoring.units.unit_statistics`).
    """

    def __init__(self, spec: SwitcherSpec) -> None:
        super().__init__(spec)
        width = spec.hidden
        self.head = nn.Sequential(nn.Linear(N_STATS, width), nn.ReLU(), nn.Linear(width, 1))
        last = self.head[-1]
        assert isinstance(last, nn.Linear)
        nn.init.normal_(last.weight, std=0.01)
        nn.init.constant_(last.bias, 1.0)

    def kept_factors(self, scores: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """Factors of the units that are on.

        ``relu`` mode: ``ReLU(score)``; ``budget`` mode: 1 with the prior, else
        ``exp(score - 1)`` normalised to mean 1. In ``relu`` mode a kept top unit at or below
        the line is floored at :data:`MIN_FACTOR`.
        """
        if self.spec.mode != "budget":
            return torch.where(scores > self.offset, scores, scores.clamp(min=MIN_FACTOR))
        if self.spec.prior:
            # A switcher that refines the magnitude prior selects units and leaves the kept
            # ones unscaled: what it learns is what removing a unit costs.
            return torch.ones_like(scores)
        kept = torch.exp(scores.clamp(max=10.0) - 1.0)
        # Kept factors average 1 in each group: the switcher decides which units matter and
        # how much relative to each other, but cannot inflate the layer's scale.
        mean = (kept * on).sum() / on.sum().clamp(min=1)
        return kept / mean.clamp(min=1e-12)

    def scores(self, model: TaskNet, grad: bool = False, stats: ByGroup | None = None) -> ByGroup:
        """The head's output for every unit (see :meth:`UnitScorer.scores`)."""
        modules = dict(model.named_modules())
        out: ByGroup = {}
        for g, position in depths(model):
            x = stats[g.name] if stats is not None else unit_statistics(g, modules, position, grad)
            out[g.name] = self.head(x).squeeze(1)
        if self.spec.prior:
            # The learned part is bounded: it can reorder units whose magnitudes are within a
            # factor of e^PRIOR_RANGE, but cannot sink a whole layer below the line (which
            # empties it in a few steps and collapses the network).
            prior = magnitude_scores(model)
            out = {
                k: PRIOR_RANGE * torch.tanh(v - 1.0) + torch.log(prior[k] + 1e-6)
                for k, v in out.items()
            }
        return out

    @torch.no_grad()
    def statistics(self, model: TaskNet) -> ByGroup:
        """Detached per-unit inputs of the head.

        They depend on the task network's weights alone, so one computation serves every
        :meth:`scores` call until the task network changes (an SNN step and the factors
        computed right after it).
        """
        modules = dict(model.named_modules())
        return {g.name: unit_statistics(g, modules, pos, grad=False) for g, pos in depths(model)}


class MagnitudeScorer(UnitScorer):
    """L2 norm of a unit's incoming weights ÷ its layer's mean, read off the TNN as it is now."""

    def scores(self, model: TaskNet, grad: bool = False, stats: ByGroup | None = None) -> ByGroup:
        """One score per unit (no gradient: nothing is learned)."""
        return magnitude_scores(model)


class GroupNormScorer(UnitScorer):
    """DepGraph's score: the L2 norm of every parameter coupled to a unit ÷ its layer's mean."""

    def scores(self, model: TaskNet, grad: bool = False, stats: ByGroup | None = None) -> ByGroup:
        """One score per unit (no gradient: nothing is learned)."""
        return group_norm_scores(model)


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
    if spec.scorer == "group_norm":
        return GroupNormScorer(spec)
    if spec.scorer == "random":
        return RandomScorer(spec, model.group_sizes(), seed)
    raise ValueError(f"unknown scorer {spec.scorer!r} (known: {', '.join(SCORERS)})")


def hard_widths(factors: ByGroup) -> dict[str, int]:
    """Units with a non-zero factor per group (at least one: a layer is never emptied)."""
    return {k: max(1, int((v > 0).sum())) for k, v in factors.items()}


def ramped_target(final: float, elapsed: float, ramp: float) -> float:
    """Target ratio at a point of the switching phase: a cubic ramp from 1 down to ``final``.

    Lowering the target gradually (as in gradual magnitude pruning) lets the task network
    adapt while units switch off, instead of losing many at once and overshooting.

    Args:
        final: The ratio to reach.
        elapsed: Share of the switching phase done, in [0, 1].
        ramp: Share of the switching phase over which the target falls.
    """
    done = min(1.0, max(0.0, elapsed / ramp)) if ramp > 0 else 1.0
    return final + (1.0 - final) * (1.0 - done) ** 3


@torch.no_grad()
def budget_offset(
    scores: ByGroup,
    costs: CostModel,
    metric: str,
    budget: float,
    multiple: int = 1,
) -> float:
    """The lowest offset at which the units with ``score > offset`` cost at most ``budget``.

    Every group keeps at least one unit, and its width is rounded as :func:`kept_count` does
    for ``multiple``. Found by bisection over the sorted scores.
    """
    flat = torch.cat([v.detach().flatten() for v in scores.values()]).sort().values

    def fits(offset: float) -> bool:
        widths = {
            k: kept_count(int((v > offset).sum()), v.numel(), multiple) for k, v in scores.items()
        }
        return float(costs.cost(metric, widths)) <= budget

    below_all = float(flat[0]) - 1.0
    if fits(below_all):
        return below_all
    lo, hi = -1, len(flat) - 1  # flat[hi], the top score, keeps one unit per group
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(float(flat[mid])):
            hi = mid
        else:
            lo = mid
    return float(flat[hi])
