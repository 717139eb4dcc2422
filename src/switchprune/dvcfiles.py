"""DVC 3's hashes, ``.dvc`` files, default remote and remote downloads, read without DVC."""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from switchprune import storage
from switchprune.errors import InputError
from switchprune.io import file_digest, staging_dir
from switchprune.storage import StorageError


def dvc_md5(path: Path) -> str:
    """The hash DVC 3 records for a file or directory (``dvc add``, ``dvc.lock``).

    A file's hash is the md5 of its bytes. A directory's is the md5 of the JSON list of its
    files' ``{"md5", "relpath"}`` sorted by path, with ``.dir`` appended.
    """
    path = Path(path)
    if path.is_file():
        return file_digest(path, "md5")
    if not path.is_dir():
        raise InputError(f"cannot hash {path}: no such file or directory")
    files = sorted(f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file())
    entries = [{"md5": file_digest(path / f, "md5"), "relpath": f} for f in files]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def recorded_md5(dvc_file: Path) -> str:
    """The hash a ``.dvc`` file records for its data, or ``""`` when there is no such file.

    Raises:
        InputError: If the file exists but records no ``outs[0].md5``.
    """
    if not dvc_file.is_file():
        return ""
    try:
        return str(yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["outs"][0]["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise InputError(f"{dvc_file}: no 'outs[0].md5' in this DVC file") from exc


def default_remote(root: Path) -> tuple[str, str]:
    """The name and ``url`` of the default DVC remote in ``<root>/.dvc/config``.

    Raises:
        InputError: If the config cannot be read, or names no default remote with a ``url``.
    """
    path = root / ".dvc" / "config"
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text(encoding="utf-8"))
    except (OSError, configparser.Error) as exc:
        raise InputError(f"cannot read the DVC config {path}: {exc}") from exc
    name = parser.get("core", "remote", fallback="").strip()
    # DVC writes section names as ['remote "storage"'] (configobj quoting).
    sections = {s.strip().removeprefix("'").removesuffix("'"): s for s in parser.sections()}
    section = sections.get(f'remote "{name}"')
    if not name or section is None or not parser.get(section, "url", fallback=""):
        raise InputError(f"{path}: no default DVC remote with a url ('dvc remote add -d')")
    return name, parser.get(section, "url").strip()


def download_version(client: Any, remote_url: str, md5: str, out_dir: Path) -> Path:
    """Materialise one DVC-tracked file or directory from a DVC 3 remote on S3, by its hash.

    Every file is checked against its md5: ``out_dir`` ends up holding exactly that version (a
    single file under its hash) or is left as it was.

    Args:
        client: A boto3 S3 client for the remote's endpoint.
        remote_url: The DVC remote, ``s3://bucket[/prefix]`` (``url`` in ``.dvc/config``).
        md5: The DVC hash, ``<32 hex>`` for a file or ``<32 hex>.dir`` for a directory.
        out_dir: Where the files go.

    Returns:
        ``out_dir``.

    Raises:
        StorageError: Unknown hash, unreachable remote, or content that does not match.
    """
    if not re.fullmatch(r"[0-9a-f]{32}(\.dir)?", md5):
        raise StorageError(f"{md5!r} is not a DVC md5 hash (32 hex digits, '.dir' for folders)")
    loc = storage.parse_s3_uri(remote_url)

    def key(digest: str) -> str:
        return loc.key("files", "md5", digest[:2], digest[2:])

    files, listing = [(md5, md5)], f"s3://{loc.bucket}/{key(md5)}"
    if md5.endswith(".dir"):
        raw = storage.get_bytes(client, loc.bucket, key(md5))
        if raw is None:
            raise StorageError(f"{listing}: no such version on the DVC remote")
        try:
            files = [(str(e["relpath"]), str(e["md5"])) for e in json.loads(raw)]
        except (ValueError, TypeError, KeyError) as exc:
            raise StorageError(f"{listing}: not a DVC directory listing") from exc
    out_dir = Path(out_dir)
    with staging_dir(out_dir) as tmp:
        for relpath, digest in files:
            target = (tmp / relpath).resolve()
            if not (target.is_relative_to(tmp.resolve()) and re.fullmatch("[0-9a-f]{32}", digest)):
                raise StorageError(f"DVC listing {md5} has an unsafe entry {relpath!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download_object(client, loc.bucket, key(digest), target)
            got = file_digest(target, "md5")
            if got != digest:
                raise StorageError(f"s3://{loc.bucket}/{key(digest)}: md5 {got}, expected {digest}")
        # The folder holds exactly this version: no file of an earlier one stays.
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    return out_dir
