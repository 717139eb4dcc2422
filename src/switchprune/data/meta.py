"""What a prepared directory holds: its file names and its description, ``meta.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from switchprune.errors import InputError
from switchprune.io import aside_dir

# The datasets torchvision reads (and downloads), with its class name for each.
TORCHVISION = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}
DATASETS: tuple[str, ...] = ("digits", *TORCHVISION, "idx", "folder")
# Shipped inside an installed package: prepared offline, the same bytes everywhere, so they need
# neither a DVC-tracked copy nor a download.
BUNDLED: frozenset[str] = frozenset({"digits"})

SPLITS: tuple[str, ...] = ("train", "val", "test")
META_FILE = "meta.json"
# Every file a prepared directory holds (either storage format); preprocess replaces the
# directory whole and refuses one that holds anything else.
PREPARED_FILES: tuple[str, ...] = (
    META_FILE,
    *(f"{s}.pt" for s in SPLITS),
    *(f"{s}_{a}.npy" for s in SPLITS for a in ("x", "y")),
)


class DataError(InputError, RuntimeError):
    """The data is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class DataMeta:
    """Description of a prepared dataset, stored as ``meta.json`` next to the splits.

    Attributes:
        dataset: Dataset name (one of :data:`DATASETS`).
        in_shape: Shape of one image, ``(C, H, W)``.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        mean: Per-channel mean of the training split, pixels scaled to ``[0, 1]``.
        std: Per-channel standard deviation of the training split, same units.
        n_train: Number of training samples.
        n_val: Number of validation samples.
        n_test: Number of test samples.
        source_md5: DVC hash (md5) of the raw data the splits were made from: the same value
            ``dvc add`` records for that file or directory, so a model names its data version.
        class_names: Name of each class by index (the class folders of ``folder``; empty where
            the dataset has none).
        storage: Format of the split files, ``pt`` or ``npy`` (:mod:`switchprune.data.prepared`).
    """

    dataset: str
    in_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    n_train: int
    n_val: int
    n_test: int
    source_md5: str = ""
    class_names: tuple[str, ...] = ()
    storage: str = "pt"

    @property
    def labels(self) -> tuple[str, ...]:
        """The name of every class by index: ``class_names``, else the index as text."""
        return self.class_names or tuple(str(i) for i in range(self.num_classes))


def channel_stats(sums: np.ndarray, count: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation, as :class:`DataMeta` records them.

    Args:
        sums: ``[2, C]`` float64: per channel, the sum of the pixels and of their squares, in
            ``[0, 1]`` units.
        count: Pixels summed per channel.

    Returns:
        ``(mean, std)``.
    """
    mean = sums[0] / count
    std = np.sqrt(np.clip(sums[1] / count - np.square(mean), 0.0, None))
    std = np.where(std > 1e-8, std, 1.0)  # a constant channel would divide by zero: unscaled
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def load_meta(data_dir: Path) -> DataMeta:
    """Read the ``meta.json`` of a prepared dataset.

    Args:
        data_dir: Directory written by :func:`~switchprune.data.prepare_data`.

    Returns:
        The dataset description.

    Raises:
        DataError: If the file is missing or malformed.
    """
    path = Path(data_dir) / META_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        aside = aside_dir(Path(data_dir))
        hint = (
            f" (a run was killed while replacing it: the previous data is in {aside}; the next"
            " preprocess run puts it back)"
            if aside.is_dir() and not Path(data_dir).exists()
            else ""
        )
        raise DataError(f"prepared data not found: {path} is missing{hint}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    fields = [f.name for f in dataclasses.fields(DataMeta)]
    # Directories prepared before class names and the storage format were recorded lack them.
    optional = {"class_names", "storage"}
    if not isinstance(raw, dict) or not set(fields) - optional <= set(raw) <= set(fields):
        raise DataError(f"{path} does not describe a prepared dataset (expected keys {fields})")
    try:
        meta = DataMeta(
            dataset=str(raw["dataset"]),
            in_shape=tuple(int(d) for d in raw["in_shape"]),  # type: ignore[arg-type]
            num_classes=int(raw["num_classes"]),
            mean=tuple(float(v) for v in raw["mean"]),
            std=tuple(float(v) for v in raw["std"]),
            n_train=int(raw["n_train"]),
            n_val=int(raw["n_val"]),
            n_test=int(raw["n_test"]),
            source_md5=str(raw["source_md5"]),
            class_names=tuple(str(c) for c in raw.get("class_names", ())),
            storage=str(raw.get("storage", "pt")),
        )
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path} has a malformed field: {exc}") from exc
    if meta.storage not in ("pt", "npy"):
        raise DataError(f"{path} names an unknown storage format {meta.storage!r}")
    return meta
