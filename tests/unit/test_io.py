"""On-disk formats: equal content gives equal bytes and one identity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from switchprune.io import content_digest, file_digest, model_digest, save_model
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
    from switchprune.io import ArtifactError, load_model_file

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
