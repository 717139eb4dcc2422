"""Measurements of a task network: accuracy, parameters, MACs, serialized size and latency.

MACs are counted by forward hooks on every ``Conv2d`` and ``Linear`` (one multiply-add = one MAC,
per sample), independently of :class:`switchprune.cost.CostModel`, so the two can check each
other.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from switchprune.data import PreparedSplit, iter_batches
from switchprune.errors import InputError


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    data: TensorDataset | PreparedSplit,
    device: torch.device,
    batch_size: int = 512,
    *,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) for every sample of ``data``, on the CPU.

    Args:
        model: The network (its parameters in ``dtype`` when given).
        data: A split in memory or streamed from disk (:func:`switchprune.data.open_split`).
        device: Where to run.
        batch_size: Samples per forward pass.
        dtype: Floating type the inputs are cast to (default: as stored, float32).
        num_workers: ``DataLoader`` worker processes for a streamed split.
    """
    was_training = model.training
    model.eval()
    out = [
        model(x.to(device)).cpu()
        for x, _ in iter_batches(
            data, batch_size, num_workers=num_workers, dtype=dtype or torch.float32
        )
    ]
    model.train(was_training)
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of precomputed logits."""
    if len(labels) == 0:
        raise InputError("cannot compute accuracy on an empty split")
    # Count, then divide in Python: a float32 mean would print 0.9777777791 for 352/360.
    return int((logits.argmax(1) == labels.cpu()).sum()) / len(labels)


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample's forward pass through every Conv2d and Linear.

    Args:
        model: The network; left in the mode it was in.
        in_shape: Shape of one input, without the batch dimension.

    Returns:
        MACs per sample (one multiply-add counts as one MAC).
    """
    total = 0

    def hook(m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            per_position = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total += per_position * int(out[0].numel())
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(torch.zeros(1, *in_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def size_metrics(
    before: nn.Module, after: nn.Module, in_shape: tuple[int, ...]
) -> dict[str, float]:
    """Parameters and MACs per sample of a network before and after compaction.

    Args:
        before: The full-width network (without gates: they add no parameters or MACs).
        after: The compacted network.
        in_shape: Shape of one input, without the batch dimension.

    Returns:
        ``params_before``, ``params_after``, ``macs_before``, ``macs_after`` and the ratios
        ``params_ratio`` and ``macs_ratio`` (after / before).
    """
    params = float(count_params(before)), float(count_params(after))
    macs = float(count_macs(before, in_shape)), float(count_macs(after, in_shape))
    return {
        "params_before": params[0],
        "params_after": params[1],
        "macs_before": macs[0],
        "macs_after": macs[1],
        "params_ratio": params[1] / params[0],
        "macs_ratio": macs[1] / macs[0],
    }


def state_dict_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's ``state_dict`` as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def retain_freed_memory() -> bool:
    """Let this process's allocator keep freed memory instead of returning it to the system.

    By default glibc hands large blocks (activations of a batch of 256) back to the system on
    free and takes them again, page-faulting, on the next forward pass, and whether it does so
    depends on its own adaptive thresholds. Forward times then vary by up to 40 % with the
    history of the process, and latency ratios with them. This has the effect of the caching
    allocators (jemalloc, tcmalloc) that CPU inference servers use. Call it once, before timing.

    Returns:
        ``True`` when the setting was applied (glibc), ``False`` elsewhere (nothing changes).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    limit = 1 << 30  # blocks up to 1 GiB stay in the process
    return bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, limit))


# Batch sizes every latency is timed at: one request, and a batch of offline inference.
LATENCY_BATCHES = (1, 256)


def latency_batches(*more: int) -> tuple[int, ...]:
    """:data:`LATENCY_BATCHES` and ``more`` (the evaluation batch, a prediction's), sorted."""
    return tuple(sorted({*LATENCY_BATCHES, *more}))


# A latency is trusted only from this many timed passes, with an interquartile range of at most
# this share of its median; otherwise it is flagged as noisy and no speedup is quoted from it.
TRUSTED_REPEATS = 20
NOISY_IQR_SHARE = 0.2


@dataclass(frozen=True)
class Latency:
    """Forward times of one model over the timed repeats, in milliseconds.

    Attributes:
        median_ms: Median of the repeats.
        iqr_ms: Interquartile range (75th minus 25th percentile) of the repeats: their spread
            in this one run (0 with a single repeat).
        repeats: How many passes were timed.
    """

    median_ms: float
    iqr_ms: float
    repeats: int

    @property
    def noisy(self) -> bool:
        """Too few repeats, or a spread above :data:`NOISY_IQR_SHARE` of the median."""
        return self.repeats < TRUSTED_REPEATS or self.iqr_ms > NOISY_IQR_SHARE * self.median_ms

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> Latency:
        """The median and interquartile range of ``times_ms``."""
        if len(times_ms) < 2:
            return cls(median_ms=float(statistics.median(times_ms)), iqr_ms=0.0, repeats=1)
        # "inclusive": the quartiles of the measured times themselves, not of a population.
        q1, _q2, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
        return cls(float(statistics.median(times_ms)), float(q3 - q1), len(times_ms))


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Torch's thread count set to ``count`` (``None``: as it is), restored afterwards."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(before)


def interleaved_latency(
    runs: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 5,
    repeats: int = 20,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Latency]:
    """Time several forward passes in turns, so that the machine's drifts hit them alike.

    Each round runs every pass once, in alternating order (A B, then B A), after ``warmup``
    untimed rounds: a busy spell or a frequency change lands on all of them instead of on the
    one that happened to run then.

    Args:
        runs: Name to a callable running one forward pass (synchronised, on a GPU).
        warmup: Untimed rounds first (allocator, kernels, caches).
        repeats: Timed rounds.
        clock: Seconds, monotonic (a test passes its own).

    Returns:
        Per name, the median and interquartile range of its timed passes.
    """
    order = list(runs.items())
    for _ in range(warmup):
        for _name, run in order:
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(max(1, repeats)):
        for name, run in order if i % 2 == 0 else order[::-1]:
            start = clock()
            run()
            times[name].append((clock() - start) * 1000.0)
    return {name: Latency.of(t) for name, t in times.items()}


def forward_pass(
    model: nn.Module, in_shape: tuple[int, ...], batch_size: int, device: torch.device
) -> Callable[[], object]:
    """A callable running one no-grad forward pass of ``model`` on a fixed random batch.

    Args:
        model: The network (put in eval mode on ``device``).
        in_shape: Shape of one input, without the batch dimension.
        batch_size: Inputs per forward pass.
        device: Where to run; on CUDA the call waits for the GPU.
    """
    model = model.to(device).eval()
    x = torch.randn(batch_size, *in_shape, generator=torch.Generator().manual_seed(0)).to(device)

    @torch.no_grad()
    def run() -> object:
        out = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run
