"""What a unit looks like to a scorer: per-unit statistics of its weights, and its magnitude.

Each unit is described by its own weights, so the switcher is applied unit by unit and is
permutation-equivariant within a layer: fixed-length statistics of the unit's incoming weights
(mean, spread, L1, L2, max), its BatchNorm ``gamma``/``beta``, its bias, the norm of its outgoing
weights and the layer's relative depth, z-scored per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from switchprune.models.base import GateGroup, TaskNet

N_STATS = 11

ByGroup = dict[str, torch.Tensor]
"""One tensor per gate group, by group name: scores, factors or per-unit statistics."""


def depths(model: TaskNet) -> list[tuple[GateGroup, float]]:
    """Each gate group with its relative depth, 0 for the first and 1 for the last."""
    last = max(1, len(model.groups) - 1)
    return [(g, index / last) for index, g in enumerate(model.groups)]


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


def _outgoing_squares(g: GateGroup, modules: dict[str, nn.Module], grad: bool) -> torch.Tensor:
    """Per unit, the sum of squares of its outgoing weights over every reader."""
    outgoing = torch.zeros(())
    for i, reader in enumerate(g.readers):
        r = _weight(modules[reader], grad)
        if g.spans:
            # Only the reader's inputs that are this group's units (concatenations).
            start, per_unit = g.spans[i]
            r = r[:, start : start + g.size * per_unit]
        # Conv: [out, C, k, k]; Linear after flatten: [out, C * positions]; both -> [out, C, -1].
        outgoing = outgoing + r.reshape(r.shape[0], g.size, -1).pow(2).sum(dim=(0, 2))
    return outgoing.expand(g.size) if outgoing.dim() == 0 else outgoing


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
    x = torch.cat([x, _outgoing_squares(g, modules, grad).sqrt().unsqueeze(1)], dim=1)
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


@torch.no_grad()
def group_norm_scores(model: TaskNet) -> ByGroup:
    """The DepGraph score: L2 norm of every parameter coupled to a unit ÷ its group's mean.

    A unit's coupled parameters are what removing it removes: its rows in every writer (weights
    and bias), its BatchNorm ``gamma`` and ``beta``, and its columns in every reader (Fang et
    al., CVPR 2023; Torch-Pruning's group magnitude importance with ``p=2``).
    """
    modules = dict(model.named_modules())
    out = {}
    for g in model.groups:
        sq = _outgoing_squares(g, modules, False)
        for writer, norm in zip(g.writers, g.norms, strict=True):
            layer = modules[writer]
            sq = sq + _weight(layer, False).flatten(1).pow(2).sum(1)
            for p in (getattr(layer, "bias", None), *_norm_params(modules, norm)):
                if p is not None:
                    sq = sq + p.detach().pow(2)
        norm_ = sq.sqrt()
        out[g.name] = norm_ / norm_.mean().clamp(min=1e-12)
    return out


def _norm_params(modules: dict[str, nn.Module], norm: str | None) -> tuple[torch.Tensor, ...]:
    """A BatchNorm's ``gamma`` and ``beta`` (none without one, or when it is not affine)."""
    if norm is None:
        return ()
    bn = modules[norm]
    return tuple(p for p in (bn.weight, bn.bias) if isinstance(p, torch.Tensor))
