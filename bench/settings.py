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
    # torchvision networks with their small-image stems, at a quarter of the width (the
    # full-width ones take minutes per epoch on one core).
    "resnet18": ModelConfig(arch="resnet18", width_multiplier=0.25),
    "mobilenet_v2": ModelConfig(arch="mobilenet_v2", width_multiplier=0.25),
}
TORCHVISION = ("resnet18", "mobilenet_v2")
# (metric, ratio) targets per TNN.
TARGETS: dict[str, tuple[tuple[str, float], ...]] = {
    "mlp": (("params", 0.3), ("params", 0.13)),
    "lenet5": (("params", 0.3), ("params", 0.13)),
    "vgg": (("params", 0.3), ("params", 0.13), ("macs", 0.3)),
    "resnet18": (("macs", 0.3),),
    "mobilenet_v2": (("macs", 0.3),),
}
# SGD learning rate per TNN, the same for every method (LeNet-5 has no BatchNorm and diverges
# at the MLP's rate). Fine-tuning uses a fifth of it.
LEARNING_RATES = {"mlp": 0.05, "lenet5": 0.01, "vgg": 0.05, "resnet18": 0.05, "mobilenet_v2": 0.05}
BASELINES = ("slimming", "l1norm")
Target = tuple[str, float]
# ``make bench`` fits 90 minutes on 2 cores: the torchvision TNNs train for 3 epochs and
# LeNet-5 and VGG for 5 (every method of a cell gets the same epochs), the convolutional TNNs
# have three seeds (the MLP keeps five, it costs next to nothing), and on LeNet-5 and VGG the
# scorer controls run at one target (params 0.13, where the scores matter most) while ours with
# the default scorer meets every peer at every target.
TORCHVISION_EPOCHS = 3
CONV_EPOCHS = 5
CONTROL_TARGETS: dict[str, tuple[Target, ...]] = {a: (("params", 0.13),) for a in ("lenet5", "vgg")}


def _default_only(scorers: tuple[str, ...]) -> tuple[str, ...]:
    """The default scorer, or the first asked for when the default is not among them."""
    default = TrainConfig().scorer
    return (default,) if default in scorers else scorers[:1]


def scorers_for(arch: str, scorers: tuple[str, ...]) -> tuple[str, ...]:
    """The scorers of ours in one TNN's cells: the torchvision ones run the default only.

    Args:
        arch: Key of :data:`ARCHS`.
        scorers: The scorers asked for.

    Returns:
        ``scorers``, or for a torchvision TNN the default scorer (the first asked for when the
        default is not among them).
    """
    if arch not in TORCHVISION or not scorers:
        return scorers
    return _default_only(scorers)


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
    # Per TNN, instead of ``seeds`` and ``epochs`` (the torchvision cells).
    arch_seeds: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    arch_epochs: dict[str, int] = dataclasses.field(default_factory=dict)
    # Per TNN, the only targets at which the scorer controls run (absent: every target).
    control_targets: dict[str, tuple[Target, ...]] = dataclasses.field(default_factory=dict)

    def scorers_at(self, arch: str, target: Target, scorers: tuple[str, ...]) -> tuple[str, ...]:
        """The scorers of ours at one TNN's target: the controls only where they run.

        Args:
            arch: Key of :data:`ARCHS`.
            target: ``(metric, ratio)``.
            scorers: The scorers asked for.

        Returns:
            :func:`scorers_for`'s scorers, reduced to the default one at a target outside
            :attr:`control_targets`.
        """
        chosen = scorers_for(arch, scorers)
        only = self.control_targets.get(arch)
        if only is None or target in only or not chosen:
            return chosen
        return _default_only(chosen)

    def seeds_for(self, arch: str) -> tuple[int, ...]:
        """The seeds of one TNN."""
        return self.arch_seeds.get(arch, self.seeds)

    def epochs_for(self, arch: str) -> int:
        """The training epochs of one TNN (ours, the unpruned TNN and the peers alike)."""
        return self.arch_epochs.get(arch, self.epochs)


SETTINGS = {
    "default": Setting(seeds=(0, 1, 2, 3, 4), epochs=10, finetune_epochs=2,
                       archs=("mlp", "lenet5", "vgg", *TORCHVISION), latency_repeats=20,
                       arch_seeds={a: (0, 1, 2) for a in ("lenet5", "vgg", *TORCHVISION)},
                       arch_epochs={"lenet5": CONV_EPOCHS, "vgg": CONV_EPOCHS,
                                    **{a: TORCHVISION_EPOCHS for a in TORCHVISION}},
                       control_targets=CONTROL_TARGETS),
    "quick": Setting(seeds=(0, 1), epochs=3, finetune_epochs=1,
                     archs=("mlp", "lenet5", "vgg", *TORCHVISION), latency_repeats=3,
                     data_limit=2000, claim_seeds=(0,), claim_epochs={"digits": 6, "mnist": 3},
                     arch_seeds={a: (0,) for a in TORCHVISION}, control_targets=CONTROL_TARGETS),
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
