"""On-disk formats: equal content gives equal bytes and one identity."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from switchprune.io import (
    BASELINE_FILE,
    COMPACT_FILE,
    SWITCHED_FILE,
    ArtifactError,
    content_digest,
    file_digest,
    load_baseline,
    load_compacted,
    load_switched,
    model_digest,
    save_model,
)
from switchprune.models import ModelSpec, build_model

SPEC = ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 12, "fc2": 6})


def test_saved_bytes_depend_on_the_values_not_on_the_storages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(SPEC)
    save_model(model, tmp_path / "a.pt")
    # The same values held as views of one shared buffer (as after a resumed run).
    twin = build_model(SPEC)
    flat = torch.cat([p.detach().flatten() for p in model.state_dict().values()])
    at = 0
    for name, t in model.state_dict().items():
        module_name, _, attr = name.rpartition(".")
        module = twin.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(flat[at : at + t.numel()].view_as(t)))
        at += t.numel()
    save_model(twin, tmp_path / "b.pt")
    assert file_digest(tmp_path / "a.pt") == file_digest(tmp_path / "b.pt")


def test_model_digest_follows_content(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(SPEC)
    save_model(model, tmp_path / "a.pt", kept={"fc1": torch.arange(12)})
    torch.save(
        {
            "state_dict": model.state_dict(),
            "spec": SPEC.to_dict(),
            "kept": {"fc1": torch.arange(12)},
        },
        tmp_path / "b.pt",
    )
    assert model_digest(tmp_path / "a.pt") == model_digest(tmp_path / "b.pt")
    with torch.no_grad():
        model.fc1.weight[0, 0] += 1e-6
    save_model(model, tmp_path / "c.pt", kept={"fc1": torch.arange(12)})
    assert model_digest(tmp_path / "c.pt") != model_digest(tmp_path / "a.pt")
    save_model(build_model(SPEC), tmp_path / "d.pt", kept={"fc1": torch.arange(11)})
    assert model_digest(tmp_path / "d.pt") != model_digest(tmp_path / "a.pt")


def test_a_spec_asking_for_huge_widths_is_refused_before_allocating(tmp_path: Path) -> None:
    from switchprune.io import load_model_file

    model = build_model(SPEC)
    torch.save(
        {
            "spec": {**SPEC.to_dict(), "widths": {"fc1": 200_000_000, "fc2": 6}},
            "state_dict": model.state_dict(),
        },
        tmp_path / "model.pt",
    )
    assert (tmp_path / "model.pt").stat().st_size < 100_000
    with pytest.raises(ArtifactError, match="spec does not match its weights"):
        load_model_file(tmp_path / "model.pt")


def test_temporary_files_of_killed_writers_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A writer killed mid-write: its temporary file, named with its (now gone) process id.
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(proc.stdout)
    orphan = tmp_path / f".run.ckpt.{dead}.abc123.tmp"
    orphan.write_bytes(b"x" * 1000)
    alive = tmp_path / f".run.ckpt.{os.getpid()}.def456.tmp"  # a writer still at work
    alive.write_bytes(b"y")
    save_model(build_model(SPEC), tmp_path / "run.ckpt")
    assert not orphan.exists() and alive.exists()
    assert (tmp_path / "run.ckpt").is_file()


def test_a_full_disk_is_named_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    from switchprune import io
    from switchprune.errors import ServiceFailure

    def full(obj: object, fh: object, *args: object, **kwargs: object) -> None:
        fh.write(b"partial")  # type: ignore[attr-defined]
        # What torch.save says when the disk fills up under it.
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 44992 vs 44904"
        )

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(100, 100, 0))
    with pytest.raises(io.WriteError, match="no space left on device") as info:
        save_model(build_model(SPEC), tmp_path / "model.pt")
    assert isinstance(info.value, ServiceFailure) and info.value.exit_code == 1
    assert str(tmp_path / "model.pt") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_an_error_of_the_writer_is_not_blamed_on_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    from switchprune import io

    def bad_value(fh: object) -> None:
        raise ValueError("factors must be finite")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(100, 100, 0))
    with pytest.raises(ValueError, match="factors must be finite"):
        io.atomic_write_bytes(tmp_path / "model.pt", bad_value)
    assert list(tmp_path.iterdir()) == []


def test_saved_bytes_do_not_depend_on_which_string_objects_hold_the_keys(tmp_path: Path) -> None:
    from switchprune.io import save_torch

    value = torch.arange(4.0)
    literal = {"spec": {"widths": {"fc1": 4}}, "factors": {"fc1": value}}
    # Equal keys as distinct objects, as after loading a checkpoint.
    built = "".join(["f", "c1"])
    fresh = {"spec": {"widths": {"fc1": 4}}, "factors": {built: value.clone()}}
    save_torch(literal, tmp_path / "a.pt")
    save_torch(fresh, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_content_digest_of_a_batchnorm_network_covers_its_counters() -> None:
    """0-dim tensors (BatchNorm's ``num_batches_tracked``) are hashed like any other."""
    bn = torch.nn.BatchNorm2d(3)
    before = content_digest(bn.state_dict())
    bn.train()(torch.randn(4, 3, 2, 2))
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    assert bn.num_batches_tracked.dim() == 0
    assert content_digest(bn.state_dict()) != before  # only the counter differs


def test_the_switched_network_is_read_back_with_its_factors(tmp_path: Path) -> None:
    model = build_model(SPEC)
    factors = {"fc1": torch.rand(12), "fc2": torch.rand(6)}
    save_model(model, tmp_path / SWITCHED_FILE, factors=factors)
    loaded, got, blob = load_switched(tmp_path)
    assert set(got) == {"fc1", "fc2"}
    assert all(torch.equal(got[k], factors[k]) for k in factors)
    assert torch.equal(loaded.fc1.weight, model.fc1.weight) and "state_dict" in blob


@pytest.mark.parametrize(
    ("factors", "message"),
    [
        (None, "factors missing"),
        ({"fc1": torch.rand(12)}, "not one per gate group"),
        ({"fc1": torch.rand(11), "fc2": torch.rand(6)}, "group 'fc1' are malformed"),
        ({"fc1": torch.rand(12), "fc2": -torch.ones(6)}, "group 'fc2' are malformed"),
    ],
    ids=["missing", "one-group-short", "wrong-size", "negative"],
)
def test_switched_factors_that_do_not_fit_the_network_are_refused(
    tmp_path: Path, factors: dict[str, torch.Tensor] | None, message: str
) -> None:
    extra = {} if factors is None else {"factors": factors}
    save_model(build_model(SPEC), tmp_path / SWITCHED_FILE, **extra)
    with pytest.raises(ArtifactError, match=message):
        load_switched(tmp_path)


def test_the_baseline_is_none_when_it_was_not_trained(tmp_path: Path) -> None:
    assert load_baseline(tmp_path) is None
    save_model(build_model(SPEC), tmp_path / BASELINE_FILE)
    baseline = load_baseline(tmp_path)
    assert baseline is not None and baseline.spec == SPEC


def test_compacted_kept_indices_must_match_the_widths(tmp_path: Path) -> None:
    model = build_model(SPEC)
    kept = {"fc1": torch.arange(12), "fc2": torch.arange(6)}
    save_model(model, tmp_path / COMPACT_FILE, kept=kept)
    _, got = load_compacted(tmp_path)
    assert all(torch.equal(got[k], kept[k]) for k in kept)
    save_model(model, tmp_path / COMPACT_FILE, kept={"fc1": torch.arange(11)})
    with pytest.raises(ArtifactError, match="inconsistent with the widths"):
        load_compacted(tmp_path)
    with pytest.raises(ArtifactError, match="file not found"):
        load_compacted(tmp_path / "absent")


def test_a_staged_folder_is_removed_and_only_complete_files_are_moved_in(tmp_path: Path) -> None:
    from switchprune import io

    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    (out / "model.pt").write_text("old")
    with pytest.raises(RuntimeError), io.staging_dir(out) as staging:
        (staging / "model.pt").write_text("half")
        raise RuntimeError("download broke")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left
    assert (out / "model.pt").read_text() == "old"
    with io.staging_dir(out) as staging:
        (staging / "model.pt").write_text("new")
        io.move_into(staging, out, ["model.pt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert {p.name: p.read_text() for p in out.iterdir()} == {"keep.txt": "old", "model.pt": "new"}


@pytest.mark.slow  # a fresh Python process or an MLflow store
def test_written_files_get_the_mode_of_any_new_file(tmp_path: Path) -> None:
    # Model files are shared: readable by the group and others, as umask 022 makes other files.
    old = os.umask(0o022)
    try:
        code = (
            "import sys; from pathlib import Path; from switchprune.io import write_json;"
            "write_json({'a': 1}, Path(sys.argv[1]))"
        )
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.json")], check=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
