"""Component ``train`` on several GPUs: launches a Kubeflow Trainer TrainJob and waits for it.

The pipeline uses it instead of ``components/train.py`` when ``kubeflow.train_nodes`` ×
``kubeflow.gpus_per_node`` is above 1; it takes the same inputs and gives the same outputs, so
the tasks after it cannot tell. What it does is :func:`components.trainjob.run`.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    data: dict,
    model: dict,
    train: dict,
    evaluate: dict,
    kubeflow: dict,
    prepared: Input[Dataset],
    trained: Output[Model],
    history: Output[Artifact],
    metrics: Output[Metrics],
    arch_source: str = "",
    arch_sha256: str = "",
) -> None:
    """Train on ``train_nodes`` × ``gpus_per_node`` GPUs as a TrainJob; fail if it fails.

    S3 (the TrainJob's inputs and outputs travel there) comes from ``SWITCHPRUNE_S3_ENDPOINT``
    and ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (the Kubernetes secret
    ``kubeflow.s3_secret``); the pod's service account must be allowed to create and read
    TrainJobs and read their pods' logs in its namespace.

    Args:
        data: The ``data`` section of ``params.yaml``.
        model: The ``model`` section of ``params.yaml``.
        train: The ``train`` section of ``params.yaml``.
        evaluate: The ``evaluate`` section: what a latency target's table is measured with.
        kubeflow: The ``kubeflow`` section: nodes, GPUs, placement, S3 folder, deadline.
        prepared: Output of ``preprocess``.
        trained: Output: ``switched.pt`` and ``baseline.pt``.
        history: Output: per-epoch records (``train_history.json``), for the model card.
        metrics: Output: validation accuracy, reached compression, time per epoch.
        arch_source: The text of the user's network file (``model.arch`` ``file.py:build``),
            which the image does not hold; empty for any other arch.
        arch_sha256: Its SHA-256, checked before the text is sent to the nodes.
    """
    from pathlib import Path

    from components import trainjob
    from switchprune.cli import configure_logging
    from switchprune.config import KubeflowConfig, from_struct, sections_from_struct

    configure_logging()  # the launcher's INFO lines in the task's log, beside node 0's
    out = trainjob.run(
        sections_from_struct({"data": data, "model": model, "train": train, "evaluate": evaluate}),
        from_struct(KubeflowConfig, kubeflow),
        prepared_dir=Path(prepared.path),
        trained_dir=Path(trained.path),
        history_path=Path(history.path),
        arch_source=arch_source,
        arch_sha256=arch_sha256,
    )
    for key, value in out.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(key, value)
