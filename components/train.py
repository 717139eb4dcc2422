"""Component ``train``: the task network with its switcher (and the baseline)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    data: dict,
    model: dict,
    train: dict,
    evaluate: dict,
    prepared: Input[Dataset],
    trained: Output[Model],
    history: Output[Artifact],
    metrics: Output[Metrics],
    arch_source: str = "",
    arch_sha256: str = "",
) -> None:
    """Train the switched task network and, with ``train.baseline``, the plain one.

    Args:
        data: The ``data`` section of ``params.yaml`` (loader, workers, augmentation).
        model: The ``model`` section of ``params.yaml``.
        train: The ``train`` section of ``params.yaml``.
        evaluate: The ``evaluate`` section: what a latency target's table is measured with.
        prepared: Output of ``preprocess``.
        trained: Output: ``switched.pt`` and ``baseline.pt``.
        history: Output: per-epoch records (``train_history.json``), for the model card.
        metrics: Output: validation accuracy, reached compression, time per epoch.
        arch_source: The text of the user's network file (``model.arch`` ``file.py:build``),
            which the image does not hold; empty for any other arch.
        arch_sha256: Its SHA-256, checked before the text runs.
    """
    import tempfile
    from pathlib import Path

    from switchprune.cli import configure_logging
    from switchprune.config import (
        DataConfig,
        EvaluateConfig,
        ModelConfig,
        TrainConfig,
        from_struct,
    )
    from switchprune.models import provide_source
    from switchprune.stages import train as stage

    if arch_source:
        provide_source(arch_source, arch_sha256, model.get("arch"))
    configure_logging()  # one INFO line per epoch in the task's log (no progress bar there)
    with tempfile.TemporaryDirectory(prefix="switchprune-checkpoints-") as checkpoint_dir:
        out = stage.run(
            from_struct(TrainConfig, train),
            model_cfg=from_struct(ModelConfig, model),
            data_cfg=from_struct(DataConfig, data),
            evaluate_cfg=from_struct(EvaluateConfig, evaluate),
            prepared_dir=Path(prepared.path),
            trained_dir=Path(trained.path),
            checkpoint_dir=Path(checkpoint_dir),
            progress=False,
            log_epochs=True,
            history_path=Path(history.path),
        )
    for key, value in out.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(key, value)
