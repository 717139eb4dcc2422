"""Kubeflow Pipelines v2 components: one lightweight component per stage, named like the stage.

Each component is a thin wrapper over ``switchprune.stages.<verb>.run``: it turns artifact paths
into ``Path``s, builds the stage's typed config from a ``params.yaml`` section passed as a
``dict`` parameter, calls ``run`` and logs the returned numbers as KFP metrics. The image they
run in is :data:`components.image.IMAGE`.
"""
