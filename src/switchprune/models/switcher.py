"""The switcher network (SNN): reads a task network's weights, outputs one factor per unit.

Each unit is described by its own weights, so the SNN is applied unit by unit and is
permutation-equivariant within a layer:

- ``stats``: fixed-length statistics of the unit's incoming weights (mean, spread, L1, L2, max),
  its BatchNorm ``gamma``/``beta``, its bias, the norm of its outgoing weights and the layer's
  relative depth, z-scored per layer, fed to one shared MLP;
- ``rows``: the raw incoming weight rows (scaled by the layer's RMS) through one linear encoder
  per writing layer, summed per unit, then the shared MLP.

Exact zeros switch units off with no extra machinery: in ``relu`` mode the factor is
``ReLU(score)``; in ``budget`` mode a compression target sets an offset, the line below which
units are off, and kept units get ``exp(score - 1) > 0`` normalised to mean 1 per group (see
:meth:`Switcher.gate`). The last
bias starts at 1 and the last weights near 0, so every factor starts near 1 and the task network
starts unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from switchprune.models.base import GateGroup, TaskNet

N_STATS = 11
# Largest change, in log magnitude, that a prior switcher's learned part makes to a score.
PRIOR_RANGE = 0.5
# Smallest factor of a group's last unit in ``relu`` mode (a group is never emptied).
MIN_FACTOR = 1e-3

ByGroup = dict[str, torch.Tensor]
"""One tensor per gate group, by group name: scores, factors or per-unit statistics."""


@dataclass(frozen=True)
class SwitcherSpec:
    """Rebuild information for a switcher.

    Attributes:
        input: ``stats`` or ``rows``.
        hidden: Hidden width of the shared head.
        mode: ``relu`` (the switcher's own zeros) or ``budget`` (a target sets the line).
        row_lengths: For ``rows``: length of each writer's incoming row, by writer name.
        multiple: ``budget`` mode keeps a multiple of this many units per group (see
            :func:`kept_count`).
        scorer: Where scores come from: ``switcher`` (learned), or the fixed controls
            ``magnitude`` and ``random`` (:mod:`switchprune.scoring`).
        prior: The switcher's score is its learned output plus the log of the unit's
            magnitude score, so it starts from magnitude and learns what improves on it.
    """

    input: str = "stats"
    hidden: int = 32
    row_lengths: tuple[tuple[str, int], ...] = ()
    mode: str = "relu"
    multiple: int = 1
    scorer: str = "switcher"
    prior: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A ``weights_only``-safe mapping."""
        return {
            "input": self.input,
            "hidden": self.hidden,
            "row_lengths": dict(self.row_lengths),
            "mode": self.mode,
            "multiple": self.multiple,
            "scorer": self.scorer,
            "prior": self.prior,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SwitcherSpec:
        """Inverse of :meth:`to_dict`."""
        rows = tuple((str(k), int(v)) for k, v in data.get("row_lengths", {}).items())
        return cls(
            str(data["input"]),
            int(data["hidden"]),
            rows,
            str(data.get("mode", "relu")),
            int(data.get("multiple", 1)),
            str(data.get("scorer", "switcher")),
            bool(data.get("prior", False)),
        )

    @classmethod
    def for_model(
        cls,
        model: TaskNet,
        input: str,
        hidden: int,
        mode: str = "relu",
        multiple: int = 1,
        scorer: str = "switcher",
        prior: bool = False,
    ) -> SwitcherSpec:
        """The spec of a switcher (or of a fixed scorer, see :mod:`switchprune.scoring`)."""
        modules = dict(model.named_modules())
        rows: list[tuple[str, int]] = []
        if input == "rows":
            for g in model.groups:
                for writer, norm in zip(g.writers, g.norms, strict=True):
                    w = modules[writer].weight
                    rows.append((writer, w[0].numel() + (2 if norm else 0)))
        return cls(input, hidden, tuple(rows), mode, multiple, scorer, prior)


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


class Switcher(UnitScorer):
    """Maps a task network's weights to one non-negative factor per gated unit."""

    def __init__(self, spec: SwitcherSpec) -> None:
        super().__init__(spec)
        width = spec.hidden
        if spec.input == "rows":
            # Module names may not contain dots; writer names do.
            self.encoders = nn.ModuleDict(
                {_key(name): nn.Linear(length, width) for name, length in spec.row_lengths}
            )
            head_in = width + 1  # + relative depth
        else:
            self.encoders = nn.ModuleDict()
            head_in = N_STATS
        self.head = nn.Sequential(nn.Linear(head_in, width), nn.ReLU(), nn.Linear(width, 1))
        last = self.head[-1]
        assert isinstance(last, nn.Linear)
        nn.init.normal_(last.weight, std=0.01)
        nn.init.constant_(last.bias, 1.0)

    def kept_factors(self, scores: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """``relu`` mode: ``ReLU(score)``; ``budget`` mode: ``exp(score - 1)``, mean 1.

        In ``relu`` mode a kept top unit at or below the line is floored at
        :data:`MIN_FACTOR`. In ``budget`` mode every kept factor is positive however the
        scores drift, and a fresh switcher gives factors of 1.
        """
        if self.spec.mode != "budget":
            return torch.where(scores > self.offset, scores, scores.clamp(min=MIN_FACTOR))
        if self.spec.prior:
            # A switcher that refines the magnitude prior selects units and leaves the kept
            # ones unscaled: what it learns is what removing a unit costs.
            return torch.ones_like(scores)
        kept = torch.exp(scores.clamp(max=10.0) - 1.0)
        # Kept factors average 1 in each group: the switcher decides which units matter and
        # how much relative to each other, but cannot inflate the layer's scale (which only
        # makes the logits, not the decision, larger).
        mean = (kept * on).sum() / on.sum().clamp(min=1)
        return kept / mean.clamp(min=1e-12)

    def scores(self, model: TaskNet, grad: bool = False, stats: ByGroup | None = None) -> ByGroup:
        """The head's output for every unit (see :meth:`UnitScorer.scores`)."""
        modules = dict(model.named_modules())
        out: ByGroup = {}
        for g, position in _depths(model):
            if self.spec.input == "rows":
                x = self._encode_rows(g, modules, grad)
                pos = torch.full((g.size, 1), position, device=x.device, dtype=x.dtype)
                x = torch.cat([torch.relu(x), pos], dim=1)
            elif stats is not None:
                x = stats[g.name]
            else:
                x = unit_statistics(g, modules, position, grad)
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
    def statistics(self, model: TaskNet) -> ByGroup | None:
        """Detached per-unit inputs of the head (``stats`` input only; ``None`` for ``rows``).

        They depend on the task network's weights alone, so one computation serves every
        :meth:`scores` call until the task network changes (an SNN step and the factors
        computed right after it).
        """
        if self.spec.input == "rows":
            return None
        modules = dict(model.named_modules())
        return {g.name: unit_statistics(g, modules, pos, grad=False) for g, pos in _depths(model)}

    def _encode_rows(self, g: GateGroup, modules: dict[str, nn.Module], grad: bool) -> torch.Tensor:
        total: torch.Tensor | None = None
        for writer, norm in zip(g.writers, g.norms, strict=True):
            w = _weight(modules[writer], grad).flatten(1)
            w = w / (w.pow(2).mean().sqrt() + 1e-8)
            if norm is not None:
                bn = modules[norm]
                gb = torch.stack([_param(bn.weight, grad), _param(bn.bias, grad)], dim=1)
                w = torch.cat([w, _zscore(gb)], dim=1)
            enc = self.encoders[_key(writer)](w)
            total = enc if total is None else total + enc
        assert total is not None
        return total


def _depths(model: TaskNet) -> list[tuple[GateGroup, float]]:
    """Each gate group with its relative depth, 0 for the first and 1 for the last."""
    last = max(1, len(model.groups) - 1)
    return [(g, index / last) for index, g in enumerate(model.groups)]


def _key(name: str) -> str:
    return name.replace(".", "__")


def _param(p: torch.Tensor, grad: bool) -> torch.Tensor:
    return p if grad else p.detach()


def _weight(module: nn.Module, grad: bool) -> torch.Tensor:
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return _param(w, grad)


def _row_std(w: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation of each row; ``Tensor.std`` is ~10x slower on the CPU."""
    if w.shape[1] < 2:
        return torch.zeros_like(w[:, 0])
    centred = w - w.mean(1, keepdim=True)
    return (centred.pow(2).sum(1) / (w.shape[1] - 1) + 1e-12).sqrt()


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardise each column across the units of a layer (a stable scale while training)."""
    if x.shape[0] < 2:
        return torch.zeros_like(x)
    return (x - x.mean(0, keepdim=True)) / (x.std(0, keepdim=True) + 1e-6)


def unit_statistics(
    g: GateGroup, modules: dict[str, nn.Module], position: float, grad: bool = False
) -> torch.Tensor:
    """Per-unit descriptors of a gate group, shape ``[size, N_STATS]``, z-scored per layer.

    Writers of a residual group are averaged; outgoing norms are taken over every reader.
    """
    feats = []
    for writer, norm in zip(g.writers, g.norms, strict=True):
        layer = modules[writer]
        w = _weight(layer, grad).flatten(1)
        cols = [
            w.mean(1),
            _row_std(w),
            w.abs().mean(1),
            w.pow(2).sum(1).sqrt(),
            w.abs().amax(1),
        ]
        bias = getattr(layer, "bias", None)
        cols.append(_param(bias, grad) if bias is not None else torch.zeros_like(cols[0]))
        if norm is not None:
            bn = modules[norm]
            cols += [_param(bn.weight, grad), _param(bn.bias, grad)]
        else:
            cols += [torch.ones_like(cols[0]), torch.zeros_like(cols[0])]
        feats.append(torch.stack(cols, dim=1))
    x = torch.stack(feats).mean(0)
    outgoing = torch.zeros(g.size, device=x.device, dtype=x.dtype)
    for i, reader in enumerate(g.readers):
        r = _weight(modules[reader], grad)
        if g.spans:
            # Only the reader's inputs that are this group's units (concatenations).
            start, per_unit = g.spans[i]
            r = r[:, start : start + g.size * per_unit]
        # Conv: [out, C, k, k]; Linear after flatten: [out, C * positions]; both -> [out, C, -1].
        r = r.reshape(r.shape[0], g.size, -1)
        outgoing = outgoing + r.pow(2).sum(dim=(0, 2))
    x = torch.cat([x, outgoing.sqrt().unsqueeze(1)], dim=1)
    x = _zscore(x)
    ones = torch.ones(g.size, 1, device=x.device, dtype=x.dtype)
    size = torch.log(torch.tensor(float(g.size), device=x.device, dtype=x.dtype))
    # Layer context is not z-scored: it tells the shared head which layer it is looking at.
    return torch.cat([x, ones * position, ones * size / 10.0], dim=1)


@torch.no_grad()
def magnitude_scores(model: TaskNet) -> ByGroup:
    """The magnitude control: L2 norm of each unit's incoming weights ÷ its layer's mean.

    Writers of a residual group contribute the norm over all of their rows together.
    """
    modules = dict(model.named_modules())
    out = {}
    for g in model.groups:
        sq = sum(_weight(modules[w], False).flatten(1).pow(2).sum(1) for w in g.writers)
        norm = torch.as_tensor(sq).sqrt()
        out[g.name] = norm / norm.mean().clamp(min=1e-12)
    return out
