"""``digits``: scikit-learn's bundled 8x8 digits, read as IDX files."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import tempfile
from pathlib import Path

import numpy as np

from switchprune.config import DataConfig
from switchprune.data.idx import IMAGES_RE, find_by_prefix, prepare_dir
from switchprune.data.split import Splits
from switchprune.dvcfiles import dvc_md5
from switchprune.errors import InputError
from switchprune.io import atomic_write_bytes


def export_digits(out_dir: Path) -> Path:
    """Write scikit-learn's bundled digits as IDX files (byte-identical on every machine).

    ``preprocess`` reads them from ``<raw_dir>/digits`` when that folder holds them, and
    otherwise exports them to a scratch folder: the same bytes, hence the same ``source_md5``,
    on every machine with the pinned scikit-learn, offline.

    Args:
        out_dir: Directory to create (``<raw_dir>/digits``).

    Returns:
        ``out_dir``.
    """
    # The file scikit-learn's ``load_digits`` parses, read the same way without importing
    # scikit-learn (2 s of every preprocess): 64 intensities 0..16 and the label per row.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise InputError("data.dataset 'digits' needs scikit-learn installed")
    with gzip.open(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")
    # Rescaled to the 0..255 range of the other sets.
    images = np.rint(data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    labels = data[:, -1].astype(np.uint8)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, arr in (("digits-images-idx3-ubyte", images), ("digits-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
        atomic_write_bytes(out_dir / name, lambda fh, a=arr, h=header: fh.write(h + a.tobytes()))
    return out_dir


def prepare(cfg: DataConfig, source: Path) -> tuple[Splits, int, str]:
    """The splits, class count and source hash of ``digits``: from ``source`` if it holds them."""
    if source.is_dir() and find_by_prefix(source, IMAGES_RE):
        return *prepare_dir(cfg, source), dvc_md5(source)
    # Exported byte-identically to a scratch folder, so a fresh clone prepares them offline and
    # the stage never writes into its own input.
    with tempfile.TemporaryDirectory(prefix="switchprune-digits-") as scratch:
        exported = export_digits(Path(scratch) / cfg.dataset)
        return *prepare_dir(cfg, exported), dvc_md5(exported)
