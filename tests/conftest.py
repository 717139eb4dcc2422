"""Shared fixtures: tiny task networks with non-trivial BatchNorm and random gate factors."""

from __future__ import annotations

import gc
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from switchprune.cli import GC_THRESHOLD

# As in a command's process (``switchprune.cli.entry``): the collector runs less often while the
# libraries import; pytest_collection_finish then leaves their objects out of it.
gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])

import torch  # noqa: E402

from switchprune.models import TaskNet  # noqa: E402

# No analytics or telemetry calls from the tools the tests run (the network is closed anyway).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# One torch thread per process, in the workers and in every tool they start: the suite runs a
# worker per core, and oversubscribed OpenMP threads spin (tiny ops get many times slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from model_support import IN_SHAPES, make_tiny_net  # noqa: E402  (tests/ is on sys.path)


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


# The longest modules (a minute or more of real process chains each), longest first: pytest-xdist
# hands whole modules to the workers in collection order (``--no-loadscope-reorder``), and a long
# module started last would leave one core idle while the other finishes it.
LONGEST_FIRST = (
    "test_local_run.py",
    "test_distributed.py",
    "test_image.py",  # the components inside the built image (skipped at once without it)
    "test_kfp_local.py",
    "test_dvc.py",
    "test_user_network.py",
    "test_deep_network.py",
    "test_run_faults.py",  # after test_local_run: both wait for one completed project
    "test_register_promote.py",
    "test_bench.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under :data:`SLOW_FOLDERS` or in :data:`SLOW_MODULES` ``slow``; run the
    :data:`LONGEST_FIRST` modules first, then the other slow ones, then the unit tests."""
    tests = Path(__file__).resolve().parent
    rank: dict[str, int] = {}
    for item in items:
        parts = item.path.resolve().relative_to(tests).parts
        slow = bool(parts) and (parts[0] in SLOW_FOLDERS or parts[-1] in SLOW_MODULES)
        if slow:
            item.add_marker(pytest.mark.slow)
        name = item.path.name
        first = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        rank[item.nodeid] = first if slow or first < len(LONGEST_FIRST) else first + 1
    items.sort(key=lambda item: rank[item.nodeid])  # stable: each module keeps its order


def pytest_collection_finish(session: pytest.Session) -> None:
    """Leave the objects of every imported library out of the collector's later passes: they
    live until the worker exits, and walking them again in each full collection is wasted."""
    gc.collect()
    gc.freeze()
