"""Task networks built from a :class:`ModelSpec`, and the switcher network."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from switchprune.config import OWN_ARCHS, TORCHVISION_ARCHS, ConfigError, ModelConfig
from switchprune.models import lenet, mlp, resnet, vgg
from switchprune.models.base import Gate, GateGroup, ModelSpec, TaskNet
from switchprune.models.graph import GraphError, GraphNet
from switchprune.models.zoo import (
    SOURCE_FILE,
    build_graph_model,
    graph_spec,
    is_file_arch,
    is_graph_arch,
    provide_source,
    provide_source_file,
    source_bytes,
)

ARCHS = OWN_ARCHS + TORCHVISION_ARCHS


def spec_from_config(
    cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int
) -> ModelSpec:
    """The full-width spec of the configured architecture for the given data."""
    in_shape = tuple(int(v) for v in in_shape)  # type: ignore[assignment]
    if is_graph_arch(cfg.arch):
        return graph_spec(
            cfg.arch,
            in_shape,
            int(num_classes),
            small_input=cfg.small_input,
            width_multiplier=cfg.width_multiplier,
        )
    if cfg.arch == "mlp":
        widths = mlp.default_widths(cfg.hidden)
    elif cfg.arch == "lenet5":
        widths = lenet.default_widths()
    elif cfg.arch in vgg.LAYOUTS:
        widths = vgg.default_widths(cfg.arch, cfg.width_multiplier)
    elif cfg.arch in resnet.DEPTHS:
        widths = resnet.default_widths(cfg.arch, cfg.width_multiplier)
    else:
        raise ConfigError(
            f"[model] arch: unknown architecture {cfg.arch!r} (known: {', '.join(ARCHS)})"
        )
    return ModelSpec(cfg.arch, in_shape, int(num_classes), widths)


def build_model(spec: ModelSpec) -> TaskNet:
    """Instantiate the task network described by ``spec``."""
    if is_graph_arch(spec.arch):
        return build_graph_model(spec)
    if spec.arch == "mlp":
        return mlp.MLP(spec)
    if spec.arch == "lenet5":
        return lenet.LeNet5(spec)
    if spec.arch in vgg.LAYOUTS:
        return vgg.VGG(spec)
    if spec.arch in resnet.DEPTHS:
        return resnet.ResNet(spec)
    raise ConfigError(f"unknown architecture {spec.arch!r} (known: {', '.join(ARCHS)})")


def build_with_state(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> TaskNet:
    """The network of ``spec`` holding ``state``: every parameter and buffer, checked strictly.

    A torchvision network is built without its random initialisation, which ``state`` would
    overwrite: it is drawn at full width before the network is cut to ``spec``'s widths (a
    second for a quarter-width VGG-16). The others are built as written: the hand-written ones
    at their own widths (cheap), a user's because its constructor may keep tensors that
    ``state`` does not hold.

    Raises:
        RuntimeError: ``state`` misses a key of the network, has another, or another shape.
    """
    if spec.arch in TORCHVISION_ARCHS:
        model: TaskNet = build_graph_model(spec, initialise=False)
    else:
        model = build_model(spec)
    model.load_state_dict(state, strict=True)
    return model


__all__ = [
    "ARCHS",
    "SOURCE_FILE",
    "Gate",
    "GateGroup",
    "GraphError",
    "GraphNet",
    "ModelSpec",
    "TaskNet",
    "build_model",
    "build_with_state",
    "is_file_arch",
    "is_graph_arch",
    "provide_source",
    "provide_source_file",
    "source_bytes",
    "spec_from_config",
]
