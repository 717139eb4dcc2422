"""Networks built by torchvision or by the user's own code, wrapped as :class:`GraphNet`.

``model.arch`` names a torchvision architecture (:data:`TORCHVISION`) or the user's builder,
``"path/to/file.py:build"`` or ``"package.module:build"``, called as
``build(num_classes, in_channels)`` and returning an ``nn.Module``. The user's file is code this
process runs: its SHA-256 is recorded in the spec and a changed file is refused at load time.
A model built from a file carries a copy of it (:data:`SOURCE_FILE`), from which it loads
anywhere; a module's distribution and version are recorded, to be named when it is missing.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from switchprune.config import TORCHVISION_ARCHS
from switchprune.models.base import ModelSpec, scaled
from switchprune.models.graph import (
    GraphError,
    GraphNet,
    check_supported,
    find_classifier,
    remove_units,
)

logger = logging.getLogger(__name__)
TORCHVISION = TORCHVISION_ARCHS
# The stored copy of a user's network file that travels with its models.
SOURCE_FILE = "network.py"
# User files run in this process, by SHA-256: the private module and the file's content.
_LOADED: dict[str, tuple[ModuleType, bytes]] = {}
# File archs whose path is replaced by a provided copy (by the path the arch names).
_PROVIDED: dict[str, str] = {}


def is_user_arch(arch: str) -> bool:
    """Whether ``arch`` names the user's builder (``module:function``)."""
    return ":" in arch


def is_graph_arch(arch: str) -> bool:
    """Whether ``arch`` is built here (torchvision or user code) rather than hand-written."""
    return arch in TORCHVISION or is_user_arch(arch)


def default_small_input(in_shape: tuple[int, int, int]) -> bool:
    """The small-image stem is the default for images of at most 64 px."""
    return max(in_shape[1], in_shape[2]) <= 64


def build_graph_model(spec: ModelSpec, *, initialise: bool = True) -> GraphNet:
    """Build the full-width network of ``spec``, then cut it to ``spec.kept`` when set.

    ``initialise=False`` leaves a torchvision network's weights as allocated, for a state dict
    to fill (see :func:`switchprune.models.build_with_state`); a user's network is always
    built as written.

    Raises:
        GraphError: If the builder fails, the user's file changed, or the built network's
            groups do not match the spec.
    """
    net, digest = _build_net(spec, initialise)
    if spec.source_sha256 and digest != spec.source_sha256:
        raise _changed(spec.arch.rsplit(":", 1)[0], digest, spec.source_sha256)
    check_supported(net)
    classifier = find_classifier(net, spec.num_classes)
    model = GraphNet(spec, net, classifier)
    multiplier = float(spec.options.get("width_multiplier", 1.0))
    if multiplier != 1.0:
        # The first units of every group: a narrower network of the same family, built the
        # same way every time, so kept indices stay meaningful.
        remove_units(model, {g.name: list(range(scaled(g.size, multiplier))) for g in model.groups})
    full = model.group_sizes()
    if spec.kept:
        remove_units(model, {k: list(v) for k, v in spec.kept.items()})
        expected = {k: len(v) for k, v in spec.kept.items()}
        if spec.widths != expected:
            raise GraphError("the spec's widths are not the counts of its kept units")
    elif spec.widths and spec.widths != full:
        raise GraphError(
            f"{spec.arch}: the network now has other groups or widths than the spec records"
        )
    model.spec = spec if spec.widths else spec.with_widths(full)
    return model


def graph_spec(
    arch: str,
    in_shape: tuple[int, int, int],
    num_classes: int,
    *,
    small_input: bool | None,
    width_multiplier: float,
) -> ModelSpec:
    """The full-width spec of a torchvision or user network for the given data."""
    options: dict[str, object] = {}
    if arch in TORCHVISION:
        options["small_input"] = (
            default_small_input(in_shape) if small_input is None else bool(small_input)
        )
    if width_multiplier != 1.0:
        options["width_multiplier"] = float(width_multiplier)
    spec = ModelSpec(arch, in_shape, num_classes, {}, options)
    _, digest = _build_net(spec)
    if is_user_arch(arch):
        package = "" if is_file_arch(arch) else module_distribution(arch.rpartition(":")[0])
        spec = ModelSpec(arch, in_shape, num_classes, {}, options, {}, digest, package)
    model = build_graph_model(spec)
    for name, why in model.ungated.items():
        logger.warning("%s: layer %r is left whole (not gated): %s", arch, name[4:], why)
    return model.spec


def _changed(where: str, digest: str, recorded: str) -> GraphError:
    return GraphError(
        f"{where} changed since this model was saved (SHA-256 {digest[:12]}…, recorded "
        f"{recorded[:12]}…): refusing to load weights into a different network"
    )


def _build_net(spec: ModelSpec, initialise: bool = True) -> tuple[nn.Module, str]:
    in_channels = spec.in_shape[0]
    if spec.arch in TORCHVISION:
        small = bool(spec.options.get("small_input", default_small_input(spec.in_shape)))
        args = (spec.arch, spec.num_classes, in_channels, small, spec.in_shape[1:])
        if initialise:
            return _torchvision(*args), ""
        # Constructed on the meta device, then given real memory: the graph is traced and cut
        # with CPU tensors (quick), and no full-width random initialisation is drawn.
        with torch.device("meta"):
            net = _torchvision(*args)
        return net.to_empty(device="cpu"), ""
    try:
        builder, digest = _user_builder(spec.arch, spec.source_sha256)
    except GraphError as exc:
        if spec.source_package and not is_file_arch(spec.arch):
            raise GraphError(f"{exc} (it came from {spec.source_package}: install it)") from exc
        raise
    try:
        net = builder(spec.num_classes, in_channels)
    except Exception as exc:
        raise GraphError(f"{spec.arch}(num_classes, in_channels) failed: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise GraphError(f"{spec.arch} returned {type(net).__name__}, not a torch.nn.Module")
    return net, digest


def is_file_arch(arch: str) -> bool:
    """Whether ``arch`` names a builder in a Python file (``path/to/file.py:function``)."""
    return is_user_arch(arch) and arch.rpartition(":")[0].endswith(".py")


def provide_source(source: str | bytes, sha256: str, arch: str | None = None) -> str:
    """Make a stored copy of a user's network file the one its models are built from.

    A model carries its file (:data:`SOURCE_FILE` beside ``model.pt``; the text of it in a
    compiled pipeline), so it loads where the original path does not exist. The copy is
    imported under a private module name (never shadowing the user's own modules) and found
    again by its SHA-256, which every spec of a network built from it records.

    Args:
        source: The file's content.
        sha256: The SHA-256 the content must have (refused otherwise, before it runs).
        arch: The ``path/to/file.py:function`` arch whose file this replaces, for specs not
            made yet (``train`` in a pod where the path does not exist).

    Returns:
        The SHA-256.

    Raises:
        GraphError: If the content does not have that SHA-256, or fails to import.
    """
    data = source.encode("utf-8") if isinstance(source, str) else bytes(source)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise GraphError(
            f"the stored network source does not match its recorded SHA-256 "
            f"({digest[:12]}…, expected {sha256[:12]}…): refusing to run it"
        )
    _import_source(data, digest, where=arch.rpartition(":")[0] if arch else SOURCE_FILE)
    if arch is not None:
        _PROVIDED[arch.rpartition(":")[0]] = digest
    return digest


def provide_source_file(path: Path, sha256: str) -> str:
    """:func:`provide_source` for a stored copy on disk (``network.py`` beside a model)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise GraphError(f"cannot read the network source {path}: {exc.strerror}") from exc
    try:
        return provide_source(data, sha256)
    except GraphError as exc:
        raise GraphError(f"{path}: {exc}") from exc


def source_bytes(sha256: str) -> bytes | None:
    """The content of the user file with this SHA-256, if a network was built from it here."""
    found = _LOADED.get(sha256)
    return found[1] if found else None


def _import_source(data: bytes, digest: str, where: str) -> ModuleType:
    """Run a user file's content as a private module, once per content."""
    found = _LOADED.get(digest)
    if found is not None:
        return found[0]
    module_name = f"switchprune_user_{digest[:16]}"
    module = ModuleType(module_name)
    module.__file__ = where
    try:
        exec(compile(data, where, "exec"), module.__dict__)  # noqa: S102 (the user's own code)
    except Exception as exc:  # the user's module may fail to import in any way
        raise GraphError(f"cannot import {where}: {type(exc).__name__}: {exc}") from exc
    # Not in sys.modules: a pickled model (MLflow's cloudpickle) then carries the file's
    # classes by value and loads where the file is absent.
    _LOADED[digest] = (module, data)
    return module


def _user_builder(arch: str, expected: str = "") -> tuple[Callable[[int, int], nn.Module], str]:
    """Import the user's builder; returns it and the SHA-256 of the file defining it.

    A file arch is taken from the copy with the ``expected`` SHA-256 when one was provided
    (:func:`provide_source`), else from the path, whose content is checked before it runs.
    """
    where, _, name = arch.rpartition(":")
    if not where or not name.isidentifier():
        raise GraphError(f"arch {arch!r}: expected 'path/to/file.py:function' or 'module:function'")
    if where.endswith(".py"):
        digest = expected if expected in _LOADED else _PROVIDED.get(where, "")
        if digest and digest in _LOADED:
            module = _LOADED[digest][0]
        else:
            data = _read_user_file(arch, where)
            digest = hashlib.sha256(data).hexdigest()
            if expected and digest != expected:
                raise _changed(where, digest, expected)
            module = _import_source(data, digest, where)
    else:
        module, digest = _import_module(arch, where)
    builder = getattr(module, name, None)
    if not callable(builder):
        raise GraphError(f"arch {arch!r}: {where} has no function {name!r}")
    return builder, digest


def _read_user_file(arch: str, where: str) -> bytes:
    path = Path(where)
    if not path.is_file():
        raise GraphError(
            f"arch {arch!r}: the network's source {where} is not a file (looked in "
            f"{Path.cwd()}) and no stored copy ({SOURCE_FILE}) was found beside the model"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise GraphError(f"arch {arch!r}: cannot read {where}: {exc.strerror}") from exc


def _import_module(arch: str, where: str) -> tuple[ModuleType, str]:
    try:
        module = importlib.import_module(where)
    except Exception as exc:  # the user's module may fail to import in any way
        raise GraphError(f"arch {arch!r}: cannot import {where}: {exc}") from exc
    file = getattr(module, "__file__", None)
    return module, hashlib.sha256(Path(file).read_bytes()).hexdigest() if file else ""


def module_distribution(where: str) -> str:
    """``name==version`` of the installed distribution providing module ``where``, or ``""``."""
    top = where.split(".", 1)[0]
    names = metadata.packages_distributions().get(top, [])
    if not names:
        return ""
    return f"{names[0]}=={metadata.version(names[0])}"


def _torchvision(
    arch: str, num_classes: int, in_channels: int, small: bool, spatial: tuple[int, int]
) -> nn.Module:
    """A torchvision network with the data's channels and, for small images, a small stem."""
    import torchvision  # here: its import takes seconds, which networks of our own never need

    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if arch.startswith("resnet"):
        if small:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    elif arch.startswith("mobilenet"):
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(
            in_channels, stem.out_channels, 3, 1 if small else 2, 1, bias=False
        )
        if small and arch == "mobilenet_v2":
            # The second stride-2 block also keeps its resolution, as in CIFAR MobileNetV2:
            # a 32 px image is downsampled 8x, not 32x.
            net.features[2].conv[1][0].stride = (1, 1)
    elif arch.startswith("vgg"):
        net.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
        if small:
            # No pooling that would take the map below 1 px (the last one always goes: 28 px
            # survives four), global pooling and one linear classifier.
            layers, size = list(net.features)[:-1], min(spatial)
            for i, layer in enumerate(layers):
                if isinstance(layer, nn.MaxPool2d):
                    if size < 2:
                        layers[i] = nn.Identity()
                    else:
                        size //= 2
            net.features = nn.Sequential(*layers)
            net.avgpool = nn.AdaptiveAvgPool2d(1)
            net.classifier = nn.Linear(512, num_classes)
    return net
