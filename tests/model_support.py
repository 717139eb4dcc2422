"""Architectures the model tests run on, with their input shapes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

# Small inputs keep every architecture well under a second on a CPU. 8x8 digits for the plain
# nets (LeNet pads its convs and keeps a 2x2 map before flattening), 16x16 RGB for the conv nets.
IN_SHAPES: dict[str, tuple[int, int, int]] = {
    "mlp": (1, 8, 8),
    "lenet5": (1, 8, 8),
    "vgg11": (3, 16, 16),
    "vgg16": (3, 16, 16),
    "resnet20": (3, 16, 16),
    "resnet56": (3, 16, 16),
    # torchvision's, through the dependency graph (small-image stems at 16 px).
    "resnet18": (3, 16, 16),
    "resnet34": (3, 16, 16),
    "resnet50": (3, 16, 16),
    "mobilenet_v2": (3, 16, 16),
    "mobilenet_v3_small": (3, 16, 16),
    "vgg11_bn": (3, 16, 16),
    "vgg16_bn": (3, 16, 16),
}
# The user's own network, given by file: a residual addition around a depthwise convolution.
USER_ARCH = f"{Path(__file__).parent / 'models' / 'user_net.py'}:build"
IN_SHAPES[USER_ARCH] = (3, 16, 16)
TEST_ARCHS = tuple(IN_SHAPES)
# Where the architecture is not the subject (compaction equivalence and model structure run on
# every one): the MLP, a BatchNorm conv net through the dependency graph, a residual net, and
# the user's own file (concatenation, grouped and depthwise convs).
REPRESENTATIVE_ARCHS = ("mlp", "vgg11_bn", "resnet20", USER_ARCH)
# Every architecture, those beyond the representatives marked ``slow``: ``make test`` runs them
# all, ``make test-fast`` the representatives.
ALL_ARCH_PARAMS = [
    pytest.param(a, marks=() if a in REPRESENTATIVE_ARCHS else pytest.mark.slow) for a in TEST_ARCHS
]


def flop_timer(runs: Mapping[str, Callable[[], object]]) -> dict[str, float]:
    """A scripted device for latency tables: a forward pass takes its MFLOPs in ms."""
    out = {}
    for name, run in runs.items():
        with FlopCounterMode(display=False) as counter:
            run()
        out[name] = counter.get_total_flops() / 1e6
    return out
