"""The MLflow side of a compacted model: log a run, register a version, move aliases, pull files.

Every function takes the tracking URI explicitly (see :func:`resolve_tracking_uri`) and works
the same against an embedded SQLite store and an ``mlflow server``. For the duration of each
call MLflow's tracking and registry URIs are pointed at that URI, and its HTTP client is made to
fail fast (few retries, short timeout) unless the caller set those variables already, so an
unreachable server is reported within seconds instead of retried for minutes. The previous
global MLflow state is restored afterwards. Threads take turns: one session at a time.

A registered version carries:

* the served model (``mlflow.pytorch``, pickle format: a
  :class:`~switchprune.serving.ServedModel` that takes raw ``uint8`` images and normalises them
  itself), with the ``switchprune`` package as its code, so ``mlflow models predict/serve`` and
  ``mlflow.pytorch.load_model("models:/NAME@ALIAS")`` need only its pinned requirements. Its
  pyfunc is :mod:`switchprune.serving`'s, which refuses anything but ``uint8`` pixels (see
  there why it has no tensor signature); the input contract is in the model's metadata;
* the plain files (``model.pt``, ``widths.json``, ...) as the model's extra files, which
  :func:`download_model_version` fetches without unpickling anything;
* the tags ``model_sha256`` (of ``model.pt``'s bytes), ``model_content_sha256`` (of its
  content: the version's identity) and whatever the caller adds (``data_md5``,
  ``git_commit``);
* a description (the model card) when the caller gives one; the card's files and the
  per-epoch training history (stepped metrics) belong to the run.

Stages are not used (deprecated in MLflow); aliases are.
"""

from __future__ import annotations

import base64
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
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import mlflow.pytorch
import numpy
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

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
from switchprune.serving import (
    INPUT_KEY,
    InputContract,
    ServedModel,
    contract_of,
    package_dir,
    serving_requirements,
)

DEFAULT_ARTIFACT_ROOT = "mlruns"
DEFAULT_ALIAS = "champion"
MODEL_FILE = "model.pt"
SHA_TAG = "model_sha256"
# Identity of a registered model: its content (spec, kept indices, tensor values), not the bytes
# of its file, so that equal weights written twice never become a second version.
CONTENT_TAG = "model_content_sha256"
MODEL_ARTIFACT = "model"
EXTRA_FILES_DIR = "extra_files"

# Applied (unless already set) for the duration of every call, so MLflow's HTTP client gives up
# after a few seconds on a dead server instead of retrying 7 times with exponential backoff.
FAIL_FAST_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # MLflow parses it as an int
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

_REF_RE = re.compile(r"^(?P<name>[^@:/\s]+)(?:@(?P<alias>[^@:/\s]+)|:(?P<version>[^@:/\s]+))?$")
_URI_REF_RE = re.compile(r"^models:/(?P<name>[^@/\s]+)(?:@(?P<alias>[^@/\s]+)|/(?P<version>\S+))$")
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


class RegistryError(ServiceFailure, RuntimeError):
    """The registry cannot do what was asked; the message names the URI, model, alias or version."""


class _NotFoundError(RegistryError, InputError):
    """A model, alias or version does not exist (as opposed to the server failing)."""

    exit_code = 2


class RegistryInputError(RegistryError, InputError):
    """An invalid name, alias, reference or file (as opposed to the server failing)."""

    exit_code = 2


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, by alias or by number.

    Attributes:
        name: Registered model name.
        alias: Alias to resolve (``None`` with no version means ``champion``).
        version: Version number (exclusive with ``alias``).
    """

    name: str
    alias: str | None = None
    version: int | None = None

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
        if self.version is not None:
            return None
        return self.alias or DEFAULT_ALIAS

    @property
    def uri(self) -> str:
        """The ``models:/`` URI of this reference."""
        if self.version is not None:
            return f"models:/{self.name}/{self.version}"
        return f"models:/{self.name}@{self.effective_alias}"


@dataclass(frozen=True)
class Registration:
    """One model to log and register: what goes into the run, the model and the version.

    Attributes:
        experiment: Experiment name (created with ``artifact_location`` if absent).
        model_name: Registered model name.
        alias: Alias to set on the version (e.g. ``candidate``).
        model: The network (logged in eval mode; its train/eval mode is restored).
        files: Files to attach to the run and the model, by the name they get (must include
            ``model.pt``).
        input_example: A small batch of raw images (numpy ``uint8`` ``N×C×H×W``, 0..255), the
            served model's input example.
        params: Parameters, possibly nested by section; logged as ``section.key`` (lists as
            JSON text).
        metrics: Metrics, possibly nested, flattened the same way (text and booleans are left
            out).
        tags: Tags for the run and the version (e.g. ``data_md5``, ``git_commit``).
        normalization: Per-channel ``(mean, std)`` of ``[0, 1]`` pixels that the served model
            applies to its raw input, for a ``model.pt`` without an input contract (default:
            none, i.e. mean 0 and std 1); with a contract, it must agree with it.
        description: The version's description (Markdown: the model card).
        artifacts: More files for the run only (the card and its pictures), by the name they
            get.
        history: Per-epoch records with an ``epoch`` field; every other key becomes the
            stepped metric ``epoch_<key>`` (step = the record's ``epoch``).
        artifact_location: Artifact root of a new experiment (a local folder or a URI);
            default: the server's for HTTP, the project's ``mlruns`` folder otherwise.
    """

    experiment: str
    model_name: str
    alias: str
    model: torch.nn.Module
    files: Mapping[str, Path]
    input_example: numpy.ndarray
    params: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, Any] = field(default_factory=dict)
    normalization: tuple[Sequence[float], Sequence[float]] | None = None
    description: str | None = None
    artifacts: Mapping[str, Path] = field(default_factory=dict)
    history: Sequence[Mapping[str, float]] = ()
    artifact_location: str | None = None


# --------------------------------------------------------------------------------------------
# Small helpers


def _check_name(name: str) -> None:
    if not names.is_name(name):
        raise RegistryInputError(f"invalid model name {name!r}: {names.NAME_RULE}")


def _check_alias(alias: str) -> None:
    if not names.is_alias(alias):
        raise RegistryInputError(f"invalid alias {alias!r}: {names.ALIAS_RULE}")


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _short(exc: BaseException) -> str:
    """One line describing ``exc`` (MLflow messages can span many lines)."""
    # MLflow's messages repeat the URI they called, credentials included.
    text = redact_uri(" ".join(str(exc).split())) or type(exc).__name__
    if len(text) > 400:
        text = text[:400] + "..."
    return f"{type(exc).__name__}: {text}"


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code == _NOT_FOUND


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return json.dumps(list(value), default=str)
    return str(value)


def _numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flattened metrics that are real numbers (booleans and text are left out)."""
    return {
        key: float(value)
        for key, value in _flatten(metrics).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise some MLflow loggers to ERROR for the block (for warnings about choices we made)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


# Held for the whole of an MLflow session (re-entrant: a session may call another).
_SESSION_LOCK = threading.RLock()


@contextlib.contextmanager
def mlflow_session(tracking_uri: str) -> Iterator[MlflowClient]:
    """Point MLflow at ``tracking_uri`` (tracking and registry) and make HTTP fail fast.

    Everything is restored on exit: the global tracking/registry URIs and the environment
    variables MLflow sets as a side effect (``MLFLOW_TRACKING_URI``, ``MLFLOW_REGISTRY_URI``).

    Args:
        tracking_uri: The tracking URI to use.

    Yields:
        A client bound to that URI.
    """
    # MLflow's fluent calls (start_run, log_model, register_model) and its resolution of
    # models:/ URIs read only the process-wide URIs, so those must be set. The public getters
    # resolve them (environment, default) and cannot tell "never set" from "set", so the
    # values to restore are read from the modules that hold them.
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # That state is process-wide: sessions of different threads take turns, or one thread's
    # restore would point another's calls at the wrong store.
    with _SESSION_LOCK:
        names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", *FAIL_FAST_ENV)
        saved_env = {name: os.environ.get(name) for name in names}
        saved_tracking = getattr(tracking_utils, "_tracking_uri", None)
        saved_registry = getattr(registry_utils, "_registry_uri", None)
        for name, value in FAIL_FAST_ENV.items():
            os.environ.setdefault(name, value)
        try:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
            yield MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        finally:
            # None unsets either URI; the environment they touch is put back just below.
            mlflow.set_tracking_uri(saved_tracking)  # type: ignore[arg-type]
            mlflow.set_registry_uri(saved_registry)  # type: ignore[arg-type]
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


# --------------------------------------------------------------------------------------------
# URIs and references


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``MLFLOW_TRACKING_URI``, else the embedded store.

    Args:
        uri: An explicit tracking URI (empty counts as not given).

    Returns:
        The URI, e.g. ``http://127.0.0.1:5000``, or the embedded store
        ``sqlite:////abs/path/mlflow.db`` in the project's root (:func:`project_root`).

    Raises:
        RegistryInputError: The URI has no scheme MLflow could use (a typo would otherwise
            become a folder of that name in the working directory).
    """
    for candidate in (uri, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate and candidate.strip():
            text = candidate.strip()
            scheme = urllib.parse.urlsplit(text).scheme
            if not re.match(r"^[a-z][a-z0-9+.-]*$", scheme) or len(scheme) < 2:
                raise RegistryInputError(
                    f"MLFLOW_TRACKING_URI {redact_uri(text)!r} is not a URI: use "
                    "http(s)://host:port, sqlite:///path/mlflow.db or file:///path"
                )
            return text
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (the working directory) holding ``params.yaml``.

    The embedded store and its artifacts live there, so that a stage run from a subfolder, or
    by DVC, finds the same registry; without a project, the working directory.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return here


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for an in-memory database)."""
    rest = uri[len("sqlite://") :]
    if not rest.startswith("/"):
        return None
    path = urllib.parse.unquote(rest[1:].split("?", 1)[0])
    if path in ("", ":memory:"):
        return None
    return Path(path)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _health_request(tracking_uri: str) -> urllib.request.Request:
    """``GET <uri>/health``, with credentials in the URI sent as a Basic auth header.

    MLflow's own client sends them so; urllib cannot open a URL that holds ``user:pass@``.
    """
    parts = urllib.parse.urlsplit(tracking_uri.rstrip("/") + "/health")
    headers = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return urllib.request.Request(urllib.parse.urlunsplit(parts), headers=headers)


# When each tracking server last answered its health check (time.monotonic()).
_ANSWERED: dict[str, float] = {}
RECHECK_S = 30.0


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail early, with a readable message, if the tracking store cannot be used.

    HTTP(S) URIs must answer ``GET <uri>/health`` within ``timeout``; a SQLite store's folder
    must exist and be writable; a ``file:`` store's nearest existing folder must be writable.
    Other schemes are left to MLflow.

    Args:
        tracking_uri: The tracking URI.
        timeout: Seconds to wait for an HTTP answer.

    Raises:
        RegistryError: The server does not answer, or the store's folder is not usable.
    """
    shown = redact_uri(tracking_uri)
    if _is_http(tracking_uri):
        # A stage's calls follow each other within seconds: one health check serves them all.
        if time.monotonic() - _ANSWERED.get(tracking_uri, -math.inf) < RECHECK_S:
            return
        request = _health_request(tracking_uri)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryError(
                f"MLflow tracking server at {shown} is unreachable: {reason} "
                "(check MLFLOW_TRACKING_URI, or start the server)"
            ) from exc
        if status != 200:
            raise RegistryError(
                f"MLflow tracking server at {shown} is unreachable: /health answered {status}"
            )
        _ANSWERED[tracking_uri] = time.monotonic()
        return
    if tracking_uri.startswith("sqlite:"):
        db = _sqlite_path(tracking_uri)
        if db is None:
            return
        folder = db.absolute().parent
        if not folder.is_dir():
            raise RegistryError(f"MLflow tracking store {shown}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise RegistryError(f"MLflow tracking store {shown}: {folder} is not writable")
        return
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        path = (
            Path(urllib.parse.unquote(urllib.parse.urlparse(tracking_uri).path))
            if tracking_uri.startswith("file:")
            else Path(tracking_uri)
        )
        existing = _nearest_existing(path)
        if not os.access(existing, os.W_OK):
            raise RegistryError(f"MLflow tracking store {shown}: {existing} is not writable")


def parse_model_ref(text: str) -> ModelRef:
    """Parse a model reference given on the command line or in a config.

    Accepted: ``NAME``, ``NAME@ALIAS``, ``NAME:VERSION``, ``models:/NAME@ALIAS`` and
    ``models:/NAME/VERSION``. A bare ``NAME`` means ``NAME@champion``.

    Args:
        text: The reference.

    Returns:
        The parsed reference.

    Raises:
        RegistryError: The text is none of these forms, or holds an invalid name, alias or
            version.
    """
    forms = "NAME, NAME@ALIAS, NAME:VERSION, models:/NAME@ALIAS or models:/NAME/VERSION"
    raw = text.strip() if isinstance(text, str) else ""
    match = _URI_REF_RE.match(raw) if raw.startswith("models:") else _REF_RE.match(raw)
    if match is None:
        raise RegistryInputError(f"invalid model reference {text!r}: expected {forms}")
    name, alias, version = match["name"], match["alias"], match["version"]
    if version is not None:
        if not version.isdigit() or int(version) < 1:
            raise RegistryInputError(
                f"invalid model reference {text!r}: version {version!r} is not a positive integer"
            )
        return ModelRef(name, version=int(version))
    return ModelRef(name, alias=alias or DEFAULT_ALIAS)


# --------------------------------------------------------------------------------------------
# Reading the registry


def _resolve(client: MlflowClient, ref: ModelRef, shown_uri: str) -> ModelVersion:
    """The model version ``ref`` names; :class:`_NotFoundError` naming what is missing."""
    try:
        registered = client.get_registered_model(ref.name)
    except MlflowException as exc:
        if _is_not_found(exc):
            raise _NotFoundError(f"no registered model {ref.name!r} at {shown_uri}") from exc
        raise
    alias = ref.effective_alias
    if alias is not None:
        aliases = dict(registered.aliases or {})
        if alias not in aliases:
            known = ", ".join(f"{a}->v{v}" for a, v in sorted(aliases.items())) or "none"
            raise _NotFoundError(
                f"registered model {ref.name!r} at {shown_uri} has no alias {alias!r} "
                f"(aliases: {known})"
            )
        number = int(aliases[alias])
    else:
        number = int(ref.version)  # type: ignore[arg-type]
    try:
        return client.get_model_version(ref.name, str(number))
    except MlflowException as exc:
        if _is_not_found(exc):
            where = f"alias {alias!r} points to " if alias else ""
            raise _NotFoundError(
                f"registered model {ref.name!r} at {shown_uri}: {where}version {number}, "
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


def _translated(what: str, tracking_uri: str) -> contextlib.AbstractContextManager[None]:
    """Turn any non-registry failure inside the block into one readable :class:`RegistryError`.

    MLflow, requests, boto3 and OS errors alike.
    """
    shown = redact_uri(tracking_uri)
    return reraised_as(
        RegistryError, lambda exc: RegistryError(f"{what} at {shown} failed: {_short(exc)}")
    )


def check_store_exists(tracking_uri: str) -> None:
    """For reading: a local SQLite store must already exist (reading never creates one).

    Raises:
        RegistryInputError: The store's file does not exist.
    """
    db = _sqlite_path(tracking_uri) if tracking_uri.startswith("sqlite:") else None
    if db is not None and not db.is_file():
        raise RegistryInputError(
            f"no MLflow tracking store at {db.absolute()} (set MLFLOW_TRACKING_URI to the "
            "store or server that holds the model)"
        )


def version_info(tracking_uri: str, ref: ModelRef) -> dict[str, Any]:
    """Describe the model version ``ref`` names.

    Args:
        tracking_uri: The tracking URI.
        ref: Model name and alias or version.

    Returns:
        ``name``, ``version`` (int), ``alias`` (the alias resolved, or ``None``), ``aliases``
        (all aliases on the version), ``run_id``, ``tags`` (the version's tags),
        ``metrics`` (the run's metrics), ``model_uri`` (``models:/NAME/VERSION``), ``source``
        and ``status``.

    Raises:
        RegistryError: Unknown model name, alias or version (the message says which), or the
            store cannot be reached.
    """
    check_store_exists(tracking_uri)
    check_reachable(tracking_uri)
    with mlflow_session(tracking_uri) as client, _translated(f"reading {ref.uri}", tracking_uri):
        mv = _resolve(client, ref, redact_uri(tracking_uri))
        return _info(client, mv, ref.effective_alias)


def get_alias_version(tracking_uri: str, model_name: str, alias: str) -> dict[str, Any] | None:
    """The version an alias points to, or ``None`` if the model or the alias does not exist.

    Args:
        tracking_uri: The tracking URI.
        model_name: Registered model name.
        alias: Alias to look up.

    Returns:
        As :func:`version_info` (``version``, ``run_id``, ``tags``, ``metrics``, ...), or
        ``None``.

    Raises:
        RegistryError: The store cannot be reached, or the name or alias is invalid.
    """
    try:
        return version_info(tracking_uri, ModelRef(model_name, alias=alias))
    except _NotFoundError:
        return None


def set_alias(tracking_uri: str, model_name: str, alias: str, version: int) -> None:
    """Point ``alias`` at ``version`` of ``model_name`` (moving it if it pointed elsewhere).

    Args:
        tracking_uri: The tracking URI.
        model_name: Registered model name.
        alias: Alias to set.
        version: Existing version number.

    Raises:
        RegistryError: Unknown model or version, invalid alias, or the store cannot be reached.
    """
    ref = ModelRef(model_name, version=version)
    _check_alias(alias)
    check_reachable(tracking_uri)
    what = f"setting alias {alias!r} of {model_name!r} to version {version}"
    with mlflow_session(tracking_uri) as client, _translated(what, tracking_uri):
        _resolve(client, ref, redact_uri(tracking_uri))
        client.set_registered_model_alias(model_name, alias, str(version))


def download_model_version(tracking_uri: str, ref: ModelRef, out_dir: Path) -> dict[str, Any]:
    """Download a version's plain files (``model.pt``, ``widths.json``, ...) into ``out_dir``.

    Only the files logged alongside the model are fetched, nothing is unpickled. They are
    downloaded into a temporary folder beside ``out_dir`` first and ``model.pt`` is checked
    against the version's ``model_sha256`` tag; then a missing ``out_dir`` is created by one
    rename, or each file replaces its namesake in an existing ``out_dir`` (other files there
    are left alone).

    Args:
        tracking_uri: The tracking URI.
        ref: Model name and alias or version.
        out_dir: Destination folder.

    Returns:
        The :func:`version_info` of the version downloaded, plus ``files`` (sorted names).

    Raises:
        RegistryError: Unknown model, alias or version; the version has no files; the download
            is corrupt; or the store cannot be reached.
    """
    check_store_exists(tracking_uri)
    check_reachable(tracking_uri)
    out_dir = Path(out_dir)
    with mlflow_session(tracking_uri) as client, _translated(f"pulling {ref.uri}", tracking_uri):
        mv = _resolve(client, ref, redact_uri(tracking_uri))
        info = _info(client, mv, ref.effective_alias)
        with staging_dir(out_dir) as tmp:
            got = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{info['model_uri']}/{EXTRA_FILES_DIR}", dst_path=str(tmp)
                )
            )
            files = sorted(p.name for p in got.iterdir() if p.is_file()) if got.is_dir() else []
            if not files:
                raise RegistryError(
                    f"version {info['version']} of {ref.name!r} has no files to pull "
                    f"(nothing under {EXTRA_FILES_DIR}/)"
                )
            expected = info["tags"].get(SHA_TAG)
            if expected and MODEL_FILE in files and file_digest(got / MODEL_FILE) != expected:
                raise RegistryError(
                    f"version {info['version']} of {ref.name!r}: downloaded {MODEL_FILE} does "
                    f"not match its {SHA_TAG} tag"
                )
            move_into(got, out_dir, files)
        return {**info, "files": files}


# --------------------------------------------------------------------------------------------
# Writing to the registry


def _find_by_content(client: MlflowClient, model_name: str, digest: str) -> ModelVersion | None:
    """The newest ready version of ``model_name`` with this content digest, if any."""
    found = client.search_model_versions(f"name='{model_name}' and tags.{CONTENT_TAG}='{digest}'")
    ready = [mv for mv in found if mv.status in (None, "READY")]
    return max(ready, key=lambda mv: int(mv.version)) if ready else None


def _artifact_location(tracking_uri: str, given: str | None) -> str | None:
    """A local artifact root as an absolute ``file:`` URI; URIs and server-side roots as given."""
    if given is None:
        if _is_http(tracking_uri):
            return None
        return (project_root() / DEFAULT_ARTIFACT_ROOT).resolve().as_uri()
    if "://" in given or given.startswith(("file:", "mlflow-artifacts:")) or _is_http(tracking_uri):
        return given
    return Path(given).expanduser().resolve().as_uri()


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (or restored if deleted) when needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _served_contract(
    model: torch.nn.Module,
    model_file: Path,
    example: numpy.ndarray,
    normalization: tuple[Sequence[float], Sequence[float]] | None,
) -> InputContract:
    """The served model's input contract: ``model.pt``'s own, else one built from its spec.

    A file without a contract (written before it was stored there) gets the given
    ``normalization`` and the class indices as names.

    Raises:
        RegistryInputError: The stored contract is malformed or disagrees with
            ``normalization``.
    """
    try:
        stored = contract_of(load_torch(model_file), model_file)
    except (ArtifactError, ValueError) as exc:
        raise RegistryInputError(str(exc)) from exc
    if stored is not None:
        if normalization is not None and (
            tuple(float(v) for v in normalization[0]) != stored.mean
            or tuple(float(v) for v in normalization[1]) != stored.std
        ):
            raise RegistryInputError(
                f"normalization {normalization} disagrees with the input contract of "
                f"{model_file} (mean {list(stored.mean)}, std {list(stored.std)})"
            )
        return stored
    spec = getattr(model, "spec", None)
    shape = tuple(spec.in_shape) if spec is not None else tuple(int(d) for d in example.shape[1:])
    channels = shape[0]
    mean, std = normalization if normalization is not None else ([0.0] * channels, [1.0] * channels)
    if spec is not None:
        classes = spec.num_classes
    else:
        with torch.no_grad():
            classes = int(model(torch.zeros(1, *shape)).shape[-1])
    try:
        return InputContract(
            shape=shape,  # type: ignore[arg-type]
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            classes=tuple(str(i) for i in range(classes)),
        )
    except ValueError as exc:
        raise RegistryInputError(f"{model_file}: {exc}") from exc


def _save_served_model(path: str, mlflow_model: Any, **kwargs: Any) -> None:
    """``mlflow.pytorch.save_model``, with :mod:`switchprune.serving` as the pyfunc's loader.

    The files and the ``pytorch`` flavour stay MLflow's own (``mlflow.pytorch.load_model``
    gives the :class:`~switchprune.serving.ServedModel`); only ``mlflow.pyfunc`` (``mlflow
    models predict/serve``) goes through the loader that checks every request.
    """
    from mlflow.models.model import MLMODEL_FILE_NAME

    mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME][mlflow.pyfunc.MAIN] = "switchprune.serving"
    mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))


# What ``Model.log`` calls to write the model's files (a flavour module's interface).
_SERVED_FLAVOR = SimpleNamespace(save_model=_save_served_model)


def _log_model(
    model: torch.nn.Module,
    example: numpy.ndarray,
    extra_files: list[str],
    contract: InputContract,
) -> Any:
    """Log the served form: raw ``uint8`` in, normalisation inside, package shipped.

    The network is wrapped in :class:`~switchprune.serving.ServedModel` and logged with
    ``mlflow.pytorch``'s files in pickle format, in eval mode, with the ``switchprune`` package
    as the model's code, so ``mlflow models predict/serve`` need nothing but the model's own
    (pinned, public) requirements. It has no tensor signature on purpose: MLflow would cast a
    JSON float batch to the signature's ``uint8`` before the model could refuse it (see
    :mod:`switchprune.serving`). The contract is the MLflow model's ``metadata["input"]``
    instead, and ``example`` its input example.
    """
    served = ServedModel(model, contract)
    was_training = model.training
    served.eval()
    try:
        with torch.no_grad():
            served(torch.as_tensor(example))  # the example must satisfy the contract
        # We chose pickle deliberately (pt2 loads back as a GraphModule, not our class).
        with _quiet("mlflow.pytorch"):
            return Model.log(
                artifact_path=None,
                name=MODEL_ARTIFACT,
                flavor=_SERVED_FLAVOR,
                flavor_name=mlflow.pytorch.__name__,
                pytorch_model=served,
                serialization_format="pickle",
                signature=False,
                input_example=example,
                metadata={INPUT_KEY: contract.to_dict()},
                pip_requirements=serving_requirements(),
                extra_files=extra_files,
                code_paths=[str(package_dir())],
            )
    finally:
        model.train(was_training)


# MLflow refuses more than 1000 metrics in one log_batch call.
_MAX_METRICS_PER_BATCH = 1000


def _history_metrics(history: Sequence[Mapping[str, float]]) -> list[tuple[str, float, int]]:
    """``(epoch_<key>, value, epoch)`` for every finite number of every record."""
    out = []
    for record in history:
        if "epoch" not in record:
            raise RegistryInputError(f"history record without 'epoch': {sorted(record)}")
        step = int(record["epoch"])
        for key, value in record.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                out.append((f"epoch_{key}", float(value), step))
    return out


def _best_effort(fn: Any, *args: Any) -> bool:
    """Call ``fn(*args)``; whether it succeeded (failures are swallowed)."""
    try:
        fn(*args)
    except Exception:
        return False
    return True


def _end_run(status: str, *, strict: bool = False) -> bool:
    """End the active run with ``status``; whether MLflow recorded it.

    Against a server, MLflow prints "View run ... at <url>" to stdout on ending a run; that
    goes to stderr here, so a command's stdout stays its own. The run leaves MLflow's active
    run stack even when recording the status fails.
    """
    with contextlib.redirect_stdout(sys.stderr):
        if strict:
            mlflow.end_run(status)
            return True
        return _best_effort(mlflow.end_run, status)


@dataclass
class _Attempt:
    """One registration under way: its run, tags and stepped metrics, and how far it got.

    ``step`` names what was being done and ``version`` what was registered, so that a failure
    is reported by its step and the version is deleted.
    """

    run_id: str
    tags: dict[str, str]
    stepped: list[tuple[str, float, int]]
    step: str = "logging params and metrics"
    version: str | None = None


def _check(registration: Registration) -> None:
    """Refuse invalid names and missing, clashing or oddly named files."""
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
    if set(artifacts) & set(files):
        raise RegistryInputError(
            f"artifacts {sorted(set(artifacts) & set(files))} clash with files"
        )
    for name, path in {**files, **artifacts}.items():
        if "/" in name or name in ("", ".", ".."):
            raise RegistryInputError(f"file name {name!r} must be a plain file name")
        if not Path(path).is_file():
            raise RegistryInputError(f"file {name!r} not found at {path}")


def _identity_tags(model_file: Path) -> dict[str, str]:
    """``model_sha256`` (the file's bytes) and ``model_content_sha256`` (its content)."""
    sha = file_digest(model_file)
    try:
        content = model_digest(model_file)
    except ArtifactError as exc:
        raise RegistryInputError(str(exc)) from exc
    return {SHA_TAG: sha, CONTENT_TAG: content}


def _result(model_name: str, run_id: str, version: str | int, *, changed: bool) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "version": int(version),
        "model_uri": f"models:/{model_name}/{int(version)}",
        "changed": changed,
    }


def _reuse(
    client: MlflowClient, existing: ModelVersion, registration: Registration, tracking_uri: str
) -> dict[str, Any]:
    """Point the alias at the version that already holds this content; nothing is logged."""
    name, alias = registration.model_name, registration.alias
    with _translated(f"setting alias {alias!r} of {name!r}", tracking_uri):
        client.set_registered_model_alias(name, alias, existing.version)
    return _result(name, existing.run_id, existing.version, changed=False)


def _start_run(client: MlflowClient, registration: Registration, tracking_uri: str) -> str:
    """Start the run (nested in the caller's active run, if any); its id."""
    with _translated(f"opening experiment {registration.experiment!r}", tracking_uri):
        location = _artifact_location(tracking_uri, registration.artifact_location)
        experiment_id = _experiment_id(client, registration.experiment, location)
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"register-{registration.model_name}",
            nested=mlflow.active_run() is not None,
        )
    return run.info.run_id


def _log_and_register_run(
    client: MlflowClient, registration: Registration, attempt: _Attempt
) -> str:
    """Log the run's records, files and model, then register, describe and alias the version."""
    logged = _log_run(client, registration, attempt)
    attempt.step = f"registering model {registration.model_name!r}"
    version = str(
        mlflow.register_model(logged.model_uri, registration.model_name, tags=attempt.tags).version
    )
    attempt.version = version
    if registration.description is not None:
        attempt.step = f"setting the description of version {version}"
        client.update_model_version(
            registration.model_name, version, description=registration.description
        )
    attempt.step = f"setting alias {registration.alias!r} on version {version}"
    client.set_registered_model_alias(registration.model_name, registration.alias, version)
    return version


def _log_run(client: MlflowClient, registration: Registration, attempt: _Attempt) -> Any:
    """Params, metrics, tags, history and files to the run, then the served model; its info."""
    run_id = attempt.run_id
    with tempfile.TemporaryDirectory(prefix="switchprune-register-") as scratch:
        # Every file under the name it gets, so that one upload names them all.
        staging = Path(scratch)
        for name, path in {**registration.files, **registration.artifacts}.items():
            shutil.copyfile(path, staging / name)
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric(k, v, now, 0)
                for k, v in _numeric_metrics(registration.metrics).items()
                if math.isfinite(v)
            ],
            params=[Param(k, _param_value(v)) for k, v in _flatten(registration.params).items()],
            tags=[RunTag(k, v) for k, v in attempt.tags.items()],
        )
        attempt.step = "logging the training history"
        for start in range(0, len(attempt.stepped), _MAX_METRICS_PER_BATCH):
            chunk = attempt.stepped[start : start + _MAX_METRICS_PER_BATCH]
            client.log_batch(run_id, metrics=[Metric(k, v, now, n) for k, v, n in chunk])
        attempt.step = "uploading files"
        client.log_artifacts(run_id, str(staging))
        attempt.step = "logging the model"
        extra = [str(staging / name) for name in sorted(registration.files)]
        contract = _served_contract(
            registration.model,
            Path(registration.files[MODEL_FILE]),
            numpy.asarray(registration.input_example),
            registration.normalization,
        )
        return _log_model(registration.model, registration.input_example, extra, contract)


def _roll_back(client: MlflowClient, model_name: str, attempt: _Attempt) -> str:
    """Delete the version registered so far and mark the run FAILED (best effort); what happened."""
    note = ""
    if attempt.version is not None and not _best_effort(
        client.delete_model_version, model_name, attempt.version
    ):
        note = f"; version {attempt.version} is left without the alias, registering again sets it"
    state = "marked FAILED" if _end_run("FAILED") else "could not be marked FAILED"
    return f"run {attempt.run_id} {state}{note}"


def log_and_register(tracking_uri: str, registration: Registration) -> dict[str, Any]:
    """Log one run, register its model as a new version and set the alias.

    The run gets the params, the numeric metrics, the tags plus ``model_sha256``, the files,
    the artifacts and the history. The model is logged as a
    :class:`~switchprune.serving.ServedModel` (raw ``uint8`` images in, normalised inside) in
    pickle format, with the ``switchprune`` package as its code, pinned public requirements,
    the input example, the input contract (``model.pt``'s) as its metadata, a pyfunc that
    refuses any other input, and the files as extra files, so they travel with the version.
    The version gets the run's tags and the description.

    Idempotent: when a version already carries the same ``model_content_sha256`` (spec, kept
    indices and tensor values, whatever the file's bytes), nothing is logged; the alias is
    (re)set on that version and ``changed`` is ``False``.

    If anything fails after the run was created, the run is marked ``FAILED`` and a version
    registered without its alias is deleted (both best effort).

    Args:
        tracking_uri: The tracking URI.
        registration: What to log and register.

    Returns:
        ``run_id``, ``version`` (int), ``model_uri`` (``models:/NAME/VERSION``) and
        ``changed`` (``False`` if an existing version was reused).

    Raises:
        RegistryError: Invalid names, a missing file, an unreachable store, or any MLflow
            failure (the message says which step).
    """
    _check(registration)
    stepped = _history_metrics(registration.history)
    identity = _identity_tags(Path(registration.files[MODEL_FILE]))
    check_reachable(tracking_uri)
    with mlflow_session(tracking_uri) as client:
        with _translated(f"looking up {registration.model_name!r}", tracking_uri):
            existing = _find_by_content(client, registration.model_name, identity[CONTENT_TAG])
        if existing is not None:
            return _reuse(client, existing, registration, tracking_uri)
        run_id = _start_run(client, registration, tracking_uri)
        tags = {**{k: str(v) for k, v in registration.tags.items()}, **identity}
        attempt = _Attempt(run_id, tags, stepped)
        try:
            version = _log_and_register_run(client, registration, attempt)
        except BaseException as exc:
            outcome = _roll_back(client, registration.model_name, attempt)
            if not isinstance(exc, Exception):
                raise
            raise RegistryError(
                f"registering {registration.model_name!r} at {redact_uri(tracking_uri)} failed "
                f"while {attempt.step} ({outcome}): {_short(exc)}"
            ) from exc
        with _translated(f"finishing run {run_id}", tracking_uri):
            _end_run("FINISHED", strict=True)
    return _result(registration.model_name, run_id, version, changed=True)
