"""Alternating SNN/TNN training with a compression controller, checkpoints and resume.

A TNN step computes the factors with the switcher frozen (detached by default) and takes an SGD
step on the task network. An SNN step freezes the task network (no gradients, BatchNorm running
statistics untouched) and takes an SGD step on the switcher under the same cross-entropy, plus a
cost pressure unless ``compression`` is ``none``. In ``target`` mode the pressure's weight is a
controller that rises while the kept cost (params or MACs, counted exactly from the units with
non-zero factors) is above the target and falls below it, so the run reaches the ratio the user
asked for. After ``switch_epochs_fraction`` of the epochs the factors are frozen and the task
network fine-tunes under them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from switchprune.config import TrainConfig, to_dict
from switchprune.cost import CostModel
from switchprune.io import load_torch, save_torch
from switchprune.models import ModelSpec, TaskNet, build_model
from switchprune.models.switcher import Switcher, SwitcherSpec, kept_count


def resolve_device(name: str) -> torch.device:
    """``auto`` picks ``cuda`` when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


@dataclass
class FitResult:
    """What :func:`fit` produces.

    Attributes:
        model: The trained task network (full width, on the CPU).
        switcher: The trained switcher, or ``None`` for a plain run.
        factors: Final factors per group (``None`` for a plain run).
        history: One record per epoch.
        metrics: Flat summary metrics.
    """

    model: TaskNet
    switcher: Switcher | None
    factors: dict[str, torch.Tensor] | None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def accuracy(
    model: nn.Module, data: TensorDataset, device: torch.device, batch_size: int = 512
) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on a tensor dataset."""
    x_all, y_all = data.tensors
    if len(y_all) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y_all), batch_size):
        x = x_all[i : i + batch_size].to(device)
        correct += int((model(x).argmax(1).cpu() == y_all[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(y_all)


def ramped_target(final: float, elapsed: float, ramp: float) -> float:
    """Target ratio at a point of the switching phase: a cubic ramp from 1 down to ``final``.

    Lowering the target gradually (as in gradual magnitude pruning) lets the task network
    adapt while units switch off, instead of losing many at once and overshooting.

    Args:
        final: The ratio to reach.
        elapsed: Share of the switching phase done, in [0, 1].
        ramp: Share of the switching phase over which the target falls.
    """
    done = min(1.0, max(0.0, elapsed / ramp)) if ramp > 0 else 1.0
    return final + (1.0 - final) * (1.0 - done) ** 3


def hard_widths(factors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Units with a non-zero factor per group (at least one: a layer is never emptied)."""
    return {k: max(1, int((v > 0).sum())) for k, v in factors.items()}


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


def fit(
    spec: ModelSpec,
    train: TensorDataset,
    val: TensorDataset | None,
    cfg: TrainConfig,
    *,
    switched: bool = True,
    checkpoint_path: Path | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int], None] | None = None,
) -> FitResult:
    """Train a task network, with the switcher when ``switched``, resuming from a checkpoint.

    Args:
        spec: The task network to build (full width).
        train: Training tensors ``(x, y)``.
        val: Validation tensors, for the per-epoch record (may be ``None`` or empty).
        cfg: Schedule, optimisers and compression settings.
        switched: Train with the switcher (``False``: the plain baseline, same budget).
        checkpoint_path: Where to save a resumable state every ``cfg.checkpoint_every`` epochs.
            A matching checkpoint found there is resumed; one from other settings is ignored.
        device: Where to train (default: ``cfg.device`` resolved).
        progress: Show a progress bar.
        on_epoch_end: Called with the finished epoch's index after its checkpoint is written.

    Returns:
        The trained networks, final factors, history and summary metrics.
    """
    device = device or resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.seed)
    tnn = build_model(spec).to(device)
    snn: Switcher | None = None
    if switched:
        mode = "budget" if cfg.compression == "target" else "relu"
        snn = Switcher(
            SwitcherSpec.for_model(tnn, cfg.snn_input, cfg.snn_hidden, mode, cfg.width_multiple)
        ).to(device)
    costs = CostModel(tnn)
    full_cost = float(costs.cost(cfg.target_metric))
    opt_t = torch.optim.SGD(
        tnn.parameters(),
        lr=cfg.tnn_lr,
        momentum=cfg.tnn_momentum,
        weight_decay=cfg.tnn_weight_decay,
    )
    opt_s = (
        torch.optim.SGD(snn.parameters(), lr=cfg.snn_lr, momentum=cfg.snn_momentum) if snn else None
    )
    fingerprint = {
        "train": to_dict(cfg),
        "spec": spec.to_dict(),
        "switched": switched,
        "n_train": len(train),
    }
    # ``step`` counts TNN steps over the whole run: it sets where SNN steps fall (every k-th),
    # so a resumed run must continue the count, not restart it at the resumed epoch.
    state: dict[str, Any] = {"epoch": 0, "step": 0, "frozen": None, "history": []}
    if checkpoint_path is not None and checkpoint_path.is_file():
        blob = load_torch(checkpoint_path)
        if blob.get("fingerprint") == fingerprint and set(state) <= set(blob):
            tnn.load_state_dict(blob["tnn"])
            opt_t.load_state_dict(blob["opt_tnn"])
            if snn is not None and opt_s is not None:
                snn.load_state_dict(blob["snn"])
                opt_s.load_state_dict(blob["opt_snn"])
            state = {k: blob[k] for k in state}
            if state["frozen"] is not None:
                state["frozen"] = {k: v.to(device) for k, v in state["frozen"].items()}

    x_train, y_train = (t.to(device) for t in train.tensors)
    n = len(y_train)
    switch_end = max(cfg.warmup_epochs + 1, round(cfg.switch_epochs_fraction * cfg.epochs))
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(
        range(state["epoch"], cfg.epochs),
        initial=state["epoch"],
        total=cfg.epochs,
        desc="train" if switched else "baseline",
        disable=not progress,
        leave=False,
    )
    for epoch in bar:
        cached: dict[str, torch.Tensor] | None = None  # fresh each epoch: resume is exact
        started = time.perf_counter()
        # Cosine schedule, set per epoch so a resumed run sees the same rates.
        for group in opt_t.param_groups:
            group["lr"] = cfg.tnn_lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
        phase = "plain"
        if snn is not None:
            if epoch < cfg.warmup_epochs:
                phase = "warmup"
            elif epoch < switch_end:
                phase = "switch"
            else:
                phase = "fixed"
                if state["frozen"] is None:
                    with torch.no_grad():
                        if cfg.compression == "target":
                            # Freeze exactly on budget: the final widths meet the target.
                            budget = cfg.target_ratio * full_cost
                            offset = budget_offset(
                                snn.scores(tnn), costs, cfg.target_metric, budget, snn.spec.multiple
                            )
                            snn.offset.fill_(offset)
                        state["frozen"] = {k: v.detach() for k, v in snn(tnn).items()}
        snn_epoch = (
            phase == "switch"
            and cfg.alternation == "epoch"
            and (epoch - cfg.warmup_epochs) % (cfg.tnn_steps_per_snn_step + 1)
            == cfg.tnn_steps_per_snn_step
        )
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        )
        losses = []
        tnn.train()
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size].to(device)
            x, y = x_train[idx], y_train[idx]
            if not snn_epoch:
                if phase == "switch" and cfg.detach_factors and cached is None:
                    # The switcher is frozen between its steps: its factors are computed once
                    # after each SNN step and shared by the k TNN steps that follow.
                    cached = _current_factors(tnn, snn, state, phase)
                losses.append(_tnn_step(tnn, snn, state, phase, cfg, x, y, opt_t, loss_fn, cached))
                state["step"] += 1
            do_snn = phase == "switch" and (
                snn_epoch
                or (cfg.alternation == "batch" and state["step"] % cfg.tnn_steps_per_snn_step == 0)
            )
            if do_snn:
                assert snn is not None and opt_s is not None
                elapsed = (epoch - cfg.warmup_epochs + i / n) / (switch_end - cfg.warmup_epochs)
                target = ramped_target(cfg.target_ratio, elapsed, cfg.ramp_fraction)
                stats = _snn_step(
                    tnn, snn, state, cfg, x, y, opt_s, loss_fn, costs, full_cost, target
                )
                # The next TNN steps use the updated switcher's factors; its statistics of the
                # (unchanged) task network are reused rather than recomputed.
                cached = None
                if cfg.detach_factors and stats is not None:
                    with torch.no_grad():
                        cached = snn(tnn, stats=stats)
        if losses and not math.isfinite(statistics.fmean(losses)):
            raise RuntimeError(
                f"training diverged at epoch {epoch + 1} (the task loss is not finite): "
                "lower train.tnn_lr"
            )
        record: dict[str, float] = {
            "epoch": float(epoch),
            "loss": statistics.fmean(losses) if losses else float("nan"),
            "seconds": time.perf_counter() - started,
        }
        factors = _current_factors(tnn, snn, state, phase)
        tnn.set_factors(factors)
        if val is not None and len(val) > 0:
            record["val_accuracy"] = accuracy(tnn, val, device)
        if factors is not None:
            widths = hard_widths(factors)
            record["params_ratio"] = float(costs.params(widths)) / float(costs.params())
            record["macs_ratio"] = float(costs.macs(widths)) / float(costs.macs())
            record["offset"] = float(snn.offset) if snn is not None else 0.0
        tnn.set_factors(None)
        state["history"].append(record)
        state["epoch"] = epoch + 1
        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "epoch"})
        if checkpoint_path is not None and (
            (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
        ):
            save_torch(
                {
                    "fingerprint": fingerprint,
                    "tnn": tnn.state_dict(),
                    "opt_tnn": opt_t.state_dict(),
                    "snn": snn.state_dict() if snn else {},
                    "opt_snn": opt_s.state_dict() if opt_s else {},
                    **state,
                },
                checkpoint_path,
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    bar.close()

    final = None
    if snn is not None:
        with torch.no_grad():
            if state["frozen"] is None and cfg.compression == "target":
                # No fixed phase (too few epochs): still end exactly on budget, since the TNN
                # steps after the last SNN step move the scores across the line.
                budget = cfg.target_ratio * full_cost
                snn.offset.fill_(
                    budget_offset(
                        snn.scores(tnn), costs, cfg.target_metric, budget, snn.spec.multiple
                    )
                )
            final = _current_factors(tnn, snn, state, "fixed" if state["frozen"] else "switch")
            assert final is not None
            final = {k: v.detach().cpu() for k, v in final.items()}
    history = state["history"]
    metrics: dict[str, float] = {
        "epochs": float(cfg.epochs),
        "epoch_seconds": statistics.median(r["seconds"] for r in history) if history else 0.0,
    }
    if history and "val_accuracy" in history[-1]:
        metrics["val_accuracy"] = history[-1]["val_accuracy"]
    if final is not None:
        widths = hard_widths(final)
        metrics["train_params_ratio"] = float(costs.params(widths)) / float(costs.params())
        metrics["train_macs_ratio"] = float(costs.macs(widths)) / float(costs.macs())
        metrics["switch_offset"] = float(snn.offset) if snn is not None else 0.0
    tnn.cpu().eval()
    if snn is not None:
        snn.cpu().eval()
    return FitResult(tnn, snn, final, history, metrics)


def _current_factors(
    tnn: TaskNet, snn: Switcher | None, state: dict[str, Any], phase: str
) -> dict[str, torch.Tensor] | None:
    if snn is None or phase == "warmup":
        return None
    if phase == "fixed":
        return state["frozen"]
    with torch.no_grad():
        return snn(tnn)


def _tnn_step(
    tnn: TaskNet,
    snn: Switcher | None,
    state: dict[str, Any],
    phase: str,
    cfg: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    cached: dict[str, torch.Tensor] | None = None,
) -> float:
    if phase == "switch":
        assert snn is not None
        if cfg.detach_factors:
            factors = cached if cached is not None else _current_factors(tnn, snn, state, phase)
        else:
            # Ablation: the task loss also reaches the TNN through the switcher's reading of it.
            for p in snn.parameters():
                p.requires_grad_(False)
            factors = snn(tnn, grad_through_tnn=True)
        tnn.set_factors(factors)
    else:
        tnn.set_factors(_current_factors(tnn, snn, state, phase))
    loss = loss_fn(tnn(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    tnn.set_factors(None)
    if snn is not None and not cfg.detach_factors:
        for p in snn.parameters():
            p.requires_grad_(True)
    return float(loss.detach())


def _snn_step(
    tnn: TaskNet,
    snn: Switcher,
    state: dict[str, Any],
    cfg: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    costs: CostModel,
    full_cost: float,
    target: float,
) -> dict[str, torch.Tensor] | None:
    """One SGD step of the switcher.

    Returns:
        The unit statistics it read: still valid after the step, since the task network did
        not change.
    """
    with _FrozenTNN(tnn):
        stats = snn.statistics(tnn)
        scores = snn.scores(tnn, stats=stats)
        if cfg.compression == "target":
            # The offset is the budget line: the lowest-scored units are off, so that the kept
            # cost meets the (ramped) target exactly. The switcher learns which units score low.
            snn.offset.fill_(
                budget_offset(
                    scores, costs, cfg.target_metric, target * full_cost, snn.spec.multiple
                )
            )
        factors = {k: snn.gate(v) for k, v in scores.items()}
        # Forward: exact zeros for units that are off. Backward: straight through for them, so
        # the task loss can raise a unit back above the line when it would help.
        tnn.set_factors(
            {k: factors[k] + (v - v.detach()) * (factors[k] == 0) for k, v in scores.items()}
        )
        loss = loss_fn(tnn(x), y)
        if cfg.compression == "penalty":
            # L1 on the factors, each unit weighted by what it costs at the current widths.
            marginal = costs.marginal(cfg.target_metric, hard_widths(factors))
            pressure = sum(marginal[k] * v.sum() for k, v in factors.items()) / full_cost
            loss = loss + cfg.penalty * pressure
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tnn.set_factors(None)
    return stats


@torch.no_grad()
def budget_offset(
    scores: dict[str, torch.Tensor],
    costs: CostModel,
    metric: str,
    budget: float,
    multiple: int = 1,
) -> float:
    """The lowest offset at which the units with ``score > offset`` cost at most ``budget``.

    Every group keeps at least one unit, and its width is rounded as :func:`kept_count` does
    for ``multiple``. Found by bisection over the sorted scores.
    """
    flat = torch.cat([v.detach().flatten() for v in scores.values()]).sort().values

    def fits(offset: float) -> bool:
        widths = {
            k: kept_count(int((v > offset).sum()), v.numel(), multiple) for k, v in scores.items()
        }
        return float(costs.cost(metric, widths)) <= budget

    below_all = float(flat[0]) - 1.0
    if fits(below_all):
        return below_all
    lo, hi = -1, len(flat) - 1  # flat[hi], the top score, keeps one unit per group
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(float(flat[mid])):
            hi = mid
        else:
            lo = mid
    return float(flat[hi])
