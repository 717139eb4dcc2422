"""ONNX copies of task networks: export, check against PyTorch, time with onnxruntime."""

from __future__ import annotations

import copy
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from switchprune.io import ArtifactError, atomic_write_bytes

ONNX_FILE = "model.onnx"
OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_ABS_DIFF = 1e-4
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


class OnnxExportError(ArtifactError):
    """The ONNX export failed, or onnxruntime does not compute what PyTorch computes."""


def export_bytes(model: torch.nn.Module, in_shape: tuple[int, ...]) -> bytes:
    """The model as an ONNX graph (opset :data:`OPSET`, dynamic batch axis), in memory.

    Args:
        model: A network taking ``N×in_shape`` float32 inputs (copied, put in eval mode).
        in_shape: Input shape of one sample, e.g. ``(1, 28, 28)``.

    Returns:
        The serialized ONNX model, weights included.

    Raises:
        OnnxExportError: The exporter cannot trace the network.
    """
    net = copy.deepcopy(model).cpu().float().eval()
    example = torch.zeros(2, *in_shape)
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


def max_abs_diff(model: torch.nn.Module, onnx_model: bytes | Path, x: torch.Tensor) -> float:
    """Max abs difference between PyTorch's and onnxruntime's logits on ``x`` (float32)."""
    net = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad():
        expected = net(x.float()).numpy()
    got = session(onnx_model).run([OUTPUT_NAME], {INPUT_NAME: x.float().numpy()})[0]
    if got.shape != expected.shape:
        return float("inf")
    return float(np.abs(got - expected).max())


def export_checked(
    model: torch.nn.Module,
    in_shape: tuple[int, ...],
    path: Path,
    *,
    tolerance: float = MAX_ABS_DIFF,
    seed: int = 0,
) -> float:
    """Export ``model`` to ``path`` after checking the ONNX copy against PyTorch.

    The check runs both on a random batch of 3 (another size than the export's, so the
    dynamic batch axis is exercised). Nothing is written unless it passes; a previous file at
    ``path`` is removed when it fails, so a stale copy never travels with a new model.

    Args:
        model: The network.
        in_shape: Input shape of one sample.
        path: Destination ``.onnx`` file (written atomically).
        tolerance: Largest max abs logit difference accepted.
        seed: Seed of the check batch.

    Returns:
        The max abs difference measured.

    Raises:
        OnnxExportError: Export failed, or the difference exceeds ``tolerance``.
    """
    path = Path(path)
    try:
        data = export_bytes(model, in_shape)
        x = torch.randn(3, *in_shape, generator=torch.Generator().manual_seed(seed))
        diff = max_abs_diff(model, data, x)
        if not diff <= tolerance:
            raise OnnxExportError(
                f"ONNX export of {type(model).__name__} does not match PyTorch: max abs logit "
                f"difference {diff:.3g} > {tolerance:g}; {path.name} not written"
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    atomic_write_bytes(path, lambda fh: fh.write(data))
    return diff


def latency_ms(
    onnx_model: bytes | Path,
    in_shape: tuple[int, ...],
    batch: int,
    *,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> float:
    """Median onnxruntime forward time in milliseconds for a batch of ``batch`` samples.

    Args:
        onnx_model: The model's bytes or file.
        in_shape: Input shape of one sample.
        batch: Batch size.
        warmup: Untimed runs first.
        repeats: Timed runs.
        threads: Intra-op threads (``None``: onnxruntime's default).

    Returns:
        The median time of one run.
    """
    sess = session(onnx_model, threads=threads)
    x = np.random.default_rng(0).standard_normal((batch, *in_shape)).astype(np.float32)
    feed = {INPUT_NAME: x}
    for _ in range(max(0, warmup)):
        sess.run([OUTPUT_NAME], feed)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        sess.run([OUTPUT_NAME], feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def export_temporary(model: torch.nn.Module, in_shape: tuple[int, ...]) -> bytes:
    """Export and check ``model`` without keeping a file; the ONNX bytes.

    Raises:
        OnnxExportError: As :func:`export_checked`.
    """
    with tempfile.TemporaryDirectory(prefix="switchprune-onnx-") as tmp:
        path = Path(tmp) / ONNX_FILE
        export_checked(model, in_shape, path)
        return path.read_bytes()
