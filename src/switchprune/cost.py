"""Exact parameter and MAC counts of a task network as functions of its group widths.

Every Conv2d/Linear/BatchNorm contributes a term ``coef * W(in) * W(out)`` where ``W`` is a
group width (or 1 for a dimension no gate touches). Evaluating the terms at kept widths gives the
exact size of the compacted network without building it, which the training controller needs at
every switcher step; evaluated on soft widths it is differentiable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from switchprune.latency import LatencyModel, Layer
from switchprune.models.base import TaskNet

Widths = Mapping[str, float | int | torch.Tensor]


@dataclass(frozen=True)
class Term:
    """``coef * W(in_group) * W(out_group)``; a ``None`` group contributes a factor of 1."""

    coef: float
    in_group: str | None
    out_group: str | None


class CostModel:
    """Parameter and MAC polynomials of one architecture, read off a full-width instance."""

    def __init__(self, model: TaskNet) -> None:
        self.full = model.group_sizes()
        modules = dict(model.named_modules())
        out_group: dict[str, str] = {}
        # Per reader: (group, units' inputs each) for every group it reads.
        in_parts: dict[str, list[tuple[str, int]]] = {}
        for g in model.groups:
            for writer, norm in zip(g.writers, g.norms, strict=True):
                out_group[writer] = g.name
                if norm is not None:
                    out_group[norm] = g.name
            for extra in g.extra_gates:
                out_group[extra] = g.name
            for i, reader in enumerate(g.readers):
                per_unit = g.spans[i][1] if g.spans else _inputs(modules[reader]) // g.size
                in_parts.setdefault(reader, []).append((g.name, per_unit))
        shapes = _conv_shapes(model)
        spatial = {name: s[0] for name, s in shapes.items()}
        self.params_terms: list[Term] = []
        self.macs_terms: list[Term] = []
        self.layers: list[Layer] = []  # what the latency model times
        self.latency: LatencyModel | None = None
        for name, m in modules.items():
            og = out_group.get(name)
            if isinstance(m, nn.Conv2d | nn.Linear):
                cout = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                per_out = 1 if og else cout
                kernel = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1
                groups = m.groups if isinstance(m, nn.Conv2d) else 1
                positions = spatial.get(name, 1)
                parts = in_parts.get(name, [])
                if groups > 1:
                    # Each output reads in/groups inputs; a depthwise conv shrinks with its
                    # group (one input per output), a grouped one is never gated.
                    parts, fixed_in = [], _inputs(m) // groups
                else:
                    fixed_in = _inputs(m) - sum(p * self.full[ig] for ig, p in parts)
                for ig, per_in in parts:
                    w = kernel * per_in * per_out
                    self.params_terms.append(Term(float(w), ig, og))
                    self.macs_terms.append(Term(float(w * positions), ig, og))
                if fixed_in:
                    w = kernel * fixed_in * per_out
                    self.params_terms.append(Term(float(w), None, og))
                    self.macs_terms.append(Term(float(w * positions), None, og))
                if m.bias is not None:
                    self.params_terms.append(Term(float(per_out), None, og))
                self.layers.append(_layer(name, m, parts, fixed_in, og, shapes.get(name)))
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.affine:
                self.params_terms.append(Term(2.0 if og else 2.0 * m.num_features, None, og))

    @staticmethod
    def _evaluate(terms: list[Term], widths: Widths) -> float | torch.Tensor:
        total: float | torch.Tensor = 0.0
        for t in terms:
            a = widths[t.in_group] if t.in_group else 1
            b = widths[t.out_group] if t.out_group else 1
            total = total + t.coef * a * b
        return total

    def params(self, widths: Widths | None = None) -> float | torch.Tensor:
        """Number of parameters at the given widths (full widths by default)."""
        return self._evaluate(self.params_terms, self.full if widths is None else widths)

    def macs(self, widths: Widths | None = None) -> float | torch.Tensor:
        """Multiply-accumulates of one sample's forward pass at the given widths."""
        return self._evaluate(self.macs_terms, self.full if widths is None else widths)

    def cost(self, metric: str, widths: Widths | None = None) -> float | torch.Tensor:
        """``params``, ``macs`` or predicted ``latency`` (ms) at the given widths."""
        if metric == "latency":
            return self._latency()(widths)
        return self.params(widths) if metric == "params" else self.macs(widths)

    def _latency(self) -> LatencyModel:
        if self.latency is None:
            raise ValueError("no latency model: measure one first (switchprune.latency.measure)")
        return self.latency

    def marginal(self, metric: str, widths: Widths) -> dict[str, float]:
        """Cost of one more unit in each group, at the given widths."""
        if metric == "latency":
            return self._latency().marginal(widths)
        terms = self.params_terms if metric == "params" else self.macs_terms
        out = dict.fromkeys(self.full, 0.0)
        for t in terms:
            if t.in_group:
                out[t.in_group] += t.coef * float(widths[t.out_group] if t.out_group else 1)
            if t.out_group:
                out[t.out_group] += t.coef * float(widths[t.in_group] if t.in_group else 1)
        return out


def _inputs(m: nn.Module) -> int:
    return int(m.in_channels if isinstance(m, nn.Conv2d) else m.in_features)


def _layer(
    name: str,
    m: nn.Conv2d | nn.Linear,
    parts: list[tuple[str, int]],
    fixed_in: int,
    out_group: str | None,
    shape: tuple[int, int, int] | None,
) -> Layer:
    """The latency model's view of one layer: its widths' groups and its geometry."""
    bias = int(m.bias is not None)
    if isinstance(m, nn.Linear):
        geometry: tuple[int | str, ...] = ("linear", bias)
        cin, cout, depthwise = m.in_features, m.out_features, False
    else:
        height, width = shape[1:] if shape is not None else (1, 1)
        cin, cout = m.in_channels, m.out_channels
        depthwise = m.groups > 1 and m.groups == cin == cout and out_group is not None
        # A depthwise conv's groups follow its width (0); a grouped one is never gated.
        groups = 0 if depthwise else m.groups
        geometry = ("conv", *m.kernel_size, *m.stride, *m.padding, *m.dilation)  # type: ignore[misc]
        geometry = (*geometry, bias, height, width, groups)
    positions = shape[0] if shape is not None and isinstance(m, nn.Conv2d) else 1
    return Layer(name, tuple(parts), fixed_in, out_group, cin, cout, depthwise, geometry, positions)


def _conv_shapes(model: TaskNet) -> dict[str, tuple[int, int, int]]:
    """Per conv, by module name: output positions (H*W), input height and width, one sample."""
    sizes: dict[str, tuple[int, int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):

            def hook(
                _m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name
            ) -> None:
                x = inp[0]
                sizes[name] = (int(out.shape[2] * out.shape[3]), int(x.shape[2]), int(x.shape[3]))

            hooks.append(m.register_forward_hook(hook))
    try:
        param = next(model.parameters())
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(torch.zeros(1, *model.spec.in_shape, device=param.device))
            model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return sizes
