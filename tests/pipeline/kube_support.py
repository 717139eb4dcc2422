"""A recording stand-in for the Kubernetes API of a cluster running Kubeflow Trainer.

A real HTTP server on 127.0.0.1 answers the few requests the Kubeflow SDK's ``TrainerClient``
makes: the Trainer's version ConfigMap, the ``torch-distributed`` ClusterTrainingRuntime (as the
Trainer's manifests install it), creating a TrainJob (the body is recorded), reading it back
with status conditions, listing its pods and reading node 0's log, followed as it is written.
Everything else is answered 404 and recorded, so a test sees any request it did not expect.

What a TrainJob's nodes do is a :class:`Node`: a script of log lines and an exit status, or the
job's real command run as a local process (one node, one process: the ``PET_*`` variables the
torch plugin would set, and the secret references of the request resolved from
:attr:`FakeKubernetes.secrets`).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubeflow.common.types import KubernetesBackendConfig
from kubernetes import client
from pipeline.servers import free_port

GROUP = "/apis/trainer.kubeflow.org/v1alpha1"
FRAMEWORK_LABEL = "trainer.kubeflow.org/framework"
RUNTIME_NAME = "torch-distributed"

# The torch-distributed runtime as Kubeflow Trainer's manifests install it.
_RUNTIME_NODE = {
    "name": "node",
    "image": "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime",
    "command": ["/bin/bash", "-c", 'echo "Torch Distributed Runtime"\nenv | grep PET_\npip list\n'],
}
TORCH_DISTRIBUTED: dict[str, Any] = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "ClusterTrainingRuntime",
    "metadata": {
        "name": RUNTIME_NAME,
        "labels": {FRAMEWORK_LABEL: "torch"},
        "creationTimestamp": "2026-01-05T09:00:00Z",
    },
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
        "template": {
            "spec": {
                "replicatedJobs": [
                    {
                        "name": "node",
                        "template": {
                            "metadata": {
                                "labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
                            },
                            "spec": {"template": {"spec": {"containers": [_RUNTIME_NODE]}}},
                        },
                    }
                ]
            }
        },
    },
}


class NodeRun:
    """What node 0 of one TrainJob printed so far, and its exit status once it ended."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.returncode: int | None = None
        self.log_opened = threading.Event()
        self.stopped = threading.Event()  # the TrainJob was deleted: the node stops
        self._changed = threading.Condition()

    def write(self, line: str) -> None:
        with self._changed:
            self.lines.append(line)
            self._changed.notify_all()

    def finish(self, returncode: int) -> None:
        with self._changed:
            self.returncode = returncode
            self._changed.notify_all()

    def follow(self) -> Iterator[str]:
        """Every line, as it is written, until the process ended."""
        sent = 0
        while True:
            with self._changed:
                while sent == len(self.lines) and self.returncode is None:
                    self._changed.wait(0.5)
                new, done = self.lines[sent:], self.returncode is not None
            yield from new
            sent += len(new)
            if done and sent == len(self.lines):
                return


class Node:
    """How a TrainJob's nodes run: started once when the TrainJob is created."""

    def start(self, trainjob: Mapping[str, Any], env: Mapping[str, str]) -> NodeRun:
        raise NotImplementedError


@dataclass
class ScriptedNode(Node):
    """Prints ``lines`` once someone follows its log, then exits with ``returncode``."""

    lines: Sequence[str]
    returncode: int = 0

    def start(self, trainjob: Mapping[str, Any], env: Mapping[str, str]) -> NodeRun:
        run = NodeRun()

        def play() -> None:
            run.log_opened.wait(30)  # the launcher must be following while the node prints
            for line in self.lines:
                if run.stopped.is_set():
                    run.finish(137)  # killed with its pod
                    return
                run.write(line)
                time.sleep(0.05)
            run.finish(self.returncode)

        threading.Thread(target=play, daemon=True).start()
        return run


@dataclass
class CommandNode(Node):
    """Runs the TrainJob's command in ``workdir`` as the only process of a one-node job."""

    workdir: Path
    path: str = ""  # prepended to PATH: where the image's commands are (torchrun, switchprune)
    env: dict[str, str] = field(default_factory=dict)  # beyond the job's own

    def start(self, trainjob: Mapping[str, Any], env: Mapping[str, str]) -> NodeRun:
        run = NodeRun()
        command = trainjob["spec"]["trainer"]["command"]
        # What the torch plugin sets for torchrun, for a single node of a single process.
        torch_env = {
            "PET_NNODES": "1",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": "0",
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(free_port()),
        }
        # S3 comes from the job's secret references only, not from the test's environment.
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SWITCHPRUNE_"))
        }
        full = {**inherited, **self.env, **env, **torch_env}
        full["PATH"] = (
            f"{self.path}{os.pathsep}{full.get('PATH', '')}" if self.path else full["PATH"]
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            command,
            cwd=self.workdir,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                run.write(line.rstrip("\n"))
            run.finish(proc.wait())

        def reap() -> None:
            run.stopped.wait()
            proc.kill()  # the pod is deleted with its TrainJob

        threading.Thread(target=pump, daemon=True).start()
        threading.Thread(target=reap, daemon=True).start()
        return run


@dataclass
class _Job:
    body: dict[str, Any]
    run: NodeRun
    created: str
    gets: int = 0


class FakeKubernetes:
    """The stand-in API server; a context manager that starts and stops it.

    Attributes:
        namespace: The only namespace with TrainJobs.
        secrets: Secret name to its data, for the ``secretKeyRef`` variables of a TrainJob.
        node: What the TrainJob's nodes do.
        created: The body of every TrainJob creation request, in order.
        deleted: Every deleted TrainJob's node run, by name, in order.
        requests: ``(method, path with query)`` of every request, in order.
        unexpected: The requests answered 404 because nothing here serves them.
    """

    def __init__(
        self,
        node: Node,
        *,
        namespace: str = "team",
        secrets: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.namespace = namespace
        self.secrets = {k: dict(v) for k, v in (secrets or {}).items()}
        self.node = node
        self.created: list[dict[str, Any]] = []
        self.deleted: dict[str, NodeRun] = {}
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def configuration(self) -> client.Configuration:
        """A Kubernetes client configuration pointing at this server."""
        cfg = client.Configuration()
        cfg.host = self.url
        return cfg

    def backend(self) -> KubernetesBackendConfig:
        """What ``TrainerClient`` needs to reach this server's namespace."""
        return KubernetesBackendConfig(
            namespace=self.namespace, client_configuration=self.configuration()
        )

    def __enter__(self) -> FakeKubernetes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- the cluster's answers ---------------------------------------------------------------

    def create(self, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body["metadata"]["name"]
        if namespace != self.namespace:
            return 403, _status(403, f"trainjobs is forbidden in namespace {namespace}")
        with self._lock:
            if name in self.jobs:
                return 409, _status(409, f'trainjobs.trainer.kubeflow.org "{name}" already exists')
            self.created.append(json.loads(json.dumps(body)))
            run = self.node.start(body, self._secret_env(body))
            self.jobs[name] = _Job(body=body, run=run, created=_now())
        return 201, self._trainjob(name)

    def _secret_env(self, body: Mapping[str, Any]) -> dict[str, str]:
        """The node container's variables taken from secrets (what the kubelet would do)."""
        env: dict[str, str] = {}
        for patch in body["spec"].get("runtimePatches", []):
            spec = patch["trainingRuntimeSpec"]["template"]["spec"]
            for rjob in spec["replicatedJobs"]:
                pod = rjob["template"]["spec"]["template"]["spec"]
                for container in pod.get("containers", []):
                    for var in container.get("env", []):
                        ref = var.get("valueFrom", {}).get("secretKeyRef")
                        if ref and ref["key"] in self.secrets.get(ref["name"], {}):
                            env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
        return env

    def _trainjob(self, name: str) -> dict[str, Any]:
        job = self.jobs[name]
        out = json.loads(json.dumps(job.body))
        out["metadata"].update(namespace=self.namespace, creationTimestamp=job.created, uid=name)
        conditions = [_condition("Created", "JobSetCreated", "TrainJob is created")]
        if job.run.returncode == 0:
            conditions.append(_condition("Complete", "JobSetCompleted", "jobset completed"))
        elif job.run.returncode is not None:
            conditions.append(
                _condition("Failed", "JobSetFailed", "jobset failed: node-0 exited with 1")
            )
        out["status"] = {"conditions": conditions}
        return out

    def get_trainjob(self, name: str) -> tuple[int, dict[str, Any]]:
        if name not in self.jobs:
            return 404, _status(404, f'trainjobs.trainer.kubeflow.org "{name}" not found')
        self.jobs[name].gets += 1
        return 200, self._trainjob(name)

    def delete(self, name: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            job = self.jobs.pop(name, None)
        if job is None:
            return 404, _status(404, f'trainjobs.trainer.kubeflow.org "{name}" not found')
        job.run.stopped.set()
        self.deleted[name] = job.run
        return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}

    def pods(self, selector: str) -> dict[str, Any]:
        name = selector.split(",", 1)[0].split("=", 1)[1]
        items = []
        if name in self.jobs:
            job = self.jobs[name]
            trainer = job.body["spec"]["trainer"]
            for index in range(trainer.get("numNodes", 1)):
                items.append(_pod(name, index, trainer, _phase(job), job.created))
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    def log(self, pod: str) -> NodeRun | None:
        for name, job in self.jobs.items():
            if pod.startswith(f"{name}-node-0-0-"):
                job.run.log_opened.set()
                return job.run
        return None


def _phase(job: _Job) -> str:
    """Node 0's pod phase: Pending at first look (it is being scheduled), then as the process."""
    if job.gets <= 1 and job.run.returncode is None:
        return "Pending"
    if job.run.returncode is None:
        return "Running"
    return "Succeeded" if job.run.returncode == 0 else "Failed"


def _pod(
    name: str, index: int, trainer: Mapping[str, Any], phase: str, created: str
) -> dict[str, Any]:
    resources = trainer.get("resourcesPerNode", {})
    return {
        "metadata": {
            "name": f"{name}-node-{index}-0-x7k2p",
            "namespace": "team",
            "creationTimestamp": created,
            "labels": {
                "jobset.sigs.k8s.io/jobset-name": name,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "batch.kubernetes.io/job-completion-index": str(index),
            },
        },
        "spec": {
            "containers": [
                {
                    "name": "node",
                    "image": trainer.get("image", ""),
                    "command": trainer.get("command", []),
                    "resources": resources,
                    "env": [{"name": "PET_NPROC_PER_NODE", "value": "auto"}],
                }
            ]
        },
        "status": {"phase": phase},
    }


def _condition(kind: str, reason: str, message: str) -> dict[str, str]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": _now(),
    }


def _status(code: int, message: str) -> dict[str, Any]:
    reasons = {403: "Forbidden", 404: "NotFound", 409: "AlreadyExists"}
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reasons.get(code, "Unknown"),
        "code": code,
    }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _handler(cluster: FakeKubernetes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # the test records requests itself

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            cluster.requests.append((method, self.path))
            url = urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            query = parse_qs(url.query)
            answer = _route(cluster, method, parts, query, self._body())
            if answer is None:
                cluster.unexpected.append((method, self.path))
                self._json(404, _status(404, f"{url.path} is not served here"))
            elif isinstance(answer, NodeRun):
                # The API server reads booleans as Go does; the Python client sends "True".
                follow = query.get("follow", [""])[0].lower() in ("true", "1")
                self._log(answer, follow=follow)
            else:
                self._json(*answer)

        def _body(self) -> dict[str, Any] | None:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length else None

        def _json(self, code: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _log(self, run: NodeRun, *, follow: bool) -> None:
            # HTTP/1.0 without a length: the body is the log up to the closed connection.
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            lines = run.follow() if follow else iter(list(run.lines))
            for line in lines:
                self.wfile.write(f"{line}\n".encode())
                self.wfile.flush()
            self.close_connection = True

    return Handler


def _route(
    cluster: FakeKubernetes,
    method: str,
    parts: list[str],
    query: dict[str, list[str]],
    body: dict[str, Any] | None,
) -> tuple[int, dict[str, Any]] | NodeRun | None:
    """The answer to one request, or None for a request nothing here serves."""
    match method, parts:
        case "GET", ["api", "v1", "namespaces", system, "configmaps", "kubeflow-trainer-public"]:
            meta = {"name": "kubeflow-trainer-public", "namespace": system}
            data = {"kubeflow_trainer_version": "v2.1.0"}
            return 200, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}
        case "GET", [
            "apis",
            "trainer.kubeflow.org",
            "v1alpha1",
            "namespaces",
            _,
            "trainingruntimes",
            name,
        ]:
            return 404, _status(404, f'trainingruntimes.trainer.kubeflow.org "{name}" not found')
        case "GET", ["apis", "trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", name]:
            if name != RUNTIME_NAME:
                return 404, _status(404, f'clustertrainingruntimes "{name}" not found')
            return 200, TORCH_DISTRIBUTED
        case "POST", ["apis", "trainer.kubeflow.org", "v1alpha1", "namespaces", ns, "trainjobs"]:
            assert body is not None
            return cluster.create(ns, body)
        case ("GET" | "DELETE") as verb, [
            "apis",
            "trainer.kubeflow.org",
            "v1alpha1",
            "namespaces",
            _,
            "trainjobs",
            name,
        ]:
            return cluster.get_trainjob(name) if verb == "GET" else cluster.delete(name)
        case "GET", ["api", "v1", "namespaces", _, "pods"]:
            return 200, cluster.pods(query.get("labelSelector", [""])[0])
        case "GET", ["api", "v1", "namespaces", _, "pods", pod, "log"]:
            run = cluster.log(pod)
            return run if run is not None else (404, _status(404, f'pods "{pod}" not found'))
    return None
