"""Training on several GPUs: the ``train`` task launches a Kubeflow Trainer TrainJob.

The Kubernetes API is a recording stand-in (``kube_support.FakeKubernetes``, a real HTTP server
the Kubeflow SDK talks to); S3 is a real ``rclone serve s3``. Checked here: the exact TrainJob
the SDK is asked to create, that one GPU in all compiles to today's single-pod task, that a
failed job fails the task with one line naming it while node 0's log is streamed, and the whole
hand-over: the launcher uploads the data, the job's command (run for real, one process) trains
from S3 and uploads its outputs, the launcher downloads them into the task's outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from components import trainjob
from components.image import IMAGE
from kfp_support import ROOT, USER_FILE, in_fresh_thread
from kube_support import CommandNode, FakeKubernetes, ScriptedNode
from kubeflow.trainer import LocalProcessBackendConfig, TrainerClient
from pipeline.compile import compile_pipeline
from pipeline.pipeline import S3_ENV, section_parameter
from pipeline.servers import S3Server

from switchprune import cli, storage, transfer
from switchprune.config import (
    DataConfig,
    KubeflowConfig,
    PruneConfig,
    load_params,
    sections_from_struct,
    to_dict,
)
from switchprune.io import HISTORY_FILE
from switchprune.stages import preprocess, prune

NAME = "switchprune-0a1b2c3d"
# Seconds between the launcher's looks at the job: the stand-in answers at once.
POLL = 0.2
BUCKET = "switchprune-trainjobs"
TINY = {
    "data": {"dataset": "digits"},
    "model": {"hidden": [32, 16]},
    "train": {"epochs": 2, "batch_size": 128, "snn_hidden": 8, "device": "cpu"},
}


# --- the TrainJob request ------------------------------------------------------------------------


def _secret_env(secret: str) -> list[dict[str, Any]]:
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"key": key, "name": secret}}}
        for key in ("SWITCHPRUNE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    ]


def _expected_body(
    nodes: int, gpus: str, node_selector: dict[str, str], tolerations: list[dict[str, str]]
) -> dict[str, Any]:
    root = f"s3://{BUCKET}/team-a/{NAME}"
    resources = {"cpu": "8", "memory": "16Gi", "nvidia.com/gpu": gpus}
    pod = {
        "containers": [{"env": _secret_env("ml-s3"), "name": "node"}],
        "nodeSelector": node_selector,
        "tolerations": tolerations,
    }
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"labels": {"app.kubernetes.io/part-of": "switchprune"}, "name": NAME},
        "spec": {
            "activeDeadlineSeconds": 7200,
            "runtimePatches": [
                {
                    "manager": "trainer.kubeflow.org/kubeflow-sdk",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {
                                        "name": "node",
                                        "template": {"spec": {"template": {"spec": pod}}},
                                    }
                                ]
                            }
                        }
                    },
                }
            ],
            "runtimeRef": {"kind": "ClusterTrainingRuntime", "name": "torch-distributed"},
            "trainer": {
                "command": [
                    "torchrun",
                    "-m",
                    "switchprune",
                    "train",
                    "-q",
                    "--log-epochs",
                    "--params",
                    f"{root}/inputs/params.yaml",
                    "--prepared-uri",
                    f"{root}/prepared",
                    "--checkpoint-uri",
                    f"{root}/checkpoints",
                    "--output-uri",
                    f"{root}/outputs",
                ],
                "image": IMAGE,
                "numNodes": nodes,
                "resourcesPerNode": {"limits": resources, "requests": resources},
            },
        },
    }


GPU_POOL = {"pool": "a100", "nvidia.com/gpu.present": "true"}
TOLERATIONS = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
]


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 4), (2, 8)], ids=["1x4", "2x8"])
def test_the_trainjob_request_is_exactly_the_configured_job(nodes: int, gpus: int) -> None:
    kube = KubeflowConfig(
        train_nodes=nodes,
        gpus_per_node=gpus,
        node_selector=GPU_POOL,
        tolerations=tuple(TOLERATIONS),
        s3_secret="ml-s3",
        trainjob_s3_uri=f"s3://{BUCKET}/team-a",
        trainjob_timeout=7200,
    )
    with FakeKubernetes(ScriptedNode([])) as cluster:
        client = TrainerClient(cluster.backend())
        command = trainjob.train_command(trainjob.job_files(kube, NAME))
        assert trainjob.launch(client, kube, NAME, command) == NAME
    assert cluster.created == [_expected_body(nodes, str(gpus), GPU_POOL, TOLERATIONS)]
    assert cluster.unexpected == []
    # The SDK looked the runtime up (namespaced first) before creating the job in the namespace.
    assert ("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs") in (
        cluster.requests
    )
    assert trainjob.S3_ENV == S3_ENV  # the nodes get the variables every task gets


def test_a_user_network_adds_its_file_to_the_command_and_placement_may_be_empty() -> None:
    kube = KubeflowConfig(train_nodes=2, gpus_per_node=1, node_selector={}, tolerations=())
    files = trainjob.job_files(kube, NAME)
    command = trainjob.train_command(files, network=True)
    assert command[-2:] == ["--network-uri", f"s3://{BUCKET}/{NAME}/inputs/network.py"]
    with FakeKubernetes(ScriptedNode([])) as cluster:
        trainjob.launch(TrainerClient(cluster.backend()), kube, NAME, command)
    (body,) = cluster.created
    pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod = pod["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert set(pod) == {"containers"}  # no empty node selector or tolerations sent
    assert body["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_refused_creation_is_one_line_with_the_api_answer() -> None:
    kube = KubeflowConfig(train_nodes=2, gpus_per_node=2)
    with FakeKubernetes(ScriptedNode([]), namespace="other") as cluster:
        backend = cluster.backend()
        backend.namespace = "team"  # a namespace the launcher may not create TrainJobs in
        with pytest.raises(trainjob.TrainJobError) as info:
            trainjob.launch(TrainerClient(backend), kube, NAME, ["true"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot create TrainJob {NAME}: HTTP 403 Forbidden")
    assert "forbidden in namespace team" in message


def test_sections_sent_to_the_job_are_the_validated_ones(tmp_path: Path) -> None:
    sections = sections_from_struct({"data": {}, "model": {}, "train": {"epochs": 3.0}})
    assert sections["train"]["epochs"] == 3 and isinstance(sections["train"]["epochs"], int)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(sections, sort_keys=False))
    loaded = load_params(params, ["data", "model", "train"])
    assert {k: to_dict(v) for k, v in loaded.items()} == sections


# --- the compiled pipeline -----------------------------------------------------------------------


def _compile(tmp_path: Path, **kubeflow: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["kubeflow"].update(kubeflow)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    compiled = in_fresh_thread(compile_pipeline, path, tmp_path / "p.yaml")
    spec, platform = yaml.safe_load_all(compiled.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (1, 0)], ids=["1x1", "1x0"])
def test_one_gpu_or_none_compiles_to_the_single_pod_task(
    tmp_path: Path, nodes: int, gpus: int
) -> None:
    spec, platform = _compile(tmp_path, train_nodes=nodes, gpus_per_node=gpus)
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    source = container["command"][-1]
    assert "stages import train as stage" in source and "trainjob" not in source
    assert "kubeflow" not in spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    if gpus:
        accelerator = container["resources"]["accelerator"]
        assert (accelerator["resourceType"], accelerator["resourceCount"]) == (
            "nvidia.com/gpu",
            "1",
        )
    else:
        assert "accelerator" not in container["resources"]
    assert container["resources"]["resourceCpuLimit"] == "8"  # train_cpu_limit
    assert "nodeSelector" in platform["exec-train"] and "secretAsEnv" not in platform["exec-train"]


def test_more_gpus_compile_to_a_launcher_with_s3_and_the_kubeflow_section(tmp_path: Path) -> None:
    spec, platform = _compile(tmp_path, train_nodes=2, gpus_per_node=8)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"preprocess", "train", "prune", "evaluate", "register", "promote"}
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert container["image"] == IMAGE
    assert "from components import trainjob" in container["command"][-1]
    # The launcher holds no GPU and no placement (its TrainJob's nodes do), but S3.
    assert "accelerator" not in container["resources"]
    assert container["resources"]["resourceCpuLimit"] == "2"  # cpu_limit, not train_cpu_limit
    assert set(platform["exec-train"]) == {"secretAsEnv"}
    (secret,) = platform["exec-train"]["secretAsEnv"]
    assert secret["secretName"] == "switchprune-s3"
    assert [p["envVar"] for p in secret["keyToEnv"]] == list(S3_ENV)
    constant = tasks["train"]["inputs"]["parameters"]["kubeflow"]["runtimeValue"]["constant"]
    kube = load_params(tmp_path / "params.yaml")["kubeflow"]
    assert constant == json.loads(json.dumps(section_parameter(kube)))
    assert constant["train_nodes"] == 2 and constant["gpus_per_node"] == 8
    # The stages after it read its outputs as they read the single-pod task's.
    assert tasks["prune"]["inputs"]["artifacts"]["trained"]["taskOutputArtifact"] == {
        "outputArtifactKey": "trained",
        "producerTask": "train",
    }


# --- the hand-over through S3 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    root = tmp_path_factory.mktemp("s3") / "buckets"
    with S3Server(root) as server:
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """The server's endpoint and keys in the environment, as the S3 secret puts them in a pod."""
    for key, value in s3.environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits, split as ``preprocess`` splits them (TINY's data section)."""
    out = tmp_path_factory.mktemp("prepared")
    preprocess.run(DataConfig(), raw_dir=out / "raw", prepared_dir=out / "prepared")
    return out / "prepared"


def _objects(server: S3Server, prefix: str) -> list[str]:
    client = storage.make_client(server.endpoint)
    return sorted(o["Key"] for o in storage.list_objects(client, BUCKET, prefix))


def _cluster_for(server: S3Server, node: Any) -> FakeKubernetes:
    secret = {k: server.environment[k] for k in S3_ENV}
    return FakeKubernetes(node, secrets={"switchprune-s3": secret})


def _run_tiny(
    cluster: FakeKubernetes, kube: KubeflowConfig, prepared: Path, tmp_path: Path, lines: list[str]
) -> dict[str, float]:
    """The launcher on TINY's sections against ``cluster``, its log lines into ``lines``."""
    return trainjob.run(
        sections_from_struct(TINY),
        kube,
        prepared_dir=prepared,
        trained_dir=tmp_path / "trained",
        history_path=tmp_path / "history.json",
        backend=cluster.backend(),
        poll=POLL,
        echo=lines.append,
    )


def test_a_failed_job_fails_the_task_in_one_line_after_streaming_its_log(
    s3_env: S3Server, prepared: Path, tmp_path: Path
) -> None:
    log = ["loading the prepared data", "INFO switchprune.training: train epoch 1/2", "boom"]
    lines: list[str] = []
    kube = KubeflowConfig(train_nodes=2, gpus_per_node=4)
    with _cluster_for(s3_env, ScriptedNode(log, returncode=1)) as cluster:
        with pytest.raises(trainjob.TrainJobError) as info:
            _run_tiny(cluster, kube, prepared, tmp_path, lines)
    ((name, job),) = cluster.jobs.items()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"TrainJob {name} failed in namespace team")
    assert f"kubectl -n team describe trainjob {name}" in message
    # Node 0's log was followed while it was written, every line of it.
    assert lines == log
    assert any("/log?container=node&follow=True" in path for _m, path in cluster.requests)
    assert job.gets >= 2  # the launcher waited for node 0 to start before following it
    # Nothing came back; the inputs stay for a look.
    assert not (tmp_path / "trained").exists()
    assert f"{name}/inputs/params.yaml" in _objects(s3_env, name)
    assert cluster.unexpected == []


@pytest.mark.parametrize("network", [False, True], ids=["mlp", "user-network"])
def test_the_job_trains_from_s3_and_the_launcher_gets_its_outputs(
    s3_env: S3Server, prepared: Path, tmp_path: Path, network: bool
) -> None:
    sections = json.loads(json.dumps(TINY))
    source = sha = ""
    if network:
        # A path the node does not have: its text travels through S3.
        sections["model"]["arch"] = "mynets/net.py:build"
        sections["train"].update(epochs=1, tnn_lr=0.05)
        source = USER_FILE.read_text()
        sha = hashlib.sha256(source.encode()).hexdigest()
    node = CommandNode(
        tmp_path / "node",  # an empty working folder, as the image's
        path=str(Path(sys.executable).parent),
        env={"OMP_NUM_THREADS": "1"},
    )
    lines: list[str] = []
    kube = KubeflowConfig(train_nodes=1, gpus_per_node=2)
    with _cluster_for(s3_env, node) as cluster:
        metrics = trainjob.run(
            sections_from_struct(sections),
            kube,
            prepared_dir=prepared,
            trained_dir=tmp_path / "trained",
            history_path=tmp_path / "history" / HISTORY_FILE,
            arch_source=source,
            arch_sha256=sha,
            backend=cluster.backend(),
            poll=POLL,
            echo=lines.append,
        )
    ((name, job),) = cluster.jobs.items()
    assert job.run.returncode == 0, "\n".join(lines)
    command = cluster.created[0]["spec"]["trainer"]["command"]
    assert ("--network-uri" in command) is network
    # The node's log was the task's: one line per epoch of both runs.
    epochs = sections["train"]["epochs"]
    assert sum(" train epoch " in line for line in lines) == epochs, lines
    assert sum(" baseline epoch " in line for line in lines) == epochs, lines
    # The outputs are the task's outputs, the same a single-pod task writes.
    trained = {p.name for p in (tmp_path / "trained").iterdir()}
    assert trained == ({"switched.pt", "baseline.pt"} | ({"network.py"} if network else set()))
    history = json.loads((tmp_path / "history" / HISTORY_FILE).read_text())
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["epochs"] == epochs
    assert history[-1]["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    # The job's S3 folder is gone once its outputs are back.
    assert _objects(s3_env, name) == []
    if not network:
        pruned = prune.run(
            PruneConfig(), trained_dir=tmp_path / "trained", model_dir=tmp_path / "m"
        )
        assert pruned["params_after"] < pruned["params_before"]


# --- the command a node runs ---------------------------------------------------------------------


def _call(argv: list[str]) -> tuple[int, str]:
    """``switchprune ARGV`` in this process: its exit status and its stderr."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, err.getvalue()


def test_train_refuses_a_prefix_without_a_complete_upload_in_one_line(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    uri = f"s3://{BUCKET}/nothing-here/prepared"
    code, err = _call(["train", "-q", "--prepared-uri", uri])
    assert code == 1
    assert err.strip().splitlines() == [
        f"switchprune train: error: {uri} at {s3_env.endpoint} holds no complete upload "
        f"({transfer.MANIFEST} is missing)"
    ]
    assert not (tmp_path / "models").exists()


def test_only_rank_0_uploads_the_outputs(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from switchprune.stages import train

    def fake_run(cfg: Any, **kwargs: Any) -> dict[str, float]:
        kwargs["trained_dir"].mkdir(parents=True)
        (kwargs["trained_dir"] / "switched.pt").write_bytes(b"model")
        kwargs["history_path"].parent.mkdir(parents=True, exist_ok=True)
        kwargs["history_path"].write_text("[]\n")
        return {"val_accuracy": 0.5}

    monkeypatch.setattr(train, "run", fake_run)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY))
    client = storage.make_client()
    transfer.upload_file(client, f"s3://{BUCKET}/ranks/params.yaml", params)
    for rank in ("1", "0"):
        work = tmp_path / f"rank{rank}"
        work.mkdir()
        monkeypatch.chdir(work)
        monkeypatch.setenv("RANK", rank)
        argv = ["train", "-q", "--params", f"s3://{BUCKET}/ranks/params.yaml"]
        code, err = _call([*argv, "--output-uri", f"s3://{BUCKET}/ranks/out{rank}"])
        assert code == 0, err
    assert _objects(s3_env, "ranks/out1") == []
    assert _objects(s3_env, "ranks/out0") == [
        f"ranks/out0/{transfer.MANIFEST}",
        "ranks/out0/metrics.json",
        "ranks/out0/train_history.json",
        "ranks/out0/trained/switched.pt",
    ]
    out = tmp_path / "back"
    transfer.download_dir(client, f"s3://{BUCKET}/ranks/out0", out)
    assert json.loads((out / "metrics.json").read_text()) == {"val_accuracy": 0.5}


def test_a_download_that_differs_from_its_upload_is_refused(
    s3_env: S3Server, prepared: Path, tmp_path: Path
) -> None:
    client = storage.make_client()
    entries = transfer.upload_dir(client, f"s3://{BUCKET}/tamper", prepared)
    assert {e["name"] for e in entries} == {p.name for p in prepared.iterdir()}
    # rclone keeps each object as a plain file under its root: change bytes, not the size.
    stored = s3_env.root / BUCKET / "tamper" / "meta.json"
    stored.write_bytes(stored.read_bytes().upper())
    with pytest.raises(storage.StorageError, match="meta.json does not match"):
        transfer.download_dir(client, f"s3://{BUCKET}/tamper", tmp_path / "back")


# --- what the SDK's local backend cannot do ------------------------------------------------------


def test_the_local_process_backend_cannot_run_the_project_image_command() -> None:
    """It runs Python functions (``CustomTrainer``) in a fresh venv only: not our container."""
    client = TrainerClient(LocalProcessBackendConfig())
    kube = KubeflowConfig(train_nodes=1, gpus_per_node=2)
    with pytest.raises(ValueError, match="CustomTrainer must be set with LocalProcessBackend"):
        client.train(runtime="torch-distributed", trainer=trainjob.trainer(kube))


def test_a_stopped_launcher_deletes_its_trainjob_and_its_s3_folder(
    s3_env: S3Server, prepared: Path, tmp_path: Path
) -> None:
    """Terminating the pipeline run sends the launcher's pod SIGTERM: the job stops with it."""
    node = ScriptedNode([f"train step {i}" for i in range(2000)])  # ~100 s of training
    lines: list[str] = []
    with _cluster_for(s3_env, node) as cluster:

        def terminate_once_training() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                len(job.run.lines) >= 5 for job in list(cluster.jobs.values())
            ):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)

        killer = threading.Thread(target=terminate_once_training, daemon=True)
        killer.start()
        with pytest.raises(trainjob.TrainJobError) as info:
            _run_tiny(
                cluster, KubeflowConfig(train_nodes=1, gpus_per_node=2), prepared, tmp_path, lines
            )
        killer.join()
        ((name, body),) = [(b["metadata"]["name"], b) for b in cluster.created]
        assert list(cluster.deleted) == [name]
        assert body["spec"]["trainer"]["numNodes"] == 1
    message = str(info.value)
    assert "stopped (SIGTERM)" in message and name in message, message
    run = cluster.deleted[name]
    assert 5 <= len(run.lines) < 2000 and run.returncode == 137  # stopped while training
    assert _objects(s3_env, name) == []  # its inputs and checkpoints are gone
    assert not (tmp_path / "trained").exists()
    # The launcher's SIGTERM handling ended with the job: the test process has its own back.
    assert signal.getsignal(signal.SIGTERM) is not None
