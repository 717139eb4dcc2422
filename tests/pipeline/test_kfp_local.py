"""The whole Kubeflow pipeline with ``kfp.local``, and the same model as ``dvc repro``.

Every component runs in its own subprocess (``SubprocessRunner``, no Docker), against a real S3
server (the DVC remote with the raw data, MLflow's artifacts and the promotion bucket) and a
real ``mlflow server``. Endpoint, keys and tracking URI reach the tasks through the environment,
as the Kubernetes secrets do on a cluster. Then ``dvc repro train`` runs the same parameters
in a throwaway copy of the project, and both must train the same model.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import kfp.local
import pytest
import torch
from kfp_support import (
    ROOT,
    DvcRemote,
    Run,
    assert_promoted,
    run_pipeline_locally,
    user_project,
)

from project_support import commit_all, empty_store, run_tool
from switchprune.data import export_digits
from switchprune.dvcfiles import dvc_md5

pytestmark = [
    pytest.mark.slow,
    # Resources, GPU placement and secrets only apply on a cluster; the local runner says so.
    pytest.mark.filterwarnings("ignore:Task '[a-z]+'. settings:UserWarning"),
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return user_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def kfp_run(
    tmp_path_factory: pytest.TempPathFactory,
    dvc_remote: DvcRemote,
    params_file: Path,
) -> Iterator[Run]:
    work = tmp_path_factory.mktemp("kfp")
    scratch = work / "tmp"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(scratch))  # the tasks' scratch space, checked after the run
        runner = lambda env: kfp.local.SubprocessRunner(use_venv=False)  # noqa: E731
        store = empty_store(tmp_path_factory, work / "mlflow.db")
        with run_pipeline_locally(work, dvc_remote, params_file, runner, store) as run:
            yield run


def test_the_tasks_leave_no_scratch_folders_behind(kfp_run: Run) -> None:
    # A node runs many pipelines: raw data and checkpoints must not pile up in its /tmp.
    assert list((kfp_run.work / "tmp").glob("switchprune-*")) == []


def test_the_pipeline_ends_with_a_champion_and_a_manifest_in_s3(
    kfp_run: Run, dvc_remote: DvcRemote
) -> None:
    assert_promoted(kfp_run, dvc_remote)


@pytest.fixture(scope="module")
def dvc_trained(tmp_path_factory: pytest.TempPathFactory, params_file: Path) -> Path:
    """``dvc repro train`` on the same parameters, in a throwaway copy of the project."""
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
    run_tool([str(BIN / "dvc"), "repro", "train"], dst)
    return dst


def test_the_pipeline_trains_the_same_model_as_dvc_repro(kfp_run: Run, dvc_trained: Path) -> None:
    """The same data version, and the same weights, factors and baseline to the last bit."""
    report = json.loads(kfp_run.output_file("evaluate", "report").read_text())
    assert report["data_md5"] == dvc_md5(dvc_trained / "data" / "raw" / "digits")
    assert report["params_after"] < report["params_before"]
    (kfp_trained,) = [p for p in kfp_run.pipeline_root.rglob("train/trained") if p.is_dir()]
    for name in ("switched.pt", "baseline.pt"):
        ours = torch.load(kfp_trained / name, weights_only=True)
        theirs = torch.load(dvc_trained / "models" / "trained" / name, weights_only=True)
        for key in ("state_dict", "factors"):
            assert ours.get(key, {}).keys() == theirs.get(key, {}).keys(), (name, key)
            for k, v in ours.get(key, {}).items():
                assert torch.equal(v, theirs[key][k]), (name, key, k)
        assert ours["spec"] == theirs["spec"], name
