"""``folder``: an image folder in torchvision's ``ImageFolder`` layout, prepared image by image.

``train/<class>/<image>`` (images may sit in subfolders of a class folder), with optional
``val/`` and ``test/`` of the same layout. Image files are those ``ImageFolder`` reads
(its extensions, any case); hidden files and folders (a leading ``.``) are skipped.
Classes and files are listed in sorted path order.

The folders are listed here rather than by ``torchvision.datasets.folder.find_classes`` and
``make_dataset``: those count hidden folders (``.ipynb_checkpoints``) as classes, read hidden
files (macOS's ``._*.png``), and follow links to folders inside a class folder, whose images
the data's hash (:func:`~switchprune.dvcfiles.dvc_md5`) would not cover.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from switchprune.config import DataConfig
from switchprune.data.meta import DataError, DataMeta, channel_stats
from switchprune.data.split import shuffled, split_indices
from switchprune.dvcfiles import dvc_md5
from switchprune.io import atomic_write_bytes

# PIL modes without colour: a folder whose images all have one of them is prepared as 1 channel.
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# torchvision's ImageFolder's endings (``torchvision.datasets.folder.IMG_EXTENSIONS``), any
# case: importing torchvision for them costs every preprocess seconds (a test checks they agree).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_FolderSplits = dict[str, tuple[list[Path], np.ndarray]]


def write_folder(cfg: DataConfig, folder: Path, out_dir: Path) -> DataMeta:
    """Prepare an image folder as ``<split>_{x,y}.npy`` in ``out_dir``, one image at a time.

    Args:
        cfg: ``data.*``: the splits, ``image_size`` and ``max_image_pixels``.
        folder: The image folder (``data.folder_dir``).
        out_dir: Where to write the split files.

    Returns:
        The description of what was written.

    Raises:
        DataError: The folder's layout, an image or a class size is unusable.
    """
    classes = _classes(folder)
    splits = _splits(cfg, folder, classes)
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
    mean, std = channel_stats(sums, n_train * size[0] * size[1])
    return DataMeta(
        dataset="folder",
        in_shape=(channels, size[1], size[0]),
        num_classes=len(classes),
        mean=mean,
        std=std,
        n_train=n_train,
        n_val=len(splits["val"][0]),
        n_test=len(splits["test"][0]),
        source_md5=dvc_md5(folder),
        class_names=tuple(classes),
        storage="npy",
    )


def _classes(folder: Path) -> list[str]:
    """The class folder names under ``folder/train``, sorted (at least two)."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} (data.folder_dir) does not exist")
    train_dir = folder / "train"
    if not train_dir.is_dir():
        raise DataError(f"image folder {folder} has no train/ directory (train/<class>/<image>)")
    classes = _subfolders(train_dir)
    if len(classes) < 2:
        raise DataError(
            f"{train_dir} needs at least two class folders, found {len(classes)}"
            + (f" ({classes[0]})" if classes else "")
        )
    return classes


def _subfolders(path: Path) -> list[str]:
    """The names of the folders in ``path`` that are not hidden, sorted."""
    return sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _splits(cfg: DataConfig, folder: Path, classes: list[str]) -> _FolderSplits:
    """The image files and labels of each split: the folder's own, or shares of ``train/``."""
    files, labels = _scan(folder / "train", classes)
    given = {
        name: _scan(folder / name, classes) for name in ("val", "test") if (folder / name).is_dir()
    }
    for name, (split_files, _) in given.items():
        if not split_files:
            raise DataError(f"{folder / name} holds no class folders (<class>/<image>)")
    # Splits the folder lacks are stratified shares of train/, as for the other datasets.
    parts = split_indices(labels, cfg, f"{folder / 'train'}", given=given, names=classes)
    splits = {
        name: given.get(name) or ([files[i] for i in part], labels[part])
        for name, part in parts.items()
    }
    if "test" in given:  # listed class by class: stored in a random order, as a drawn one is
        test_files, test_labels = given["test"]
        order = shuffled(np.arange(len(test_files)), cfg.split_seed)
        splits["test"] = ([test_files[i] for i in order], test_labels[order])
    return splits


def _scan(split_dir: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """The image files under ``split_dir/<class>/`` (sorted) and their class indices."""
    found = _subfolders(split_dir)
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
            if f.is_file()
            and not f.name.startswith(".")
            and f.name.lower().endswith(IMG_EXTENSIONS)
        )
        if not images:
            raise DataError(
                f"class folder {split_dir / name} holds no images ({', '.join(IMG_EXTENSIONS)})"
            )
        files.extend(images)
        labels.extend([classes.index(name)] * len(images))
    return files, np.asarray(labels, dtype=np.int64)


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
