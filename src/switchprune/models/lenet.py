"""LeNet-5, Caffe variant (20-50-800-500): conv channels and the hidden neurons are gated."""

from __future__ import annotations

import torch
from torch import nn

from switchprune.models.base import Gate, GateGroup, ModelSpec, TaskNet, conv_out, max_pool2x2


def default_widths() -> dict[str, int]:
    """Group widths of LeNet-5-Caffe."""
    return {"conv1": 20, "conv2": 50, "fc1": 500}


class LeNet5(TaskNet):
    """``conv5-pool-conv5-pool-fc-relu-fc`` as in Caffe's LeNet (no ReLU after the convs).

    Inputs smaller than 28 pixels get padding 2 on both convs so the net still fits (8x8 digits).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        c, h, _ = spec.in_shape
        w = spec.widths
        pad = 0 if h >= 28 else 2
        self.conv1 = nn.Conv2d(c, w["conv1"], 5, padding=pad)
        self.gate1 = Gate("conv1")
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], 5, padding=pad)
        self.gate2 = Gate("conv2")
        side = conv_out(conv_out(conv_out(conv_out(h, 5, 1, pad), 2, 2), 5, 1, pad), 2, 2)
        self.fc1 = nn.Linear(w["conv2"] * side * side, w["fc1"])
        self.gate3 = Gate("fc1")
        self.classifier = nn.Linear(w["fc1"], spec.num_classes)
        self.groups = [
            GateGroup("conv1", w["conv1"], ("conv1",), (None,), ("conv2",)),
            GateGroup("conv2", w["conv2"], ("conv2",), (None,), ("fc1",)),
            GateGroup("fc1", w["fc1"], ("fc1",), (None,), ("classifier",)),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        x = max_pool2x2(self.gate1(self.conv1(x)))
        x = max_pool2x2(self.gate2(self.conv2(x)))
        x = torch.relu(self.gate3(self.fc1(x.flatten(1))))
        return self.classifier(x)
