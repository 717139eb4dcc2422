"""Alternating SNN/TNN training with a compression controller, checkpoints and resume.

A TNN step computes the factors with the scorer frozen (detached) and takes an SGD step on the
task network; every ``tnn_steps_per_snn_step`` of them, an SNN step follows. An SNN step
freezes the task network (no gradients, BatchNorm running statistics untouched) and takes an
SGD step on the switcher under the same cross-entropy, plus a cost pressure in ``penalty``
mode. In ``target`` mode the budget line (an offset on the scores)
is placed at every SNN step so that the kept cost (params or MACs, counted exactly from the units
that are on) meets a target that ramps down to ``target_ratio``. After
``switch_epochs_fraction`` of the epochs the factors are frozen and the task network fine-tunes
under them.

The scores come from ``train.scorer``: the learned switcher, or the ``magnitude`` and
``random`` controls, which share everything else of the schedule (they have nothing to learn,
so their SNN step only places the line).

Training data comes in memory (a ``TensorDataset`` on the training device, indexed per batch)
or streamed (a :class:`~switchprune.data.PreparedSplit` read batch by batch through a
``DataLoader``). Both see the same seeded batches in the same order, so they train the same
network; ``data.augment`` is applied to each training batch on the training device.

Under ``torchrun`` (:mod:`switchprune.distributed`) training is data-parallel: ``batch_size``
stays the global batch, every process trains on its strided share of each (the last batch of an
epoch, when it does not divide equally, whole), the task network's gradients are averaged by
``DistributedDataParallel`` and the switcher's by an all-reduce, so every process takes the
update one process would take on the whole batch and holds the same networks. Scores, the
budget line and sampled gates are computed by every process from identical networks and
identically seeded streams. Validation is shared out and its counts summed; only rank 0 writes
checkpoints and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset
from tqdm import tqdm

from switchprune import distributed, latency
from switchprune.config import ConfigError, DataConfig, TrainConfig, recipe_lr, to_dict
from switchprune.cost import CostModel
from switchprune.data import (
    Augmentation,
    PreparedSplit,
    TrainingData,
    augmentation,
    iter_batches,
    shard,
    split_shard,
)
from switchprune.errors import UserError
from switchprune.io import load_torch, save_torch
from switchprune.models import ModelSpec, TaskNet, build_model
from switchprune.scoring import (
    SwitcherSpec,
    UnitScorer,
    build_scorer,
    hard_widths,
    ramped_target,
)

logger = logging.getLogger(__name__)


class TrainingError(UserError):
    """Training cannot go on (the loss diverged): a run-time failure, not a bad input."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks ``cuda`` when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("[train] device 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


@dataclass
class FitResult:
    """What :func:`fit` produces.

    Attributes:
        model: The trained task network (full width, on the CPU).
        switcher: The trained scorer (switcher or control), or ``None`` for a plain run.
        factors: Final factors per group (``None`` for a plain run).
        history: One record per epoch.
        metrics: Flat summary metrics.
    """

    model: TaskNet
    switcher: UnitScorer | None
    factors: dict[str, torch.Tensor] | None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


Split = TensorDataset | PreparedSplit


@torch.no_grad()
def accuracy(
    model: nn.Module,
    data: Split,
    device: torch.device,
    batch_size: int = 512,
    num_workers: int = 0,
) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on a split in memory or streamed."""
    if len(data) == 0:
        return float("nan")
    return _correct(model, data, device, batch_size, num_workers) / len(data)


@torch.no_grad()
def _correct(
    model: nn.Module, data: Split, device: torch.device, batch_size: int, num_workers: int
) -> int:
    """How many samples of ``data`` ``model`` (in eval mode) classifies correctly."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in iter_batches(data, batch_size, num_workers=num_workers):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    model.train(was_training)
    return correct


class _FrozenTNN:
    """Context: no parameter gradients and no BatchNorm statistics updates in the task net."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[nn.modules.batchnorm._BatchNorm, float | None]] = []

    def __enter__(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.saved.append((m, m.momentum))
                m.momentum = 0.0  # batch statistics still normalise; running ones stay put

    def __exit__(self, *exc: object) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)
        for m, momentum in self.saved:
            m.momentum = momentum
        self.saved.clear()


# Each random stream is reseeded from the run's seed per epoch or per step (``seed * a + index
# + b``), so a resumed run draws exactly what an uninterrupted one would, with no generator
# state in the checkpoint.
_STREAMS = {
    "order": (100_003, 0),  # per epoch: the order of the TNN's samples
    "augment": (1_000_033, 1),  # per epoch: crops and flips
    "snn_batch": (7_919, 0),  # per pass over the data: the order of SNN batches
    "gates": (104_729, 0),  # per SNN step: sampled gates
    "auto_val": (1, 11),  # once: the validation share ``auto`` holds out when there is none
}


def _stream(purpose: str, seed: int, index: int) -> torch.Generator:
    """The CPU generator of ``purpose`` at ``index`` (an epoch or a step) of a run."""
    a, b = _STREAMS[purpose]
    return torch.Generator().manual_seed(seed * a + index + b)


@dataclass
class _Auto:
    """``auto`` compression: the reference accuracy, the ratio on trial, the last accepted."""

    reference: float | None = None
    trial: float = 1.0
    accepted: float = 1.0
    done: bool = False


@dataclass
class _State:
    """What a checkpoint carries besides the networks and optimisers."""

    epoch: int = 0  # epochs done
    step: int = 0  # TNN steps over the whole run: SNN steps fall on every k-th
    snn_step: int = 0  # SNN steps done (their batches and sampled gates)
    frozen: dict[str, torch.Tensor] | None = None  # the fixed phase's factors
    history: list[dict[str, float]] = field(default_factory=list)
    auto: _Auto = field(default_factory=_Auto)


@dataclass
class _Run:
    """Everything one :func:`fit` call works on: networks, optimisers, data and progress."""

    cfg: TrainConfig
    device: torch.device
    tnn: TaskNet
    scorer: UnitScorer | None
    opt_t: torch.optim.Optimizer
    opt_s: torch.optim.Optimizer | None  # None for the fixed scorers: nothing to learn
    costs: CostModel
    data: TrainingData
    warmup: int  # epochs before switching starts
    switch_end: int  # the first epoch of the fixed phase
    val: Split | None
    amp: torch.dtype | None = None  # autocast dtype of TNN steps (CUDA only)
    scaler: torch.amp.GradScaler | None = None  # float16 autocast needs loss scaling
    augment: Augmentation | None = None
    num_workers: int = 0
    state: _State = field(default_factory=_State)
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    rank: int = 0  # this process, of ``world`` data-parallel ones
    world: int = 1
    ddp: nn.Module | None = None  # the task network for TNN steps when ``world > 1``
    synced_bn: bool = False  # BatchNorms converted to SyncBatchNorm (converted back at the end)
    own_bn_stats: bool = False  # per-process BatchNorm statistics, averaged every epoch
    checked: int = 0  # SNN steps at which the ranks were compared (``SWITCHPRUNE_CHECK_RANKS``)

    @property
    def full_cost(self) -> float:
        """The full network's params or MACs (``target_metric``)."""
        return float(self.costs.cost(self.cfg.target_metric))

    def phase(self, epoch: int) -> str:
        """``plain`` (no scorer), ``warmup``, ``switch`` (the scorer moves) or ``fixed``."""
        if self.scorer is None:
            return "plain"
        if epoch < self.warmup:
            return "warmup"
        return "switch" if epoch < self.switch_end else "fixed"


def fit(
    spec: ModelSpec,
    train: Split,
    val: Split | None,
    cfg: TrainConfig,
    *,
    switched: bool = True,
    checkpoint_path: Path | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int], None] | None = None,
    data: DataConfig | None = None,
    log_epochs: bool = False,
    timing: latency.Setting | None = None,
) -> FitResult:
    """Train a task network, with the scorer when ``switched``, resuming from a checkpoint.

    Under ``torchrun`` every process calls this with the same arguments and trains its share
    (see the module's description); only rank 0 shows progress, logs and writes the checkpoint,
    from which every rank resumes.

    Args:
        spec: The task network to build (full width).
        train: Training data: tensors ``(x, y)`` (held on the device) or a split streamed from
            disk (:func:`~switchprune.data.open_split`).
        val: Validation data, for the per-epoch record (may be ``None`` or empty).
        cfg: Schedule, optimisers, scorer and compression settings.
        switched: Train with the scorer (``False``: the plain baseline, same budget).
        checkpoint_path: Where to save a resumable state after every epoch.
            A matching checkpoint found there is resumed; one from other settings is ignored.
        device: Where to train (default: ``cfg.device`` resolved).
        progress: Show a progress bar.
        on_epoch_end: Called with the finished epoch's index after its checkpoint is written.
        data: The ``data`` section: augmentation of training batches and ``DataLoader``
            workers when streaming (default: no augmentation, no workers).
        log_epochs: Log one INFO line per epoch (logger ``switchprune.training``): the
            progress report where no bar is shown (Kubeflow task logs).
        timing: The runtime, batch and threads a latency target is measured in (``evaluate``'s
            settings; default PyTorch at batch 256), on the training device.

    Returns:
        The trained networks, final factors, history and summary metrics (the networks and
        factors are the same on every rank).
    """
    with distributed.session(device or resolve_device(cfg.device)) as device:
        timing = timing or latency.Setting()
        run = _start(spec, train, val, cfg, switched, device, timing)
        if data is not None:
            run.augment = augmentation(data, spec.in_shape)
            run.num_workers = data.num_workers
        fingerprint = _fingerprint(run, spec, switched, len(train), timing)
        if checkpoint_path is not None:
            distributed.barrier()  # no rank reads while another could still be writing
            if checkpoint_path.is_file():
                _resume(run, load_torch(checkpoint_path), fingerprint)
        main = distributed.is_main()
        _epochs(
            run,
            "train" if switched else "baseline",
            checkpoint=(checkpoint_path, fingerprint) if checkpoint_path is not None else None,
            progress=progress and main,
            log_epochs=log_epochs and main,
            on_epoch_end=on_epoch_end,
        )
        return _finish(run)


def _epochs(
    run: _Run,
    name: str,
    *,
    checkpoint: tuple[Path, dict[str, Any]] | None,
    progress: bool,
    log_epochs: bool,
    on_epoch_end: Callable[[int], None] | None,
) -> None:
    """The epochs left to train, each reported and checkpointed (see :func:`fit`)."""
    cfg = run.cfg
    bar = tqdm(
        range(run.state.epoch, cfg.epochs),
        initial=run.state.epoch,
        total=cfg.epochs,
        desc=name,
        disable=not progress,
        leave=True,  # the last state (epochs, loss, accuracy) stays on screen
    )
    for epoch in bar:
        record = _run_epoch(run, epoch)
        shown = {k: v for k, v in record.items() if k != "epoch"}
        bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
        if log_epochs:
            values = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            logger.info("%s epoch %d/%d: %s", name, epoch + 1, cfg.epochs, values)
        if checkpoint is not None:  # every epoch: a restarted process loses at most one
            if distributed.is_main():
                save_torch(_checkpoint(run, checkpoint[1]), checkpoint[0])
            distributed.barrier()  # written (atomically) before any rank goes on
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    bar.close()
    if run.world > 1 and distributed.checking() and distributed.is_main():
        steps = f"all {run.checked} SNN steps and " if run.scorer is not None else ""
        logger.info("%s: the %d ranks agreed after %severy epoch", name, run.world, steps)


def _start(
    spec: ModelSpec,
    train: Split,
    val: Split | None,
    cfg: TrainConfig,
    switched: bool,
    device: torch.device,
    timing: latency.Setting | None = None,
) -> _Run:
    """Build the networks, optimisers and data of a run (seeded)."""
    timing = timing or latency.Setting()
    # ``auto`` becomes the architecture's rate here, so the record says which rate was used.
    cfg = dataclasses.replace(cfg, tnn_lr=recipe_lr(cfg.tnn_lr, spec.arch))
    distributed.check_batch_size(cfg.batch_size, distributed.world_size())
    if switched and cfg.scorer != "switcher" and cfg.compression not in ("target", "auto"):
        raise ConfigError(
            f"train.scorer {cfg.scorer!r} needs compression target or auto (it has no zeros of "
            f"its own); compression {cfg.compression!r} needs scorer 'switcher'"
        )
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.seed)
    tnn = build_model(spec).to(device)
    scorer = _build_scorer(tnn, cfg, device, timing) if switched else None
    opt_t = torch.optim.SGD(
        tnn.parameters(),
        lr=cfg.tnn_lr,
        momentum=cfg.tnn_momentum,
        weight_decay=cfg.tnn_weight_decay,
    )
    params = list(scorer.parameters()) if scorer is not None else []
    opt_s = torch.optim.SGD(params, lr=cfg.snn_lr, momentum=cfg.snn_momentum) if params else None
    data = TrainingData.of(train, device)
    warmup = cfg.warmup_epochs
    if switched and cfg.compression == "auto":
        # The unpruned reference needs an epoch of training and data to be measured on.
        warmup = max(1, warmup)
        if val is None or len(val) == 0:
            val = data.hold_out(0.1, _stream("auto_val", cfg.seed, 0))
    amp = resolve_amp(cfg.amp, device)
    if device.type == "cuda" and len(spec.in_shape) == 3:
        tnn = tnn.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
    run = _Run(
        cfg=cfg,
        device=device,
        tnn=tnn,
        scorer=scorer,
        opt_t=opt_t,
        opt_s=opt_s,
        costs=_costs(tnn, cfg, switched, device, timing),
        data=data,
        warmup=warmup,
        switch_end=max(warmup + 1, round(cfg.switch_epochs_fraction * cfg.epochs)),
        val=val,
        amp=amp,
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
    )
    if distributed.world_size() > 1:
        _parallel(run)
    return run


def _costs(
    tnn: TaskNet, cfg: TrainConfig, switched: bool, device: torch.device, timing: latency.Setting
) -> CostModel:
    """The network's cost model, with a latency table when the target is a latency."""
    costs = CostModel(tnn)
    if switched and cfg.target_metric == "latency":
        # Rank 0 measures (or reads its cache) and every rank uses its table: the ranks place
        # the same budget line.
        table = (
            latency.measure(tnn, costs.layers, tnn.spec.in_shape, device, setting=timing)
            if (distributed.is_main())
            else None
        )
        costs.latency = distributed.broadcast_object(table)
        _warn_beyond_the_floor(costs, cfg, device, timing)
    return costs


def _warn_beyond_the_floor(
    costs: CostModel, cfg: TrainConfig, device: torch.device, timing: latency.Setting
) -> None:
    """Warn when the target asks for more speed than the narrowest network is predicted to give.

    The narrowest network keeps one width multiple per group: training stops at that floor.
    """
    multiple = _width_multiple(cfg, device, timing)
    narrowest = {g: min(multiple, int(n)) for g, n in costs.full.items()}
    floor = float(costs.cost("latency", narrowest)) / float(costs.cost("latency"))
    if cfg.target_ratio < floor and distributed.is_main():
        logger.warning(
            "train.target_ratio %.3g asks for %.2fx the speed; the latency table predicts at most "
            "%.2fx (every group at %d units), and training stops there",
            cfg.target_ratio,
            1 / cfg.target_ratio,
            1 / floor,
            multiple,
        )


def _width_multiple(cfg: TrainConfig, device: torch.device, timing: latency.Setting) -> int:
    """Units a group keeps a multiple of; for a latency target, whole blocks as well."""
    if cfg.target_metric != "latency":
        return cfg.width_multiple
    # A unit short of a whole block costs the block's time: keep whole blocks.
    return math.lcm(cfg.width_multiple, latency.block(device, timing.runtime))


def _parallel(run: _Run) -> None:
    """Make a run data-parallel: BatchNorm per ``train.sync_bn``, the TNN wrapped in DDP."""
    run.rank, run.world = distributed.rank(), distributed.world_size()
    cuda = run.device.type == "cuda"
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run.tnn.modules())
    if has_bn and run.cfg.sync_bn is not False:
        # After the cost model was built: it counts nn.BatchNorm1d/2d modules.
        run.synced_bn = distributed.to_sync_batchnorm(run.tnn, run.device) > 0
    else:
        run.own_bn_stats = has_bn
    # Buffers are not broadcast from rank 0 each step: per-process running statistics are
    # averaged at every epoch's end instead, synchronised ones are equal anyway.
    run.ddp = DistributedDataParallel(
        run.tnn, device_ids=[run.device.index] if cuda else None, **_NO_BUFFER_SYNC
    )


# ``broadcast_buffers`` was renamed ``forward_sync_buffers`` (torch 2.14).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def _build_scorer(
    tnn: TaskNet, cfg: TrainConfig, device: torch.device, timing: latency.Setting
) -> UnitScorer:
    """The scorer ``cfg.scorer`` names, for ``tnn`` (seeded: run after ``torch.manual_seed``)."""
    budget = cfg.compression in ("target", "auto")
    multiple = _width_multiple(cfg, device, timing)
    # The prior and sampled gates act around a budget line; the paper's modes keep the
    # switcher's own ReLU zeros.
    spec = SwitcherSpec(
        cfg.snn_hidden, "budget" if budget else "relu", multiple, cfg.scorer, budget
    )
    return build_scorer(spec, tnn, cfg.seed).to(device)


def _fingerprint(
    run: _Run, spec: ModelSpec, switched: bool, n_train: int, timing: latency.Setting
) -> dict[str, Any]:
    """What a checkpoint must have been written with to be resumed by this run."""
    fingerprint: dict[str, Any] = {
        # Threads and processes change the speed, not the global batches: a run resumes with
        # any number of either.
        "train": {
            k: v for k, v in to_dict(run.cfg).items() if k not in ("threads", "nproc_per_node")
        },
        "spec": spec.to_dict(),
        "switched": switched,
        "n_train": n_train,
    }
    if run.augment is not None:
        # Other batches: a checkpoint made without (or with other) augmentation is not resumed.
        fingerprint["augment"] = dataclasses.asdict(run.augment)
    if switched and run.cfg.target_metric == "latency":
        fingerprint["timing"] = dataclasses.asdict(timing)  # another table, another budget line
    return fingerprint


def _resume(run: _Run, blob: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Continue from a checkpoint written with the same settings (others are ignored)."""
    names = [f.name for f in dataclasses.fields(_State)]
    if blob.get("fingerprint") != fingerprint or not set(names) <= set(blob):
        return
    run.tnn.load_state_dict(blob["tnn"])
    run.opt_t.load_state_dict(blob["opt_tnn"])
    if run.scorer is not None:
        run.scorer.load_state_dict(blob["snn"])
    if run.opt_s is not None:
        run.opt_s.load_state_dict(blob["opt_snn"])
    state = {k: blob[k] for k in names}
    state["auto"] = _Auto(**state["auto"])
    if state["frozen"] is not None:
        state["frozen"] = {k: v.to(run.device) for k, v in state["frozen"].items()}
    run.state = _State(**state)


def _checkpoint(run: _Run, fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "tnn": run.tnn.state_dict(),
        "opt_tnn": run.opt_t.state_dict(),
        "snn": run.scorer.state_dict() if run.scorer is not None else {},
        "opt_snn": run.opt_s.state_dict() if run.opt_s is not None else {},
        **dataclasses.asdict(run.state),
    }


# --- one epoch ------------------------------------------------------------------------------


def _run_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """Train one epoch and add its record to the run's history.

    Raises:
        TrainingError: If the epoch's mean task loss is not finite.
    """
    started = time.perf_counter()
    # Step losses stay on the device; one transfer per epoch (no sync per step on a GPU).
    steps = _train_epoch(run, epoch)
    stacked = torch.stack(steps) if steps else None
    if stacked is not None and run.world > 1:
        # Every rank records (and judges divergence on) the same global batch losses.
        distributed.average_([stacked])
    losses = stacked.cpu().tolist() if stacked is not None else []
    if losses and not math.isfinite(statistics.fmean(losses)):
        raise TrainingError(
            f"training diverged at epoch {epoch + 1} (the task loss is not finite): "
            "lower train.tnn_lr"
        )
    record = _epoch_record(run, epoch, losses, time.perf_counter() - started)
    if run.cfg.compression == "auto" and run.scorer is not None:
        _auto_step(run, epoch, record)
    run.state.history.append(record)
    run.state.epoch = epoch + 1
    return record


def _train_epoch(run: _Run, epoch: int) -> list[torch.Tensor]:
    """One epoch of TNN steps with an SNN step (or a line placement) after every ``k``."""
    cfg, state = run.cfg, run.state
    # Cosine schedule, set per epoch so a resumed run sees the same rates.
    for group in run.opt_t.param_groups:
        group["lr"] = cfg.tnn_lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    phase = run.phase(epoch)
    if phase == "fixed" and state.frozen is None:
        _freeze(run)
    n = len(run.data.y)
    order = torch.randperm(n, generator=_stream("order", cfg.seed, epoch))
    # Factors are fixed between two SNN steps: computed once, shared by the TNN steps between.
    factors = _current_factors(run, phase)
    losses: list[torch.Tensor] = []
    run.tnn.train()
    batches = run.data.epoch(
        order,
        cfg.batch_size,
        run.device,
        augment=run.augment,
        # Seeded per epoch, on the CPU: a resumed run draws the same crops on any device.
        generator=_stream("augment", cfg.seed, epoch),
        num_workers=run.num_workers,
        rank=run.rank,
        world=run.world,
    )
    for i, (x, y) in zip(range(0, n, cfg.batch_size), batches, strict=False):
        losses.append(_tnn_step(run, x, y, factors, whole=_whole(run, min(cfg.batch_size, n - i))))
        state.step += 1
        if phase == "switch" and state.step % cfg.tnn_steps_per_snn_step == 0:
            stats = _snn_step(run, _target(run, epoch, i / n))
            assert run.scorer is not None
            with torch.no_grad():
                factors = run.scorer(run.tnn, stats=stats)
            if run.world > 1 and distributed.checking():
                distributed.check_ranks_agree(
                    f"after SNN step {state.snn_step}",
                    {"factors": factors, "scorer": run.scorer.state_dict()},
                )
                run.checked += 1
    batches.close()  # stops the DataLoader's workers
    if run.own_bn_stats:
        distributed.average_batchnorm_stats(run.tnn)
    if run.world > 1 and distributed.checking():
        where = f"at the end of epoch {epoch + 1}"
        distributed.check_ranks_agree(where, {"task network": run.tnn.state_dict()})
    return losses


def _target(run: _Run, epoch: int, within: float) -> float:
    """The ratio the budget line is placed at, ``within`` (0 to 1) an epoch of switching."""
    if run.cfg.compression == "auto":
        return run.state.auto.trial
    elapsed = (epoch - run.warmup + within) / (run.switch_end - run.warmup)
    return ramped_target(run.cfg.target_ratio, elapsed, run.cfg.ramp_fraction)


def _tnn_step(
    run: _Run,
    x: torch.Tensor,
    y: torch.Tensor,
    factors: dict[str, torch.Tensor] | None,
    whole: bool = False,
) -> torch.Tensor:
    """One SGD step of the task network under fixed ``factors``; its loss.

    ``whole``: every rank holds the whole batch (see :func:`_whole`).
    """
    run.tnn.set_factors(factors)  # the gates DDP's forward runs through are the TNN's own
    net = run.ddp if run.ddp is not None else run.tnn
    with _autocast(run), _alone(run, whole):
        loss = run.loss_fn(net(_layout(run, x)), y)
    run.opt_t.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt_t)
        run.scaler.update()
    else:
        loss.backward()
        run.opt_t.step()
    run.tnn.set_factors(None)
    return loss.detach()


def _snn_step(run: _Run, target: float) -> dict[str, torch.Tensor] | None:
    """Place the budget line at ``target`` and, for the switcher, take one SGD step.

    Returns:
        The unit statistics the scorer read: still valid after the step, since the task
        network did not change.
    """
    scorer, cfg, state = run.scorer, run.cfg, run.state
    assert scorer is not None
    with _FrozenTNN(run.tnn):
        stats = scorer.statistics(run.tnn)
        scores = scorer.scores(run.tnn, stats=stats)
        if cfg.compression in ("target", "auto"):
            scorer.place_line(scores, run.costs, cfg.target_metric, target * run.full_cost)
        if run.opt_s is not None:
            x, y = _snn_batch(run)
            gates = _stream("gates", cfg.seed, state.snn_step)
            run.tnn.set_factors(scorer.trainable_factors(scores, cfg.gate_temperature, gates))
            with _alone(run, _whole(run, min(cfg.batch_size, len(run.data.y)))):
                loss = run.loss_fn(run.tnn(x), y)
            if cfg.compression == "penalty":
                # L1 on the factors, each unit weighted by what it costs at the current widths.
                factors = scorer.factors(scores)
                marginal = run.costs.marginal(cfg.target_metric, hard_widths(factors))
                pressure = sum(marginal[k] * v.sum() for k, v in factors.items()) / run.full_cost
                loss = loss + cfg.penalty * pressure
            run.opt_s.zero_grad(set_to_none=True)
            loss.backward()
            if run.world > 1:
                # Each rank's loss is the mean over its equal share: the averaged gradient is
                # the whole batch's, and the switchers stay equal.
                distributed.average_gradients(scorer.parameters())
            run.opt_s.step()
            run.tnn.set_factors(None)
    state.snn_step += 1
    return stats


def _snn_batch(run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The next batch of SNN steps: the training data in a seeded order, pass after pass."""
    n = len(run.data.y)
    size = min(run.cfg.batch_size, n)
    per_pass = max(1, n // size)
    step = run.state.snn_step
    start = (step % per_pass) * size
    order = torch.randperm(n, generator=_stream("snn_batch", run.cfg.seed, step // per_pass))
    idx = order[start : start + size]
    return run.data.batch(idx[shard(len(idx), run.rank, run.world)], run.device)


def _whole(run: _Run, count: int) -> bool:
    """Whether every rank trains on the whole of a batch of ``count`` samples.

    A batch the ranks cannot share equally (an epoch's last) is not shared (see
    :func:`~switchprune.data.shard`).
    """
    return run.world > 1 and count % run.world != 0


def _alone(run: _Run, whole: bool) -> contextlib.AbstractContextManager[None]:
    """Synchronised BatchNorms normalise a batch every rank holds whole with its own statistics.

    Its statistics are already the whole batch's. (Gradients are still averaged: equal values
    whose average keeps the ranks bitwise equal even where kernels are not deterministic.)
    """
    if whole and run.synced_bn:
        return distributed.local_batchnorm(run.tnn)
    return contextlib.nullcontext()


def _current_factors(run: _Run, phase: str) -> dict[str, torch.Tensor] | None:
    if run.scorer is None or phase == "warmup":
        return None
    if phase == "fixed":
        return run.state.frozen
    with torch.no_grad():
        return run.scorer(run.tnn)


def _freeze(run: _Run) -> None:
    """Fix the factors for the rest of the run; in target mode exactly on budget."""
    assert run.scorer is not None
    with torch.no_grad():
        if run.cfg.compression in ("target", "auto"):
            budget = _final_ratio(run) * run.full_cost
            scores = run.scorer.scores(run.tnn)
            run.scorer.place_line(scores, run.costs, run.cfg.target_metric, budget)
        run.state.frozen = {k: v.detach() for k, v in run.scorer(run.tnn).items()}


def _final_ratio(run: _Run) -> float:
    """The ratio the run ends at: the target, or in ``auto`` mode the last accepted one."""
    if run.cfg.compression == "auto":
        return run.state.auto.accepted
    return run.cfg.target_ratio


def _auto_step(run: _Run, epoch: int, record: dict[str, float]) -> None:
    """``auto`` compression: measure the reference, then accept or reject the epoch's trial."""
    auto, cfg = run.state.auto, run.cfg
    phase = run.phase(epoch)
    if phase == "warmup" and epoch == run.warmup - 1:
        auto.reference = record["val_accuracy"]
        auto.trial = cfg.auto_shrink
    elif phase == "switch" and not auto.done:
        assert auto.reference is not None
        if record["val_accuracy"] >= auto.reference - cfg.max_accuracy_drop:
            auto.accepted = auto.trial
            auto.trial = auto.trial * cfg.auto_shrink
        else:
            auto.trial = auto.accepted
            auto.done = True


def _epoch_record(run: _Run, epoch: int, losses: list[float], seconds: float) -> dict[str, float]:
    """Loss, validation accuracy under the current factors, and reached compression."""
    record: dict[str, float] = {
        "epoch": float(epoch),
        "loss": statistics.fmean(losses) if losses else float("nan"),
        "seconds": seconds,
    }
    factors = _current_factors(run, run.phase(epoch))
    run.tnn.set_factors(factors)
    if run.val is not None and len(run.val) > 0:
        record["val_accuracy"] = _val_accuracy(run, run.val)
    if factors is not None:
        widths = hard_widths(factors)
        record["params_ratio"] = float(run.costs.params(widths)) / float(run.costs.params())
        record["macs_ratio"] = float(run.costs.macs(widths)) / float(run.costs.macs())
        if run.costs.latency is not None:
            record["latency_ratio"] = run.costs.latency(widths) / run.costs.latency()
        record["offset"] = float(run.scorer.offset) if run.scorer is not None else 0.0
    run.tnn.set_factors(None)
    return record


def _finish(run: _Run) -> FitResult:
    """Final factors (on budget in target mode), summary metrics, everything on the CPU."""
    scorer, history = run.scorer, run.state.history
    final = None
    if scorer is not None:
        if run.state.frozen is None:
            # No fixed phase (too few epochs): still end exactly on budget, since the TNN
            # steps after the last SNN step move the scores across the line.
            _freeze(run)
        assert run.state.frozen is not None
        final = {k: v.detach().cpu() for k, v in run.state.frozen.items()}
    metrics: dict[str, float] = {
        "epochs": float(run.cfg.epochs),
        "epoch_seconds": statistics.median(r["seconds"] for r in history) if history else 0.0,
    }
    if history and "val_accuracy" in history[-1]:
        metrics["val_accuracy"] = history[-1]["val_accuracy"]
    if final is not None:
        assert scorer is not None
        widths = hard_widths(final)
        metrics["train_params_ratio"] = float(run.costs.params(widths)) / float(run.costs.params())
        metrics["train_macs_ratio"] = float(run.costs.macs(widths)) / float(run.costs.macs())
        if run.costs.latency is not None:
            metrics["train_latency_ratio"] = run.costs.latency(widths) / run.costs.latency()
        metrics["switch_offset"] = float(scorer.offset)
        if run.cfg.compression == "auto":
            metrics["auto_ratio"] = _final_ratio(run)
            metrics["auto_reference_accuracy"] = float(run.state.auto.reference or 0.0)
        scorer.cpu().eval()
    if run.synced_bn:
        distributed.to_plain_batchnorm(run.tnn)  # compaction and export expect nn.BatchNorm
    run.ddp = None
    run.tnn.cpu().eval()
    return FitResult(run.tnn, scorer, final, history, metrics)


def _val_accuracy(run: _Run, val: Split) -> float:
    """Validation accuracy; data-parallel: each rank counts its share, the counts are summed."""
    if run.world == 1:
        return accuracy(run.tnn, val, run.device, num_workers=run.num_workers)
    part = split_shard(val, run.rank, run.world)
    counts = torch.tensor(
        [_correct(run.tnn, part, run.device, 512, run.num_workers), len(part)],
        dtype=torch.float64,
        device=run.device,  # nccl reduces GPU tensors only
    )
    distributed.all_reduce_sum(counts)
    return float(counts[0] / counts[1])


# --- helpers --------------------------------------------------------------------------------


def resolve_amp(
    amp: str, device: torch.device, bf16_supported: Callable[[], bool] | None = None
) -> torch.dtype | None:
    """The autocast dtype of TNN steps: ``None`` (float32) on the CPU or with ``amp: off``.

    ``auto`` on CUDA picks bfloat16 where the GPU supports it, else float16 (with loss scaling).

    Args:
        amp: ``auto``, ``off``, ``bf16`` or ``fp16``.
        device: The training device.
        bf16_supported: Whether the GPU supports bfloat16 (default: ask CUDA).
    """
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    supported = bf16_supported or torch.cuda.is_bf16_supported
    return torch.bfloat16 if supported() else torch.float16


def _autocast(run: _Run) -> Any:
    if run.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=run.device.type, dtype=run.amp)


def _layout(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """Images in channels-last order on CUDA, as the network's weights are."""
    if run.device.type == "cuda" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
