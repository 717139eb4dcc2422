"""Multi-layer perceptron (LeNet-300-100 style): every hidden neuron is gated."""

from __future__ import annotations

import math

import torch
from torch import nn

from switchprune.models.base import Gate, GateGroup, ModelSpec, TaskNet


def default_widths(hidden: tuple[int, ...]) -> dict[str, int]:
    """Group widths of an MLP with the given hidden widths."""
    return {f"fc{i + 1}": int(w) for i, w in enumerate(hidden)}


class MLP(TaskNet):
    """``Linear -> gate -> ReLU`` per hidden layer, then an ungated classifier."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        names = sorted(spec.widths, key=lambda n: int(n[2:]))
        fan_in = math.prod(spec.in_shape)
        self.hidden_names = names
        for i, name in enumerate(names):
            width = spec.widths[name]
            self.add_module(name, nn.Linear(fan_in, width))
            self.add_module(f"gate{i + 1}", Gate(name))
            nxt = names[i + 1] if i + 1 < len(names) else "classifier"
            self.groups.append(GateGroup(name, width, (name,), (None,), (nxt,)))
            fan_in = width
        self.classifier = nn.Linear(fan_in, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of inputs."""
        x = x.flatten(1)
        for i, name in enumerate(self.hidden_names):
            x = torch.relu(getattr(self, f"gate{i + 1}")(getattr(self, name)(x)))
        return self.classifier(x)
