"""Predicted latency of a task network at any group widths, from a table measured on the device.

``train.target_metric: latency`` places the budget line on this prediction instead of on
parameters or MACs. Before switching starts, every ``Conv2d`` and ``Linear`` is timed alone, on
the training device at torch's thread count, on a batch of :data:`BATCH` inputs of the shape it
sees in the network, at a grid of input and output widths (:data:`GRID` of its full widths);
between grid points a layer's time is interpolated bilinearly. The prediction is the sum over
layers, scaled so that at full width it equals the whole network's measured time: the rest of
the work (BatchNorm, activations, additions, pooling) is taken to shrink with the layers around
it. Layer times and whole-network times are cached (:func:`cache_dir`) by device, torch version,
thread count, batch and shape, so a rerun on the same machine measures nothing and predicts the
same widths.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from switchprune.evaluation import LATENCY_BATCHES, forward_pass, interleaved_latency
from switchprune.io import atomic_write_bytes

# Inputs per timed forward pass: the batch size whose speedup a latency target asks for.
BATCH = LATENCY_BATCHES[-1]
# Shares of a layer's full input and output widths it is timed at.
GRID = (0.125, 0.25, 0.5, 0.75, 1.0)
# Uniform shares of every group's width the whole network is timed at, to calibrate the sum.
CALIBRATION = (0.25, 0.5, 0.75, 1.0)
WARMUP, REPEATS = 2, 10
CACHE_ENV = "SWITCHPRUNE_CACHE"

Widths = Mapping[str, float | int | torch.Tensor]
# Times (ms) of forward-pass callables, by name: replaced in tests by a scripted timer.
Timer = Callable[[Mapping[str, Callable[[], object]]], dict[str, float]]


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

    def widths(self, widths: Widths) -> tuple[float, float]:
        """Its input and output width at the group widths ``widths``."""
        cout = float(widths[self.out_group]) if self.out_group else float(self.out_full)
        if self.depthwise:
            return cout, cout
        return self.in_fixed + sum(p * float(widths[g]) for g, p in self.in_parts), cout

    def time(self, cin: float, cout: float) -> float:
        """Interpolated time at ``cin`` inputs and ``cout`` outputs (never below 0)."""
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
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        full: Mapping[str, int],
        calibration: Sequence[tuple[Mapping[str, int], float]],
    ) -> None:
        self.layers = list(layers)
        self.full = dict(full)
        points = sorted((self._layers(w), float(ms)) for w, ms in calibration)
        self._sums = [p[0] for p in points]
        self._times = [p[1] for p in points]

    def _layers(self, widths: Widths) -> float:
        return sum(layer.time(*layer.widths(widths)) for layer in self.layers)

    def __call__(self, widths: Widths | None = None) -> float:
        """Predicted time at ``widths`` (full widths by default)."""
        total = self._layers(self.full if widths is None else widths)
        return max(0.0, _interpolate(self._sums, self._times, total))

    def marginal(self, widths: Widths) -> dict[str, float]:
        """Predicted time of one more unit in each group, at ``widths``."""
        now = self(widths)
        return {g: self({**widths, g: float(widths[g]) + 1.0}) - now for g in self.full}


def measure(
    model: nn.Module,
    layers: Sequence[Layer],
    in_shape: tuple[int, ...],
    device: torch.device,
    *,
    timer: Timer | None = None,
    cache: Path | None = None,
) -> LatencyModel:
    """Time ``layers`` at their grid and ``model`` whole, from the cache where it has them.

    Args:
        model: The full-width network, as it runs (gates off), on ``device``.
        layers: Its layers, shapes only (see :meth:`switchprune.cost.CostModel.layers`).
        in_shape: Shape of one input.
        device: Where to time.
        timer: Times forward passes (default :func:`time_passes`).
        cache: Cache folder (default :func:`cache_dir`).

    Returns:
        The latency model.
    """
    cache = cache_dir() if cache is None else cache
    timer = time_passes if timer is None else timer
    context = _context(device)
    # The timing modules must not draw from the global generator: training stays the same
    # whether the times come from the cache or not.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        timed = [_timed_layer(layer, device, context, timer, cache) for layer in layers]
        full = {g: int(w) for g, w in model.group_sizes().items()}  # type: ignore[operator]
        calibration = [
            (widths, _cached(cache, {"network": _signature(model, widths), **context},
                             lambda w=widths: _time_network(model, w, in_shape, device, timer)))
            for widths in ({g: max(1, round(s * n)) for g, n in full.items()} for s in CALIBRATION)
        ]  # fmt: skip
    return LatencyModel(timed, full, calibration)  # type: ignore[arg-type]


def cache_dir() -> Path:
    """``$SWITCHPRUNE_CACHE/latency``, else ``$XDG_CACHE_HOME/switchprune/latency``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "latency"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "switchprune" / "latency"


def _timed_layer(
    layer: Layer, device: torch.device, context: dict[str, object], timer: Timer, cache: Path
) -> Layer:
    """``layer`` with its times at every grid point."""
    gated_in = bool(layer.in_parts) and not layer.depthwise
    cins = _grid(layer.in_fixed, layer.in_full, gated_in) if not layer.depthwise else (1,)
    couts = _grid(0, layer.out_full, layer.out_group is not None)
    key = {"layer": list(layer.geometry), "cins": cins, "couts": couts, **context}

    def run() -> list[list[float]]:
        passes = {f"{i},{o}": _layer_pass(layer, i, o, device) for i in cins for o in couts}
        ms = timer(passes)
        return [[ms[f"{i},{o}"] for o in couts] for i in cins]

    table = _cached(cache, key, run)
    return Layer(**{**asdict(layer), "cins": cins, "couts": couts, "ms": _rows(table)})


def _grid(fixed: int, full: int, gated: bool) -> tuple[int, ...]:
    """Widths to time: ``fixed`` plus the grid's shares of the rest (at least one), or ``full``."""
    if not gated:
        return (full,)
    return tuple(sorted({fixed + max(1, round(share * (full - fixed))) for share in GRID}))


def _rows(table: object) -> tuple[tuple[float, ...], ...]:
    assert isinstance(table, list)
    return tuple(tuple(float(v) for v in row) for row in table)


def _layer_pass(layer: Layer, cin: int, cout: int, device: torch.device) -> Callable[[], object]:
    """A forward pass of a fresh copy of ``layer`` with ``cin`` inputs and ``cout`` outputs."""
    kind, *rest = layer.geometry
    if kind == "linear":
        (bias,) = rest
        module: nn.Module = nn.Linear(cin, cout, bias=bool(bias))
        return forward_pass(module, (cin,), BATCH, device)
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
    return forward_pass(module, (module.in_channels, height, width), BATCH, device)


def _signature(model: nn.Module, widths: Mapping[str, int]) -> object:
    """The network at ``widths``, for the cache key: its spec, or its structure."""
    spec = getattr(model, "spec", None)
    return spec.with_widths(widths).to_dict() if spec is not None else [repr(model), widths]


def _time_network(
    model: nn.Module,
    widths: Mapping[str, int],
    in_shape: tuple[int, ...],
    device: torch.device,
    timer: Timer,
) -> float:
    """The whole network's time at ``widths``: a freshly built copy, unless they are full."""
    was_training = model.training
    net = narrowed(model, widths)
    try:
        return timer({"network": forward_pass(net, in_shape, BATCH, device)})["network"]
    finally:
        model.train(was_training)


def narrowed(model: nn.Module, widths: Mapping[str, int]) -> nn.Module:
    """``model`` itself at full width, else a dense copy keeping each group's first units."""
    from switchprune.pruning import compact  # the compacted network of any architecture

    full = {g: int(w) for g, w in model.group_sizes().items()}  # type: ignore[operator]
    if dict(widths) == full:
        return model
    ones = {g: torch.ones(n) for g, n in full.items()}
    kept = {g: torch.arange(min(max(1, int(widths[g])), n)) for g, n in full.items()}
    return compact(model, ones, kept)  # type: ignore[arg-type]


def _context(device: torch.device) -> dict[str, object]:
    """What a time depends on besides the layer: device, library, threads, batch, grid."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()} {platform.processor()} {os.cpu_count()} cpus"
    return {
        "device": name,
        "runtime": f"torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "batch": BATCH,
        "repeats": REPEATS,
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
