"""Promotion and download against a real ``rclone serve s3`` on 127.0.0.1.

rclone keeps each object as a plain file under the server's root (``<root>/<bucket>/<key>``),
which lets these tests tamper with stored bytes directly.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pipeline.servers import S3Server, free_port

from switchprune.storage import (
    StorageError,
    download_promoted,
    ensure_bucket,
    make_client,
    promote_files,
    read_manifest,
)

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


def promote(client: Any, bucket: str, files: dict[str, Path], version: int) -> dict[str, Any]:
    return promote_files(
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


def record_calls(client: Any) -> list[tuple[str, str]]:
    """(operation, key) of every API call the client makes from now on."""
    calls: list[tuple[str, str]] = []

    def hook(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls.append((model.name, params.get("Key", "")))

    client.meta.events.register("before-parameter-build.s3.*", hook)
    return calls


def assert_no_credentials(message: str, server: S3Server) -> None:
    assert server.access_key not in message
    assert server.secret_key not in message


def test_promote_uploads_verifies_then_writes_the_manifest(
    client: Any, bucket: str, tmp_path: Path, env: S3Server
) -> None:
    files = write_files(tmp_path / "v1", "one")
    recorded = record_calls(client)
    result = promote(client, bucket, files, 1)
    calls = list(recorded)  # the promotion's calls only
    assert result["changed"] is True
    assert result["s3_uri"] == f"s3://{bucket}/models/net/v1/"
    assert sorted(listing(client, bucket)) == sorted(
        ["models/net/current.json"] + [f"models/net/v1/{n}" for n in files]
    )
    # Order of writes: the in-progress marker, every file, then a HEAD of every file, then the
    # manifest; the marker goes once the manifest is written.
    marker = "models/net/v1/.incomplete"
    puts = [key for op, key in calls if op == "PutObject"]
    heads = [i for i, (op, _) in enumerate(calls) if op == "HeadObject"]
    manifest_at = calls.index(("PutObject", "models/net/current.json"))
    assert puts[0] == marker and puts[-1] == "models/net/current.json"
    assert len(puts) == len(files) + 2
    assert manifest_at == len(calls) - 2 and calls[-1] == ("DeleteObject", marker)
    verified = {
        calls[i][1] for i in heads if i > max(calls.index(("PutObject", k)) for k in puts[1:-1])
    }
    assert verified == {f"models/net/v1/{n}" for n in files}
    # rclone stores the bytes as plain files: they are exactly the local ones.
    for name, path in files.items():
        assert (env.root / bucket / "models/net/v1" / name).read_bytes() == path.read_bytes()
    document = read_manifest(client, f"s3://{bucket}/models", "net")
    assert document is not None and document["version"] == 1
    assert document["test_accuracy"] == 0.95
    assert {f["name"]: f["sha256"] for f in document["files"]} == {
        f["name"]: f["sha256"] for f in result["files"]
    }


def test_second_promotion_writes_nothing(client: Any, bucket: str, tmp_path: Path) -> None:
    files = write_files(tmp_path / "v1", "one")
    promote(client, bucket, files, 1)
    before = listing(client, bucket)
    manifest = current(client, bucket)
    time.sleep(0.05)  # listing times have millisecond resolution: a rewrite would show
    calls = record_calls(client)
    again = promote(client, bucket, files, 1)
    assert again["changed"] is False and again["uploaded"] == []
    assert [op for op, _ in calls if op in ("PutObject", "DeleteObject", "CreateBucket")] == []
    assert listing(client, bucket) == before
    assert current(client, bucket) == manifest


def test_v2_replaces_current_and_keeps_v1(client: Any, bucket: str, tmp_path: Path) -> None:
    v1 = write_files(tmp_path / "v1", "one")
    v2 = write_files(tmp_path / "v2", "two")
    promote(client, bucket, v1, 1)
    v1_objects = listing(client, bucket, "models/net/v1/")
    result = promote(client, bucket, v2, 2)
    assert result["changed"] is True
    assert json.loads(current(client, bucket))["version"] == 2
    assert listing(client, bucket, "models/net/v1/") == v1_objects
    body = client.get_object(Bucket=bucket, Key="models/net/v1/model.pt")["Body"].read()
    assert body == v1["model.pt"].read_bytes()
    # Rolling back to v1 reuses its objects: only the manifest is written.
    calls = record_calls(client)
    back = promote(client, bucket, v1, 1)
    assert back["changed"] is True and back["uploaded"] == []
    assert [key for op, key in calls if op == "PutObject"] == [
        "models/net/v1/.incomplete",
        "models/net/current.json",
    ]
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
    puts: list[str] = []

    def second_put_fails(**kwargs: Any) -> Any:
        puts.append(kwargs["Key"])
        if len(puts) == 2:
            raise ConnectionResetError("connection reset by peer")
        return real_put(**kwargs)

    client.put_object = second_put_fails
    with pytest.raises(StorageError) as info:
        promote(client, bucket, write_files(tmp_path / "v2", "two"), 2)
    message = str(info.value)
    assert "while uploading" in message and "removed 1 uploaded object" in message
    assert_no_credentials(message, env)
    client.put_object = real_put
    assert listing(client, bucket, "models/net/v2/") == {}
    assert not [
        p for p in (env.root / bucket / "models/net").rglob("*") if "v2" in p.parts and p.is_file()
    ]
    assert current(client, bucket) == before
    assert len(listing(client, bucket, "models/net/v1/")) == 3


def test_verification_failure_removes_this_version(
    client: Any, bucket: str, tmp_path: Path
) -> None:
    promote(client, bucket, write_files(tmp_path / "v1", "one"), 1)
    before = current(client, bucket)
    real_head = client.head_object

    def short_head(**kwargs: Any) -> Any:
        resp = real_head(**kwargs)
        if kwargs["Key"] == "models/net/v2/spec.json":
            resp["ContentLength"] -= 1
        return resp

    client.head_object = short_head
    with pytest.raises(StorageError, match=r"while verifying: .*v2/spec.json has 14 bytes"):
        promote(client, bucket, write_files(tmp_path / "v2", "two"), 2)
    client.head_object = real_head
    assert listing(client, bucket, "models/net/v2/") == {}
    assert current(client, bucket) == before


def test_rclone_metadata_case_is_accepted(client: Any, bucket: str, tmp_path: Path) -> None:
    files = write_files(tmp_path / "v1", "one")
    promote(client, bucket, files, 1)
    head = client.head_object(Bucket=bucket, Key="models/net/v1/model.pt")
    assert {k.lower() for k in head["Metadata"]} == {"sha256"}
    calls = record_calls(client)
    assert promote(client, bucket, files, 1)["changed"] is False
    # The checksums were read from metadata whatever its case: no object had to be hashed.
    assert [key for op, key in calls if op == "GetObject"] == ["models/net/current.json"]


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
        calls = record_calls(client)
        again = promote(client, "restart", files, 1)
        assert again["changed"] is False
        assert [op for op, _ in calls if op == "PutObject"] == []
        assert {key for op, key in calls if op == "GetObject"} >= {
            f"models/net/v1/{n}" for n in files
        }
        (root / "restart/models/net/v1/spec.json").write_bytes(b"{}")
        repaired = promote(client, "restart", files, 1)
        assert repaired["changed"] is True and repaired["uploaded"] == ["spec.json"]
        assert (root / "restart/models/net/v1/spec.json").read_bytes() == b'{"arch": "mlp"}'


def test_a_promotion_that_died_midway_is_swept_by_a_later_one(
    client: Any, bucket: str, tmp_path: Path
) -> None:
    from switchprune.storage import INCOMPLETE_MARKER, remove_incomplete

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
    from switchprune.storage import INCOMPLETE_MARKER

    promote(client, bucket, write_files(tmp_path / "v1", "one"), 1)
    promote(client, bucket, write_files(tmp_path / "v2", "two"), 2)
    keys = listing(client, bucket, "models/net/")
    assert not [k for k in keys if k.endswith(INCOMPLETE_MARKER)]
