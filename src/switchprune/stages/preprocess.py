"""``preprocess``: turn the configured raw dataset into train/val/test splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from switchprune.config import DataConfig
from switchprune.data import DataError, prepare_data, source_dir


def run(
    cfg: DataConfig,
    *,
    raw_dir: Path,
    prepared_dir: Path,
    dvc_remote: str | None = None,
    data_md5: str | None = None,
    s3_client: Any = None,
) -> dict[str, float]:
    """Prepare the dataset, optionally first materialising an exact version from a DVC remote.

    With ``data_md5``, the raw data of ``cfg.dataset`` is fetched by its hash from ``dvc_remote``
    instead of read locally: this is how a cluster run trains on the same bytes as a local run.

    Args:
        cfg: The ``data`` section.
        raw_dir: Where raw data lives (downloaded there when absent and allowed).
        prepared_dir: Output directory of the splits and ``meta.json``: replaced whole once
            everything is written, left as it was when anything fails.
        dvc_remote: A DVC remote on S3 (``s3://bucket/prefix``).
        data_md5: The DVC hash of the raw data (from ``data/raw/<name>.dvc``).
        s3_client: A boto3 S3 client for the remote (default: the configured endpoint).

    Returns:
        Sample counts per split and the class count.

    Raises:
        DataError: If the data is unusable, or its hash is not the requested one.
    """
    if data_md5:
        from switchprune import dvcfiles, storage

        if not dvc_remote:
            raise DataError("data_md5 was given without the DVC remote to fetch it from")
        client = s3_client if s3_client is not None else storage.make_client()
        dvcfiles.download_version(client, dvc_remote, data_md5, source_dir(cfg, raw_dir))
    # The hash is checked before the new splits replace the old ones.
    metrics = prepare_data(
        cfg, raw_dir=raw_dir, out_dir=prepared_dir, expected_md5=data_md5 or None
    )
    return {k: float(v) for k, v in metrics.items()}
