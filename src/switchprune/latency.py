"""Predicted latency of a task network at any group widths, from a table measured on the device.

``train.target_metric: latency`` places the budget line on this prediction instead of on
parameters or MACs. Before switching starts, every ``Conv2d`` and ``Linear`` is timed alone, in
the evaluation's runtime (``evaluate.runtime``: PyTorch on the training device, or onnxruntime on
the CPU) at its thread count and batch size (``evaluate.threads``, ``evaluate.batch_size``), on
inputs of the shape it sees in the network, at a grid of input and output widths. The prediction
is the sum over layers, mapped to the whole network's time through networks measured at uniform
shares of the widths: the rest of the work (BatchNorm, activations, additions, pooling) is taken
to shrink with the layers around it.

Vectorised kernels work on blocks of channels (:func:`block`: 16 floats with AVX-512, 8 with
AVX2, 8 on a GPU), so a layer's time steps at block boundaries: 33 channels cost what 48 do.
Widths are therefore rounded up to a whole block before the table is read, the grid holds whole
blocks only, and a latency target keeps whole blocks (the run's width multiple becomes a multiple
of the block). Layer times and whole-network times are cached (:func:`cache_dir`) by device,
runtime, library versions, threads, batch and shape, so a rerun on the same machine measures
nothing and predicts the same widths.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from switchprune.evaluation import (
    LATENCY_BATCHES,
    forward_pass,
    interleaved_latency,
    retain_freed_memory,
    torch_threads,
)
from switchprune.io import atomic_write_bytes

# Inputs per timed forward pass, unless ``evaluate.batch_size`` says otherwise.
BATCH = LATENCY_BATCHES[-1]
# Shares of a layer's full input and output widths it is timed at (rounded up to whole blocks).
GRID = (0.125, 0.25, 0.5, 0.75, 1.0)
# Uniform shares of every group's width the whole network is timed at, to calibrate the sum.
CALIBRATION = (0.25, 0.5, 0.75, 1.0)
WARMUP, REPEATS = 2, 10
CACHE_ENV = "SWITCHPRUNE_CACHE"

Widths = Mapping[str, float | int | torch.Tensor]
# Times (ms) of forward-pass callables, by name: replaced in tests by a scripted timer.
Timer = Callable[[Mapping[str, Callable[[], object]]], dict[str, float]]


@dataclass(frozen=True)
class Setting:
    """Where and how the latency a target asks for is measured: the ``evaluate`` settings.

    Attributes:
        runtime: ``torch``, or ``onnxruntime`` (on the CPU, as ``evaluate`` times it).
        batch: Inputs per timed forward pass (``evaluate.batch_size``).
        threads: CPU threads (``evaluate.threads``; 0: torch's thread count).
    """

    runtime: Literal["torch", "onnxruntime"] = "torch"
    batch: int = BATCH
    threads: int = 0


def block(device: torch.device, runtime: str = "torch") -> int:
    """Channels a vectorised kernel handles at once on ``device``: where a layer's time steps.

    16 float32 lanes with AVX-512, 8 with AVX2, 8 for a GPU's tensor-core tiles, else 4.
    """
    if runtime == "torch" and device.type == "cuda":
        return 8
    capability = torch.backends.cpu.get_cpu_capability()
    return 16 if capability.startswith("AVX512") else 8 if capability.startswith("AVX2") else 4


def time_passes(runs: Mapping[str, Callable[[], object]]) -> dict[str, float]:
    """Median time of each forward pass, timed in turns (:func:`interleaved_latency`)."""
    timed = interleaved_latency(runs, warmup=WARMUP, repeats=REPEATS)
    return {name: t.median_ms for name, t in timed.items()}


@dataclass(frozen=True)
class Layer:
    """One ``Conv2d``/``Linear`` as the widths change it, with its measured times.

    Attributes:
        name: Module name in the network.
        in_parts: ``(group, inputs per unit)`` of every gated group it reads.
        in_fixed: Its inputs that no gate touches.
        out_group: The group its outputs belong to (``None``: never pruned).
        in_full: Its full input width.
        out_full: Its full output width.
        depthwise: One input per output, so the input width follows the output width.
        geometry: What the layer is apart from its widths (kind, kernel, stride, padding,
            dilation, bias, input height and width, groups; 0 groups: depthwise): the cache
            key's shape part.
        positions: Output positions per sample (H*W of a conv's output, 1 for a linear).
        cins: Input widths of the grid (ascending).
        couts: Output widths of the grid (ascending).
        ms: Time at ``(cins[i], couts[j])``, row-major.
        block: Widths are rounded up to a multiple of this (:func:`block`) before the table
            is read.
    """

    name: str
    in_parts: tuple[tuple[str, int], ...]
    in_fixed: int
    out_group: str | None
    in_full: int
    out_full: int
    depthwise: bool
    geometry: tuple[int | str, ...]
    positions: int = 1
    cins: tuple[int, ...] = ()
    couts: tuple[int, ...] = ()
    ms: tuple[tuple[float, ...], ...] = ()
    block: int = 1

    def widths(self, widths: Widths) -> tuple[float, float]:
        """Its input and output width at the group widths ``widths``."""
        cout = float(widths[self.out_group]) if self.out_group else float(self.out_full)
        if self.depthwise:
            return cout, cout
        return self.in_fixed + sum(p * float(widths[g]) for g, p in self.in_parts), cout

    def time(self, cin: float, cout: float) -> float:
        """Time at ``cin`` inputs and ``cout`` outputs, read at whole blocks (never below 0)."""
        cin, cout = _up(cin, self.block, self.in_full), _up(cout, self.block, self.out_full)
        rows = [_interpolate(self.couts, row, cout) for row in self.ms]
        return max(0.0, _interpolate(self.cins, rows, cin))


class LatencyModel:
    """Predicted forward time (ms) of a network at given group widths.

    The layers' interpolated times are summed, and the sum is mapped to a network time through
    calibration points: the whole network measured at uniform shares of its widths
    (:data:`CALIBRATION`), piecewise linearly in between. What the layers timed alone miss
    (BatchNorm, activations, additions, pooling, the overhead of small operations) is thereby
    measured rather than assumed.

    Args:
        layers: Every timed layer.
        full: The full group widths.
        calibration: ``(widths, measured ms)`` of whole networks, the full one among them.
        block: The layers' block (:func:`block`): the step of :meth:`marginal`.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        full: Mapping[str, int],
        calibration: Sequence[tuple[Mapping[str, int], float]],
        block: int = 1,
    ) -> None:
        self.layers = list(layers)
        self.full = dict(full)
        self.block = block
        # Narrow networks can round to the same whole blocks: one point per layer sum.
        points = sorted({self._layers(w): float(ms) for w, ms in calibration}.items())
        self._sums = [p[0] for p in points]
        self._times = [p[1] for p in points]

    def _layers(self, widths: Widths) -> float:
        return sum(layer.time(*layer.widths(widths)) for layer in self.layers)

    def __call__(self, widths: Widths | None = None) -> float:
        """Predicted time at ``widths`` (full widths by default)."""
        total = self._layers(self.full if widths is None else widths)
        return max(0.0, _interpolate(self._sums, self._times, total))

    def marginal(self, widths: Widths) -> dict[str, float]:
        """Predicted time of one more unit in each group, at ``widths`` (a block's, shared)."""
        now, step = self(widths), float(self.block)
        return {g: (self({**widths, g: float(widths[g]) + step}) - now) / step for g in self.full}


def measure(
    model: nn.Module,
    layers: Sequence[Layer],
    in_shape: tuple[int, ...],
    device: torch.device,
    *,
    setting: Setting | None = None,
    timer: Timer | None = None,
    cache: Path | None = None,
) -> LatencyModel:
    """Time ``layers`` at their grid and ``model`` whole, from the cache where it has them.

    Args:
        model: The full-width network, as it runs (gates off); it is copied, not moved.
        layers: Its layers, shapes only (see :meth:`switchprune.cost.CostModel.layers`).
        in_shape: Shape of one input.
        device: Where PyTorch times (onnxruntime always runs on the CPU).
        setting: Runtime, batch and threads (default: PyTorch, batch :data:`BATCH`, torch's
            thread count).
        timer: Times forward passes (default :func:`time_passes`).
        cache: Cache folder (default :func:`cache_dir`).

    Returns:
        The latency model.
    """
    setting = Setting() if setting is None else setting
    cache = cache_dir() if cache is None else cache
    timer = time_passes if timer is None else timer
    device = device if setting.runtime == "torch" else torch.device("cpu")
    model = copy.deepcopy(model).eval()
    size = block(device, setting.runtime)
    # As ``evaluate`` times: with the allocator's page faults in them, whole-network times at
    # batch 256 vary by up to 40 % with the process's history, and the table with them.
    retained = retain_freed_memory()
    # The timing modules must not draw from the global generator: training stays the same
    # whether the times come from the cache or not.
    with (
        torch_threads(setting.threads or None),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
    ):
        context = {**_context(device, setting, size), "retained_memory": retained}
        runner = _Runner(setting, device, in_shape)
        timed = [_timed_layer(layer, runner, size, context, timer, cache) for layer in layers]
        full = {g: int(w) for g, w in model.group_sizes().items()}  # type: ignore[operator]
        calibration = _calibration(model, full, runner, size, context, timer, cache)
    return LatencyModel(timed, full, calibration, size)  # type: ignore[arg-type]


def _calibration(
    model: nn.Module,
    full: Mapping[str, int],
    runner: _Runner,
    size: int,
    context: dict[str, object],
    timer: Timer,
    cache: Path,
) -> list[tuple[dict[str, int], float]]:
    """The whole network timed at each :data:`CALIBRATION` share of its widths, in turns.

    One timer call times them all, interleaved: the predicted speedup is a ratio of these
    times, and networks timed in separate calls carry the machine's drift between the calls
    (up to a fifth on a busy machine) straight into it.
    """
    grids = [
        {g: int(_up(max(1, round(s * n)), size, n)) for g, n in full.items()} for s in CALIBRATION
    ]
    key = {"networks": [_signature(model, w) for w in grids], **context}

    def run() -> list[float]:
        ms = timer({str(i): runner.network(model, w) for i, w in enumerate(grids)})
        return [ms[str(i)] for i in range(len(grids))]

    times = _cached(cache, key, run)
    assert isinstance(times, list)
    return [(w, float(t)) for w, t in zip(grids, times, strict=True)]


@dataclass(frozen=True)
class _Runner:
    """Builds the timed forward passes in the setting's runtime."""

    setting: Setting
    device: torch.device
    in_shape: tuple[int, ...]

    def layer(self, module: nn.Module, shape: tuple[int, ...]) -> Callable[[], object]:
        """A forward pass of one layer on random float32 inputs of ``shape``."""
        if self.setting.runtime == "torch":
            return forward_pass(module, shape, self.setting.batch, self.device)
        import numpy as np

        from switchprune.onnx_export import session

        sess = session(_onnx_layer(module, shape), threads=torch.get_num_threads())
        x = np.random.default_rng(0).standard_normal((self.setting.batch, *shape), np.float32)
        return lambda: sess.run(None, {"x": x})

    def network(self, model: nn.Module, widths: Mapping[str, int]) -> Callable[[], object]:
        """A forward pass of the whole network at ``widths``, as ``evaluate`` times it."""
        net = narrowed(model, widths)
        if self.setting.runtime == "torch":
            return forward_pass(net, self.in_shape, self.setting.batch, self.device)
        from switchprune.onnx_export import export_bytes, onnx_pass
        from switchprune.serving import InputContract

        channels, classes = self.in_shape[0], int(model.spec.num_classes)  # type: ignore[union-attr]
        contract = InputContract(
            shape=tuple(self.in_shape),  # type: ignore[arg-type]
            mean=(0.0,) * channels,
            std=(1.0,) * channels,
            classes=tuple(str(i) for i in range(classes)),
        )
        data = export_bytes(net, contract)
        return onnx_pass(data, self.in_shape, self.setting.batch, torch.get_num_threads())


def _onnx_layer(module: nn.Module, shape: tuple[int, ...]) -> bytes:
    """One ``Conv2d`` or ``Linear`` as a one-node ONNX graph.

    Built directly: exporting hundreds of grid points through the exporter takes minutes.
    """
    from onnx import TensorProto, helper, numpy_helper

    from switchprune.onnx_export import OPSET

    names = ["x", "w"] + (["b"] if module.bias is not None else [])
    params = [module.weight] + ([module.bias] if module.bias is not None else [])
    inits = [
        numpy_helper.from_array(p.detach().numpy(), n)
        for n, p in zip(names[1:], params, strict=True)
    ]
    if isinstance(module, nn.Conv2d):
        pad = [int(p) for p in module.padding]  # type: ignore[union-attr]
        node = helper.make_node(
            "Conv", names, ["y"], kernel_shape=list(module.kernel_size),
            strides=list(module.stride), pads=pad + pad, dilations=list(module.dilation),
            group=module.groups,
        )  # fmt: skip
    else:
        node = helper.make_node("Gemm", names, ["y"], transB=1)
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx_model.ir_version = 8  # what every onnxruntime that reads opset 18 accepts
    return onnx_model.SerializeToString()


def cache_dir() -> Path:
    """``$SWITCHPRUNE_CACHE/latency``, else ``$XDG_CACHE_HOME/switchprune/latency``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "latency"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "switchprune" / "latency"


def _timed_layer(
    layer: Layer,
    runner: _Runner,
    size: int,
    context: dict[str, object],
    timer: Timer,
    cache: Path,
) -> Layer:
    """``layer`` with its times at every grid point."""
    gated_in = bool(layer.in_parts) and not layer.depthwise
    cins = _grid(layer.in_fixed, layer.in_full, gated_in, size) if not layer.depthwise else (1,)
    couts = _grid(0, layer.out_full, layer.out_group is not None, size)
    key = {"layer": list(layer.geometry), "cins": cins, "couts": couts, **context}

    def run() -> list[list[float]]:
        passes = {
            f"{i},{o}": runner.layer(*_layer_module(layer, i, o)) for i in cins for o in couts
        }
        ms = timer(passes)
        return [[ms[f"{i},{o}"] for o in couts] for i in cins]

    table = _cached(cache, key, run)
    fields = {**asdict(layer), "cins": cins, "couts": couts, "ms": _rows(table), "block": size}
    return Layer(**fields)


def _up(width: float, size: int, full: int) -> float:
    """``width`` rounded up to a whole number of blocks of ``size``, at most ``full``."""
    return float(min(full, -(-width // size) * size)) if size > 1 else width


def _grid(fixed: int, full: int, gated: bool, size: int = 1) -> tuple[int, ...]:
    """Widths to time: ``fixed`` plus the grid's shares of the rest in whole blocks, or ``full``."""
    if not gated:
        return (full,)
    shares = {fixed + max(1, round(share * (full - fixed))) for share in GRID}
    return tuple(sorted({int(_up(w, size, full)) for w in shares}))


def _rows(table: object) -> tuple[tuple[float, ...], ...]:
    assert isinstance(table, list)
    return tuple(tuple(float(v) for v in row) for row in table)


def _layer_module(layer: Layer, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A fresh copy of ``layer`` with ``cin`` inputs and ``cout`` outputs, and its input shape."""
    kind, *rest = layer.geometry
    if kind == "linear":
        (bias,) = rest
        return nn.Linear(cin, cout, bias=bool(bias)), (cin,)
    k1, k2, s1, s2, p1, p2, d1, d2, bias, height, width, groups = (int(v) for v in rest)
    groups = cout if layer.depthwise else groups
    module = nn.Conv2d(
        cout if layer.depthwise else cin,
        cout,
        (k1, k2),
        stride=(s1, s2),
        padding=(p1, p2),
        dilation=(d1, d2),
        groups=groups,
        bias=bool(bias),
    )
    return module, (module.in_channels, height, width)


def _signature(model: nn.Module, widths: Mapping[str, int]) -> object:
    """The network at ``widths``, for the cache key: its spec, or its structure."""
    spec = getattr(model, "spec", None)
    return spec.with_widths(widths).to_dict() if spec is not None else [repr(model), widths]


def narrowed(model: nn.Module, widths: Mapping[str, int]) -> nn.Module:
    """``model`` itself at full width, else a dense copy keeping each group's first units."""
    from switchprune.pruning import compact  # the compacted network of any architecture

    full = {g: int(w) for g, w in model.group_sizes().items()}  # type: ignore[operator]
    if dict(widths) == full:
        return model
    ones = {g: torch.ones(n) for g, n in full.items()}
    kept = {g: torch.arange(min(max(1, int(widths[g])), n)) for g, n in full.items()}
    return compact(model, ones, kept)  # type: ignore[arg-type]


def _context(device: torch.device, setting: Setting, size: int) -> dict[str, object]:
    """What a time depends on besides the layer: device, runtime, threads, batch, block."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()} {platform.processor()} {os.cpu_count()} cpus"
    runtime = f"torch {torch.__version__}"
    if setting.runtime == "onnxruntime":
        import onnxruntime

        runtime = f"onnxruntime {onnxruntime.__version__}"
    return {
        "device": name,
        "runtime": runtime,
        "threads": torch.get_num_threads(),
        "batch": setting.batch,
        "repeats": REPEATS,
        "block": size,
    }


def _cached(cache: Path, key: Mapping[str, object], compute: Callable[[], object]) -> object:
    """The value stored under ``key``, else ``compute()``'s, stored."""
    text = json.dumps(key, sort_keys=True, default=str)
    path = cache / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(text):
            return stored["value"]
    except (OSError, ValueError, AttributeError):
        pass  # absent or unreadable: measured again
    value = compute()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"key": json.loads(text), "value": value}).encode()
        atomic_write_bytes(path, lambda fh: fh.write(body))
    except OSError:
        pass  # a read-only cache only costs the next run a measurement
    return value


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through ``(xs, ys)``, extended linearly past both ends."""
    if len(xs) == 1:
        return float(ys[0])
    i = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
