"""``make run``: the whole pipeline on one machine, from versioned data to a promoted model.

1. S3: ``SWITCHPRUNE_S3_ENDPOINT`` (with ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) names
   the server; when unset, a real S3 server (``rclone serve s3``) is started on 127.0.0.1 on a
   free port, backed by ``.s3/`` so objects persist, and stopped at the end. DVC, MLflow and
   boto3 all take the endpoint from that one setting.
2. Data: nothing to fetch for the default dataset. ``preprocess`` exports scikit-learn's bundled
   digits byte-identically (their hash is in ``meta.json`` and every model); data you track
   yourself (``dvc add data/raw/<name>``) is a DVC data source like any other.
3. ``dvc repro`` runs the experiment stages (preprocess, train, prune, evaluate), as it does on
   its own in a fresh clone; ``dvc push`` uploads the cached outputs.
4. Release: ``switchprune register`` then ``switchprune promote`` on the outputs. They are not
   DVC stages, so ``dvc exp run`` never registers or promotes; ``make release`` (this script
   with ``--release``) releases the workspace's result after checking that ``dvc status`` is
   clean, i.e. that the outputs are the ones ``dvc.lock`` records.

Exit status: 0 when the model was promoted or nothing had to change, 3 when the promotion gate
refused it (``reports/promote.json`` says why), 2 for bad input, 1 when a step failed.

MLflow: ``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store (``mlflow.db``).

One run per folder: a second run while one is going is refused before it touches anything.
SIGTERM or Ctrl-C stops everything the run started (the DVC process group, the S3 server) and
undoes the settings it made.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from switchprune import dvcfiles, storage
from switchprune.cli import EXIT_REFUSED
from switchprune.config import load_params
from switchprune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's ``pipeline`` package first
from pipeline.servers import S3Server, s3_environment  # noqa: E402

LOCK = ROOT / ".switchprune-run.lock"


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: stop, clean up, exit."""


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


@contextmanager
def one_run_per_folder() -> Iterator[None]:
    """Hold an exclusive lock on this folder for the whole run, or refuse to start."""
    with open(LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise SystemExit(
                f"make run: another run is in progress in {ROOT} ({holder}); wait for it to "
                "finish (one run per folder)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a DVC command in the repository; its output goes straight to the terminal.

    DVC and the stages it starts run in a process group of their own, so that an interrupted
    run stops all of them, not only DVC.
    """
    exe = Path(sys.executable).parent / "dvc"
    return in_group([str(exe) if exe.exists() else "dvc", *args], check=check)


def in_group(
    cmd: list[str], check: bool = True, capture: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the repository in a process group of its own (see :func:`dvc`)."""
    print(
        f"+ {' '.join(Path(cmd[0]).name if i == 0 else a for i, a in enumerate(cmd))}", flush=True
    )
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(
        cmd, cwd=ROOT, text=True, start_new_session=True, stdout=pipe, stderr=pipe
    )
    try:
        out, err = proc.communicate()
    except BaseException:
        _end_group(proc)
        raise
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _end_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; its group may not be: make sure.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def main(argv: list[str] | None = None) -> int:
    """One run per folder; stop cleanly on SIGTERM or Ctrl-C."""
    release_only = "--release" in (sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        with one_run_per_folder():
            return run(release_only=release_only)
    except Stopped as exc:
        print(f"make run: stopped by {exc}; everything it started is stopped", file=sys.stderr)
        return 128 + getattr(signal, str(exc)).value


def check_released_outputs_are_current() -> None:
    """Refuse to release outputs that ``dvc.lock`` does not record (stale or edited).

    Raises:
        UserError: Naming the stages ``dvc status`` reports as changed.
    """
    exe = Path(sys.executable).parent / "dvc"
    done = in_group([str(exe) if exe.exists() else "dvc", "status", "--json"], False, True)
    try:
        status = json.loads(done.stdout or "{}")
    except json.JSONDecodeError:
        status = {"dvc status": done.stderr.strip()}
    if done.returncode != 0 or status:
        stages = ", ".join(sorted(status)) or "dvc status failed"
        raise UserError(
            f"the workspace's outputs are not those dvc.lock records ({stages}): "
            "run 'dvc repro' (or 'dvc exp apply <exp>') before releasing"
        )


def release() -> int:
    """Register the evaluated model, then promote it: the only steps that touch the services.

    Returns:
        0 when promoted or already the champion, :data:`EXIT_REFUSED` when the gate refused.

    Raises:
        subprocess.CalledProcessError: When either command failed.
    """
    in_group([sys.executable, "-m", "switchprune", "register"])
    promote = [sys.executable, "-m", "switchprune", "promote"]
    done = in_group(promote, check=False)
    if done.returncode == EXIT_REFUSED:
        print(
            "make run: the promotion gate refused the model (reasons above and in "
            "reports/promote.json); the champion and S3 are unchanged",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, promote)
    return 0


def run(release_only: bool = False) -> int:
    """Set up S3, run the pipeline, push data and outputs, release, stop what was started."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    try:
        # Every section is checked before anything starts: a bad file is one line, no server.
        params = load_params(ROOT / "params.yaml")
        remote, remote_url = dvcfiles.default_remote(ROOT)
    except UserError as exc:
        print("make run: " + " ".join(str(exc).split()), file=sys.stderr)
        return exc.exit_code
    promote_uri = params["promote"].s3_uri
    server: S3Server | None = None
    endpoint = os.environ.get(storage.ENDPOINT_ENV)
    if endpoint:
        os.environ.update(s3_environment(endpoint))
    else:
        server = S3Server(ROOT / ".s3" / "data", log_path=ROOT / ".s3" / "server.log").start()
        endpoint = server.endpoint
        # Child processes (dvc and the stages it runs) inherit endpoint and credentials.
        os.environ.update(server.environment)
        print(f"embedded S3 server at {endpoint} (objects under .s3/data)", flush=True)
    try:
        dvc("remote", "modify", "--local", remote, "endpointurl", endpoint)
        client = storage.make_client(endpoint)
        for bucket in {
            storage.parse_s3_uri(remote_url).bucket,
            storage.parse_s3_uri(promote_uri).bucket,
        }:
            storage.ensure_bucket(client, bucket)
        if release_only:
            check_released_outputs_are_current()
        else:
            dvc("repro")
            dvc("push")
        return release()
    except subprocess.CalledProcessError as exc:
        what = " ".join(str(a) for a in exc.cmd[1:4] if not str(a).startswith("-"))
        print(f"make run: {what} failed (exit {exc.returncode})", file=sys.stderr)
        return 1
    except UserError as exc:
        print("make run: " + " ".join(str(exc).split()), file=sys.stderr)
        return exc.exit_code
    finally:
        if server is not None:
            # The embedded server's port is gone after this run: don't leave DVC pointing at it.
            # A second signal must not cut this short.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            try:
                dvc("remote", "modify", "--local", "--unset", remote, "endpointurl", check=False)
            finally:
                server.stop()


if __name__ == "__main__":
    sys.exit(main())
