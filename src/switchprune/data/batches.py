"""Batches of a split, from memory or streamed, and training-time augmentation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from switchprune.config import DataConfig
from switchprune.data.meta import DataMeta
from switchprune.data.prepared import PreparedSplit

# ``data.loader: auto`` streams when the training split as float32 would take more than this.
MEMORY_LOADER_MAX_BYTES = 1 << 30
# Datasets whose labels survive a horizontal mirror image. Digits do not (a mirrored 2 or 7 is
# no digit, and a mirrored digit set teaches shapes that never occur); image folders are
# assumed to hold natural images, like CIFAR.
FLIP_SAFE: tuple[str, ...] = ("folder", "cifar10", "cifar100", "fashion_mnist")


def iter_batches(
    data: TensorDataset | PreparedSplit,
    batch_size: int,
    *,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of a split in order, from memory or streamed from disk.

    Args:
        data: A tensor dataset (:func:`~switchprune.data.load_split`) or a streamed split
            (:func:`~switchprune.data.open_split`).
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
        data, batch_size=None, sampler=batches, num_workers=num_workers, pin_memory=pin_memory
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


def shard(count: int, rank: int = 0, world: int = 1) -> slice:
    """The positions of a batch of ``count`` samples that process ``rank`` of ``world`` takes.

    Strided, as a ``DistributedSampler`` deals an epoch's order: rank ``r`` takes positions
    ``r, r + world, r + 2 * world, ...``, so the ranks' shares of a global batch together are
    the batch one process trains on, in equal parts. A batch that does not divide equally (an
    epoch's last) is taken whole by every rank, so the ranks' mean gradient is still the one
    process's.
    """
    if world == 1 or count % world:
        return slice(None)
    return slice(rank, None, world)


def split_shard(
    data: TensorDataset | PreparedSplit, rank: int, world: int
) -> TensorDataset | PreparedSplit:
    """Every ``world``-th sample of a split from ``rank`` on (the split itself for one process)."""
    if world == 1:
        return data
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[rank::world] for t in data.tensors))
    return data.subset(torch.arange(rank, len(data), world))


def augment_batch(
    x: torch.Tensor,
    aug: Augmentation,
    generator: torch.Generator,
    *,
    count: int | None = None,
    part: slice = slice(None),
) -> torch.Tensor:
    """Randomly crop (with zero padding) and, if ``aug.flip``, mirror each image of a batch.

    Vectorised: one gather for the whole batch, on ``x``'s device. The random draws come from
    ``generator`` (on the CPU), so they are the same on every device. Padding is zero after
    normalisation, i.e. the training mean.

    Args:
        x: Normalised images ``[B, C, H, W]``.
        aug: What to apply.
        generator: Source of the random offsets and flips.
        count: ``x`` is a process's share of a batch of this many images (default: ``B``).
            The draws are made for the whole batch, so each share gets the crops and flips
            one process would give its images.
        part: The positions of ``x`` in that batch (see :func:`shard`).

    Returns:
        A new batch of the same shape.
    """
    b, _c, h, w = x.shape
    n = b if count is None else count
    p = aug.pad
    dy = torch.randint(0, 2 * p + 1, (n, 1), generator=generator)[part]
    dx = torch.randint(0, 2 * p + 1, (n, 1), generator=generator)[part]
    cols = torch.arange(w).expand(b, w)
    if aug.flip:
        flip = (torch.rand((n, 1), generator=generator) < 0.5)[part]
        cols = torch.where(flip, (w - 1) - cols, cols)
    rows = (dy + torch.arange(h)).to(x.device)
    cols = (dx + cols).to(x.device)
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    batch = torch.arange(b, device=x.device)
    # Advanced indices around the channel slice: the result is [B, H, W, C].
    out = padded[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


@dataclass
class TrainingData:
    """Training samples: tensors on the device (memory) or views of a split on disk (stream)."""

    y: torch.Tensor  # labels (their count drives the epoch)
    x: torch.Tensor | None = None
    stream: PreparedSplit | None = None

    @classmethod
    def of(cls, train: TensorDataset | PreparedSplit, device: torch.device) -> TrainingData:
        """Every training sample: tensors moved to ``device``, or a stream."""
        if isinstance(train, TensorDataset):
            x, y = (t.to(device) for t in train.tensors)
            return cls(y=y, x=x)
        return cls(y=train.labels, stream=train)

    def hold_out(
        self, fraction: float, generator: torch.Generator
    ) -> TensorDataset | PreparedSplit:
        """Take a random ``fraction`` (at least one sample) away; the samples taken.

        Returns:
            The held-out samples (tensors on the CPU in memory mode).
        """
        order = torch.randperm(len(self.y), generator=generator)
        count = max(1, round(fraction * len(self.y)))
        held, rest = order[:count], order[count:]
        if self.stream is not None:
            taken = self.stream.subset(held)
            self.stream = self.stream.subset(rest)
            self.y = self.stream.labels
            return taken
        assert self.x is not None
        held, rest = held.to(self.x.device), rest.to(self.x.device)
        taken_x, taken_y = self.x[held], self.y[held]
        self.x, self.y = self.x[rest], self.y[rest]
        return TensorDataset(taken_x.cpu(), taken_y.cpu())

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``idx`` on ``device``."""
        if self.stream is not None:
            x, y = self.stream[idx.tolist()]
            return x.to(device), y.to(device)
        assert self.x is not None
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]

    def epoch(
        self,
        order: torch.Tensor,
        batch_size: int,
        device: torch.device,
        *,
        augment: Augmentation | None = None,
        generator: torch.Generator | None = None,
        num_workers: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An epoch's batches on ``device``, in ``order``, augmented when ``augment`` is given.

        With ``world`` processes, ``batch_size`` is the global batch and this process
        (``rank``) gets its share of each (:func:`shard`). Streamed splits are read through a
        ``DataLoader`` (pinned memory on CUDA); close the iterator to stop its workers early.
        """
        starts = range(0, len(order), batch_size)
        sizes = [min(batch_size, len(order) - i) for i in starts]
        parts = [shard(size, rank, world) for size in sizes]
        if self.stream is None:
            assert self.x is not None
            batches: Any = (
                (self.x[idx], self.y[idx])
                for i, part in zip(starts, parts, strict=True)
                for idx in [order[i : i + batch_size][part].to(device)]
            )
        else:
            cuda = device.type == "cuda"
            loader = batch_loader(
                self.stream,
                [
                    order[i : i + batch_size][part].tolist()
                    for i, part in zip(starts, parts, strict=True)
                ],
                num_workers=num_workers,
                pin_memory=cuda,
            )
            batches = (
                (x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda))
                for x, y in loader
            )
        for (x, y), size, part in zip(batches, sizes, parts, strict=False):
            if augment is not None:
                assert generator is not None
                x = augment_batch(x, augment, generator, count=size, part=part)
            yield x, y
