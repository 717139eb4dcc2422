"""Verified S3 object operations: a fail-fast client, hashed uploads, checked downloads.

Every object written here carries its SHA-256 in user metadata (``x-amz-meta-sha256``) and, where
the server accepts it, as an S3 checksum; :func:`verify_object` checks size and SHA-256 on the
server, and downloads are hashed as they stream. Errors surface as one :class:`StorageError`
naming the endpoint, bucket and key; credentials are never part of a message or a log line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

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

from switchprune import names
from switchprune.errors import ServiceFailure, redact_uri, reraised_as
from switchprune.io import file_digest

logger = logging.getLogger(__name__)

ENDPOINT_ENV = "SWITCHPRUNE_S3_ENDPOINT"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 2  # first try plus one retry: an unreachable endpoint fails in seconds
_CHUNK = 1 << 20
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

# S3 bucket naming rules (the subset every implementation accepts; no dots next to each other).
_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_NO_CHECKSUM_CODES = {"NotImplemented", "InvalidArgument", "InvalidRequest"}
# The session each client of :func:`make_client` came from, so that messages can be scrubbed of
# the credentials it resolved (from any source, not only the environment).
_SESSIONS: weakref.WeakKeyDictionary[Any, boto3.session.Session] = weakref.WeakKeyDictionary()


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
    if not names.is_bucket(bucket):
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
    session = boto3.session.Session()
    try:
        client = session.client("s3", endpoint_url=endpoint or None, config=config)
    except (ValueError, BotoCoreError) as exc:
        raise StorageError(
            f"cannot create an S3 client for {_safe_endpoint(endpoint)}: {exc}"
        ) from exc
    _SESSIONS[client] = session
    return client


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create ``bucket`` unless it exists.

    Args:
        client: An S3 client (see :func:`make_client`).
        bucket: Bucket name.

    Raises:
        StorageError: If the endpoint is unreachable, the credentials are refused, access is
            denied, or the bucket cannot be created.
    """
    if _bucket_exists(client, bucket):
        return
    action = f"creating bucket s3://{bucket}"
    kwargs: dict[str, Any] = {"Bucket": bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
        logger.info("created bucket s3://%s at %s", bucket, endpoint_name(client))
    except ClientError as exc:
        if _code(exc) == "BucketAlreadyOwnedByYou":
            return
        if _code(exc) == "BucketAlreadyExists":
            # Someone created it between our HEAD and CREATE: fine if we can use it.
            with contextlib.suppress(Exception):
                client.head_bucket(Bucket=bucket)
                return
        raise as_storage_error(client, action, exc) from exc
    except Exception as exc:
        raise as_storage_error(client, action, exc) from exc


def _bucket_exists(client: Any, bucket: str) -> bool:
    """Whether the bucket exists (False if it does not); any other answer raises."""
    action = f"checking bucket s3://{bucket}"
    try:
        client.head_bucket(Bucket=bucket)
        return True
    except ClientError as exc:
        if _code(exc) == "403":
            # HEAD responses have no body, so a bare 403 hides *why*; a listing tells.
            _probe_forbidden(client, bucket, action)
        if _code(exc) in _MISSING_CODES:
            return False
        raise as_storage_error(client, action, exc) from exc
    except Exception as exc:
        raise as_storage_error(client, action, exc) from exc


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks.

    Raises:
        StorageError: If the file cannot be read.
    """
    try:
        return file_digest(path)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def put_object(
    client: Any,
    bucket: str,
    key: str,
    body: bytes | IO[bytes],
    *,
    sha256: str,
    content_type: str = "application/octet-stream",
    checksum: bool = True,
) -> bool:
    """PUT one object with its SHA-256 in metadata and, if ``checksum``, as an S3 checksum.

    With ``ChecksumSHA256`` a server that implements checksums refuses bytes that do not match
    ``sha256``; a server that rejects the header gets the object without it. Not every server
    that accepts the header checks it, so :func:`verify_object` is what proves an upload.

    Args:
        client: An S3 client (see :func:`make_client`).
        bucket: Bucket name.
        key: Object key.
        body: The bytes, or a binary file positioned at its start.
        sha256: Hex SHA-256 of ``body``.
        content_type: The object's ``Content-Type``.
        checksum: Whether to send the S3 checksum header.

    Returns:
        Whether the checksum header was sent and accepted: pass it as ``checksum`` to the next
        upload of the same session, so that a server's refusal is paid once.

    Raises:
        StorageError: If the upload fails.
    """
    kwargs: dict[str, Any] = {
        "Bucket": bucket,
        "Key": key,
        "Body": body,
        "ContentType": content_type,
        "Metadata": {"sha256": sha256},
    }
    with reporting(client, f"uploading s3://{bucket}/{key}"):
        if checksum:
            try:
                client.put_object(**kwargs, ChecksumSHA256=_b64(sha256))
                return True
            except ClientError as exc:
                if _code(exc) not in _NO_CHECKSUM_CODES:
                    raise
                if not isinstance(body, bytes):
                    body.seek(0)
        client.put_object(**kwargs)
        return False


def object_matches(client: Any, bucket: str, key: str, *, size: int, sha256: str) -> bool:
    """Whether the object exists with this size and SHA-256.

    Raises:
        StorageError: If S3 cannot be asked (an absent object is False, not an error).
    """
    with reporting(client, f"checking s3://{bucket}/{key}"):
        return _mismatch(client, bucket, key, size, sha256) is None


def verify_object(client: Any, bucket: str, key: str, *, size: int, sha256: str) -> None:
    """Check a stored object's size, SHA-256 metadata and S3 checksum (if the server keeps one).

    Raises:
        StorageError: If the object is missing, differs in any of these, or cannot be checked.
    """
    with reporting(client, f"checking s3://{bucket}/{key}"):
        reason = _mismatch(client, bucket, key, size, sha256)
    if reason is not None:
        raise StorageError(reason)


def object_exists(client: Any, bucket: str, key: str) -> bool:
    """Whether ``key`` exists (a HEAD request: nothing is downloaded)."""
    return _head(client, bucket, key) is not None


def get_bytes(client: Any, bucket: str, key: str) -> bytes | None:
    """The whole object, or None if it (or its bucket) does not exist.

    Raises:
        StorageError: If the object exists but cannot be read.
    """
    try:
        return b"".join(_stream(client, bucket, key))
    except ClientError as exc:
        if _code(exc) in _MISSING_CODES:
            return None
        raise as_storage_error(client, f"reading s3://{bucket}/{key}", exc) from exc
    except Exception as exc:
        raise as_storage_error(client, f"reading s3://{bucket}/{key}", exc) from exc


def download_object(client: Any, bucket: str, key: str, target: Path) -> tuple[int, str]:
    """Stream an object into ``target``.

    Returns:
        The byte count and hex SHA-256 of what arrived, for the caller to check.

    Raises:
        StorageError: If the object cannot be read or ``target`` written.
    """
    sha = hashlib.sha256()
    size = 0
    with reporting(client, f"downloading s3://{bucket}/{key}"), open(target, "wb") as fh:
        for chunk in _stream(client, bucket, key):
            fh.write(chunk)
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def list_objects(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object under ``prefix`` (``Key``, ``Size``, ``LastModified``, ...).

    Raises:
        StorageError: If the bucket cannot be listed.
    """
    out: list[dict[str, Any]] = []
    with reporting(client, f"listing s3://{bucket}/{prefix}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += page.get("Contents", [])
    return out


def endpoint_name(client: Any) -> str:
    """The client's endpoint, fit for a message (no ``user:password@`` part)."""
    return _safe_endpoint(getattr(client.meta, "endpoint_url", None))


def describe(client: Any, exc: BaseException) -> str:
    """One line saying why an S3 call failed, with credentials blanked out.

    Args:
        client: The client the call went through (its endpoint is named).
        exc: What the call raised: a botocore error, a :class:`StorageError`, an ``OSError``...

    Returns:
        The reason, e.g. ``S3 endpoint http://host:9000 is unreachable (...)``.
    """
    return _redact(_reason(client, exc), client)


def as_storage_error(client: Any, action: str, exc: BaseException) -> StorageError:
    """``exc`` as a :class:`StorageError` reading ``<action>: <reason>`` (one passes through)."""
    if isinstance(exc, StorageError):
        return exc
    return StorageError(_redact(f"{action}: {_reason(client, exc)}", client))


def reporting(client: Any, action: str) -> contextlib.AbstractContextManager[None]:
    """Turn any failure inside the block into one :class:`StorageError` about ``action``."""
    return reraised_as(StorageError, lambda exc: as_storage_error(client, action, exc))


# --------------------------------------------------------------------------------------------
# helpers


def _uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """``head_object`` (with checksums requested), or None if the object does not exist."""
    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        if _code(exc) in _MISSING_CODES:
            return None
        raise


def _mismatch(client: Any, bucket: str, key: str, size: int, sha256: str) -> str | None:
    """Why the stored object is not the expected bytes, or None if it is."""
    uri = f"s3://{bucket}/{key}"
    head = _head(client, bucket, key)
    if head is None:
        return f"{uri} is missing"
    if head.get("ContentLength") != size:
        return f"{uri} has {head.get('ContentLength')} bytes on the server, expected {size}"
    digest = _remote_sha256(client, bucket, key, head)
    if digest != sha256:
        return f"{uri} has sha256 {digest} on the server, expected {sha256}"
    checksum = head.get("ChecksumSHA256")
    # A composite (multipart) checksum ends in "-N" and is not the file's hash: skip it.
    if checksum and "-" not in checksum and checksum != _b64(sha256):
        return f"{uri} has S3 checksum {checksum}, expected {_b64(sha256)}"
    return None


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


def _stream(client: Any, bucket: str, key: str) -> Iterator[bytes]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        yield from body.iter_chunks(_CHUNK)
    finally:
        body.close()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _safe_endpoint(endpoint: str | None) -> str:
    """The endpoint fit for a message: no ``user:password@`` part, or what the default is."""
    return redact_uri(endpoint) if endpoint else "the default AWS endpoint"


def _secrets(client: Any) -> list[str]:
    """Credential strings that must never appear in a message."""
    values = [os.environ.get(name, "") for name in _SECRET_ENV]
    session = _SESSIONS.get(client)
    credentials = session.get_credentials() if session is not None else None
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        values += [frozen.access_key or "", frozen.secret_key or "", frozen.token or ""]
    # Very short values would blank out ordinary words; real keys are far longer.
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def _redact(text: str, client: Any) -> str:
    for secret in _secrets(client):
        text = text.replace(secret, "***")
    return " ".join(text.split())  # one line


def _reason(client: Any, exc: BaseException) -> str:
    """A readable reason for an exception raised by botocore (or anything else)."""
    endpoint = endpoint_name(client)
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
        return f"S3 endpoint {endpoint} is unreachable ({type(exc).__name__})"
    if isinstance(exc, ReadTimeoutError):
        return f"S3 endpoint {endpoint} did not answer within {READ_TIMEOUT_S:.0f} s"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return _no_credentials_reason(endpoint)
    if isinstance(exc, FlexibleChecksumError):
        return f"checksum of the response from {endpoint} does not match ({exc})"
    if isinstance(exc, ClientError):
        return _client_error_reason(endpoint, exc)
    if isinstance(exc, StorageError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def _no_credentials_reason(endpoint: str) -> str:
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


def _client_error_reason(endpoint: str, exc: ClientError) -> str:
    code = _code(exc)
    if code == "InvalidAccessKeyId":
        return f"{endpoint} does not know the access key (InvalidAccessKeyId)"
    if code == "SignatureDoesNotMatch":
        return (
            f"{endpoint} rejected the request signature: wrong secret key (SignatureDoesNotMatch)"
        )
    if code in ("AccessDenied", "403"):
        return f"{endpoint} denied access (HTTP 403 {code}): check the credentials"
    if code in ("NoSuchBucket", "NoSuchKey", "404"):
        return f"not found at {endpoint} ({code})"
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = exc.response.get("Error", {}).get("Message", "")
    return f"{endpoint} answered HTTP {status} {code}: {message}".rstrip(": ")


def _probe_forbidden(client: Any, bucket: str, action: str) -> None:
    """After a bare 403 from HEAD, raise with the server's real reason (bad key or denial)."""
    try:
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except Exception as exc:
        raise as_storage_error(client, action, exc) from exc
    raise StorageError(
        _redact(f"{action}: {endpoint_name(client)} denied HEAD on the bucket (HTTP 403)", client)
    )
