"""Component ``promote``: gate the registered version, copy it to S3, move ``champion``."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    promote: dict,
    registration: Input[Artifact],
    promotion: Output[Artifact],
    metrics: Output[Metrics],
) -> None:
    """Promote the registered version if it passes the gate.

    MLflow and S3 come from ``MLFLOW_TRACKING_URI``, ``SWITCHPRUNE_S3_ENDPOINT`` and
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (Kubernetes secrets).

    Args:
        promote: The ``promote`` section of ``params.yaml``.
        registration: Output of ``register``.
        promotion: Output: ``promoted``, ``reason``, ``version``, ``s3_uri``, ``changed``,
            ``champion_before`` (``promote.json``).
        metrics: Output: the promoted version.
    """
    from pathlib import Path

    from switchprune.config import PromoteConfig, from_struct
    from switchprune.io import write_json
    from switchprune.stages import promote as stage

    out = stage.run(from_struct(PromoteConfig, promote), register_path=Path(registration.path))
    write_json(out, Path(promotion.path))
    for key, value in out.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(key, value)
