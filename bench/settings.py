"""What the benchmark runs: the TNNs, their targets and learning rates, and the budgets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from switchprune.config import ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# The official MNIST test set (IDX files), shared beside the checkout.
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist-t10k"
ARCHS: dict[str, ModelConfig] = {
    "mlp": ModelConfig(arch="mlp", hidden=(300, 100)),
    "lenet5": ModelConfig(arch="lenet5"),
    # vgg11 at a quarter of the width (16..128 channels): five seeds of every method fit the
    # hour on 2 CPU cores.
    "vgg": ModelConfig(arch="vgg11", width_multiplier=0.25),
}
# (metric, ratio) targets per TNN.
TARGETS: dict[str, tuple[tuple[str, float], ...]] = {
    "mlp": (("params", 0.3), ("params", 0.13)),
    "lenet5": (("params", 0.3), ("params", 0.13)),
    "vgg": (("params", 0.3), ("params", 0.13), ("macs", 0.3)),
}
# SGD learning rate per TNN, the same for every method (LeNet-5 has no BatchNorm and diverges
# at the MLP's rate). Fine-tuning uses a fifth of it.
LEARNING_RATES = {"mlp": 0.05, "lenet5": 0.01, "vgg": 0.05}
BASELINES = ("slimming", "l1norm")


@dataclasses.dataclass(frozen=True)
class Setting:
    """How much to run."""

    seeds: tuple[int, ...]
    epochs: int
    finetune_epochs: int
    archs: tuple[str, ...]
    latency_repeats: int
    data_limit: int | None = None  # use only this many MNIST images
    claim_seeds: tuple[int, ...] = (0, 1, 2)
    claim_epochs: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"digits": 30, "mnist": 10}
    )


SETTINGS = {
    "default": Setting(seeds=(0, 1, 2, 3, 4), epochs=10, finetune_epochs=2,
                       archs=("mlp", "lenet5", "vgg"), latency_repeats=20),
    "quick": Setting(seeds=(0, 1), epochs=3, finetune_epochs=1, archs=("mlp", "lenet5", "vgg"),
                     latency_repeats=3, data_limit=2000, claim_seeds=(0,),
                     claim_epochs={"digits": 6, "mnist": 3}),
    "tiny": Setting(seeds=(0,), epochs=1, finetune_epochs=1, archs=("mlp",),
                    latency_repeats=1, data_limit=500, claim_seeds=(0,),
                    claim_epochs={"digits": 2, "mnist": 1}),
}  # fmt: skip


def train_config(epochs: int, seed: int, arch: str, **overrides: Any) -> TrainConfig:
    """The package defaults with the benchmark's budget and the TNN's learning rate.

    Args:
        epochs: Training epochs.
        seed: Seeds initialisation and shuffling.
        arch: Key of :data:`LEARNING_RATES`.
        **overrides: Further ``TrainConfig`` fields.

    Returns:
        The training configuration, on the CPU, without the plain baseline run.
    """
    return dataclasses.replace(
        TrainConfig(device="cpu", baseline=False),
        epochs=epochs,
        seed=seed,
        tnn_lr=LEARNING_RATES[arch],
        **overrides,
    )


def out_dir(setting: str, out: str | None) -> Path:
    """Where a setting's reports go: ``out``, else ``reports/bench`` or ``reports/bench-<setting>``.

    Args:
        setting: Key of :data:`SETTINGS`.
        out: The ``--out`` option, if given.

    Returns:
        The directory (not created).
    """
    if out:
        return Path(out)
    return ROOT / "reports" / ("bench" if setting == "default" else f"bench-{setting}")
