"""The MLflow side of a compacted model: log a run, register a version, move aliases, pull files.

Every function takes the tracking URI (:func:`resolve_tracking_uri`), also the registry URI, and
uses a client of its own (SQLite store or ``mlflow server``); MLflow's global URIs are left
alone. A version carries the served model with the plain files (``model.pt``, ...) as extra
files, tags, and the model card as description. Aliases are used, not (deprecated) stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy
import requests
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModel, LoggedModelOutput, Metric, Param, Run, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS, MLFLOW_PARENT_RUN_ID

from switchprune import names
from switchprune.errors import InputError, ServiceFailure, redact_uri, reraised_as
from switchprune.io import (
    ArtifactError,
    file_digest,
    load_torch,
    model_digest,
    move_into,
    staging_dir,
)

if TYPE_CHECKING:
    import torch

    from switchprune import serving

# torch, the served form and MLflow's PyTorch flavour are imported where a model is logged:
# reading versions and moving aliases (promote) starts without them.

DEFAULT_ARTIFACT_ROOT = "mlruns"
DEFAULT_ALIAS = "champion"
MODEL_FILE = "model.pt"
SHA_TAG = "model_sha256"
# A version's identity: its content (spec, kept indices, tensor values), not its file's bytes,
# so that equal weights written twice never become a second version.
CONTENT_TAG = "model_content_sha256"
MODEL_ARTIFACT = "model"
EXTRA_FILES_DIR = "extra_files"

# Applied (unless already set) during every call, so that MLflow's HTTP client gives up on a dead
# server within seconds instead of retrying 7 times; MLflow reads them from the environment only.
FAIL_FAST_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # MLflow parses it as an int
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
RECHECK_S = 30.0

_REF_RE = re.compile(r"^(?P<name>[^@:/\s]+)(?:@(?P<alias>[^@:/\s]+)|:(?P<version>[^@:/\s]+))?$")
_URI_REF_RE = re.compile(r"^models:/(?P<name>[^@/\s]+)(?:@(?P<alias>[^@/\s]+)|/(?P<version>\S+))$")
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")
# When each tracking server last answered its health check (time.monotonic()).
_ANSWERED: dict[str, float] = {}
# Held while FAIL_FAST_ENV is applied (re-entrant: a call may make another).
_ENV_LOCK = threading.RLock()


class RegistryError(ServiceFailure, RuntimeError):
    """The registry cannot do what was asked; the message names the URI, model, alias or version."""


class RegistryInputError(RegistryError, InputError):
    """An invalid name, alias, reference or file (as opposed to the server failing)."""

    exit_code = 2


class _NotFoundError(RegistryInputError):
    """A model, alias or version does not exist (as opposed to the server failing)."""


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, by alias or by number (neither: alias ``champion``)."""

    name: str
    alias: str | None = None
    version: int | None = None  # exclusive with alias

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.alias is not None and self.version is not None:
            raise RegistryInputError(
                f"model reference {self.name!r}: give an alias or a version, not both "
                f"(alias={self.alias!r}, version={self.version})"
            )
        if self.alias is not None:
            _check_alias(self.alias)
        if self.version is not None and (
            isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1
        ):
            raise RegistryInputError(
                f"model reference {self.name!r}: version must be a positive integer, "
                f"got {self.version!r}"
            )

    @property
    def effective_alias(self) -> str | None:
        """The alias to resolve: the given one, ``champion`` if neither is given, else ``None``."""
        return None if self.version is not None else self.alias or DEFAULT_ALIAS

    @property
    def uri(self) -> str:
        """The ``models:/`` URI of this reference."""
        tail = f"/{self.version}" if self.version is not None else f"@{self.effective_alias}"
        return f"models:/{self.name}{tail}"


@dataclass(frozen=True)
class Registration:
    """One model to log and register: what goes into the run, the model and the version."""

    experiment: str  # created (at artifact_location) if absent
    model_name: str
    alias: str  # set on the version, e.g. "candidate"
    model: torch.nn.Module  # logged in eval mode, then put back in its mode
    files: Mapping[str, Path]  # for the run and the model, by the name they get; has model.pt
    input_example: numpy.ndarray  # a small batch of raw images: uint8 N×C×H×W, 0..255
    # Nested params are logged as "section.key" (lists as JSON), metrics likewise (numbers only).
    params: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, Any] = field(default_factory=dict)  # for the run and the version
    # Per-channel (mean, std) applied to [0, 1] pixels if model.pt has no input contract
    # (default 0, 1); else it must match that contract.
    normalization: tuple[Sequence[float], Sequence[float]] | None = None
    description: str | None = None  # the version's (Markdown: the model card)
    artifacts: Mapping[str, Path] = field(default_factory=dict)  # for the run only, by name
    history: Sequence[Mapping[str, float]] = ()  # per epoch: metric epoch_<key> at step epoch
    # Artifact root of a new experiment; default: the server's for HTTP, ./mlruns otherwise.
    artifact_location: str | None = None


def _check_name(name: str) -> None:
    if not names.is_name(name):
        raise RegistryInputError(f"invalid model name {name!r}: {names.NAME_RULE}")


def _check_alias(alias: str) -> None:
    if not names.is_alias(alias):
        raise RegistryInputError(f"invalid alias {alias!r}: {names.ALIAS_RULE}")


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _short(exc: BaseException) -> str:
    """One line describing ``exc``, without the credentials of the URI MLflow may repeat."""
    text = redact_uri(" ".join(str(exc).split())) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:400] + '...' if len(text) > 400 else text}"


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code == _NOT_FOUND


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _best_effort(fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
    except Exception:
        return False
    return True


def _translated(what: str, tracking_uri: str) -> contextlib.AbstractContextManager[None]:
    """Turn any failure inside the block (MLflow, HTTP, OS) into one readable RegistryError."""
    shown = redact_uri(tracking_uri)
    return reraised_as(
        RegistryError, lambda exc: RegistryError(f"{what} at {shown} failed: {_short(exc)}")
    )


@contextlib.contextmanager
def _client(tracking_uri: str) -> Iterator[MlflowClient]:
    """A client of ``tracking_uri`` with :data:`FAIL_FAST_ENV` applied, one thread at a time."""
    with _ENV_LOCK:
        added = {k: v for k, v in FAIL_FAST_ENV.items() if k not in os.environ}
        os.environ.update(added)
        try:
            yield MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        finally:
            for name in added:
                os.environ.pop(name, None)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: ``uri``, else ``MLFLOW_TRACKING_URI``, else the embedded store.

    Returns:
        The first not blank, else ``sqlite:////<project_root()>/mlflow.db``.

    Raises:
        RegistryInputError: The URI has no scheme (MLflow would take it for a folder).
    """
    text = (uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not text:
        return f"sqlite:///{project_root() / 'mlflow.db'}"
    if not re.fullmatch(r"[a-z][a-z0-9+.-]+", urllib.parse.urlsplit(text).scheme):
        raise RegistryInputError(
            f"MLFLOW_TRACKING_URI {redact_uri(text)!r} is not a URI: use "
            "http(s)://host:port, sqlite:///path/mlflow.db or file:///path"
        )
    return text


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (the working directory) with ``params.yaml``."""
    here = (start or Path.cwd()).resolve()
    return next((f for f in (here, *here.parents) if (f / "params.yaml").is_file()), here)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for an in-memory database)."""
    rest = uri[len("sqlite://") :]
    path = urllib.parse.unquote(rest[1:].split("?", 1)[0]) if rest.startswith("/") else ""
    return None if path in ("", ":memory:") else Path(path)


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail early if a server does not answer ``/health`` or a local store is not writable.

    Raises:
        RegistryError: The server does not answer, or the store's folder is not usable.
    """
    shown = redact_uri(tracking_uri)
    if _is_http(tracking_uri):
        if time.monotonic() - _ANSWERED.get(tracking_uri, -math.inf) < RECHECK_S:
            return
        try:  # requests sends credentials in the URI as Basic auth, as MLflow's client does
            status = requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout).status_code
        except requests.RequestException as exc:
            reason = getattr(exc.args[0], "reason", exc) if exc.args else exc  # urllib3's, if any
            raise RegistryError(
                f"MLflow tracking server at {shown} is unreachable: {redact_uri(str(reason))} "
                "(check MLFLOW_TRACKING_URI, or start the server)"
            ) from exc
        if status != 200:
            raise RegistryError(
                f"MLflow tracking server at {shown} is unreachable: /health answered {status}"
            )
        _ANSWERED[tracking_uri] = time.monotonic()
    elif tracking_uri.startswith("sqlite:") and (db := _sqlite_path(tracking_uri)) is not None:
        folder = db.absolute().parent
        if not folder.is_dir():
            raise RegistryError(f"MLflow tracking store {shown}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise RegistryError(f"MLflow tracking store {shown}: {folder} is not writable")
    elif tracking_uri.startswith("file:") or "://" not in tracking_uri:
        local = urllib.parse.unquote(urllib.parse.urlparse(tracking_uri).path)
        path = Path(local if tracking_uri.startswith("file:") else tracking_uri).absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        if not os.access(path, os.W_OK):
            raise RegistryError(f"MLflow tracking store {shown}: {path} is not writable")


def parse_model_ref(text: str) -> ModelRef:
    """Parse a model reference given on the command line or in a config.

    Accepted: ``NAME`` (meaning ``NAME@champion``), ``NAME@ALIAS``, ``NAME:VERSION``,
    ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``.

    Raises:
        RegistryError: The text is none of these, or holds an invalid name, alias or version.
    """
    forms = "NAME, NAME@ALIAS, NAME:VERSION, models:/NAME@ALIAS or models:/NAME/VERSION"
    raw = text.strip() if isinstance(text, str) else ""
    match = _URI_REF_RE.match(raw) if raw.startswith("models:") else _REF_RE.match(raw)
    if match is None:
        raise RegistryInputError(f"invalid model reference {text!r}: expected {forms}")
    name, alias, version = match["name"], match["alias"], match["version"]
    if version is None:
        return ModelRef(name, alias=alias or DEFAULT_ALIAS)
    if not version.isdigit() or int(version) < 1:
        raise RegistryInputError(
            f"invalid model reference {text!r}: version {version!r} is not a positive integer"
        )
    return ModelRef(name, version=int(version))


def _resolve(client: MlflowClient, ref: ModelRef) -> ModelVersion:
    """The model version ``ref`` names; :class:`_NotFoundError` naming what is missing."""
    shown = redact_uri(client.tracking_uri)
    try:
        registered = client.get_registered_model(ref.name)
    except MlflowException as exc:
        if _is_not_found(exc):
            raise _NotFoundError(f"no registered model {ref.name!r} at {shown}") from exc
        raise
    alias, number = ref.effective_alias, ref.version
    if alias is not None:
        aliases = dict(registered.aliases or {})
        if alias not in aliases:
            known = ", ".join(f"{a}->v{v}" for a, v in sorted(aliases.items())) or "none"
            raise _NotFoundError(
                f"registered model {ref.name!r} at {shown} has no alias {alias!r} "
                f"(aliases: {known})"
            )
        number = int(aliases[alias])
    try:
        return client.get_model_version(ref.name, str(number))
    except MlflowException as exc:
        if _is_not_found(exc):
            where = f"alias {alias!r} points to " if alias else ""
            raise _NotFoundError(
                f"registered model {ref.name!r} at {shown}: {where}version {number}, "
                "which does not exist"
            ) from exc
        raise


def _info(client: MlflowClient, mv: ModelVersion, alias: str | None) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    if mv.run_id:
        try:
            metrics = dict(client.get_run(mv.run_id).data.metrics)
        except MlflowException as exc:
            if not _is_not_found(exc):
                raise
    return {
        "name": mv.name,
        "version": int(mv.version),
        "alias": alias,
        "aliases": sorted(mv.aliases or []),
        "run_id": mv.run_id,
        "tags": dict(mv.tags or {}),
        "metrics": metrics,
        "model_uri": f"models:/{mv.name}/{int(mv.version)}",
        "source": mv.source,
        "status": mv.status,
    }


@contextlib.contextmanager
def _reading(uri: str, ref: ModelRef, what: str) -> Iterator[tuple[MlflowClient, ModelVersion]]:
    """A client and the version ``ref`` names; reading never creates a missing SQLite store."""
    db = _sqlite_path(uri) if uri.startswith("sqlite:") else None
    if db is not None and not db.is_file():
        raise RegistryInputError(
            f"no MLflow tracking store at {db.absolute()} (set MLFLOW_TRACKING_URI to the "
            "store or server that holds the model)"
        )
    check_reachable(uri)
    with _client(uri) as client, _translated(what, uri):
        yield client, _resolve(client, ref)


def version_info(tracking_uri: str, ref: ModelRef) -> dict[str, Any]:
    """Describe the model version ``ref`` names.

    Returns:
        ``name``, ``version``, ``alias`` (the one resolved), ``aliases``, ``run_id``, ``tags``,
        ``metrics`` (the run's), ``model_uri``, ``source`` and ``status``.

    Raises:
        RegistryError: Unknown model, alias or version, or the store cannot be reached.
    """
    with _reading(tracking_uri, ref, f"reading {ref.uri}") as (client, mv):
        return _info(client, mv, ref.effective_alias)


def get_alias_version(tracking_uri: str, model_name: str, alias: str) -> dict[str, Any] | None:
    """The version an alias points to, as :func:`version_info` describes it.

    Returns:
        None if the model or the alias does not exist.

    Raises:
        RegistryError: The store cannot be reached, or the name or alias is invalid.
    """
    try:
        return version_info(tracking_uri, ModelRef(model_name, alias=alias))
    except _NotFoundError:
        return None


def set_alias(tracking_uri: str, model_name: str, alias: str, version: int) -> None:
    """Point ``alias`` at ``version`` of ``model_name`` (moving it if it pointed elsewhere).

    Raises:
        RegistryError: Unknown model or version, invalid alias, or the store cannot be reached.
    """
    ref = ModelRef(model_name, version=version)
    _check_alias(alias)
    check_reachable(tracking_uri)
    what = f"setting alias {alias!r} of {model_name!r} to version {version}"
    with _client(tracking_uri) as client, _translated(what, tracking_uri):
        _resolve(client, ref)
        client.set_registered_model_alias(model_name, alias, str(version))


def download_model_version(tracking_uri: str, ref: ModelRef, out_dir: Path) -> dict[str, Any]:
    """Download a version's plain files into ``out_dir``, once ``model.pt`` matches its tag.

    Returns:
        The :func:`version_info` of the version downloaded, plus ``files`` (sorted names).

    Raises:
        RegistryError: Unknown model, alias or version, no files, a corrupt download, or no store.
    """
    with _reading(tracking_uri, ref, f"pulling {ref.uri}") as (client, mv):
        info = _info(client, mv, ref.effective_alias)
        location = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
        source, what = f"{location}/{EXTRA_FILES_DIR}", f"version {info['version']} of {ref.name!r}"
        with staging_dir(out_dir) as tmp:
            got = Path(download_artifacts(source, dst_path=str(tmp), tracking_uri=tracking_uri))
            files = sorted(p.name for p in got.iterdir() if p.is_file()) if got.is_dir() else []
            if not files:
                raise RegistryError(
                    f"{what} has no files to pull (nothing under {EXTRA_FILES_DIR}/)"
                )
            expected = info["tags"].get(SHA_TAG)
            if expected and MODEL_FILE in files and file_digest(got / MODEL_FILE) != expected:
                raise RegistryError(
                    f"{what}: downloaded {MODEL_FILE} does not match its {SHA_TAG} tag"
                )
            move_into(got, out_dir, files)
        return {**info, "files": files}


def _check(registration: Registration) -> None:
    """Refuse invalid names, examples and history, and missing, clashing or oddly named files."""
    _check_name(registration.model_name)
    _check_alias(registration.alias)
    if not registration.experiment or not isinstance(registration.experiment, str):
        raise RegistryInputError(f"invalid experiment name {registration.experiment!r}")
    files, artifacts = registration.files, registration.artifacts
    example = numpy.asarray(registration.input_example)
    if example.dtype != numpy.uint8 or example.ndim != 4:
        raise RegistryInputError(
            "input_example must be raw uint8 pixels N×C×H×W, as the served model takes them; "
            f"got {example.dtype} of shape {example.shape}"
        )
    if MODEL_FILE not in files:
        raise RegistryInputError(f"files must include {MODEL_FILE!r} (got {sorted(files)})")
    if clash := sorted(set(artifacts) & set(files)):
        raise RegistryInputError(f"artifacts {clash} clash with files")
    for name, path in {**files, **artifacts}.items():
        if "/" in name or name in ("", ".", ".."):
            raise RegistryInputError(f"file name {name!r} must be a plain file name")
        if not Path(path).is_file():
            raise RegistryInputError(f"file {name!r} not found at {path}")
    if bad := [sorted(r) for r in registration.history if "epoch" not in r]:
        raise RegistryInputError(f"history record without 'epoch': {bad[0]}")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _artifact_location(tracking_uri: str, given: str | None) -> str | None:
    """A local artifact root as an absolute ``file:`` URI; URIs and server-side roots as given."""
    if given is None:
        if _is_http(tracking_uri):
            return None
        return (project_root() / DEFAULT_ARTIFACT_ROOT).resolve().as_uri()
    if "://" in given or given.startswith(("file:", "mlflow-artifacts:")) or _is_http(tracking_uri):
        return given
    return Path(given).expanduser().resolve().as_uri()


def _start_run(client: MlflowClient, tracking_uri: str, registration: Registration) -> Run:
    """Create the run as ``mlflow.start_run(nested=True)`` would, and its experiment if needed."""
    experiment = client.get_experiment_by_name(registration.experiment)
    if experiment is None:
        location = _artifact_location(tracking_uri, registration.artifact_location)
        experiment_id = client.create_experiment(registration.experiment, location)
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    parent = mlflow.active_run()
    tags = resolve_tags({MLFLOW_PARENT_RUN_ID: parent.info.run_id} if parent else {})
    run_name = f"register-{registration.model_name}"
    return client.create_run(experiment_id, tags=tags, run_name=run_name)


def _terminate(client: MlflowClient, run_id: str, status: str) -> None:
    # MLflow prints "View run ... at <url>" on ending a run: to stderr, so that stdout stays ours.
    with contextlib.redirect_stdout(sys.stderr):
        client.set_terminated(run_id, status)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Raise one logger to ERROR for the block (for warnings about choices made here)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _served_contract(registration: Registration) -> serving.InputContract:
    """``model.pt``'s input contract (checked against ``normalization``), else one from its spec."""
    import torch

    from switchprune import serving

    model, normalization = registration.model, registration.normalization
    model_file = Path(registration.files[MODEL_FILE])
    try:
        stored = serving.contract_of(load_torch(model_file), model_file)
    except (ArtifactError, ValueError) as exc:
        raise RegistryInputError(str(exc)) from exc
    if stored is not None:
        given = tuple(tuple(map(float, n)) for n in normalization) if normalization else None
        if given is not None and given != (stored.mean, stored.std):
            raise RegistryInputError(
                f"normalization {normalization} disagrees with the input contract of "
                f"{model_file} (mean {list(stored.mean)}, std {list(stored.std)})"
            )
        return stored
    if (spec := getattr(model, "spec", None)) is not None:
        shape, classes = tuple(spec.in_shape), spec.num_classes
    else:
        shape = numpy.asarray(registration.input_example).shape[1:]
        with torch.no_grad():
            classes = int(model(torch.zeros(1, *shape)).shape[-1])
    mean, std = normalization or ([0.0] * shape[0], [1.0] * shape[0])
    try:
        return serving.InputContract(
            shape=shape,  # type: ignore[arg-type]
            mean=tuple(map(float, mean)),
            std=tuple(map(float, std)),
            classes=tuple(map(str, range(classes))),
        )
    except ValueError as exc:
        raise RegistryInputError(f"{model_file}: {exc}") from exc


def _log_model(
    client: MlflowClient,
    run: Run,
    registration: Registration,
    extra_files: list[str],
    params: list[Param],
    metrics: list[Metric],
) -> LoggedModel:
    """Log the served form as the run's model: raw ``uint8`` in, normalisation inside.

    ``mlflow.pytorch.log_model``'s steps without its global tracking URI. No tensor signature
    (MLflow would cast a float batch to ``uint8`` before the model could refuse it).
    """
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch

    from switchprune import serving

    model, example = registration.model, registration.input_example
    contract, was_training = _served_contract(registration), model.training
    served = serving.ServedModel(model, contract).eval()
    try:
        with torch.no_grad():
            served(torch.as_tensor(example))  # the example must satisfy the contract
        run_id = run.info.run_id
        logged = client.create_logged_model(
            run.info.experiment_id,
            name=MODEL_ARTIFACT,
            source_run_id=run_id,
            tags=resolve_tags(),
            params={p.key: p.value for p in params},
        )
        try:
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
            # The run's summary metrics are the model's too, as log_model links them.
            linked = [Metric(m.key, m.value, m.timestamp, 0, logged.model_id) for m in metrics]
            client.log_batch(run_id, metrics=linked)
            mlflow_model = Model(
                artifact_path=logged.artifact_location,
                run_id=run_id,
                model_uuid=logged.model_id,
                model_id=logged.model_id,
                metadata={serving.INPUT_KEY: contract.to_dict()},
            )
            # Pickle is a deliberate choice (pt2 loads back as a GraphModule, not our class).
            with tempfile.TemporaryDirectory() as tmp, _quiet("mlflow.pytorch"):
                path = str(Path(tmp) / MODEL_ARTIFACT)
                mlflow.pytorch.save_model(
                    served,
                    path,
                    mlflow_model=mlflow_model,
                    serialization_format="pickle",
                    signature=False,
                    input_example=example,
                    pip_requirements=serving.serving_requirements(),
                    extra_files=extra_files,
                    code_paths=[str(serving.package_dir())],
                )
                pyfunc = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME]
                pyfunc[mlflow.pyfunc.MAIN] = "switchprune.serving"
                mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))
                client.log_model_artifacts(logged.model_id, path)
        except BaseException:
            _best_effort(client.finalize_logged_model, logged.model_id, "FAILED")
            raise
        return client.finalize_logged_model(logged.model_id, "READY")
    finally:
        model.train(was_training)


@dataclass
class _Attempt:
    """How far a registration got: what it was doing, and the version it registered."""

    run_id: str
    step: str = "logging params and metrics"
    version: str | None = None


def _log_and_register_run(
    client: MlflowClient, run: Run, reg: Registration, tags: dict[str, str], attempt: _Attempt
) -> str:
    """Log the run's records, files and model, then register, describe and alias the version."""
    run_id, name, uri = run.info.run_id, reg.model_name, client.tracking_uri
    now = int(time.time() * 1000)
    params = [
        Param(k, json.dumps(list(v), default=str) if isinstance(v, list | tuple) else str(v))
        for k, v in _flatten(reg.params).items()
    ]
    metrics = [Metric(k, float(v), now, 0) for k, v in _flatten(reg.metrics).items() if _finite(v)]
    stepped = [
        Metric(f"epoch_{k}", float(v), now, int(record["epoch"]))
        for record in reg.history
        for k, v in record.items()
        if k != "epoch" and _finite(v)
    ]
    with tempfile.TemporaryDirectory(prefix="switchprune-register-") as scratch:
        # Every file under the name it gets, so that one upload names them all.
        staging = Path(scratch)
        for file_name, path in {**reg.files, **reg.artifacts}.items():
            shutil.copyfile(path, staging / file_name)
        runtags = [RunTag(k, v) for k, v in tags.items()]
        client.log_batch(run_id, metrics=metrics, params=params, tags=runtags)
        attempt.step = "logging the training history"
        client.log_batch(run_id, metrics=stepped)  # in batches of the size MLflow accepts
        attempt.step = "uploading files"
        client.log_artifacts(run_id, str(staging))
        attempt.step = "logging the model"
        extra = [str(staging / file_name) for file_name in sorted(reg.files)]
        logged = _log_model(client, run, reg, extra, params, metrics)
    attempt.step = f"registering model {name!r}"
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in _EXISTS:
            raise
    # A SQLite store would look a models:/ source up through MLflow's global tracking URI, so
    # it gets the logged model's location; a server resolves the source itself.
    source = f"models:/{logged.model_id}" if _is_http(uri) else logged.artifact_location
    created = client.create_model_version(name, source, run_id, tags, model_id=logged.model_id)
    attempt.version = version = str(created.version)
    # Links the logged model to its version, as mlflow.register_model does.
    link = json.dumps([{"name": name, "version": created.version}])
    client.set_logged_model_tags(logged.model_id, {MLFLOW_MODEL_VERSIONS: link})
    if reg.description is not None:
        attempt.step = f"setting the description of version {version}"
        client.update_model_version(name, version, description=reg.description)
    attempt.step = f"setting alias {reg.alias!r} on version {version}"
    client.set_registered_model_alias(name, reg.alias, version)
    return version


def _roll_back(client: MlflowClient, name: str, attempt: _Attempt) -> str:
    """Delete the version registered so far, mark the run FAILED (best effort); what happened."""
    note = ""
    if attempt.version and not _best_effort(client.delete_model_version, name, attempt.version):
        note = f"; version {attempt.version} is left without the alias, registering again sets it"
    ended = _best_effort(_terminate, client, attempt.run_id, "FAILED")
    return f"run {attempt.run_id} {'marked' if ended else 'could not be marked'} FAILED{note}"


def _result(model_name: str, run_id: str, version: str | int, *, changed: bool) -> dict[str, Any]:
    model_uri = f"models:/{model_name}/{int(version)}"
    return {"run_id": run_id, "version": int(version), "model_uri": model_uri, "changed": changed}


def log_and_register(
    tracking_uri: str,
    registration: Registration,
    describe: Callable[[Path], tuple[str, Mapping[str, Path]]] | None = None,
) -> dict[str, Any]:
    """Log one run, register its model as a new version and set the alias.

    A version with the same ``model_content_sha256`` is reused (only the alias is set). On a
    failure the run is marked ``FAILED`` and a version without its alias deleted (best effort).

    Args:
        tracking_uri: The MLflow tracking URI.
        registration: What to log and register.
        describe: Writes a new version's description and the run's extra artifacts into the
            folder it is given, and returns them (they join ``registration``'s). Called only
            when a new version is made: a reused one needs no card drawn.

    Returns:
        ``run_id``, ``version`` (int), ``model_uri`` and ``changed`` (False if reused).

    Raises:
        RegistryError: Invalid input, an unreachable store, or any MLflow failure (with its step).
    """
    _check(registration)
    model_file = Path(registration.files[MODEL_FILE])
    try:  # model_sha256: the file's bytes; model_content_sha256: its content
        identity = {SHA_TAG: file_digest(model_file), CONTENT_TAG: model_digest(model_file)}
    except ArtifactError as exc:
        raise RegistryInputError(str(exc)) from exc
    check_reachable(tracking_uri)
    name, alias = registration.model_name, registration.alias
    with _client(tracking_uri) as client:
        with _translated(f"looking up {name!r}", tracking_uri):
            query = f"name='{name}' and tags.{CONTENT_TAG}='{identity[CONTENT_TAG]}'"
            found = client.search_model_versions(query)
        if ready := [mv for mv in found if mv.status in (None, "READY")]:
            existing = max(ready, key=lambda mv: int(mv.version))
            with _translated(f"setting alias {alias!r} of {name!r}", tracking_uri):
                client.set_registered_model_alias(name, alias, existing.version)
            return _result(name, existing.run_id, existing.version, changed=False)
        with tempfile.TemporaryDirectory(prefix="switchprune-describe-") as scratch:
            if describe is not None:
                text, extra = describe(Path(scratch))
                artifacts = {**registration.artifacts, **extra}
                registration = replace(registration, description=text, artifacts=artifacts)
                _check(registration)
            run_id, version = _new_version(client, tracking_uri, registration, identity)
    return _result(name, run_id, version, changed=True)


def _new_version(
    client: MlflowClient, tracking_uri: str, registration: Registration, identity: dict[str, str]
) -> tuple[str, int]:
    """Start the run, log and register it (rolled back on failure), finish it: (run id, version)."""
    name = registration.model_name
    with _translated(f"opening experiment {registration.experiment!r}", tracking_uri):
        run = _start_run(client, tracking_uri, registration)
    tags = {**{k: str(v) for k, v in registration.tags.items()}, **identity}
    attempt = _Attempt(run.info.run_id)
    try:
        version = _log_and_register_run(client, run, registration, tags, attempt)
    except BaseException as exc:
        outcome = _roll_back(client, name, attempt)
        if not isinstance(exc, Exception):
            raise
        raise RegistryError(
            f"registering {name!r} at {redact_uri(tracking_uri)} failed while "
            f"{attempt.step} ({outcome}): {_short(exc)}"
        ) from exc
    with _translated(f"finishing run {attempt.run_id}", tracking_uri):
        _terminate(client, attempt.run_id, "FINISHED")
    return attempt.run_id, version
