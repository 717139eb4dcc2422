"""Fixtures of the Kubeflow tests; ``components/`` and ``pipeline/`` import from the root."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kfp_support import DVC_REMOTE, DvcRemote, push_dvc_dir  # noqa: E402
from pipeline.servers import S3Server  # noqa: E402

from switchprune import storage  # noqa: E402
from switchprune.data import export_digits  # noqa: E402


@pytest.fixture(scope="module")
def dvc_remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DvcRemote]:
    """A real S3 server (rclone) whose DVC remote holds the digits; its endpoint and keys are
    in the environment for the whole module, as the Kubernetes secrets put them in a pod."""
    root = tmp_path_factory.mktemp("s3")
    with S3Server(root / "buckets", log_path=root / "s3.log") as server:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in server.environment.items():
                mp.setenv(key, value)
            client = storage.make_client(server.endpoint)
            md5 = push_dvc_dir(client, DVC_REMOTE, export_digits(root / "export" / "digits"))
            yield DvcRemote(server=server, url=DVC_REMOTE, md5=md5)
