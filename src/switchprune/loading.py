"""Get a compacted model back: from the MLflow registry, a promoted S3 prefix, or a folder."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from switchprune.io import COMPACT_FILE, ArtifactError, load_model_file
from switchprune.models import TaskNet


def pull(ref: str, out_dir: Path, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Download a registered model's files (``model.pt``, ``widths.json``, ``meta.json``, ...).

    Args:
        ref: ``NAME``, ``NAME@ALIAS``, ``NAME:VERSION`` or a ``models:/`` URI; a bare name
            means ``@champion``.
        out_dir: Destination folder (created; files are moved in only once all are downloaded).
        tracking_uri: MLflow tracking URI (default: ``MLFLOW_TRACKING_URI`` or embedded).

    Returns:
        The resolved version's description (``version``, ``run_id``, ...).
    """
    from switchprune import registry

    uri = registry.resolve_tracking_uri(tracking_uri)
    return registry.download_model_version(uri, registry.parse_model_ref(ref), Path(out_dir))


def load_model(uri: str | Path, *, tracking_uri: str | None = None) -> TaskNet:
    """The compacted model, in eval mode, ready for inference.

    Weights are read with ``torch.load(weights_only=True)`` and the network is rebuilt from its
    stored spec; no pickled code is executed. Inputs are expected normalised as described by
    the ``meta.json`` that travels with the model (per-channel ``mean`` and ``std`` of
    ``[0, 1]`` pixels).

    Args:
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a promoted prefix
            ``s3://bucket[/prefix]/NAME`` (its ``current.json`` names the version), or a local
            folder holding ``model.pt``.
        tracking_uri: MLflow tracking URI for ``models:/`` URIs.

    Raises:
        ArtifactError: For a folder without a readable model.
        switchprune.registry.RegistryError: For an unknown model, alias or version.
        switchprune.storage.StorageError: For an unreachable or incomplete S3 prefix.
    """
    text = str(uri)
    if text.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="switchprune-pull-") as tmp:
            pull(text, Path(tmp) / "model", tracking_uri=tracking_uri)
            return load_model_file(Path(tmp) / "model" / COMPACT_FILE)[0]
    if text.startswith("s3://"):
        from switchprune import promotion, storage

        match = re.match(r"^(s3://.+)/([^/]+)/?$", text)
        if match is None:
            raise storage.StorageError(f"{text}: expected s3://bucket[/prefix]/MODEL_NAME")
        with tempfile.TemporaryDirectory(prefix="switchprune-pull-") as tmp:
            promotion.download_promoted(
                storage.make_client(), match.group(1), match.group(2), Path(tmp) / "model"
            )
            return load_model_file(Path(tmp) / "model" / COMPACT_FILE)[0]
    path = Path(text)
    if path.is_dir():
        path = path / COMPACT_FILE
    if not path.is_file():
        raise ArtifactError(f"{text}: no model found (expected {COMPACT_FILE} in a folder)")
    return load_model_file(path)[0]
