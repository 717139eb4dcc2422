"""Kubeflow Pipelines v2 components: one lightweight component per stage, named like the stage.

Each component is a thin wrapper over ``switchprune.stages.<verb>.run``: it turns artifact paths
into ``Path``s, builds the stage's typed config from a ``params.yaml`` section passed as a
``dict`` parameter, calls ``run`` and logs the returned numbers as KFP metrics. The image they
run in is :data:`components.image.IMAGE`.

Above one GPU in all, the pipeline's ``train`` task is :mod:`components.train_launcher`
instead: same name, inputs and outputs, but it trains on a Kubeflow Trainer TrainJob through
:mod:`components.trainjob`, which the image holds.
"""
