"""Compile the Kubeflow pipeline: ``python pipeline/compile.py [--params P] [--out pipeline.yaml]``.

Validates ``params.yaml`` (every section, the way each stage does), reads the raw data's DVC
identity (the default remote's ``url`` in ``.dvc/config`` and the hash in
``data/raw/<dataset>.dvc``, when you track the data with DVC; the bundled digits need none) and
the current git commit, and writes the pipeline and platform
specs (two YAML documents) with ``kfp.compiler.Compiler``. A network of the user's own file
travels in the pipeline as text; an arch the project image could not build is refused here.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, the script's folder comes first and ``pipeline/pipeline.py`` would hide the
# ``pipeline`` package: the project root goes first.
sys.path.insert(0, str(ROOT))

from kfp import compiler  # noqa: E402

from pipeline.pipeline import build_pipeline  # noqa: E402
from switchprune import dvcfiles  # noqa: E402
from switchprune.config import DataConfig, load_params  # noqa: E402
from switchprune.data import BUNDLED, source_dir  # noqa: E402
from switchprune.errors import InputError  # noqa: E402
from switchprune.models import is_file_arch  # noqa: E402
from switchprune.models.zoo import is_user_arch  # noqa: E402
from switchprune.stages.register import git_state  # noqa: E402


def data_version(data: DataConfig, root: Path = ROOT) -> tuple[Path, str]:
    """The ``.dvc`` file of the configured dataset's raw data and the hash it records.

    Returns:
        ``(path, md5)``; ``md5`` is empty when the dataset is not tracked by DVC.

    Raises:
        InputError: If the ``.dvc`` file exists but records no hash.
    """
    path = root / source_dir(data, Path(data.raw_dir)).with_suffix(".dvc")
    return path, dvcfiles.recorded_md5(path)


def image_distributions(root: Path = ROOT) -> set[str]:
    """The distributions the project image installs: its runtime lock, torch's file, itself."""
    names = {"switchprune"}
    for lock in ("requirements-runtime.lock", "requirements-torch.txt"):
        for line in (root / lock).read_text().splitlines():
            name = re.split(r"[=<>~!\[; ]", line.strip(), maxsplit=1)[0]
            if name and not name.startswith(("#", "-")):
                names.add(_normalized(name))
    return names


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def network_source(arch: str, root: Path = ROOT) -> tuple[str, str]:
    """The content and SHA-256 of a ``path/to/file.py:build`` arch's file, for the pipeline.

    The pods run the project image, which holds the package but not the user's file: the
    compiled pipeline carries its text to the tasks that build the network. A
    ``package.module:build`` arch must come from a distribution the image installs.

    Returns:
        ``("", "")`` for an arch that is not a file.

    Raises:
        InputError: If the file is missing or not UTF-8 text, or the module's distribution is
            not in the image.
    """
    if not is_user_arch(arch):
        return "", ""
    where = arch.rpartition(":")[0]
    if not is_file_arch(arch):
        top = where.split(".", 1)[0]
        dists = metadata.packages_distributions().get(top, [])
        if top != "switchprune" and not {_normalized(d) for d in dists} & image_distributions(root):
            found = f"its distribution {', '.join(dists)}" if dists else "no distribution of it"
            raise InputError(
                f"[model] arch {arch!r}: {top} is not installed in the project image ({found} "
                "is in requirements-runtime.lock); add it there and rebuild the image, or name "
                "the file instead: 'path/to/file.py:build' travels with the pipeline"
            )
        return "", ""
    path = Path(where) if Path(where).is_absolute() else root / where
    if not path.is_file():
        raise InputError(
            f"[model] arch {arch!r}: {path} is not a file; the cluster could not build the network"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"[model] arch {arch!r}: {path} is not UTF-8 text") from exc
    return text, hashlib.sha256(data).hexdigest()


def compile_pipeline(params_path: Path, out_path: Path, root: Path = ROOT) -> Path:
    """Validate the parameters and write the compiled pipeline.

    Args:
        params_path: The parameter file.
        out_path: Where the compiled pipeline (YAML) goes.
        root: The project root (``.dvc/config``, ``data/raw/*.dvc``, git).

    Returns:
        ``out_path``.

    Raises:
        InputError: If a parameter, the DVC config or the data's ``.dvc`` file is invalid.
    """
    params = load_params(params_path)
    dvc_file, md5 = data_version(params["data"], root)
    if not md5 and params["data"].dataset not in BUNDLED:
        print(
            f"compile: warning: {dvc_file} not found: the preprocess task will prepare "
            f"{params['data'].dataset!r} from its source, not from a DVC-versioned copy",
            file=sys.stderr,
        )
    source, sha256 = network_source(params["model"].arch, root)
    commit = git_state(root)["git_commit"]
    pipeline_func = build_pipeline(
        params,
        dvc_remote=dvcfiles.default_remote(root)[1],
        data_md5=md5,
        git_commit=commit,
        arch_source=source,
        arch_sha256=sha256,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func, package_path=str(out_path))
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    """Compile; print one line, and return 2 on a bad parameter or config."""
    parser = argparse.ArgumentParser(
        prog="pipeline/compile.py", description="Compile the Kubeflow pipeline from params.yaml."
    )
    parser.add_argument("--params", default="params.yaml", help="(default: %(default)s)")
    parser.add_argument("--out", default="pipeline.yaml", help="(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = compile_pipeline(Path(args.params), Path(args.out))
    except InputError as exc:
        print(f"compile: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"compiled the pipeline into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
