"""Local services on 127.0.0.1: S3 (``rclone serve s3``), MLflow, and a served model.

The S3 server and ``mlflow server`` are what ``make run`` uses when no endpoint is configured;
tests also serve registered models with ``mlflow models serve``. All run as child processes in
their own process group, so stopping them also ends anything they spawned, and (on Linux) they
are sent SIGTERM when the process that started them dies, however it dies.

Run as a script (``python pipeline/servers.py supervise -- CMD…``), this file is the small
supervisor :func:`supervised` describes; it imports only the standard library, so it starts
in milliseconds.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

# Linux prctl(2) options.
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


class ServiceError(RuntimeError):
    """A local service could not be started or reached."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def s3_environment(endpoint: str) -> dict[str, str]:
    """Environment variables through which boto3, MLflow and DVC's S3 client find ``endpoint``.

    The endpoint is named once (``SWITCHPRUNE_S3_ENDPOINT``); MLflow reads
    ``MLFLOW_S3_ENDPOINT_URL`` and botocore ``AWS_ENDPOINT_URL_S3``.
    """
    # Imported here: the supervisor (this file run as a script) must not load the package.
    from switchprune.storage import ENDPOINT_ENV

    return {
        ENDPOINT_ENV: endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
    }


def _tool(name: str) -> str:
    """A console script of this environment (beside the interpreter), else from ``PATH``."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"{name!r} is not installed (run 'make setup')")
    return found


def _prctl() -> Callable[..., int] | None:
    """``prctl(2)`` from the C library, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def dies_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child sent ``sig`` when its parent dies, even by SIGKILL.

    Linux only (``PR_SET_PDEATHSIG``); elsewhere None, i.e. no ``preexec_fn``: the child is then
    stopped by its parent's clean-up or by the next run's dead-run clean-up instead. The signal
    follows the death of the *thread* that started the child: start children from the main
    thread.

    Args:
        sig: The signal the child gets: SIGTERM lets it clean up, SIGKILL does not wait.
    """
    prctl = _prctl()  # looked up before the fork: the child only makes the call
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: nobody will signal us
            os.kill(os.getpid(), sig)

    return preexec


class _Stop(Exception):
    """The supervisor was told to stop."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signum)


def supervise(cmd: list[str], grace: float = 10.0) -> int:
    """Run ``cmd`` and, when told to stop, end everything in this process group.

    The caller starts this process as the leader of a new process group that ``cmd`` and all
    it spawns (DVC and the stage it runs) share, with :func:`dies_with_parent`. When the caller
    dies (SIGKILL included), SIGTERM, SIGHUP or SIGINT arrives here, and this sends SIGTERM to
    the group, reaps it for up to ``grace`` seconds, then SIGKILLs what is left. A direct child
    alone could not do that: the parent-death signal reaches only the caller's own children, not
    the stage DVC starts. On Linux this process is also the group's subreaper, so orphaned
    grandchildren come back to it and can be waited for.

    Args:
        cmd: The command line to run.
        grace: Seconds between SIGTERM and SIGKILL.

    Returns:
        ``cmd``'s exit status (128 + N when it died of signal N), or 128 + the signal that
        stopped the group.
    """
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    try:
        # SIGKILL: should this supervisor itself be SIGKILLed, DVC goes with it.
        child = subprocess.Popen(cmd, preexec_fn=dies_with_parent(signal.SIGKILL))  # noqa: PLW1509
        code = child.wait()
        return 128 - code if code < 0 else code
    except _Stop as exc:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        _end_own_group(grace, reaps_orphans=prctl is not None)
        return 128 + int(exc.args[0])


def _end_own_group(grace: float, *, reaps_orphans: bool) -> None:
    """SIGTERM this process group, wait for its members, then SIGKILL it (this process too)."""
    os.killpg(os.getpgrp(), signal.SIGTERM)  # ignored here, by now
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            if reaps_orphans:  # every member is a descendant, reparented here: none is left
                return
            break
        if pid == 0:
            time.sleep(0.05)
    # Stragglers, or no way to know there are none: this ends them, and this process.
    os.killpg(os.getpgrp(), signal.SIGKILL)


def supervised(cmd: list[str]) -> list[str]:
    """``cmd`` run under :func:`supervise`.

    Start the result with ``start_new_session=True`` and ``preexec_fn=dies_with_parent()``, so
    that whatever ends the caller ends all of it.
    """
    return [sys.executable, str(Path(__file__).resolve()), "supervise", "--", *cmd]


class _Process:
    """A child process in its own process group, ended with its whole group."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id), once started."""
        return None if self.proc is None else self.proc.pid

    def _spawn(
        self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                # The server does not outlive whoever started it (make run, a test).
                preexec_fn=dies_with_parent(signal.SIGTERM),  # noqa: PLW1509
            )

    def _wait_until(self, ready: object, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise ServiceError(f"{self.name} exited with code {self.proc.returncode}: {tail}")
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.1)
        self.stop()
        raise ServiceError(f"{self.name} did not become ready within {timeout:.0f} s")

    def stop(self) -> None:
        """End the process group: SIGTERM, then SIGKILL after a grace period."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class S3Server(_Process):
    """``rclone serve s3`` on 127.0.0.1, serving the buckets that are folders under ``root``.

    Objects are plain files and persist across runs. Keys are generated per start unless given,
    and handed to clients through :attr:`credentials` only (never written to disk).
    """

    def __init__(
        self,
        root: Path,
        *,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        root = Path(root)
        super().__init__("rclone serve s3", log_path or root.parent / f"{root.name}.log")
        self.root = root
        self.port = port or free_port()
        self.access_key = access_key or "sp" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_hex(20)

    @property
    def endpoint(self) -> str:
        """The server's URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def credentials(self) -> dict[str, str]:
        """The environment variables every S3 client here reads credentials from."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @property
    def environment(self) -> dict[str, str]:
        """Endpoint and credentials, for child processes or ``os.environ``."""
        return {**s3_environment(self.endpoint), **self.credentials}

    def start(self, timeout: float = 20.0) -> S3Server:
        """Start the server and wait until it accepts connections."""
        self.root.mkdir(parents=True, exist_ok=True)
        # The key pair goes through the environment, not the command line (visible in ps).
        # rclone reads list options from the environment as CSV: quote the pair.
        env = {**os.environ, "RCLONE_AUTH_KEY": f'"{self.access_key},{self.secret_key}"'}
        args = [_tool("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{self.port}"]
        self._spawn([*args, "--config", "/dev/null", str(self.root)], env)
        self._wait_until(lambda: _port_open(self.port), timeout)
        return self

    def __enter__(self) -> S3Server:
        return self.start()


class MlflowServer(_Process):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and artifacts in S3 (or a folder)."""

    def __init__(
        self,
        backend_uri: str,
        artifacts_destination: str,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_path: Path,
    ) -> None:
        super().__init__("mlflow server", log_path)
        self.backend_uri = backend_uri
        self.artifacts_destination = artifacts_destination
        self.port = port or free_port()
        self.env = env or {}

    @property
    def uri(self) -> str:
        """The tracking URI."""
        return f"http://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 90.0) -> MlflowServer:
        """Start the server and wait until ``/health`` answers."""
        args = [
            _tool("mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            self.artifacts_destination,
        ]
        # The server's job runner (eight more processes importing MLflow) serves no store here.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, **self.env}
        self._spawn(args, env)
        self._wait_until(self._healthy, timeout)
        return self

    def __enter__(self) -> MlflowServer:
        return self.start()


class ModelServer(_Process):
    """``mlflow models serve`` of a registered model on 127.0.0.1, in the current environment."""

    def __init__(
        self,
        model_uri: str,
        *,
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
        port: int | None = None,
    ) -> None:
        super().__init__("mlflow models serve", log_path)
        self.model_uri = model_uri
        self.env = env
        self.cwd = cwd
        self.port = port or free_port()

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 180.0) -> ModelServer:
        """Start serving and wait until ``/ping`` answers."""
        args = [_tool("mlflow"), "models", "serve", "-m", self.model_uri]
        args += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(self.port)]
        self._spawn(args, self.env, cwd=self.cwd)
        self._wait_until(self._healthy, timeout)
        return self

    def invoke(self, payload: object) -> tuple[int, object]:
        """POST a JSON payload to ``/invocations``; the HTTP status and the decoded answer."""
        request = urllib.request.Request(
            f"{self.url}/invocations",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def __enter__(self) -> ModelServer:
        return self.start()


__all__ = [
    "MlflowServer",
    "ModelServer",
    "S3Server",
    "ServiceError",
    "dies_with_parent",
    "free_port",
    "s3_environment",
    "supervise",
    "supervised",
]


if __name__ == "__main__":
    if sys.argv[1:3] != ["supervise", "--"] or len(sys.argv) < 4:
        sys.exit("usage: servers.py supervise -- CMD [ARG…]")
    sys.exit(supervise(sys.argv[3:]))
