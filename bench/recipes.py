"""The peers at their best: their authors' own recipes, through Torch-Pruning's pruners.

Each recipe gets the same TNN, data (no augmentation, as ours), optimiser (SGD, momentum 0.9,
weight decay 5e-4, batch 64, cosine learning rate) and total epoch budget as ours: its
(sparse, regularised or iterative) training lasts as long as our switching phase and its
fine-tuning as long as our fixed phase (:func:`budget_of`). Every recipe ends pruned globally
to the same exact params or MACs target by :func:`baselines.prune_to_target`'s bisection, and
its fine-tuning restarts the learning-rate schedule (a fresh cosine from ``lr *
FINETUNE_LR_FACTOR``) with a new optimiser, as their authors do.

- ``depgraph`` (Fang et al., CVPR 2023): sparse training with Torch-Pruning's
  ``GroupNormPruner`` (group-level regularisation: every unit's whole dependency group is
  decayed by ``reg * 2**(4 * (1 - rank))``, stronger for the less important groups), then
  pruning by ``GroupMagnitudeImportance(p=2)`` (the group's L2 norm ÷ its layer's mean), then
  fine-tuning.
- ``slimming-recipe`` (Liu et al., ICCV 2017): L1 on every BatchNorm ``gamma`` from the first
  epoch (Torch-Pruning's ``BNScalePruner``; their ``s = 1e-4`` is the middle of the grid), then
  pruning by raw ``|gamma|``, then fine-tuning. TNNs without BatchNorm get the group lasso of
  :class:`baselines.GroupLassoPruner` (slimming's L1 on each unit's implicit scale).
- ``iterative`` (Torch-Pruning's ``iterative_steps``): plain training, pruned by
  ``GroupMagnitudeImportance(p=2)`` in ``N`` steps spread over the same share of training as our
  ramp (``ramp_fraction`` of the switching phase), each step to the next point of a linear
  schedule of the cost (``1 - (1 - target) * k / N`` of the unpruned count, hit exactly by the
  bisection), the optimiser rebuilt after every step (the pruner replaces the parameters); then
  it trains on to the end of the phase and is fine-tuned. It has no regulariser: its grid is
  over ``N``.

The strength of each recipe (``reg``, ``s`` or ``N``) is chosen from :data:`GRIDS` by the
validation accuracy of the fine-tuned model, trained on 90 % of the training split and measured
on the other 10 % (:func:`choose`), once per TNN and target on one seed; the other seeds reuse
the choice.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch_pruning as tp
from baselines import (
    _measure,
    prune_to_target,
    slimming_importance,
    train_sgd,
    train_slimming,
)
from torch import nn
from torch.utils.data import TensorDataset

from switchprune.config import TrainConfig
from switchprune.evaluation import accuracy_from_logits, predict_logits
from switchprune.models import ModelSpec, TaskNet, build_model

RECIPES = ("depgraph", "slimming-recipe", "iterative")
# Three values per recipe, around the authors' defaults (DepGraph's CIFAR scripts: reg 5e-4;
# Network Slimming: s = 1e-4; iterative: Torch-Pruning's examples use a handful of steps).
GRIDS: dict[str, tuple[float, ...]] = {
    "depgraph": (1e-4, 5e-4, 2e-3),
    "slimming-recipe": (1e-5, 1e-4, 1e-3),
    "iterative": (2, 4, 8),
}
# Fine-tuning restarts a cosine schedule at this share of the TNN's learning rate (the
# benchmark's fine-tuning rate for every method).
FINETUNE_LR_FACTOR = 0.2
VAL_FRACTION = 0.1
BATCH_SIZE = 64

Target = tuple[str, float]


@dataclasses.dataclass(frozen=True)
class Budget:
    """A recipe's epochs, matched to ours.

    Attributes:
        train_epochs: Sparse, regularised or iterative training: our switching phase.
        finetune_epochs: Fine-tuning after the (last) prune: our fixed phase.
        ramp_fraction: Share of the training over which ``iterative`` prunes (our ramp).
    """

    train_epochs: int
    finetune_epochs: int
    ramp_fraction: float


def budget_of(cfg: TrainConfig) -> Budget:
    """Split ``cfg.epochs`` as ``switchprune.training`` splits our schedule.

    Ours switches until ``max(warmup + 1, round(switch_epochs_fraction * epochs))`` and trains
    with frozen factors for the remaining epochs; a peer trains (sparsely) for the former and
    fine-tunes for the latter.

    Args:
        cfg: Our training configuration.

    Returns:
        The peer's budget (its two phases sum to ``cfg.epochs``).
    """
    switch_end = max(cfg.warmup_epochs + 1, round(cfg.switch_epochs_fraction * cfg.epochs))
    switch_end = min(switch_end, cfg.epochs)
    return Budget(switch_end, cfg.epochs - switch_end, cfg.ramp_fraction)


def holdout(data: TensorDataset, fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """A seeded random split of ``data`` into training and validation parts.

    Args:
        data: ``(x, y)`` tensors.
        fraction: Share held out for validation (at least one sample).
        seed: Seeds the permutation.

    Returns:
        ``(train, val)``.
    """
    x, y = data.tensors
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fraction * len(y)))
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def importance(recipe: str, model: nn.Module) -> tp.importance.Importance:
    """How ``recipe`` ranks the units of ``model`` when it prunes."""
    if recipe == "slimming-recipe":
        return slimming_importance(model)
    if recipe in ("depgraph", "iterative"):
        return tp.importance.GroupMagnitudeImportance(p=2)
    raise ValueError(f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")


def sparse_train(
    recipe: str, spec: ModelSpec, train: TensorDataset, strength: float, epochs: int, lr: float,
    seed: int,
) -> TaskNet:  # fmt: skip
    """A fresh TNN trained with the sparsity term of ``depgraph`` or ``slimming-recipe``.

    Args:
        recipe: ``depgraph`` (``GroupNormPruner``) or ``slimming-recipe`` (``BNScalePruner``,
            or the group lasso without BatchNorm).
        spec: Full-width spec of the TNN.
        train: Training data.
        strength: The regulariser's coefficient.
        epochs: Training epochs (a cosine schedule over them).
        lr: SGD learning rate.
        seed: Seeds the initialisation and the shuffling.

    Returns:
        The trained, full-width TNN, in eval mode.
    """
    if recipe == "slimming-recipe":
        return train_slimming(spec, train, epochs=epochs, lr=lr, seed=seed, reg=strength)
    if recipe != "depgraph":
        raise ValueError(f"{recipe!r} has no sparse training")
    torch.manual_seed(seed)
    model = build_model(spec)
    model.set_factors(None)
    pruner = tp.pruner.GroupNormPruner(
        model.eval(),
        torch.zeros(1, *spec.in_shape),
        importance=importance(recipe, model),
        reg=strength,
        global_pruning=True,
        ignored_layers=[model.classifier],
    )
    train_sgd(model, train, epochs, lr=lr, seed=seed, after_backward=pruner.regularize)
    return model.eval()


def prune_and_finetune(
    trained: TaskNet, recipe: str, target: Target, train: TensorDataset, epochs: int, lr: float,
    seed: int,
) -> TaskNet:  # fmt: skip
    """A copy of ``trained`` pruned to ``target`` and fine-tuned on a restarted schedule.

    Args:
        trained: The (sparsely) trained TNN, left untouched.
        recipe: Which importance ranks the units (:func:`importance`).
        target: ``(metric, ratio)``.
        train: Fine-tuning data.
        epochs: Fine-tuning epochs.
        lr: The TNN's learning rate; fine-tuning starts a fresh cosine at
            ``lr * FINETUNE_LR_FACTOR`` with a new optimiser.
        seed: Seeds the shuffling.

    Returns:
        The pruned, fine-tuned copy, in eval mode.
    """
    pruned, _mode = prune_to_target(
        trained, importance(recipe, trained), target_metric=target[0], target_ratio=target[1]
    )
    train_sgd(pruned, train, epochs, lr=lr * FINETUNE_LR_FACTOR, seed=seed)
    return pruned.eval()


def prune_steps(steps: int, total: int, ramp_fraction: float) -> dict[int, int]:
    """When ``iterative`` prunes: optimiser step count after which the ``k``-th prune runs.

    The ``steps`` prunes are spread evenly over the first ``ramp_fraction`` of the ``total``
    optimiser steps, the last at its end; each comes after at least one step, and no two at
    the same step when there are enough of them.

    Returns:
        ``{step count: k}`` for ``k`` in ``1..steps``.
    """
    span = max(1, round(ramp_fraction * total))
    out: dict[int, int] = {}
    for k in range(1, steps + 1):
        at = min(total, max(k, round(k * span / steps)))
        while at in out and at < total:
            at += 1
        out[at] = k  # a prune that cannot get its own step is merged into the later one
    return out


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def train_iterative(
    spec: ModelSpec, train: TensorDataset, target: Target, steps: int, budget: Budget, lr: float,
    seed: int,
) -> tuple[TaskNet, list[float]]:  # fmt: skip
    """``iterative``: train a fresh TNN, pruning it in ``steps`` steps, then fine-tune it.

    Args:
        spec: Full-width spec of the TNN.
        train: Training data.
        target: ``(metric, ratio)`` reached at the last step.
        steps: Number of prunes (``N``).
        budget: Training and fine-tuning epochs, and the share of training with prunes.
        lr: SGD learning rate (cosine over the training epochs, continued across prunes).
        seed: Seeds the initialisation and the shuffling.

    Returns:
        The pruned, fine-tuned TNN (eval mode) and its cost ratio after every prune.
    """
    metric, ratio = target
    torch.manual_seed(seed)
    model = build_model(spec)
    model.set_factors(None)
    measure = _measure(metric, spec.in_shape)
    full = measure(model)
    x_all, y_all = train.tensors
    per_epoch = math.ceil(len(y_all) / BATCH_SIZE)
    when = prune_steps(steps, budget.train_epochs * per_epoch, budget.ramp_fraction)
    opt, loss_fn, done, costs = _sgd(model, lr), nn.CrossEntropyLoss(), 0, []
    for epoch in range(budget.train_epochs):
        lr_now = lr * 0.5 * (1 + math.cos(math.pi * epoch / budget.train_epochs))
        for group in opt.param_groups:
            group["lr"] = lr_now
        order = torch.randperm(
            len(y_all), generator=torch.Generator().manual_seed(seed * 7919 + epoch)
        )
        model.train()
        for i in range(0, len(y_all), BATCH_SIZE):
            idx = order[i : i + BATCH_SIZE]
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done in when:
                goal = 1.0 - (1.0 - ratio) * when[done] / steps
                model, _mode = prune_to_target(
                    model, importance("iterative", model), target_metric=metric,
                    target_ratio=min(1.0, goal * full / measure(model)),
                )  # fmt: skip
                model.train()
                opt = _sgd(model, lr_now)  # Torch-Pruning replaced the parameters
                costs.append(measure(model) / full)
    train_sgd(model, train, budget.finetune_epochs, lr=lr * FINETUNE_LR_FACTOR, seed=seed)
    return model.eval(), costs


def run_recipe(
    recipe: str, spec: ModelSpec, train: TensorDataset, target: Target, strength: float,
    budget: Budget, lr: float, seed: int, sparse: dict[tuple[str, float], TaskNet] | None = None,
) -> TaskNet:  # fmt: skip
    """One recipe, trained, pruned to ``target`` and fine-tuned within ``budget``.

    Args:
        recipe: One of :data:`RECIPES`.
        spec: Full-width spec of the TNN.
        train: Training data.
        target: ``(metric, ratio)``.
        strength: The recipe's regulariser coefficient, or ``N`` for ``iterative``.
        budget: The epochs (:func:`budget_of`).
        lr: The TNN's SGD learning rate.
        seed: Seeds every draw.
        sparse: Cache of sparsely trained TNNs by ``(recipe, strength)``, shared by the targets
            of one TNN and seed (the sparse training does not depend on the target).

    Returns:
        The final model, in eval mode.
    """
    if recipe == "iterative":
        return train_iterative(spec, train, target, int(strength), budget, lr, seed)[0]
    cache = {} if sparse is None else sparse
    if (recipe, strength) not in cache:
        cache[recipe, strength] = sparse_train(
            recipe, spec, train, strength, budget.train_epochs, lr, seed
        )
    trained = cache[recipe, strength]
    return prune_and_finetune(trained, recipe, target, train, budget.finetune_epochs, lr, seed)


def choose(
    recipe: str, spec: ModelSpec, train: TensorDataset, targets: tuple[Target, ...],
    budget: Budget, lr: float, seed: int, grid: tuple[float, ...] | None = None,
) -> dict[Target, dict[str, Any]]:  # fmt: skip
    """Pick the recipe's strength per target by validation accuracy (see the module docstring).

    Args:
        recipe: One of :data:`RECIPES`.
        spec: Full-width spec of the TNN.
        train: The training split; 10 % of it is held out for validation.
        targets: The TNN's targets.
        budget: The epochs.
        lr: The TNN's learning rate.
        seed: The seed of the selection runs and of the hold-out.
        grid: The candidate strengths (default: ``GRIDS[recipe]``).

    Returns:
        Per target, ``{"strength": chosen, "val_accuracy": {str(value): accuracy}, "seed":
        seed}``; ties go to the earlier value of the grid.
    """
    fit_part, val = holdout(train, VAL_FRACTION, seed)
    values = GRIDS[recipe] if grid is None else grid
    scores: dict[Target, dict[float, float]] = {t: {} for t in targets}
    for value in values:
        cache: dict[tuple[str, float], TaskNet] = {}
        for target in targets:
            model = run_recipe(recipe, spec, fit_part, target, value, budget, lr, seed, cache)
            logits = predict_logits(model, val, torch.device("cpu"))
            scores[target][value] = accuracy_from_logits(logits, val.tensors[1])
    out = {}
    for target, by_value in scores.items():
        best = max(values, key=lambda v: (by_value[v], -values.index(v)))
        accuracies = {str(v): a for v, a in by_value.items()}
        out[target] = {"strength": best, "val_accuracy": accuracies, "seed": seed}
    return out


__all__ = [
    "FINETUNE_LR_FACTOR",
    "GRIDS",
    "RECIPES",
    "Budget",
    "budget_of",
    "choose",
    "holdout",
    "importance",
    "prune_and_finetune",
    "prune_steps",
    "run_recipe",
    "sparse_train",
    "train_iterative",
]
