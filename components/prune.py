"""Component ``prune``: threshold the factors and compact the task network."""

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prune(
    prune: dict,
    trained: Input[Model],
    compact: Output[Model],
    metrics: Output[Metrics],
    arch_source: str = "",
    arch_sha256: str = "",
) -> None:
    """Remove the switched-off units and fold the surviving factors into the weights.

    Args:
        prune: The ``prune`` section of ``params.yaml``.
        trained: Output of ``train``.
        compact: Output: ``model.pt`` (spec, kept indices, weights) and ``widths.json``.
        metrics: Output: parameters and MACs before and after, and their ratios.
        arch_source: The text of the user's network file (``model.arch`` ``file.py:build``),
            which the image does not hold; empty for any other arch.
        arch_sha256: Its SHA-256, checked before the text runs.
    """
    from pathlib import Path

    from switchprune.config import PruneConfig, from_struct
    from switchprune.models import provide_source
    from switchprune.stages import prune as stage

    if arch_source:
        provide_source(arch_source, arch_sha256)
    out = stage.run(
        from_struct(PruneConfig, prune),
        trained_dir=Path(trained.path),
        model_dir=Path(compact.path),
    )
    for key, value in out.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(key, value)
