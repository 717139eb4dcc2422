"""Promotion and download against a real ``rclone serve s3`` on 127.0.0.1.

rclone keeps each object as a plain file under the server's root (``<root>/<bucket>/<key>``),
which lets these tests tamper with stored bytes directly.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pipeline.servers import S3Server, free_port

from switchprune.promotion import (
    INCOMPLETE_MARKER,
    Publication,
    download_promoted,
    publish,
    read_manifest,
    remove_incomplete,
)
from switchprune.storage import StorageError, ensure_bucket, make_client

pytestmark = pytest.mark.slow

_buckets = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    root = tmp_path_factory.mktemp("s3") / "root"
    with S3Server(root) as srv:
        yield srv
    assert srv.proc is not None and srv.proc.poll() is not None  # stopped


@pytest.fixture
def env(server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """The server's endpoint and keys in the environment, and no stray AWS configuration."""
    for name, value in server.environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return server


@pytest.fixture
def bucket() -> str:
    return f"itest-{next(_buckets)}-{time.time_ns() % 10**9}"


@pytest.fixture
def client(env: S3Server) -> Any:
    return make_client()


def write_files(folder: Path, tag: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    contents = {
        "model.pt": (tag.encode() * 4096)[:30000],
        "metrics.json": json.dumps({"tag": tag}).encode(),
        "spec.json": b'{"arch": "mlp"}',
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in contents}


def promote(client: Any, bucket: str, files: dict[str, Path], version: int) -> Publication:
    return publish(
        client,
        files,
        s3_uri=f"s3://{bucket}/models",
        model_name="net",
        version=version,
        manifest={"test_accuracy": 0.95},
    )


def listing(client: Any, bucket: str, prefix: str = "") -> dict[str, Any]:
    resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["LastModified"] for o in resp.get("Contents", [])}


def current(client: Any, bucket: str) -> bytes:
    return client.get_object(Bucket=bucket, Key="models/net/current.json")["Body"].read()


def stored(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file the server stores under ``root``: modification time and bytes."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def fetched_keys(client: Any) -> list[str]:
    """Keys of the objects the client downloads from now on."""
    keys: list[str] = []
    client.meta.events.register(
        "before-parameter-build.s3.GetObject", lambda params, **_: keys.append(params["Key"])
    )
    return keys


def tamper_after_upload(client: Any, path: Path, key: str, data: bytes) -> None:
    """Right after ``key`` is uploaded, its stored bytes change on the server's disk."""
    real = client.put_object

    def put(**kwargs: Any) -> Any:
        response = real(**kwargs)
        if kwargs["Key"] == key:
            path.write_bytes(data)
        return response

    client.put_object = put


def assert_no_credentials(message: str, server: S3Server) -> None:
    assert server.access_key not in message
    assert server.secret_key not in message


def test_the_manifest_is_written_last_over_verified_objects(
    client: Any, bucket: str, tmp_path: Path, env: S3Server
) -> None:
    files = write_files(tmp_path / "v1", "one")
    folder = env.root / bucket / "models/net/v1"
    at_manifest: dict[str, bytes] = {}

    def snapshot(params: dict[str, Any], **_: Any) -> None:
        if params["Key"] == "models/net/current.json":
            at_manifest.update({p.name: p.read_bytes() for p in folder.iterdir()})

    client.meta.events.register("before-parameter-build.s3.PutObject", snapshot)
    result = promote(client, bucket, files, 1)
    assert result.changed is True
    assert result.s3_uri == f"s3://{bucket}/models/net/v1/"
    # When the manifest was written, every file was on the server with its exact bytes (rclone
    # stores objects as plain files), and the folder was still marked as being written.
    assert at_manifest == {INCOMPLETE_MARKER: b""} | {n: p.read_bytes() for n, p in files.items()}
    assert sorted(listing(client, bucket)) == sorted(
        ["models/net/current.json"] + [f"models/net/v1/{n}" for n in files]
    )
    document = read_manifest(client, f"s3://{bucket}/models", "net")
    assert document is not None and document["version"] == 1
    assert document["test_accuracy"] == 0.95
    assert {f["name"]: f["sha256"] for f in document["files"]} == {
        f["name"]: f["sha256"] for f in result.files
    }


def test_second_promotion_writes_nothing(
    client: Any, bucket: str, tmp_path: Path, env: S3Server
) -> None:
    files = write_files(tmp_path / "v1", "one")
    promote(client, bucket, files, 1)
    before = stored(env.root / bucket)
    again = promote(client, bucket, files, 1)
    assert again.changed is False and again.uploaded == []
    assert stored(env.root / bucket) == before  # not a byte and not a timestamp changed


def test_v2_replaces_current_and_keeps_v1(
    client: Any, bucket: str, tmp_path: Path, env: S3Server
) -> None:
    v1 = write_files(tmp_path / "v1", "one")
    v2 = write_files(tmp_path / "v2", "two")
    promote(client, bucket, v1, 1)
    v1_objects = stored(env.root / bucket / "models/net/v1")
    result = promote(client, bucket, v2, 2)
    assert result.changed is True
    assert json.loads(current(client, bucket))["version"] == 2
    assert stored(env.root / bucket / "models/net/v1") == v1_objects
    # Rolling back to v1 reuses its objects: only the manifest is written.
    back = promote(client, bucket, v1, 1)
    assert back.changed is True and back.uploaded == []
    assert stored(env.root / bucket / "models/net/v1") == v1_objects
    assert json.loads(current(client, bucket))["version"] == 1


def test_download_round_trip(client: Any, bucket: str, tmp_path: Path) -> None:
    files = write_files(tmp_path / "v1", "one")
    promote(client, bucket, files, 1)
    out = tmp_path / "serve" / "model"
    document = download_promoted(client, f"s3://{bucket}/models", "net", out)
    assert document["version"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name, path in files.items():
        assert (out / name).read_bytes() == path.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # staging folder removed


def test_download_detects_a_tampered_object(
    client: Any, bucket: str, tmp_path: Path, env: S3Server
) -> None:
    files = write_files(tmp_path / "v1", "one")
    promote(client, bucket, files, 1)
    out = tmp_path / "serve" / "model"
    out.mkdir(parents=True)
    (out / "model.pt").write_bytes(b"previous deployment")
    stored = env.root / bucket / "models/net/v1/model.pt"
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF  # same size, one byte flipped
    stored.write_bytes(bytes(data))
    with pytest.raises(StorageError) as info:
        download_promoted(client, f"s3://{bucket}/models", "net", out)
    message = str(info.value)
    assert f"s3://{bucket}/models/net/v1/model.pt" in message and "does not match" in message
    assert (out / "model.pt").read_bytes() == b"previous deployment"
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]
    assert [p.name for p in out.parent.iterdir()] == ["model"]


@pytest.mark.parametrize(
    ("variable", "expected"),
    [("AWS_SECRET_ACCESS_KEY", "wrong secret key"), ("AWS_ACCESS_KEY_ID", "access key")],
)
@pytest.mark.parametrize("bucket_exists", [True, False], ids=["bucket", "no-bucket"])
def test_wrong_credentials(
    env: S3Server,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    expected: str,
    bucket_exists: bool,
) -> None:
    good = make_client()
    if bucket_exists:
        ensure_bucket(good, bucket)
    monkeypatch.setenv(variable, "wrongwrongwrong0123456789")
    bad = make_client()  # a fresh session: the changed key is the one used
    with pytest.raises(StorageError) as info:
        promote(bad, bucket, write_files(tmp_path / "v1", "one"), 1)
    message = str(info.value)
    assert expected in message and env.endpoint in message and bucket in message
    assert_no_credentials(message, env)
    assert "wrongwrongwrong" not in message
    assert read_manifest(good, f"s3://{bucket}/models", "net") is None
    if bucket_exists:
        assert listing(good, bucket) == {}
    else:
        assert not (env.root / bucket).exists()


def test_unreachable_endpoint_fails_fast(env: S3Server, bucket: str, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = make_client(endpoint)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        promote(client, bucket, write_files(tmp_path / "v1", "one"), 1)
    assert time.monotonic() - started < 15
    assert endpoint in str(info.value) and "unreachable" in str(info.value)
    assert_no_credentials(str(info.value), env)
    with pytest.raises(StorageError, match="unreachable"):
        download_promoted(client, f"s3://{bucket}/models", "net", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_midway_removes_this_version(
    client: Any, bucket: str, tmp_path: Path, env: S3Server
) -> None:
    promote(client, bucket, write_files(tmp_path / "v1", "one"), 1)
    before = current(client, bucket)
    real_put = client.put_object

    def reset_on_the_model(**kwargs: Any) -> Any:
        if kwargs["Key"] == "models/net/v2/model.pt":
            raise ConnectionResetError("connection reset by peer")
        return real_put(**kwargs)

    client.put_object = reset_on_the_model
    with pytest.raises(StorageError) as info:
        promote(client, bucket, write_files(tmp_path / "v2", "two"), 2)
    message = str(info.value)
    assert "while uploading" in message and "connection reset" in message
    assert re.search(r"removed [1-9]\d* uploaded object", message)  # metrics.json went first
    assert_no_credentials(message, env)
    client.put_object = real_put
    assert listing(client, bucket, "models/net/v2/") == {}
    assert not [
        p for p in (env.root / bucket / "models/net").rglob("*") if "v2" in p.parts and p.is_file()
    ]
    assert current(client, bucket) == before
    assert len(listing(client, bucket, "models/net/v1/")) == 3


def test_bytes_changed_on_the_server_are_caught_before_the_manifest(
    client: Any, bucket: str, tmp_path: Path, env: S3Server
) -> None:
    promote(client, bucket, write_files(tmp_path / "v1", "one"), 1)
    before = current(client, bucket)
    v2 = write_files(tmp_path / "v2", "two")
    stored_file = env.root / bucket / "models/net/v2/model.pt"
    flipped = bytearray(v2["model.pt"].read_bytes())
    flipped[100] ^= 0xFF  # same size, one byte flipped
    tamper_after_upload(client, stored_file, "models/net/v2/model.pt", bytes(flipped))
    with pytest.raises(StorageError, match=r"while verifying: .*v2/model.pt has sha256"):
        promote(client, bucket, v2, 2)
    assert listing(client, bucket, "models/net/v2/") == {}
    assert current(client, bucket) == before


def test_rclone_metadata_case_is_accepted(client: Any, bucket: str, tmp_path: Path) -> None:
    files = write_files(tmp_path / "v1", "one")
    promote(client, bucket, files, 1)
    head = client.head_object(Bucket=bucket, Key="models/net/v1/model.pt")
    assert {k.lower() for k in head["Metadata"]} == {"sha256"}
    fetched = fetched_keys(client)
    assert promote(client, bucket, files, 1).changed is False
    # The hashes were read from metadata whatever its case: no object had to be downloaded.
    assert fetched == ["models/net/current.json"]


def test_metadata_lost_on_restart_is_recomputed(env: S3Server, tmp_path: Path) -> None:
    # rclone keeps user metadata in memory only: after a restart objects have none.
    root = tmp_path / "restart-root"
    files = write_files(tmp_path / "v1", "one")
    keys = {"access_key": env.access_key, "secret_key": env.secret_key}
    with S3Server(root, **keys) as first:
        promote(make_client(first.endpoint), "restart", files, 1)
    with S3Server(root, **keys) as second:
        client = make_client(second.endpoint)
        head = client.head_object(Bucket="restart", Key="models/net/v1/model.pt")
        assert head["Metadata"] == {}
        before = stored(root / "restart")
        again = promote(client, "restart", files, 1)
        assert again.changed is False
        assert stored(root / "restart") == before
        (root / "restart/models/net/v1/spec.json").write_bytes(b"{}")
        repaired = promote(client, "restart", files, 1)
        assert repaired.changed is True and repaired.uploaded == ["spec.json"]
        assert (root / "restart/models/net/v1/spec.json").read_bytes() == b'{"arch": "mlp"}'


def test_a_promotion_that_died_midway_is_swept_by_a_later_one(
    client: Any, bucket: str, tmp_path: Path
) -> None:
    promote(client, bucket, write_files(tmp_path / "v1", "one"), 1)
    # What a promotion killed between its uploads and its manifest leaves behind.
    for name in (INCOMPLETE_MARKER, "model.pt", "evaluate.json"):
        client.put_object(Bucket=bucket, Key=f"models/net/v3/{name}", Body=b"partial")
    # A marker in the current version must never lead to its removal.
    client.put_object(Bucket=bucket, Key=f"models/net/v1/{INCOMPLETE_MARKER}", Body=b"")
    assert remove_incomplete(client, f"s3://{bucket}/models", "net", older_than=3600) == []
    assert len(listing(client, bucket, "models/net/v3/")) == 3  # may still be running
    deleted = remove_incomplete(client, f"s3://{bucket}/models", "net", older_than=0)
    assert sorted(deleted) == [
        f"models/net/v3/{n}" for n in sorted((INCOMPLETE_MARKER, "evaluate.json", "model.pt"))
    ]
    assert listing(client, bucket, "models/net/v3/") == {}
    assert len(listing(client, bucket, "models/net/v1/")) == 4  # current version untouched


def test_a_completed_promotion_leaves_no_marker(client: Any, bucket: str, tmp_path: Path) -> None:
    promote(client, bucket, write_files(tmp_path / "v1", "one"), 1)
    promote(client, bucket, write_files(tmp_path / "v2", "two"), 2)
    keys = listing(client, bucket, "models/net/")
    assert not [k for k in keys if k.endswith(INCOMPLETE_MARKER)]


def test_the_server_does_not_check_s3_checksums(client: Any, bucket: str) -> None:
    """Why promotion verifies each upload itself (size, SHA-256 metadata, bytes if needed).

    ``rclone serve s3`` accepts a PUT whose ``ChecksumSHA256`` does not match its body and
    answers that claim back, so an S3 checksum proves nothing about the bytes stored there.
    """
    ensure_bucket(client, bucket)
    claim = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
    client.put_object(Bucket=bucket, Key="claimed", Body=b"payload", ChecksumSHA256=claim)
    head = client.head_object(Bucket=bucket, Key="claimed", ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256") == claim
