"""Build small image folders (torchvision's ImageFolder layout) from scikit-learn's digits.

``write_digits_folder(root)`` writes ``root/train/<class>/<n>.png`` (and, on request, ``val/``
and ``test/``) as real PNG files, so tests of the ``folder`` dataset need no download.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

# Class folder names whose sorted order is not the digit order (as ImageFolder sorts them).
CLASS_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as uint8 ``[N, 8, 8]`` (0..255) and their labels."""
    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images) * (255.0 / 16.0)).astype(np.uint8)
    return images, np.asarray(bunch.target, dtype=np.int64)


def write_digits_folder(
    root: Path,
    *,
    per_class: int = 12,
    classes: int = 10,
    splits: Sequence[str] = ("train",),
    per_split: dict[str, int] | None = None,
    sizes: Sequence[tuple[int, int]] = ((8, 8),),
    color: bool = False,
) -> Path:
    """Write digits as PNG files in ImageFolder layout.

    Args:
        root: The folder to create (``root/<split>/<class>/<i>.png``).
        per_class: Images per class in ``train/``.
        classes: How many digit classes (the first ``classes`` of :data:`CLASS_NAMES`).
        splits: Split folders to write; ``val``/``test`` get ``per_split[split]`` images per
            class (default 3), different images from ``train``'s.
        per_split: Images per class of each split other than ``train``.
        sizes: ``(width, height)`` cycled over the images (resized with nearest neighbour), to
            give a folder of mixed sizes.
        color: Write RGB images (each class tinted differently) instead of grayscale.

    Returns:
        ``root``.
    """
    images, labels = digit_images()
    counts = {"train": per_class, **{s: 3 for s in ("val", "test")}, **(per_split or {})}
    k = 0
    for c in range(classes):
        pool = images[labels == c]
        used = 0
        for split in splits:
            folder = root / split / CLASS_NAMES[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                img = Image.fromarray(pool[used])
                used += 1
                if color:
                    tint = np.array([1.0, 0.5 + 0.05 * c, 1.0 - 0.08 * c])
                    rgb = np.rint(np.asarray(img)[..., None] * tint).astype(np.uint8)
                    img = Image.fromarray(rgb)
                size = sizes[k % len(sizes)]
                k += 1
                if img.size != size:
                    img = img.resize(size, Image.Resampling.NEAREST)
                img.save(folder / f"{i:03d}.png")
    return root
