"""Building blocks shared by every task network: gates, gate groups and the model spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a task network: stored next to its ``state_dict``.

    Attributes:
        arch: Architecture name (``mlp``, ``lenet5``, ``vgg11``, ...).
        in_shape: Input shape ``(C, H, W)``.
        num_classes: Number of classifier outputs (never pruned).
        widths: Width of every gate group, by group name. Compaction only changes these.
        options: Build options of graph-analysed networks (``small_input``).
        kept: Graph-analysed networks only: the units each group keeps, as indices into the
            full-width network. They are rebuilt full width, then cut to these units.
        source_sha256: For a network built by the user's own code, the SHA-256 of the file
            that defines it: a changed file is refused instead of loaded into.
        source_package: For a ``package.module:build`` network, the distribution and version
            that provided the module (``name==version``), named when it is missing.
    """

    arch: str
    in_shape: tuple[int, int, int]
    num_classes: int
    widths: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, tuple[int, ...]] = field(default_factory=dict)
    source_sha256: str = ""
    source_package: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON/``weights_only``-safe mapping (optional fields only when set)."""
        out: dict[str, Any] = {
            "arch": self.arch,
            "in_shape": list(self.in_shape),
            "num_classes": int(self.num_classes),
            "widths": {k: int(v) for k, v in self.widths.items()},
        }
        if self.options:
            out["options"] = dict(self.options)
        if self.kept:
            out["kept"] = {k: [int(i) for i in v] for k, v in self.kept.items()}
        if self.source_sha256:
            out["source_sha256"] = self.source_sha256
        if self.source_package:
            out["source_package"] = self.source_package
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            arch=str(data["arch"]),
            in_shape=tuple(int(v) for v in data["in_shape"]),  # type: ignore[arg-type]
            num_classes=int(data["num_classes"]),
            widths={str(k): int(v) for k, v in data["widths"].items()},
            options=dict(data.get("options", {})),
            kept={str(k): tuple(int(i) for i in v) for k, v in data.get("kept", {}).items()},
            source_sha256=str(data.get("source_sha256", "")),
            source_package=str(data.get("source_package", "")),
        )

    def with_widths(
        self, widths: dict[str, int], kept: dict[str, tuple[int, ...]] | None = None
    ) -> ModelSpec:
        """Return a copy with other group widths (and, for graph networks, the kept units)."""
        return ModelSpec(
            self.arch,
            self.in_shape,
            self.num_classes,
            dict(widths),
            dict(self.options),
            dict(kept) if kept is not None else dict(self.kept),
            self.source_sha256,
            self.source_package,
        )


@dataclass(frozen=True)
class GateGroup:
    """A set of units that share one factor each, and the layers that touch them.

    A plain layer is a group of its own; channels tied by residual additions form one group
    with several writers.

    Attributes:
        name: Group name (also the key in :attr:`ModelSpec.widths`).
        size: Number of units.
        writers: Names of the Conv2d/Linear modules whose output channels are the units.
        norms: For each writer, the BatchNorm that follows it, or ``None``.
        readers: Names of the Conv2d/Linear modules whose inputs consume the units.
        spans: For each reader, ``(start, per_unit)``: its input channels
            ``start .. start + size * per_unit`` are the units, ``per_unit`` each (a Linear
            after a flatten reads every position of a channel). Empty: every reader reads
            only the group, ``in / size`` inputs per unit.
        extra_gates: BatchNorms that read the units without following a writer (after an
            addition or a concatenation); a gate follows each of them too.
    """

    name: str
    size: int
    writers: tuple[str, ...]
    norms: tuple[str | None, ...]
    readers: tuple[str, ...]
    spans: tuple[tuple[int, int], ...] = ()
    extra_gates: tuple[str, ...] = ()


class Gate(nn.Module):
    """Multiplies each unit (channel dim 1) by its factor; identity when no factors are set.

    Factors are plain tensors attached by :meth:`TaskNet.set_factors`, not parameters, so the
    switcher's graph reaches them in SNN steps and they can be detached in TNN steps.
    """

    def __init__(self, group: str) -> None:
        super().__init__()
        self.group = group
        self.factors: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale the units of ``x`` by the attached factors."""
        if self.factors is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.factors.view(shape)

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"group={self.group!r}"


class TaskNet(nn.Module):
    """Base class of task networks: gate bookkeeping on top of ``nn.Module``.

    Subclasses build their layers from a :class:`ModelSpec` and fill :attr:`groups`.
    """

    classifier_name: str = "classifier"

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.groups: list[GateGroup] = []
        # Layers (other than the classifier) left without a gate, and why.
        self.ungated: dict[str, str] = {}

    def gates(self) -> list[Gate]:
        """All gate modules, in forward order."""
        # Looked up once: factors are set twice per training step, and walking the module
        # tree each time is a noticeable share of a small network's step.
        found = self.__dict__.get("_gates")
        if found is None:
            found = [m for m in self.modules() if isinstance(m, Gate)]
            self.__dict__["_gates"] = found
        return found

    def set_factors(self, factors: dict[str, torch.Tensor] | None) -> None:
        """Attach one factor vector per group (``None`` removes all gates' effect)."""
        for gate in self.gates():
            gate.factors = None if factors is None else factors[gate.group]

    def group_sizes(self) -> dict[str, int]:
        """Width of every gate group."""
        return {g.name: g.size for g in self.groups}


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial output size of a convolution or pooling window."""
    return (size + 2 * padding - kernel) // stride + 1


def scaled(width: int, multiplier: float) -> int:
    """Scale a nominal width, never below one unit."""
    return max(1, int(round(width * multiplier)))


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(x, 2)`` (stride 2, odd edges dropped) as the maximum of four strided views.

    Same values as ``nn.functional.max_pool2d``, but on CPU several times faster for
    channels-first tensors, whose pooling kernel also computes the argmax indices. Pooling
    time grows with a layer's width but not with its MACs, so a slow pooling kernel would hide
    much of what removing channels saves.
    """
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
    bottom = torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2])
    return torch.maximum(top, bottom)
