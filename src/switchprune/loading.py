"""Get a compacted model back: from the MLflow registry, a promoted S3 prefix, or a folder."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from switchprune.data import META_FILE, DataError, load_meta
from switchprune.io import COMPACT_FILE, ArtifactError, load_model_file
from switchprune.models import TaskNet
from switchprune.serving import INPUT_KEY, InputContract, ServedModel, contract_of


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


def load_model(
    uri: str | Path, *, tracking_uri: str | None = None, raw: bool = True
) -> ServedModel | TaskNet:
    """The compacted model, in eval mode, ready for inference.

    Weights are read with ``torch.load(weights_only=True)`` and the network is rebuilt from its
    stored spec; no pickled code is executed.

    By default the model takes what every shipped form takes: raw ``uint8`` pixels
    ``N×C×H×W`` (0..255), normalised inside with the mean/std of the input contract stored in
    ``model.pt`` (a :class:`~switchprune.serving.ServedModel`: its ``.net`` is the task
    network, its ``.contract`` the shape, mean/std and class names). Any other dtype is
    refused with a ``TypeError``, another shape with a ``ValueError``. With ``raw=False`` it is
    the bare task network, which takes normalised float32 inputs (for fine-tuning).

    Args:
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a promoted prefix
            ``s3://bucket[/prefix]/NAME`` (its ``current.json`` names the version), or a local
            folder holding ``model.pt`` (or that file).
        tracking_uri: MLflow tracking URI for ``models:/`` URIs.
        raw: ``True``: raw ``uint8`` images in; ``False``: the task network itself.

    Raises:
        ArtifactError: For a folder without a readable model, or (``raw=True``) a model with
            no input contract: neither in ``model.pt`` (files written before it was stored
            there) nor in a ``meta.json`` beside it.
        switchprune.registry.RegistryError: For an unknown model, alias or version.
        switchprune.storage.StorageError: For an unreachable or incomplete S3 prefix.
    """
    text = str(uri)
    if text.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="switchprune-pull-") as tmp:
            pull(text, Path(tmp) / "model", tracking_uri=tracking_uri)
            return _load(Path(tmp) / "model" / COMPACT_FILE, raw=raw)
    if text.startswith("s3://"):
        from switchprune import promotion, storage

        match = re.match(r"^(s3://.+)/([^/]+)/?$", text)
        if match is None:
            raise storage.StorageError(f"{text}: expected s3://bucket[/prefix]/MODEL_NAME")
        with tempfile.TemporaryDirectory(prefix="switchprune-pull-") as tmp:
            promotion.download_promoted(
                storage.make_client(), match.group(1), match.group(2), Path(tmp) / "model"
            )
            return _load(Path(tmp) / "model" / COMPACT_FILE, raw=raw)
    path = Path(text)
    if path.is_dir():
        path = path / COMPACT_FILE
    if not path.is_file():
        raise ArtifactError(f"{text}: no model found (expected {COMPACT_FILE} in a folder)")
    return _load(path, raw=raw)


def _load(path: Path, *, raw: bool) -> ServedModel | TaskNet:
    """The model of ``path``: behind its input contract when ``raw``, else the bare network."""
    net, blob = load_model_file(path)
    if not raw:
        return net
    try:
        contract = contract_of(blob, path)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from exc
    if contract is None:
        contract = _contract_from_meta(path, net)
    try:
        return ServedModel(net, contract).eval()
    except ValueError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc


def _contract_from_meta(path: Path, net: TaskNet) -> InputContract:
    """The contract of a model file that holds none, from the ``meta.json`` shipped with it.

    Files written before the contract was stored in them travel with the prepared data's
    ``meta.json`` (registered and promoted versions, pulled folders), which holds the same
    statistics; without it the normalisation is unknown and the model is refused.
    """
    meta_path = path.parent / META_FILE
    if not meta_path.is_file():
        raise ArtifactError(
            f"{path}: no input contract ({INPUT_KEY!r}: dtype, shape, mean/std, classes) and "
            f"no {META_FILE} beside it, so its normalisation is unknown: re-run train and "
            "prune, or load the bare network with raw=False (it takes normalised inputs)"
        )
    try:
        meta = load_meta(path.parent)
    except DataError as exc:
        raise ArtifactError(f"{path}: no input contract, and {exc}") from exc
    if tuple(meta.in_shape) != tuple(net.spec.in_shape) or meta.num_classes != (
        net.spec.num_classes
    ):
        raise ArtifactError(
            f"{path}: no input contract, and {meta_path} describes other data "
            f"({meta.in_shape}, {meta.num_classes} classes) than the network's"
        )
    return InputContract.from_meta(meta)
