"""Dataset preparation and loading.

:func:`prepare_data` turns one of the supported datasets into three splits stored as
``train.pt``, ``val.pt`` and ``test.pt`` (each ``{"x": uint8 [N, C, H, W], "y": int64 [N]}``)
plus ``meta.json`` describing them (:class:`DataMeta`). :func:`load_split` reads a split back as
a normalised float tensor dataset. Every failure caused by the data itself (missing files, a
corrupt IDX file, a failed download) is reported as a single :class:`DataError`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from switchprune.config import DataConfig
from switchprune.errors import InputError
from switchprune.io import file_digest

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "idx")
SPLITS: tuple[str, ...] = ("train", "val", "test")
META_FILE = "meta.json"

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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def prepare_data(cfg: DataConfig, *, raw_dir: Path, out_dir: Path) -> dict[str, float]:
    """Materialise the dataset as train/val/test tensors under ``out_dir``.

    Args:
        cfg: Which dataset to use and how to split it.
        raw_dir: Where torchvision datasets live (and are downloaded to if allowed).
        out_dir: Output directory; created if missing. Existing splits are replaced.

    Returns:
        Flat metrics ``{"n_train", "n_val", "n_test", "num_classes"}``.

    Raises:
        DataError: If the dataset is unknown, missing, corrupt or cannot be downloaded.
    """
    raw_dir = Path(raw_dir)
    out_dir = Path(out_dir)
    source = source_dir(cfg, raw_dir)
    if cfg.dataset == "digits":
        if not (source.is_dir() and _find_by_prefix(source, _IMAGES_RE)):
            export_digits(source)
        x_train, y_train, x_val, y_val, x_test, y_test, num_classes = _prepare_idx_dir(cfg, source)
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
        source_md5=dvc_md5(source),
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop the old meta first so a half-rewritten directory never looks complete.
    (out_dir / META_FILE).unlink(missing_ok=True)
    splits = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
    for name, (x, y) in splits.items():
        payload = {"x": x.contiguous(), "y": y.contiguous()}
        _atomic_write(out_dir / f"{name}.pt", lambda fh, p=payload: torch.save(p, fh))
    meta_text = json.dumps(dataclasses.asdict(meta), indent=2) + "\n"
    _atomic_write(out_dir / META_FILE, lambda fh: fh.write(meta_text.encode("utf-8")))

    return {
        "n_train": meta.n_train,
        "n_val": meta.n_val,
        "n_test": meta.n_test,
        "num_classes": meta.num_classes,
    }


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
        raise DataError(f"prepared data not found: {path} is missing") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    fields = [f.name for f in dataclasses.fields(DataMeta)]
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise DataError(f"{path} does not describe a prepared dataset (expected keys {fields})")
    try:
        return DataMeta(
            dataset=str(raw["dataset"]),
            in_shape=tuple(int(d) for d in raw["in_shape"]),  # type: ignore[arg-type]
            num_classes=int(raw["num_classes"]),
            mean=tuple(float(v) for v in raw["mean"]),
            std=tuple(float(v) for v in raw["std"]),
            n_train=int(raw["n_train"]),
            n_val=int(raw["n_val"]),
            n_test=int(raw["n_test"]),
            source_md5=str(raw["source_md5"]),
        )
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path} has a malformed field: {exc}") from exc


def load_split(data_dir: Path, split: str) -> TensorDataset:
    """Load one prepared split, normalised with the training statistics.

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
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    path = data_dir / f"{split}.pt"
    try:
        blob = torch.load(path, weights_only=True)
    except FileNotFoundError as exc:
        raise DataError(f"prepared split not found: {path} is missing") from exc
    except Exception as exc:  # torch raises assorted types for a damaged file
        raise DataError(f"cannot read {path}: {exc}") from exc

    x, y = (blob.get("x"), blob.get("y")) if isinstance(blob, dict) else (None, None)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(f"{path} must hold tensors 'x' and 'y'")
    expected_n = {"train": meta.n_train, "val": meta.n_val, "test": meta.n_test}[split]
    if (
        x.dtype != torch.uint8
        or tuple(x.shape[1:]) != meta.in_shape
        or y.dtype != torch.int64
        or y.shape != (x.shape[0],)
        or x.shape[0] != expected_n
    ):
        raise DataError(
            f"{path} does not match {META_FILE}: x {x.dtype} {tuple(x.shape)}, "
            f"y {y.dtype} {tuple(y.shape)}, expected {expected_n} samples of {meta.in_shape}"
        )

    mean = torch.tensor(meta.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float32).view(-1, 1, 1)
    xf = x.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return TensorDataset(xf, y)


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

    These files are the versioned raw data of the ``digits`` dataset: DVC tracks them, and a
    fresh checkout without access to the DVC remote can recreate exactly the same bytes.

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
        _atomic_write(out_dir / name, lambda fh, b=blob: fh.write(b))
    return out_dir


def source_dir(cfg: DataConfig, raw_dir: Path) -> Path:
    """Where the raw data of the configured dataset lives."""
    if cfg.dataset == "idx":
        return Path(cfg.idx_dir or "")
    if cfg.dataset in _TORCHVISION:
        return Path(raw_dir) / _TORCHVISION[cfg.dataset]
    return Path(raw_dir) / cfg.dataset


def dvc_md5(path: Path) -> str:
    """The hash DVC 3 records for a file or directory (``dvc add``, ``dvc.lock``).

    A file's hash is the md5 of its bytes. A directory's is the md5 of the JSON list of its
    files' ``{"md5", "relpath"}`` sorted by path, with ``.dir`` appended.
    """
    path = Path(path)
    if path.is_file():
        return file_digest(path, "md5")
    if not path.is_dir():
        raise DataError(f"cannot hash {path}: no such file or directory")
    entries = [
        {"md5": file_digest(f, "md5"), "relpath": f.relative_to(path).as_posix()}
        for f in path.rglob("*")
        if f.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def _prepare_idx_dir(cfg: DataConfig, idx_dir: Path) -> _Prepared:
    x, y = _read_idx_dir(idx_dir)
    num_classes = int(y.max().item()) + 1
    files = sorted(p.name for p in _find_by_prefix(idx_dir, _LABELS_RE).values())
    check_labels(y, num_classes, f"labels file(s) {', '.join(files)} in {idx_dir}")
    return (*_split_three(x, y, cfg), num_classes)


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
    train_idx, val_idx = _stratified_split(y_trainval.numpy(), cfg.val_fraction, cfg.split_seed)
    return (
        _take(x_trainval, train_idx),
        _take(y_trainval, train_idx),
        _take(x_trainval, val_idx),
        _take(y_trainval, val_idx),
        x_test,
        y_test,
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
# Splitting, statistics, writing
# --------------------------------------------------------------------------------------------


def _split_three(
    x: torch.Tensor, y: torch.Tensor, cfg: DataConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split into train/val/test: test first, then val as a share of the remainder."""
    labels = y.numpy()
    rest_idx, test_idx = _stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    train_rel, val_rel = _stratified_split(labels[rest_idx], cfg.val_fraction, cfg.split_seed)
    train_idx, val_idx = rest_idx[train_rel], rest_idx[val_rel]
    return (
        _take(x, train_idx),
        _take(y, train_idx),
        _take(x, val_idx),
        _take(y, val_idx),
        _take(x, test_idx),
        _take(y, test_idx),
    )


def _stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted ``(keep, held_out)`` indices with ``fraction`` held out, stratified."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(labels.shape[0], dtype=np.int64)
    if fraction <= 0.0:
        return idx, np.empty(0, dtype=np.int64)
    try:
        keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as strat_exc:
        # Stratification needs >= 2 samples per class; tiny or very skewed data cannot have it.
        try:
            keep, held = train_test_split(idx, test_size=fraction, random_state=seed)
        except ValueError as exc:
            raise DataError(
                f"cannot hold out {fraction:g} of {labels.shape[0]} samples: {exc}"
            ) from exc
        warnings.warn(f"split is not stratified: {strat_exc}", stacklevel=3)
    # Sorted indices keep the source order inside each split.
    return np.sort(keep), np.sort(held)


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


def _atomic_write(target: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``target`` through a temporary file in the same directory, then rename it in place.

    Readers therefore see either the old file or the complete new one, never a partial write.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "DATASETS",
    "DataError",
    "DataMeta",
    "prepare_data",
    "load_meta",
    "load_split",
    "read_idx",
]
