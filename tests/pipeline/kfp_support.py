"""Helpers of the Kubeflow tests: tiny parameters, and a DVC remote on a real S3 server.

The remote is laid out the way DVC 3 stores a directory (``files/md5/<2>/<30>`` objects plus the
``.dir`` listing), holding the digits exported byte-identically from scikit-learn, as ``dvc push``
leaves raw data a user tracks with ``dvc add``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pipeline.servers import S3Server

from switchprune import storage
from switchprune.dvcfiles import dvc_md5

ROOT = Path(__file__).resolve().parents[2]
# A network of the user's own: concatenation, grouped conv, residual (``build_mixed``).
USER_FILE = ROOT / "tests" / "models" / "user_net.py"

DVC_REMOTE = "s3://switchprune-dvc/cache"
PROMOTE_URI = "s3://kfp-models/team"
MODEL_NAME = "switchprune-kfp-test"


def tiny_params() -> dict[str, Any]:
    """The project's params.yaml with a CPU-sized budget and a lenient gate."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["hidden"] = [32, 16]
    # ~40 batches per epoch: enough SNN steps for a usable model at any tnn_steps_per_snn_step.
    params["train"].update(epochs=4, batch_size=32, snn_hidden=8, target_ratio=0.5, device="cpu")
    params["evaluate"].update(latency_warmup=0, latency_repeats=1, device="cpu")
    params["register"]["model_name"] = MODEL_NAME
    params["promote"].update(
        s3_uri=PROMOTE_URI, min_accuracy=0.5, max_accuracy_drop=0.3, max_params_ratio=0.9
    )
    return params


@dataclass
class DvcRemote:
    """A running S3 server with the raw data on a DVC remote."""

    server: S3Server
    url: str
    md5: str

    @property
    def root(self) -> Path:
        """Where the server keeps its buckets."""
        return self.server.root


def push_dvc_dir(client: Any, remote_url: str, directory: Path) -> str:
    """Upload ``directory`` to a DVC remote as ``dvc push`` would; returns its DVC hash."""
    loc = storage.parse_s3_uri(remote_url)
    storage.ensure_bucket(client, loc.bucket)
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = dvc_md5(path)
        entries.append({"md5": digest, "relpath": path.relative_to(directory).as_posix()})
        key = loc.key("files", "md5", digest[:2], digest[2:])
        client.put_object(Bucket=loc.bucket, Key=key, Body=path.read_bytes())
    md5 = dvc_md5(directory)
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True).encode()
    key = loc.key("files", "md5", md5[:2], md5[2:])
    client.put_object(Bucket=loc.bucket, Key=key, Body=listing)
    return md5
