"""Component ``preprocess``: the exact raw data version from the DVC remote, split for training."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess(
    data: dict,
    dvc_remote: str,
    data_md5: str,
    prepared: Output[Dataset],
    metrics: Output[Metrics],
) -> None:
    """Fetch the raw data named by its DVC hash and write the train/val/test splits.

    Args:
        data: The ``data`` section of ``params.yaml``.
        dvc_remote: The DVC remote on S3 (``url`` of the default remote in ``.dvc/config``).
        data_md5: The DVC hash of the raw data (from ``data/raw/<dataset>.dvc``); empty to
            prepare the dataset from its public source instead.
        prepared: Output: the splits and ``meta.json``.
        metrics: Output: sample counts per split and the class count.
    """
    import tempfile
    from pathlib import Path

    from switchprune.config import DataConfig, from_struct
    from switchprune.stages import preprocess as stage

    with tempfile.TemporaryDirectory(prefix="switchprune-raw-") as raw_dir:
        out = stage.run(
            from_struct(DataConfig, data),
            raw_dir=Path(raw_dir),
            prepared_dir=Path(prepared.path),
            dvc_remote=dvc_remote,
            data_md5=data_md5,
        )
    for key, value in out.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(key, value)
