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
SIGTERM, SIGHUP or Ctrl-C stops everything the run started (the DVC process group, the S3
server) and undoes the settings it made. Whatever else ends the run (SIGKILL included), its
children are sent SIGTERM by the kernel (Linux), and the next run stops what may be left of it,
repairs ``.dvc/config.local`` and DVC's lock, says so in one line, and goes on.

A failing stage is named, with its own exit status (``make run`` exits with it), and its last
good outputs are restored from the DVC cache (``dvc repro`` removed them before running it).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil
import yaml

from switchprune import dvcfiles, storage
from switchprune.cli import EXIT_REFUSED
from switchprune.config import load_params
from switchprune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's ``pipeline`` package first
from pipeline.servers import (  # noqa: E402
    S3Server,
    dies_with_parent,
    s3_environment,
    supervised,
)

LOCK = ROOT / ".switchprune-run.lock"
# A random token in the environment of everything a run starts: what proves, after the run
# died, that a process is one of its own (a pid or group id reused since never carries it).
RUN_ENV = "SWITCHPRUNE_RUN"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
DVC_TMP = ROOT / ".dvc" / "tmp"


class Stopped(Exception):
    """SIGTERM, SIGHUP or SIGINT arrived: stop, clean up, exit."""


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def _say(text: str, *, err: bool = False) -> None:
    """Print a line; a terminal gone with SIGHUP must not cut the clean-up short."""
    try:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    except OSError:
        pass


class RunRecord:
    """What the folder's lock file says about the run holding it, kept current (JSON).

    ``pid`` and ``token`` (see :data:`RUN_ENV`) from the start; ``dvc_pgid`` while a command's
    process group runs; ``s3_pid``, ``endpoint`` and ``remote`` once the embedded S3 server is
    up and its endpoint is about to be written to ``.dvc/config.local``.
    """

    def __init__(self, fh: IO[str] | None = None) -> None:
        self._fh = fh
        self.fields: dict[str, Any] = {}

    def update(self, **fields: Any) -> None:
        """Record ``fields`` and rewrite the file (nothing when no lock is held)."""
        self.fields.update(fields)
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(json.dumps(self.fields) + "\n")
        self._fh.flush()


RECORD = RunRecord()  # the current run's, once it holds the lock


@contextmanager
def one_run_per_folder() -> Iterator[RunRecord]:
    """Hold an exclusive lock on this folder for the whole run, or refuse to start.

    A lock file that names a run although nobody holds the lock is a run that died without
    cleaning up (SIGKILL, a crash): :func:`clean_up_dead_run` stops and repairs what it left.
    """
    global RECORD
    with open(LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise SystemExit(
                f"make run: another run is in progress in {ROOT} ({_holder(fh.read())}); wait "
                "for it to finish (one run per folder)"
            ) from None
        fh.seek(0)
        notice = clean_up_dead_run(_parse_record(fh.read()))
        if notice:
            _say(notice, err=True)
        token = secrets.token_hex(16)
        os.environ[RUN_ENV] = token  # inherited by every process the run starts
        RECORD = RunRecord(fh)
        RECORD.update(pid=os.getpid(), token=token)
        try:
            yield RECORD
        finally:
            RECORD = RunRecord()
            fh.seek(0)
            fh.truncate()


def _parse_record(text: str) -> dict[str, Any]:
    try:
        record = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}  # an older run's "pid N": nothing to identify its processes by
    return record if isinstance(record, dict) else {}


def _holder(text: str) -> str:
    pid = _parse_record(text).get("pid")
    return f"pid {pid}" if pid else (text.strip() or "another process")


def clean_up_dead_run(record: dict[str, Any]) -> str | None:
    """Stop and repair what a run that died without cleaning up left behind.

    Its processes (the S3 server, DVC, the stage) are found by the run's token in their
    environment, so a pid or group id since reused by something else is never signalled; they
    get SIGTERM, then SIGKILL after 5 s. The S3 endpoint it wrote to ``.dvc/config.local`` is
    removed (its port is dead), and, once none of its processes is left, entries of dead
    processes in DVC's ``.dvc/tmp/rwlock`` (``.dvc/tmp/lock`` is an ``flock``, released by the
    kernel with its holder).

    Args:
        record: What the dead run's lock file said (see :class:`RunRecord`).

    Returns:
        One line saying what was done, or None when nothing had to be.
    """
    token = record.get("token")
    if not isinstance(token, str) or not token:
        return None
    done = []
    stopped = _stop_processes(_processes_of_run(token))
    if stopped:
        done.append(f"stopped {stopped} process{'es' if stopped > 1 else ''}")
    if _unset_endpoint(record.get("remote"), record.get("endpoint")):
        done.append("removed the S3 endpoint it left in .dvc/config.local")
    left = _processes_of_run(token)
    if left:
        done.append(f"could not stop pids {', '.join(str(p.pid) for p in left)}")
    elif cleared := _clear_stale_rwlock():
        done.append(f"cleared {cleared} stale entries from DVC's lock (.dvc/tmp/rwlock)")
    if not done:
        return None
    return f"make run: cleaned up a dead run (pid {record.get('pid', '?')}): {', '.join(done)}"


def _processes_of_run(token: str) -> list[psutil.Process]:
    """The live processes whose environment carries the run's ``token``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(RUN_ENV) == token:
                found.append(proc)
        except psutil.Error:
            continue  # gone, or not ours to read
    return found


def _terminate(proc: psutil.Process) -> None:
    """SIGTERM, then SIGCONT: a stopped process acts on SIGTERM only once it runs again."""
    proc.terminate()
    proc.resume()


def _stop_processes(procs: list[psutil.Process], grace: float = 5.0) -> int:
    """SIGTERM ``procs``, SIGKILL those still alive after ``grace`` seconds; how many there were."""
    alive = procs
    for send in (_terminate, psutil.Process.kill):
        for proc in alive:
            try:
                send(proc)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=grace)
        if not alive:
            break
    return len(procs)


def _unset_endpoint(remote: object, endpoint: object) -> bool:
    """Remove ``endpoint`` from ``remote`` in ``.dvc/config.local`` if it is still there."""
    config = ROOT / ".dvc" / "config.local"
    if not isinstance(remote, str) or not isinstance(endpoint, str) or not config.is_file():
        return False
    pattern = rf"^\s*endpointurl\s*=\s*{re.escape(endpoint)}\s*$"
    if not re.search(pattern, config.read_text(encoding="utf-8"), re.MULTILINE):
        return False  # already removed, or set since by hand
    try:
        set_endpoint(remote, None)
    except Exception:  # noqa: BLE001  (DVC's ConfigError, OSError: reported as not removed)
        return False
    return True


def set_endpoint(remote: str, endpoint: str | None) -> None:
    """Set ``remote``'s ``endpointurl`` in ``.dvc/config.local`` (unset it for ``None``).

    DVC's own config API, as ``dvc remote modify --local [--unset]`` uses it, in this process:
    a DVC process is most of a second to start, twice in every run.
    """
    from dvc.config import Config

    with Config(dvc_dir=str(ROOT / ".dvc")).edit("local") as conf:
        section = conf["remote"].setdefault(remote, {})
        if endpoint is None:
            section.pop("endpointurl", None)
        else:
            section["endpointurl"] = endpoint


def _clear_stale_rwlock() -> int:
    """Drop entries of processes that are not a live DVC from DVC's ``rwlock``; how many.

    DVC drops entries of dead pids itself, with a warning, but an entry whose pid was reused
    by another process would block the outputs it names ("... is busy") for good.
    """
    path = DVC_TMP / "rwlock"
    if not path.is_file():
        return 0
    # DVC edits the file under an flock of rwlock.lock (zc.lockfile); so do we.
    with open(DVC_TMP / "rwlock.lock", "a+") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # a live DVC is editing it
        try:
            lock = json.loads(path.read_text(encoding="utf-8"))
            write, read = dict(lock.get("write", {})), dict(lock.get("read", {}))
        except (OSError, ValueError, AttributeError, TypeError):
            return 0  # DVC reports a corrupt file itself
        before = len(write) + sum(len(v) for v in read.values())
        write = {out: info for out, info in write.items() if _is_live_dvc(info)}
        read = {out: kept for out, v in read.items() if (kept := [i for i in v if _is_live_dvc(i)])}
        cleared = before - len(write) - sum(len(v) for v in read.values())
        if cleared:
            path.write_text(json.dumps({"write": write, "read": read}), encoding="utf-8")
        return cleared


def _is_live_dvc(info: object) -> bool:
    try:
        cmdline = psutil.Process(int(info["pid"])).cmdline()  # type: ignore[index]
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False
    # ``…/bin/dvc …`` run by its interpreter, or ``python -m dvc …``
    return any(Path(arg).name == "dvc" for arg in cmdline[:3])


def _dvc_exe() -> str:
    exe = Path(sys.executable).parent / "dvc"
    return str(exe) if exe.exists() else "dvc"


def dvc(*args: str, check: bool = True, tee: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a DVC command in the repository; its output goes straight to the terminal.

    DVC and the stages it starts run in a process group of their own, so that an interrupted
    run stops all of them, not only DVC.
    """
    return in_group([_dvc_exe(), *args], check=check, tee=tee)


def in_group(
    cmd: list[str], check: bool = True, capture: bool = False, tee: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the repository in a process group of its own (see :func:`dvc`).

    The group is led by a supervisor (:func:`pipeline.servers.supervised`) that the kernel
    sends SIGTERM when this process dies, however it dies, and that then ends the whole group:
    DVC and the stage it runs do not outlive the run.

    Args:
        cmd: The command line.
        check: Raise :class:`subprocess.CalledProcessError` when it fails.
        capture: Capture stdout and stderr instead of showing them.
        tee: Show stderr as it comes and also return it (``CompletedProcess.stderr``).
    """
    _say(f"+ {' '.join(Path(cmd[0]).name if i == 0 else a for i, a in enumerate(cmd))}")
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(
        supervised(cmd),
        cwd=ROOT,
        text=True,
        start_new_session=True,
        preexec_fn=dies_with_parent(signal.SIGTERM),  # noqa: PLW1509
        stdout=pipe,
        stderr=subprocess.PIPE if capture or tee else None,
    )
    RECORD.update(dvc_pgid=proc.pid)
    tail: list[bytes] = []
    reader = None
    if tee:
        assert proc.stderr is not None
        reader = threading.Thread(target=_tee, args=(proc.stderr.fileno(), tail), daemon=True)
        reader.start()
    try:
        if tee:
            out, err = None, None
            proc.wait()
        else:
            out, err = proc.communicate()
    except BaseException:
        _end_group(proc)
        raise
    finally:
        if reader is not None:
            # A process that escaped the group may hold the pipe open: don't wait for it.
            reader.join(timeout=5)
            err = b"".join(tail).decode(errors="replace")
        RECORD.update(dvc_pgid=None)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tee(fd: int, tail: list[bytes], keep: int = 1 << 16) -> None:
    """Copy ``fd`` to this process's stderr as it comes (progress bars too); keep its end."""
    size = 0
    while chunk := os.read(fd, 1 << 16):
        try:
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
        except OSError:
            pass  # the terminal is gone; keep reading so the writers are not blocked
        tail.append(chunk)
        size += len(chunk)
        while size - len(tail[0]) >= keep:
            size -= len(tail.pop(0))


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
    """One run per folder; stop cleanly on SIGTERM, SIGHUP (terminal closed) or Ctrl-C."""
    release_only = "--release" in (sys.argv[1:] if argv is None else argv)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    try:
        with one_run_per_folder():
            return run(release_only=release_only)
    except Stopped as exc:
        _say(f"make run: stopped by {exc}; everything it started is stopped", err=True)
        return 128 + getattr(signal, str(exc)).value


def check_released_outputs_are_current() -> None:
    """Refuse to release outputs that ``dvc.lock`` does not record (stale or edited).

    Raises:
        UserError: Naming the stages ``dvc status`` reports as changed.
    """
    done = in_group([_dvc_exe(), "status", "--json"], False, True)
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


_FAILED_STAGE = re.compile(r"failed to reproduce '([^']+)'(?:.*exited with (-?\d+))?")


def stage_failed(stderr: str, dvc_status: int) -> int:
    """Name the stage ``dvc repro`` failed in, restore its last good outputs, pass on its status.

    DVC removes a stage's outputs before running it; those ``dvc.lock`` records (the last good
    ones) are checked out again from the cache.

    Args:
        stderr: What ``dvc repro`` wrote on stderr (its ``ERROR: failed to reproduce …`` line).
        dvc_status: DVC's own exit status (255 for any failure).

    Returns:
        The stage command's exit status when DVC reports it, else 1.
    """
    found = _FAILED_STAGE.findall(stderr)
    if not found:
        _say(f"make run: dvc repro failed (exit {dvc_status})", err=True)
        return 1
    stage, status = found[-1]
    code = int(status) if status else 0
    code = code if 0 < code < 256 else 1  # negative: killed by a signal
    _say(f"make run: stage '{stage}' failed (exit {status or 'unknown'})", err=True)
    lock = ROOT / "dvc.lock"
    recorded = yaml.safe_load(lock.read_text(encoding="utf-8")) if lock.is_file() else None
    if not isinstance(recorded, dict) or stage not in (recorded.get("stages") or {}):
        return code  # it never succeeded: there is nothing to restore
    # --force: what the failed stage left half-written in its outputs is not worth keeping.
    checkout = in_group([_dvc_exe(), "checkout", "--force", stage], check=False, capture=True)
    if checkout.returncode == 0:
        _say(f"make run: restored the last good outputs of '{stage}' (dvc checkout)", err=True)
    else:
        why = " ".join(checkout.stderr.split())[-300:]
        _say(f"make run: could not restore the outputs of '{stage}': {why}", err=True)
    return code


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
        # Before the endpoint is written: a run that dies from here on is cleaned up after.
        RECORD.update(s3_pid=server.pid, endpoint=endpoint, remote=remote)
        # Child processes (dvc and the stages it runs) inherit endpoint and credentials.
        os.environ.update(server.environment)
        print(f"embedded S3 server at {endpoint} (objects under .s3/data)", flush=True)
    try:
        print(f"+ dvc remote modify --local {remote} endpointurl {endpoint}", flush=True)
        set_endpoint(remote, endpoint)
        client = storage.make_client(endpoint)
        for bucket in {
            storage.parse_s3_uri(remote_url).bucket,
            storage.parse_s3_uri(promote_uri).bucket,
        }:
            storage.ensure_bucket(client, bucket)
        if release_only:
            check_released_outputs_are_current()
        else:
            done = dvc("repro", check=False, tee=True)
            if done.returncode != 0:
                return stage_failed(done.stderr or "", done.returncode)
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
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            try:
                print(f"+ dvc remote modify --local --unset {remote} endpointurl", flush=True)
                _unset_endpoint(remote, endpoint)
            finally:
                server.stop()


if __name__ == "__main__":
    sys.exit(main())
