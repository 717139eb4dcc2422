"""``promote``: gate a registered version; copy it to S3 with a manifest; move ``champion``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from switchprune.config import PromoteConfig
from switchprune.io import ArtifactError, read_json


def run(
    cfg: PromoteConfig,
    *,
    register_path: Path,
    tracking_uri: str | None = None,
    s3_client: Any = None,
) -> dict[str, Any]:
    """Promote the version named in ``register_path`` if it passes the gate.

    See :func:`switchprune.promotion.promote` for the order of the steps and what a failure
    leaves behind (nothing half-written).

    Args:
        cfg: The ``promote`` section.
        register_path: The ``register`` stage's output (model name, version).
        tracking_uri: MLflow tracking URI (default: ``MLFLOW_TRACKING_URI`` or embedded).
        s3_client: A boto3 S3 client (default: one for the configured endpoint).

    Returns:
        ``promoted``, ``reason``, ``model_name``, ``version``, ``s3_uri``, ``changed``,
        ``champion_before``. A version the gate refuses is ``promoted: False``, with every
        failed condition in ``reason`` (``switchprune promote`` then exits with status 3).
    """
    from switchprune import promotion

    name, version = read_registration(Path(register_path))
    return promotion.promote(cfg, name, version, tracking_uri=tracking_uri, client=s3_client)


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
