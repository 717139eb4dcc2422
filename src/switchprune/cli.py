"""Command line: one subcommand per stage, each a thin wrapper over ``stages.<verb>.run``.

Each subcommand reads its sections of ``params.yaml`` (validated before any work starts), calls
the stage with explicit paths and writes the returned metrics to ``reports/<verb>.json``.

Exit status: 0 when the command did its work (``promote``: promoted, or nothing to change),
1 when the environment failed (a server, the disk), 2 for bad input (parameters, files, a
name), and :data:`EXIT_REFUSED` (3) when ``promote``'s gate refused the version.

``train`` can also run where the project's files are not, as each node of a Kubeflow Trainer
``TrainJob`` does: ``--params`` may be an ``s3://`` URI, ``--prepared-uri`` and
``--network-uri`` name its inputs on S3, and ``--output-uri`` where rank 0 leaves its outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from switchprune.config import load_params
from switchprune.errors import InputError, UserError
from switchprune.io import HISTORY_FILE, write_json

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Allocations between two young-generation collections in a command's process (Python's default:
# 700). Importing torch and MLflow runs the collector hundreds of times otherwise.
GC_THRESHOLD = 100_000

# ``promote``: the gate refused the version; nothing moved (``reports/promote.json`` says why).
EXIT_REFUSED = 3

DEFAULTS = {
    "raw_dir": "data/raw",
    "prepared_dir": "data/prepared",
    "checkpoint_dir": "checkpoints",
    "trained_dir": "models/trained",
    "model_dir": "models/compact",
    "reports_dir": "reports",
}

# ``train --output-uri``: where each output lands under the prefix (a TrainJob's launcher reads
# them back from there).
OUTPUT_TRAINED = "trained"  # the files of --trained-dir
OUTPUT_HISTORY = HISTORY_FILE
OUTPUT_METRICS = "metrics.json"


def _preprocess(args: argparse.Namespace) -> dict[str, float]:
    from switchprune.stages import preprocess

    cfg = load_params(args.params, ["data"])["data"]
    raw_dir = Path(args.raw_dir or cfg.raw_dir)
    return preprocess.run(cfg, raw_dir=raw_dir, prepared_dir=Path(args.prepared_dir))


def _train(args: argparse.Namespace) -> dict[str, float]:
    from switchprune import distributed
    from switchprune.stages import train

    # evaluate: what a latency target is measured with (a TrainJob's file may not have it).
    p = load_params(args.params, ["model", "train", "data"], optional=["evaluate"])
    if p["train"].nproc_per_node > 1 and not distributed.launched():
        _relaunch_under_torchrun(p["train"].nproc_per_node, args.argv)
    # Every process of a torchrun job downloads its own copy: none waits on another's files.
    with tempfile.TemporaryDirectory(prefix="switchprune-inputs-") as tmp:
        if args.network_uri:
            _provide_network(args.network_uri, p["model"].arch, Path(tmp))
        prepared_dir, checkpoint_dir = Path(args.prepared_dir), Path(args.checkpoint_dir)
        on_checkpoint = None
        if args.checkpoint_uri:
            checkpoint_dir = Path(tmp) / "checkpoints"
            on_checkpoint = _checkpoints_on_s3(args.checkpoint_uri, checkpoint_dir)
        if args.prepared_uri:
            from switchprune import storage, transfer

            prepared_dir = Path(tmp) / "prepared"
            transfer.download_dir(storage.make_client(), args.prepared_uri, prepared_dir)
        return train.run(
            p["train"],
            model_cfg=p["model"],
            data_cfg=p["data"],
            prepared_dir=prepared_dir,
            trained_dir=Path(args.trained_dir),
            checkpoint_dir=checkpoint_dir,
            on_checkpoint=on_checkpoint,
            progress=not args.quiet,
            history_path=Path(args.reports_dir) / HISTORY_FILE,
            log_epochs=args.log_epochs,
            evaluate_cfg=p["evaluate"],
        )


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> NoReturn:
    """Replace this process by ``torchrun`` running the same command on ``nproc`` processes.

    ``exec`` keeps the process id, so whoever started ``train`` (``dvc repro``, ``make run``'s
    supervisor) waits for, and can stop, the launcher; torchrun stops its workers with it.
    """
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        raise InputError(f"train.nproc_per_node {nproc} needs torchrun beside {sys.executable}")
    args = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}"]
    os.execv(args[0], [*args, "-m", "switchprune", *argv])


def _checkpoints_on_s3(uri: str, folder: Path) -> Callable[[Path], None]:
    """Fetch the checkpoints under ``uri`` into ``folder``; the uploader of each new one.

    Every process fetches its own copy (the nodes share no disk), verified against its upload;
    none there is a fresh start. A checkpoint replaces its object whole, so a process killed
    mid-upload leaves the previous epoch's.
    """
    from switchprune import storage, transfer
    from switchprune.stages.train import CHECKPOINT_FILES

    client = storage.make_client()
    for name in CHECKPOINT_FILES:
        transfer.download_if_present(client, f"{uri.rstrip('/')}/{name}", folder / name)
    return lambda path: transfer.upload_file(client, f"{uri.rstrip('/')}/{path.name}", path)


def _provide_network(uri: str, arch: str, folder: Path) -> None:
    """Build ``arch``'s network from the copy of its file at ``uri`` (the path is not here)."""
    from switchprune import storage, transfer
    from switchprune.models import SOURCE_FILE, is_file_arch, provide_source

    if not is_file_arch(arch):
        raise InputError(f"--network-uri needs a model.arch 'path/to/file.py:build', not {arch!r}")
    path = folder / SOURCE_FILE
    transfer.download_file(storage.make_client(), uri, path)  # checked against its upload
    data = path.read_bytes()
    provide_source(data, hashlib.sha256(data).hexdigest(), arch)


def _upload_train_outputs(args: argparse.Namespace) -> None:
    """Rank 0 uploads the models, the history and the metrics under ``--output-uri``."""
    if os.environ.get("RANK", "0") not in ("", "0"):
        return  # the other ranks of a torchrun job hold the same networks and write nothing
    from switchprune import storage, transfer

    trained = Path(args.trained_dir)
    files = {f"{OUTPUT_TRAINED}/{p.name}": p for p in trained.iterdir() if p.is_file()}
    files[OUTPUT_HISTORY] = Path(args.reports_dir) / HISTORY_FILE
    files[OUTPUT_METRICS] = Path(args.metrics)
    transfer.upload_files(storage.make_client(), args.output_uri, files)


@contextlib.contextmanager
def _local_params(args: argparse.Namespace) -> Iterator[None]:
    """Within the block, ``args.params`` is a local file, downloaded if it was an S3 URI."""
    uri = getattr(args, "params", "")
    if not uri.startswith("s3://"):
        yield
        return
    from switchprune import storage, transfer

    with tempfile.TemporaryDirectory(prefix="switchprune-params-") as tmp:
        args.params = str(Path(tmp) / "params.yaml")
        try:
            transfer.download_file(storage.make_client(), uri, Path(args.params))
            yield
        finally:
            args.params = uri


def _prune(args: argparse.Namespace) -> dict[str, float]:
    from switchprune.stages import prune

    cfg = load_params(args.params, ["prune"])["prune"]
    return prune.run(cfg, trained_dir=Path(args.trained_dir), model_dir=Path(args.model_dir))


def _evaluate(args: argparse.Namespace) -> dict[str, float]:
    from switchprune.stages import evaluate

    p = load_params(args.params, ["evaluate", "data"])
    return evaluate.run(
        p["evaluate"],
        data_cfg=p["data"],
        prepared_dir=Path(args.prepared_dir),
        trained_dir=Path(args.trained_dir),
        model_dir=Path(args.model_dir),
    )


def _register(args: argparse.Namespace) -> dict[str, Any]:
    from switchprune.config import to_dict
    from switchprune.stages import register

    p = load_params(args.params)
    return register.run(
        p["register"],
        prepared_dir=Path(args.prepared_dir),
        model_dir=Path(args.model_dir),
        evaluate_path=Path(args.reports_dir) / "evaluate.json",
        history_path=Path(args.reports_dir) / HISTORY_FILE,
        params={name: to_dict(cfg) for name, cfg in p.items() if name not in ("register",)},
    )


def _promote(args: argparse.Namespace) -> dict[str, Any]:
    from switchprune.stages import promote

    cfg = load_params(args.params, ["promote"])["promote"]
    return promote.run(cfg, register_path=Path(args.reports_dir) / "register.json")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], str, list[str]]] = {
    "preprocess": (_preprocess, "prepare train/val/test splits", ["raw_dir", "prepared_dir"]),
    "train": (
        _train,
        "train the task net with its switcher (and the baseline)",
        ["prepared_dir", "trained_dir", "checkpoint_dir", "reports_dir"],
    ),
    "prune": (_prune, "threshold the factors and compact the net", ["trained_dir", "model_dir"]),
    "evaluate": (
        _evaluate,
        "measure the unpruned, gated and compacted nets",
        ["prepared_dir", "trained_dir", "model_dir"],
    ),
    "register": (
        _register,
        "log the run and register the compacted model in MLflow (alias: candidate)",
        ["prepared_dir", "model_dir", "reports_dir"],
    ),
    "promote": (
        _promote,
        "gate the registered version, copy it to S3 with a manifest, move the champion alias "
        "(exit status 3: the gate refused it)",
        ["reports_dir"],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``switchprune``."""
    parser = argparse.ArgumentParser(
        prog="switchprune",
        description="Learn which neurons a network needs with a switcher network, then ship "
        "the smaller network.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb, (_fn, help_text, paths) in COMMANDS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.add_argument(
            "--params",
            default="params.yaml",
            help="parameter file, or an s3:// URI to read it from (default: %(default)s)",
        )
        for name in paths:
            default = None if name == "raw_dir" else DEFAULTS[name]
            shown = "data.raw_dir" if name == "raw_dir" else default
            p.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                default=default,
                help=f"(default: {shown})",
            )
        p.add_argument(
            "--metrics",
            default=f"{DEFAULTS['reports_dir']}/{verb}.json",
            help="where to write the stage's metrics (default: %(default)s)",
        )
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if verb == "train":
            _add_remote_options(p)
    p = sub.add_parser(
        "pull",
        help="download a registered model's files from MLflow",
        description="Download a registered model's files (model.pt, widths.json, meta.json, "
        "evaluate.json) from MLflow. MLFLOW_TRACKING_URI names the server (default: the "
        "embedded store).",
    )
    p.add_argument(
        "ref", help="NAME (means NAME@champion), NAME@ALIAS, NAME:VERSION or models:/..."
    )
    p.add_argument("--out", required=True, help="destination folder")
    return parser


def _add_remote_options(p: argparse.ArgumentParser) -> None:
    """``train``'s options for a run whose inputs and outputs are on S3 (a TrainJob's node)."""
    p.add_argument(
        "--prepared-uri",
        metavar="S3_URI",
        help="read the prepared data from this S3 prefix instead of --prepared-dir",
    )
    p.add_argument(
        "--network-uri",
        metavar="S3_URI",
        help="the file of a 'path/to/file.py:build' model.arch, when the path is not here",
    )
    p.add_argument(
        "--output-uri",
        metavar="S3_URI",
        help="afterwards, rank 0 uploads the trained models, the history and the metrics here",
    )
    p.add_argument(
        "--checkpoint-uri",
        metavar="S3_URI",
        help="keep the per-epoch checkpoints under this S3 prefix instead of --checkpoint-dir: "
        "a run started anywhere (a restarted node, another machine) resumes from them",
    )
    p.add_argument(
        "--log-epochs",
        action="store_true",
        help="one log line per epoch (for logs, where no progress bar is seen; with -q)",
    )


def _fail(command: str, exc: BaseException) -> int:
    """Print ``exc`` on one line; exit 2 for bad input, 1 for a failure of the environment."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError):
        where = f" {exc.filename}" if exc.filename else ""
        text, code = f"{exc.strerror or exc}:{where}", 1
    else:
        text, code = str(exc), getattr(exc, "exit_code", 1)
    # One line, whatever the message holds (YAML and torch errors span several lines).
    message = " ".join(_ANSI.sub("", text).split())
    print(f"switchprune {command}: error: {message}", file=sys.stderr)
    return code


# Set to 1 to get the traceback of an error instead of its one-line message.
DEBUG_VARIABLE = "SWITCHPRUNE_DEBUG"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (it is replaced under test runners)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Show the package's INFO lines (uploads, registrations, promotions) on stderr."""
    logger = logging.getLogger("switchprune")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user-facing error is one line and exit status 2 (bad input) or 1.

    Returns:
        The exit status: 0, 1, 2, or :data:`EXIT_REFUSED` for a refused promotion.
    """
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a relaunch under torchrun
    configure_logging()
    try:
        if args.command == "pull":
            from switchprune.loading import pull

            info = pull(args.ref, Path(args.out))
            print(f"pulled {info['name']} version {info['version']} into {args.out}")
            return 0
        fn = COMMANDS[args.command][0]
        with _local_params(args):
            metrics: dict[str, Any] = fn(args)
    except (UserError, OSError) as exc:
        # Anything else is a bug: it keeps its traceback.
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise  # the whole traceback
        return _fail(args.command, exc)
    # Only the commands that train load torch.distributed (and may run under torchrun).
    ranks = sys.modules.get("switchprune.distributed")
    if ranks is not None and not ranks.is_main():
        return 0  # under torchrun, rank 0 writes the report and prints
    try:
        write_json(metrics, Path(args.metrics))
        if getattr(args, "output_uri", None):
            _upload_train_outputs(args)
    except (UserError, OSError) as exc:
        return _fail(args.command, exc)
    width = max((len(k) for k in metrics), default=0)
    for key in sorted(metrics):
        value = metrics[key]
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.command == "promote" and metrics.get("promoted") is False:
        # A refusal is not a success: scripts and CI must be able to tell it apart.
        print(f"switchprune promote: {metrics.get('reason', 'refused')}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


def entry() -> NoReturn:
    """The ``switchprune`` program (and ``python -m switchprune``): :func:`main` in its own process.

    A command's process is short-lived, and its tensors are freed by reference counting: the
    cyclic collector runs less often (importing torch and MLflow otherwise spends about a fifth
    of their time in it), and nothing is collected again at exit, where walking every object of
    those libraries once more takes most of a second.
    """
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
