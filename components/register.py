"""Component ``register``: log the run and register the compacted model in MLflow."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    register: dict,
    data: dict,
    model: dict,
    train: dict,
    prune: dict,
    evaluate: dict,
    promote: dict,
    git_commit: str,
    prepared: Input[Dataset],
    compact: Input[Model],
    report: Input[Artifact],
    history: Input[Artifact],
    registration: Output[Artifact],
    metrics: Output[Metrics],
) -> None:
    """Log every parameter section and the report, register the model, set its alias.

    The tracking server comes from ``MLFLOW_TRACKING_URI`` (a Kubernetes secret).

    Args:
        register: The ``register`` section of ``params.yaml``.
        data: The ``data`` section (logged).
        model: The ``model`` section (logged).
        train: The ``train`` section (logged).
        prune: The ``prune`` section (logged).
        evaluate: The ``evaluate`` section (logged).
        promote: The ``promote`` section (logged).
        git_commit: The commit the pipeline was compiled from (tag ``git_commit``).
        prepared: Output of ``preprocess`` (its ``meta.json`` travels with the model).
        compact: Output of ``prune``.
        report: Output of ``evaluate``.
        history: Per-epoch records of ``train`` (stepped metrics and curves of the model card).
        registration: Output: model name, version, run id, model URI (``register.json``).
        metrics: Output: the registered version.
    """
    from pathlib import Path

    from switchprune.config import RegisterConfig, from_struct, sections_from_struct
    from switchprune.io import write_json
    from switchprune.stages import register as stage

    out = stage.run(
        from_struct(RegisterConfig, register),
        prepared_dir=Path(prepared.path),
        model_dir=Path(compact.path),
        evaluate_path=Path(report.path),
        history_path=Path(history.path),
        params=sections_from_struct(
            dict(
                data=data, model=model, train=train, prune=prune, evaluate=evaluate, promote=promote
            )
        ),
        git_commit=git_commit,
    )
    write_json(out, Path(registration.path))
    for key, value in out.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(key, value)
