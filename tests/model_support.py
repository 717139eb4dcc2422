"""Architectures the model tests run on, their input shapes, and tiny networks of each."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from switchprune.config import TORCHVISION_ARCHS, ModelConfig
from switchprune.models import TaskNet, build_model, spec_from_config
from switchprune.models.zoo import build_graph_model

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


NUM_CLASSES = 5


def model_config(arch: str) -> ModelConfig:
    """A CPU-sized configuration of ``arch``."""
    if arch == "mlp":
        return ModelConfig(arch="mlp", hidden=(24, 16))
    if arch in ("lenet5", USER_ARCH):
        return ModelConfig(arch=arch)
    return ModelConfig(arch=arch, width_multiplier=0.25)  # type: ignore[arg-type]


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm random running statistics and affine parameters (not identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.add_(0.2 * torch.randn(n, generator=generator))
                m.running_var.mul_(0.8 + 0.4 * torch.rand(n, generator=generator))
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.2 * torch.randn(n, generator=generator))


_TINY: dict[tuple[str, int], TaskNet] = {}


def make_tiny_net(arch: str, seed: int = 0) -> TaskNet:
    """A fresh copy of :func:`build_tiny_net` (built once per session: graph analysis of the
    torchvision networks takes a noticeable fraction of a second)."""
    if (arch, seed) not in _TINY:
        _TINY[(arch, seed)] = build_tiny_net(arch, seed)
    return copy.deepcopy(_TINY[(arch, seed)])


def build_tiny_net(arch: str, seed: int = 0) -> TaskNet:
    """A full-width, eval-mode network of ``arch`` whose logits depend on its input.

    Weights get He initialisation and the BatchNorm statistics are first calibrated on a random
    batch, so the signal neither vanishes nor explodes through 13 or 55 layers; then every
    BatchNorm gets random affine parameters and perturbed running statistics.
    """
    torch.manual_seed(seed)
    spec = spec_from_config(model_config(arch), IN_SHAPES[arch], NUM_CLASSES)
    if arch in TORCHVISION_ARCHS:
        # Every weight is drawn below: skip torchvision's initialisation, which is drawn at full
        # width before the network is cut to its quarter widths.
        model = build_graph_model(spec, initialise=False)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()  # BatchNorm's statistics, and any other layer's defaults
    else:
        model = build_model(spec)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration pass
        model.train()
        model(torch.randn(64, *spec.in_shape, generator=g))
    randomize_batchnorm(model, g)
    with torch.no_grad():
        # Keep logits O(1) so float32 rounding stays far below the 1e-5 comparisons: a plain
        # 1/sqrt(fan_in) classifier, and residual branches that add less than the full variance.
        w = dict(model.named_modules())[model.classifier_name].weight
        w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
        for name, m in model.named_modules():
            if name.endswith(("bn2", "bn3", "shortcut_bn", "downsample.1")) and "resnet" in arch:
                m.weight.mul_(0.4)
    return model.eval()
