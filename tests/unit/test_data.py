"""Tests of dataset preparation, storage and loading."""

from __future__ import annotations

import gzip
import json
import logging
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from switchprune.config import ConfigError, DataConfig, from_dict
from switchprune.data import (
    DATASETS,
    DataError,
    DataMeta,
    load_meta,
    load_split,
    prepare_data,
    read_idx,
)

_TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """Write ``arr`` as an IDX file (big-endian), gzipped when the name ends in ``.gz``."""
    code = _TYPE_CODES[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    blob = header + body
    if path.name.endswith(".gz"):
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


def make_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    # Balanced classes so that stratified splits are possible.
    y = np.arange(n, dtype=np.uint8) % 10
    return x, rng.permutation(y).astype(np.uint8)


def raw_split(out: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    blob = torch.load(out / f"{split}.pt", weights_only=True)
    return blob["x"], blob["y"]


def sorted_rows(x: torch.Tensor) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1).numpy()
    return flat[np.lexsort(flat.T[::-1])]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "prepared"
    prepare_data(DataConfig(dataset="digits"), raw_dir=out / "unused", out_dir=out)
    return out


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_every_listed_dataset_is_a_valid_config_value(name: str):
    cfg = from_dict(DataConfig, {"dataset": name, "idx_dir": "raw", "folder_dir": "raw"})
    assert cfg.dataset == name


def test_a_dataset_that_is_not_listed_is_refused_by_the_config():
    assert "imagenet" not in DATASETS
    with pytest.raises(ConfigError, match="dataset"):
        from_dict(DataConfig, {"dataset": "imagenet"})


def test_digits_meta_and_sizes(digits_dir: Path):
    meta = load_meta(digits_dir)
    assert meta.dataset == "digits"
    assert meta.in_shape == (1, 8, 8)
    assert meta.num_classes == 10
    assert len(meta.mean) == len(meta.std) == 1
    assert meta.n_train + meta.n_val + meta.n_test == 1797
    # test_fraction 0.2 of all, then val_fraction 0.1 of the rest.
    assert abs(meta.n_test - 0.2 * 1797) <= 1
    assert abs(meta.n_val - 0.1 * (1797 - meta.n_test)) <= 1
    for split, n in (("train", meta.n_train), ("val", meta.n_val), ("test", meta.n_test)):
        x, y = raw_split(digits_dir, split)
        assert x.dtype == torch.uint8 and tuple(x.shape) == (n, 1, 8, 8)
        assert y.dtype == torch.int64 and tuple(y.shape) == (n,)


def test_digits_prepare_returns_metrics_matching_meta(tmp_path: Path):
    out = tmp_path / "nested" / "dir"  # created on demand
    metrics = prepare_data(DataConfig(dataset="digits"), raw_dir=tmp_path, out_dir=out)
    meta = load_meta(out)
    assert metrics == {
        "n_train": meta.n_train,
        "n_val": meta.n_val,
        "n_test": meta.n_test,
        "num_classes": 10,
    }
    assert all(isinstance(v, int | float) for v in metrics.values())
    # Only the final files remain; no temporary leftovers.
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.pt", "train.pt", "val.pt"]
    stored = json.loads((out / "meta.json").read_text())
    assert (
        DataMeta(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}) == meta
    )


class Interrupt(Exception):
    pass


def test_interrupted_prepare_leaves_the_previous_directory_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "out"
    prepare_data(DataConfig(dataset="digits"), raw_dir=tmp_path, out_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = torch.save
    saves: list[str] = []

    def crash_on_val(obj, fh, *args, **kwargs):
        saves.append("save")
        if len(saves) == 2:  # train, then val
            fh.write(b"half a split")
            raise Interrupt
        real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_val)
    with pytest.raises(Interrupt):
        prepare_data(DataConfig(dataset="digits", split_seed=1), raw_dir=tmp_path, out_dir=out)
    monkeypatch.setattr(torch, "save", real_save)
    # The new splits were staged beside the directory: it is the previous one, whole, and
    # nothing of the failed run is left next to it.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert len(load_split(out, "train")) == load_meta(out).n_train


def test_digits_splits_partition_the_dataset(digits_dir: Path):
    bunch = load_digits()
    full = torch.from_numpy(np.rint(bunch.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
    parts = [raw_split(digits_dir, s) for s in ("train", "val", "test")]
    x_all = torch.cat([x for x, _ in parts])
    y_all = torch.cat([y for _, y in parts])
    # Same multiset of (label, image) rows as the source: nothing lost, nothing duplicated.
    joined = torch.cat([y_all[:, None].to(torch.uint8), x_all.reshape(len(x_all), -1)], dim=1)
    source = torch.cat(
        [torch.from_numpy(bunch.target).to(torch.uint8)[:, None], full.reshape(len(full), -1)],
        dim=1,
    )
    np.testing.assert_array_equal(sorted_rows(joined), sorted_rows(source))


def test_digits_pixels_scaled_to_uint8_range(digits_dir: Path):
    x, _ = raw_split(digits_dir, "train")
    allowed = {int(round(k * 255 / 16)) for k in range(17)}
    assert set(torch.unique(x).tolist()) <= allowed
    assert int(x.max()) == 255 and int(x.min()) == 0


def test_digits_split_is_stratified(digits_dir: Path):
    full = np.bincount(load_digits().target, minlength=10) / 1797
    for split in ("train", "val", "test"):
        _, y = raw_split(digits_dir, split)
        share = np.bincount(y.numpy(), minlength=10) / len(y)
        assert np.abs(share - full).max() < 0.02, split


def test_digits_split_is_deterministic_per_seed(tmp_path: Path, digits_dir: Path):
    again = tmp_path / "again"
    other = tmp_path / "other"
    prepare_data(DataConfig(dataset="digits"), raw_dir=tmp_path, out_dir=again)
    prepare_data(DataConfig(dataset="digits", split_seed=1), raw_dir=tmp_path, out_dir=other)
    for split in ("train", "val", "test"):
        x0, y0 = raw_split(digits_dir, split)
        x1, y1 = raw_split(again, split)
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x0, _ = raw_split(digits_dir, "test")
    x2, _ = raw_split(other, "test")
    assert x0.shape == x2.shape
    assert not torch.equal(x0, x2)
    assert load_meta(digits_dir).mean != load_meta(other).mean


def test_the_test_split_of_class_sorted_data_is_stored_shuffled(tmp_path: Path):
    """IDX files sorted by class give a test split in no class order, fixed by split_seed."""
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    x, _ = make_images(200, seed=11, size=8)
    y = np.repeat(np.arange(10, dtype=np.uint8), 20)  # 0, 0, ..., 9, 9
    write_pair(idx_dir, "train-", x, y, gz=False)
    tests = []
    for seed, out in ((0, "a"), (0, "b"), (1, "c")):
        cfg = DataConfig(dataset="idx", idx_dir=str(idx_dir), split_seed=seed)
        prepare_data(cfg, raw_dir=tmp_path, out_dir=tmp_path / out)
        tests.append(raw_split(tmp_path / out, "test"))
    y_test = tests[0][1]
    assert len(y_test) == 40 and torch.bincount(y_test).tolist() == [4] * 10
    assert not torch.equal(y_test, y_test.sort().values)  # not grouped by class
    # Classes are mixed from the very first rows on.
    assert len(set(y_test[:10].tolist())) >= 4
    assert torch.equal(tests[0][0], tests[1][0]) and torch.equal(y_test, tests[1][1])
    assert not torch.equal(y_test, tests[2][1])


def test_load_split_normalises_with_train_statistics(digits_dir: Path):
    meta = load_meta(digits_dir)
    train = load_split(digits_dir, "train")
    x, y = train.tensors
    assert x.dtype == torch.float32 and tuple(x.shape) == (meta.n_train, 1, 8, 8)
    assert y.dtype == torch.int64
    assert len(train) == meta.n_train
    per_channel_mean = x.mean(dim=(0, 2, 3))
    per_channel_std = x.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(per_channel_mean, torch.zeros(1), atol=1e-4)
    assert torch.allclose(per_channel_std, torch.ones(1), atol=1e-4)
    # Other splits use the same (train) statistics: undoing them gives the stored pixels.
    test_x, _ = load_split(digits_dir, "test").tensors
    raw_x, _ = raw_split(digits_dir, "test")
    restored = test_x * meta.std[0] + meta.mean[0]
    assert torch.allclose(restored, raw_x.float() / 255, atol=1e-5)


def test_zero_val_fraction_gives_empty_val_split(tmp_path: Path):
    cfg = DataConfig(dataset="digits", val_fraction=0.0)
    metrics = prepare_data(cfg, raw_dir=tmp_path, out_dir=tmp_path)
    assert metrics["n_val"] == 0
    assert metrics["n_train"] + metrics["n_test"] == 1797
    val = load_split(tmp_path, "val")
    x, y = val.tensors
    assert len(val) == 0
    assert tuple(x.shape) == (0, 1, 8, 8) and x.dtype == torch.float32
    assert tuple(y.shape) == (0,) and y.dtype == torch.int64


def test_load_split_rejects_unknown_split(digits_dir: Path):
    with pytest.raises(ValueError, match="unknown split"):
        load_split(digits_dir, "validation")


def test_load_from_missing_directory_raises_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="meta.json"):
        load_meta(tmp_path / "nothing")
    with pytest.raises(DataError, match="meta.json"):
        load_split(tmp_path / "nothing", "train")


def test_load_split_detects_split_inconsistent_with_meta(tmp_path: Path):
    prepare_data(DataConfig(dataset="digits"), raw_dir=tmp_path, out_dir=tmp_path)
    x, y = raw_split(tmp_path, "val")
    torch.save({"x": x[:5], "y": y[:5]}, tmp_path / "val.pt")
    with pytest.raises(DataError, match="val.pt"):
        load_split(tmp_path, "val")


def test_unknown_dataset_is_refused_before_anything_is_written(tmp_path: Path):
    with pytest.raises(ValueError, match="imagenet"):
        cfg = DataConfig(dataset="imagenet")  # type: ignore[arg-type]
        prepare_data(cfg, raw_dir=tmp_path, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a-images-idx3-ubyte", "a-images-idx3-ubyte.gz"])
def test_read_idx_roundtrip_plain_and_gzip(tmp_path: Path, name: str):
    x, _ = make_images(30, seed=0)
    got = read_idx(write_idx(tmp_path / name, x))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32])
def test_read_idx_wider_types_in_native_byte_order(tmp_path: Path, dtype: type):
    arr = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    got = read_idx(write_idx(tmp_path / "t.idx", arr))
    assert got.shape == (2, 3, 4)
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_read_idx_truncated_file_names_the_file(tmp_path: Path):
    x, _ = make_images(10, seed=0)
    path = write_idx(tmp_path / "cut-images-idx3-ubyte", x)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="cut-images-idx3-ubyte.*truncated"):
        read_idx(path)


def test_read_idx_truncated_header_and_empty_file(tmp_path: Path):
    x, _ = make_images(10, seed=0)
    path = write_idx(tmp_path / "h-images-idx3-ubyte", x)
    path.write_bytes(path.read_bytes()[:9])
    with pytest.raises(DataError, match="h-images-idx3-ubyte.*truncated"):
        read_idx(path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_read_idx_truncated_gzip_names_the_file(tmp_path: Path):
    x, _ = make_images(10, seed=0)
    path = write_idx(tmp_path / "cut-images-idx3-ubyte.gz", x)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError, match=r"cut-images-idx3-ubyte\.gz"):
        read_idx(path)


def test_read_idx_bad_magic_names_the_file(tmp_path: Path):
    x, _ = make_images(10, seed=0)
    path = write_idx(tmp_path / "bad-images-idx3-ubyte", x)
    blob = bytearray(path.read_bytes())
    blob[0:2] = b"\x12\x34"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="bad-images-idx3-ubyte.*magic"):
        read_idx(path)


def test_read_idx_unknown_type_code(tmp_path: Path):
    x, _ = make_images(10, seed=0)
    path = write_idx(tmp_path / "type-images-idx3-ubyte", x)
    blob = bytearray(path.read_bytes())
    blob[2] = 0x07
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="type-images-idx3-ubyte.*element type"):
        read_idx(path)


def test_read_idx_trailing_bytes_rejected(tmp_path: Path):
    x, _ = make_images(10, seed=0)
    path = write_idx(tmp_path / "long-images-idx3-ubyte", x)
    path.write_bytes(path.read_bytes() + b"\x00\x01")
    with pytest.raises(DataError, match="long-images-idx3-ubyte.*trailing"):
        read_idx(path)


# --------------------------------------------------------------------------------------------
# IDX dataset
# --------------------------------------------------------------------------------------------


def write_pair(
    idx_dir: Path, prefix: str, x: np.ndarray, y: np.ndarray, *, gz: bool
) -> tuple[Path, Path]:
    suffix = ".gz" if gz else ""
    return (
        write_idx(idx_dir / f"{prefix}images-idx3-ubyte{suffix}", x),
        write_idx(idx_dir / f"{prefix}labels-idx1-ubyte{suffix}", y),
    )


def idx_cfg(idx_dir: Path, **kw: object) -> DataConfig:
    return DataConfig(dataset="idx", idx_dir=str(idx_dir), **kw)  # type: ignore[arg-type]


def test_idx_dataset_concatenates_gzip_and_plain_pairs(tmp_path: Path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    x_a, y_a = make_images(150, seed=1)
    x_b, y_b = make_images(50, seed=2)
    write_pair(idx_dir, "train-", x_a, y_a, gz=True)
    write_pair(idx_dir, "t10k-", x_b, y_b, gz=False)
    out = tmp_path / "out"
    metrics = prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=out)

    meta = load_meta(out)
    assert meta.dataset == "idx"
    assert meta.in_shape == (1, 28, 28)
    assert meta.num_classes == 10 == metrics["num_classes"]
    assert meta.n_train + meta.n_val + meta.n_test == 200
    assert meta.n_test == 40 and meta.n_val == 16
    parts = [raw_split(out, s) for s in ("train", "val", "test")]
    x_all = torch.cat([x for x, _ in parts])
    expected = torch.from_numpy(np.concatenate([x_a, x_b])).unsqueeze(1)
    np.testing.assert_array_equal(sorted_rows(x_all), sorted_rows(expected))
    assert torch.cat([y for _, y in parts]).bincount().tolist() == [20] * 10
    x, y = load_split(out, "test").tensors
    assert tuple(x.shape) == (40, 1, 28, 28) and y.dtype == torch.int64


def test_idx_dataset_is_deterministic(tmp_path: Path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    write_pair(idx_dir, "", *make_images(200, seed=3), gz=False)
    prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "a")
    prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "b")
    for split in ("train", "val", "test"):
        assert torch.equal(raw_split(tmp_path / "a", split)[0], raw_split(tmp_path / "b", split)[0])


def test_idx_dataset_prefers_plain_copy_over_gzip_duplicate(tmp_path: Path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    x, y = make_images(200, seed=4)
    write_pair(idx_dir, "train-", x, y, gz=False)
    write_pair(idx_dir, "train-", x, y, gz=True)
    metrics = prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "out")
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == 200


def test_data_too_small_for_the_fractions_still_has_every_class_in_every_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """3 images of each of 10 classes: 0.2 of them is 6 test images, too few for 10 classes.

    Each class gives one image to test and one to val instead, said in one log line, with no
    warning.
    """
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    write_pair(idx_dir, "", *make_images(30, seed=11), gz=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="switchprune.data"):
            metrics = prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "out")
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (10, 10, 10)
    for split in ("train", "val", "test"):
        assert sorted(raw_split(tmp_path / "out", split)[1].tolist()) == list(range(10))
    assert any("so that it holds every one of the 10 classes" in m for m in caplog.messages)
    again = prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "again")
    assert again == metrics
    assert (tmp_path / "again" / "test.pt").read_bytes() == (
        tmp_path / "out" / "test.pt"
    ).read_bytes()


@pytest.mark.parametrize(
    ("count", "val_fraction", "need", "splits"),
    [(1, 0.1, 3, "train, test, val"), (2, 0.1, 3, "train, test, val"), (1, 0.0, 2, "train, test")],
)
def test_a_class_too_small_for_the_splits_is_refused_naming_it_and_its_count(
    tmp_path: Path, count: int, val_fraction: float, need: int, splits: str
):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    x, y = make_images(200, seed=3)
    y = np.where(y == 7, 3, y).astype(np.uint8)  # no 7 left: class 7 gets `count` images
    y[np.flatnonzero(y == 3)[:count]] = 7
    write_pair(idx_dir, "", x, y, gz=False)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_data(idx_cfg(idx_dir, val_fraction=val_fraction), raw_dir=tmp_path, out_dir=out)
    message = str(info.value)
    assert "\n" not in message
    assert f"class '7' has {count} sample{'s' if count > 1 else ''} in labels file(s)" in message
    assert f"need at least {need} of each class (one each in {splits})" in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_idx_dataset_truncated_file_names_the_file(tmp_path: Path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    images, _ = write_pair(idx_dir, "train-", *make_images(100, seed=5), gz=False)
    images.write_bytes(images.read_bytes()[:-1])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_idx_dataset_bad_magic_names_the_file(tmp_path: Path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    _, labels = write_pair(idx_dir, "train-", *make_images(100, seed=6), gz=True)
    blob = bytearray(gzip.decompress(labels.read_bytes()))
    blob[1] = 0xFF
    labels.write_bytes(gzip.compress(bytes(blob)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz.*magic"):
        prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "out")


def test_idx_dataset_mismatched_counts(tmp_path: Path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    x, y = make_images(100, seed=7)
    write_pair(idx_dir, "train-", x, y[:90], gz=False)
    with pytest.raises(DataError, match="100 images.*90 labels"):
        prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "out")


def test_idx_dataset_missing_dir_and_files(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(idx_cfg(tmp_path / "absent"), raw_dir=tmp_path, out_dir=tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no '.*images-idx3-ubyte"):
        prepare_data(idx_cfg(empty), raw_dir=tmp_path, out_dir=tmp_path / "out")


def test_idx_dataset_unpaired_file(tmp_path: Path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    x, y = make_images(100, seed=8)
    write_idx(idx_dir / "train-images-idx3-ubyte", x)
    write_idx(idx_dir / "test-labels-idx1-ubyte", y)
    with pytest.raises(DataError, match="test-labels-idx1-ubyte"):
        prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "out")
    (idx_dir / "test-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*no matching labels"):
        prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "out")


# --------------------------------------------------------------------------------------------
# torchvision datasets, offline
# --------------------------------------------------------------------------------------------


def test_mnist_from_raw_files_without_download(tmp_path: Path):
    raw = tmp_path / "raw"
    mnist_raw = raw / "MNIST" / "raw"
    mnist_raw.mkdir(parents=True)
    x_tr, y_tr = make_images(120, seed=9)
    x_te, y_te = make_images(40, seed=10)
    write_pair(mnist_raw, "train-", x_tr, y_tr, gz=False)
    write_pair(mnist_raw, "t10k-", x_te, y_te, gz=False)

    out = tmp_path / "out"
    cfg = DataConfig(dataset="mnist", download=False, val_fraction=0.25)
    metrics = prepare_data(cfg, raw_dir=raw, out_dir=out)
    assert metrics == {"n_train": 90, "n_val": 30, "n_test": 40, "num_classes": 10}
    meta = load_meta(out)
    assert meta.in_shape == (1, 28, 28)
    # The official test split, every image with its label, stored in a seeded shuffled order.
    x_test, y_test = raw_split(out, "test")
    official_x = torch.from_numpy(x_te).unsqueeze(1)
    rows = [next(j for j in range(40) if torch.equal(x, official_x[j])) for x in x_test]
    assert sorted(rows) == list(range(40)) and rows != list(range(40))
    assert torch.equal(y_test, torch.from_numpy(y_te).long()[rows])
    prepare_data(cfg, raw_dir=raw, out_dir=tmp_path / "again")
    assert torch.equal(raw_split(tmp_path / "again", "test")[0], x_test)
    # Train and val together are exactly the official training set.
    x_trval = torch.cat([raw_split(out, "train")[0], raw_split(out, "val")[0]])
    expected = torch.from_numpy(x_tr).unsqueeze(1)
    np.testing.assert_array_equal(sorted_rows(x_trval), sorted_rows(expected))
    _, y_val = raw_split(out, "val")
    assert y_val.bincount(minlength=10).tolist() == [3] * 10  # stratified
    assert len(load_split(out, "train")) == 90


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_torchvision_dataset_without_download(tmp_path: Path, dataset: str):
    raw = tmp_path / "raw"
    cfg = DataConfig(dataset=dataset, download=False)  # type: ignore[arg-type]
    with pytest.raises(DataError) as info:
        prepare_data(cfg, raw_dir=raw, out_dir=tmp_path / "out")
    message = str(info.value)
    assert dataset in message and str(raw) in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (lambda y: np.where(np.arange(len(y)) == 3, 255, y), "no sample of class(es) 10, 11"),
        (lambda y: np.zeros_like(y), "fewer than two classes"),
        (lambda y: np.where(y == 4, 5, y), "no sample of class(es) 4"),
    ],
    ids=["one-label-255", "all-zero", "absent-class"],
)
def test_implausible_labels_are_refused_naming_the_file(tmp_path: Path, labels, message):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    x, y = make_images(100, seed=1)
    write_pair(idx_dir, "train-", x, labels(y).astype(np.uint8), gz=False)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="train-labels-idx1-ubyte") as err:
        prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=out)
    assert message in str(err.value)
    assert not out.exists()  # nothing half-written


def test_empty_images_are_refused_naming_the_file(tmp_path: Path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    _x, y = make_images(20, seed=1)
    write_pair(idx_dir, "train-", np.zeros((20, 0, 0), dtype=np.uint8), y, gz=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*empty images"):
        prepare_data(idx_cfg(idx_dir), raw_dir=tmp_path, out_dir=tmp_path / "out")


def test_read_idx_with_overflowing_dimensions_names_the_file(tmp_path: Path):
    # Four dimensions of 2**32 - 1 wrap around to a small number in int64 arithmetic.
    header = bytes([0, 0, 0x08, 4]) + struct.pack(">4I", *([0xFFFFFFFF] * 4))
    path = tmp_path / "huge-images-idx3-ubyte"
    path.write_bytes(header + b"\x00" * 16)
    with pytest.raises(DataError, match="huge-images-idx3-ubyte.*truncated"):
        read_idx(path)
