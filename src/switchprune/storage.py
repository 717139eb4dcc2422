"""Promote model files to S3 and fetch them back, verified end to end.

A promoted version lands under ``<prefix>/<model_name>/v<version>/`` and is only made current by
writing ``<prefix>/<model_name>/current.json`` last, after every object has been checked. Readers
go through ``current.json`` alone, so they never see a half-promoted version: a failed promotion
removes what it uploaded and leaves the previous manifest as it was.

Every object carries its SHA-256 in user metadata (``x-amz-meta-sha256``) and, where the server
honours it, as an S3 checksum. Errors surface as one :class:`StorageError` naming the endpoint,
bucket and key; credentials are never part of a message or a log line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    FlexibleChecksumError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from switchprune.errors import ServiceFailure
from switchprune.io import file_digest

logger = logging.getLogger(__name__)

ENDPOINT_ENV = "SWITCHPRUNE_S3_ENDPOINT"
MANIFEST_NAME = "current.json"
# Present in a version folder from its first upload until its manifest is written.
INCOMPLETE_MARKER = ".incomplete"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 2  # first try plus one retry: an unreachable endpoint fails in seconds
_CHUNK = 1 << 20
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

# S3 bucket naming rules (the subset every implementation accepts; no dots next to each other).
_BUCKET_RE = re.compile(r"^(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Model and file names become single path segments of keys and of local file names.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_NO_CHECKSUM_CODES = {"NotImplemented", "InvalidArgument", "InvalidRequest"}
_RESERVED = ("name", "version", "files", "promoted_at")


class StorageError(ServiceFailure, RuntimeError):
    """An S3 operation failed; the message names endpoint, bucket and key, never credentials."""


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (without leading or trailing ``/``; may be empty)."""

    bucket: str
    prefix: str

    def key(self, *parts: str) -> str:
        """The key ``<prefix>/<parts...>`` (no leading ``/`` when the prefix is empty)."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def uri(self, *parts: str) -> str:
        """``s3://bucket/<prefix>/<parts...>``."""
        return f"s3://{self.bucket}/{self.key(*parts)}"


def parse_s3_uri(uri: str) -> S3Location:
    """Split ``s3://bucket[/prefix]`` into bucket and prefix.

    Args:
        uri: The URI; one trailing ``/`` is tolerated.

    Returns:
        The location, its prefix stripped of surrounding ``/``.

    Raises:
        StorageError: If ``uri`` is not an ``s3://`` URI with a valid bucket name and a clean
            prefix (no empty, ``.`` or ``..`` segments, no backslashes or control characters).
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise StorageError(f"not an S3 URI (expected s3://bucket[/prefix]): {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise StorageError(
            f"invalid bucket name {bucket!r} in {uri!r}: use 3-63 lowercase letters, digits, "
            "'.' or '-', starting and ending with a letter or digit"
        )
    prefix = prefix.removesuffix("/")
    if prefix:
        segments = prefix.split("/")
        if any(s in ("", ".", "..") for s in segments) or re.search(r"[\\\x00-\x1f\x7f]", prefix):
            raise StorageError(
                f"invalid prefix {prefix!r} in {uri!r}: no empty, '.' or '..' segments, "
                "backslashes or control characters"
            )
    return S3Location(bucket=bucket, prefix=prefix)


def make_client(endpoint: str | None = None) -> Any:
    """A boto3 S3 client that fails fast and works with S3-compatible servers.

    Credentials come from the usual AWS chain (environment first). A fresh session is used on
    every call, so credentials changed in the environment are picked up (boto3's default
    session would keep the first ones it found).

    Args:
        endpoint: Endpoint URL; defaults to ``SWITCHPRUNE_S3_ENDPOINT``, then
            ``AWS_ENDPOINT_URL_S3``, then AWS itself.

    Returns:
        The client, with path-style addressing, short timeouts and a single retry.

    Raises:
        StorageError: If the endpoint is not an ``http(s)://host[:port]`` URL.
    """
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageError(f"invalid S3 endpoint {_safe_endpoint(endpoint)!r}")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        s3={"addressing_style": "path"},  # local servers have no per-bucket DNS names
        region_name=region,
    )
    try:
        return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)
    except (ValueError, BotoCoreError) as exc:
        raise StorageError(
            f"cannot create an S3 client for {_safe_endpoint(endpoint)}: {exc}"
        ) from exc


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create ``bucket`` unless it exists.

    Args:
        client: An S3 client (see :func:`make_client`).
        bucket: Bucket name.

    Raises:
        StorageError: If the endpoint is unreachable, the credentials are refused, access is
            denied, or the bucket cannot be created.
    """
    action = f"checking bucket s3://{bucket}"
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        code = _code(exc)
        if code == "403":
            # HEAD responses have no body, so a bare 403 hides *why*; a listing tells.
            _probe_forbidden(client, bucket, action)
        if code not in _MISSING_CODES:
            raise _storage_error(client, action, exc) from exc
    except Exception as exc:
        raise _storage_error(client, action, exc) from exc
    action = f"creating bucket s3://{bucket}"
    kwargs: dict[str, Any] = {"Bucket": bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
        logger.info("created bucket s3://%s at %s", bucket, _endpoint(client))
    except ClientError as exc:
        if _code(exc) == "BucketAlreadyOwnedByYou":
            return
        if _code(exc) == "BucketAlreadyExists":
            # Someone created it between our HEAD and CREATE: fine if we can use it.
            try:
                client.head_bucket(Bucket=bucket)
                return
            except Exception:
                pass
        raise _storage_error(client, action, exc) from exc
    except Exception as exc:
        raise _storage_error(client, action, exc) from exc


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks.

    Raises:
        StorageError: If the file cannot be read.
    """
    try:
        return file_digest(path)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def promote_files(
    client: Any,
    files: dict[str, Path],
    *,
    s3_uri: str,
    model_name: str,
    version: int,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Upload and verify a model version, then make it current by writing its manifest last.

    Objects go to ``<prefix>/<model_name>/v<version>/<name>``; objects already there with the
    same SHA-256 are reused, not re-uploaded. Every object is then checked with ``head_object``
    (size and SHA-256), and only then is ``<prefix>/<model_name>/current.json`` written: the
    given ``manifest`` plus ``name``, ``version``, ``files`` and ``promoted_at`` (these four
    override keys of the same name in ``manifest``).

    If ``current.json`` already names this version with the same files and they check out,
    nothing is written (``changed`` is False). On any failure the objects this call uploaded
    are deleted (best effort), the previous ``current.json`` is left as it was, and a
    :class:`StorageError` is raised.

    Args:
        client: An S3 client (see :func:`make_client`).
        files: Object name (one path segment) to local file.
        s3_uri: ``s3://bucket[/prefix]``; the bucket is created if missing.
        model_name: Model name (one path segment).
        version: Model version (>= 1).
        manifest: Extra JSON-serialisable fields of the manifest (metrics, run ids, ...).

    Returns:
        ``changed``, ``manifest_key``, ``files`` (``name``, ``key``, ``size``, ``sha256`` per
        file), ``s3_uri`` of the version folder, ``uploaded`` (names uploaded by this call) and
        the ``manifest`` now current.

    Raises:
        StorageError: If an argument is invalid, a file is unreadable, the version is already
            current with different files, or any S3 operation or check fails.
    """
    loc = parse_s3_uri(s3_uri)
    _check_name(model_name, "model name")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StorageError(f"version must be an integer >= 1, got {version!r}")
    if not files:
        raise StorageError("nothing to promote: no files given")
    if not isinstance(manifest, dict):
        raise StorageError(f"manifest must be a mapping, got {type(manifest).__name__}")
    try:
        json.dumps(manifest)
    except (TypeError, ValueError) as exc:
        raise StorageError(f"manifest is not JSON-serialisable: {exc}") from exc

    version_dir = f"v{version}"
    entries: list[dict[str, Any]] = []
    local: dict[str, Path] = {}
    for name in sorted(files):
        _check_name(name, "file name")
        path = Path(files[name])
        if not path.is_file():
            raise StorageError(f"cannot promote {name!r}: {path} is not a file")
        local[name] = path
        entries.append(
            {
                "name": name,
                "key": loc.key(model_name, version_dir, name),
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    manifest_key = loc.key(model_name, MANIFEST_NAME)
    result: dict[str, Any] = {
        "changed": False,
        "manifest_key": manifest_key,
        "files": entries,
        "s3_uri": loc.uri(model_name, version_dir) + "/",
        "uploaded": [],
    }

    ensure_bucket(client, loc.bucket)
    previous_raw = _get_bytes(client, loc.bucket, manifest_key)
    previous = None if previous_raw is None else _parse_manifest(previous_raw, loc, manifest_key)
    if previous is not None and previous["version"] == version:
        if _fingerprint(previous["files"]) != _fingerprint(entries):
            raise StorageError(
                f"{loc.uri(model_name, version_dir)}/ is already current with different files "
                f"(see {_uri(loc.bucket, manifest_key)}); promote the change as a new version"
            )
        try:
            intact = all(_object_matches(client, loc.bucket, e) for e in entries)
        except Exception as exc:
            what = f"checking {loc.uri(model_name, version_dir)}/"
            raise _storage_error(client, what, exc) from exc
        if intact:
            logger.info("%s v%d is already current; nothing written", model_name, version)
            return {**result, "manifest": previous}
        # Some listed object is gone or altered: fall through and repair the version.

    uploaded: list[str] = []
    stage = "uploading"
    marker = loc.key(model_name, version_dir, INCOMPLETE_MARKER)
    try:
        checksums = {"enabled": True}
        # Marks the version folder as being written until its manifest is: a promotion that
        # dies here leaves a folder that :func:`remove_incomplete` recognises and removes.
        client.put_object(Bucket=loc.bucket, Key=marker, Body=b"")
        uploaded.append(marker)
        for entry in entries:
            if _object_matches(client, loc.bucket, entry):
                continue
            with open(local[entry["name"]], "rb") as fh:
                _put(client, checksums, loc.bucket, entry, fh)
            uploaded.append(entry["key"])
            logger.info("uploaded %s (%d bytes)", _uri(loc.bucket, entry["key"]), entry["size"])
        stage = "verifying"
        for entry in entries:
            _verify(client, loc.bucket, entry)
        stage = "writing the manifest"
        document = {
            **manifest,
            "name": model_name,
            "version": version,
            "files": entries,
            "promoted_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        body = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
        manifest_entry: dict[str, Any] = {
            "key": manifest_key,
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        _put(client, checksums, loc.bucket, manifest_entry, body, content_type="application/json")
        uploaded.remove(marker)
        _delete_quietly(client, loc.bucket, marker)
    except BaseException as exc:
        notes = _roll_back(client, loc.bucket, uploaded, manifest_key, previous_raw, stage)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt and friends: clean up, but do not disguise them
        detail = str(exc) if isinstance(exc, StorageError) else _describe(client, exc)
        raise StorageError(
            _redact(
                f"promoting {model_name} v{version} to {loc.uri(model_name, version_dir)}/ "
                f"failed while {stage}: {detail}; {notes}",
                client,
            )
        ) from exc
    logger.info("promoted %s v%d: %s", model_name, version, _uri(loc.bucket, manifest_key))
    names = {e["key"]: e["name"] for e in entries}
    return {
        **result,
        "changed": True,
        "uploaded": [names[k] for k in uploaded],
        "manifest": document,
    }


def remove_incomplete(
    client: Any, s3_uri: str, model_name: str, *, older_than: float = 3600.0
) -> list[str]:
    """Delete version folders left by promotions that died before writing their manifest.

    A folder is incomplete while it holds :data:`INCOMPLETE_MARKER`; only markers older than
    ``older_than`` seconds count, so that a promotion still running elsewhere is left alone,
    and the version the manifest names is never touched.

    Returns:
        The keys deleted.

    Raises:
        StorageError: If S3 cannot be listed or an object cannot be deleted.
    """
    loc = parse_s3_uri(s3_uri)
    _check_name(model_name, "model name")
    prefix = loc.key(model_name) + "/"
    current = read_manifest(client, s3_uri, model_name)
    keep = f"{prefix}v{current['version']}/" if current else None
    now = datetime.now(UTC)
    deleted: list[str] = []
    try:
        objects = _list(client, loc.bucket, prefix)
        stale = {
            o["Key"][: -len(INCOMPLETE_MARKER)]
            for o in objects
            if o["Key"].endswith("/" + INCOMPLETE_MARKER)
            and (now - o["LastModified"]).total_seconds() >= older_than
        }
        for folder in sorted(stale - {keep}):
            for o in objects:
                if o["Key"].startswith(folder):
                    client.delete_object(Bucket=loc.bucket, Key=o["Key"])
                    deleted.append(o["Key"])
    except StorageError:
        raise
    except Exception as exc:
        raise _storage_error(client, f"removing incomplete versions under {prefix}", exc) from exc
    if deleted:
        logger.info("removed %d object(s) of incomplete promotions of %s", len(deleted), model_name)
    return deleted


def _list(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += page.get("Contents", [])
    return out


def _delete_quietly(client: Any, bucket: str, key: str) -> None:
    """Best effort: a marker that cannot be deleted is swept by :func:`remove_incomplete`."""
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except Exception:
        logger.warning("could not remove s3://%s/%s", bucket, key)


def read_manifest(client: Any, s3_uri: str, model_name: str) -> dict[str, Any] | None:
    """Read ``<prefix>/<model_name>/current.json``.

    Args:
        client: An S3 client.
        s3_uri: ``s3://bucket[/prefix]``.
        model_name: Model name.

    Returns:
        The manifest, or None if there is none (no such key or no such bucket).

    Raises:
        StorageError: If it cannot be read, is not JSON, or lacks ``version`` or ``files``.
    """
    loc = parse_s3_uri(s3_uri)
    _check_name(model_name, "model name")
    key = loc.key(model_name, MANIFEST_NAME)
    raw = _get_bytes(client, loc.bucket, key)
    return None if raw is None else _parse_manifest(raw, loc, key)


def download_promoted(client: Any, s3_uri: str, model_name: str, out_dir: Path) -> dict[str, Any]:
    """Download the current version's files into ``out_dir``, verified against the manifest.

    Files are downloaded into a temporary folder beside ``out_dir`` and checked (size and
    SHA-256) before any of them is moved in, so a failure leaves ``out_dir`` as it was.
    Other files already in ``out_dir`` are kept; listed ones are replaced.

    Args:
        client: An S3 client.
        s3_uri: ``s3://bucket[/prefix]``.
        model_name: Model name.
        out_dir: Destination folder (created if missing).

    Returns:
        The manifest.

    Raises:
        StorageError: If there is no manifest, a file is missing or does not match it, or S3
            cannot be reached.
    """
    loc = parse_s3_uri(s3_uri)
    document = read_manifest(client, s3_uri, model_name)
    if document is None:
        raise StorageError(
            f"no promoted version of {model_name}: {loc.uri(model_name, MANIFEST_NAME)} "
            f"not found at {_endpoint(client)}"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        for entry in document["files"]:
            target = staging / entry["name"]
            size, digest = _download(client, loc.bucket, entry["key"], target)
            if size != entry["size"] or digest != entry["sha256"]:
                raise StorageError(
                    f"{_uri(loc.bucket, entry['key'])} at {_endpoint(client)} does not match its "
                    f"manifest: got {size} bytes with sha256 {digest}, expected "
                    f"{entry['size']} bytes with sha256 {entry['sha256']}"
                )
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            for entry in document["files"]:
                os.replace(staging / entry["name"], out_dir / entry["name"])
        except OSError as exc:
            raise StorageError(f"cannot move downloaded files into {out_dir}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("downloaded %s v%s into %s", model_name, document["version"], out_dir)
    return document


# --------------------------------------------------------------------------------------------
# helpers


def restore_manifest(
    client: Any,
    s3_uri: str,
    model_name: str,
    previous: dict[str, Any] | None,
    remove: list[str] | tuple[str, ...] = (),
) -> None:
    """Put back the manifest that was current before a promotion (or remove it if none was).

    Used when a step after the manifest (moving the registry alias) fails, so that the S3 copy
    and the registry keep naming the same version. The objects that promotion uploaded
    (``remove``, keys in the same bucket) are deleted after the manifest no longer names them.

    Raises:
        StorageError: If the manifest cannot be written or removed, or an object not deleted.
    """
    loc = parse_s3_uri(s3_uri)
    key = loc.key(model_name, MANIFEST_NAME)
    try:
        if previous is None:
            client.delete_object(Bucket=loc.bucket, Key=key)
        else:
            body = (json.dumps(previous, indent=2, sort_keys=True) + "\n").encode()
            client.put_object(Bucket=loc.bucket, Key=key, Body=body, ContentType="application/json")
    except Exception as exc:
        raise _storage_error(client, f"restoring {_uri(loc.bucket, key)}", exc) from exc
    for stale in remove:
        try:
            client.delete_object(Bucket=loc.bucket, Key=stale)
        except Exception as exc:
            raise _storage_error(client, f"removing {_uri(loc.bucket, stale)}", exc) from exc


def download_dvc_version(client: Any, remote_url: str, md5: str, out_dir: Path) -> Path:
    """Materialise one DVC-tracked file or directory from a DVC 3 remote on S3, by its hash.

    DVC stores content by md5 under ``<remote>/files/md5/<2 chars>/<rest>``; a directory's entry
    (``<md5>.dir``) lists its files. Each file is checked against its md5, so ``out_dir`` holds
    exactly the version named by ``md5`` (the value in ``<name>.dvc`` and in the evaluation
    report) or nothing new at all.

    Args:
        client: A boto3 S3 client for the remote's endpoint.
        remote_url: The DVC remote, ``s3://bucket[/prefix]`` (``url`` in ``.dvc/config``).
        md5: The DVC hash, ``<32 hex>`` for a file or ``<32 hex>.dir`` for a directory.
        out_dir: Where the directory's files (or the single file, under its hash) go.

    Returns:
        ``out_dir``.

    Raises:
        StorageError: Unknown hash, unreachable remote, or content that does not match.
    """
    if not re.fullmatch(r"[0-9a-f]{32}(\.dir)?", md5):
        raise StorageError(f"{md5!r} is not a DVC md5 hash (32 hex digits, '.dir' for folders)")
    loc = parse_s3_uri(remote_url)

    def key(digest: str) -> str:
        return loc.key("files", "md5", digest[:2], digest[2:])

    if md5.endswith(".dir"):
        raw = _get_bytes(client, loc.bucket, key(md5))
        if raw is None:
            raise StorageError(f"{_uri(loc.bucket, key(md5))}: no such version on the DVC remote")
        try:
            entries = json.loads(raw)
            files = [(str(e["relpath"]), str(e["md5"])) for e in entries]
        except (ValueError, TypeError, KeyError) as exc:
            raise StorageError(
                f"{_uri(loc.bucket, key(md5))}: not a DVC directory listing"
            ) from exc
    else:
        files = [(md5, md5)]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for relpath, digest in files:
            target = (tmp / relpath).resolve()
            if not target.is_relative_to(tmp.resolve()) or not re.fullmatch(
                r"[0-9a-f]{32}", digest
            ):
                raise StorageError(f"DVC listing {md5} has an unsafe entry {relpath!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            _download(client, loc.bucket, key(digest), target)
            got = file_digest(target, "md5")
            if got != digest:
                raise StorageError(f"{_uri(loc.bucket, key(digest))}: md5 {got}, expected {digest}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StorageError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _fingerprint(entries: list[dict[str, Any]]) -> dict[str, tuple[int, str]]:
    return {e["name"]: (e["size"], e["sha256"]) for e in entries}


def _uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _put(
    client: Any,
    checksums: dict[str, bool],
    bucket: str,
    entry: dict[str, Any],
    body: Any,
    content_type: str = "application/octet-stream",
) -> None:
    """PUT one object with its SHA-256 in metadata, and as an S3 checksum when supported.

    With ``ChecksumSHA256`` a server that implements checksums refuses bytes that do not match
    the local hash; servers that reject the header get the object without it (``checksums`` is
    shared across calls so the refusal is paid once).
    """
    kwargs: dict[str, Any] = {
        "Bucket": bucket,
        "Key": entry["key"],
        "Body": body,
        "ContentType": content_type,
        "Metadata": {"sha256": entry["sha256"]},
    }
    if checksums["enabled"]:
        try:
            client.put_object(**kwargs, ChecksumSHA256=_b64(entry["sha256"]))
            return
        except ClientError as exc:
            if _code(exc) not in _NO_CHECKSUM_CODES:
                raise
            checksums["enabled"] = False
            if hasattr(body, "seek"):
                body.seek(0)
    client.put_object(**kwargs)


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """``head_object`` (with checksums requested), or None if the object does not exist."""
    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        if _code(exc) in _MISSING_CODES:
            return None
        raise


def _metadata_sha256(head: dict[str, Any]) -> str | None:
    # Servers differ in the case of user-metadata keys (rclone answers "Sha256").
    meta = {str(k).lower(): str(v) for k, v in (head.get("Metadata") or {}).items()}
    value = meta.get("sha256")
    return value.lower() if value else None


def _remote_sha256(client: Any, bucket: str, key: str, head: dict[str, Any]) -> str:
    """The object's SHA-256: from its metadata, else (metadata lost) by hashing its bytes.

    rclone keeps user metadata in memory only, so after a restart it is gone; hashing the
    object then is the only way to tell.
    """
    digest = _metadata_sha256(head)
    if digest is not None:
        return digest
    sha = hashlib.sha256()
    for chunk in _stream(client, bucket, key):
        sha.update(chunk)
    return sha.hexdigest()


def _object_matches(client: Any, bucket: str, entry: dict[str, Any]) -> bool:
    """Whether the object exists with the entry's size and SHA-256 (False if absent)."""
    head = _head(client, bucket, entry["key"])
    if head is None or head.get("ContentLength") != entry["size"]:
        return False
    return _remote_sha256(client, bucket, entry["key"], head) == entry["sha256"]


def _verify(client: Any, bucket: str, entry: dict[str, Any]) -> None:
    """Check an uploaded object's size, SHA-256 metadata and S3 checksum (if any)."""
    uri = f"s3://{bucket}/{entry['key']}"
    head = _head(client, bucket, entry["key"])
    if head is None:
        raise StorageError(f"{uri} is missing right after its upload")
    size = head.get("ContentLength")
    if size != entry["size"]:
        raise StorageError(f"{uri} has {size} bytes on the server, expected {entry['size']}")
    digest = _remote_sha256(client, bucket, entry["key"], head)
    if digest != entry["sha256"]:
        raise StorageError(f"{uri} has sha256 {digest} on the server, expected {entry['sha256']}")
    checksum = head.get("ChecksumSHA256")
    # A composite (multipart) checksum ends in "-N" and is not the file's hash: skip it.
    if checksum and "-" not in checksum and checksum != _b64(entry["sha256"]):
        raise StorageError(f"{uri} has S3 checksum {checksum}, expected {_b64(entry['sha256'])}")


def _stream(client: Any, bucket: str, key: str) -> Iterator[bytes]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        yield from body.iter_chunks(_CHUNK)
    finally:
        body.close()


def _download(client: Any, bucket: str, key: str, target: Path) -> tuple[int, str]:
    """Stream an object into ``target``; return the byte count and SHA-256 of what arrived."""
    action = f"downloading s3://{bucket}/{key}"
    sha = hashlib.sha256()
    size = 0
    try:
        with open(target, "wb") as fh:
            for chunk in _stream(client, bucket, key):
                fh.write(chunk)
                sha.update(chunk)
                size += len(chunk)
    except Exception as exc:
        raise _storage_error(client, action, exc) from exc
    return size, sha.hexdigest()


def _get_bytes(client: Any, bucket: str, key: str) -> bytes | None:
    """The whole object, or None if it (or its bucket) does not exist."""
    try:
        return b"".join(_stream(client, bucket, key))
    except ClientError as exc:
        if _code(exc) in _MISSING_CODES:
            return None
        raise _storage_error(client, f"reading s3://{bucket}/{key}", exc) from exc
    except Exception as exc:
        raise _storage_error(client, f"reading s3://{bucket}/{key}", exc) from exc


def _parse_manifest(raw: bytes, loc: S3Location, key: str) -> dict[str, Any]:
    """Decode and check a manifest; the checks keep downloads inside the output folder."""
    uri = _uri(loc.bucket, key)
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{uri} is not valid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise StorageError(f"{uri} must hold a JSON object, found {type(document).__name__}")
    version = document.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise StorageError(f"{uri} has no integer 'version'")
    files = document.get("files")
    if not isinstance(files, list) or not files:
        raise StorageError(f"{uri} has no 'files' list")
    for entry in files:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and bool(_NAME_RE.match(entry["name"]))
            and isinstance(entry.get("key"), str)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
            and bool(re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]))
        )
        if not ok:
            raise StorageError(f"{uri} has an invalid file entry: {entry!r}")
    if len({e["name"] for e in files}) != len(files):
        raise StorageError(f"{uri} lists a file name twice")
    return document


def _roll_back(
    client: Any,
    bucket: str,
    uploaded: list[str],
    manifest_key: str,
    previous_raw: bytes | None,
    stage: str,
) -> str:
    """Best-effort undo of a failed promotion; returns a note for the error message."""
    notes = []
    if stage == "writing the manifest":
        # The PUT may have reached the server even though the call failed: put back the
        # previous manifest (or remove the new one) before its objects disappear.
        try:
            if _get_bytes(client, bucket, manifest_key) != previous_raw:
                if previous_raw is None:
                    client.delete_object(Bucket=bucket, Key=manifest_key)
                else:
                    client.put_object(Bucket=bucket, Key=manifest_key, Body=previous_raw)
                notes.append("previous manifest restored")
        except Exception:
            notes.append(f"could not check s3://{bucket}/{manifest_key}")
    left = []
    for key in uploaded:
        try:
            client.delete_object(Bucket=bucket, Key=key)
        except Exception:
            left.append(key)
    notes.append(f"removed {len(uploaded) - len(left)} uploaded object(s)")
    if left:
        notes.append(f"could not remove {', '.join(left)}")
    return ", ".join(notes)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _safe_endpoint(endpoint: str | None) -> str:
    """The endpoint without any ``user:password@`` part."""
    if not endpoint:
        return "the default AWS endpoint"
    parts = urlsplit(endpoint)
    if parts.username is None and parts.password is None:
        return endpoint
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _endpoint(client: Any) -> str:
    return _safe_endpoint(getattr(client.meta, "endpoint_url", None))


def _secrets(client: Any) -> list[str]:
    """Credential strings that must never appear in a message."""
    values = [os.environ.get(name, "") for name in _SECRET_ENV]
    try:
        creds = client._request_signer._credentials.get_frozen_credentials()
        values += [creds.access_key or "", creds.secret_key or "", creds.token or ""]
    except Exception:  # not a botocore client, or no credentials resolved yet
        pass
    # Very short values would blank out ordinary words; real keys are far longer.
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def _redact(text: str, client: Any) -> str:
    for secret in _secrets(client):
        text = text.replace(secret, "***")
    return " ".join(text.split())  # one line


def _describe(client: Any, exc: BaseException) -> str:
    """A readable reason for an exception raised by botocore (or anything else)."""
    endpoint = _endpoint(client)
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
        return f"S3 endpoint {endpoint} is unreachable ({type(exc).__name__})"
    if isinstance(exc, ReadTimeoutError):
        return f"S3 endpoint {endpoint} did not answer within {READ_TIMEOUT_S:.0f} s"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        if not (os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3")):
            # Nothing configured at all: most likely a checkout that has not run `make release`.
            return (
                f"no S3 server configured: set {ENDPOINT_ENV}, AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or run 'make release', which starts an embedded one"
            )
        return (
            f"no complete S3 credentials for {endpoint} "
            "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if isinstance(exc, FlexibleChecksumError):
        return f"checksum of the response from {endpoint} does not match ({exc})"
    if isinstance(exc, ClientError):
        code = _code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = exc.response.get("Error", {}).get("Message", "")
        if code == "InvalidAccessKeyId":
            return f"{endpoint} does not know the access key (InvalidAccessKeyId)"
        if code == "SignatureDoesNotMatch":
            return (
                f"{endpoint} rejected the request signature: wrong secret key "
                "(SignatureDoesNotMatch)"
            )
        if code in ("AccessDenied", "403"):
            return f"{endpoint} denied access (HTTP 403 {code}): check the credentials"
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            return f"not found at {endpoint} ({code})"
        return f"{endpoint} answered HTTP {status} {code}: {message}".rstrip(": ")
    if isinstance(exc, StorageError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def _storage_error(client: Any, action: str, exc: BaseException) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    return StorageError(_redact(f"{action}: {_describe(client, exc)}", client))


def _probe_forbidden(client: Any, bucket: str, action: str) -> None:
    """After a bare 403 from HEAD, raise with the server's real reason (bad key or denial)."""
    try:
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except Exception as exc:
        raise _storage_error(client, action, exc) from exc
    raise StorageError(
        _redact(f"{action}: {_endpoint(client)} denied HEAD on the bucket (HTTP 403)", client)
    )


__all__: list[str] = [
    "ENDPOINT_ENV",
    "MANIFEST_NAME",
    "S3Location",
    "StorageError",
    "download_dvc_version",
    "download_promoted",
    "ensure_bucket",
    "make_client",
    "parse_s3_uri",
    "promote_files",
    "read_manifest",
    "restore_manifest",
    "sha256_file",
]
