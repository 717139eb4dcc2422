"""Verified S3 objects: a fail-fast client, uploads carrying their SHA-256, checked downloads.

Errors surface as one :class:`StorageError` naming endpoint, bucket and key, never credentials.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import boto3
from botocore import exceptions as boto_errors
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

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
_KEYS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_NO_CHECKSUM_CODES = {"NotImplemented", "InvalidArgument", "InvalidRequest"}
_UNREACHABLE = (
    boto_errors.EndpointConnectionError,
    boto_errors.ConnectTimeoutError,
    boto_errors.ConnectionClosedError,
)
# Why a request failed, by error code ({e}: endpoint, {c}: code).
_CODE_REASONS = {
    "InvalidAccessKeyId": "{e} does not know the access key (InvalidAccessKeyId)",
    "SignatureDoesNotMatch": (
        "{e} rejected the request signature: wrong secret key (SignatureDoesNotMatch)"
    ),
    "AccessDenied": "{e} denied access (HTTP 403 {c}): check the credentials",
    "403": "{e} denied access (HTTP 403 {c}): check the credentials",
    **dict.fromkeys(("NoSuchBucket", "NoSuchKey", "404"), "not found at {e} ({c})"),
}
# The session each client of make_client came from, so that messages can be scrubbed of the
# credentials it resolved (from any source, not only the environment).
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
    """Split ``s3://bucket[/prefix]`` (one trailing ``/`` tolerated) into bucket and prefix.

    Raises:
        StorageError: Not an ``s3://`` URI with a valid bucket name and a clean prefix.
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
    if prefix and (
        any(s in ("", ".", "..") for s in prefix.split("/"))
        or re.search(r"[\\\x00-\x1f\x7f]", prefix)
    ):
        raise StorageError(
            f"invalid prefix {prefix!r} in {uri!r}: no empty, '.' or '..' segments, "
            "backslashes or control characters"
        )
    return S3Location(bucket=bucket, prefix=prefix)


def make_client(endpoint: str | None = None) -> Any:
    """A boto3 S3 client with path-style addressing, short timeouts and a single retry.

    ``endpoint`` defaults to ``SWITCHPRUNE_S3_ENDPOINT``, then ``AWS_ENDPOINT_URL_S3``, then AWS;
    credentials are resolved afresh (boto3's default session keeps the first it found).

    Raises:
        StorageError: If the endpoint is not an ``http(s)://host[:port]`` URL.
    """
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3")
    parts = urlsplit(endpoint or "")
    if endpoint and (parts.scheme not in ("http", "https") or not parts.hostname):
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
        where = _safe_endpoint(endpoint)
        raise StorageError(f"cannot create an S3 client for {where}: {exc}") from exc
    _SESSIONS[client] = session
    return client


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create ``bucket`` unless it exists.

    Raises:
        StorageError: The endpoint, the credentials or the creation failed, or access is denied.
    """
    action = f"checking bucket s3://{bucket}"
    with reporting(client, action):
        try:
            client.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if _code(exc) == "403":
                # HEAD responses have no body, so a bare 403 hides why; a listing tells.
                client.list_objects_v2(Bucket=bucket, MaxKeys=1)
                raise StorageError(
                    f"{action}: {endpoint_name(client)} denied HEAD on the bucket (HTTP 403)"
                ) from exc
            if _code(exc) not in _MISSING_CODES:
                raise
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if client.meta.region_name not in (None, "", "us-east-1"):
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": client.meta.region_name}
    with reporting(client, f"creating bucket s3://{bucket}"):
        try:
            client.create_bucket(**kwargs)
            logger.info("created bucket s3://%s at %s", bucket, endpoint_name(client))
        except ClientError as exc:
            if _code(exc) == "BucketAlreadyExists":
                # Someone created it between our HEAD and CREATE: fine if we can use it.
                with contextlib.suppress(Exception):
                    client.head_bucket(Bucket=bucket)
                    return
            if _code(exc) != "BucketAlreadyOwnedByYou":
                raise


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks; a :class:`StorageError` if it cannot be read."""
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
    sha256: str | None = None,
    content_type: str = "application/octet-stream",
    checksum: bool = True,
) -> bool:
    """PUT ``body`` (bytes, or a binary file at its start) with its hex ``sha256`` in metadata.

    ``sha256`` is computed for bytes if not given. With ``checksum`` it also goes as an S3
    checksum, dropped if the server rejects it; :func:`verify_object` is what proves an upload.

    Returns:
        Whether the checksum was accepted: the ``checksum`` for the next upload.

    Raises:
        StorageError: If the upload fails.
    """
    sha256 = sha256 or hashlib.sha256(body).hexdigest()  # type: ignore[arg-type]
    kwargs = {"Bucket": bucket, "Key": key, "Body": body, "ContentType": content_type}
    kwargs["Metadata"] = {"sha256": sha256}
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
    """Whether the object exists with this size and SHA-256 (False if absent)."""
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
    with reporting(client, f"checking s3://{bucket}/{key}"):
        return _or_none(client.head_object, Bucket=bucket, Key=key) is not None


def get_bytes(client: Any, bucket: str, key: str) -> bytes | None:
    """The whole object, or None if it (or its bucket) does not exist; else a StorageError."""
    with reporting(client, f"reading s3://{bucket}/{key}"):
        found = _or_none(client.get_object, Bucket=bucket, Key=key)
        return None if found is None else found["Body"].read()


def download_object(client: Any, bucket: str, key: str, target: Path) -> tuple[int, str]:
    """Stream an object into ``target``; the byte count and hex SHA-256 of what arrived."""
    with reporting(client, f"downloading s3://{bucket}/{key}"), open(target, "wb") as fh:
        with client.get_object(Bucket=bucket, Key=key)["Body"] as body:
            shutil.copyfileobj(body, fh, _CHUNK)
    return Path(target).stat().st_size, sha256_file(target)


def list_objects(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object under ``prefix`` (``Key``, ``Size``, ``LastModified``, ...)."""
    with reporting(client, f"listing s3://{bucket}/{prefix}"):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o for page in pages for o in page.get("Contents", [])]


def endpoint_name(client: Any) -> str:
    """The client's endpoint, fit for a message (no ``user:password@`` part)."""
    return _safe_endpoint(getattr(client.meta, "endpoint_url", None))


def describe(client: Any, exc: BaseException) -> str:
    """One line saying why an S3 call through ``client`` failed, credentials blanked out."""
    text = _reason(client, exc)
    secrets = [os.environ.get(name) for name in _SECRET_ENV]
    if (session := _SESSIONS.get(client)) and (credentials := session.get_credentials()):
        secrets += list(credentials.get_frozen_credentials())  # access key, secret, token
    # Very short values would blank out ordinary words; real keys are far longer.
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return " ".join(text.split())


def reporting(client: Any, action: str) -> contextlib.AbstractContextManager[None]:
    """Turn any failure inside the block into one :class:`StorageError` about ``action``."""
    return reraised_as(StorageError, lambda exc: StorageError(f"{action}: {describe(client, exc)}"))


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _or_none(call: Any, **kwargs: Any) -> Any:
    """``call(**kwargs)``, or None if the object (or its bucket) does not exist."""
    try:
        return call(**kwargs)
    except ClientError as exc:
        if _code(exc) in _MISSING_CODES:
            return None
        raise


def _mismatch(client: Any, bucket: str, key: str, size: int, sha256: str) -> str | None:
    """Why the stored object is not the expected bytes, or None if it is."""
    uri = f"s3://{bucket}/{key}"
    head = _or_none(client.head_object, Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    if head is None:
        return f"{uri} is missing"
    if head.get("ContentLength") != size:
        return f"{uri} has {head.get('ContentLength')} bytes on the server, expected {size}"
    # Servers differ in the case of user-metadata keys (rclone answers "Sha256"), and rclone
    # keeps them in memory only: after a restart, hashing the object is the only way to tell.
    meta = {str(k).lower(): str(v) for k, v in (head.get("Metadata") or {}).items()}
    digest = meta.get("sha256", "").lower()
    if not digest:
        with client.get_object(Bucket=bucket, Key=key)["Body"] as body:
            digest = hashlib.file_digest(body, "sha256").hexdigest()
    if digest != sha256:
        return f"{uri} has sha256 {digest} on the server, expected {sha256}"
    checksum = head.get("ChecksumSHA256")
    # A composite (multipart) checksum ends in "-N" and is not the file's hash: skip it.
    if checksum and "-" not in checksum and checksum != _b64(sha256):
        return f"{uri} has S3 checksum {checksum}, expected {_b64(sha256)}"
    return None


def _safe_endpoint(endpoint: str | None) -> str:
    return redact_uri(endpoint) if endpoint else "the default AWS endpoint"


def _reason(client: Any, exc: BaseException) -> str:
    """A readable reason for an exception raised by botocore (or anything else)."""
    endpoint = endpoint_name(client)
    if isinstance(exc, _UNREACHABLE):
        return f"S3 endpoint {endpoint} is unreachable ({type(exc).__name__})"
    if isinstance(exc, boto_errors.ReadTimeoutError):
        return f"S3 endpoint {endpoint} did not answer within {READ_TIMEOUT_S:.0f} s"
    if isinstance(exc, boto_errors.NoCredentialsError | boto_errors.PartialCredentialsError):
        if not (os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3")):
            # Nothing configured at all: most likely a checkout that has not run `make release`.
            return (
                f"no S3 server configured: set {ENDPOINT_ENV}, {_KEYS}, or run 'make release', "
                "which starts an embedded one"
            )
        return f"no complete S3 credentials for {endpoint} (set {_KEYS})"
    if isinstance(exc, boto_errors.FlexibleChecksumError):
        return f"checksum of the response from {endpoint} does not match ({exc})"
    if isinstance(exc, ClientError):
        code = _code(exc)
        if code in _CODE_REASONS:
            return _CODE_REASONS[code].format(e=endpoint, c=code)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = exc.response.get("Error", {}).get("Message", "")
        return f"{endpoint} answered HTTP {status} {code}: {message}".rstrip(": ")
    if isinstance(exc, StorageError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"
