"""Image folders as a dataset, streaming of prepared splits, and augmentation."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision.datasets import ImageFolder

from folder_support import CLASS_NAMES, write_digits_folder
from switchprune.config import ConfigError, DataConfig, TrainConfig, from_dict
from switchprune.data import (
    MEMORY_LOADER_MAX_BYTES,
    Augmentation,
    DataError,
    DataMeta,
    augment_batch,
    augmentation,
    iter_batches,
    load_meta,
    load_split,
    open_split,
    prepare_data,
    source_dir,
    use_streaming,
)
from switchprune.dvcfiles import dvc_md5
from switchprune.models import ModelSpec
from switchprune.training import FitResult, fit


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def folder_cfg(folder: Path, **overrides: Any) -> DataConfig:
    return DataConfig(dataset="folder", folder_dir=str(folder), **overrides)


def prepare(folder: Path, out: Path, **overrides: Any) -> DataMeta:
    prepare_data(folder_cfg(folder, **overrides), raw_dir=out / "unused", out_dir=out)
    return load_meta(out)


def decoded(path: Path) -> bytes:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")).tobytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("img") / "digits", per_class=15)


@pytest.fixture(scope="module")
def prepared(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(folder, out)
    return out


# --- preparing a folder ------------------------------------------------------------------------


def test_classes_follow_imagefolder_and_are_recorded(folder: Path, prepared: Path) -> None:
    meta = load_meta(prepared)
    reference = ImageFolder(str(folder / "train"))
    assert list(meta.class_names) == reference.classes == sorted(CLASS_NAMES)
    assert meta.num_classes == 10 and meta.dataset == "folder" and meta.storage == "npy"
    assert meta.in_shape == (1, 8, 8)  # every PNG is grayscale
    assert meta.source_md5 == dvc_md5(folder)
    assert source_dir(folder_cfg(folder), Path("elsewhere")) == folder


def test_every_prepared_image_is_a_file_of_its_class(folder: Path, prepared: Path) -> None:
    meta = load_meta(prepared)
    by_class = {
        meta.class_names.index(d.name): {decoded(f) for f in d.iterdir()}
        for d in (folder / "train").iterdir()
    }
    seen = set()
    for split in ("train", "val", "test"):
        x = np.load(prepared / f"{split}_x.npy")
        y = np.load(prepared / f"{split}_y.npy")
        assert x.dtype == np.uint8 and y.dtype == np.int64
        for img, label in zip(x, y, strict=True):
            assert img[0].tobytes() in by_class[int(label)]
            seen.add(img.tobytes())
    assert len(seen) == 150  # a partition: each of the 150 images once


def test_split_without_val_and_test_folders_is_stratified(prepared: Path) -> None:
    meta = load_meta(prepared)
    # 15 per class: 3 to test (0.2), then 1 or 2 of the other 12 to val (0.1).
    assert meta.n_test == 30 and meta.n_train + meta.n_val == 120
    for split, per_class in (("test", {3}), ("train", {10, 11}), ("val", {1, 2})):
        counts = np.bincount(np.load(prepared / f"{split}_y.npy"), minlength=10)
        assert set(counts.tolist()) <= per_class, (split, counts)


def test_split_depends_on_the_seed_only(folder: Path, prepared: Path, tmp_path: Path) -> None:
    prepare(folder, tmp_path / "same")
    prepare(folder, tmp_path / "other", split_seed=3)
    same = np.load(tmp_path / "same" / "test_x.npy")
    assert np.array_equal(same, np.load(prepared / "test_x.npy"))
    assert not np.array_equal(same, np.load(tmp_path / "other" / "test_x.npy"))


def test_the_test_split_is_stored_shuffled_not_class_by_class(
    folder: Path, prepared: Path, tmp_path: Path
) -> None:
    """Image files are listed class by class; the stored test split is not in that order."""
    held_out = np.load(prepared / "test_y.npy")  # a share of train/
    given_folder = write_digits_folder(tmp_path / "f", per_class=6, splits=("train", "test"))
    prepare(given_folder, tmp_path / "out")
    given = np.load(tmp_path / "out" / "test_y.npy")  # the folder's own test/
    for labels in (held_out, given):
        assert not np.array_equal(labels, np.sort(labels)), labels
        assert len(set(labels[:10].tolist())) >= 4, labels  # classes mixed from the start
    prepare(given_folder, tmp_path / "again")
    assert np.array_equal(
        np.load(tmp_path / "again" / "test_x.npy"), np.load(tmp_path / "out" / "test_x.npy")
    )


def test_val_and_test_folders_are_used_as_they_are(tmp_path: Path) -> None:
    folder = write_digits_folder(
        tmp_path / "f", per_class=6, splits=("train", "val", "test"), per_split={"test": 2}
    )
    # A validation folder may lack classes; its labels still follow train's folders.
    for f in (folder / "val" / "zero").iterdir():
        f.unlink()
    (folder / "val" / "zero").rmdir()
    meta = prepare(folder, tmp_path / "out")
    assert (meta.n_train, meta.n_val, meta.n_test) == (60, 27, 20)
    val_y = np.load(tmp_path / "out" / "val_y.npy")
    assert meta.class_names.index("zero") not in val_y.tolist()
    assert sorted(set(val_y.tolist())) == sorted(
        meta.class_names.index(c) for c in CLASS_NAMES if c != "zero"
    )


def test_missing_val_folder_is_split_from_train(tmp_path: Path) -> None:
    folder = write_digits_folder(tmp_path / "f", per_class=10, splits=("train", "test"))
    meta = prepare(folder, tmp_path / "out", val_fraction=0.2)
    assert (meta.n_train, meta.n_val, meta.n_test) == (80, 20, 30)


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    folder = write_digits_folder(tmp_path / "f", per_class=4, sizes=((8, 8), (12, 10)))
    with pytest.raises(DataError, match=r"\.png is 12x10 but .*\.png is 8x8.*data.image_size"):
        prepare(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    meta = prepare(folder, tmp_path / "out", image_size=16)
    assert meta.in_shape == (1, 16, 16)
    x = load_split(tmp_path / "out", "train").tensors[0]
    assert x.shape[1:] == (1, 16, 16)


def test_image_size_resizes_even_images_of_one_size(folder: Path, tmp_path: Path) -> None:
    meta = prepare(folder, tmp_path / "out", image_size=5)
    assert meta.in_shape == (1, 5, 5)
    assert np.load(tmp_path / "out" / "train_x.npy").shape[1:] == (1, 5, 5)


def test_one_colour_image_makes_the_set_rgb(tmp_path: Path) -> None:
    folder = write_digits_folder(tmp_path / "f", per_class=4)
    gray = np.asarray(Image.open(next((folder / "train" / "two").iterdir())))
    Image.fromarray(np.stack([gray, gray // 2, gray], axis=-1)).save(
        folder / "train" / "two" / "rgb.png"
    )
    meta = prepare(folder, tmp_path / "out")
    assert meta.in_shape == (3, 8, 8) and len(meta.mean) == 3
    x = np.load(tmp_path / "out" / "train_x.npy")
    # Grayscale images become three equal channels.
    assert any(np.array_equal(img[0], img[1]) for img in x)


def test_colour_folder_keeps_its_channels(tmp_path: Path) -> None:
    folder = write_digits_folder(tmp_path / "f", per_class=4, color=True)
    meta = prepare(folder, tmp_path / "out")
    assert meta.in_shape == (3, 8, 8)
    assert meta.mean[0] != meta.mean[2]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_the_file_and_leaves_the_previous_splits_whole(
    folder: Path, tmp_path: Path, damage: str
) -> None:
    import shutil

    copy = tmp_path / "f"
    shutil.copytree(folder, copy)
    out = tmp_path / "out"
    prepare(copy, out)
    bad = copy / "train" / "seven" / "003.png"
    blob = bad.read_bytes()
    bad.write_bytes(b"not a png at all" if damage == "garbage" else blob[: len(blob) // 2])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=r"^cannot read image .*seven/003\.png: ") as info:
        prepare(copy, out)
    assert "\n" not in str(info.value)
    # Found in the headers (garbage) or while decoding into the staging folder (truncated):
    # either way the last good splits stay, whole and loadable, and nothing is left beside them.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["f", "out"]
    assert len(load_split(out, "train")) == load_meta(out).n_train


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A real 1x1 PNG whose header (IHDR) says ``width`` x ``height``: huge to PIL, 70 bytes."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    blob = bytearray(buffer.getvalue())
    start = blob.index(b"IHDR")
    blob[start + 4 : start + 12] = struct.pack(">II", width, height)
    blob[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(blob[start : start + 17])))
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["pil-warns", "pil-refuses"])
def test_image_above_max_image_pixels_is_refused_from_its_header_in_one_line(
    tmp_path: Path, side: int
) -> None:
    """PIL alone would warn (two lines) above ~89.5 M pixels and refuse above twice that."""
    folder = write_digits_folder(tmp_path / "f", per_class=4)
    big = png_claiming_size(folder / "train" / "three" / "big.png", side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, PIL's DecompressionBombWarning too, fails
        with pytest.raises(DataError) as info:
            prepare(folder, tmp_path / "out")
    message = str(info.value)
    assert message == (
        f"image {big} is {side}x{side} ({side * side:,} pixels), above data.max_image_pixels "
        "(89,478,485): shrink it or raise the setting"
    )
    assert not (tmp_path / "out").exists()


def test_max_image_pixels_is_a_setting(tmp_path: Path) -> None:
    folder = write_digits_folder(tmp_path / "f", per_class=4, sizes=((8, 8), (12, 10)))
    with pytest.raises(
        DataError, match=r"is 12x10 \(120 pixels\), above data.max_image_pixels \(100\)"
    ):
        prepare(folder, tmp_path / "out", image_size=8, max_image_pixels=100)
    assert prepare(folder, tmp_path / "out", image_size=8, max_image_pixels=120).n_train > 0
    with pytest.raises(ConfigError, match="max_image_pixels"):
        from_dict(DataConfig, {"max_image_pixels": 0})


@pytest.mark.parametrize(
    ("splits", "count", "need", "message"),
    [
        (
            ("train",),
            1,
            3,
            "one each in train, test, val): add images of it or give the folders test/ and val/",
        ),
        (("train",), 2, 3, "one each in train, test, val)"),
        (
            ("train", "test"),
            1,
            2,
            "one each in train, val): add images of it or give the folder val/",
        ),
    ],
)
def test_a_class_with_too_few_images_for_the_splits_is_refused(
    tmp_path: Path, splits: tuple[str, ...], count: int, need: int, message: str
) -> None:
    folder = write_digits_folder(tmp_path / "f", per_class=12, splits=splits)
    for extra in sorted((folder / "train" / "four").iterdir())[count:]:
        extra.unlink()
    with pytest.raises(DataError) as info:
        prepare(folder, tmp_path / "out")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(
        f"class 'four' has {count} image{'s' if count > 1 else ''} in {folder / 'train'}, "
        f"but the splits need at least {need} of each class ("
    )
    assert message in text
    assert not (tmp_path / "out").exists()


def test_a_class_with_one_image_each_for_the_splits_is_in_every_split(tmp_path: Path) -> None:
    folder = write_digits_folder(tmp_path / "f", per_class=12)
    for extra in sorted((folder / "train" / "four").iterdir())[3:]:
        extra.unlink()
    meta = prepare(folder, tmp_path / "out")
    four = meta.class_names.index("four")
    for split in ("train", "val", "test"):
        assert four in np.load(tmp_path / "out" / f"{split}_y.npy").tolist()


def test_class_folder_that_train_lacks_is_refused(tmp_path: Path) -> None:
    folder = write_digits_folder(tmp_path / "f", per_class=4, splits=("train", "test"))
    (folder / "test" / "eleven").mkdir()
    Image.new("L", (8, 8)).save(folder / "test" / "eleven" / "0.png")
    with pytest.raises(DataError, match=r"class folder .*test/eleven has no counterpart"):
        prepare(folder, tmp_path / "out")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda f: (f / "train" / "empty").mkdir(), r"class folder .*train/empty holds no images"),
        (
            lambda f: (f / "train" / "notes").mkdir() or (f / "train/notes/a.txt").write_text("x"),
            r"train/notes holds no images",
        ),
        (lambda f: (f / "test").mkdir(), r"test holds no class folders"),
    ],
    ids=["empty-class", "no-image-files", "empty-test"],
)
def test_empty_folders_are_refused(tmp_path: Path, setup: Any, message: str) -> None:
    folder = write_digits_folder(tmp_path / "f", per_class=4)
    setup(folder)
    with pytest.raises(DataError, match=message):
        prepare(folder, tmp_path / "out")


def test_missing_folder_or_train_or_classes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "f").mkdir()
    with pytest.raises(DataError, match="has no train/ directory"):
        prepare(tmp_path / "f", tmp_path / "out")
    write_digits_folder(tmp_path / "g", per_class=4, classes=1)
    with pytest.raises(DataError, match="needs at least two class folders, found 1"):
        prepare(tmp_path / "g", tmp_path / "out")


def test_config_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match="folder_dir is required"):
        from_dict(DataConfig, {"dataset": "folder"})
    with pytest.raises(ConfigError, match="image_size"):
        from_dict(DataConfig, {"image_size": 0})
    with pytest.raises(ConfigError, match="num_workers"):
        from_dict(DataConfig, {"num_workers": -1})
    with pytest.raises(ConfigError, match="loader"):
        from_dict(DataConfig, {"loader": "disk"})
    with pytest.raises(ConfigError, match="augment"):
        from_dict(DataConfig, {"augment": "heavy"})
    cfg = from_dict(DataConfig, {"dataset": "folder", "folder_dir": "x", "image_size": 32})
    assert (cfg.loader, cfg.num_workers, cfg.augment) == ("auto", 0, "none")


# --- streaming ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare_data(DataConfig(), raw_dir=out / "raw", out_dir=out)
    return out


@pytest.mark.parametrize("which", ["folder", "digits"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_streamed_batches_equal_the_tensors_in_memory(
    prepared: Path, digits_prepared: Path, which: str, split: str
) -> None:
    data_dir = prepared if which == "folder" else digits_prepared
    x, y = load_split(data_dir, split).tensors
    streamed = open_split(data_dir, split)
    assert len(streamed) == len(y) and torch.equal(streamed.labels, y)
    batches = list(iter_batches(streamed, 7))
    assert torch.equal(torch.cat([b[0] for b in batches]), x)  # bit for bit
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    xi, yi = streamed[5]
    assert torch.equal(xi, x[5]) and yi == int(y[5])
    view = streamed.subset(torch.tensor([4, 1, 9]))
    assert torch.equal(view[[2, 0]][0], x[[9, 4]])


def test_dataloader_with_two_workers_reads_the_same_batches(prepared: Path) -> None:
    streamed = open_split(prepared, "train")
    one = list(iter_batches(streamed, 16))
    two = list(iter_batches(streamed, 16, num_workers=2))
    assert len(one) == len(two)
    for (xa, ya), (xb, yb) in zip(one, two, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_auto_loader_streams_above_the_memory_bound() -> None:
    def meta(n: int) -> DataMeta:
        return DataMeta("folder", (3, 32, 32), 10, (0.5,) * 3, (0.2,) * 3, n, 0, 0)

    fits = MEMORY_LOADER_MAX_BYTES // (3 * 32 * 32 * 4)
    assert not use_streaming(DataConfig(), meta(fits))
    assert use_streaming(DataConfig(), meta(fits + 1))
    assert use_streaming(DataConfig(loader="stream"), meta(10))
    assert not use_streaming(DataConfig(loader="memory"), meta(10**9))


# --- augmentation -------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["digits", "mnist", "idx"])
def test_digit_datasets_are_never_flipped(dataset: str) -> None:
    aug = augmentation(DataConfig(dataset=dataset, idx_dir="x", augment="standard"), (1, 28, 28))  # type: ignore[arg-type]
    assert aug == Augmentation(pad=4, flip=False)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "fashion_mnist"])
def test_label_preserving_datasets_are_flipped(dataset: str) -> None:
    aug = augmentation(DataConfig(dataset=dataset, augment="standard"), (3, 32, 32))  # type: ignore[arg-type]
    assert aug == Augmentation(pad=4, flip=True)


def test_padding_scales_with_the_image_and_none_means_none() -> None:
    cfg = DataConfig(dataset="folder", folder_dir="x", augment="standard")
    pads = [augmentation(cfg, (3, s, s)).pad for s in (8, 16, 32, 64)]  # type: ignore[union-attr]
    assert pads == [1, 2, 4, 8]
    assert augmentation(dataclasses.replace(cfg, augment="none"), (3, 32, 32)) is None


def _crops(img: torch.Tensor, pad: int, mirror: bool) -> list[torch.Tensor]:
    """Every crop of the zero-padded image (of its mirror image when ``mirror``)."""
    src = img.flip(-1) if mirror else img
    padded = torch.nn.functional.pad(src, (pad, pad, pad, pad))
    h, w = img.shape[-2:]
    return [
        padded[:, dy : dy + h, dx : dx + w]
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
    ]


def _matches(out: torch.Tensor, crops: list[torch.Tensor]) -> bool:
    return any(torch.equal(out, c) for c in crops)


@pytest.mark.parametrize("flip", [False, True])
def test_augmented_images_are_padded_crops_and_mirrors_only_when_allowed(flip: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 8, 8, generator=g)  # no symmetry: a mirror is never a crop
    out = augment_batch(x, Augmentation(pad=1, flip=flip), torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    mirrored = 0
    for img, aug in zip(x, out, strict=True):
        plain = _matches(aug, _crops(img, 1, mirror=False))
        mirror = _matches(aug, _crops(img, 1, mirror=True))
        assert plain or mirror
        mirrored += mirror and not plain
    if flip:
        assert 16 < mirrored < 48  # about half
    else:
        assert mirrored == 0
    shifted = sum(not torch.equal(a, b) for a, b in zip(x, out, strict=True))
    assert shifted > 32  # most images moved (1 in 9 crops is the identity)


def test_augmentation_is_seeded() -> None:
    x = torch.randn(8, 3, 16, 16)
    aug = Augmentation(pad=2, flip=True)
    a = augment_batch(x, aug, torch.Generator().manual_seed(5))
    b = augment_batch(x, aug, torch.Generator().manual_seed(5))
    c = augment_batch(x, aug, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- training from memory and from a stream -------------------------------------------------------


def train_cfg(**overrides: Any) -> TrainConfig:
    base = {
        "epochs": 3,
        "batch_size": 16,
        "snn_hidden": 8,
        "device": "cpu",
        "baseline": False,
        "scorer": "switcher",
        "switch_epochs_fraction": 0.7,
    }
    return TrainConfig(**{**base, **overrides})


def train_on(
    prepared: Path, stream: bool, cfg: TrainConfig, *, val: bool = True, **kwargs: Any
) -> FitResult:
    meta = load_meta(prepared)
    read = open_split if stream else load_split
    spec = ModelSpec("mlp", meta.in_shape, meta.num_classes, {"fc1": 24, "fc2": 12})
    val_set = read(prepared, "val") if val else None
    return fit(spec, read(prepared, "train"), val_set, cfg, progress=False, **kwargs)


def same_result(a: FitResult, b: FitResult) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    same = all(torch.equal(sa[k], sb[k]) for k in sa)
    if a.factors is not None and b.factors is not None:
        same = same and all(torch.equal(a.factors[k], b.factors[k]) for k in a.factors)
    return same and [r.get("val_accuracy") for r in a.history] == [
        r.get("val_accuracy") for r in b.history
    ]


@pytest.mark.parametrize(
    ("overrides", "val"),
    [({}, True), ({"compression": "auto", "scorer": "magnitude"}, False)],
    ids=["switcher", "auto-val-held-out-of-train"],
)
def test_streamed_training_equals_training_in_memory(
    prepared: Path, overrides: dict[str, Any], val: bool
) -> None:
    cfg = train_cfg(**overrides)
    memory = train_on(prepared, False, cfg, val=val)
    streamed = train_on(prepared, True, cfg, val=val)
    assert same_result(memory, streamed)
    assert all("val_accuracy" in r for r in memory.history)
    if cfg.compression == "target":
        assert memory.metrics["train_params_ratio"] <= cfg.target_ratio + 1e-9


def test_augmentation_none_changes_nothing_and_standard_changes_the_batches(
    prepared: Path,
) -> None:
    cfg = train_cfg(epochs=2)
    plain = train_on(prepared, False, cfg)
    data = folder_cfg(Path("unused"))
    assert same_result(plain, train_on(prepared, False, cfg, data=data))
    standard = dataclasses.replace(data, augment="standard")
    a = train_on(prepared, False, cfg, data=standard)
    assert not same_result(plain, a)
    # The same augmented batches streamed, with two DataLoader workers.
    b = train_on(prepared, True, cfg, data=dataclasses.replace(standard, num_workers=2))
    assert same_result(a, b)


class Interrupt(Exception):
    """Stands for a killed process."""


def test_resumed_streamed_run_sees_the_same_augmented_batches(
    prepared: Path, tmp_path: Path
) -> None:
    cfg = train_cfg(epochs=3)
    data = folder_cfg(Path("unused"), augment="standard")
    reference = train_on(prepared, True, cfg, data=data)

    def stop(epoch: int) -> None:
        if epoch == 1:
            raise Interrupt

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Interrupt):
        train_on(prepared, True, cfg, data=data, checkpoint_path=ckpt, on_epoch_end=stop)
    seen: list[int] = []
    resumed = train_on(
        prepared, True, cfg, data=data, checkpoint_path=ckpt, on_epoch_end=seen.append
    )
    assert seen == [2]
    assert same_result(reference, resumed)


def test_memory_and_stream_inputs_are_both_accepted_for_validation(prepared: Path) -> None:
    """A tensor dataset for training with a streamed validation split (and the reverse)."""
    meta = load_meta(prepared)
    spec = ModelSpec("mlp", meta.in_shape, meta.num_classes, {"fc1": 16, "fc2": 8})
    cfg = train_cfg(epochs=1, scorer="magnitude")
    a = fit(spec, load_split(prepared, "train"), open_split(prepared, "val"), cfg, progress=False)
    b = fit(spec, open_split(prepared, "train"), load_split(prepared, "val"), cfg, progress=False)
    assert same_result(a, b)
    assert isinstance(load_split(prepared, "val"), TensorDataset)


def test_image_endings_are_torchvisions() -> None:
    """The endings kept without importing torchvision are those its ImageFolder reads."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from switchprune.data import folder

    assert folder.IMG_EXTENSIONS == IMG_EXTENSIONS
