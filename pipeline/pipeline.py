"""The Kubeflow pipeline: the stages of ``dvc.yaml`` and the two release steps, wired.

No logic lives here.

The ``kubeflow`` section of ``params.yaml`` shapes the compiled YAML (resources, GPU placement,
secrets, retries). Every other section becomes a ``dict`` pipeline parameter whose default is
that section as validated from ``params.yaml`` at compile time, so a run can override any
section without recompiling and no field list is written twice.

With more than one GPU in all (``train_nodes`` × ``gpus_per_node``), the ``train`` task is the
launcher of a Kubeflow Trainer TrainJob (``components/train_launcher.py``), which gets the
``kubeflow`` section as a constant; otherwise it trains in its own pod on at most one GPU.
"""

from collections.abc import Callable, Mapping
from typing import Any

from components.evaluate import evaluate as evaluate_op
from components.preprocess import preprocess as preprocess_op
from components.promote import promote as promote_op
from components.prune import prune as prune_op
from components.register import register as register_op
from components.train import train as train_op
from components.train_launcher import train as train_launcher_op
from kfp import dsl, kubernetes

from switchprune.config import ConfigError, KubeflowConfig, from_dict, to_dict

PIPELINE_NAME = "switchprune"
# The params.yaml sections passed to the tasks as dict parameters (kubeflow is compile-time).
SECTIONS = ("data", "model", "train", "prune", "evaluate", "register", "promote")
S3_ENV = ("SWITCHPRUNE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_ENV = ("MLFLOW_TRACKING_URI",)
MLFLOW_OPTIONAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def section_parameter(cfg: Any) -> dict[str, Any]:
    """A validated config as the value of a ``dict`` pipeline parameter.

    KFP parameters cannot carry ``null``: such keys are left out, and the stage's
    :func:`~switchprune.config.from_dict` gives them their default, which must then be ``None``.

    Raises:
        ConfigError: If leaving out a ``null`` key would change the config.
    """
    value = {k: v for k, v in to_dict(cfg).items() if v is not None}
    if from_dict(type(cfg), value) != cfg:
        raise ConfigError(f"{type(cfg).__name__}: a null value that is not the default")
    return value


def _resources(task: dsl.PipelineTask, kube: KubeflowConfig, *, train: bool = False) -> None:
    """CPU and memory requests and limits of one task."""
    task.set_cpu_request(kube.cpu_request).set_memory_request(kube.memory_request)
    task.set_cpu_limit(kube.train_cpu_limit if train else kube.cpu_limit)
    task.set_memory_limit(kube.train_memory_limit if train else kube.memory_limit)


def _s3(task: dsl.PipelineTask, kube: KubeflowConfig) -> None:
    """The S3 endpoint and credentials, from the S3 secret, as environment variables."""
    kubernetes.use_secret_as_env(task, kube.s3_secret, {key: key for key in S3_ENV})


def _mlflow(task: dsl.PipelineTask, kube: KubeflowConfig) -> None:
    """The MLflow server (and its optional login) from the MLflow secret.

    MLflow's own S3 client also gets the endpoint of the S3 secret, for tracking servers that
    let clients write artifacts to S3 directly instead of proxying them.
    """
    kubernetes.use_secret_as_env(task, kube.mlflow_secret, {key: key for key in MLFLOW_ENV})
    kubernetes.use_secret_as_env(
        task, kube.mlflow_secret, {key: key for key in MLFLOW_OPTIONAL_ENV}, optional=True
    )
    kubernetes.use_secret_as_env(
        task, kube.s3_secret, {"SWITCHPRUNE_S3_ENDPOINT": "MLFLOW_S3_ENDPOINT_URL"}
    )


def _gpu(task: dsl.PipelineTask, kube: KubeflowConfig) -> None:
    """Accelerator, node selector and tolerations of the single-pod ``train`` task."""
    if kube.gpus_per_node > 0:
        task.set_accelerator_type(kube.gpu_type).set_accelerator_limit(kube.gpus_per_node)
    for key, value in kube.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in kube.tolerations:
        kubernetes.add_toleration(task, **toleration)


def build_pipeline(
    params: Mapping[str, Any],
    *,
    dvc_remote: str,
    data_md5: str,
    git_commit: str = "unknown",
    arch_source: str = "",
    arch_sha256: str = "",
) -> Callable[..., Any]:
    """The pipeline function for validated parameters.

    Args:
        params: Validated configs by section, as returned by
            :func:`switchprune.config.load_params` (needs ``kubeflow`` and every stage section).
        dvc_remote: Default of the ``dvc_remote`` parameter: the DVC remote holding the raw data.
        data_md5: Default of the ``data_md5`` parameter: the DVC hash of the raw data version.
        git_commit: Default of the ``git_commit`` parameter, tagged on the MLflow run.
        arch_source: The text of the user's network file (``model.arch`` ``file.py:build``),
            given to the tasks that build the network; empty for any other arch.
        arch_sha256: Its SHA-256, checked in the pod before the text runs.

    Returns:
        The ``@dsl.pipeline`` function, to compile or to run with ``kfp.local``.
    """
    kube: KubeflowConfig = params["kubeflow"]
    defaults = {name: section_parameter(params[name]) for name in SECTIONS}

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Train a task network with a switcher network, compact it, evaluate it, "
        "register it in MLflow and promote it to S3 (the stages of dvc.yaml).",
    )
    def switchprune(
        data: dict = defaults["data"],
        model: dict = defaults["model"],
        train: dict = defaults["train"],
        prune: dict = defaults["prune"],
        evaluate: dict = defaults["evaluate"],
        register: dict = defaults["register"],
        promote: dict = defaults["promote"],
        dvc_remote: str = dvc_remote,
        data_md5: str = data_md5,
        git_commit: str = git_commit,
    ) -> None:
        sections = {
            "data": data,
            "model": model,
            "train": train,
            "prune": prune,
            "evaluate": evaluate,
            "register": register,
            "promote": promote,
        }
        network = {"arch_source": arch_source, "arch_sha256": arch_sha256}
        stages = _stage_tasks(
            kube, sections, dvc_remote=dvc_remote, data_md5=data_md5, network=network
        )
        _release_tasks(kube, sections, stages, git_commit=git_commit)

    return switchprune


def _stage_tasks(
    kube: KubeflowConfig,
    sections: Mapping[str, Any],
    *,
    dvc_remote: Any,
    data_md5: Any,
    network: Mapping[str, str],
) -> dict[str, dsl.PipelineTask]:
    """The tasks of the ``dvc.yaml`` stages, by stage name: cached, their outputs are files.

    Args:
        kube: The ``kubeflow`` section.
        sections: The pipeline's section parameters, by section name.
        dvc_remote: The ``dvc_remote`` pipeline parameter.
        data_md5: The ``data_md5`` pipeline parameter.
        network: ``arch_source`` and ``arch_sha256``: the user's network file, as constant
            inputs of the tasks that build the network.
    """
    data = sections["data"]
    prepared = preprocess_op(data=data, dvc_remote=dvc_remote, data_md5=data_md5)
    prepared.set_caching_options(True).set_retry(kube.retries)
    _s3(prepared, kube)

    trained = _train_task(kube, sections, prepared.outputs["prepared"], network)

    compacted = prune_op(prune=sections["prune"], trained=trained.outputs["trained"], **network)
    compacted.set_caching_options(True)

    evaluated = evaluate_op(
        evaluate=sections["evaluate"],
        data=data,
        prepared=prepared.outputs["prepared"],
        trained=trained.outputs["trained"],
        compact=compacted.outputs["compact"],
        **network,
    )
    evaluated.set_caching_options(True)

    for task in (prepared, compacted, evaluated):
        _resources(task, kube)
    return {"preprocess": prepared, "train": trained, "prune": compacted, "evaluate": evaluated}


def _train_task(
    kube: KubeflowConfig, sections: Mapping[str, Any], prepared: Any, network: Mapping[str, str]
) -> dsl.PipelineTask:
    """``train``: in its own pod, or above one GPU in all the launcher of a TrainJob.

    The launcher needs no GPU, node selector or large limits (the TrainJob's nodes get them),
    but S3: the job's data and models travel there.
    """
    inputs = {k: sections[k] for k in ("data", "model", "train", "evaluate")}
    if kube.train_gpus > 1:
        task = train_launcher_op(
            **inputs, kubeflow=section_parameter(kube), prepared=prepared, **network
        )
        task.set_caching_options(True)
        _s3(task, kube)
        _resources(task, kube)
        return task
    task = train_op(**inputs, prepared=prepared, **network)
    task.set_caching_options(True)
    _gpu(task, kube)
    _resources(task, kube, train=True)
    return task


def _release_tasks(
    kube: KubeflowConfig,
    sections: Mapping[str, Any],
    stages: Mapping[str, dsl.PipelineTask],
    *,
    git_commit: Any,
) -> None:
    """``register`` and ``promote`` after the stages: never cached, they change services.

    Args:
        kube: The ``kubeflow`` section.
        sections: The pipeline's section parameters, by section name (``register`` takes all).
        stages: The tasks of :func:`_stage_tasks`.
        git_commit: The ``git_commit`` pipeline parameter.
    """
    registered = register_op(
        **sections,
        git_commit=git_commit,
        prepared=stages["preprocess"].outputs["prepared"],
        compact=stages["prune"].outputs["compact"],
        report=stages["evaluate"].outputs["report"],
        history=stages["train"].outputs["history"],
    )
    registered.set_caching_options(False).set_retry(kube.retries)

    promoted = promote_op(
        promote=sections["promote"], registration=registered.outputs["registration"]
    )
    promoted.set_caching_options(False).set_retry(kube.retries)

    for task in (registered, promoted):
        _s3(task, kube)
        _mlflow(task, kube)
        _resources(task, kube)


__all__ = ["PIPELINE_NAME", "SECTIONS", "build_pipeline", "section_parameter"]
