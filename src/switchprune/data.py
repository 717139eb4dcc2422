"""Dataset preparation, loading and streaming.

:func:`prepare_data` turns one of the supported datasets into three splits plus ``meta.json``
describing them (:class:`DataMeta`). On disk, in the prepared directory:

- ``meta.json``: the description; written last, so a directory without it is incomplete.
- ``storage: pt`` (``digits``, ``idx`` and the torchvision datasets): ``train.pt``, ``val.pt``,
  ``test.pt``, each ``{"x": uint8 [N, C, H, W], "y": int64 [N]}`` saved by ``torch.save``.
- ``storage: npy`` (``folder``): ``<split>_x.npy`` (uint8 ``[N, C, H, W]``) and
  ``<split>_y.npy`` (int64 ``[N]``), plain NumPy files. The pixels are decoded and written one
  image at a time, so preparing a folder never holds a whole split in memory.

The whole directory is written in a staging folder beside it and swapped in only once every
split and ``meta.json`` are complete (:func:`~switchprune.io.replacing_dir`): a run that fails,
on a corrupt image or anything else, leaves the previous prepared data as it was.

Two ways to read a split back, both normalised with the training statistics and giving the
same values: :func:`load_split` (all of it as one float tensor: fast for small data) and
:func:`open_split` (a :class:`PreparedSplit` that reads the rows it is asked for from a
read-only memory map of the file, so memory does not grow with the dataset; batches come
through a ``DataLoader``, see :func:`iter_batches`). :func:`use_streaming` chooses between them
for ``data.loader``. :func:`augment_batch` is the training-time augmentation.

Every failure caused by the data itself (missing files, a corrupt IDX file or image, an image
above ``data.max_image_pixels``, a class too small for the splits, a failed download) is
reported as a single :class:`DataError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import re
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from switchprune.config import DataConfig
from switchprune.dvcfiles import dvc_md5
from switchprune.errors import InputError
from switchprune.io import aside_dir, atomic_write_bytes, replacing_dir

DATASETS: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "idx",
    "folder",
)

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
# Datasets whose labels survive a horizontal mirror image. Digits do not (a mirrored 2 or 7 is
# no digit, and a mirrored digit set teaches shapes that never occur); image folders are
# assumed to hold natural images, like CIFAR.
FLIP_SAFE: tuple[str, ...] = ("folder", "cifar10", "cifar100", "fashion_mnist")
# ``data.loader: auto`` streams when the training split as float32 would take more than this.
MEMORY_LOADER_MAX_BYTES = 1 << 30
# File name endings read as images in a folder dataset (those of torchvision's ImageFolder).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
# PIL modes without colour: a folder whose images all have one of them is prepared as 1 channel.
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

# torchvision class names of the datasets it provides.
_TORCHVISION = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}

# IDX type codes (third magic byte) and their big-endian numpy dtypes.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"
_IMAGES_RE = re.compile(r"^(?P<prefix>.*)images-idx3-ubyte(?P<gz>\.gz)?$")
_LABELS_RE = re.compile(r"^(?P<prefix>.*)labels-idx1-ubyte(?P<gz>\.gz)?$")

_log = logging.getLogger(__name__)


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
        storage: Format of the split files: ``pt`` or ``npy`` (see the module docstring).
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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


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
            meta = _write_folder(cfg, source, staged.dir)
        else:
            meta = _write_tensors(cfg, source, raw_dir, staged.dir)
        if expected_md5 and meta.source_md5 != expected_md5:
            raise DataError(f"prepared data has hash {meta.source_md5}, not {expected_md5}")
        meta_text = json.dumps(dataclasses.asdict(meta), indent=2) + "\n"
        atomic_write_bytes(staged.dir / META_FILE, lambda fh: fh.write(meta_text.encode("utf-8")))

    return {
        "n_train": meta.n_train,
        "n_val": meta.n_val,
        "n_test": meta.n_test,
        "num_classes": meta.num_classes,
    }


def _write_tensors(cfg: DataConfig, source: Path, raw_dir: Path, out_dir: Path) -> DataMeta:
    """Prepare an in-memory dataset and write its splits as ``<split>.pt``."""
    source_md5 = ""
    if cfg.dataset == "digits":
        if source.is_dir() and _find_by_prefix(source, _IMAGES_RE):
            prepared = _prepare_idx_dir(cfg, source)
        else:
            # Bundled with scikit-learn: exported byte-identically to a scratch folder, so a
            # fresh clone prepares them offline and the stage never writes into its own input.
            with tempfile.TemporaryDirectory(prefix="switchprune-digits-") as scratch:
                exported = export_digits(Path(scratch) / cfg.dataset)
                prepared = _prepare_idx_dir(cfg, exported)
                source_md5 = dvc_md5(exported)
        x_train, y_train, x_val, y_val, x_test, y_test, num_classes = prepared
    elif cfg.dataset in _TORCHVISION:
        x_train, y_train, x_val, y_val, x_test, y_test, num_classes = _prepare_torchvision(
            cfg, raw_dir
        )
    elif cfg.dataset == "idx":
        x_train, y_train, x_val, y_val, x_test, y_test, num_classes = _prepare_idx(cfg)
    else:
        raise DataError(f"unknown dataset {cfg.dataset!r} (known: {', '.join(DATASETS)})")

    mean, std = _channel_stats(x_train)
    meta = DataMeta(
        dataset=cfg.dataset,
        in_shape=tuple(int(d) for d in x_train.shape[1:]),  # type: ignore[arg-type]
        num_classes=int(num_classes),
        mean=mean,
        std=std,
        n_train=int(x_train.shape[0]),
        n_val=int(x_val.shape[0]),
        n_test=int(x_test.shape[0]),
        source_md5=source_md5 or dvc_md5(source),
    )
    splits = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
    for name, (x, y) in splits.items():
        payload = {"x": x.contiguous(), "y": y.contiguous()}
        atomic_write_bytes(out_dir / f"{name}.pt", lambda fh, p=payload: torch.save(p, fh))
    return meta


def load_meta(data_dir: Path) -> DataMeta:
    """Read the ``meta.json`` of a prepared dataset.

    Args:
        data_dir: Directory written by :func:`prepare_data`.

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
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x[idx]))
    return x[torch.from_numpy(idx)].clone()


class PreparedSplit(Dataset):
    """A prepared split read lazily through a read-only memory map of its file.

    ``split[i]`` is one ``(x, y)`` sample; ``split[[i, j, ...]]`` a whole batch read at once
    (what :func:`iter_batches` and training ask for, with ``batch_size=None`` in the
    ``DataLoader``). Each process maps the file itself, so ``DataLoader`` workers share the
    page cache rather than copies of the data.

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
        if isinstance(self._x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(self._x[rows]))
        else:
            x = self._x[torch.from_numpy(rows)]
        x = _normalise(x, self.meta)
        y = self._all_labels[torch.from_numpy(rows)]
        return (x[0], int(y[0])) if single else (x, y)

    def subset(self, indices: np.ndarray | torch.Tensor) -> PreparedSplit:
        """A view of the samples at ``indices`` (positions in this split or view)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        base = idx if self.indices is None else self.indices[idx]
        return PreparedSplit(self.data_dir, self.split, self.meta, self._all_labels, base)


def iter_batches(
    data: TensorDataset | PreparedSplit,
    batch_size: int,
    *,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of a split in order, from memory or streamed from disk.

    Args:
        data: A tensor dataset (:func:`load_split`) or a streamed split (:func:`open_split`).
        batch_size: Samples per batch (the last one may be smaller).
        num_workers: ``DataLoader`` worker processes for a streamed split.
        dtype: Floating type of ``x``.
    """
    if isinstance(data, TensorDataset):
        x_all, y_all = data.tensors[0], data.tensors[1]
        for i in range(0, len(y_all), batch_size):
            yield x_all[i : i + batch_size].to(dtype), y_all[i : i + batch_size]
        return
    n = len(data)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    for x, y in batch_loader(data, batches, num_workers=num_workers):
        yield x.to(dtype), y


def batch_loader(
    data: PreparedSplit,
    batches: Sequence[Sequence[int]],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` that reads the given batches of ``data``, in that order.

    Each batch is one read of the memory map (``batch_size=None``: the dataset returns whole
    batches), so the order, and with it training, does not depend on ``num_workers``.
    """
    return DataLoader(
        data,
        batch_size=None,
        sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def use_streaming(cfg: DataConfig, meta: DataMeta) -> bool:
    """Whether ``data.loader`` streams the splits rather than loading them into memory.

    ``auto`` streams when the training split as float32 would exceed
    :data:`MEMORY_LOADER_MAX_BYTES` (1 GiB); below that one tensor in memory is faster.
    """
    if cfg.loader != "auto":
        return cfg.loader == "stream"
    return meta.n_train * math.prod(meta.in_shape) * 4 > MEMORY_LOADER_MAX_BYTES


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation of image batches (``data.augment: standard``).

    Attributes:
        pad: Random crop with this much zero padding on each side (0: no crop).
        flip: Mirror half of the images left to right.
    """

    pad: int
    flip: bool


def augmentation(cfg: DataConfig, in_shape: tuple[int, ...]) -> Augmentation | None:
    """The augmentation ``cfg`` asks for on images of ``in_shape`` (``None``: none).

    The crop pads 4 pixels at 32 pixels, scaled to the smaller image side (at least 1); the
    flip is only for the datasets in :data:`FLIP_SAFE`, whose labels survive a mirror image.
    """
    if cfg.augment == "none" or len(in_shape) != 3:
        return None
    pad = max(1, round(4 * min(in_shape[1], in_shape[2]) / 32))
    return Augmentation(pad=pad, flip=cfg.dataset in FLIP_SAFE)


def augment_batch(x: torch.Tensor, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Randomly crop (with zero padding) and, if ``aug.flip``, mirror each image of a batch.

    Vectorised: one gather for the whole batch, on ``x``'s device. The random draws come from
    ``generator`` (on the CPU), so they are the same on every device. Padding is zero after
    normalisation, i.e. the training mean.

    Args:
        x: Normalised images ``[B, C, H, W]``.
        aug: What to apply.
        generator: Source of the random offsets and flips.

    Returns:
        A new batch of the same shape.
    """
    b, _c, h, w = x.shape
    p = aug.pad
    dy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (b, 1), generator=generator)
    cols = torch.arange(w).expand(b, w)
    if aug.flip:
        flip = torch.rand((b, 1), generator=generator) < 0.5
        cols = torch.where(flip, (w - 1) - cols, cols)
    rows = (dy + torch.arange(h)).to(x.device)
    cols = (dx + cols).to(x.device)
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    batch = torch.arange(b, device=x.device)
    # Advanced indices around the channel slice: the result is [B, H, W, C].
    out = padded[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


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
        x_dtype, y_dtype = str(x.dtype), str(y.dtype)
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
        x_dtype, y_dtype = str(x.dtype), str(y.dtype)
        ok_types = x.dtype == torch.uint8 and y.dtype == torch.int64
    expected_n = {"train": meta.n_train, "val": meta.n_val, "test": meta.n_test}[split]
    if (
        not ok_types
        or tuple(x.shape[1:]) != meta.in_shape
        or tuple(y.shape) != (x.shape[0],)
        or x.shape[0] != expected_n
    ):
        raise DataError(
            f"{path} does not match {META_FILE}: x {x_dtype} {tuple(x.shape)}, "
            f"y {y_dtype} {tuple(y.shape)}, expected {expected_n} samples of {meta.in_shape}"
        )
    return meta, x, y


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (as used by MNIST), plain or gzip-compressed.

    Args:
        path: File to read; gzip compression is detected from its content.

    Returns:
        The array with the shape and element type declared in the header, in native byte
        order.

    Raises:
        DataError: If the file is missing, not IDX, of an unknown element type, or truncated.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"corrupt gzip data in IDX file {path}: {exc}") from exc

    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(data)} bytes, no header")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"IDX file {path} has a bad magic number 0x{data[:4].hex()} (must start with 0x0000)"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"IDX file {path} has an unknown element type 0x{type_code:02x}")
    if ndim < 1:
        raise DataError(f"IDX file {path} declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated inside its header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    # Python integers: a header with huge dimensions must not wrap around in int64.
    expected = math.prod(dims) * dtype.itemsize
    actual = len(data) - header
    if actual < expected:
        raise DataError(
            f"IDX file {path} is truncated: shape {dims} needs {expected} data bytes, "
            f"found {actual}"
        )
    if actual > expected:
        raise DataError(
            f"IDX file {path} has {actual - expected} unexpected trailing bytes after shape {dims}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


# --------------------------------------------------------------------------------------------
# Dataset sources
# --------------------------------------------------------------------------------------------

_Prepared = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int
]


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
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # scikit-learn stores 0..16 intensities; rescale to the 0..255 range of the other sets.
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.uint8)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, arr in (("digits-images-idx3-ubyte", images), ("digits-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
            int(d).to_bytes(4, "big") for d in arr.shape
        )
        blob = header + arr.tobytes()
        atomic_write_bytes(out_dir / name, lambda fh, b=blob: fh.write(b))
    return out_dir


def source_dir(cfg: DataConfig, raw_dir: Path) -> Path:
    """Where the raw data of the configured dataset lives."""
    if cfg.dataset == "idx":
        return Path(cfg.idx_dir or "")
    if cfg.dataset == "folder":
        return Path(cfg.folder_dir or "")
    if cfg.dataset in _TORCHVISION:
        return Path(raw_dir) / _TORCHVISION[cfg.dataset]
    return Path(raw_dir) / cfg.dataset


def _prepare_idx_dir(cfg: DataConfig, idx_dir: Path) -> _Prepared:
    x, y = _read_idx_dir(idx_dir)
    num_classes = int(y.max().item()) + 1
    files = sorted(p.name for p in _find_by_prefix(idx_dir, _LABELS_RE).values())
    source = f"labels file(s) {', '.join(files)} in {idx_dir}"
    check_labels(y, num_classes, source)
    return (*_split_three(x, y, cfg, source), num_classes)


def check_labels(y: torch.Tensor, num_classes: int, source: str) -> None:
    """Refuse implausible labels: out of range, a class with no sample, or fewer than two.

    Labels must be ``0 .. num_classes - 1`` with every class present; a one-class model cannot
    be wrong and would pass any accuracy gate.

    Raises:
        DataError: Naming ``source`` and what is wrong.
    """
    if y.numel() == 0:
        raise DataError(f"{source} holds no labels")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{source} has labels {low}..{high}, outside 0..{num_classes - 1} "
            f"({num_classes} classes)"
        )
    counts = torch.bincount(y, minlength=num_classes)
    if num_classes < 2 or int((counts > 0).sum()) < 2:
        raise DataError(f"{source} has fewer than two classes (labels {sorted(set(y.tolist()))})")
    absent = torch.nonzero(counts == 0).flatten().tolist()
    if absent:
        shown = ", ".join(map(str, absent[:10])) + (" ..." if len(absent) > 10 else "")
        raise DataError(
            f"{source} has no sample of class(es) {shown} among 0..{num_classes - 1}: labels "
            "must be 0..K-1 with every class present (is one label corrupt?)"
        )


def _prepare_idx(cfg: DataConfig) -> _Prepared:
    if not cfg.idx_dir:
        raise DataError("dataset 'idx' needs data.idx_dir")
    return _prepare_idx_dir(cfg, Path(cfg.idx_dir))


def _prepare_torchvision(cfg: DataConfig, raw_dir: Path) -> _Prepared:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION[cfg.dataset])
    parts = []
    for train in (True, False):
        try:
            ds = cls(root=str(raw_dir), train=train, download=cfg.download)
        except Exception as exc:  # network, missing or damaged files surface as many types
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            if cfg.download:
                hint = "download failed or files are damaged"
            else:
                hint = "files missing or damaged and data.download is false"
            raise DataError(
                f"cannot load dataset {cfg.dataset!r} from raw_dir {raw_dir} ({hint}): {reason}"
            ) from exc
        parts.append(_torchvision_tensors(ds, cfg.dataset, raw_dir))
        num_classes = len(ds.classes)
        check_labels(parts[-1][1], num_classes, f"dataset {cfg.dataset!r} in {raw_dir}")

    (x_trainval, y_trainval), (x_test, y_test) = parts
    if cfg.val_fraction > 0:
        check_class_sizes(
            y_trainval.numpy(), ("val",), f"the training set of {cfg.dataset!r} in {raw_dir}"
        )
    train_idx, val_idx = _stratified_split(
        y_trainval.numpy(), cfg.val_fraction, cfg.split_seed, "val"
    )
    test_idx = shuffled(np.arange(y_test.shape[0], dtype=np.int64), cfg.split_seed)
    return (
        _take(x_trainval, train_idx),
        _take(y_trainval, train_idx),
        _take(x_trainval, val_idx),
        _take(y_trainval, val_idx),
        _take(x_test, test_idx),
        _take(y_test, test_idx),
        num_classes,
    )


def _torchvision_tensors(ds: Any, name: str, raw_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a torchvision dataset's images as uint8 ``[N, C, H, W]`` and labels as int64."""
    data = ds.data
    if isinstance(data, np.ndarray):  # CIFAR: NHWC uint8
        x = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()
    else:  # MNIST family: uint8 [N, H, W]
        x = torch.as_tensor(data).unsqueeze(1).contiguous()
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    if x.dtype != torch.uint8 or x.ndim != 4 or y.shape != (x.shape[0],):
        raise DataError(
            f"dataset {name!r} in raw_dir {raw_dir} has unexpected contents: "
            f"images {x.dtype} {tuple(x.shape)}, labels {tuple(y.shape)}"
        )
    return x, y


def _read_idx_dir(idx_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and concatenate every images/labels pair of an IDX directory, in filename order."""
    if not idx_dir.is_dir():
        raise DataError(f"IDX directory {idx_dir} does not exist")
    images = _find_by_prefix(idx_dir, _IMAGES_RE)
    labels = _find_by_prefix(idx_dir, _LABELS_RE)
    if not images:
        raise DataError(f"no '*images-idx3-ubyte[.gz]' file in IDX directory {idx_dir}")
    orphans = sorted(labels[p].name for p in set(labels) - set(images))
    if orphans:
        raise DataError(f"labels file {idx_dir / orphans[0]} has no matching images file")

    xs, ys = [], []
    for prefix in sorted(images, key=lambda p: images[p].name):
        img_path = images[prefix]
        if prefix not in labels:
            raise DataError(f"images file {img_path} has no matching labels file")
        lbl_path = labels[prefix]
        x = read_idx(img_path)
        y = read_idx(lbl_path)
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataError(
                f"images file {img_path} must hold uint8 [N, H, W], got {x.dtype} {x.shape}"
            )
        if x.shape[1] == 0 or x.shape[2] == 0:
            raise DataError(
                f"images file {img_path} holds empty images ({x.shape[1]}×{x.shape[2]})"
            )
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"labels file {lbl_path} must hold integers [N], got {y.dtype} {y.shape}"
            )
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"images file {img_path} has {x.shape[0]} images but labels file {lbl_path} "
                f"has {y.shape[0]} labels"
            )
        if y.size and y.min() < 0:
            raise DataError(f"labels file {lbl_path} contains negative labels")
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise DataError(
                f"images file {img_path} has images of size {x.shape[1:]}, "
                f"unlike {xs[0].shape[1:]} in the other files"
            )
        xs.append(x)
        ys.append(y.astype(np.int64))

    x_all = np.concatenate(xs)
    if x_all.shape[0] == 0:
        raise DataError(f"IDX directory {idx_dir} holds no samples")
    return torch.from_numpy(x_all).unsqueeze(1), torch.from_numpy(np.concatenate(ys))


def _find_by_prefix(idx_dir: Path, pattern: re.Pattern[str]) -> dict[str, Path]:
    """Map file prefix to file; if both plain and gzipped copies exist, keep the plain one."""
    found: dict[str, Path] = {}
    for path in sorted(idx_dir.iterdir()):
        m = pattern.match(path.name)
        if not m or not path.is_file():
            continue
        prefix = m.group("prefix")
        # torchvision leaves both the archive and its extraction side by side.
        if prefix not in found or not m.group("gz"):
            found[prefix] = path
    return found


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _write_folder(cfg: DataConfig, folder: Path, out_dir: Path) -> DataMeta:
    """Prepare an ``ImageFolder`` directory, one image at a time, as ``<split>_{x,y}.npy``."""
    classes = _folder_classes(folder)
    splits = _folder_splits(cfg, folder, classes)
    every = [f for split_files, _ in splits.values() for f in split_files]
    channels, size = _image_geometry(every, cfg.image_size, cfg.max_image_pixels)

    sums = np.zeros((2, channels), dtype=np.float64)
    for name, (split_files, split_labels) in splits.items():
        train = sums if name == "train" else None
        _write_images(
            out_dir / f"{name}_x.npy", split_files, channels, size, cfg.max_image_pixels, train
        )
        y = np.ascontiguousarray(split_labels, dtype=np.int64)
        atomic_write_bytes(out_dir / f"{name}_y.npy", lambda fh, a=y: np.save(fh, a))

    n_train = len(splits["train"][0])
    if n_train == 0:
        raise DataError(f"image folder {folder} leaves no training images after the splits")
    count = n_train * size[0] * size[1]
    mean = sums[0] / count
    std = np.sqrt(np.clip(sums[1] / count - np.square(mean), 0.0, None))
    std = np.where(std > 1e-8, std, 1.0)  # a constant channel stays unscaled
    return DataMeta(
        dataset="folder",
        in_shape=(channels, size[1], size[0]),
        num_classes=len(classes),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        n_train=n_train,
        n_val=len(splits["val"][0]),
        n_test=len(splits["test"][0]),
        source_md5=dvc_md5(folder),
        class_names=tuple(classes),
        storage="npy",
    )


def _folder_classes(folder: Path) -> list[str]:
    """The class folder names under ``folder/train``, sorted (at least two)."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} (data.folder_dir) does not exist")
    train_dir = folder / "train"
    if not train_dir.is_dir():
        raise DataError(f"image folder {folder} has no train/ directory (train/<class>/<image>)")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and _visible(d))
    if len(classes) < 2:
        raise DataError(
            f"{train_dir} needs at least two class folders, found {len(classes)}"
            + (f" ({classes[0]})" if classes else "")
        )
    return classes


def _folder_splits(
    cfg: DataConfig, folder: Path, classes: list[str]
) -> dict[str, tuple[list[Path], np.ndarray]]:
    """The image files and labels of each split: the folder's own, or shares of ``train/``."""
    files, labels = _scan_folder(folder / "train", classes)
    given = {
        name: _scan_folder(folder / name, classes)
        for name in ("val", "test")
        if (folder / name).is_dir()
    }
    for name, (split_files, _) in given.items():
        if not split_files:
            raise DataError(f"{folder / name} holds no class folders (<class>/<image>)")
    # Splits the folder lacks are stratified shares of train/, as for the other datasets.
    drawn = tuple(
        name
        for name in ("test", "val")
        if name not in given and (name == "test" or cfg.val_fraction > 0)
    )
    check_class_sizes(labels, drawn, f"{folder / 'train'}", classes)
    idx = np.arange(len(files), dtype=np.int64)
    test_idx = val_idx = np.empty(0, dtype=np.int64)
    if "test" in drawn:
        keep, held = _stratified_split(
            labels[idx], cfg.test_fraction, cfg.split_seed, "test", keep_each=len(drawn)
        )
        idx, test_idx = idx[keep], idx[held]
    if "val" in drawn:
        keep, held = _stratified_split(labels[idx], cfg.val_fraction, cfg.split_seed, "val")
        idx, val_idx = idx[keep], idx[held]
    splits: dict[str, tuple[list[Path], np.ndarray]] = {}
    for name, part in (("train", idx), ("val", val_idx), ("test", test_idx)):
        splits[name] = given.get(name) or ([files[i] for i in part], labels[part])
    # Files are listed class by class: the test split must not stay in that order.
    test_files, test_labels = splits["test"]
    order = shuffled(np.arange(len(test_files), dtype=np.int64), cfg.split_seed)
    splits["test"] = ([test_files[i] for i in order], test_labels[order])
    return splits


def _write_images(
    target: Path,
    files: list[Path],
    channels: int,
    size: tuple[int, int],
    max_pixels: int,
    sums: np.ndarray | None = None,
) -> None:
    """Write the images as one uint8 ``[N, C, H, W]`` NumPy file, decoding one at a time.

    Args:
        target: The ``.npy`` file to write.
        files: The images, in order.
        channels: 1 or 3.
        size: ``(width, height)`` of every stored image.
        max_pixels: ``data.max_image_pixels``.
        sums: When given, per-channel sums of the pixels and of their squares (in ``[0, 1]``
            units) are added to its two rows.
    """
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": (len(files), channels, size[1], size[0]),
    }

    def write(fh: IO[bytes]) -> None:
        np.lib.format.write_array_header_1_0(fh, header)
        for path in files:
            img = _read_image(path, channels, size, max_pixels)
            fh.write(img.tobytes())  # C order, as the header says
            if sums is not None:
                pixels = img.reshape(channels, -1).astype(np.float64) / 255.0
                sums[0] += pixels.sum(axis=1)
                sums[1] += np.square(pixels).sum(axis=1)

    atomic_write_bytes(target, write)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _scan_folder(split_dir: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """The image files under ``split_dir/<class>/`` (sorted) and their class indices."""
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and _visible(d))
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(
            f"class folder {split_dir / unknown[0]} has no counterpart in train/ "
            f"(train classes: {', '.join(classes)})"
        )
    files: list[Path] = []
    labels: list[int] = []
    for name in found:
        images = sorted(
            f
            for f in (split_dir / name).rglob("*")
            if f.is_file() and _visible(f) and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise DataError(
                f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        files.extend(images)
        labels.extend([classes.index(name)] * len(images))
    return files, np.asarray(labels, dtype=np.int64)


def _image_geometry(
    files: list[Path], image_size: int | None, max_pixels: int
) -> tuple[int, tuple[int, int]]:
    """Channels (1 if every image is grayscale, else 3) and the ``(width, height)`` to store.

    Reads only the image headers, so an image too large (above ``max_pixels``) or not an image
    at all is refused before anything is decoded. Without ``image_size`` every image must have
    the first's size.
    """
    gray = True
    first: tuple[Path, tuple[int, int]] | None = None
    for path in files:
        with _open_image(path, max_pixels) as im:
            mode, size = im.mode, im.size
        gray = gray and mode in _GRAY_MODES
        if first is None:
            first = (path, size)
        elif image_size is None and size != first[1]:
            raise DataError(
                f"image {path} is {size[0]}x{size[1]} but {first[0]} is "
                f"{first[1][0]}x{first[1][1]}: set data.image_size to resize every image "
                "to one size"
            )
    if first is None:
        raise DataError("the image folder holds no images")
    size = (image_size, image_size) if image_size is not None else first[1]
    return (1 if gray else 3), size


def _read_image(path: Path, channels: int, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """Decode one image as uint8 ``[C, H, W]`` at ``size`` (width, height)."""
    from PIL import Image

    with _open_image(path, max_pixels) as im:
        try:
            im.load()  # decode now: a corrupt or truncated file fails here
            img = im.convert("L" if channels == 1 else "RGB")
            if img.size != size:
                img = img.resize(size, Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
        except Exception as exc:  # PIL raises many types for corrupt files
            raise DataError(_unreadable(path, exc)) from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@contextmanager
def _open_image(path: Path, max_pixels: int) -> Iterator[Any]:
    """``PIL.Image.open(path)``, its size checked from the header, PIL's warnings silenced.

    PIL opens lazily: the size is known before a pixel is decoded, so an image above
    ``data.max_image_pixels`` is refused without decoding it. PIL's own check (a
    ``DecompressionBombWarning`` of two lines on stderr, an error at twice its limit) is off
    meanwhile: this one replaces it, in one line naming the setting. Other PIL warnings (a
    corrupt EXIF block, say) are dropped: the image either decodes or is refused.

    Raises:
        DataError: The file is not a readable image, or is too large.
    """
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                im = Image.open(path)
            except Exception as exc:  # PIL raises many types for unreadable files
                raise DataError(_unreadable(path, exc)) from exc
            with im:
                width, height = im.size
                if width * height > max_pixels:
                    raise DataError(
                        f"image {path} is {width}x{height} ({width * height:,} pixels), above "
                        f"data.max_image_pixels ({max_pixels:,}): shrink it or raise the "
                        "setting"
                    )
                yield im
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _unreadable(path: Path, exc: BaseException) -> str:
    """One line saying why ``path`` cannot be read as an image."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return f"cannot read image {path}: {reason}"


# --------------------------------------------------------------------------------------------
# Splitting, statistics, writing
# --------------------------------------------------------------------------------------------


def _split_three(
    x: torch.Tensor, y: torch.Tensor, cfg: DataConfig, source: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split into train/val/test: test first, then val as a share of the remainder."""
    labels = y.numpy()
    drawn = ("test", "val") if cfg.val_fraction > 0 else ("test",)
    check_class_sizes(labels, drawn, source)
    rest_idx, test_idx = _stratified_split(
        labels, cfg.test_fraction, cfg.split_seed, "test", keep_each=len(drawn)
    )
    test_idx = shuffled(test_idx, cfg.split_seed)
    train_rel, val_rel = _stratified_split(
        labels[rest_idx], cfg.val_fraction, cfg.split_seed, "val"
    )
    train_idx, val_idx = rest_idx[train_rel], rest_idx[val_rel]
    return (
        _take(x, train_idx),
        _take(y, train_idx),
        _take(x, val_idx),
        _take(y, val_idx),
        _take(x, test_idx),
        _take(y, test_idx),
    )


def check_class_sizes(
    labels: np.ndarray,
    drawn: Sequence[str],
    source: str,
    names: Sequence[str] | None = None,
) -> None:
    """Refuse a class with fewer samples than the splits drawn from ``labels`` need.

    Every class needs one sample in the training split and one in each split drawn from the
    same data (``drawn``: ``test`` and/or ``val``); with fewer it would be missing from one of
    them while ``num_classes`` counts it.

    Args:
        labels: Class index of every sample the splits are drawn from.
        drawn: The splits drawn from them besides ``train``.
        source: Where the samples come from, for the message.
        names: Class names by index (default: the index).

    Raises:
        DataError: Naming the first such class, its count and what the splits need.
    """
    need = 1 + len(drawn)
    counts = np.bincount(labels, minlength=len(names) if names else 0)
    noun = "image" if names is not None else "sample"
    for label, count in enumerate(counts.tolist()):
        if count < need:
            name = names[label] if names is not None else str(label)
            raise DataError(
                f"class {name!r} has {count} {noun}{'' if count == 1 else 's'} in {source}, "
                f"but the splits need at least {need} of each class (one each in "
                f"{', '.join(('train', *drawn))}): add {noun}s of it"
                + (
                    f" or give the folder{'s' if len(drawn) > 1 else ''} "
                    + " and ".join(f"{d}/" for d in drawn)
                    if names is not None
                    else ""
                )
            )


def _stratified_split(
    labels: np.ndarray, fraction: float, seed: int, name: str, *, keep_each: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted ``(keep, held_out)`` indices with ``fraction`` held out, stratified.

    Every class keeps at least ``keep_each`` samples and, when anything is held out, has at
    least one in the held-out split (:func:`check_class_sizes` has made sure it can).
    scikit-learn's split is used when it gives that; data too small for it (fewer held-out
    samples than classes, say) is split class by class instead, which holds out one sample
    of a class even where ``fraction`` of it rounds to none.

    Args:
        labels: Class index of every sample.
        fraction: Share held out (0: none).
        seed: ``data.split_seed``.
        name: The held-out split's name, for the log.
        keep_each: Samples of each class the kept part must retain.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(labels.shape[0], dtype=np.int64)
    if fraction <= 0.0:
        return idx, np.empty(0, dtype=np.int64)
    classes = np.unique(labels)

    def has_each(part: np.ndarray, minimum: int) -> bool:
        counts = np.bincount(labels[part], minlength=int(classes[-1]) + 1)
        return bool((counts[classes] >= minimum).all())

    try:
        keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:
        keep = held = None
    if keep is None or not (has_each(held, 1) and has_each(keep, keep_each)):
        keep, held = _split_each_class(labels, fraction, seed, keep_each)
        _log.info(
            "%s split: %d of %d samples (not %g of them), so that it holds every one of the "
            "%d classes",
            name,
            len(held),
            len(labels),
            fraction,
            len(classes),
        )
    # Sorted indices keep the source order inside each split.
    return np.sort(keep), np.sort(held)


def _split_each_class(
    labels: np.ndarray, fraction: float, seed: int, keep_each: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * n)`` of each class's ``n`` samples, at least 1, at random."""
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n = len(members)
        n_held = min(max(1, round(fraction * n)), n - keep_each)
        held.append(members[:n_held])
        keep.append(members[n_held:])
    return np.concatenate(keep).astype(np.int64), np.concatenate(held).astype(np.int64)


def shuffled(idx: np.ndarray, seed: int) -> np.ndarray:
    """``idx`` in a random order fixed by ``seed`` (``data.split_seed``).

    The test split is stored in this order, never sorted by class, whatever the source: the
    first rows of a split (examples, a quick check on a prefix) are then a fair sample.
    """
    return np.random.default_rng(seed).permutation(np.asarray(idx, dtype=np.int64))


def _take(t: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    return t[torch.from_numpy(idx)]


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in ``[0, 1]`` units."""
    channels = x.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    # Chunked so large sets (CIFAR) never need a full float64 copy in memory.
    for start in range(0, x.shape[0], 4096):
        chunk = x[start : start + 4096].to(torch.float64).div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    # A constant channel would divide by zero; leaving it unscaled is harmless.
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
