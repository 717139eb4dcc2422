"""Networks of a user's own, given to switchprune as ``path/to/user_net.py:build``."""

import torch
from torch import nn


class Block(nn.Module):
    """Depthwise then pointwise conv, added to the input (a residual around a depthwise conv)."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.pw(torch.relu(self.bn1(self.dw(x))))))


class Net(nn.Module):
    """Stem, one residual depthwise block, a strided conv, a hidden Linear and the classifier."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.block = Block(16)
        self.expand = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.head = nn.Linear(24 * 4 * 4, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.block(torch.relu(self.bn(self.stem(x))))
        x = torch.relu(self.expand(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc(torch.relu(self.head(x)))


def build(num_classes: int, in_channels: int) -> nn.Module:
    """The default builder."""
    return Net(num_classes, in_channels)


class Branches(nn.Module):
    """Two branches concatenated, read by one conv, then flattened into a Linear."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(in_channels, 10, 1)
        self.mix = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.relu(self.bn_a(self.a(x))), torch.relu(self.b(x))], dim=1)
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.mix(x)), 4)
        return self.fc(x.flatten(1))


def build_branches(num_classes: int, in_channels: int) -> nn.Module:
    """Concatenation and a flattening classifier."""
    return Branches(num_classes, in_channels)


class WithLayerNorm(nn.Module):
    """A layer kind whose parameters cannot be pruned exactly."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).mean(dim=(2, 3)))


def build_with_groupnorm(num_classes: int, in_channels: int) -> nn.Module:
    """Refused: GroupNorm."""
    return WithLayerNorm(num_classes, in_channels)


def build_not_a_module(num_classes: int, in_channels: int) -> object:
    """Refused: not an nn.Module."""
    return [num_classes, in_channels]


def build_no_classifier(num_classes: int, in_channels: int) -> nn.Module:
    """Refused: the logits come from a convolution, not from a Linear classifier."""
    return nn.Sequential(
        nn.Conv2d(in_channels, num_classes, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


class Mixed(nn.Module):
    """Two branches concatenated, a grouped conv in a residual block, a hidden Linear."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(in_channels, 8, 1)
        self.bn_b = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn_g = nn.BatchNorm2d(16)
        self.head = nn.Linear(16 * 2 * 2, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.relu(self.bn_a(self.a(x))), torch.relu(self.bn_b(self.b(x)))], 1)
        x = torch.relu(x + self.bn_g(self.grouped(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.fc(torch.relu(self.head(x)))


def build_mixed(num_classes: int, in_channels: int) -> nn.Module:
    """Concatenation + grouped conv + residual: the shapes a user's own network has."""
    return Mixed(num_classes, in_channels)
