"""Promotion: a registered model version becomes the champion, on S3 and in the registry.

A version lands under ``<s3_uri>/<model_name>/v<version>/``; the manifest ``current.json`` beside
it, written last once every object checks out, makes it current (readers never see half a
version) and is the champion of record, which the registry alias follows.
"""

from __future__ import annotations

import json
import logging
import operator
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from switchprune import names, storage
from switchprune.config import PromoteConfig
from switchprune.io import move_into, staging_dir
from switchprune.storage import S3Location, StorageError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "current.json"
# In a version folder from its first upload until its manifest is written, so that the folder
# of a promotion that died in between is recognised and swept later.
INCOMPLETE_MARKER = ".incomplete"
# How often an alias that moves under us is re-read before giving up.
_RECONCILE_ROUNDS = 10
_JSON = "application/json"


@dataclass(frozen=True)
class Publication:
    """What :func:`publish` did."""

    changed: bool  # whether anything was written (not if the version was current already)
    s3_uri: str  # the version folder, s3://bucket/<prefix>/<model_name>/v<version>/
    manifest_key: str
    files: list[dict[str, Any]]  # name, key, size and sha256 of every file, sorted by name
    uploaded: list[str]  # names of the files this call uploaded
    manifest: dict[str, Any]  # the manifest now current
    previous: bytes | None  # the manifest's bytes before this call


@dataclass(frozen=True)
class _Version:
    """Where one version of a model lives in the bucket."""

    loc: S3Location
    model: str
    number: int

    def key(self, name: str) -> str:
        return self.loc.key(self.model, f"v{self.number}", name)

    @property
    def manifest_key(self) -> str:
        return self.loc.key(self.model, MANIFEST_NAME)

    @property
    def uri(self) -> str:
        return self.loc.uri(self.model, f"v{self.number}") + "/"


def check_gate(
    cfg: PromoteConfig, metrics: dict[str, float], champion: dict[str, Any] | None, version: int
) -> tuple[bool, str]:
    """Whether run ``metrics`` of ``version`` pass the gate, against ``champion`` if any.

    Returns:
        ``(True, "passed the gate")``, or ``False`` and every failed condition joined by "; ".
    """
    reasons = [
        f"the run of version {version} has no metric {key!r}"
        for key in ("test_accuracy", "params_ratio", "max_abs_logit_diff_f64")
        if key not in metrics
    ]
    acc, base = metrics.get("test_accuracy"), metrics.get("baseline_accuracy")
    diff, ratio = metrics.get("max_abs_logit_diff_f64"), metrics.get("params_ratio")
    if acc is not None and not acc >= cfg.min_accuracy:
        reasons.append(f"test_accuracy {acc:.4f} < min_accuracy {cfg.min_accuracy:.4f}")
    if acc is not None and base is not None and not base - acc <= cfg.max_accuracy_drop:
        reasons.append(
            f"accuracy drop {base - acc:.4f} against baseline_accuracy {base:.4f} "
            f"> max_accuracy_drop {cfg.max_accuracy_drop:.4f}"
        )
    if diff is not None and not diff <= cfg.max_logit_diff:
        reasons.append(
            f"max_abs_logit_diff_f64 {diff} > max_logit_diff {cfg.max_logit_diff:g}: the "
            "compacted model does not compute what the trained model computes"
        )
    if ratio is not None and not ratio <= cfg.max_params_ratio:
        reasons.append(f"params_ratio {ratio:.4f} > max_params_ratio {cfg.max_params_ratio:.4f}")
    if champion and champion["version"] != version and cfg.not_worse_than_champion:
        best = champion["metrics"].get("test_accuracy")
        if acc is not None and best is not None and acc < best:
            reasons.append(
                f"test_accuracy {acc:.4f} is worse than champion version {champion['version']} "
                f"({best:.4f})"
            )
    return (False, "; ".join(reasons)) if reasons else (True, "passed the gate")


def promote(
    cfg: PromoteConfig,
    model_name: str,
    version: int,
    *,
    tracking_uri: str | None = None,
    client: Any = None,
) -> dict[str, Any]:
    """Promote a registered version if it passes the gate: publish it, then move the alias.

    Returns:
        ``model_name``, ``version``, ``s3_uri`` (the version folder), ``champion_before``,
        ``changed``, ``promoted`` and ``reason``.

    Raises:
        switchprune.registry.RegistryError: The registry cannot be used or the alias not moved.
        StorageError: An S3 operation or check failed.
    """
    from switchprune import registry

    uri = registry.resolve_tracking_uri(tracking_uri)
    # Checks the registry is reachable before anything is read or written.
    info = registry.version_info(uri, registry.ModelRef(model_name, version=version))
    client = client if client is not None else storage.make_client()
    # An alias left behind (a crash, a concurrent promotion) first follows the manifest.
    champion = reconcile_alias(uri, client, cfg, model_name)
    passed, reason = check_gate(cfg, info["metrics"], champion, version)
    out: dict[str, Any] = {
        "model_name": model_name,
        "version": version,
        "s3_uri": f"{cfg.s3_uri.rstrip('/')}/{model_name}/v{version}/",
        "champion_before": champion["version"] if champion else None,
        "changed": False,
    }
    if not passed:
        return {**out, "promoted": False, "reason": f"refused: {reason}"}
    name = info["name"]
    storage.ensure_bucket(client, storage.parse_s3_uri(cfg.s3_uri).bucket)
    remove_incomplete(client, cfg.s3_uri, name, older_than=cfg.remove_incomplete_after)
    with tempfile.TemporaryDirectory(prefix="switchprune-promote-") as tmp:
        files_dir = Path(tmp) / "files"
        registry.download_model_version(uri, registry.ModelRef(name, version=version), files_dir)
        manifest = {k: info[k] for k in ("run_id", "model_uri", "metrics")}
        manifest.update({k: info["tags"].get(k, "") for k in ("data_md5", "git_commit")})
        files = {p.name: p for p in sorted(files_dir.iterdir()) if p.is_file()}
        publication = publish(
            client, files, s3_uri=cfg.s3_uri, model_name=name, version=version, manifest=manifest
        )
    if moved := champion is None or champion["version"] != version:
        _move_alias(uri, client, cfg, info, publication)
    # A concurrent promotion may have written the manifest since: the alias follows it.
    final = reconcile_alias(uri, client, cfg, model_name)
    if final is not None and final["version"] != version:
        reason = f"{reason}; a concurrent promotion made version {final['version']} {cfg.alias}"
    changed = publication.changed or moved
    if not changed:
        reason = f"version {version} is already {cfg.alias}; nothing to do"
    return {**out, "promoted": True, "reason": reason, "changed": changed}


def reconcile_alias(
    tracking_uri: str, client: Any, cfg: PromoteConfig, model_name: str
) -> dict[str, Any] | None:
    """Move the alias to the version S3's manifest names, until the two agree.

    Returns:
        The champion as :func:`switchprune.registry.get_alias_version` describes it, or None
        if neither the alias nor a manifest names one.

    Raises:
        switchprune.registry.RegistryError: The alias cannot be read, moved or kept in line.
    """
    from switchprune import registry

    for _ in range(_RECONCILE_ROUNDS):
        manifest = read_manifest(client, cfg.s3_uri, model_name)
        alias = registry.get_alias_version(tracking_uri, model_name, cfg.alias)
        if manifest is None or (alias is not None and alias["version"] == manifest["version"]):
            return alias
        logger.warning(
            "%s: alias %s named version %s while S3 names %s; moving the alias",
            model_name,
            cfg.alias,
            alias["version"] if alias else None,
            manifest["version"],
        )
        registry.set_alias(tracking_uri, model_name, cfg.alias, int(manifest["version"]))
    raise registry.RegistryError(
        f"{model_name}: alias {cfg.alias!r} keeps diverging from S3's manifest (concurrent "
        "promotions); run promote again"
    )


def _move_alias(
    tracking_uri: str, client: Any, cfg: PromoteConfig, info: dict[str, Any], pub: Publication
) -> None:
    """Point the alias at the published version; if that fails, take the publication back."""
    from switchprune import registry

    try:
        registry.set_alias(tracking_uri, info["name"], cfg.alias, info["version"])
    except registry.RegistryError as alias_error:
        if not pub.changed:
            raise
        # The new manifest is current: put the previous one back, so S3 and the alias agree.
        target = _Version(storage.parse_s3_uri(cfg.s3_uri), info["name"], info["version"])
        uploaded = [target.key(name) for name in pub.uploaded]
        notes, undone = _roll_back(client, target, pub.previous, uploaded, written=True)
        if not undone:
            raise registry.RegistryError(
                f"moving alias {cfg.alias!r} failed ({alias_error}), and restoring the previous "
                f"manifest also failed ({notes}); S3 and the registry may name different "
                "champions until promote runs again, which moves the alias to S3's manifest"
            ) from alias_error
        raise


def publish(
    client: Any,
    files: dict[str, Path],
    *,
    s3_uri: str,
    model_name: str,
    version: int,
    manifest: dict[str, Any],
) -> Publication:
    """Upload and verify a model version, then make it current by writing its manifest last.

    Only ``files`` (object name to local file) missing from the version folder are uploaded,
    none if it is current and intact; the manifest is ``manifest`` plus ``name``, ``version``,
    ``files`` and ``promoted_at``. A failure deletes the uploads and keeps the previous manifest.

    Returns:
        What was written, and the manifest now current.

    Raises:
        StorageError: Invalid input, the version current with other files, or an S3 failure.
    """
    target = _Version(storage.parse_s3_uri(s3_uri), _checked_name(model_name, "model"), version)
    entries = _entries(target, files, manifest)
    bucket, key = target.loc.bucket, target.manifest_key
    storage.ensure_bucket(client, bucket)
    previous = storage.get_bytes(client, bucket, key)
    current = None if previous is None else _parse_manifest(previous, bucket, key)
    if current is not None:
        # A promotion killed right after its manifest leaves the marker in the current folder,
        # which remove_incomplete would sweep once another version is current.
        marker = _Version(target.loc, target.model, current["version"]).key(INCOMPLETE_MARKER)
        if storage.object_exists(client, bucket, marker):
            _delete_quietly(client, bucket, marker)
    if current is not None and current["version"] == version:
        fields = operator.itemgetter("name", "size", "sha256")
        if sorted(map(fields, current["files"])) != sorted(map(fields, entries)):
            raise StorageError(
                f"{target.uri} is already current with different files (see "
                f"s3://{bucket}/{key}); promote the change as a new version"
            )
        if all(_stored(client, bucket, e) for e in entries):
            logger.info("%s v%d is already current; nothing written", model_name, version)
            return Publication(False, target.uri, key, entries, [], current, previous)
        # Some listed object is gone or altered: go on and repair the version.
    uploaded, document = _write_version(client, target, entries, files, manifest, previous)
    logger.info("promoted %s v%d: s3://%s/%s", model_name, version, bucket, key)
    return Publication(True, target.uri, key, entries, uploaded, document, previous)


def read_manifest(client: Any, s3_uri: str, model_name: str) -> dict[str, Any] | None:
    """The manifest ``<prefix>/<model_name>/current.json``, or None without one (or a bucket).

    Raises:
        StorageError: If it cannot be read, is not JSON, or lacks ``version`` or ``files``.
    """
    loc = storage.parse_s3_uri(s3_uri)
    key = loc.key(_checked_name(model_name, "model"), MANIFEST_NAME)
    raw = storage.get_bytes(client, loc.bucket, key)
    return None if raw is None else _parse_manifest(raw, loc.bucket, key)


def download_promoted(client: Any, s3_uri: str, model_name: str, out_dir: Path) -> dict[str, Any]:
    """Download the current version's files into ``out_dir``, all checked before any is moved.

    Returns:
        The manifest.

    Raises:
        StorageError: No manifest, a file missing or not matching it, or S3 unreachable.
    """
    loc = storage.parse_s3_uri(s3_uri)
    document = read_manifest(client, s3_uri, model_name)
    endpoint = storage.endpoint_name(client)
    if document is None:
        raise StorageError(
            f"no promoted version of {model_name}: {loc.uri(model_name, MANIFEST_NAME)} "
            f"not found at {endpoint}"
        )
    with staging_dir(out_dir) as staging:
        for entry in document["files"]:
            key = entry["key"]
            size, digest = storage.download_object(client, loc.bucket, key, staging / entry["name"])
            if size != entry["size"] or digest != entry["sha256"]:
                raise StorageError(
                    f"s3://{loc.bucket}/{key} at {endpoint} does not match its manifest: got "
                    f"{size} bytes with sha256 {digest}, expected {entry['size']} bytes with "
                    f"sha256 {entry['sha256']}"
                )
        try:
            move_into(staging, out_dir, [entry["name"] for entry in document["files"]])
        except OSError as exc:
            raise StorageError(f"cannot move downloaded files into {out_dir}: {exc}") from exc
    logger.info("downloaded %s v%s into %s", model_name, document["version"], out_dir)
    return document


def remove_incomplete(
    client: Any, s3_uri: str, model_name: str, *, older_than: float = 3600.0
) -> list[str]:
    """Delete version folders whose marker is ``older_than`` s old, except the current one.

    Returns:
        The keys deleted.
    """
    loc = storage.parse_s3_uri(s3_uri)
    prefix = loc.key(_checked_name(model_name, "model")) + "/"
    current = read_manifest(client, s3_uri, model_name)
    keep = f"{prefix}v{current['version']}/" if current else None
    now = datetime.now(UTC)
    objects = storage.list_objects(client, loc.bucket, prefix)
    stale = {
        o["Key"].removesuffix(INCOMPLETE_MARKER)
        for o in objects
        if o["Key"].endswith("/" + INCOMPLETE_MARKER)
        and (now - o["LastModified"]).total_seconds() >= older_than
    } - {keep}
    deleted = [o["Key"] for o in objects if o["Key"].startswith(tuple(stale))]
    with storage.reporting(client, f"removing incomplete versions under {prefix}"):
        for key in deleted:
            client.delete_object(Bucket=loc.bucket, Key=key)
    if deleted:
        logger.info("removed %d object(s) of incomplete promotions of %s", len(deleted), model_name)
    return deleted


def _checked_name(name: object, what: str) -> str:
    if not names.is_name(name):
        raise StorageError(f"invalid {what} name {name!r}: {names.NAME_RULE}")
    return name


def _entries(
    target: _Version, files: dict[str, Path], manifest: dict[str, Any]
) -> list[dict[str, Any]]:
    """The manifest's file entries; every argument is checked before S3 is touched."""
    if isinstance(target.number, bool) or not isinstance(target.number, int) or target.number < 1:
        raise StorageError(f"version must be an integer >= 1, got {target.number!r}")
    if not files:
        raise StorageError("nothing to promote: no files given")
    if not isinstance(manifest, dict):
        raise StorageError(f"manifest must be a mapping, got {type(manifest).__name__}")
    try:
        json.dumps(manifest)
    except (TypeError, ValueError) as exc:
        raise StorageError(f"manifest is not JSON-serialisable: {exc}") from exc
    entries = []
    for name in sorted(files):
        path = Path(files[_checked_name(name, "file")])
        if not path.is_file():
            raise StorageError(f"cannot promote {name!r}: {path} is not a file")
        size, digest = path.stat().st_size, storage.sha256_file(path)
        entries.append({"name": name, "key": target.key(name), "size": size, "sha256": digest})
    return entries


def _write_version(
    client: Any,
    target: _Version,
    entries: list[dict[str, Any]],
    files: dict[str, Path],
    extra: dict[str, Any],
    previous: bytes | None,
) -> tuple[list[str], dict[str, Any]]:
    """Upload what is missing, verify all, write the manifest; the names uploaded, the manifest."""
    bucket, marker = target.loc.bucket, target.key(INCOMPLETE_MARKER)
    uploaded: list[str] = []
    stage = "uploading"
    try:
        checksum = storage.put_object(client, bucket, marker, b"")
        uploaded.append(marker)
        for entry in entries:
            if _stored(client, bucket, entry):
                continue
            with open(files[entry["name"]], "rb") as fh:
                checksum = storage.put_object(
                    client, bucket, entry["key"], fh, sha256=entry["sha256"], checksum=checksum
                )
            uploaded.append(entry["key"])
            logger.info("uploaded s3://%s/%s (%d bytes)", bucket, entry["key"], entry["size"])
        stage = "verifying"
        for e in entries:
            storage.verify_object(client, bucket, e["key"], size=e["size"], sha256=e["sha256"])
        stage = "writing the manifest"
        document = {
            **extra,
            "name": target.model,
            "version": target.number,
            "files": entries,
            "promoted_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        body = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
        storage.put_object(
            client, bucket, target.manifest_key, body, content_type=_JSON, checksum=checksum
        )
        uploaded.remove(marker)
        _delete_quietly(client, bucket, marker)
    except BaseException as exc:
        written = stage == "writing the manifest"
        notes, _ = _roll_back(client, target, previous, uploaded, written=written)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt and friends: clean up, but do not disguise them
        raise StorageError(
            f"promoting {target.model} v{target.number} to {target.uri} failed while {stage}: "
            f"{storage.describe(client, exc)}; {notes}"
        ) from exc
    return [e["name"] for e in entries if e["key"] in uploaded], document


def _roll_back(
    client: Any, target: _Version, previous: bytes | None, uploaded: list[str], *, written: bool
) -> tuple[str, bool]:
    """Best effort: restore the manifest if the new one may be ``written``, delete the uploads.

    Uploads are kept while the new manifest may name them (their marker lets a later sweep go).
    Returns a note for the error message, and whether everything was undone.
    """
    bucket, key = target.loc.bucket, target.manifest_key
    notes = []
    if written:
        try:
            if storage.get_bytes(client, bucket, key) != previous:
                if previous is None:
                    client.delete_object(Bucket=bucket, Key=key)
                else:
                    storage.put_object(client, bucket, key, previous, content_type=_JSON)
                notes.append("previous manifest restored")
        except Exception as exc:
            reason = storage.describe(client, exc)
            kept = f"kept {len(uploaded)} uploaded object(s), which it may name"
            return f"could not restore s3://{bucket}/{key}: {reason}; {kept}", False
    left = [k for k in uploaded if not _delete_quietly(client, bucket, k)]
    notes.append(f"removed {len(uploaded) - len(left)} uploaded object(s)")
    if left:
        notes.append(f"could not remove {', '.join(left)}")
    return ", ".join(notes), not left


def _stored(client: Any, bucket: str, e: dict[str, Any]) -> bool:
    return storage.object_matches(client, bucket, e["key"], size=e["size"], sha256=e["sha256"])


def _delete_quietly(client: Any, bucket: str, key: str) -> bool:
    """Best effort: whether the object was deleted (a marker left is swept later)."""
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except Exception:
        logger.warning("could not remove s3://%s/%s", bucket, key)
        return False
    return True


def _parse_manifest(raw: bytes, bucket: str, key: str) -> dict[str, Any]:
    """Decode and check a manifest; the checks keep downloads inside the output folder."""
    uri = f"s3://{bucket}/{key}"
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
        if not (
            isinstance(entry, dict)
            and names.is_name(entry.get("name"))
            and isinstance(entry.get("key"), str)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        ):
            raise StorageError(f"{uri} has an invalid file entry: {entry!r}")
    if len({e["name"] for e in files}) != len(files):
        raise StorageError(f"{uri} lists a file name twice")
    return document
