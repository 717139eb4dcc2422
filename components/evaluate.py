"""Component ``evaluate``: accuracy, size, MACs and latency of the unpruned and compacted nets."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    evaluate: dict,
    data: dict,
    prepared: Input[Dataset],
    trained: Input[Model],
    compact: Input[Model],
    report: Output[Artifact],
    metrics: Output[Metrics],
    arch_source: str = "",
    arch_sha256: str = "",
) -> None:
    """Measure the models on the test split.

    Args:
        evaluate: The ``evaluate`` section of ``params.yaml``.
        data: The ``data`` section of ``params.yaml`` (whether the test split is streamed).
        prepared: Output of ``preprocess``.
        trained: Output of ``train``.
        compact: Output of ``prune``.
        report: Output: the whole evaluation report as JSON (``evaluate.json``).
        metrics: Output: the report's numbers.
        arch_source: The text of the user's network file (``model.arch`` ``file.py:build``),
            which the image does not hold; empty for any other arch.
        arch_sha256: Its SHA-256, checked before the text runs.
    """
    from pathlib import Path

    from switchprune.config import DataConfig, EvaluateConfig, from_struct
    from switchprune.io import write_json
    from switchprune.models import provide_source
    from switchprune.stages import evaluate as stage

    if arch_source:
        provide_source(arch_source, arch_sha256)
    out = stage.run(
        from_struct(EvaluateConfig, evaluate),
        prepared_dir=Path(prepared.path),
        trained_dir=Path(trained.path),
        model_dir=Path(compact.path),
        data_cfg=from_struct(DataConfig, data),
    )
    write_json(out, Path(report.path))
    for key, value in out.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(key, value)
