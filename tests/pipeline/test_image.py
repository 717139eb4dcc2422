"""The built project image, run for real: what every Kubeflow task runs in.

Each task of the compiled pipeline runs inside the image with the exact command a pod runs
(``kfp.local`` resolves it; ``buildah run`` executes it as the image's own user, uid 10001), on
the digits, with a network of the user's own passed as the compiled pipeline passes it:
preprocess, train, prune and evaluate, then register and promote against a real ``mlflow server``
and S3 server on the host's loopback. The pipeline root is a mounted folder.

The image is built by ``make image`` (``pipeline/image.sh``). Without it, these tests skip and
say why; with ``SWITCHPRUNE_REQUIRE_IMAGE=1`` (CI, ``make test-image``) a missing image fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kfp.local
import pytest
from components.image import IMAGE
from kfp.local import docker_task_handler, status
from kfp_support import ROOT, DvcRemote, Run, assert_promoted, run_pipeline_locally, user_project

from project_support import empty_store

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Task '[a-z]+'. settings:UserWarning"),
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
]

IMAGE_SH = ROOT / "pipeline" / "image.sh"
UID = 10001


def buildah(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """buildah on the storage ``make image`` built into."""
    return subprocess.run(
        [str(IMAGE_SH), "buildah", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    """The built image's configuration (``buildah inspect``)."""
    required = os.environ.get("SWITCHPRUNE_REQUIRE_IMAGE") == "1"
    try:
        found = buildah("inspect", "--type", "image", IMAGE, timeout=60)
    except FileNotFoundError as exc:  # no buildah at all
        found = subprocess.CompletedProcess([], 127, "", str(exc))
    reason = ""
    if found.returncode != 0:
        reason = f"image {IMAGE} is not built here (make image): {found.stderr.strip()[-300:]}"
    else:
        config = json.loads(found.stdout)
        labels = config["OCIv1"]["config"].get("Labels") or {}
        built = labels.get("org.opencontainers.image.revision", "")
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        if built.removesuffix("-dirty") != head:
            # Another commit's code: what ran inside would not be this checkout's.
            reason = f"image {IMAGE} was built from commit {built or '?'}, not {head}: make image"
    if reason:
        if required:
            pytest.fail(reason)
        pytest.skip(reason)
    return config


class Container:
    """A fresh working container of the image, as a pod gets one; removed on exit."""

    def __init__(self) -> None:
        made = buildah("from", "--pull=never", IMAGE)
        assert made.returncode == 0, made.stderr
        self.name = made.stdout.strip().splitlines()[-1]

    def run(
        self, command: list[str], env: dict[str, str] | None = None, mounts: tuple[Path, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """``command`` as the image's user, with the host's network (its loopback servers)."""
        args = ["run", "--isolation", "chroot"]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        for path in mounts:
            args += ["--volume", f"{path}:{path}"]
        for _ in range(3):
            done = buildah(*args, self.name, "--", *command)
            # buildah re-executes itself from a sealed memfd copy before the command starts;
            # sealing fails now and then with EBUSY. Nothing has run yet: run it again.
            if "sealing memfd copy" not in done.stderr:
                break
        return done

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        buildah("rm", self.name, timeout=120)


@pytest.fixture(scope="module")
def container(image: dict[str, Any]) -> Iterator[Container]:
    with Container() as made:
        yield made


def test_image_runs_as_a_non_root_user_with_labels_of_its_sources(image: dict[str, Any]) -> None:
    config = image["OCIv1"]["config"]
    assert config["User"] == f"{UID}:{UID}"
    assert not config.get("Entrypoint"), "Kubeflow gives each task its own command"
    labels = config["Labels"]
    # The revision is checked by the fixture (an image of another commit is not tested).
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", labels["org.opencontainers.image.revision"])
    for name, label in (
        ("requirements-runtime.lock", "io.switchprune.requirements-runtime.lock.sha256"),
        (
            "requirements-torch.txt"
            if labels["io.switchprune.torch"] == "cuda"
            else "requirements-torch-cpu.txt",
            "io.switchprune.requirements-torch.sha256",
        ),
    ):
        digest = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()
        assert labels[label] == digest, f"the image installed another {name}: make image"


def test_inside_the_user_is_10001_the_set_is_consistent_and_the_cli_answers(
    container: Container,
) -> None:
    who = container.run(["id", "-u"])
    assert who.returncode == 0 and who.stdout.strip() == str(UID), who.stderr
    check = container.run(["python", "-m", "pip", "check"])
    assert check.returncode == 0, check.stdout + check.stderr
    cli = container.run(["switchprune", "--help"])
    assert cli.returncode == 0, cli.stderr
    for verb in ("preprocess", "train", "prune", "evaluate", "register", "promote"):
        assert verb in cli.stdout
    # kfp's executor, which runs every component's function in a pod, is installed.
    executor = container.run(["python", "-c", "import kfp.dsl.executor_main"])
    assert executor.returncode == 0, executor.stderr


class BuildahTaskHandler(docker_task_handler.DockerTaskHandler):
    """``kfp.local``'s container runner, with ``buildah run`` in place of a Docker engine.

    The task's resolved command and environment are exactly those the Docker runner would
    use; the pipeline root is mounted at the same path and handed to the image's user.
    """

    def run(self) -> status.Status:  # noqa: D102
        Path(self.pipeline_root).mkdir(parents=True, exist_ok=True)
        for folder, dirs, files in os.walk(self.pipeline_root):
            for name in (folder, *(os.path.join(folder, n) for n in dirs + files)):
                os.chown(name, UID, UID)
        with Container() as box:
            done = box.run(self.full_command, self.env_vars, (Path(self.pipeline_root),))
        print(done.stdout + done.stderr)  # the task's log, as kfp.local streams it
        return status.Status.SUCCESS if done.returncode == 0 else status.Status.FAILURE


@pytest.fixture(scope="module")
def image_run(
    image: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, dvc_remote: DvcRemote
) -> Iterator[Run]:
    params_file = user_project(tmp_path_factory.mktemp("project"))
    work = tmp_path_factory.mktemp("kfp-image")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(docker_task_handler, "DockerTaskHandler", BuildahTaskHandler)
        runner = lambda env: kfp.local.DockerRunner(environment=env)  # noqa: E731
        store = empty_store(tmp_path_factory, work / "mlflow.db")
        with run_pipeline_locally(work, dvc_remote, params_file, runner, store) as run:
            yield run


def test_the_six_components_run_inside_the_image_and_promote_a_model(
    image_run: Run, dvc_remote: DvcRemote
) -> None:
    assert_promoted(image_run, dvc_remote)
    # Every output was written inside, by the image's user.
    compact = image_run.output_file("prune", "compact/model.pt")
    assert compact.stat().st_uid == UID
    report = json.loads(image_run.output_file("evaluate", "report").read_text())
    assert report["params_after"] < report["params_before"]
