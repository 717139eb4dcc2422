"""Any network as a task network: gate groups found by Torch-Pruning's ``DependencyGraph``.

The hand-written networks place their gates in ``forward``. Here the network is the user's (or
torchvision's) and is left as it is: the dependency graph tells which output channels are tied
together (residual additions, depthwise convolutions that follow their input, concatenations),
and a gate is attached as a forward hook after each module that writes a group's channels: after
the BatchNorm that follows a convolution when there is one, otherwise after the layer itself.
Every module that writes a unit is followed by its gate, so a unit whose factor is zero is zero
wherever it flows, and removing it from every layer of the group is exact.

Groups rooted at the classifier's outputs are never gated, and neither are groups that pass
through a grouped (not depthwise) convolution, whose channel blocks must shrink together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from switchprune.errors import InputError
from switchprune.models.base import Gate, GateGroup, ModelSpec, TaskNet

# Layers whose parameters the cost model, the folding of factors and the surgery understand.
SUPPORTED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


class GraphError(InputError, ValueError):
    """A network the dependency graph or the pruning surgery cannot handle."""


class _GateHook:
    """Forward hook that passes a module's output through a gate (deep-copies with it)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def __call__(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return self.gate(output)


def check_supported(net: nn.Module) -> None:
    """Refuse layers with parameters that cannot be pruned exactly, naming the first one.

    Raises:
        GraphError: For a layer with its own parameters that is not a Conv2d, Linear or
            BatchNorm, or a convolution with dilation-free assumptions broken (not 2-D).
    """
    for name, m in net.named_modules():
        own = list(m.parameters(recurse=False))
        if own and not isinstance(m, SUPPORTED):
            raise GraphError(
                f"layer {name!r} ({type(m).__name__}) has parameters of a kind that cannot be "
                "pruned exactly (supported: Conv2d, Linear, BatchNorm1d/2d)"
            )
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and not m.affine:
            raise GraphError(f"layer {name!r}: BatchNorm without affine parameters")


def find_classifier(net: nn.Module, num_classes: int) -> str:
    """Name of the last Linear with ``num_classes`` outputs: its outputs are never gated."""
    found = [
        n
        for n, m in net.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]
    if not found:
        raise GraphError(
            f"the network has no nn.Linear with {num_classes} outputs to serve as its classifier"
        )
    return found[-1]


def _is_grouped(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and m.groups > 1
        and not (m.groups == m.in_channels == m.out_channels)
    )


def analyse(
    net: nn.Module, in_shape: tuple[int, ...], classifier: str
) -> tuple[list[GateGroup], dict[str, str]]:
    """The gate groups of ``net``, named after their first writer (module names inside ``net``).

    Args:
        net: The network, full width.
        in_shape: One input's shape ``(C, H, W)``.
        classifier: Name of the classifier layer (its outputs are not gated).

    Returns:
        One group per set of tied output channels, in network order; and the layers (other
        than the classifier) whose channels could not be gated, with the reason.

    Raises:
        GraphError: If the graph cannot be traced.
    """
    names = {m: n for n, m in net.named_modules()}
    modules = dict(net.named_modules())
    was_training = net.training
    try:
        net.eval()
        with torch.enable_grad():  # the graph is traced through autograd
            graph = tp.DependencyGraph().build_dependency(
                net, example_inputs=torch.zeros(1, *in_shape, device=_device(net))
            )
    except Exception as exc:  # tracing fails in assorted ways on unusual forward passes
        raise GraphError(f"cannot trace the network's dependency graph: {exc}") from exc
    finally:
        net.train(was_training)
    groups: list[GateGroup] = []
    ungated: dict[str, str] = {}
    for group in graph.get_all_groups(
        ignored_layers=[modules[classifier]], root_module_types=(nn.Conv2d, nn.Linear)
    ):
        parsed = _parse(group, names, graph)
        if isinstance(parsed, GateGroup):
            groups.append(parsed)
        else:
            for name in _out_layers(group, names, graph):
                ungated.setdefault(name, parsed)
    # Forward (definition) order, so that a group's position in the list means its depth.
    order = {n: i for i, n in enumerate(modules)}
    gated = {w for g in groups for w in g.writers}
    ungated = {n: ungated[n] for n in sorted(ungated, key=order.__getitem__) if n not in gated}
    ungated.pop(classifier, None)
    return sorted(groups, key=lambda g: order[g.writers[0]]), ungated


def _out_layers(group: Any, names: dict[nn.Module, str], graph: Any) -> list[str]:
    """The convolutions and Linear layers whose output channels a pruning group holds."""
    return [
        names[dep.target.module]
        for dep, _ in group
        if dep.target.module in names
        and isinstance(dep.target.module, nn.Conv2d | nn.Linear)
        and graph.is_out_channel_pruning_fn(dep.handler)
    ]


def _parse(group: Any, names: dict[nn.Module, str], graph: Any) -> GateGroup | str:
    """One pruning group as a :class:`GateGroup`, or why it must stay ungated."""
    writers: list[nn.Module] = []
    norms: list[nn.Module] = []
    readers: dict[str, list[int]] = {}
    size = None
    for dep, idxs in group:
        m = dep.target.module
        if m not in names:
            continue  # functional nodes (additions, reshapes) carry no parameters
        if _is_grouped(m):
            return f"its channels pass through the grouped convolution {names[m]!r}"
        out = graph.is_out_channel_pruning_fn(dep.handler)
        if out and isinstance(m, nn.Conv2d | nn.Linear):
            if size is None:
                size = len(idxs)
            if sorted(idxs) != list(range(size)):
                # Not a plain tie: e.g. a layer called twice, on channels of other layers.
                return f"layer {names[m]!r} writes the channels out of order (used twice?)"
            if m not in writers:
                writers.append(m)
        elif out and isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            if m not in norms:
                norms.append(m)
        elif not out and isinstance(m, nn.Conv2d | nn.Linear):
            readers.setdefault(names[m], list(idxs))
    if size is None or not writers:
        return "no layer writes its channels"
    order = {m: i for i, m in enumerate(names)}
    writers.sort(key=order.__getitem__)
    paired: dict[nn.Module, nn.Module] = {}
    for bn in norms:
        sources = [i.module for i in graph.module2node[bn].inputs]
        for w in writers:
            if w in sources and w not in paired:
                paired[w] = bn
                break
    standalone = tuple(names[bn] for bn in norms if bn not in paired.values())
    return GateGroup(
        name=names[writers[0]],
        size=size,
        writers=tuple(names[w] for w in writers),
        norms=tuple(names[paired[w]] if w in paired else None for w in writers),
        readers=tuple(readers),
        spans=tuple(_span(idxs, size, r) for r, idxs in readers.items()),
        extra_gates=standalone,
    )


def _span(idxs: list[int], size: int, reader: str) -> tuple[int, int]:
    """``(start, per_unit)``: the reader's inputs from the group, unit by unit, contiguous.

    ``per_unit`` is above one for a Linear after a flatten (each channel's positions).
    """
    lo, n = min(idxs), len(idxs)
    if sorted(idxs) != list(range(lo, lo + n)) or n % size:
        raise GraphError(f"layer {reader!r} reads a group's channels out of order")
    return lo, n // size


def _device(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class GraphNet(TaskNet):
    """A task network around any ``nn.Module``: gates are forward hooks on its layers.

    Args:
        spec: The spec; ``spec.widths`` are the widths of the groups of ``net``.
        net: The network itself (its ``state_dict`` keys are prefixed with ``net.``).
        classifier: Name of the classifier inside ``net``.
    """

    def __init__(self, spec: ModelSpec, net: nn.Module, classifier: str) -> None:
        super().__init__(spec)
        self.net = net
        self.classifier_name = f"net.{classifier}"
        self._classifier = classifier
        self.attach()

    def attach(self) -> None:
        """(Re)find the groups on the current widths and hook one gate after each writer."""
        # Hooks are found by type, not by stored handles: a deep copy's handles would still
        # point at the original's hook tables.
        for m in self.net.modules():
            for key in [k for k, h in m._forward_hooks.items() if isinstance(h, _GateHook)]:
                del m._forward_hooks[key]
        self.__dict__.pop("_gates", None)
        if "gate_list" in self._modules:
            del self._modules["gate_list"]
        groups, ungated = analyse(self.net, self.spec.in_shape, self._classifier)
        # Layers left whole and why, by their name in this module (reported, never silent).
        self.ungated = {f"net.{name}": why for name, why in ungated.items()}
        modules = dict(self.net.named_modules())
        gates = []
        self.groups = []
        for g in groups:
            g = _prefixed(g)
            self.groups.append(g)
            targets = [n or w for w, n in zip(g.writers, g.norms, strict=True)]
            for target in [*targets, *g.extra_gates]:
                gate = Gate(g.name)
                gates.append(gate)
                modules[target.removeprefix("net.")].register_forward_hook(_GateHook(gate))
        self.gate_list = nn.ModuleList(gates)

    @property
    def classifier(self) -> nn.Module:
        """The classifier layer (never gated)."""
        return self.get_submodule(self.classifier_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped network (gated by the hooks)."""
        return self.net(x)


def _prefixed(g: GateGroup) -> GateGroup:
    """A group of ``net``'s modules renamed as modules of the wrapping :class:`GraphNet`."""

    def p(name: str | None) -> str | None:
        return None if name is None else f"net.{name}"

    return GateGroup(
        name=f"net.{g.name}",
        size=g.size,
        writers=tuple(f"net.{w}" for w in g.writers),
        norms=tuple(p(n) for n in g.norms),
        readers=tuple(f"net.{r}" for r in g.readers),
        spans=g.spans,
        extra_gates=tuple(f"net.{e}" for e in g.extra_gates),
    )


def remove_units(model: GraphNet, kept: dict[str, list[int]]) -> None:
    """Remove every unit not in ``kept`` from every layer of its group, then re-hook the gates.

    Raises:
        GraphError: If ``kept`` names unknown groups or indices out of range.
    """
    sizes = model.group_sizes()
    if set(kept) != set(sizes):
        raise GraphError(
            f"kept indices name groups {sorted(set(kept) ^ set(sizes))[:3]} that the network "
            "does not have"
        )
    for name, idx in kept.items():
        if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= sizes[name]:
            raise GraphError(f"kept indices of group {name!r} are not distinct units of it")
    was_training = model.training
    model.eval()
    model.set_factors(None)
    cut_units(model, kept)
    model.train(was_training)
    # The groups keep their structure (re-tracing could split a depthwise conv cut to one
    # channel from its group): only sizes and the readers' spans change.
    model.groups = _shrunk(model.groups, {k: sorted(v) for k, v in kept.items()})
    model.__dict__.pop("_gates", None)


def cut_units(model: TaskNet, kept: Mapping[str, Iterable[int]]) -> None:
    """Remove, in place, every unit not in ``kept`` from every layer that touches it.

    Torch-Pruning's ``DependencyGraph`` does the surgery: each group's first writer is pruned,
    and the graph carries the removal through norms, additions, concatenations and flattening
    to every coupled layer. The groups themselves are left for the caller to update.
    """
    with torch.enable_grad():  # the graph is traced through autograd
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.zeros(1, *model.spec.in_shape, device=_device(model))
        )
    modules = dict(model.named_modules())
    for g in model.groups:
        keep = {int(i) for i in kept[g.name]}
        removed = [i for i in range(g.size) if i not in keep]
        if not removed:
            continue
        writer = modules[g.writers[0]]
        fn = (
            tp.prune_conv_out_channels
            if isinstance(writer, nn.Conv2d)
            else tp.prune_linear_out_channels
        )
        graph.get_pruning_group(writer, fn, idxs=removed).prune()


def _shrunk(groups: list[GateGroup], kept: dict[str, list[int]]) -> list[GateGroup]:
    """The groups after removing units: a reader's span moves down by what was cut before it."""
    reads: dict[str, list[tuple[int, int, str]]] = {}
    for g in groups:
        for reader, (start, per_unit) in zip(g.readers, g.spans, strict=True):
            reads.setdefault(reader, []).append((start, per_unit, g.name))
    sizes = {g.name: g.size for g in groups}
    out = []
    for g in groups:
        spans = []
        for reader, (start, per_unit) in zip(g.readers, g.spans, strict=True):
            cut = sum(
                (sizes[other] - len(kept[other])) * per
                for begin, per, other in reads[reader]
                if begin < start
            )
            spans.append((start - cut, per_unit))
        out.append(dataclasses.replace(g, size=len(kept[g.name]), spans=tuple(spans)))
    return out
