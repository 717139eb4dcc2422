"""Training on several GPUs and nodes: the ``train`` task launches a Kubeflow Trainer TrainJob.

With more than one GPU in all (``kubeflow.train_nodes`` × ``kubeflow.gpus_per_node``), the
pipeline's ``train`` task is a light launcher (``components/train_launcher.py``) that calls
:func:`run`:

1. It uploads the job's inputs to ``<kubeflow.trainjob_s3_uri>/<job>/``: ``inputs/params.yaml``
   (the ``data``, ``model``, ``train`` and ``evaluate`` sections), ``inputs/network.py`` (a
   network of the user's own file) and ``prepared/`` (the output of ``preprocess``), each verified.
2. It creates a ``TrainJob`` on the ``torch-distributed`` runtime with the Kubeflow SDK: every
   node runs the project image's ``torchrun … switchprune train`` (``torchrun`` reads the node
   count, rank and rendezvous from the ``PET_*`` variables the runtime sets), which reads its
   inputs from S3 and, on rank 0, uploads its outputs to ``<job>/outputs/``. The nodes get the
   GPUs, the node selector, the tolerations and the S3 secret as environment variables.
3. It copies node 0's log into the task's log, waits for the job to complete or fail (a failure
   is one error naming the job), downloads the outputs into the task's output artifacts and
   removes the job's S3 folder.

Plain functions, no ``kfp``: the launcher component imports this module in its pod (the image
holds ``components/``), and the tests drive it against a stand-in Kubernetes API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubeflow.common.types import KubernetesBackendConfig
from kubeflow.trainer import CustomTrainerContainer, TrainerClient
from kubeflow.trainer.constants import constants
from kubeflow.trainer.options import (
    ActiveDeadlineSeconds,
    ContainerPatch,
    JobSetSpecPatch,
    JobSetTemplatePatch,
    JobSpecPatch,
    JobTemplatePatch,
    Labels,
    Name,
    PodSpecPatch,
    PodTemplatePatch,
    ReplicatedJobPatch,
    RuntimePatch,
    TrainerCommand,
    TrainingRuntimeSpecPatch,
)
from kubeflow.trainer.types.types import TrainJob

from components.image import IMAGE
from switchprune import storage, transfer
from switchprune.cli import OUTPUT_HISTORY, OUTPUT_METRICS, OUTPUT_TRAINED
from switchprune.config import KubeflowConfig
from switchprune.errors import ServiceFailure

# Shown by the component's log handler, which shows the package's loggers.
logger = logging.getLogger("switchprune.trainjob")

RUNTIME = "torch-distributed"
NODE = constants.NODE  # the runtime's trainer: its replicated job and its container
LABELS = {"app.kubernetes.io/part-of": "switchprune"}
# The S3 secret's keys, set as variables of the same names (as for the pipeline's tasks).
S3_ENV = ("SWITCHPRUNE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
_DONE = {constants.TRAINJOB_COMPLETE, constants.TRAINJOB_FAILED}
_STARTED = {"Running", constants.POD_SUCCEEDED, "Failed"}


class TrainJobError(ServiceFailure, RuntimeError):
    """The TrainJob could not be created, failed or did not finish in time."""


@dataclass(frozen=True)
class JobFiles:
    """Where one TrainJob's inputs and outputs are on S3.

    Attributes:
        root: ``s3://bucket/prefix/<job name>``: the job's folder, removed after a success.
    """

    root: str

    @property
    def params(self) -> str:
        """The ``data``, ``model``, ``train`` and ``evaluate`` sections, as a parameter file."""
        return f"{self.root}/inputs/params.yaml"

    @property
    def network(self) -> str:
        """The user's network file, for a ``path/to/file.py:build`` arch."""
        return f"{self.root}/inputs/network.py"

    @property
    def prepared(self) -> str:
        """The prepared data."""
        return f"{self.root}/prepared"

    @property
    def checkpoints(self) -> str:
        """Rank 0's per-epoch checkpoints: nodes restarted on other machines resume from them."""
        return f"{self.root}/checkpoints"

    @property
    def outputs(self) -> str:
        """What rank 0 uploads: the models, the history and the metrics."""
        return f"{self.root}/outputs"


def job_name() -> str:
    """A fresh TrainJob name: a DNS label short enough for the pods named after it."""
    return f"switchprune-{secrets.token_hex(4)}"


def job_files(kube: KubeflowConfig, name: str) -> JobFiles:
    """The S3 folder of job ``name`` under ``kube.trainjob_s3_uri``."""
    return JobFiles(root=storage.parse_s3_uri(kube.trainjob_s3_uri).uri(name))


def train_command(files: JobFiles, *, network: bool = False) -> list[str]:
    """The command of every node: ``torchrun`` starting ``switchprune train`` on each GPU.

    Args:
        files: The job's S3 folder.
        network: Whether the model is built from the user's file (``inputs/network.py``).
    """
    command = ["torchrun", "-m", "switchprune", "train", "-q", "--log-epochs"]
    command += ["--params", files.params, "--prepared-uri", files.prepared]
    command += ["--checkpoint-uri", files.checkpoints, "--output-uri", files.outputs]
    if network:
        command += ["--network-uri", files.network]
    return command


def trainer(kube: KubeflowConfig) -> CustomTrainerContainer:
    """The nodes: the project image, ``train_nodes`` of them, each with its GPUs, CPUs, memory."""
    resources: dict[str, Any] = {"cpu": kube.train_cpu_limit, "memory": kube.train_memory_limit}
    if kube.gpus_per_node:
        resources[kube.gpu_type] = str(kube.gpus_per_node)
    return CustomTrainerContainer(
        image=IMAGE, num_nodes=kube.train_nodes, resources_per_node=resources
    )


def options(kube: KubeflowConfig, name: str, command: list[str]) -> list[Any]:
    """The TrainJob's name, labels, command, deadline and pod placement and secrets."""
    return [
        Name(name),
        Labels(dict(LABELS)),
        TrainerCommand(command),
        ActiveDeadlineSeconds(kube.trainjob_timeout),
        node_patch(kube),
    ]


def node_patch(kube: KubeflowConfig) -> RuntimePatch:
    """The node pods' node selector, tolerations, and the S3 secret as their environment."""
    env = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": kube.s3_secret, "key": key}}}
        for key in S3_ENV
    ]
    pod = PodSpecPatch(
        node_selector=dict(kube.node_selector) or None,
        tolerations=[dict(t) for t in kube.tolerations] or None,
        containers=[ContainerPatch(name=NODE, env=env)],
    )
    job = JobTemplatePatch(spec=JobSpecPatch(template=PodTemplatePatch(spec=pod)))
    replicated = [ReplicatedJobPatch(name=NODE, template=job)]
    template = JobSetTemplatePatch(spec=JobSetSpecPatch(replicated_jobs=replicated))
    return RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(template=template))


def launch(client: TrainerClient, kube: KubeflowConfig, name: str, command: list[str]) -> str:
    """Create the TrainJob ``name`` running ``command``; returns its name.

    Raises:
        TrainJobError: If the cluster refused it (no runtime, no permission, ...).
    """
    try:
        return client.train(
            runtime=RUNTIME, trainer=trainer(kube), options=options(kube, name, command)
        )
    except (RuntimeError, TimeoutError, ValueError) as exc:
        raise TrainJobError(f"cannot create TrainJob {name}: {_why(exc)}") from exc


def follow(
    client: TrainerClient,
    name: str,
    *,
    timeout: int,
    poll: int = 10,
    echo: Callable[[str], None] = print,
) -> TrainJob:
    """Wait for node 0 to start, pass its log to ``echo``, then wait for the job to end.

    Args:
        client: The client the job was created with.
        name: The TrainJob.
        timeout: Seconds to wait in all.
        poll: Seconds between two looks at the job.
        echo: Called with each line of node 0's log, as it is written.

    Returns:
        The job, ``Complete`` or ``Failed``.

    Raises:
        TrainJobError: If it did not end within ``timeout`` or cannot be read.
    """
    deadline = time.monotonic() + timeout
    try:
        while True:
            job = client.get_job(name)
            node0 = [s for s in job.steps if s.name == f"{NODE}-0" and s.status in _STARTED]
            if node0 or job.status in _DONE:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(name)
            time.sleep(poll)
        try:
            for line in client.get_job_logs(name, follow=True):
                echo(line)
        except RuntimeError as exc:  # a log that cannot be read does not fail the training
            logger.warning("cannot read the log of TrainJob %s: %s", name, _why(exc))
        remaining = max(int(deadline - time.monotonic()), poll + 1)
        return client.wait_for_job_status(
            name, status=set(_DONE), timeout=remaining, polling_interval=poll
        )
    except TimeoutError as exc:
        raise TrainJobError(f"TrainJob {name} did not finish within {timeout} s") from exc
    except RuntimeError as exc:
        raise TrainJobError(f"cannot follow TrainJob {name}: {_why(exc)}") from exc


def upload_inputs(
    client: Any,
    files: JobFiles,
    sections: Mapping[str, Any],
    prepared_dir: Path,
    arch_source: str = "",
) -> None:
    """Put the parameter sections, the user's network file (if any) and the data on S3."""
    with tempfile.TemporaryDirectory(prefix="switchprune-trainjob-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(dict(sections), sort_keys=False))
        transfer.upload_file(client, files.params, params)
        if arch_source:
            network = Path(tmp) / "network.py"
            network.write_bytes(arch_source.encode("utf-8"))
            transfer.upload_file(client, files.network, network)
    transfer.upload_dir(client, files.prepared, prepared_dir)


def download_outputs(
    client: Any, files: JobFiles, *, trained_dir: Path, history_path: Path
) -> dict[str, float]:
    """Copy what rank 0 uploaded into the task's outputs; returns the training metrics."""
    with tempfile.TemporaryDirectory(prefix="switchprune-trainjob-") as tmp:
        outputs = Path(tmp)
        transfer.download_dir(client, files.outputs, outputs)
        Path(trained_dir).mkdir(parents=True, exist_ok=True)
        for path in sorted((outputs / OUTPUT_TRAINED).iterdir()):
            shutil.copyfile(path, Path(trained_dir) / path.name)
        Path(history_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(outputs / OUTPUT_HISTORY, history_path)
        metrics = json.loads((outputs / OUTPUT_METRICS).read_text())
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def run(
    sections: Mapping[str, Any],
    kube: KubeflowConfig,
    *,
    prepared_dir: Path,
    trained_dir: Path,
    history_path: Path,
    arch_source: str = "",
    arch_sha256: str = "",
    backend: KubernetesBackendConfig | None = None,
    poll: int = 10,
    echo: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train as a TrainJob: upload the inputs, launch, follow, download the outputs.

    S3 is the one of the task's environment (``SWITCHPRUNE_S3_ENDPOINT`` and the keys, from
    ``kube.s3_secret``), which the nodes get from the same secret.

    Args:
        sections: The validated ``data``, ``model``, ``train`` and ``evaluate`` sections, as
            mappings.
        kube: The ``kubeflow`` section: nodes, GPUs, placement, the S3 folder, the deadline.
        prepared_dir: Output of ``preprocess``.
        trained_dir: Where ``switched.pt`` and ``baseline.pt`` (and ``network.py``) go.
        history_path: Where the per-epoch records go.
        arch_source: The text of the user's network file; empty for any other arch.
        arch_sha256: Its SHA-256, checked before it is sent.
        backend: How to reach Kubernetes (default: the pod's own service account and
            namespace, or the local kube-config).
        poll: Seconds between two looks at the job.
        echo: Called with each line of node 0's log (default: printed into the task's log).

    Returns:
        The metrics of ``switchprune train`` (what the single-pod ``train`` task logs).

    Raises:
        TrainJobError: If the job cannot be created, fails or does not finish in time.
        StorageError: If S3 fails.
    """
    if arch_source and hashlib.sha256(arch_source.encode("utf-8")).hexdigest() != arch_sha256:
        raise TrainJobError("the network source does not match its recorded SHA-256")
    name = job_name()
    files = job_files(kube, name)
    s3 = storage.make_client()
    upload_inputs(s3, files, sections, prepared_dir, arch_source)
    client = TrainerClient(backend or KubernetesBackendConfig())
    command = train_command(files, network=bool(arch_source))
    launch(client, kube, name, command)
    where = getattr(client.backend, "namespace", "?")
    logger.info(
        "created TrainJob %s in %s: %d node(s) x %d %s",
        name,
        where,
        kube.train_nodes,
        kube.gpus_per_node,
        kube.gpu_type,
    )
    try:
        with _stopped_by_sigterm():
            job = follow(client, name, timeout=kube.trainjob_timeout, poll=poll, echo=echo)
    except (Stopped, KeyboardInterrupt) as exc:
        # Terminating the pipeline run stops this pod (SIGTERM): the job must not train on.
        _delete_job(client, s3, name, files)
        raise TrainJobError(
            f"stopped ({exc or type(exc).__name__}): TrainJob {name} and {files.root} deleted"
        ) from None
    if job.status != constants.TRAINJOB_COMPLETE:
        raise TrainJobError(
            f"TrainJob {name} failed in namespace {where} (its node-0 log is above; "
            f"kubectl -n {where} describe trainjob {name}); its inputs stay in {files.root}"
        )
    metrics = download_outputs(s3, files, trained_dir=trained_dir, history_path=history_path)
    transfer.delete_prefix(s3, files.root)
    logger.info("TrainJob %s completed; its outputs are the task's", name)
    return metrics


class Stopped(BaseException):
    """The launcher was asked to stop (SIGTERM): not an ``Exception``, so nothing swallows it."""


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Stopped` while the job is followed (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _delete_job(client: TrainerClient, s3: Any, name: str, files: JobFiles) -> None:
    """Delete the TrainJob (its pods go with it) and its S3 folder; report what failed."""
    try:
        client.delete_job(name)
        logger.info("deleted TrainJob %s", name)
    except Exception as exc:  # still remove the folder, and say why
        logger.error(
            "could not delete TrainJob %s (kubectl delete trainjob %s): %s", name, name, _why(exc)
        )
    try:
        transfer.delete_prefix(s3, files.root)
    except storage.StorageError as exc:
        logger.error("could not remove %s: %s", files.root, exc)


def _why(exc: BaseException) -> str:
    """The reason behind an SDK error: the Kubernetes API's answer when there was one."""
    from kubernetes.client.exceptions import ApiException

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ApiException):
            message = ""
            try:
                message = json.loads(seen.body or "{}").get("message", "")
            except (ValueError, AttributeError):
                pass
            return " ".join(f"HTTP {seen.status} {seen.reason} {message}".split())
        seen = seen.__cause__ or seen.__context__
    return " ".join(str(exc).split()) or type(exc).__name__
