"""Shared fixtures: tiny task networks with non-trivial BatchNorm and random gate factors."""

from __future__ import annotations

import copy
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from switchprune.config import ModelConfig
from switchprune.models import TaskNet, build_model, spec_from_config

# No analytics or telemetry calls from the tools the tests run (the network is closed anyway).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# One torch thread per process, in the workers and in every tool they start: the suite runs a
# worker per core, and oversubscribed OpenMP threads spin (tiny ops get many times slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

NUM_CLASSES = 5

from model_support import IN_SHAPES, USER_ARCH  # noqa: E402  (tests/ is on sys.path)


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


def make_random_factors(
    model: TaskNet, seed: int = 0, sparse_group: str | None = None
) -> dict[str, torch.Tensor]:
    """Non-negative factors in [0.5, 1.5) with exact zeros in every group.

    Every group gets at least one exact zero (and keeps at least one unit); ``sparse_group``
    (default: the middle group) has all but one unit at exactly zero.
    """
    g = torch.Generator().manual_seed(seed)
    names = [grp.name for grp in model.groups]
    sparse = sparse_group if sparse_group is not None else names[len(names) // 2]
    assert sparse in names
    factors: dict[str, torch.Tensor] = {}
    for grp in model.groups:
        n = grp.size
        assert n >= 2, f"group {grp.name} too small to hold both zeros and kept units"
        f = 0.5 + torch.rand(n, generator=g)
        order = torch.randperm(n, generator=g)
        n_zero = n - 1 if grp.name == sparse else max(1, min(n - 1, n // 3))
        f[order[:n_zero]] = 0.0
        factors[grp.name] = f
    return factors


@pytest.fixture
def tiny_net() -> Callable[..., TaskNet]:
    """Factory: ``tiny_net(arch, seed=0)``."""
    return make_tiny_net


@pytest.fixture
def random_factors() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory: ``random_factors(model, seed=0, sparse_group=None)``."""
    return make_random_factors


@pytest.fixture
def in_shapes() -> dict[str, tuple[int, int, int]]:
    """Input shape used for each architecture."""
    return dict(IN_SHAPES)


@pytest.fixture
def single_thread():
    """Run torch single-threaded: tiny tensors gain nothing from threads, and on a busy 2-core
    machine OpenMP's spinning threads make tiny ops orders of magnitude slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The keys that reports/evaluate.json must hold, spelled exactly so (the core issue's contract).
EVALUATE_REPORT_KEYS = {
    "test_accuracy",
    "gated_accuracy",
    "baseline_accuracy",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
    "max_abs_logit_diff",
    "latency_ms_before_b1",
    "latency_ms_after_b1",
    "latency_ms_before_b256",
    "latency_ms_after_b256",
}


@pytest.fixture
def report_keys() -> set[str]:
    """The keys every evaluation report must hold."""
    return set(EVALUATE_REPORT_KEYS)


@pytest.fixture(scope="session")
def project_files() -> list[str]:
    """The project's files, relative to its root: committed, staged or new but not ignored."""
    return subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


# Folders whose every test runs real tools, servers or training chains: the ``slow`` tier.
# ``make test-fast`` (``-m "not slow"``) is the unit tests alone.
SLOW_FOLDERS = ("stages", "integration", "pipeline", "bench")
# Unit modules that run stages, an MLflow store or an S3 stand-in: slow too.
SLOW_MODULES = (
    "test_cli.py",
    "test_contract.py",
    "test_registry.py",
    "test_card.py",
    "test_storage.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under :data:`SLOW_FOLDERS` or in :data:`SLOW_MODULES` ``slow``."""
    tests = Path(__file__).resolve().parent
    for item in items:
        parts = item.path.resolve().relative_to(tests).parts
        if parts and (parts[0] in SLOW_FOLDERS or parts[-1] in SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
