"""Files and folders on S3, verified both ways: how a TrainJob's inputs and outputs travel.

A set of files goes under a prefix together with a manifest (:data:`MANIFEST`: each file's
relative path, size and SHA-256), written after every file is uploaded and verified, so a prefix
with a manifest is complete; a download checks every file against it. A single file is checked
against the SHA-256 its upload stored with it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from switchprune import storage
from switchprune.storage import StorageError

logger = logging.getLogger(__name__)

MANIFEST = "_files.json"
_JSON = "application/json"


def upload_file(client: Any, uri: str, path: Path) -> None:
    """Upload one file to the object ``uri`` and verify what the server stored.

    Raises:
        StorageError: If ``uri`` is not an object URI, the file cannot be read or the upload
            fails or does not verify.
    """
    loc = _object(uri)
    digest = storage.sha256_file(Path(path))  # a StorageError if it cannot be read
    size = Path(path).stat().st_size
    storage.ensure_bucket(client, loc.bucket)
    with open(path, "rb") as fh:
        storage.put_object(client, loc.bucket, loc.prefix, fh, sha256=digest)
    storage.verify_object(client, loc.bucket, loc.prefix, size=size, sha256=digest)


def download_file(client: Any, uri: str, target: Path) -> None:
    """Download the object ``uri`` into ``target``, checked against the SHA-256 stored with it.

    Raises:
        StorageError: If the object is missing or what arrived differs from what was stored.
    """
    loc = _object(uri)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    size, digest = storage.download_object(client, loc.bucket, loc.prefix, Path(target))
    storage.verify_object(client, loc.bucket, loc.prefix, size=size, sha256=digest)


def download_if_present(client: Any, uri: str, target: Path) -> bool:
    """:func:`download_file` of ``uri`` if that object exists; whether it did.

    Raises:
        StorageError: If the server cannot be asked, or what arrived differs from what was
            stored.
    """
    loc = _object(uri)
    if not storage.object_exists(client, loc.bucket, loc.prefix):
        return False
    download_file(client, uri, target)
    return True


def upload_files(client: Any, uri: str, files: Mapping[str, Path]) -> list[dict[str, Any]]:
    """Upload files under the prefix ``uri``, verify each, then write the manifest.

    Args:
        client: An S3 client (:func:`switchprune.storage.make_client`).
        uri: ``s3://bucket/prefix``.
        files: Relative POSIX path under the prefix (``trained/switched.pt``) to local file.

    Returns:
        The manifest's entries: ``name``, ``size``, ``sha256``.

    Raises:
        StorageError: If a name is not a clean relative path, a file cannot be read, or an
            upload fails or does not verify.
    """
    loc = storage.parse_s3_uri(uri)
    entries = [
        {"name": name, "sha256": storage.sha256_file(path), "size": path.stat().st_size}
        for name, path in sorted((_checked(name), Path(p)) for name, p in files.items())
    ]
    storage.ensure_bucket(client, loc.bucket)
    checksum = True
    for entry in entries:
        with open(files[entry["name"]], "rb") as fh:
            key = loc.key(entry["name"])
            checksum = storage.put_object(
                client, loc.bucket, key, fh, sha256=entry["sha256"], checksum=checksum
            )
    for entry in entries:
        storage.verify_object(
            client, loc.bucket, loc.key(entry["name"]), size=entry["size"], sha256=entry["sha256"]
        )
    body = (json.dumps({"files": entries}, indent=2, sort_keys=True) + "\n").encode()
    storage.put_object(client, loc.bucket, loc.key(MANIFEST), body, content_type=_JSON)
    logger.info("uploaded %d file(s) to %s", len(entries), loc.uri())
    return entries


def upload_dir(client: Any, uri: str, folder: Path) -> list[dict[str, Any]]:
    """:func:`upload_files` of every file under ``folder``, at its path relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StorageError(f"cannot upload {folder}: not a folder")
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    return upload_files(client, uri, files)


def download_dir(client: Any, uri: str, folder: Path) -> list[dict[str, Any]]:
    """Download the files :func:`upload_files` put under ``uri`` into ``folder``.

    Returns:
        The manifest's entries.

    Raises:
        StorageError: If the prefix has no manifest (nothing, or an unfinished upload), or a
            file is missing or differs from its entry.
    """
    loc = storage.parse_s3_uri(uri)
    raw = storage.get_bytes(client, loc.bucket, loc.key(MANIFEST))
    if raw is None:
        raise StorageError(
            f"{loc.uri()} at {storage.endpoint_name(client)} holds no complete upload "
            f"({MANIFEST} is missing)"
        )
    entries = _entries(raw, loc.uri(MANIFEST))
    for entry in entries:
        target = Path(folder) / entry["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        size, digest = storage.download_object(client, loc.bucket, loc.key(entry["name"]), target)
        if (size, digest) != (entry["size"], entry["sha256"]):
            raise StorageError(
                f"{loc.uri(entry['name'])} does not match {MANIFEST}: got {size} bytes with "
                f"sha256 {digest}, expected {entry['size']} bytes with sha256 {entry['sha256']}"
            )
    return entries


def delete_prefix(client: Any, uri: str) -> int:
    """Delete every object under the prefix ``uri`` (a folder of its own); returns how many."""
    loc = storage.parse_s3_uri(uri)
    if not loc.prefix:
        raise StorageError(f"refusing to empty the whole bucket {uri!r}")
    objects = storage.list_objects(client, loc.bucket, loc.prefix + "/")
    with storage.reporting(client, f"deleting {loc.uri()}"):
        for obj in objects:
            client.delete_object(Bucket=loc.bucket, Key=obj["Key"])
    return len(objects)


def _object(uri: str) -> storage.S3Location:
    """``uri`` as a location whose prefix is the object's key."""
    loc = storage.parse_s3_uri(uri)
    if not loc.prefix:
        raise StorageError(f"{uri!r} names a bucket, not an object")
    return loc


def _checked(name: str) -> str:
    """A relative POSIX path that stays under the prefix (and the folder it lands in)."""
    parts = PurePosixPath(name).parts
    bad = (
        not parts
        or name.startswith("/")
        or any(p in ("", ".", "..") for p in name.split("/"))
        or re.search(r"[\\\x00-\x1f\x7f]", name) is not None
        or name == MANIFEST
    )
    if bad:
        raise StorageError(f"invalid file name {name!r}: a relative path without '.' or '..'")
    return name


def _entries(raw: bytes, where: str) -> list[dict[str, Any]]:
    """The manifest's entries, each checked (a bad name could write outside the folder)."""
    try:
        entries = json.loads(raw)["files"]
        return [
            {"name": _checked(e["name"]), "size": int(e["size"]), "sha256": str(e["sha256"])}
            for e in entries
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"{where} is not a valid manifest: {exc}") from exc
