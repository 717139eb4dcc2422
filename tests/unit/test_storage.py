"""S3 storage and promotion's S3 side against moto: parsing, client settings, verified objects,
and every failure path of a promotion.

The same paths against a real server live in ``tests/integration/test_storage_s3.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import set_initial_no_auth_action_count

from switchprune.promotion import (
    INCOMPLETE_MARKER,
    Publication,
    download_promoted,
    publish,
    read_manifest,
)
from switchprune.storage import (
    S3Location,
    StorageError,
    ensure_bucket,
    make_client,
    object_matches,
    parse_s3_uri,
    put_object,
    sha256_file,
    verify_object,
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


def body(client: Any, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def promote(client: Any, files: dict[str, Path], version: int = 1, **extra: Any) -> Publication:
    return publish(
        client,
        files,
        s3_uri=URI,
        model_name="m",
        version=version,
        manifest={"test_accuracy": 0.97, **extra},
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_clean(message: str) -> None:
    assert ACCESS_KEY not in message
    assert SECRET_KEY not in message
    assert "\n" not in message


def client_error(code: str, status: int = 500) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": "injected"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")  # type: ignore[arg-type]


def break_puts(
    client: Any, fault: BaseException, *, key: str = "", after: bool = False
) -> list[str]:
    """Make the first PUT of a key ending in ``key`` raise ``fault``: before the server stores
    the object, or (``after``) once it has, as when the answer is lost. Returns the keys PUT."""
    real = client.put_object
    seen: list[str] = []
    fired: list[str] = []

    def put(**kwargs: Any) -> Any:
        seen.append(kwargs["Key"])
        hit = kwargs["Key"].endswith(key) and not fired
        if hit:
            fired.append(kwargs["Key"])
        if hit and not after:
            raise fault
        response = real(**kwargs)
        if hit and after:
            raise fault
        return response

    client.put_object = put
    return seen


def replace_after_upload(client: Any, key: str, data: bytes, **extra: Any) -> None:
    """Right after ``key`` is uploaded, something else stores ``data`` under it."""
    real = client.put_object

    def put(**kwargs: Any) -> Any:
        response = real(**kwargs)
        if kwargs["Key"] == key:
            real(Bucket=kwargs["Bucket"], Key=key, Body=data, **extra)
        return response

    client.put_object = put


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


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [
        ("no-permissions", "denied access"),
        ("wrong-secret", "wrong secret key"),
        ("unknown-key", "does not know the access key"),
    ],
)
def test_refused_credentials_are_one_line_naming_the_reason(
    aws: None, monkeypatch: pytest.MonkeyPatch, credentials: str, expected: str
) -> None:
    def scenario() -> None:
        # The first three calls go unchecked: a user without permissions, its key, the bucket.
        iam = boto3.session.Session().client("iam")
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        make_client().create_bucket(Bucket=BUCKET)
        access, secret = key["AccessKeyId"], key["SecretAccessKey"]
        if credentials == "wrong-secret":
            secret = "wrong-secret-0123456789abcdefghijklmnop"
        elif credentials == "unknown-key":
            access = "AKIANOSUCHKEY0000000"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        with pytest.raises(StorageError) as info:
            ensure_bucket(make_client(), BUCKET)
        message = str(info.value)
        assert expected in message and "amazonaws.com" in message and BUCKET in message
        assert secret not in message and "\n" not in message

    set_initial_no_auth_action_count(3)(scenario)()


def test_ensure_bucket_reports_other_errors(client: Any) -> None:
    def refuse(**_: Any) -> None:
        raise client_error("InternalError", 500)

    client.meta.events.register("before-call.s3.CreateBucket", refuse)
    with pytest.raises(StorageError, match=r"creating bucket s3://unit-bucket.*500 InternalError"):
        ensure_bucket(client, BUCKET)


# ---------------------------------------------------------------------------- verified objects


def test_put_object_stores_bytes_and_hash(client: Any) -> None:
    ensure_bucket(client, BUCKET)
    data = b"payload" * 100
    assert put_object(client, BUCKET, "k", data, sha256=sha(data)) is True
    head = client.head_object(Bucket=BUCKET, Key="k")
    assert head["Metadata"] == {"sha256": sha(data)}
    assert body(client, "k") == data
    verify_object(client, BUCKET, "k", size=len(data), sha256=sha(data))
    assert object_matches(client, BUCKET, "k", size=len(data), sha256=sha(data))
    assert not object_matches(client, BUCKET, "k", size=len(data), sha256=sha(b"other"))
    assert not object_matches(client, BUCKET, "absent", size=1, sha256=sha(b"x"))


def test_a_server_refusing_checksums_gets_the_object_without_them(
    client: Any, model_files: dict
) -> None:
    ensure_bucket(client, BUCKET)
    real = client.put_object
    refused: list[str] = []

    def no_checksums(**kwargs: Any) -> Any:
        if "ChecksumSHA256" in kwargs:
            refused.append(kwargs["Key"])
            if hasattr(kwargs["Body"], "read"):
                kwargs["Body"].read()  # the request went out before the server said no
            raise client_error("NotImplemented", 501)
        return real(**kwargs)

    client.put_object = no_checksums
    path = model_files["model.pt"]
    with open(path, "rb") as fh:  # a file body is rewound for the second try
        assert put_object(client, BUCKET, "file", fh, sha256=sha256_file(path)) is False
    assert body(client, "file") == path.read_bytes()
    # Told that checksums are refused, the next upload does not offer them again.
    assert put_object(client, BUCKET, "k", b"data", sha256=sha(b"data"), checksum=False) is False
    assert refused == ["file"]
    verify_object(client, BUCKET, "k", size=4, sha256=sha(b"data"))


@pytest.mark.parametrize(
    ("stored", "extra", "match"),
    [
        (b"payloaX", {"Metadata": {"sha256": "0" * 64}}, "has sha256 0000"),
        (b"payload!", {"Metadata": {"sha256": sha(b"payload")}}, "has 8 bytes on the server"),
        # Same size and the expected hash in metadata, but the server's checksum tells.
        (
            b"payloaX",
            {"Metadata": {"sha256": sha(b"payload")}, "ChecksumAlgorithm": "SHA256"},
            "S3 checksum",
        ),
    ],
    ids=["metadata", "size", "checksum"],
)
def test_verify_object_catches_a_stored_object_that_differs(
    client: Any, stored: bytes, extra: dict, match: str
) -> None:
    ensure_bucket(client, BUCKET)
    client.put_object(Bucket=BUCKET, Key="k", Body=stored, **extra)
    with pytest.raises(StorageError, match=match) as info:
        verify_object(client, BUCKET, "k", size=7, sha256=sha(b"payload"))
    assert "s3://unit-bucket/k" in str(info.value)
    with pytest.raises(StorageError, match="s3://unit-bucket/absent is missing"):
        verify_object(client, BUCKET, "absent", size=7, sha256=sha(b"payload"))


def test_an_object_without_hash_metadata_is_hashed(client: Any) -> None:
    # rclone forgets user metadata on restart: identical bytes must still count as identical.
    ensure_bucket(client, BUCKET)
    client.put_object(Bucket=BUCKET, Key="k", Body=b"payload")
    assert object_matches(client, BUCKET, "k", size=7, sha256=sha(b"payload"))
    assert not object_matches(client, BUCKET, "k", size=7, sha256=sha(b"payloaX"))
    verify_object(client, BUCKET, "k", size=7, sha256=sha(b"payload"))


# ---------------------------------------------------------------------------------- promote


def test_promote_layout_metadata_and_manifest(client: Any, model_files: dict) -> None:
    result = promote(client, model_files, version=3, name="ignored", run_id="abc")
    assert result.changed is True
    assert result.s3_uri == "s3://unit-bucket/models/m/v3/"
    assert result.manifest_key == "models/m/current.json"
    assert result.previous is None
    assert sorted(result.uploaded) == sorted(model_files)
    assert keys(client) == sorted(
        ["models/m/current.json"] + [f"models/m/v3/{n}" for n in model_files]
    )
    for entry in result.files:
        local = model_files[entry["name"]]
        assert entry["sha256"] == sha(local.read_bytes())
        assert entry["size"] == local.stat().st_size
        head = client.head_object(Bucket=BUCKET, Key=entry["key"])
        assert head["Metadata"]["sha256"] == entry["sha256"]
        assert body(client, entry["key"]) == local.read_bytes()
    document = json.loads(manifest_bytes(client))
    assert document == result.manifest
    assert document["name"] == "m"  # our fields win over the caller's
    assert document["version"] == 3 and document["run_id"] == "abc"
    assert document["test_accuracy"] == 0.97
    assert document["files"] == result.files
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
    assert second.changed is False and second.uploaded == []
    assert writes == []
    assert manifest_bytes(client) == before
    assert second.manifest == first.manifest


def test_promote_refuses_new_content_under_the_current_version(
    client: Any, model_files: dict
) -> None:
    promote(client, model_files)
    before = manifest_bytes(client)
    model_files["model.pt"].write_bytes(b"retrained")
    with pytest.raises(StorageError, match="already current with different files"):
        promote(client, model_files)
    assert manifest_bytes(client) == before
    assert body(client, "models/m/v1/model.pt") == b"weights" * 1000


def test_promote_repairs_a_damaged_current_version(client: Any, model_files: dict) -> None:
    promote(client, model_files)
    client.delete_object(Bucket=BUCKET, Key="models/m/v1/spec.json")
    result = promote(client, model_files)
    assert result.changed is True and result.uploaded == ["spec.json"]
    assert body(client, "models/m/v1/spec.json") == model_files["spec.json"].read_bytes()


def test_promote_reuses_objects_whose_metadata_was_lost(client: Any, model_files: dict) -> None:
    ensure_bucket(client, BUCKET)
    model = model_files["model.pt"].read_bytes()
    client.put_object(Bucket=BUCKET, Key="models/m/v1/model.pt", Body=model)
    client.put_object(Bucket=BUCKET, Key="models/m/v1/spec.json", Body=b"stale")
    result = promote(client, model_files)
    assert sorted(result.uploaded) == ["metrics.json", "spec.json"]
    assert body(client, "models/m/v1/spec.json") == model_files["spec.json"].read_bytes()


def test_an_upload_failing_halfway_leaves_no_new_version(client: Any, model_files: dict) -> None:
    promote(client, model_files, version=1)
    before = manifest_bytes(client)
    disk_full = client_error("InternalError")
    seen = break_puts(client, disk_full, key="v2/model.pt")
    with pytest.raises(StorageError) as info:
        promote(client, model_files, version=2)
    assert "models/m/v2/metrics.json" in seen  # one file was stored before the failure
    message = str(info.value)
    assert "while uploading" in message and "InternalError" in message
    assert "s3://unit-bucket/models/m/v2/" in message and "removed" in message
    assert keys(client, "models/m/v2/") == []
    assert manifest_bytes(client) == before
    assert len(keys(client, "models/m/v1/")) == 3
    assert_clean(message)


def test_an_object_altered_after_its_upload_is_caught_before_the_manifest(
    client: Any, model_files: dict
) -> None:
    promote(client, model_files, version=1)
    before = manifest_bytes(client)
    replace_after_upload(client, "models/m/v2/model.pt", b"truncated")
    with pytest.raises(StorageError, match=r"while verifying: .*v2/model.pt has 9 bytes"):
        promote(client, model_files, version=2)
    assert keys(client, "models/m/v2/") == []
    assert manifest_bytes(client) == before


def test_a_failed_first_promotion_leaves_no_manifest(client: Any, model_files: dict) -> None:
    replace_after_upload(
        client, "models/m/v1/spec.json", b'{"arch": "cnn"}\n', Metadata={"sha256": "0" * 64}
    )
    with pytest.raises(StorageError, match="spec.json has sha256 0000"):
        promote(client, model_files)
    assert keys(client) == []  # there was no manifest before: there is none now


def test_manifest_failure_keeps_the_previous_one(client: Any, model_files: dict) -> None:
    promote(client, model_files, version=1)
    before = manifest_bytes(client)
    break_puts(client, client_error("SlowDown", 503), key="current.json")
    with pytest.raises(StorageError, match="while writing the manifest"):
        promote(client, model_files, version=2)
    assert keys(client, "models/m/v2/") == []
    assert manifest_bytes(client) == before


def test_manifest_written_but_reported_failed_is_restored(client: Any, model_files: dict) -> None:
    promote(client, model_files, version=1)
    before = manifest_bytes(client)
    lost = ConnectionResetError("connection reset after the PUT")
    break_puts(client, lost, key="current.json", after=True)
    with pytest.raises(StorageError, match="previous manifest restored"):
        promote(client, model_files, version=2)
    assert manifest_bytes(client) == before
    assert keys(client, "models/m/v2/") == []


def test_an_interrupted_promotion_cleans_up_and_is_not_disguised(
    client: Any, model_files: dict
) -> None:
    promote(client, model_files, version=1)
    before = manifest_bytes(client)
    break_puts(client, KeyboardInterrupt(), key="v2/spec.json")
    with pytest.raises(KeyboardInterrupt):
        promote(client, model_files, version=2)
    assert keys(client, "models/m/v2/") == []
    assert manifest_bytes(client) == before


def test_failure_messages_are_redacted(client: Any, model_files: dict) -> None:
    break_puts(client, RuntimeError(f"signing with {ACCESS_KEY}/{SECRET_KEY} failed"))
    with pytest.raises(StorageError) as info:
        promote(client, model_files)
    assert "***" in str(info.value)
    assert_clean(str(info.value))


def test_credentials_from_a_profile_are_redacted_too(
    aws: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_files: dict
) -> None:
    access, secret = "AKIAFROMPROFILEFILE1", "profile-secret-0123456789abcdefghijklmnop"
    profile = tmp_path / "credentials"
    profile.write_text(
        f"[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(profile))
    client = make_client()
    break_puts(client, RuntimeError(f"signing with {access}/{secret} failed"))
    with pytest.raises(StorageError) as info:
        promote(client, model_files)
    message = str(info.value)
    assert "signing with ***/*** failed" in message
    assert access not in message and secret not in message


def test_a_promotion_through_a_server_refusing_checksums(client: Any, model_files: dict) -> None:
    real = client.put_object

    def no_checksums(**kwargs: Any) -> Any:
        if "ChecksumSHA256" in kwargs:
            raise client_error("NotImplemented", 501)
        return real(**kwargs)

    client.put_object = no_checksums
    result = promote(client, model_files)
    assert result.changed is True
    for name, path in model_files.items():
        assert body(client, f"models/m/v1/{name}") == path.read_bytes()
    assert read_manifest(client, URI, "m")["version"] == 1
    assert not [k for k in keys(client) if k.endswith(INCOMPLETE_MARKER)]


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
        publish(client, files, **args)
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
