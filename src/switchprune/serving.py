"""The input contract of a compacted model, and the forms that apply it: raw images in.

Every shipped form of a model (the module :func:`switchprune.load_model` returns, the MLflow
pyfunc that ``mlflow models predict/serve`` run, ``model.onnx``) takes the same input: raw
``uint8`` pixels ``0..255``, ``N×C×H×W``, and normalises them itself with the training split's
per-channel statistics. The network trains on normalised inputs; a caller must not need to know
those statistics, and a float batch (already normalised, or scaled to ``[0, 1]``) is refused
rather than guessed at: cast to ``uint8`` it would be a black image, and classified as one.

The contract travels in the model file (``model.pt``'s ``"input"`` entry, see
:class:`InputContract`), in the MLflow model's metadata and in the ONNX file's metadata.

MLflow parses a JSON request against a tensor signature by casting it to the signature's dtype
(``numpy.array(data, dtype=...)``), floats to ``uint8`` included, before the model sees it. The
served model is therefore logged without a tensor signature: the request reaches
:meth:`PyfuncModel.predict` as JSON made it (integers as ``int64``, any float as ``float64``),
which accepts integers ``0..255`` and refuses everything else with an HTTP 400 naming the
expected dtype and shape. This module is that pyfunc's loader (``_load_pyfunc``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from switchprune.data import DataMeta

# The key of the contract in a model file (``model.pt``, ``switched.pt``, ``baseline.pt``).
INPUT_KEY = "input"
DTYPE = "uint8"
LAYOUT = "NCHW"

# What unpickling a served model imports: switchprune's model code and what it imports, and
# the loader. Pinned to the versions that logged it.
SERVING_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "torch-pruning",
    "numpy",
    "pyyaml",
    "tqdm",
    "pillow",
)


@dataclass(frozen=True)
class InputContract:
    """What a model takes: raw ``uint8`` ``N×C×H×W`` pixels, and how it normalises them.

    The model computes ``net((x / 255 - mean) / std)`` per channel, in float32.

    Attributes:
        shape: Shape of one image, ``(C, H, W)``.
        mean: Per-channel mean of ``[0, 1]`` pixels (``uint8 / 255``) of the training split.
        std: Per-channel standard deviation, same units.
        classes: The name of every class, by logit index.
        dtype: Always ``uint8``.
        layout: Always ``NCHW``.
    """

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    dtype: str = DTYPE
    layout: str = LAYOUT

    def __post_init__(self) -> None:
        problems = []
        if self.dtype != DTYPE or self.layout != LAYOUT:
            problems.append(
                f"dtype/layout must be {DTYPE}/{LAYOUT}, got {self.dtype}/{self.layout}"
            )
        if len(self.shape) != 3 or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.shape
        ):
            problems.append(f"shape must be three positive integers (C, H, W), got {self.shape}")
        elif not len(self.mean) == len(self.std) == self.shape[0]:
            problems.append(
                f"mean and std need one value per channel ({self.shape[0]}), "
                f"got {list(self.mean)} and {list(self.std)}"
            )
        if not all(math.isfinite(v) for v in self.mean) or not all(
            math.isfinite(v) and v > 0 for v in self.std
        ):
            problems.append(f"mean must be finite and std positive, got {self.mean}, {self.std}")
        if not self.classes or not all(isinstance(c, str) for c in self.classes):
            problems.append(f"classes must be a non-empty list of names, got {self.classes!r}")
        if problems:
            raise ValueError("invalid input contract: " + "; ".join(problems))

    @property
    def expected(self) -> str:
        """The expected input in words, for error messages: ``uint8 N×1×8×8 (NCHW) ...``."""
        dims = "×".join(str(d) for d in self.shape)
        return f"{self.dtype} pixels 0..255 of shape N×{dims} ({self.layout})"

    def to_dict(self) -> dict[str, Any]:
        """The contract as stored (plain lists and strings: ``weights_only``- and JSON-safe)."""
        return {
            "dtype": self.dtype,
            "layout": self.layout,
            "shape": list(self.shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "classes": list(self.classes),
        }

    @classmethod
    def from_dict(cls, data: Any) -> InputContract:
        """Read a stored contract.

        Raises:
            ValueError: ``data`` is not a complete, valid contract.
        """
        keys = {"dtype", "layout", "shape", "mean", "std", "classes"}
        if not isinstance(data, Mapping) or set(data) != keys:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"invalid input contract: expected keys {sorted(keys)}, got {got}")
        try:
            return cls(
                shape=tuple(int(d) for d in data["shape"]),  # type: ignore[arg-type]
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                classes=tuple(data["classes"]),
                dtype=str(data["dtype"]),
                layout=str(data["layout"]),
            )
        except (TypeError, ValueError) as exc:
            if str(exc).startswith("invalid input contract"):
                raise
            raise ValueError(f"invalid input contract: {exc}") from exc

    @classmethod
    def from_meta(cls, meta: DataMeta) -> InputContract:
        """The contract of a model trained on the prepared data ``meta`` describes."""
        return cls(
            shape=tuple(meta.in_shape),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in meta.mean),
            std=tuple(float(v) for v in meta.std),
            classes=tuple(meta.labels),
        )

    def check(self, x: torch.Tensor) -> None:
        """Refuse anything but a ``uint8`` ``N×C×H×W`` batch of this contract's shape.

        Raises:
            TypeError: ``x`` is not a ``uint8`` tensor (a float batch is never cast).
            ValueError: ``x`` does not have the shape ``N×C×H×W``.
        """
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(
                f"expected {self.expected}, got {got}: the model normalises raw pixels itself "
                "and refuses other dtypes (floats are not cast)"
            )
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.shape):
            raise ValueError(f"expected {self.expected}, got shape {tuple(x.shape)}")


class ServedModel(nn.Module):
    """A task network behind its input contract: raw ``uint8`` images in, logits out.

    Attributes:
        net: The task network (takes normalised float32 inputs).
        contract: The input it takes and how it is normalised.
        mean: Per-channel mean of ``[0, 1]`` pixels, shape ``[C, 1, 1]``.
        std: Per-channel standard deviation, same shape.
    """

    def __init__(self, net: nn.Module, contract: InputContract) -> None:
        super().__init__()
        spec = getattr(net, "spec", None)
        if spec is not None and (
            tuple(spec.in_shape) != contract.shape or spec.num_classes != len(contract.classes)
        ):
            raise ValueError(
                f"input contract ({contract.shape}, {len(contract.classes)} classes) does not "
                f"fit the network ({tuple(spec.in_shape)}, {spec.num_classes} classes)"
            )
        self.net = net
        self.contract = contract
        self.register_buffer(
            "mean", torch.tensor(contract.mean, dtype=torch.float32).view(-1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(contract.std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a ``uint8`` ``N×C×H×W`` batch; anything else is refused.

        Raises:
            TypeError: ``x`` is not ``uint8``.
            ValueError: ``x`` has another shape than ``N×C×H×W``.
        """
        self.contract.check(x)
        # The same operations, in the same order, as the prepared data's normalisation.
        return self.net((x.to(torch.float32) / 255.0 - self.mean) / self.std)


def as_uint8_batch(data: Any, contract: InputContract) -> np.ndarray:
    """A request's images as the ``uint8`` batch the contract describes, or a refusal.

    JSON has no ``uint8``: integer arrays (``int64`` once parsed) are accepted when every value
    is in ``0..255``. A float array is refused, whatever its values: its meaning (``[0, 1]``
    pixels, normalised pixels) cannot be known.

    Args:
        data: A numpy array, a tensor, nested lists, a one-entry mapping of one of these, or a
            DataFrame (one column of images, or one column per pixel in ``C, H, W`` order).
        contract: The model's input contract.

    Returns:
        A ``uint8`` array of shape ``N×C×H×W``.

    Raises:
        TypeError: The values are not integers.
        ValueError: Out-of-range values, or another shape.
    """
    if isinstance(data, Mapping) and len(data) == 1:
        data = next(iter(data.values()))
    if hasattr(data, "to_numpy") and hasattr(data, "columns"):  # a pandas DataFrame
        data = _frame_values(data, contract)
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    try:
        array = np.asarray(data)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"expected {contract.expected}: {exc}") from exc
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iu":
            raise TypeError(
                f"expected {contract.expected}, got {array.dtype} values: raw integer pixels "
                "only, the model normalises them itself (floats are refused, not cast)"
            )
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"expected {contract.expected}, got values from {array.min()} to {array.max()}"
            )
        array = array.astype(np.uint8)
    if array.ndim != 4 or tuple(array.shape[1:]) != contract.shape:
        raise ValueError(f"expected {contract.expected}, got shape {tuple(array.shape)}")
    return array


def _frame_values(frame: Any, contract: InputContract) -> np.ndarray:
    """A DataFrame's images: one column of nested lists, or one column per pixel (C, H, W)."""
    if len(frame.columns) == 1 and len(frame) and isinstance(frame.iloc[0, 0], list | np.ndarray):
        return np.array(frame.iloc[:, 0].tolist())
    values = frame.to_numpy()
    if values.ndim == 2 and values.shape[1] == math.prod(contract.shape):
        return values.reshape(-1, *contract.shape)
    return values


class PyfuncModel:
    """The MLflow pyfunc of a served model: checks each request against the contract.

    Attributes:
        model: The :class:`ServedModel` (on the CPU, eval mode).
    """

    def __init__(self, model: ServedModel) -> None:
        self.model = model.cpu().eval()

    def get_raw_model(self) -> ServedModel:
        """The :class:`ServedModel` behind this pyfunc."""
        return self.model

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """Float32 logits ``N×classes`` for a batch of raw images.

        Raises:
            mlflow.exceptions.MlflowException: ``INVALID_PARAMETER_VALUE`` (HTTP 400 from
                ``mlflow models serve``) for input that is not ``uint8`` pixels of the
                contract's shape; the message names both.
        """
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        if params:
            raise MlflowException(
                f"this model takes no parameters, got {sorted(params)}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        try:
            batch = as_uint8_batch(data, self.model.contract)
        except (TypeError, ValueError) as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        with torch.no_grad():
            return self.model(torch.from_numpy(batch)).numpy()


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> PyfuncModel:
    """Load the served model logged by :func:`switchprune.registry.log_and_register`.

    Called by ``mlflow.pyfunc.load_model`` (and so by ``mlflow models predict/serve``) with the
    model's ``data`` folder; the files are ``mlflow.pytorch``'s.
    """
    import mlflow.pytorch

    served = mlflow.pytorch.load_model(str(Path(path).parent))
    if not isinstance(served, ServedModel):
        raise TypeError(f"{path}: expected a pickled ServedModel, found {type(served).__name__}")
    return PyfuncModel(served)


def serving_requirements() -> list[str]:
    """Pinned pip requirements of a served model (the package itself travels as its code)."""
    pins = []
    for name in SERVING_DISTRIBUTIONS:
        version = metadata.version(name).split("+")[0]
        pins.append(f"{name}=={version}")
    return pins


def package_dir() -> Path:
    """The folder of the installed ``switchprune`` package (shipped as the model's code)."""
    return Path(__file__).resolve().parent


def contract_of(blob: Mapping[str, Any], where: object) -> InputContract | None:
    """The input contract stored in a model file's mapping, ``None`` when it has none.

    Args:
        blob: The mapping ``torch.load`` returned.
        where: The file, for the error message.

    Raises:
        ValueError: The stored contract is malformed.
    """
    if INPUT_KEY not in blob:
        return None
    try:
        return InputContract.from_dict(blob[INPUT_KEY])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


__all__ = [
    "DTYPE",
    "INPUT_KEY",
    "LAYOUT",
    "InputContract",
    "PyfuncModel",
    "ServedModel",
    "as_uint8_batch",
    "contract_of",
    "package_dir",
    "serving_requirements",
]
