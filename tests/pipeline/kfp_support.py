"""Helpers of the Kubeflow tests: tiny parameters, and a DVC remote on a real S3 server.

The remote is laid out the way DVC 3 stores a directory (``files/md5/<2>/<30>`` objects plus the
``.dir`` listing), holding the digits exported byte-identically from scikit-learn, as ``dvc push``
leaves raw data a user tracks with ``dvc add``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kfp.local
import pytest
import yaml
from pipeline.compile import network_source
from pipeline.pipeline import build_pipeline
from pipeline.servers import MlflowServer, S3Server

from switchprune import registry, storage
from switchprune.config import load_params
from switchprune.dvcfiles import dvc_md5

ROOT = Path(__file__).resolve().parents[2]
# A network of the user's own: concatenation, grouped conv, residual (``build_mixed``).
USER_FILE = ROOT / "tests" / "models" / "user_net.py"

DVC_REMOTE = "s3://switchprune-dvc/cache"
PROMOTE_URI = "s3://kfp-models/team"
MODEL_NAME = "switchprune-kfp-test"
COMMIT = "kfp-local-test-commit"
USER_ARCH = "mynets/net.py:build_mixed"

T = TypeVar("T")


def in_fresh_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` on a thread of its own: its result, or its exception.

    Building a pipeline calls ``inspect.stack()`` for every task setting; under pytest that
    walks (and looks up the module of) every frame of the runner below the test, seconds per
    build. A new thread's stack holds only the call itself.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(func, *args, **kwargs).result()


def tiny_params() -> dict[str, Any]:
    """The project's params.yaml with a CPU-sized budget and a lenient gate."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["hidden"] = [32, 16]
    # ~40 batches per epoch: enough SNN steps for a usable model at any tnn_steps_per_snn_step.
    params["train"].update(epochs=4, batch_size=32, snn_hidden=8, target_ratio=0.5, device="cpu")
    params["evaluate"].update(latency_warmup=0, latency_repeats=1, device="cpu")
    params["register"]["model_name"] = MODEL_NAME
    params["promote"].update(
        s3_uri=PROMOTE_URI, min_accuracy=0.5, max_accuracy_drop=0.3, max_params_ratio=0.9
    )
    return params


@dataclass
class DvcRemote:
    """A running S3 server with the raw data on a DVC remote."""

    server: S3Server
    url: str
    md5: str

    @property
    def root(self) -> Path:
        """Where the server keeps its buckets."""
        return self.server.root


def push_dvc_dir(client: Any, remote_url: str, directory: Path) -> str:
    """Upload ``directory`` to a DVC remote as ``dvc push`` would; returns its DVC hash."""
    loc = storage.parse_s3_uri(remote_url)
    storage.ensure_bucket(client, loc.bucket)
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = dvc_md5(path)
        entries.append({"md5": digest, "relpath": path.relative_to(directory).as_posix()})
        key = loc.key("files", "md5", digest[:2], digest[2:])
        client.put_object(Bucket=loc.bucket, Key=key, Body=path.read_bytes())
    md5 = dvc_md5(directory)
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True).encode()
    key = loc.key("files", "md5", md5[:2], md5[2:])
    client.put_object(Bucket=loc.bucket, Key=key, Body=listing)
    return md5


@dataclass
class Run:
    """A finished ``kfp.local`` run of the pipeline."""

    work: Path
    pipeline_root: Path
    tracking_uri: str

    def output_file(self, task: str, name: str) -> Path:
        """The single file of an output artifact of ``task``."""
        found = [p for p in self.pipeline_root.rglob(f"{task}/{name}") if p.is_file()]
        assert len(found) == 1, (task, name, found)
        return found[0]


@contextmanager
def run_pipeline_locally(
    work: Path,
    dvc_remote: DvcRemote,
    params_file: Path,
    runner: Callable[[dict[str, str]], Any],
    store: str,
) -> Iterator[Run]:
    """The compiled pipeline of ``params_file`` (its user network passed as the compiler
    passes it) run by ``kfp.local`` against the S3 server and a real ``mlflow server``.

    Args:
        work: An empty folder: the tasks' working folder, MLflow's store, the pipeline root.
        dvc_remote: The S3 server with the raw data.
        params_file: ``params.yaml`` of a project with ``mynets/net.py`` beside it.
        runner: Makes the ``kfp.local`` runner from the tasks' environment (S3 endpoint and
            keys, tracking URI: what Kubernetes secrets give a pod), which is also set here.
        store: The server's backend store (an empty one, migrated: ``empty_store``).
    """
    source, sha256 = network_source(USER_ARCH, params_file.parent)
    pipeline_func = in_fresh_thread(
        build_pipeline,
        load_params(params_file),
        dvc_remote=dvc_remote.url,
        data_md5=dvc_remote.md5,
        git_commit=COMMIT,
        arch_source=source,
        arch_sha256=sha256,
    )
    # The tasks run in a folder without the network's file, as pods of the project image do.
    assert not (work / "mynets").exists()
    storage.ensure_bucket(storage.make_client(dvc_remote.server.endpoint), "mlflow-artifacts")
    server = MlflowServer(
        store,
        "s3://mlflow-artifacts/kfp",
        env=dvc_remote.server.environment,
        log_path=work / "mlflow.log",
    )
    with server, pytest.MonkeyPatch.context() as mp:
        env = {**dvc_remote.server.environment, "MLFLOW_TRACKING_URI": server.uri}
        mp.chdir(work)
        for key, value in env.items():
            mp.setenv(key, value)
        kfp.local.init(runner=runner(env), pipeline_root=str(work / "pipeline_root"))
        pipeline_func()
        yield Run(work, work / "pipeline_root", server.uri)


def user_project(folder: Path) -> Path:
    """Tiny parameters with a network of the user's own in ``folder``; its ``params.yaml``."""
    (folder / "mynets").mkdir()
    shutil.copy(USER_FILE, folder / "mynets" / "net.py")
    params = tiny_params()
    params["model"]["arch"] = USER_ARCH
    # A BatchNorm network: the recipe of the BatchNorm families, as for any of them.
    params["train"]["tnn_lr"] = 0.05
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def assert_promoted(run: Run, dvc_remote: DvcRemote) -> None:
    """The run ended with a champion, tagged with its commit and data, and its S3 manifest."""
    promoted = json.loads(run.output_file("promote", "promotion").read_text())
    assert promoted["promoted"] is True, promoted
    version = promoted["version"]
    champion = registry.get_alias_version(run.tracking_uri, MODEL_NAME, "champion")
    assert champion is not None and champion["version"] == version
    info = registry.version_info(run.tracking_uri, registry.ModelRef(MODEL_NAME, version=version))
    assert info["tags"]["git_commit"] == COMMIT
    assert info["tags"]["data_md5"] == dvc_remote.md5
    manifest_path = dvc_remote.root / "kfp-models" / "team" / MODEL_NAME / "current.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["version"] == version and manifest["data_md5"] == dvc_remote.md5
    # The user's network file travels with the model, listed and verified like the others.
    listed = {entry["name"]: entry for entry in manifest["files"]}
    assert (manifest_path.parent / f"v{version}" / "network.py").read_bytes() == (
        USER_FILE.read_bytes()
    )
    assert "network.py" in listed and "model.pt" in listed
    for entry in manifest["files"]:
        assert (manifest_path.parent / f"v{version}" / entry["name"]).stat().st_size == entry[
            "size"
        ]
