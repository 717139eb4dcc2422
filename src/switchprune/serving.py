"""The served form of a compacted model: raw images in, logits out.

The network trains on normalised inputs; a served model must not depend on its caller knowing
the training set's statistics, so :class:`ServedModel` holds them as buffers and applies them.

Input layout (``N×C×H×W``, the model's ``in_shape`` per sample):

* ``uint8``: pixels ``0..255``, as stored in the prepared data;
* floating point: pixels already scaled to ``[0, 1]`` (``uint8 / 255``).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

# What unpickling a served model imports: switchprune's model code and what it imports, and
# the loader. Pinned to the versions that logged it.
SERVING_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "torch-pruning",
    "numpy",
    "pyyaml",
    "tqdm",
    "pillow",
)


class ServedModel(nn.Module):
    """A task network behind its input normalisation.

    Attributes:
        net: The task network (takes normalised float32 inputs).
        mean: Per-channel mean of ``[0, 1]`` pixels, shape ``[C, 1, 1]``.
        std: Per-channel standard deviation, same shape.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not len(mean):
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for raw images (``uint8`` 0..255, or floats in ``[0, 1]``)."""
        if not x.is_floating_point():
            x = x.to(torch.float32) / 255.0
        return self.net((x.to(self.mean.dtype) - self.mean) / self.std)


def serving_requirements() -> list[str]:
    """Pinned pip requirements of a served model (the package itself travels as its code)."""
    pins = []
    for name in SERVING_DISTRIBUTIONS:
        version = metadata.version(name).split("+")[0]
        pins.append(f"{name}=={version}")
    return pins


def package_dir() -> Path:
    """The folder of the installed ``switchprune`` package (shipped as the model's code)."""
    return Path(__file__).resolve().parent
