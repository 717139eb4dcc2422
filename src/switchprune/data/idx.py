"""IDX files (the format of MNIST), plain or gzipped, and ``idx``: a directory of them.

torchvision's reader (``torchvision.datasets.mnist.read_sn3_pascalvincent_tensor``) is not used:
it cannot open gzipped files, reads at most three dimensions and reports a bad header or a
truncated file as a bare ``AssertionError``, where :func:`read_idx` names the file and the fault.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from switchprune.config import DataConfig
from switchprune.data.meta import DataError
from switchprune.data.split import Splits, check_labels, split_indices, take

# IDX type codes (third magic byte) and their big-endian numpy dtypes.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGES_RE = re.compile(r"^(?P<prefix>.*)images-idx3-ubyte(?P<gz>\.gz)?$")
LABELS_RE = re.compile(r"^(?P<prefix>.*)labels-idx1-ubyte(?P<gz>\.gz)?$")


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
    if data[:2] == b"\x1f\x8b":  # the gzip magic number
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


def prepare(cfg: DataConfig) -> tuple[Splits, int]:
    """The splits and class count of dataset ``idx``: the IDX files in ``data.idx_dir``."""
    if not cfg.idx_dir:
        raise DataError("dataset 'idx' needs data.idx_dir")
    return prepare_dir(cfg, Path(cfg.idx_dir))


def prepare_dir(cfg: DataConfig, idx_dir: Path) -> tuple[Splits, int]:
    """The splits and class count of every images/labels pair in ``idx_dir``, together."""
    x, y = _read_dir(idx_dir)
    num_classes = int(y.max().item()) + 1
    files = sorted(p.name for p in find_by_prefix(idx_dir, LABELS_RE).values())
    source = f"labels file(s) {', '.join(files)} in {idx_dir}"
    check_labels(y, num_classes, source)
    parts = split_indices(y.numpy(), cfg, source)
    return {name: take(x, y, i) for name, i in parts.items()}, num_classes


def _read_dir(idx_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and concatenate every images/labels pair of an IDX directory, in filename order."""
    if not idx_dir.is_dir():
        raise DataError(f"IDX directory {idx_dir} does not exist")
    images = find_by_prefix(idx_dir, IMAGES_RE)
    labels = find_by_prefix(idx_dir, LABELS_RE)
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


def find_by_prefix(idx_dir: Path, pattern: re.Pattern[str]) -> dict[str, Path]:
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
