"""Fold factors into the weights and physically remove switched-off units.

The surgery (removing output channels and every coupled input, through residual additions and
flattening) is done by Torch-Pruning's ``DependencyGraph``; the result is then loaded, strictly,
into a fresh network built from the spec with the kept widths, which proves the shapes agree with
what the loader will rebuild from ``{spec, state_dict}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from switchprune.models import ModelSpec, TaskNet, build_with_state, is_graph_arch
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
    return build_with_state(spec, work.state_dict()).eval()


def layer_widths(model: TaskNet, kept: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Full and kept width of every layer with units, in network order: ``widths.json``.

    Each gate group is one entry under its name: ``index`` (its position in the network),
    ``label`` (the layer's module path and kind, e.g. ``features.3 (conv 3×3)``), ``gated``
    (true), ``full``, ``kept`` and ``layers`` (the modules whose output channels are its
    units). Every ``Conv2d``/``Linear`` that writes no group is an entry under its module path
    with ``gated`` false, ``kept`` equal to ``full`` and ``why`` it was left whole (the
    classifier, a grouped convolution, ...). ``index`` gives the order; JSON files here are
    written with sorted keys.

    Args:
        model: The full-width task network, with its groups.
        kept: Kept width per group (``kept_widths``).

    Returns:
        The entries by group name or module path, in network order.
    """
    modules = dict(model.named_modules())
    group_of = {w: g for g in model.groups for w in g.writers}
    out: dict[str, dict[str, Any]] = {}
    for name, module in modules.items():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        group = group_of.get(name)
        if group is not None and group.name in out:
            continue  # a further writer of a group already listed (residual stream)
        entry: dict[str, Any] = {"index": len(out)}
        if group is not None:
            label = f"{_shown(name)} ({_kind(module)})"
            tied = len(group.writers) - 1
            if tied:
                # Channels shared through additions (a residual stream) or a depthwise conv.
                label += f" + {tied} tied layer{'s' if tied > 1 else ''}"
                if group.name != name:
                    label = f"{_shown(group.name)}: {label}"
            entry |= {
                "label": label,
                "gated": True,
                "full": int(group.size),
                "kept": int(kept[group.name]),
                "layers": [_shown(w) for w in group.writers],
            }
            out[group.name] = entry
        else:
            width = int(
                module.out_features if isinstance(module, nn.Linear) else module.out_channels
            )
            entry |= {
                "label": f"{_shown(name)} ({_kind(module)})",
                "gated": False,
                "full": width,
                "kept": width,
                "why": model.ungated.get(name) or _why_ungated(model, name, module),
            }
            out[name] = entry
    return out


def _shown(name: str) -> str:
    """A module path as the user's network names it (without the wrapper's ``net.``)."""
    return name.removeprefix("net.")


def _kind(module: nn.Module) -> str:
    """What a layer is, briefly: ``linear``, ``conv 3×3``, ``depthwise conv 3×3, stride 2``."""
    if isinstance(module, nn.Linear):
        return "linear"
    assert isinstance(module, nn.Conv2d)
    kh, kw = module.kernel_size
    text = f"conv {kh}×{kw}"
    if module.groups > 1:
        depthwise = module.groups == module.in_channels == module.out_channels
        text = f"depthwise {text}" if depthwise else f"grouped {text}, {module.groups} groups"
    sh, sw = module.stride
    if (sh, sw) != (1, 1):
        text += f", stride {sh}" if sh == sw else f", stride {sh}×{sw}"
    return text


def _why_ungated(model: TaskNet, name: str, module: nn.Module) -> str:
    """Why a layer carries no gate."""
    if name == model.classifier_name:
        return "the classifier (one output per class)"
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        if not module.groups == module.in_channels == module.out_channels:
            return "a grouped convolution (its channel blocks must shrink together)"
        return "a depthwise convolution tied to channels that cannot be cut exactly"
    return (
        "its output channels are tied to a layer that cannot be cut exactly "
        "(a grouped convolution or the classifier)"
    )
