"""``make run``'s runner killed mid-run, hung up on, and failing in a stage, in a throwaway copy.

Real processes only: ``pipeline/local.py`` with its embedded ``rclone serve s3``, ``dvc repro``
and the stage it runs. A run killed with SIGKILL leaves nothing running (its children get a
signal from the kernel when it dies); the next run cleans up what it left and completes. A
failing stage is named, its exit status passed on, and its last good outputs restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from project_support import commit_all, copy_project, run_pipeline, tool_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, project_files: list[str]) -> Path:
    """A git repository with the project's files, tiny settings, and one complete run done."""
    dst = copy_project(tmp_path_factory.mktemp("repo"), project_files)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["model"]["hidden"] = [32, 16]
    params["train"].update(
        epochs=3, batch_size=128, snn_hidden=8, target_ratio=0.5, tnn_steps_per_snn_step=1
    )
    params["evaluate"].update(latency_warmup=1, latency_repeats=2)
    params["register"]["model_name"] = "switchprune-test-faults"
    params["promote"].update(min_accuracy=0.3, max_accuracy_drop=0.5, max_params_ratio=0.9)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(dst)
    done = run_pipeline(dst, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dst


@pytest.fixture
def params(project: Path) -> Iterator[Path]:
    """``params.yaml``, put back as it was after the test."""
    path = project / "params.yaml"
    original = path.read_text()
    yield path
    path.write_text(original)


def _set(path: Path, section: str, **values: object) -> None:
    params = yaml.safe_load(path.read_text())
    params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


Family = dict[int, float]  # pid -> start time: a pid reused since is not mistaken for ours


def _family(runner: subprocess.Popen[str]) -> Family:
    procs = psutil.Process(runner.pid).children(recursive=True)
    found = {}
    for proc in procs:
        try:
            found[proc.pid] = proc.create_time()
        except psutil.Error:
            continue
    return found


def _alive(family: Family) -> list[str]:
    alive = []
    for pid, started in family.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid}: {' '.join(proc.cmdline())}")
        except psutil.Error:
            continue
    return alive


def _train_running(family: Family) -> psutil.Process | None:
    for pid in family:
        try:
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if any(Path(a).name == "switchprune" for a in cmdline) and "train" in cmdline:
            return proc
    return None


def _start_a_long_run(
    project: Path, params: Path, log: Path
) -> tuple[subprocess.Popen[str], Family]:
    """Start the runner (leading its own process group) with long training; wait for ``train``.

    Returns:
        The runner and every process it started, the stage included, by pid and start time.
    """
    _set(params, "train", epochs=500)  # minutes of training: the signal lands during it
    with open(log, "w") as out:
        runner = subprocess.Popen(
            [sys.executable, "pipeline/local.py"],
            cwd=project,
            env=tool_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    family: Family = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert runner.poll() is None, log.read_text()[-3000:]
        family |= _family(runner)
        if _train_running(family) is not None and any((project / "checkpoints").glob("*")):
            break
        time.sleep(0.3)
    else:
        os.killpg(runner.pid, signal.SIGKILL)
        pytest.fail("training never started:\n" + log.read_text()[-3000:])
    family |= _family(runner)
    record = json.loads((project / ".switchprune-run.lock").read_text())
    assert record["pid"] == runner.pid and record["s3_pid"] in family and record["dvc_pgid"]
    return runner, family


def _wait_gone(family: Family, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (alive := _alive(family)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.mark.parametrize("also_supervisor", [False, True], ids=["runner", "runner-and-supervisor"])
def test_a_run_killed_with_sigkill_leaves_nothing_and_the_next_run_cleans_up(
    project: Path, params: Path, tmp_path: Path, also_supervisor: bool
) -> None:
    """``kill -KILL -- -<pgid>`` of the runner: its S3 server, DVC and the stage die with it.

    With ``also_supervisor`` the process that leads DVC's group is SIGKILLed first, and the
    stage (a grandchild of the runner) is frozen with SIGSTOP so that it cannot end by itself
    either (writing to its closed stderr): only the next run can stop it, finding it by the dead
    run's token.
    """
    runner, family = _start_a_long_run(project, params, tmp_path / "first.log")
    record = json.loads((project / ".switchprune-run.lock").read_text())
    try:
        if also_supervisor:
            stage = _train_running(family)
            assert stage is not None
            stage.suspend()
            os.kill(record["dvc_pgid"], signal.SIGKILL)
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(timeout=10)
        if also_supervisor:
            time.sleep(1)
            assert _train_running(family) is not None, "the stage should be orphaned"
        else:
            assert _wait_gone(family) == []
        params.write_text(params.read_text().replace("epochs: 500", "epochs: 3"))
        second = run_pipeline(project)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        notices = [ln for ln in second.stderr.splitlines() if "cleaned up a dead run" in ln]
        assert len(notices) == 1, second.stderr[-3000:]
        assert f"(pid {runner.pid})" in notices[0]
        assert "removed the S3 endpoint it left in .dvc/config.local" in notices[0]
        if also_supervisor:
            # The stage, and whatever shell DVC ran it through: at least one process.
            assert re.search(r"stopped [1-9]\d* process", notices[0]), notices[0]
        assert "is busy" not in second.stderr
        # Nothing of the first run is alive: no rclone, no DVC, no stage.
        assert _alive(family) == []
        assert record["s3_pid"] in family
        assert _rclones_of(project) == []  # neither run's S3 server is left
        assert not (project / ".switchprune-run.lock").read_text().strip()
        assert "endpointurl" not in (project / ".dvc" / "config.local").read_text()
    finally:
        for pid in family:
            if _alive({pid: family[pid]}):
                os.kill(pid, signal.SIGKILL)


def _rclones_of(project: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.name() == "rclone" and str(project) in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def test_a_run_hung_up_on_stops_everything_and_the_next_run_is_normal(
    project: Path, params: Path, tmp_path: Path
) -> None:
    """SIGHUP (the terminal closed) is handled like SIGTERM: the run cleans up and exits."""
    log = tmp_path / "first.log"
    runner, family = _start_a_long_run(project, params, log)
    try:
        os.killpg(runner.pid, signal.SIGHUP)
        assert runner.wait(timeout=60) == 128 + signal.SIGHUP
        assert "make run: stopped by SIGHUP" in log.read_text()
        assert _wait_gone(family, timeout=5) == []
        assert not (project / ".switchprune-run.lock").read_text().strip()
        assert "endpointurl" not in (project / ".dvc" / "config.local").read_text()
        params.write_text(params.read_text().replace("epochs: 500", "epochs: 3"))
        second = run_pipeline(project)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "cleaned up a dead run" not in second.stderr
        assert _rclones_of(project) == []
    finally:
        for pid in family:
            if _alive({pid: family[pid]}):
                os.kill(pid, signal.SIGKILL)


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_failing_stage_is_named_its_status_passed_on_and_its_outputs_restored(
    project: Path, params: Path
) -> None:
    """A stage exiting 2 (IDX data that is not there: only the stage finds out) makes the run
    exit 2 naming it, where DVC itself exits 255; the outputs DVC removed are back."""
    prepared = project / "data" / "prepared"
    before = _digests(prepared)
    assert before
    _set(params, "data", dataset="idx", idx_dir="data/raw")
    done = run_pipeline(project)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert "make run: stage 'preprocess' failed (exit 2)" in lines, done.stderr
    assert "make run: restored the last good outputs of 'preprocess' (dvc checkout)" in lines
    assert "repro failed" not in done.stderr
    assert _digests(prepared) == before
    assert "endpointurl" not in (project / ".dvc" / "config.local").read_text()
