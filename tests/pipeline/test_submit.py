"""Submitting the compiled pipeline: ``pipeline/submit.py`` (``make submit``).

A small fake of the Kubeflow Pipelines REST API (v2beta1) records what the client sends, so
the test checks that the compiled package itself (both YAML documents) becomes the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp_support import ROOT, in_fresh_thread
from pipeline.compile import compile_pipeline
from pipeline.servers import free_port

SUBMIT = [sys.executable, str(ROOT / "pipeline" / "submit.py")]


class FakeKfp(BaseHTTPRequestHandler):
    """Answers the calls ``kfp.Client.create_run_from_pipeline_package`` makes."""

    calls: list[tuple[str, str, Any]] = []

    def _reply(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self.calls.append(("GET", self.path.split("?")[0], None))
        self._reply({"multi_user": False} if "healthz" in self.path else {})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        path = self.path.split("?")[0]
        self.calls.append(("POST", path, body))
        if path.endswith("/experiments"):
            self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        else:
            self._reply({"run_id": "run-1", "display_name": body["display_name"]})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def kfp_api() -> Iterator[str]:
    FakeKfp.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "pipeline.yaml"
    return in_fresh_thread(compile_pipeline, ROOT / "params.yaml", out)


def _posted(path: str) -> dict[str, Any]:
    (body,) = [b for method, p, b in FakeKfp.calls if method == "POST" and p.endswith(path)]
    return body


def test_submit_sends_the_compiled_package_as_a_run(kfp_api: str, package: Path) -> None:
    args = ["--host", kfp_api, "--package", str(package), "--experiment", "exp-a"]
    proc = subprocess.run(
        [*SUBMIT, *args, "--run-name", "run-a"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.strip().splitlines()[-1]
        == "submitted run 'run-a' (run-1) to experiment 'exp-a'"
    )
    assert _posted("/apis/v2beta1/experiments")["display_name"] == "exp-a"
    run = _posted("/apis/v2beta1/runs")
    assert run["display_name"] == "run-a" and run["experiment_id"] == "exp-1"
    spec, platform = yaml.safe_load_all(package.read_text())
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"] == spec["pipelineInfo"]
    assert run["pipeline_spec"]["pipeline_spec"]["root"]["dag"] == spec["root"]["dag"]
    assert run["pipeline_spec"]["platform_spec"] == platform
    assert run.get("runtime_config", {}).get("parameters", {}) == {}  # the compiled defaults


def test_an_unreachable_host_is_one_clear_line(package: Path) -> None:
    host = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [*SUBMIT, "--host", host, "--package", str(package)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"submit: error: Kubeflow Pipelines at {host}")
    assert "unreachable" in lines[0]


def test_a_missing_package_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*SUBMIT, "--host", "http://127.0.0.1:9", "--package", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"submit: error: {tmp_path / 'none.yaml'} not found: compile the pipeline first "
        "('make compile')"
    ]
