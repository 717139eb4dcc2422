"""Fold factors into the weights and physically remove switched-off units.

The surgery (removing output channels and every coupled input, through residual additions and
flattening) is done by Torch-Pruning's ``DependencyGraph``; the result is then loaded, strictly,
into a fresh network built from the spec with the kept widths, which proves the shapes agree with
what the loader will rebuild from ``{spec, state_dict}``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from switchprune.models import ModelSpec, TaskNet, build_model, is_graph_arch
from switchprune.models.graph import cut_units


def masked_factors(
    factors: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Factors with every removed unit set to zero: what the compacted network computes."""
    out = {}
    for name, s in factors.items():
        mask = torch.zeros_like(s)
        mask[kept[name].to(s.device)] = 1.0
        out[name] = s.detach() * mask
    return out


@torch.no_grad()
def fold_factors(model: TaskNet, factors: dict[str, torch.Tensor]) -> None:
    """Fold each group's factors into its writers, in place, and detach the gates.

    With BatchNorm the factor scales ``gamma`` and ``beta``; without, it scales the writer's
    weight rows and bias. Both are exact because the gate sits right after them.
    """
    modules = dict(model.named_modules())
    for g in model.groups:
        s = factors[g.name].detach().to(next(model.parameters()).device)
        for writer, norm in zip(g.writers, g.norms, strict=True):
            if norm is not None:
                bn = modules[norm]
                assert isinstance(bn, nn.BatchNorm2d | nn.BatchNorm1d)
                bn.weight.mul_(s)
                bn.bias.mul_(s)
            else:
                layer = modules[writer]
                assert isinstance(layer, nn.Conv2d | nn.Linear)
                layer.weight.mul_(s.view(-1, *([1] * (layer.weight.dim() - 1))))
                if layer.bias is not None:
                    layer.bias.mul_(s)
        for extra in g.extra_gates:
            bn = modules[extra]
            assert isinstance(bn, nn.BatchNorm2d | nn.BatchNorm1d)
            bn.weight.mul_(s)
            bn.bias.mul_(s)
    model.set_factors(None)


def compact(
    model: TaskNet, factors: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]
) -> TaskNet:
    """Return the smaller dense network that computes what ``model`` gated by ``factors`` does.

    Args:
        model: The trained, full-width task network (left untouched).
        factors: The switcher's factors per group.
        kept: Indices of the units to keep per group (see ``threshold_factors``).

    Returns:
        A new, ungated task network whose spec has the kept widths.
    """
    # Live factors on the gates (the switcher's output, not graph leaves) cannot be deep-copied:
    # copy the model without them and give them back to the caller's model afterwards.
    attached = [(gate, gate.factors) for gate in model.gates()]
    model.set_factors(None)
    try:
        work = copy.deepcopy(model).cpu().eval()
    finally:
        for gate, s in attached:
            gate.factors = s
    fold_factors(work, masked_factors({k: v.cpu() for k, v in factors.items()}, kept))
    cut_units(work, kept)
    widths = {g: int(idx.numel()) for g, idx in kept.items()}
    if is_graph_arch(work.spec.arch):
        # Rebuilt full width and cut to these units: kept indices count from the full network,
        # so a model compacted twice composes them.
        base = work.spec.kept
        units = {
            g: tuple(base[g][i] if base else i for i in sorted(idx.tolist()))
            for g, idx in kept.items()
        }
        spec: ModelSpec = work.spec.with_widths(widths, units)
    else:
        spec = work.spec.with_widths(widths)
    small = build_model(spec)
    small.load_state_dict(work.state_dict(), strict=True)
    return small.eval()
