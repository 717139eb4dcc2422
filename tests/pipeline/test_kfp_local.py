"""The whole Kubeflow pipeline with ``kfp.local``, and the same model as ``dvc repro``.

Every component runs in its own subprocess (``SubprocessRunner``, no Docker), against a real S3
server (the DVC remote with the raw data, MLflow's artifacts and the promotion bucket) and a
real ``mlflow server``. Endpoint, keys and tracking URI reach the tasks through the environment,
as the Kubernetes secrets do on a cluster. Then ``dvc repro`` runs the same parameters in a
throwaway copy of the project, and both must produce the same model.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kfp.local
import pytest
import yaml
from kfp_support import MODEL_NAME, ROOT, USER_FILE, DvcRemote, tiny_params
from pipeline.compile import network_source
from pipeline.pipeline import build_pipeline
from pipeline.servers import MlflowServer

from project_support import commit_all, run_tool
from switchprune import registry, storage
from switchprune.config import load_params
from switchprune.data import export_digits

pytestmark = [
    pytest.mark.slow,
    # Resources, GPU placement and secrets only apply on a cluster; the local runner says so.
    pytest.mark.filterwarnings("ignore:Task '[a-z]+'. settings:UserWarning"),
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
]

BIN = Path(sys.executable).parent
COMMIT = "kfp-local-test-commit"
SAME = ("test_accuracy", "gated_accuracy", "params_after", "macs_after")
USER_ARCH = "mynets/net.py:build_mixed"


@dataclass
class Run:
    work: Path
    pipeline_root: Path
    tracking_uri: str

    def output_file(self, task: str, name: str) -> Path:
        """The single file of an output artifact of ``task``."""
        found = [p for p in self.pipeline_root.rglob(f"{task}/{name}") if p.is_file()]
        assert len(found) == 1, (task, name, found)
        return found[0]


@pytest.fixture(scope="module")
def params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny parameters with a network of the user's own, in a project folder of its own."""
    project = tmp_path_factory.mktemp("project")
    (project / "mynets").mkdir()
    shutil.copy(USER_FILE, project / "mynets" / "net.py")
    params = tiny_params()
    params["model"]["arch"] = USER_ARCH
    # A BatchNorm network: the recipe of the BatchNorm families, as for any of them.
    params["train"]["tnn_lr"] = 0.05
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def kfp_run(
    tmp_path_factory: pytest.TempPathFactory,
    dvc_remote: DvcRemote,
    params_file: Path,
) -> Iterator[Run]:
    work = tmp_path_factory.mktemp("kfp")
    source, sha256 = network_source(USER_ARCH, params_file.parent)
    pipeline_func = build_pipeline(
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
        f"sqlite:///{work / 'mlflow.db'}",
        "s3://mlflow-artifacts/kfp",
        env=dvc_remote.server.environment,
        log_path=work / "mlflow.log",
    )
    scratch = work / "tmp"
    scratch.mkdir()
    with server, pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("TMPDIR", str(scratch))  # the tasks' scratch space, checked after the run
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        kfp.local.init(
            runner=kfp.local.SubprocessRunner(use_venv=False),
            pipeline_root=str(work / "pipeline_root"),
        )
        pipeline_func()
        yield Run(work, work / "pipeline_root", server.uri)


def test_the_tasks_leave_no_scratch_folders_behind(kfp_run: Run) -> None:
    # A node runs many pipelines: raw data and checkpoints must not pile up in its /tmp.
    assert list((kfp_run.work / "tmp").glob("switchprune-*")) == []


def test_the_pipeline_ends_with_a_champion_and_a_manifest_in_s3(
    kfp_run: Run, dvc_remote: DvcRemote
) -> None:
    promoted = json.loads(kfp_run.output_file("promote", "promotion").read_text())
    assert promoted["promoted"] is True, promoted
    version = promoted["version"]
    champion = registry.get_alias_version(kfp_run.tracking_uri, MODEL_NAME, "champion")
    assert champion is not None and champion["version"] == version
    info = registry.version_info(
        kfp_run.tracking_uri, registry.ModelRef(MODEL_NAME, version=version)
    )
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


@pytest.fixture(scope="module")
def dvc_report(tmp_path_factory: pytest.TempPathFactory, params_file: Path) -> dict[str, Any]:
    """``dvc repro evaluate`` on the same parameters, in a throwaway copy of the project."""
    dst = tmp_path_factory.mktemp("dvc-project")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copy(params_file, dst / "params.yaml")
    shutil.copytree(params_file.parent / "mynets", dst / "mynets")
    (dst / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", dst / ".dvc" / "config")
    shutil.copytree(
        ROOT / "src", dst / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    export_digits(dst / "data" / "raw" / "digits")
    commit_all(dst)
    run_tool([str(BIN / "dvc"), "repro", "evaluate"], dst)
    return json.loads((dst / "reports" / "evaluate.json").read_text())


def test_the_pipeline_trains_the_same_model_as_dvc_repro(
    kfp_run: Run, dvc_report: dict[str, Any]
) -> None:
    report = json.loads(kfp_run.output_file("evaluate", "report").read_text())
    assert report["data_md5"] == dvc_report["data_md5"]
    assert {k: report[k] for k in SAME} == {k: dvc_report[k] for k in SAME}
    assert report["params_after"] < report["params_before"]
