"""Submit the compiled pipeline to Kubeflow Pipelines.

``python pipeline/submit.py --host URL [--experiment E] [--run-name R] [--package pipeline.yaml]``
(also ``switchprune submit``). Every pipeline parameter keeps the default compiled in from
``params.yaml``; the S3 and MLflow credentials come from the cluster's secrets, never from here.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path

from switchprune.errors import redact_uri

DEFAULT_EXPERIMENT = "switchprune"
HEALTHZ = "/apis/v2beta1/healthz"


class SubmitError(RuntimeError):
    """The run could not be submitted; the message says why in one line."""


def check_reachable(host: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line, if nothing answers HTTP at ``host``.

    Any HTTP answer counts (an auth proxy may answer 401/403); only a failed connection does not.

    Raises:
        SubmitError: If ``host`` is not an http(s) URL or does not answer.
    """
    parts = urllib.parse.urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(f"--host must be an http(s):// URL, got {redact_uri(host)!r}")
    try:
        with urllib.request.urlopen(host.rstrip("/") + HEALTHZ, timeout=timeout):  # noqa: S310
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        shown = redact_uri(host)
        raise SubmitError(f"Kubeflow Pipelines at {shown} is unreachable: {reason}") from exc


def submit(host: str, package: Path, *, experiment: str, run_name: str) -> str:
    """Create a run of ``package`` in ``experiment``; returns the run id.

    Raises:
        SubmitError: If the package is missing, the host unreachable, or the run refused.
    """
    if not package.is_file():
        raise SubmitError(f"{package} not found: compile the pipeline first ('make compile')")
    check_reachable(host)
    import kfp  # only this script and the pipeline code need kfp, never the library

    # The client warns on every call that it needs a v2 backend; the run is v2.
    warnings.filterwarnings("ignore", category=FutureWarning, module="kfp.client")
    try:
        client = kfp.Client(host=host)
        result = client.create_run_from_pipeline_package(
            str(package), arguments={}, run_name=run_name, experiment_name=experiment
        )
    except Exception as exc:  # kfp raises urllib3, ApiException, ValueError, ...
        status = getattr(exc, "status", None)
        detail = f"HTTP {status} {getattr(exc, 'reason', '')}".strip() if status else exc
        message = " ".join(str(detail).split())[:500]
        raise SubmitError(
            f"Kubeflow Pipelines at {redact_uri(host)} refused the run: {message}"
        ) from exc
    return str(result.run_id)


def main(argv: Sequence[str] | None = None) -> int:
    """Submit; print one line, and return 2 when the run could not be submitted."""
    parser = argparse.ArgumentParser(
        prog="pipeline/submit.py",
        description="Submit the compiled pipeline (pipeline.yaml) to Kubeflow Pipelines.",
    )
    parser.add_argument("--host", required=True, help="Kubeflow Pipelines API, e.g. http://...")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="(default: %(default)s)")
    parser.add_argument("--run-name", default=None, help="(default: switchprune-<timestamp>)")
    parser.add_argument("--package", default="pipeline.yaml", help="(default: %(default)s)")
    args = parser.parse_args(argv)
    run_name = args.run_name or f"switchprune-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    try:
        run_id = submit(
            args.host, Path(args.package), experiment=args.experiment, run_name=run_name
        )
    except SubmitError as exc:
        print(f"submit: error: {exc}", file=sys.stderr)
        return 2
    print(f"submitted run {run_name!r} ({run_id}) to experiment {args.experiment!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
