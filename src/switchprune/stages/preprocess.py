"""``preprocess``: turn the configured raw dataset into train/val/test splits."""

from __future__ import annotations

from pathlib import Path

from switchprune.config import DataConfig
from switchprune.data import prepare_data


def run(cfg: DataConfig, *, raw_dir: Path, prepared_dir: Path) -> dict[str, float]:
    """Prepare the dataset.

    Args:
        cfg: The ``data`` section.
        raw_dir: Where raw torchvision datasets live (downloaded there when absent and allowed).
        prepared_dir: Output directory of the splits and ``meta.json``.

    Returns:
        Sample counts per split and the class count.
    """
    return {
        k: float(v) for k, v in prepare_data(cfg, raw_dir=raw_dir, out_dir=prepared_dir).items()
    }
