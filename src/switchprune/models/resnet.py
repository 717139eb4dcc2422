"""CIFAR-style ResNet (basic blocks, He et al. 2016): residual channels share one gate per stage.

Every module that writes into a stage's residual stream (the stem, each block's second BN, the
projection shortcut) multiplies by the stage's shared factors, so a unit switched off in the
stream is zero everywhere in that stage and can be removed from every layer that touches it.
"""

from __future__ import annotations

import torch
from torch import nn

from switchprune.models.base import Gate, GateGroup, ModelSpec, TaskNet, scaled

DEPTHS = {"resnet20": 20, "resnet56": 56}


def blocks_per_stage(arch: str) -> int:
    """Basic blocks per stage: ``(depth - 2) / 6``."""
    return (DEPTHS[arch] - 2) // 6


def default_widths(arch: str, multiplier: float) -> dict[str, int]:
    """Group widths: three residual streams and the inner channels of every block."""
    widths: dict[str, int] = {}
    for s, base in enumerate((16, 32, 64), start=1):
        widths[f"stage{s}"] = scaled(base, multiplier)
        for b in range(blocks_per_stage(arch)):
            widths[f"s{s}b{b}"] = scaled(base, multiplier)
    return widths


class BasicBlock(nn.Module):
    """``conv-BN-gate-ReLU-conv-BN-gate`` plus a shortcut (1x1 projection when shapes change)."""

    def __init__(
        self, cin: int, inner: int, cout: int, stride: int, inner_group: str, stream: str
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.gate1 = Gate(inner_group)
        self.conv2 = nn.Conv2d(inner, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.gate2 = Gate(stream)
        self.projection = stride != 1
        if self.projection:
            self.shortcut_conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(cout)
            self.shortcut_gate = Gate(stream)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        out = torch.relu(self.gate1(self.bn1(self.conv1(x))))
        out = self.gate2(self.bn2(self.conv2(out)))
        if self.projection:
            x = self.shortcut_gate(self.shortcut_bn(self.shortcut_conv(x)))
        return torch.relu(out + x)


class ResNet(TaskNet):
    """Stem, three stages of basic blocks (stride 1, 2, 2), global average pooling, classifier."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        w = spec.widths
        n = blocks_per_stage(spec.arch)
        self.conv = nn.Conv2d(spec.in_shape[0], w["stage1"], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(w["stage1"])
        self.gate = Gate("stage1")
        writers: dict[str, list[tuple[str, str]]] = {"stage1": [("conv", "bn")]}
        readers: dict[str, list[str]] = {}
        cin = w["stage1"]
        for s in (1, 2, 3):
            stream = f"stage{s}"
            writers.setdefault(stream, [])
            blocks = []
            for b in range(n):
                inner = f"s{s}b{b}"
                stride = 2 if (s > 1 and b == 0) else 1
                blocks.append(BasicBlock(cin, w[inner], w[stream], stride, inner, stream))
                prefix = f"stage{s}.{b}"
                # The block's input stream is read by conv1 and, at stage entry, the projection.
                in_stream = stream if stride == 1 else f"stage{s - 1}"
                readers.setdefault(in_stream, []).append(f"{prefix}.conv1")
                if stride != 1:
                    readers[in_stream].append(f"{prefix}.shortcut_conv")
                    writers[stream].append((f"{prefix}.shortcut_conv", f"{prefix}.shortcut_bn"))
                writers[stream].append((f"{prefix}.conv2", f"{prefix}.bn2"))
                self.groups.append(
                    GateGroup(
                        inner,
                        w[inner],
                        (f"{prefix}.conv1",),
                        (f"{prefix}.bn1",),
                        (f"{prefix}.conv2",),
                    )
                )
                cin = w[stream]
            self.add_module(stream, nn.Sequential(*blocks))
        self.classifier = nn.Linear(cin, spec.num_classes)
        readers.setdefault("stage3", []).append("classifier")
        for s in (1, 2, 3):
            stream = f"stage{s}"
            self.groups.append(
                GateGroup(
                    stream,
                    w[stream],
                    tuple(c for c, _ in writers[stream]),
                    tuple(b for _, b in writers[stream]),
                    tuple(readers[stream]),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        x = torch.relu(self.gate(self.bn(self.conv(x))))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.classifier(x.mean(dim=(2, 3)))
