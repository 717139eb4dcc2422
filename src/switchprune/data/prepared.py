"""Writing the prepared directory (:func:`prepare_data`) and reading its splits back.

In the prepared directory:

- ``meta.json``: the description; written last, so a directory without it is incomplete.
- ``storage: pt`` (``digits``, ``idx`` and the torchvision datasets): ``train.pt``, ``val.pt``,
  ``test.pt``, each ``{"x": uint8 [N, C, H, W], "y": int64 [N]}`` saved by ``torch.save``.
- ``storage: npy`` (``folder``): ``<split>_x.npy`` (uint8 ``[N, C, H, W]``) and
  ``<split>_y.npy`` (int64 ``[N]``), plain NumPy files, written one image at a time.

Two ways to read a split back, both normalised with the training statistics and giving the
same values: :func:`load_split` (all of it as one float tensor: fast for small data) and
:func:`open_split` (a :class:`PreparedSplit` that reads the rows it is asked for from a
read-only memory map of the file, so memory does not grow with the dataset).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from switchprune.config import DataConfig
from switchprune.data import digits, folder, idx, torchvision_sets
from switchprune.data.meta import (
    DATASETS,
    META_FILE,
    PREPARED_FILES,
    SPLITS,
    TORCHVISION,
    DataError,
    DataMeta,
    channel_stats,
    load_meta,
)
from switchprune.dvcfiles import dvc_md5
from switchprune.io import atomic_write_bytes, replacing_dir


def prepare_data(
    cfg: DataConfig, *, raw_dir: Path, out_dir: Path, expected_md5: str | None = None
) -> dict[str, float]:
    """Materialise the dataset as train/val/test splits under ``out_dir``, whole or not at all.

    Everything is written into a staging folder beside ``out_dir``, which replaces it only once
    every split and ``meta.json`` are complete (:func:`~switchprune.io.replacing_dir`): when
    anything fails, ``out_dir`` keeps its previous content, byte for byte.

    Args:
        cfg: Which dataset to use and how to split it.
        raw_dir: Where torchvision datasets live (and are downloaded to if allowed).
        out_dir: Output directory; created if missing, replaced whole if present (it may hold
            only the files of a prepared directory, :data:`PREPARED_FILES`).
        expected_md5: When given, the DVC hash the raw data must have; anything else is
            refused before ``out_dir`` is replaced.

    Returns:
        Flat metrics ``{"n_train", "n_val", "n_test", "num_classes"}``.

    Raises:
        DataError: If the dataset is unknown, missing, corrupt, cannot be downloaded or has a
            class too small for the splits.
        switchprune.io.ArtifactError: ``out_dir`` holds files of another kind.
    """
    raw_dir = Path(raw_dir)
    out_dir = Path(out_dir)
    source = source_dir(cfg, raw_dir)
    with replacing_dir(out_dir, PREPARED_FILES, "preprocess") as staged:
        if cfg.dataset == "folder":
            meta = folder.write_folder(cfg, source, staged.dir)
        else:
            meta = _write_tensors(cfg, source, raw_dir, staged.dir)
        if expected_md5 and meta.source_md5 != expected_md5:
            raise DataError(f"prepared data has hash {meta.source_md5}, not {expected_md5}")
        meta_text = json.dumps(dataclasses.asdict(meta), indent=2) + "\n"
        atomic_write_bytes(staged.dir / META_FILE, lambda fh: fh.write(meta_text.encode("utf-8")))

    return {k: getattr(meta, k) for k in ("n_train", "n_val", "n_test", "num_classes")}


def source_dir(cfg: DataConfig, raw_dir: Path) -> Path:
    """Where the raw data of the configured dataset lives."""
    if cfg.dataset == "idx":
        return Path(cfg.idx_dir or "")
    if cfg.dataset == "folder":
        return Path(cfg.folder_dir or "")
    if cfg.dataset in TORCHVISION:
        return Path(raw_dir) / TORCHVISION[cfg.dataset]
    return Path(raw_dir) / cfg.dataset


def _write_tensors(cfg: DataConfig, source: Path, raw_dir: Path, out_dir: Path) -> DataMeta:
    """Prepare a dataset read whole into memory and write its splits as ``<split>.pt``."""
    source_md5 = ""
    if cfg.dataset == "digits":
        splits, num_classes, source_md5 = digits.prepare(cfg, source)
    elif cfg.dataset in TORCHVISION:
        splits, num_classes = torchvision_sets.prepare(cfg, raw_dir)
    elif cfg.dataset == "idx":
        splits, num_classes = idx.prepare(cfg)
    else:
        raise DataError(f"unknown dataset {cfg.dataset!r} (known: {', '.join(DATASETS)})")

    x_train = splits["train"][0]
    mean, std = _tensor_stats(x_train)
    meta = DataMeta(
        dataset=cfg.dataset,
        in_shape=tuple(int(d) for d in x_train.shape[1:]),  # type: ignore[arg-type]
        num_classes=int(num_classes),
        mean=mean,
        std=std,
        n_train=int(x_train.shape[0]),
        n_val=int(splits["val"][0].shape[0]),
        n_test=int(splits["test"][0].shape[0]),
        source_md5=source_md5 or dvc_md5(source),
    )
    for name, (x, y) in splits.items():
        payload = {"x": x.contiguous(), "y": y.contiguous()}
        atomic_write_bytes(out_dir / f"{name}.pt", lambda fh, p=payload: torch.save(p, fh))
    return meta


def _tensor_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``[N, C, H, W]`` (see :func:`channel_stats`)."""
    # Exact integer sums: a float sum's order, and so its last bits, follows torch's thread
    # count, and the prepared data (its hash in dvc.lock) must not. Chunked so large sets
    # (CIFAR) never need a full int64 copy in memory.
    sums = torch.zeros(2, x.shape[1], dtype=torch.int64)
    for start in range(0, x.shape[0], 4096):
        chunk = x[start : start + 4096].to(torch.int64)
        sums[0] += chunk.sum(dim=(0, 2, 3))
        sums[1] += chunk.square().sum(dim=(0, 2, 3))
    scaled = sums.numpy().astype(np.float64) / np.array([[255.0], [255.0**2]])
    return channel_stats(scaled, x.shape[0] * x.shape[2] * x.shape[3])


def load_split(data_dir: Path, split: str) -> TensorDataset:
    """Load one prepared split into memory, normalised with the training statistics.

    Args:
        data_dir: Directory written by :func:`prepare_data`.
        split: ``train``, ``val`` or ``test``.

    Returns:
        A dataset of ``x`` (float32 ``[N, C, H, W]``, per-channel standardised) and ``y``
        (int64 ``[N]``).

    Raises:
        ValueError: If ``split`` is not a known split name.
        DataError: If the split or its metadata is missing or inconsistent.
    """
    meta, x, y = _read_split(Path(data_dir), split, mmap=False)
    x_t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return TensorDataset(_normalise(x_t, meta), y)


def open_split(data_dir: Path, split: str) -> PreparedSplit:
    """Open one prepared split for streaming: rows are read from disk when asked for.

    Args:
        data_dir: Directory written by :func:`prepare_data`.
        split: ``train``, ``val`` or ``test``.

    Returns:
        The split; its batches hold the same values as :func:`load_split`'s tensors.

    Raises:
        ValueError: If ``split`` is not a known split name.
        DataError: If the split or its metadata is missing or inconsistent.
    """
    meta, _x, y = _read_split(Path(data_dir), split, mmap=True)  # checks it, maps no pixels
    return PreparedSplit(Path(data_dir), split, meta, y)


def raw_images(data_dir: Path, split: str, rows: Sequence[int]) -> torch.Tensor:
    """Rows of a prepared split as stored: uint8 images ``[B, C, H, W]``, not normalised.

    Args:
        data_dir: Directory written by :func:`prepare_data`.
        split: ``train``, ``val`` or ``test``.
        rows: Row indices.

    Returns:
        The images, as a served model takes them.
    """
    x = _read_split(Path(data_dir), split, mmap=True)[1]
    return _rows(x, np.asarray(rows, dtype=np.int64).reshape(-1))


class PreparedSplit(Dataset):
    """A prepared split read lazily through a read-only memory map of its file.

    ``split[i]`` is one ``(x, y)`` sample; ``split[[i, j, ...]]`` a whole batch read at once
    (what :func:`~switchprune.data.iter_batches` and training ask for, with ``batch_size=None``
    in the ``DataLoader``). Each process maps the file itself, so ``DataLoader`` workers share
    the page cache rather than copies of the data.

    Attributes:
        meta: The prepared dataset's description.
        labels: Labels of the samples of this split (or view), int64 ``[N]``.
    """

    def __init__(
        self,
        data_dir: Path,
        split: str,
        meta: DataMeta,
        labels: torch.Tensor,
        indices: np.ndarray | None = None,
    ) -> None:
        self.data_dir, self.split, self.meta = Path(data_dir), split, meta
        self.indices = indices
        self.labels = labels if indices is None else labels[torch.from_numpy(indices)]
        self._all_labels = labels
        self._x: np.ndarray | torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        # Workers started by spawn map the file themselves.
        return {**self.__dict__, "_x": None}

    def __getitem__(self, index: int | Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, Any]:
        """One sample ``(x [C, H, W], y)``, or a batch ``(x [B, C, H, W], y [B])``."""
        single = isinstance(index, int | np.integer)
        rows = np.asarray([index] if single else index, dtype=np.int64).reshape(-1)
        if self.indices is not None:
            rows = self.indices[rows]
        if self._x is None:
            self._x = _read_split(self.data_dir, self.split, mmap=True)[1]
        x = _normalise(_rows(self._x, rows), self.meta)
        y = self._all_labels[torch.from_numpy(rows)]
        return (x[0], int(y[0])) if single else (x, y)

    def subset(self, indices: np.ndarray | torch.Tensor) -> PreparedSplit:
        """A view of the samples at ``indices`` (positions in this split or view)."""
        picked = np.asarray(indices, dtype=np.int64).reshape(-1)
        base = picked if self.indices is None else self.indices[picked]
        return PreparedSplit(self.data_dir, self.split, self.meta, self._all_labels, base)


def _rows(x: np.ndarray | torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """The images at ``rows`` of a split's pixels, copied out of its memory map."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x[rows]))
    return x[torch.from_numpy(rows)]  # advanced indexing copies


def _normalise(x: torch.Tensor, meta: DataMeta) -> torch.Tensor:
    """uint8 pixels to float32, standardised per channel with the training statistics."""
    mean = torch.tensor(meta.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float32).view(-1, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def _read_split(
    data_dir: Path, split: str, *, mmap: bool
) -> tuple[DataMeta, np.ndarray | torch.Tensor, torch.Tensor]:
    """Read and check one split's uint8 pixels (memory-mapped when ``mmap``) and labels."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    meta = load_meta(data_dir)
    x: Any
    if meta.storage == "npy":
        path = data_dir / f"{split}_x.npy"
        try:
            x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            y = torch.from_numpy(np.load(data_dir / f"{split}_y.npy", allow_pickle=False))
        except FileNotFoundError as exc:
            raise DataError(f"prepared split not found: {exc.filename} is missing") from exc
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read split {split!r} in {data_dir}: {exc}") from exc
        ok_types = x.dtype == np.uint8 and y.dtype == torch.int64
    else:
        path = data_dir / f"{split}.pt"
        try:
            blob = torch.load(path, weights_only=True, mmap=mmap)
        except FileNotFoundError as exc:
            raise DataError(f"prepared split not found: {path} is missing") from exc
        except Exception as exc:  # torch raises assorted types for a damaged file
            raise DataError(f"cannot read {path}: {exc}") from exc
        x, y = (blob.get("x"), blob.get("y")) if isinstance(blob, dict) else (None, None)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise DataError(f"{path} must hold tensors 'x' and 'y'")
        ok_types = x.dtype == torch.uint8 and y.dtype == torch.int64
    expected_n = {"train": meta.n_train, "val": meta.n_val, "test": meta.n_test}[split]
    if (
        not ok_types
        or tuple(x.shape[1:]) != meta.in_shape
        or tuple(y.shape) != (x.shape[0],)
        or x.shape[0] != expected_n
    ):
        raise DataError(
            f"{path} does not match {META_FILE}: x {x.dtype} {tuple(x.shape)}, "
            f"y {y.dtype} {tuple(y.shape)}, expected {expected_n} samples of {meta.in_shape}"
        )
    return meta, x, y
