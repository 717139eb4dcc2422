"""``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: read (and downloaded) by torchvision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from switchprune.config import DataConfig
from switchprune.data.meta import TORCHVISION, DataError
from switchprune.data.split import Splits, check_labels, shuffled, split_indices, take


def prepare(cfg: DataConfig, raw_dir: Path) -> tuple[Splits, int]:
    """The splits and class count of a torchvision dataset: val drawn from its training set."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[cfg.dataset])
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
        parts.append(_tensors(ds, cfg.dataset, raw_dir))
        num_classes = len(ds.classes)
        check_labels(parts[-1][1], num_classes, f"dataset {cfg.dataset!r} in {raw_dir}")

    (x_trainval, y_trainval), (x_test, y_test) = parts
    source = f"the training set of {cfg.dataset!r} in {raw_dir}"
    picked = split_indices(y_trainval.numpy(), cfg, source, given=("test",))
    splits = {name: take(x_trainval, y_trainval, picked[name]) for name in ("train", "val")}
    splits["test"] = take(x_test, y_test, shuffled(np.arange(len(y_test)), cfg.split_seed))
    return splits, num_classes


def _tensors(ds: Any, name: str, raw_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
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
