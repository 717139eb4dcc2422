"""``make run``'s runner stopped mid-run, killed, and failing in a stage, in throwaway copies.

Real processes only: ``pipeline/local.py`` with its embedded ``rclone serve s3``, ``dvc repro``
and the stage it runs. A run stopped with SIGTERM or SIGHUP stops everything it started itself;
a run killed with SIGKILL leaves nothing running (its children get a signal from the kernel when
it dies), and the next run cleans up what it left and completes. A failing stage is named, its
exit status passed on, and its last good outputs restored.
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
from pathlib import Path

import psutil
import pytest
import yaml

from project_support import completed_project, copy_completed, run_pipeline, tool_env

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path_factory: pytest.TempPathFactory, project_files: list[str]) -> Path:
    """A copy of a git repository with the project's files and tiny settings after one complete
    run (made once: it takes most of a minute)."""
    done = completed_project(tmp_path_factory.getbasetemp(), project_files)
    return copy_completed(done, tmp_path_factory.mktemp("repo") / "project")


@pytest.fixture
def params(project: Path) -> Path:
    """The copy's ``params.yaml``."""
    return project / "params.yaml"


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


def _dead_run_notice(output: str, pid: int) -> str:
    """The one line a run printed about cleaning up after the dead run ``pid``."""
    notices = [ln for ln in output.splitlines() if "cleaned up a dead run" in ln]
    assert len(notices) == 1, output[-3000:]
    assert f"(pid {pid})" in notices[0]
    assert "removed the S3 endpoint it left in .dvc/config.local" in notices[0]
    return notices[0]


def _stopped_by(
    project: Path,
    runner: subprocess.Popen[str],
    family: Family,
    log: Path,
    sig: signal.Signals,
    within: float,
) -> None:
    """The run exited with ``128 + sig`` saying so, and within ``within`` seconds nothing it
    started is left; its lock record and S3 endpoint are gone."""
    assert runner.wait(timeout=60) == 128 + sig
    assert f"make run: stopped by {sig.name}" in log.read_text()
    assert _wait_gone(family, timeout=within) == []
    assert not (project / ".switchprune-run.lock").read_text().strip()
    assert "endpointurl" not in (project / ".dvc" / "config.local").read_text()


def test_runs_stopped_or_killed_leave_nothing_and_the_next_run_cleans_up_and_completes(
    project: Path, params: Path, tmp_path: Path
) -> None:
    """Four runs stopped while training, one after the other, then one that completes.

    1. SIGTERM to the runner alone: it stops everything it started and undoes its settings.
    2. SIGHUP to its whole group (the terminal closed): handled like SIGTERM.
    3. ``kill -KILL -- -<pgid>`` of the runner: its S3 server, DVC and the stage die with it.
    4. SIGKILL of the process that leads DVC's group, the stage (a grandchild of the runner)
       frozen with SIGSTOP first so that it cannot end by itself either (writing to its closed
       stderr), then of the runner's group: only the next run can stop the stage, finding it
       by the dead run's token.

    Each run starts normally after the one before (a run that ends with a signal it handles
    leaves nothing to clean up); after a SIGKILLed run the next one says in one line what it
    cleaned up. The last one completes, and nothing of any of them is left.
    """
    lock = project / ".switchprune-run.lock"
    config_local = project / ".dvc" / "config.local"
    families: list[Family] = []
    try:
        runner, family = _start_a_long_run(project, params, tmp_path / "sigterm.log")
        families.append(family)
        runner.send_signal(signal.SIGTERM)  # the runner alone: it stops the others itself
        _stopped_by(project, runner, family, tmp_path / "sigterm.log", signal.SIGTERM, 1.0)

        runner, family = _start_a_long_run(project, params, tmp_path / "sighup.log")
        families.append(family)
        assert "cleaned up a dead run" not in (tmp_path / "sighup.log").read_text()
        os.killpg(runner.pid, signal.SIGHUP)  # the terminal closed: the whole group gets it
        _stopped_by(project, runner, family, tmp_path / "sighup.log", signal.SIGHUP, 5.0)

        log = tmp_path / "sigkill.log"
        runner, family = _start_a_long_run(project, params, log)
        families.append(family)
        assert "cleaned up a dead run" not in log.read_text()
        killed = json.loads(lock.read_text())
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(timeout=10)
        assert _wait_gone(family) == []  # its S3 server (in the family) included

        log = tmp_path / "orphan.log"
        runner, family = _start_a_long_run(project, params, log)
        families.append(family)
        _dead_run_notice(log.read_text(), killed["pid"])
        assert "is busy" not in log.read_text()
        orphaned = json.loads(lock.read_text())
        stage = _train_running(family)
        assert stage is not None
        stage.suspend()
        os.kill(orphaned["dvc_pgid"], signal.SIGKILL)
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(timeout=10)
        time.sleep(1)
        assert _train_running(family) is not None, "the stage should be orphaned"

        params.write_text(params.read_text().replace("epochs: 500", "epochs: 3"))
        last = run_pipeline(project)
        assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
        notice = _dead_run_notice(last.stderr, runner.pid)
        # The stage, and whatever shell DVC ran it through: at least one process.
        assert re.search(r"stopped [1-9]\d* process", notice), notice
        assert "is busy" not in last.stderr
        # Nothing of any run is alive: no rclone, no DVC, no stage.
        assert [_alive(f) for f in families] == [[]] * len(families)
        assert _rclones_of(project) == []  # nor the last run's S3 server
        assert not lock.read_text().strip()
        assert "endpointurl" not in config_local.read_text()
    finally:
        _kill_what_is_left(families)


def _kill_what_is_left(families: list[Family]) -> None:
    for family in families:
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
