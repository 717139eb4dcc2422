"""CIFAR-style VGG with BatchNorm: every conv channel is gated (after BN, before ReLU)."""

from __future__ import annotations

import torch
from torch import nn

from switchprune.models.base import Gate, GateGroup, ModelSpec, TaskNet, max_pool2x2, scaled

LAYOUTS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
}


def default_widths(arch: str, multiplier: float) -> dict[str, int]:
    """Group widths of a VGG, scaled by ``multiplier``."""
    convs = [v for v in LAYOUTS[arch] if v != "M"]
    return {f"conv{i + 1}": scaled(int(v), multiplier) for i, v in enumerate(convs)}


class VGG(TaskNet):
    """``conv3-BN-gate-ReLU`` blocks with max-pooling, then one linear classifier.

    A pooling step is skipped once the feature map is 1x1, so small inputs (8x8) fit.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        c, side, _ = spec.in_shape
        self.plan: list[str] = []
        index = 0
        for item in LAYOUTS[spec.arch]:
            if item == "M":
                if side > 1:
                    self.plan.append("M")
                    side //= 2
                continue
            index += 1
            name = f"conv{index}"
            width = spec.widths[name]
            self.add_module(name, nn.Conv2d(c, width, 3, padding=1, bias=False))
            self.add_module(f"bn{index}", nn.BatchNorm2d(width))
            self.add_module(f"gate{index}", Gate(name))
            self.plan.append(str(index))
            c = width
        self.classifier = nn.Linear(c * side * side, spec.num_classes)
        for i in range(1, index + 1):
            reader = f"conv{i + 1}" if i < index else "classifier"
            self.groups.append(
                GateGroup(
                    f"conv{i}", spec.widths[f"conv{i}"], (f"conv{i}",), (f"bn{i}",), (reader,)
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        for step in self.plan:
            if step == "M":
                x = max_pool2x2(x)
            else:
                conv, bn, gate = (getattr(self, f"{p}{step}") for p in ("conv", "bn", "gate"))
                x = torch.relu(gate(bn(conv(x))))
        return self.classifier(x.flatten(1))
