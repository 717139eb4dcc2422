"""Checking labels and splitting samples into train/val/test, stratified by class."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

import numpy as np
import torch

from switchprune.config import DataConfig
from switchprune.data.meta import DataError

# Each split's images and labels, by split name.
Splits = dict[str, tuple[torch.Tensor, torch.Tensor]]

_log = logging.getLogger(__name__)


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


def check_class_sizes(
    labels: np.ndarray, drawn: Sequence[str], source: str, names: Sequence[str] | None = None
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


def split_indices(
    labels: np.ndarray,
    cfg: DataConfig,
    source: str,
    *,
    given: Collection[str] = (),
    names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Draw the splits the data lacks from its samples: ``test``, then ``val`` from the rest.

    Args:
        labels: Class index of every sample.
        cfg: ``data.test_fraction``, ``data.val_fraction`` and ``data.split_seed``.
        source: Where the samples come from, for messages.
        given: The splits the data has of its own: not drawn, empty here.
        names: Class names by index, for messages (see :func:`check_class_sizes`).

    Returns:
        The indices of each split's samples: ``train``, ``val``, ``test``, in source order,
        but a drawn test split in the order of :func:`shuffled`.

    Raises:
        DataError: A class has too few samples for the splits drawn.
    """
    drawn = tuple(
        name
        for name in ("test", "val")
        if name not in given and (name == "test" or cfg.val_fraction > 0)
    )
    check_class_sizes(labels, drawn, source, names)
    rest = np.arange(len(labels), dtype=np.int64)
    parts = {"val": np.empty(0, dtype=np.int64), "test": np.empty(0, dtype=np.int64)}
    for name in drawn:
        # The test split leaves each class a sample for train and, when drawn next, for val.
        fraction, keep_each = (
            (cfg.test_fraction, len(drawn)) if name == "test" else (cfg.val_fraction, 1)
        )
        keep, held = stratified_split(
            labels[rest], fraction, cfg.split_seed, name, keep_each=keep_each
        )
        rest, parts[name] = rest[keep], rest[held]
    parts["test"] = shuffled(parts["test"], cfg.split_seed)
    return {"train": rest, **parts}


def take(x: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels at ``idx``."""
    rows = torch.from_numpy(idx)
    return x[rows], y[rows]


def stratified_split(
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
        n_held = min(max(1, round(fraction * len(members))), len(members) - keep_each)
        held.append(members[:n_held])
        keep.append(members[n_held:])
    return np.concatenate(keep).astype(np.int64), np.concatenate(held).astype(np.int64)


def shuffled(idx: np.ndarray, seed: int) -> np.ndarray:
    """``idx`` in a random order fixed by ``seed`` (``data.split_seed``).

    The test split is stored in this order, never sorted by class, whatever the source: the
    first rows of a split (examples, a quick check on a prefix) are then a fair sample.
    """
    return np.random.default_rng(seed).permutation(np.asarray(idx, dtype=np.int64))
