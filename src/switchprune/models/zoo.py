"""Networks built by torchvision or by the user's own code, wrapped as :class:`GraphNet`.

``model.arch`` names a torchvision architecture (:data:`TORCHVISION`) or the user's builder,
``"path/to/file.py:build"`` or ``"package.module:build"``, called as
``build(num_classes, in_channels)`` and returning an ``nn.Module``. The user's file is code this
process runs: its SHA-256 is recorded in the spec and a changed file is refused at load time.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torchvision
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

TORCHVISION = TORCHVISION_ARCHS
_LOADED: dict[str, ModuleType] = {}


def is_user_arch(arch: str) -> bool:
    """Whether ``arch`` names the user's builder (``module:function``)."""
    return ":" in arch


def is_graph_arch(arch: str) -> bool:
    """Whether ``arch`` is built here (torchvision or user code) rather than hand-written."""
    return arch in TORCHVISION or is_user_arch(arch)


def default_small_input(in_shape: tuple[int, int, int]) -> bool:
    """The small-image stem is the default for images of at most 64 px."""
    return max(in_shape[1], in_shape[2]) <= 64


def build_graph_model(spec: ModelSpec) -> GraphNet:
    """Build the full-width network of ``spec``, then cut it to ``spec.kept`` when set.

    Raises:
        GraphError: If the builder fails, the user's file changed, or the built network's
            groups do not match the spec.
    """
    net, digest = _build_net(spec)
    if spec.source_sha256 and digest != spec.source_sha256:
        raise GraphError(
            f"{spec.arch.rsplit(':', 1)[0]} changed since this model was saved "
            f"(SHA-256 {digest[:12]}…, recorded {spec.source_sha256[:12]}…): refusing to load "
            "weights into a different network"
        )
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
        spec = ModelSpec(arch, in_shape, num_classes, {}, options, {}, digest)
    return build_graph_model(spec).spec


def _build_net(spec: ModelSpec) -> tuple[nn.Module, str]:
    in_channels = spec.in_shape[0]
    if spec.arch in TORCHVISION:
        small = bool(spec.options.get("small_input", default_small_input(spec.in_shape)))
        net = _torchvision(spec.arch, spec.num_classes, in_channels, small, spec.in_shape[1:])
        return net, ""
    builder, digest = _user_builder(spec.arch)
    try:
        net = builder(spec.num_classes, in_channels)
    except Exception as exc:
        raise GraphError(f"{spec.arch}(num_classes, in_channels) failed: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise GraphError(f"{spec.arch} returned {type(net).__name__}, not a torch.nn.Module")
    return net, digest


def _user_builder(arch: str) -> tuple[Callable[[int, int], nn.Module], str]:
    """Import the user's builder; returns it and the SHA-256 of the file defining it."""
    where, _, name = arch.rpartition(":")
    if not where or not name.isidentifier():
        raise GraphError(f"arch {arch!r}: expected 'path/to/file.py:function' or 'module:function'")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise GraphError(f"arch {arch!r}: {path} is not a file")
            source = path.read_bytes()
            digest = hashlib.sha256(source).hexdigest()
            module_name = f"switchprune_user_{digest[:16]}"
            module = _LOADED.get(module_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(module_name, path)
                assert loader_spec is not None and loader_spec.loader is not None
                module = importlib.util.module_from_spec(loader_spec)
                loader_spec.loader.exec_module(module)
                # Not in sys.modules: a pickled model (MLflow's cloudpickle) then carries the
                # file's classes by value and loads where the file is absent.
                _LOADED[module_name] = module
        else:
            module = importlib.import_module(where)
            file = getattr(module, "__file__", None)
            digest = hashlib.sha256(Path(file).read_bytes()).hexdigest() if file else ""
    except GraphError:
        raise
    except Exception as exc:  # the user's module may fail to import in any way
        raise GraphError(f"arch {arch!r}: cannot import {where}: {exc}") from exc
    builder = getattr(module, name, None)
    if not callable(builder):
        raise GraphError(f"arch {arch!r}: {where} has no function {name!r}")
    return builder, digest


def _torchvision(
    arch: str, num_classes: int, in_channels: int, small: bool, spatial: tuple[int, int]
) -> nn.Module:
    """A torchvision network with the data's channels and, for small images, a small stem."""
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
