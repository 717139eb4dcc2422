"""``promote``: gate a registered version; copy it to S3 with a manifest; move ``champion``."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from switchprune.config import PromoteConfig
from switchprune.io import ArtifactError, read_json

logger = logging.getLogger(__name__)


def check_gate(
    cfg: PromoteConfig, metrics: dict[str, float], champion: dict[str, Any] | None, version: int
) -> tuple[bool, str]:
    """Whether a version's metrics pass the gate, and why (or why not).

    Args:
        cfg: The ``promote`` section.
        metrics: The version's run metrics (``test_accuracy``, ``baseline_accuracy``,
            ``params_ratio``).
        champion: The current champion (``version``, ``metrics``), or ``None``.
        version: The candidate version.

    Returns:
        ``(passed, reason)``.
    """
    missing = [k for k in ("test_accuracy", "params_ratio") if k not in metrics]
    if missing:
        return False, f"the run of version {version} has no metric {missing[0]!r}"
    acc = metrics["test_accuracy"]
    if acc < cfg.min_accuracy:
        return False, f"test_accuracy {acc:.4f} < min_accuracy {cfg.min_accuracy:.4f}"
    if "baseline_accuracy" in metrics:
        drop = metrics["baseline_accuracy"] - acc
        if drop > cfg.max_accuracy_drop:
            base = metrics["baseline_accuracy"]
            return False, (
                f"accuracy drop {drop:.4f} against baseline_accuracy {base:.4f} "
                f"> max_accuracy_drop {cfg.max_accuracy_drop:.4f}"
            )
    diff = metrics.get("max_abs_logit_diff_f64")
    if diff is None or not diff <= cfg.max_logit_diff:
        return False, (
            f"max_abs_logit_diff_f64 {diff} > max_logit_diff {cfg.max_logit_diff:g}: the "
            "compacted model does not compute what the trained model computes"
            if diff is not None
            else f"the run of version {version} has no metric 'max_abs_logit_diff_f64'"
        )
    ratio = metrics["params_ratio"]
    if ratio > cfg.max_params_ratio:
        return False, f"params_ratio {ratio:.4f} > max_params_ratio {cfg.max_params_ratio:.4f}"
    if champion is not None and cfg.not_worse_than_champion and champion["version"] != version:
        best = champion["metrics"].get("test_accuracy")
        if best is not None and acc < best:
            return False, (
                f"test_accuracy {acc:.4f} is worse than champion version {champion['version']} "
                f"({best:.4f})"
            )
    return True, "passed the gate"


def run(
    cfg: PromoteConfig,
    *,
    register_path: Path,
    tracking_uri: str | None = None,
    s3_client: Any = None,
) -> dict[str, Any]:
    """Promote the version named in ``register_path`` if it passes the gate.

    Order matters for consumers: the version's files are uploaded and verified, the manifest
    ``current.json`` is written last, and only then does the alias move. A failure at any
    point leaves the previous manifest and alias as they were, and removes the objects this
    call uploaded. Promoting the current champion
    again writes nothing.

    Args:
        cfg: The ``promote`` section.
        register_path: The ``register`` stage's output (model name, version).
        tracking_uri: MLflow tracking URI (default: ``MLFLOW_TRACKING_URI`` or embedded).
        s3_client: A boto3 S3 client (default: one for the configured endpoint).

    Returns:
        ``promoted``, ``reason``, ``version``, ``s3_uri``, ``changed``, ``champion_before``.
    """
    from switchprune import registry, storage

    name, version = read_registration(Path(register_path))
    uri = registry.resolve_tracking_uri(tracking_uri)
    registry.check_reachable(uri)
    info = registry.version_info(uri, registry.ModelRef(name, version=version))
    client = s3_client if s3_client is not None else storage.make_client()
    # S3's manifest is the champion of record; an alias left behind by a crash, a double
    # fault or a concurrent promotion is moved to it before anything else.
    reconcile_alias(uri, client, cfg, name)
    champion = registry.get_alias_version(uri, name, cfg.alias)
    passed, reason = check_gate(cfg, info["metrics"], champion, version)
    target = f"{cfg.s3_uri.rstrip('/')}/{name}/v{version}/"
    out: dict[str, Any] = {
        "model_name": name,
        "version": version,
        "s3_uri": target,
        "champion_before": champion["version"] if champion else None,
        "changed": False,
    }
    if not passed:
        return {**out, "promoted": False, "reason": f"refused: {reason}"}

    storage.ensure_bucket(client, storage.parse_s3_uri(cfg.s3_uri).bucket)
    storage.remove_incomplete(client, cfg.s3_uri, name, older_than=cfg.remove_incomplete_after)
    with tempfile.TemporaryDirectory(prefix="switchprune-promote-") as tmp:
        files_dir = Path(tmp) / "files"
        registry.download_model_version(uri, registry.ModelRef(name, version=version), files_dir)
        files = {p.name: p for p in sorted(files_dir.iterdir()) if p.is_file()}
        manifest = {
            "run_id": info["run_id"],
            "model_uri": f"models:/{name}/{version}",
            "data_md5": info["tags"].get("data_md5", ""),
            "git_commit": info["tags"].get("git_commit", ""),
            "metrics": info["metrics"],
        }
        previous = storage.read_manifest(client, cfg.s3_uri, name)
        result = storage.promote_files(
            client, files, s3_uri=cfg.s3_uri, model_name=name, version=version, manifest=manifest
        )
    moved = champion is None or champion["version"] != version
    if moved:
        try:
            registry.set_alias(uri, name, cfg.alias, version)
        except registry.RegistryError as alias_error:
            # The manifest is already current; put the previous one back so S3 and the
            # registry keep naming the same champion, and remove what this call uploaded.
            if result["changed"]:
                _undo(client, cfg, name, previous, result, alias_error)
            raise
    # A promotion running at the same time may have written the manifest since: the alias
    # follows whatever the manifest says now, so every interleaving ends consistent.
    final = reconcile_alias(uri, client, cfg, name)
    if final is not None and final != version:
        reason = f"{reason}; a concurrent promotion made version {final} {cfg.alias}"
    changed = bool(result["changed"]) or moved
    if not changed:
        reason = f"version {version} is already {cfg.alias}; nothing to do"
    return {**out, "promoted": True, "reason": reason, "changed": changed}


def read_registration(path: Path) -> tuple[str, int]:
    """Model name and version from the ``register`` stage's output.

    Raises:
        ArtifactError: The file is missing, not JSON, or lacks a valid name or version.
    """
    registered = read_json(path)
    name = registered.get("model_name") if isinstance(registered, dict) else None
    version = registered.get("version") if isinstance(registered, dict) else None
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{path}: no 'model_name' (re-run register)")
    if (
        isinstance(version, bool)
        or not isinstance(version, int | str)
        or not str(version).isdigit()
    ):
        raise ArtifactError(f"{path}: 'version' must be a positive integer, got {version!r}")
    return name, int(version)


def reconcile_alias(uri: str, client: Any, cfg: PromoteConfig, name: str) -> int | None:
    """Move the alias to the version S3's manifest names, until the two agree.

    Returns:
        The champion version, or ``None`` when nothing was promoted yet.
    """
    from switchprune import registry, storage

    for _ in range(10):
        manifest = storage.read_manifest(client, cfg.s3_uri, name)
        if manifest is None:
            return None
        version = int(manifest["version"])
        alias = registry.get_alias_version(uri, name, cfg.alias)
        if alias is not None and alias["version"] == version:
            return version
        logger.warning(
            "%s: alias %s named version %s while S3 names %s; moving the alias",
            name,
            cfg.alias,
            alias["version"] if alias else None,
            version,
        )
        registry.set_alias(uri, name, cfg.alias, version)
    raise registry.RegistryError(
        f"{name}: alias {cfg.alias!r} keeps diverging from S3's manifest (concurrent "
        "promotions); run promote again"
    )


def _undo(
    client: Any,
    cfg: PromoteConfig,
    name: str,
    previous: dict[str, Any] | None,
    result: dict[str, Any],
    alias_error: Exception,
) -> None:
    """Put the previous manifest back after the alias failed; report both faults if it fails."""
    from switchprune import registry, storage

    uploaded = set(result["uploaded"])
    try:
        storage.restore_manifest(
            client,
            cfg.s3_uri,
            name,
            previous,
            remove=[e["key"] for e in result["files"] if e["name"] in uploaded],
        )
    except storage.StorageError as restore_error:
        raise registry.RegistryError(
            f"moving alias {cfg.alias!r} failed ({alias_error}), and restoring the previous "
            f"manifest also failed ({restore_error}); S3 and the registry may name different "
            "champions until promote runs again, which moves the alias to S3's manifest"
        ) from restore_error


__all__ = ["check_gate", "reconcile_alias", "run"]
