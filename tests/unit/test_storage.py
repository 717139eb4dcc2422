"""S3 storage: URI parsing, client settings and promotion's error paths, against moto.

The happy paths against a real server live in ``tests/integration/test_storage_s3.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto import mock_aws

from switchprune.storage import (
    S3Location,
    StorageError,
    download_promoted,
    ensure_bucket,
    make_client,
    parse_s3_uri,
    promote_files,
    read_manifest,
    sha256_file,
)

ACCESS_KEY = "AKIAUNITTESTACCESS01"
SECRET_KEY = "unit-test-secret-key-0123456789abcdefghij"
URI = "s3://unit-bucket/models"
BUCKET = "unit-bucket"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Fake credentials in the environment, no endpoint override, moto intercepting S3."""
    for name in ("SWITCHPRUNE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    with mock_aws():
        # moto swaps in its own fake keys on entry; put ours back so they are the ones in use.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        yield


@pytest.fixture
def client(aws: None) -> Any:
    return make_client()


@pytest.fixture
def model_files(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "model.pt": b"weights" * 1000,
        "metrics.json": b'{"test_accuracy": 0.97}\n',
        "spec.json": b'{"arch": "mlp"}\n',
    }
    out = {}
    for name, data in files.items():
        (src / name).write_bytes(data)
        out[name] = src / name
    return out


def keys(client: Any, prefix: str = "") -> list[str]:
    resp = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def manifest_bytes(client: Any) -> bytes:
    return client.get_object(Bucket=BUCKET, Key="models/m/current.json")["Body"].read()


def promote(client: Any, files: dict[str, Path], version: int = 1, **extra: Any) -> dict:
    return promote_files(
        client,
        files,
        s3_uri=URI,
        model_name="m",
        version=version,
        manifest={"test_accuracy": 0.97, **extra},
    )


def assert_clean(message: str) -> None:
    assert ACCESS_KEY not in message
    assert SECRET_KEY not in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [
        ("s3://bkt", "bkt", ""),
        ("s3://bkt/", "bkt", ""),
        ("s3://bkt/a", "bkt", "a"),
        ("s3://bkt/a/b/", "bkt", "a/b"),
        ("s3://my.bucket-01/models/prod", "my.bucket-01", "models/prod"),
    ],
)
def test_parse_s3_uri_accepts(uri: str, bucket: str, prefix: str) -> None:
    assert parse_s3_uri(uri) == S3Location(bucket=bucket, prefix=prefix)


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "bkt/models",
        "http://bkt/models",
        "S3://bkt",
        "s3://",
        "s3:///models",
        "s3://ab",
        "s3://Bucket",
        "s3://-bkt",
        "s3://bkt-",
        "s3://a..b",
        "s3://bkt_1",
        "s3://bkt//models",
        "s3://bkt/a//b",
        "s3://bkt/a/../b",
        "s3://bkt/./a",
        "s3://bkt/a\\b",
        "s3://bkt/a\nb",
        "s3://" + "b" * 64,
    ],
)
def test_parse_s3_uri_refuses(uri: str) -> None:
    with pytest.raises(StorageError) as info:
        parse_s3_uri(uri)
    assert repr(uri) in str(info.value)


def test_parse_s3_uri_refuses_non_strings() -> None:
    with pytest.raises(StorageError, match="not an S3 URI"):
        parse_s3_uri(None)  # type: ignore[arg-type]


def test_location_builds_keys_without_empty_segments() -> None:
    assert S3Location("bkt", "").key("m", "current.json") == "m/current.json"
    assert S3Location("bkt", "a/b").uri("m", "v1") == "s3://bkt/a/b/m/v1"
    with pytest.raises(AttributeError):
        S3Location("bkt", "").bucket = "other"  # type: ignore[misc]


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (3 << 20) + b"tail")  # several read chunks
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StorageError, match="cannot read"):
        sha256_file(tmp_path / "missing")


# ----------------------------------------------------------------------------------- client


def test_make_client_settings(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client("http://127.0.0.1:9")
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "us-east-1"
    cfg = client.meta.config
    assert cfg.connect_timeout <= 5 and cfg.read_timeout <= 30
    assert cfg.retries["total_max_attempts"] <= 3
    assert cfg.s3["addressing_style"] == "path"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert make_client("http://127.0.0.1:9").meta.region_name == "eu-west-1"


def test_make_client_endpoint_precedence(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "amazonaws.com" in make_client().meta.endpoint_url
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert make_client().meta.endpoint_url == "http://127.0.0.1:2"
    monkeypatch.setenv("SWITCHPRUNE_S3_ENDPOINT", "http://127.0.0.1:1")
    assert make_client().meta.endpoint_url == "http://127.0.0.1:1"
    assert make_client("http://127.0.0.1:3").meta.endpoint_url == "http://127.0.0.1:3"


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "ftp://host", "http://"])
def test_make_client_refuses_bad_endpoints(aws: None, endpoint: str) -> None:
    with pytest.raises(StorageError, match="invalid S3 endpoint"):
        make_client(endpoint)


def test_endpoint_userinfo_never_reaches_messages(aws: None) -> None:
    with pytest.raises(StorageError) as info:
        make_client("ftp://user:hunter2secret@host")
    assert "hunter2secret" not in str(info.value)


# ----------------------------------------------------------------------------------- bucket


def test_ensure_bucket_creates_once(client: Any) -> None:
    ensure_bucket(client, BUCKET)
    ensure_bucket(client, BUCKET)  # existing bucket: no error
    names = [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert names == [BUCKET]


def test_ensure_bucket_outside_us_east_1(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    client = make_client()
    ensure_bucket(client, BUCKET)  # needs a LocationConstraint there, or S3 refuses
    assert client.get_bucket_location(Bucket=BUCKET)["LocationConstraint"] == "eu-west-1"


def stubbed(client_errors: list[tuple[str, str, int]]) -> tuple[Any, Stubber]:
    client = make_client("http://127.0.0.1:9")
    stub = Stubber(client)
    for method, code, status in client_errors:
        stub.add_client_error(method, service_error_code=code, http_status_code=status)
    stub.activate()
    return client, stub


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("SignatureDoesNotMatch", "wrong secret key"),
        ("InvalidAccessKeyId", "does not know the access key"),
        ("AccessDenied", "denied access"),
    ],
)
def test_ensure_bucket_explains_a_bare_403(aws: None, code: str, expected: str) -> None:
    # HEAD answers a body-less 403; the listing that follows names the reason.
    client, stub = stubbed([("head_bucket", "403", 403), ("list_objects_v2", code, 403)])
    with pytest.raises(StorageError) as info:
        ensure_bucket(client, BUCKET)
    message = str(info.value)
    assert expected in message and "http://127.0.0.1:9" in message and BUCKET in message
    assert_clean(message)
    stub.assert_no_pending_responses()


def test_ensure_bucket_reports_other_errors(aws: None) -> None:
    client, _ = stubbed([("head_bucket", "404", 404), ("create_bucket", "InternalError", 500)])
    with pytest.raises(StorageError, match=r"creating bucket s3://unit-bucket.*500 InternalError"):
        ensure_bucket(client, BUCKET)


# ---------------------------------------------------------------------------------- promote


def test_promote_layout_metadata_and_manifest(client: Any, model_files: dict) -> None:
    result = promote(client, model_files, version=3, name="ignored", run_id="abc")
    assert result["changed"] is True
    assert result["s3_uri"] == "s3://unit-bucket/models/m/v3/"
    assert result["manifest_key"] == "models/m/current.json"
    assert sorted(result["uploaded"]) == sorted(model_files)
    assert keys(client) == sorted(
        ["models/m/current.json"] + [f"models/m/v3/{n}" for n in model_files]
    )
    for entry in result["files"]:
        local = model_files[entry["name"]]
        assert entry["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
        assert entry["size"] == local.stat().st_size
        head = client.head_object(Bucket=BUCKET, Key=entry["key"])
        assert head["Metadata"]["sha256"] == entry["sha256"]
        body = client.get_object(Bucket=BUCKET, Key=entry["key"])["Body"].read()
        assert body == local.read_bytes()
    document = json.loads(manifest_bytes(client))
    assert document == result["manifest"]
    assert document["name"] == "m"  # our fields win over the caller's
    assert document["version"] == 3 and document["run_id"] == "abc"
    assert document["test_accuracy"] == 0.97
    assert document["files"] == result["files"]
    assert document["promoted_at"].endswith("Z")
    assert read_manifest(client, URI, "m") == document


def test_promote_twice_writes_nothing(client: Any, model_files: dict) -> None:
    first = promote(client, model_files)
    before = manifest_bytes(client)
    writes: list[str] = []
    client.meta.events.register(
        "before-call.s3.*",
        lambda model, **_: (
            writes.append(model.name) if model.name.startswith(("Put", "Del")) else None
        ),
    )
    second = promote(client, model_files, test_accuracy=0.5)
    assert second["changed"] is False and second["uploaded"] == []
    assert writes == []
    assert manifest_bytes(client) == before
    assert second["manifest"] == first["manifest"]


def test_promote_refuses_new_content_under_the_current_version(
    client: Any, model_files: dict
) -> None:
    promote(client, model_files)
    before = manifest_bytes(client)
    model_files["model.pt"].write_bytes(b"retrained")
    with pytest.raises(StorageError, match="already current with different files"):
        promote(client, model_files)
    assert manifest_bytes(client) == before
    body = client.get_object(Bucket=BUCKET, Key="models/m/v1/model.pt")["Body"].read()
    assert body == b"weights" * 1000


def test_promote_repairs_a_damaged_current_version(client: Any, model_files: dict) -> None:
    promote(client, model_files)
    client.delete_object(Bucket=BUCKET, Key="models/m/v1/spec.json")
    result = promote(client, model_files)
    assert result["changed"] is True and result["uploaded"] == ["spec.json"]
    assert "models/m/v1/spec.json" in keys(client)


def test_promote_reuses_objects_whose_metadata_was_lost(client: Any, model_files: dict) -> None:
    # rclone forgets user metadata on restart: identical bytes must still count as identical.
    ensure_bucket(client, BUCKET)
    client.put_object(
        Bucket=BUCKET, Key="models/m/v1/model.pt", Body=model_files["model.pt"].read_bytes()
    )
    client.put_object(Bucket=BUCKET, Key="models/m/v1/spec.json", Body=b"stale")
    result = promote(client, model_files)
    assert sorted(result["uploaded"]) == ["metrics.json", "spec.json"]
    body = client.get_object(Bucket=BUCKET, Key="models/m/v1/spec.json")["Body"].read()
    assert body == model_files["spec.json"].read_bytes()


def with_failing(client: Any, method: str, fail: Any) -> list[dict]:
    """Replace ``client.<method>`` with a wrapper; ``fail(n, kwargs)`` may raise on call n."""
    real = getattr(client, method)
    calls: list[dict] = []

    def wrapper(**kwargs: Any) -> Any:
        calls.append(kwargs)
        fail(len(calls), kwargs)
        return real(**kwargs)

    setattr(client, method, wrapper)
    return calls


def test_upload_failure_removes_this_versions_objects(client: Any, model_files: dict) -> None:
    promote(client, model_files, version=1)
    before = manifest_bytes(client)

    def second_put_fails(n: int, kwargs: dict) -> None:
        if n == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "disk"}}, "PutObject")

    with_failing(client, "put_object", second_put_fails)
    with pytest.raises(StorageError) as info:
        promote(client, model_files, version=2)
    message = str(info.value)
    assert "while uploading" in message and "InternalError" in message
    assert "s3://unit-bucket/models/m/v2/" in message and "removed 1 uploaded object" in message
    assert keys(client, "models/m/v2/") == []
    assert manifest_bytes(client) == before
    assert len(keys(client, "models/m/v1/")) == 3
    assert_clean(message)


def test_verify_failure_removes_objects(client: Any, model_files: dict) -> None:
    promote(client, model_files, version=1)
    before = manifest_bytes(client)
    real = client.head_object

    def lying_head(**kwargs: Any) -> Any:
        resp = real(**kwargs)
        if kwargs["Key"].endswith("v2/model.pt"):
            resp["ContentLength"] += 1
        return resp

    client.head_object = lying_head
    with pytest.raises(StorageError, match=r"while verifying: .*v2/model.pt has 7001 bytes"):
        promote(client, model_files, version=2)
    assert keys(client, "models/m/v2/") == []
    assert manifest_bytes(client) == before


def test_verify_failure_on_sha256_metadata(client: Any, model_files: dict) -> None:
    real = client.head_object

    def lying_head(**kwargs: Any) -> Any:
        resp = real(**kwargs)
        if kwargs["Key"].endswith("v1/spec.json") and resp["Metadata"]:
            resp["Metadata"] = {"SHA256": "0" * 64}  # any case is accepted, the value is not
        return resp

    client.head_object = lying_head
    with pytest.raises(StorageError, match="spec.json has sha256 0000"):
        promote(client, model_files)
    assert keys(client) == []  # no manifest: there was none before


def test_manifest_failure_keeps_the_previous_one(client: Any, model_files: dict) -> None:
    promote(client, model_files, version=1)
    before = manifest_bytes(client)

    def manifest_put_fails(n: int, kwargs: dict) -> None:
        if kwargs["Key"].endswith("current.json"):
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "busy"}}, "PutObject")

    with_failing(client, "put_object", manifest_put_fails)
    with pytest.raises(StorageError, match="while writing the manifest"):
        promote(client, model_files, version=2)
    assert keys(client, "models/m/v2/") == []
    assert manifest_bytes(client) == before


def test_manifest_written_but_reported_failed_is_restored(client: Any, model_files: dict) -> None:
    promote(client, model_files, version=1)
    before = manifest_bytes(client)
    real = client.put_object

    def lost_answer(**kwargs: Any) -> Any:
        resp = real(**kwargs)
        if kwargs["Key"].endswith("current.json") and b'"version": 2' in kwargs["Body"]:
            raise ConnectionResetError("connection reset after the PUT")
        return resp

    client.put_object = lost_answer
    with pytest.raises(StorageError, match="previous manifest restored"):
        promote(client, model_files, version=2)
    assert manifest_bytes(client) == before
    assert keys(client, "models/m/v2/") == []


def test_failure_messages_are_redacted(client: Any, model_files: dict) -> None:
    def leaky(n: int, kwargs: dict) -> None:
        raise RuntimeError(f"signing with {ACCESS_KEY}/{SECRET_KEY} failed")

    with_failing(client, "put_object", leaky)
    with pytest.raises(StorageError) as info:
        promote(client, model_files)
    assert "***" in str(info.value)
    assert_clean(str(info.value))


def test_checksum_header_dropped_when_the_server_refuses_it(client: Any, model_files: dict) -> None:
    def no_checksums(n: int, kwargs: dict) -> None:
        if "ChecksumSHA256" in kwargs:
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": ""}}, "PutObject")

    calls = with_failing(client, "put_object", no_checksums)
    result = promote(client, model_files)
    assert result["changed"] is True
    # The in-progress marker, one refused attempt, then 3 files and the manifest without it.
    assert ["ChecksumSHA256" in c for c in calls] == [False, True, False, False, False, False]
    assert read_manifest(client, URI, "m")["version"] == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"version": 0}, "version must be an integer"),
        ({"version": True}, "version must be an integer"),
        ({"model_name": "a/b"}, "invalid model name"),
        ({"files": {"../x": None}}, "invalid file name"),
        ({"files": {"model.pt": Path("/nonexistent/model.pt")}}, "is not a file"),
        ({"files": {}}, "no files"),
        ({"manifest": {"when": object()}}, "not JSON-serialisable"),
        ({"s3_uri": "s3://Bad"}, "invalid bucket name"),
    ],
)
def test_promote_refuses_bad_arguments(
    client: Any, model_files: dict, kwargs: dict, match: str
) -> None:
    args: dict[str, Any] = {
        "s3_uri": URI,
        "model_name": "m",
        "version": 1,
        "manifest": {},
        "files": model_files,
    }
    args.update(kwargs)
    files = args.pop("files")
    with pytest.raises(StorageError, match=match):
        promote_files(client, files, **args)
    assert client.list_buckets()["Buckets"] == []  # refused before touching S3


# --------------------------------------------------------------------------- read/download


def test_read_manifest_absent(client: Any) -> None:
    assert read_manifest(client, URI, "m") is None  # no bucket
    ensure_bucket(client, BUCKET)
    assert read_manifest(client, URI, "m") is None  # no key


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (b'{"files": []}', "no integer 'version'"),
        (b'{"version": 1, "files": []}', "no 'files' list"),
        (
            b'{"version": 1, "files": [{"name": "../../etc/passwd", "key": "k", "size": 1,'
            b' "sha256": "' + b"0" * 64 + b'"}]}',
            "invalid file entry",
        ),
    ],
)
def test_read_manifest_refuses_invalid(client: Any, body: bytes, match: str) -> None:
    ensure_bucket(client, BUCKET)
    client.put_object(Bucket=BUCKET, Key="models/m/current.json", Body=body)
    with pytest.raises(StorageError, match=match) as info:
        read_manifest(client, URI, "m")
    assert "s3://unit-bucket/models/m/current.json" in str(info.value)


def test_download_round_trip(client: Any, model_files: dict, tmp_path: Path) -> None:
    promote(client, model_files)
    out = tmp_path / "deploy" / "model"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "model.pt").write_bytes(b"old")
    document = download_promoted(client, URI, "m", out)
    assert document["version"] == 1
    for name, path in model_files.items():
        assert (out / name).read_bytes() == path.read_bytes()
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no staging left


def test_download_detects_a_changed_object(client: Any, model_files: dict, tmp_path: Path) -> None:
    promote(client, model_files)
    client.put_object(Bucket=BUCKET, Key="models/m/v1/spec.json", Body=b'{"arch": "cnn"}\n')
    out = tmp_path / "deploy" / "model"
    with pytest.raises(
        StorageError, match=r"s3://unit-bucket/models/m/v1/spec.json .*does not match"
    ):
        download_promoted(client, URI, "m", out)
    assert list((tmp_path / "deploy").iterdir()) == []  # neither out nor staging


def test_download_without_manifest(client: Any, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no promoted version of m"):
        download_promoted(client, URI, "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_s3_configured_names_what_to_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A checkout with no S3 settings: one line naming the settings, or the embedded server."""
    for name in (
        "SWITCHPRUNE_S3_ENDPOINT",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError) as info:
        read_manifest(make_client(), URI, "m")
    message = str(info.value)
    assert "\n" not in message
    assert "no S3 server configured" in message and "SWITCHPRUNE_S3_ENDPOINT" in message
    assert "make release" in message
    # With an endpoint but no keys, the message names the endpoint and the keys instead.
    monkeypatch.setenv("SWITCHPRUNE_S3_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match=r"no complete S3 credentials for http://127\.0\.0\.1:9"):
        read_manifest(make_client(), URI, "m")
