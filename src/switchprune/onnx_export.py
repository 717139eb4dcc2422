"""ONNX copies of task networks: export, check against PyTorch, time with onnxruntime.

An exported graph takes what every shipped form of a model takes (see
:mod:`switchprune.serving`): raw ``uint8`` pixels ``N×C×H×W`` as ``input``. It casts and
normalises them itself, and its ``metadata_props`` hold the contract: the class names, the
input's dtype, layout and shape, and the mean/std it applies (each a JSON text, see
:func:`contract_metadata`). onnxruntime refuses a float ``input`` (type mismatch).
"""

from __future__ import annotations

import copy
import io
import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from switchprune.io import ArtifactError, atomic_write_bytes
from switchprune.serving import InputContract, ServedModel

ONNX_FILE = "model.onnx"
OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# ONNX and PyTorch agree when |difference| <= ATOL + RTOL * max|logit|: float32 rounding grows
# with the logits' scale and the network's depth (a random ResNet-18 differs by ~3e-4), while a
# wrong graph (another normalisation, a dropped layer) differs by a sizeable part of the scale.
ATOL = 1e-4
RTOL = 1e-4
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
METADATA_KEYS = ("classes", "input_dtype", "input_layout", "input_shape", "mean", "std")


class OnnxExportError(ArtifactError):
    """The ONNX export failed, or onnxruntime does not compute what PyTorch computes."""


def contract_metadata(contract: InputContract) -> dict[str, str]:
    """The ONNX file's ``metadata_props``: the input contract, one JSON text per key.

    ``classes`` (names by logit index), ``input_dtype`` (``"uint8"``), ``input_layout``
    (``"NCHW"``), ``input_shape`` (``[C, H, W]``), ``mean`` and ``std`` (per channel, of
    ``[0, 1]`` pixels: the graph computes ``(x / 255 - mean) / std``).
    """
    values = {
        "classes": list(contract.classes),
        "input_dtype": contract.dtype,
        "input_layout": contract.layout,
        "input_shape": list(contract.shape),
        "mean": list(contract.mean),
        "std": list(contract.std),
    }
    return {key: json.dumps(values[key]) for key in METADATA_KEYS}


def read_contract(onnx_model: bytes | Path) -> InputContract:
    """The input contract recorded in an ONNX file's metadata.

    Raises:
        OnnxExportError: The file holds no (valid) contract.
    """
    import onnx

    try:
        proto = (
            onnx.load_model_from_string(onnx_model)
            if isinstance(onnx_model, bytes)
            else onnx.load(str(onnx_model), load_external_data=False)
        )
    except Exception as exc:  # protobuf's DecodeError, or OSError, for a damaged file
        raise OnnxExportError(f"not a readable ONNX model ({type(exc).__name__})") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        values = {key: json.loads(props[key]) for key in METADATA_KEYS}
        return InputContract.from_dict(
            {
                "classes": values["classes"],
                "dtype": values["input_dtype"],
                "layout": values["input_layout"],
                "shape": values["input_shape"],
                "mean": values["mean"],
                "std": values["std"],
            }
        )
    except (KeyError, ValueError) as exc:
        raise OnnxExportError(f"ONNX model without a valid input contract: {exc}") from exc


def export_bytes(model: torch.nn.Module, contract: InputContract) -> bytes:
    """The model behind its input contract as an ONNX graph, in memory.

    The graph (opset :data:`OPSET`, dynamic batch axis) takes ``uint8`` ``N×C×H×W`` pixels,
    casts and normalises them, and carries the contract in its metadata.

    Args:
        model: A network taking normalised float32 inputs (copied, put in eval mode).
        contract: Its input contract (shape, mean/std, class names).

    Returns:
        The serialized ONNX model, weights included.

    Raises:
        OnnxExportError: The exporter cannot trace the network.
    """
    net = ServedModel(copy.deepcopy(model).cpu().float(), contract).eval()
    example = torch.zeros(2, *contract.shape, dtype=torch.uint8)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter chatter about its own internals
            # The torch.export-based exporter: it traces the graph-based (torchvision, user)
            # networks too, and its hardswish/hardsigmoid match PyTorch more closely than the
            # TorchScript exporter's. Weights stay inside the one file (models are small).
            program = torch.onnx.export(
                net,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            _drop_stack_traces(program.model)
            program.model.metadata_props.update(contract_metadata(contract))
            program.save(buffer, external_data=False)
    except Exception as exc:
        raise OnnxExportError(
            f"ONNX export of {type(model).__name__} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return buffer.getvalue()


def _drop_stack_traces(model: object) -> None:
    """Remove the Python stack trace the exporter records on every node of ``model``.

    The traces name this machine's absolute source paths: a shipped model should not carry
    them, and without them the same model gives the same bytes wherever it is exported.
    """
    for graph in (*model.graphs(), *model.functions.values()):  # type: ignore[attr-defined]
        for node in graph:
            node.metadata_props.pop(STACK_TRACE_KEY, None)


def session(onnx_model: bytes | Path, threads: int | None = None) -> object:
    """An onnxruntime CPU inference session for a serialized model or a file.

    Args:
        onnx_model: The model's bytes, or the path of a ``.onnx`` file.
        threads: Intra-op threads (``None``: onnxruntime's default).

    Returns:
        An ``onnxruntime.InferenceSession``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
    source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def compare(
    model: torch.nn.Module, contract: InputContract, onnx_model: bytes | Path, x: torch.Tensor
) -> tuple[float, float]:
    """PyTorch's and onnxruntime's logits on the ``uint8`` batch ``x``.

    Returns:
        The max abs difference (``inf`` for another output shape) and PyTorch's max abs logit.
    """
    net = ServedModel(copy.deepcopy(model).cpu().float(), contract).eval()
    with torch.no_grad():
        expected = net(x).numpy()
    got = session(onnx_model).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    if got.shape != expected.shape:
        return float("inf"), scale
    return float(np.abs(got - expected).max()), scale


def random_pixels(batch: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A reproducible batch of random ``uint8`` pixels ``batch×shape``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *shape), generator=generator, dtype=torch.uint8)


def export_checked(
    model: torch.nn.Module,
    contract: InputContract,
    path: Path,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    seed: int = 0,
) -> float:
    """Export ``model`` behind its contract to ``path`` after checking it against PyTorch.

    Both run on a random ``uint8`` batch of 3 (another size than the export's, so the dynamic
    batch axis is exercised); they must agree within ``atol + rtol * max|logit|``. Nothing is
    written unless they do; a previous file at ``path`` is removed when they do not, so a
    stale copy never travels with a new model.

    Args:
        model: The network (normalised float32 inputs).
        contract: Its input contract.
        path: Destination ``.onnx`` file (written atomically).
        atol: Absolute part of the tolerance.
        rtol: Part of the tolerance relative to PyTorch's largest absolute logit.
        seed: Seed of the check batch.

    Returns:
        The max abs difference measured.

    Raises:
        OnnxExportError: Export failed, or the difference exceeds the tolerance.
    """
    path = Path(path)
    try:
        data = export_bytes(model, contract)
        x = random_pixels(3, contract.shape, seed)
        diff, scale = compare(model, contract, data, x)
        tolerance = atol + rtol * scale
        if not diff <= tolerance:
            raise OnnxExportError(
                f"ONNX export of {type(model).__name__} does not match PyTorch: max abs logit "
                f"difference {diff:.3g} > {atol:g} + {rtol:g} * {scale:.3g} (max abs logit); "
                f"{path.name} not written"
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    atomic_write_bytes(path, lambda fh: fh.write(data))
    return diff


def onnx_pass(
    onnx_model: bytes | Path, in_shape: tuple[int, ...], batch: int, threads: int | None = None
) -> Callable[[], object]:
    """A callable running one onnxruntime forward pass on a fixed batch of random pixels.

    Args:
        onnx_model: The model's bytes or file (``uint8`` input).
        in_shape: Input shape of one sample.
        batch: Batch size.
        threads: Intra-op threads (``None``: onnxruntime's default).
    """
    sess = session(onnx_model, threads=threads)
    feed = {INPUT_NAME: random_pixels(batch, in_shape).numpy()}
    return lambda: sess.run([OUTPUT_NAME], feed)


def export_temporary(model: torch.nn.Module, contract: InputContract) -> bytes:
    """Export and check ``model`` behind ``contract`` without keeping a file; the ONNX bytes.

    Raises:
        OnnxExportError: As :func:`export_checked`.
    """
    with tempfile.TemporaryDirectory(prefix="switchprune-onnx-") as tmp:
        path = Path(tmp) / ONNX_FILE
        export_checked(model, contract, path)
        return path.read_bytes()
