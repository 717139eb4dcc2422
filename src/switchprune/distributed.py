"""Data-parallel training under ``torchrun``: who this process is, and what the ranks share.

``torchrun --nproc_per_node N`` starts N copies of a command with ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` set. :func:`session` joins them in one process group
(``gloo`` on the CPU, ``nccl`` on CUDA, each process on GPU ``LOCAL_RANK``) and leaves it at the
end. Without those variables, or with a single process, every helper here answers for a lone
process and communicates nothing, so one-process training is unchanged.

Set :data:`CHECK_VARIABLE` (``SWITCHPRUNE_CHECK_RANKS=1``) to have training compare a digest of
the factors and the scorer across ranks after every SNN step, and of the task network after every
epoch (:func:`check_ranks_agree`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from switchprune.config import ConfigError

T = TypeVar("T")

# Set to 1: the ranks compare digests of their factors and scorer after every SNN step, and of
# their task networks after every epoch.
CHECK_VARIABLE = "SWITCHPRUNE_CHECK_RANKS"


class RanksDisagreeError(RuntimeError):
    """The ranks of a data-parallel run hold different factors or scorers: a bug, not input."""


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE > 1``)."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """Whether a process group of more than one process is running (collectives are needed)."""
    return _initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the running group (1 without one)."""
    return dist.get_world_size() if _initialized() else 1


def rank() -> int:
    """This process's rank: from the group, else from ``torchrun``'s ``RANK`` (0 alone)."""
    if _initialized():
        return dist.get_rank()
    return _env_int("RANK", 0) if launched() else 0


def is_main() -> bool:
    """Whether this process writes files, logs progress and prints (rank 0, or alone)."""
    return rank() == 0


def local_world_size() -> int:
    """Processes ``torchrun`` started on this machine (1 alone)."""
    return _env_int("LOCAL_WORLD_SIZE", 1) if launched() else 1


def local_device(device: torch.device) -> torch.device:
    """``device``, with a launched process's GPU (``cuda:LOCAL_RANK``) for a bare ``cuda``."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return device


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """Join the ``torchrun`` process group for the block, then leave it.

    Nothing happens for a lone process or when a group is already running (the caller owns it),
    so sessions nest.

    Args:
        device: The training device: ``cuda`` selects ``nccl`` and GPU ``LOCAL_RANK``, anything
            else ``gloo``.

    Yields:
        The device this process trains on.
    """
    device = local_device(device)
    if not launched() or _initialized():
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _init_process_group(backend: str) -> None:
    """Join the group; a restarted attempt on one machine keys its rendezvous by attempt.

    torchrun shares its own store with the process group, and a failed attempt's keys send a
    restarted process to its dead peers (pytorch/pytorch#135712). When one agent runs every
    process its restart count names the attempt alike for all, so the group's keys go under
    it. Several machines' agents can count differently: there the store is left as torch sets
    it (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives every attempt a store of its own).
    """
    one_agent = local_world_size() == _env_int("WORLD_SIZE", 1)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not one_agent:
        dist.init_process_group(backend)
        return
    world = _env_int("WORLD_SIZE", 1)
    shared = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"switchprune/attempt_{attempt}", shared)
    dist.init_process_group(backend, store=store, rank=_env_int("RANK", 0), world_size=world)


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if active():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (itself when not distributed)."""
    if not _initialized():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (unchanged alone)."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def average_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, with one collective (no-op alone)."""
    tensors = list(tensors)
    if not active() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks (those without a gradient skipped).

    Every rank runs the same code on the same network, so the same parameters have gradients.
    """
    average_(p.grad for p in params if p.grad is not None)


def average_batchnorm_stats(model: nn.Module) -> None:
    """Average every BatchNorm's running mean and variance over the ranks (no-op alone).

    Ranks that normalise with their own batch statistics drift apart in these buffers only;
    averaged, every rank holds the same network again.
    """
    average_(
        buf
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for buf in (m.running_mean, m.running_var)
        if buf is not None
    )


def check_batch_size(batch_size: int, world: int) -> None:
    """Refuse a global batch that the ranks cannot share equally.

    Raises:
        ConfigError: If ``batch_size`` is not a multiple of ``world``.
    """
    if batch_size % world:
        raise ConfigError(
            f"[train] batch_size {batch_size} does not divide by the {world} processes of "
            "this run: every process trains on an equal share of each batch"
        )


def threads(setting: int | str) -> int | None:
    """CPU threads of each process for ``train.threads`` (``None``: torch's own default).

    ``auto`` leaves a lone process at torch's default (which honours ``OMP_NUM_THREADS``); under
    ``torchrun``, which sets ``OMP_NUM_THREADS=1``, it shares this machine's CPUs among its
    processes (at least one each).
    """
    if setting != "auto":
        return int(setting)
    if not launched():
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // local_world_size())


def checking() -> bool:
    """Whether :data:`CHECK_VARIABLE` asks for the rank check."""
    return os.environ.get(CHECK_VARIABLE, "") not in ("", "0")


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensors[name].shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_ranks_agree(where: str, parts: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Compare digests of named tensor sets across the ranks (no-op alone).

    Args:
        where: When, for the error: ``"after SNN step 12"``.
        parts: What must be equal on every rank, e.g. ``{"factors": ..., "scorer": ...}``.

    Raises:
        RanksDisagreeError: On every rank, if any part differs between ranks.
    """
    if not active():
        return
    mine = {name: digest(tensors) for name, tensors in parts.items()}
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    for name in mine:
        seen = [g[name] if g is not None else "" for g in gathered]
        if len(set(seen)) > 1:
            by_rank = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(seen))
            raise RanksDisagreeError(f"ranks disagree {where}: their {name} differ ({by_rank})")


# --- BatchNorm across ranks -------------------------------------------------------------------


class _GlobalBatchNorm(torch.autograd.Function):
    """BatchNorm in training mode over the union of the ranks' batches, on the CPU.

    What torch's ``SyncBatchNorm`` function does on GPUs: one all-reduce of per-channel count,
    sums and centred squares forward, one of the gradient sums backward, in float64; the
    normalised input is kept, so the backward pass is the stable one of BatchNorm. The weight
    and bias gradients are this rank's own (DDP averages them).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running: tuple[torch.Tensor, torch.Tensor] | None,
        momentum: float,
        eps: float,
    ) -> torch.Tensor:
        """Normalise ``x`` with the global batch's statistics; update the running ones."""
        c = x.shape[1]
        dims, shape = _channel_dims(x)
        count = x.numel() // max(c, 1)
        mean = x.sum(dims, dtype=torch.float64) / max(count, 1)
        centred = x - mean.to(x.dtype).view(shape)
        # Centred about the rounded mean: take back what the rounding added to the squares.
        shift = mean - mean.to(x.dtype).to(torch.float64)
        m2 = centred.square().sum(dims, dtype=torch.float64) - count * shift.square()
        local = torch.cat([mean.new_full((1,), float(count)), count * mean, m2, count * mean**2])
        dist.all_reduce(local)
        n, sums, m2s, squares = (
            local[0],
            local[1 : c + 1],
            local[c + 1 : 2 * c + 1],
            local[2 * c + 1 :],
        )
        mean = sums / n
        # Chan et al.: the ranks' centred squares plus their means' spread about the global one.
        var = ((m2s + squares - n * mean.square()) / n).clamp(min=0)
        invstd = torch.rsqrt(var + eps)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.to(x.dtype).view(shape)
        if running is not None:
            unbiased = var * n / (n - 1).clamp(min=1)
            running[0].mul_(1 - momentum).add_(mean.to(running[0].dtype), alpha=momentum)
            running[1].mul_(1 - momentum).add_(unbiased.to(running[1].dtype), alpha=momentum)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.n = n
        y = xhat
        if weight is not None and bias is not None:
            y = xhat * weight.view(shape) + bias.view(shape)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The gradients of the global batch's BatchNorm (see the class description)."""
        xhat, weight, invstd = ctx.saved_tensors
        c = dy.shape[1]
        dims, shape = _channel_dims(dy)
        sum_dy = dy.sum(dims, dtype=torch.float64)
        sum_dy_xhat = (dy * xhat).sum(dims, dtype=torch.float64)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # alike on every rank: the same network, the same graph
            total = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(total)
            mean_dy, mean_dy_xhat = total[:c] / ctx.n, total[c:] / ctx.n
            scale = invstd if weight is None else invstd * weight.to(torch.float64)
            grad_x = (
                dy - mean_dy.to(dy.dtype).view(shape) - xhat * mean_dy_xhat.to(dy.dtype).view(shape)
            ) * scale.to(dy.dtype).view(shape)
        if ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(dy.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(dy.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _channel_dims(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """The dimensions a BatchNorm reduces over, and the shape of a per-channel vector."""
    return [0, *range(2, x.dim())], [1, x.shape[1]] + [1] * (x.dim() - 2)


class CudaSyncBatchNorm(nn.SyncBatchNorm):
    """torch's ``SyncBatchNorm`` (GPUs only), plain BatchNorm while :attr:`local` is set."""

    local: bool = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` with the global batch's statistics when training on several ranks."""
        if self.local:
            return nn.modules.batchnorm._BatchNorm.forward(self, input)
        return super().forward(input)


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the whole global batch on the CPU, where torch has no ``SyncBatchNorm``.

    Each rank normalises its share as one process normalises the whole batch (to rounding),
    with one all-reduce forward and one backward per layer (:class:`_GlobalBatchNorm`). Plain
    BatchNorm in evaluation, alone, or while :attr:`local` is set (a batch every rank holds
    whole). Not a ``SyncBatchNorm`` subclass: DDP refuses those on the CPU.
    """

    local: bool = False

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` with the global batch's statistics when training on several ranks."""
        if self.local or not (self.training and active()):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        running = None
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as BatchNorm does
                factor = 1.0 / float(self.num_batches_tracked)
            running = (self.running_mean, self.running_var)
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        return _GlobalBatchNorm.apply(input, weight, bias, running, factor, self.eps)


_SYNCED = (CudaSyncBatchNorm, CpuSyncBatchNorm)


def to_sync_batchnorm(model: nn.Module, device: torch.device) -> int:
    """Replace every BatchNorm of ``model`` by a synchronised one, in place.

    :class:`CudaSyncBatchNorm` on CUDA, :class:`CpuSyncBatchNorm` elsewhere. The new modules
    hold the same parameter and buffer tensors (optimisers need no change) and the old
    modules' forward hooks (where graph networks attach their gates).

    Returns:
        How many modules were replaced.
    """
    kind = CudaSyncBatchNorm if device.type == "cuda" else CpuSyncBatchNorm

    def convert(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(
            m, (nn.SyncBatchNorm, *_SYNCED)
        ):
            return None
        sync = kind(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        _share_state(m, sync)
        sync.__dict__["_plain_type"] = type(m)
        return sync

    return _replace(model, convert)


def to_plain_batchnorm(model: nn.Module) -> int:
    """Undo :func:`to_sync_batchnorm`: the original BatchNorm kinds, same tensors and hooks.

    Returns:
        How many modules were replaced.
    """

    def convert(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, _SYNCED):
            return None
        kind = m.__dict__.get("_plain_type", nn.BatchNorm2d)
        plain = kind(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        _share_state(m, plain)
        return plain

    return _replace(model, convert)


@contextlib.contextmanager
def local_batchnorm(model: nn.Module) -> Iterator[None]:
    """Within the block, synchronised BatchNorms of ``model`` use their own batch only.

    For a batch that every rank holds whole: its statistics are already the global ones.
    """
    layers = [m for m in model.modules() if isinstance(m, _SYNCED)]
    for m in layers:
        m.local = True
    try:
        yield
    finally:
        for m in layers:
            m.local = False


def _share_state(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the very parameter and buffer tensors of ``old``, and its mode."""
    for name, p in old.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in old.named_buffers(recurse=False):
        setattr(new, name, b)
    new.train(old.training)


def _replace(model: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> int:
    """Swap every child for which ``convert`` returns a module, carrying its forward hooks."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            new = convert(child) if child is not None else None
            if new is None:
                continue
            for table in (
                "_forward_hooks",
                "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called",
                "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs",
            ):
                if hasattr(child, table):
                    getattr(new, table).update(getattr(child, table))
            parent._modules[name] = new
            count += 1
    return count


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default
