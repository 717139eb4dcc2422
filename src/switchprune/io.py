"""The only on-disk formats: ``{spec, state_dict}`` checkpoints and flat metrics JSON.

The files one stage hands to the next are named and read here, so no stage imports another.

Everything is written atomically (temporary file in the same directory, then ``os.replace``)
so an interrupted run never leaves a half-written file, and read with ``weights_only=True``.
A stage's output folder is rebuilt beside itself and swapped in whole (:func:`replacing_dir`),
so a failed run leaves the previous outputs as they were.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from switchprune.errors import InputError, ServiceFailure

if TYPE_CHECKING:
    import torch

    from switchprune.models import ModelSpec, TaskNet

# torch and the models are imported by the functions that read or write models: the commands
# that only move files and records (promote) start without them.

# Written by ``train``: the full-width switched network with its factors and switcher, and the
# plainly trained baseline.
SWITCHED_FILE = "switched.pt"
BASELINE_FILE = "baseline.pt"
# Per-epoch training records (the DVC plots of dvc.yaml), written by train, read by register.
HISTORY_FILE = "train_history.json"
# Written by ``prune``: the compacted model and its kept/full width per group.
COMPACT_FILE = "model.pt"
WIDTHS_FILE = "widths.json"


class ArtifactError(InputError, RuntimeError):
    """A file is missing, corrupt or not what it claims to be."""


class WriteError(ServiceFailure, OSError):
    """A file cannot be written: no space left, no permission, a read-only folder."""


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (``md5`` is what DVC records)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def _umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()
# The mode ``open()`` gives a new file: 0666 less the process's umask (0644 usually).
_NEW_FILE_MODE = 0o666 & ~_UMASK


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Create ``path`` via ``write(fileobj)`` on a temporary file, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(path)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        # mkstemp creates the file 0600: give it the mode any other new file gets here.
        os.fchmod(fd, _NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(exc, Exception):
            raise  # an interrupt stays an interrupt
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        # torch.save reports a full disk as RuntimeError("unexpected pos ..."). Other errors
        # (a bad value to write) stay what they are, even on a full disk.
        if full or isinstance(exc, OSError | RuntimeError) and _disk_full(path.parent):
            raise WriteError(f"cannot write {path}: no space left on device") from exc
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A new empty folder beside ``out_dir``, removed on exit whatever happens.

    Files downloaded or written there are moved into ``out_dir`` only once all are complete
    (:func:`move_into`); being on the same filesystem, each move is an atomic rename.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into(staging: Path, out_dir: Path, names: Iterable[str]) -> None:
    """Move the files ``names`` of ``staging`` into ``out_dir``, replacing files of those names."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(Path(staging) / name, Path(out_dir) / name)


class StagedOutput:
    """A stage's output folder being rebuilt beside itself (see :func:`replacing_dir`).

    Attributes:
        dir: The staging folder: write the folder's complete new content here.
    """

    def __init__(self, staging: Path) -> None:
        self.dir = staging
        self._files: dict[Path, Path] = {}

    def file(self, path: Path) -> Path:
        """A temporary path for a file outside the folder, renamed to ``path`` after the swap.

        For a file the stage writes elsewhere (a report) that must change with the folder:
        it is written whole beforehand, so only two renames separate the two.
        """
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        # The name atomic_write_bytes gives its temporaries: one left by a killed run is
        # removed by the next write of ``path``.
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        self._files[path] = tmp
        return tmp


def aside_dir(out_dir: Path) -> Path:
    """Where :func:`replacing_dir` keeps ``out_dir``'s previous content during the swap."""
    out_dir = Path(out_dir).absolute()
    return out_dir.with_name(f".{out_dir.name}.old")


def recover_dir(out_dir: Path) -> None:
    """Finish or undo a swap of ``out_dir`` that a killed process left half done.

    Killed between its two renames, :func:`replacing_dir` leaves no ``out_dir`` and the previous
    content, complete, in :func:`aside_dir`: it is renamed back. Killed after them, the aside
    copy is a leftover and is removed, as are staging folders whose process is gone.
    """
    out_dir = _real_dir(out_dir)
    aside = aside_dir(out_dir)
    if aside.is_dir():
        if not out_dir.exists():
            os.replace(aside, out_dir)
            _fsync_dir(out_dir.parent)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*.new"):
        pid = stale.name[len(out_dir.name) + 2 :].split(".", 1)[0]
        if stale.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def check_replaceable(out_dir: Path, names: Iterable[str], stage: str) -> None:
    """Refuse to replace a folder that holds anything but the files ``stage`` writes there.

    :func:`replacing_dir` replaces the whole folder; a file of the user's own in it would be
    deleted with the old outputs.

    Raises:
        ArtifactError: ``out_dir`` is a file, or holds an entry not in ``names`` (hidden
            temporary files of killed writers excepted).
    """
    out_dir = _real_dir(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"{out_dir} is a file; {stage} writes a folder there")
    if not out_dir.is_dir():
        return
    known = set(names)
    foreign = sorted(
        p.name
        for p in out_dir.iterdir()
        if p.name not in known and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )
    if foreign:
        raise ArtifactError(
            f"{out_dir} holds {foreign[0]!r}, which {stage} does not write: {stage} replaces "
            "the whole folder, so move that file elsewhere or choose another output folder"
        )


@contextmanager
def replacing_dir(out_dir: Path, names: Iterable[str], stage: str) -> Iterator[StagedOutput]:
    """Rebuild ``out_dir`` in a staging folder beside it; swap it in when the block succeeds.

    The stage writes the folder's complete new content into ``staged.dir``. When the block
    returns, the previous folder is renamed aside (:func:`aside_dir`), the staging folder
    renamed to ``out_dir``, the previous folder removed, then the files of
    :meth:`StagedOutput.file` renamed into place. When the block raises, nothing outside the
    staging folder has changed and it is removed. Each rename is atomic on one filesystem, so
    a process killed at any point leaves the previous or the new folder complete; between the
    two renames the previous one is in :func:`aside_dir`, and :func:`recover_dir` (run first
    here, so by the stage's next run) renames it back.

    Args:
        out_dir: The output folder (created if missing; a symbolic link is followed).
        names: Every file name the stage writes there (see :func:`check_replaceable`).
        stage: The stage's name, for messages.

    Raises:
        ArtifactError: ``out_dir`` holds files the stage does not write.
        WriteError: The staging folder cannot be created or renamed.
    """
    names = tuple(names)
    out_dir = _real_dir(out_dir)
    try:
        recover_dir(out_dir)
        check_replaceable(out_dir, names, stage)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(
                dir=out_dir.parent, prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".new"
            )
        )
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp gives 0700; a folder gets the usual mode
    except OSError as exc:
        raise WriteError(f"cannot write {out_dir}: {exc.strerror or exc}") from exc
    staged = StagedOutput(staging)
    try:
        yield staged
        try:
            for path in staged._files:
                if path.is_dir():
                    raise WriteError(f"cannot write {path}: it is a folder")
            check_replaceable(out_dir, names, stage)  # nothing of the user's appeared meanwhile
            _swap_dir(staging, out_dir)
            for path, tmp in staged._files.items():
                os.replace(tmp, path)
        except OSError as exc:
            if isinstance(exc, WriteError):
                raise
            raise WriteError(f"cannot write {out_dir}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for tmp in staged._files.values():
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _swap_dir(staging: Path, out_dir: Path) -> None:
    """Rename ``out_dir`` aside, ``staging`` to ``out_dir``, then remove the aside copy."""
    aside = aside_dir(out_dir)
    _fsync_dir(staging)  # the new folder's entries are on disk before it replaces the old one
    if out_dir.exists():
        if aside.exists():
            shutil.rmtree(aside)  # a leftover (recover_dir ran): out_dir is the complete one
        os.replace(out_dir, aside)
        try:
            os.replace(staging, out_dir)
        except BaseException:
            os.replace(aside, out_dir)  # the rename failed: the previous folder stays
            raise
    else:
        os.replace(staging, out_dir)
    _fsync_dir(out_dir.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _real_dir(out_dir: Path) -> Path:
    """``out_dir`` made absolute, a symbolic link resolved (the link itself stays)."""
    out_dir = Path(out_dir).absolute()
    return out_dir.resolve() if out_dir.is_symlink() else out_dir


def _fsync_dir(folder: Path) -> None:
    """Make the renames inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_orphans(path: Path) -> None:
    """Delete temporary files of ``path`` left by writers that were killed mid-write.

    Each temporary name carries its writer's process id; a file whose writer is gone can
    never be renamed into place.
    """
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def _disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def save_torch(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` atomically; equal content gives equal bytes (see :func:`_canonical`)."""
    import torch

    atomic_write_bytes(path, lambda fh: torch.save(_canonical(obj), fh))


def _canonical(obj: Any) -> Any:
    """A copy in which every tensor owns a compact storage of its own.

    ``torch.save`` writes whole storages: a tensor that is a view, or shares a storage with
    another (as after resuming from a checkpoint), is written with other bytes than an equal
    fresh tensor. Cloning makes the bytes a function of the values alone; interning does the same
    for strings.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone(memory_format=torch.contiguous_format)
    if isinstance(obj, str):
        # Pickle writes a repeated string once and refers back to it by object identity: one
        # object per value makes those references a function of the values too.
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def content_digest(obj: Any) -> str:
    """SHA-256 of a ``weights_only`` mapping's content: keys, types, dtypes, shapes and values.

    Independent of how the file was written: two files with equal content have one digest.
    """
    import torch

    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            # Flattened first: a 0-dim tensor (BatchNorm's batch counter) has no byte view.
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            h.update(f"D{len(value)}".encode())
            for k in sorted(value, key=str):
                h.update(f"K{k!r}".encode())
                feed(value[k])
        elif isinstance(value, list | tuple):
            h.update(f"L{len(value)}".encode())
            for v in value:
                feed(v)
        else:
            h.update(f"V{type(value).__name__}:{value!r}".encode())

    feed(obj)
    return h.hexdigest()


def model_digest(path: Path) -> str:
    """:func:`content_digest` of a saved model file (spec, kept indices, tensor values)."""
    return content_digest(load_torch(path))


def load_torch(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with a readable error for missing or corrupt files."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ArtifactError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a mapping, found {type(obj).__name__}")
    return obj


def write_json(data: dict[str, Any] | list[Any], path: Path) -> None:
    """Write a JSON document atomically (sorted keys, trailing newline)."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON document with a readable error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: file not found") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc


def save_model(model: TaskNet, path: Path, **extra: Any) -> None:
    """Save a task network as ``{spec, state_dict}`` plus any ``weights_only``-safe extras.

    A network built from the user's own file gets a copy of that file beside it
    (:data:`~switchprune.models.SOURCE_FILE`), so the folder loads anywhere.
    """
    from switchprune.models import SOURCE_FILE, is_file_arch, source_bytes

    path = Path(path)
    spec = model.spec
    if is_file_arch(spec.arch):
        source = source_bytes(spec.source_sha256)
        if source is None:
            raise ArtifactError(f"{spec.arch}: the network's source is not loaded; cannot save it")
        copy = path.parent / SOURCE_FILE
        if not (copy.is_file() and file_digest(copy) == spec.source_sha256):
            atomic_write_bytes(copy, lambda fh: fh.write(source))
    save_torch({"spec": spec.to_dict(), "state_dict": model.state_dict(), **extra}, path)


def load_model_file(path: Path) -> tuple[TaskNet, dict[str, Any]]:
    """Rebuild a task network from a ``{spec, state_dict}`` file.

    Returns:
        The model in eval mode, and the whole stored mapping (for extras such as kept indices).
    """
    import torch

    from switchprune.models import GraphError, ModelSpec, build_model, build_with_state

    blob = load_torch(path)
    try:
        spec = ModelSpec.from_dict(blob["spec"])
        _provide_stored_source(spec, Path(path).parent)
        state = blob["state_dict"]
        # The spec is checked against the weights on the meta device first: a spec that asks
        # for absurd widths would otherwise allocate them before anything is compared.
        with torch.device("meta"):
            skeleton = build_model(spec)
        want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
        if want != got:
            bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
            raise ArtifactError(
                f"{path}: its spec does not match its weights (first mismatch: {bad[0]!r})"
            )
        model = build_with_state(spec, state)
    except GraphError as exc:
        # The network's own code (its source missing, changed or failing), not the file.
        raise ArtifactError(f"cannot build the network of {path}: {exc}") from exc
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"{path}: does not hold a valid model ({exc})") from exc
    return model.eval(), blob


def _provide_stored_source(spec: ModelSpec, folder: Path) -> None:
    """Build a user-file network from the copy stored beside its model, when there is one."""
    from switchprune.models import SOURCE_FILE, is_file_arch, provide_source_file

    copy = folder / SOURCE_FILE
    if is_file_arch(spec.arch) and spec.source_sha256 and copy.is_file():
        provide_source_file(copy, spec.source_sha256)


def load_switched(trained_dir: Path) -> tuple[TaskNet, dict[str, torch.Tensor], dict[str, Any]]:
    """Read the switched TNN and its final factors written by ``train``.

    Returns:
        The full-width task network (eval mode), its factors per group, and the stored mapping.

    Raises:
        ArtifactError: If the file is missing, corrupt or its factors do not fit the network.
    """
    import torch

    path = Path(trained_dir) / SWITCHED_FILE
    model, blob = load_model_file(path)
    factors = blob.get("factors")
    sizes = model.group_sizes()
    if not isinstance(factors, dict) or set(factors) != set(sizes):
        raise ArtifactError(f"{path}: factors missing or not one per gate group")
    for name, s in factors.items():
        if not isinstance(s, torch.Tensor) or s.shape != (sizes[name],) or bool((s < 0).any()):
            raise ArtifactError(f"{path}: factors of group {name!r} are malformed")
    return model, factors, blob


def load_baseline(trained_dir: Path) -> TaskNet | None:
    """The baseline TNN written by ``train``, or ``None`` when it was not trained."""
    path = Path(trained_dir) / BASELINE_FILE
    if not path.exists():
        return None
    return load_model_file(path)[0]


def load_compacted(model_dir: Path) -> tuple[TaskNet, dict[str, torch.Tensor]]:
    """The compacted model written by ``prune`` and the kept unit indices per group.

    Raises:
        ArtifactError: If the file is missing, corrupt or inconsistent.
    """
    import torch

    path = Path(model_dir) / COMPACT_FILE
    model, blob = load_model_file(path)
    kept = blob.get("kept")
    if not isinstance(kept, dict) or any(
        not isinstance(v, torch.Tensor) or v.numel() != model.spec.widths.get(k, -1)
        for k, v in kept.items()
    ):
        raise ArtifactError(f"{path}: kept indices missing or inconsistent with the widths")
    return model, kept
