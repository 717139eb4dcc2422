"""Pruning baselines built on Torch-Pruning: Network Slimming and L1-norm filter pruning.

Both baselines get the same task network (TNN), data and epoch budget as the other methods, are
pruned once, globally, by Torch-Pruning's pruner to a parameter or MAC target, and are then
fine-tuned. Units are removed through Torch-Pruning's ``DependencyGraph``, so every coupled layer
(the next layer's inputs, BatchNorm, residual streams) shrinks with them; the classifier's
outputs are never pruned.

- ``slimming`` (Liu et al., 2017): the TNN is trained from scratch with a sparsity term and then
  pruned by the size of each unit's scale.

  * TNNs with BatchNorm (``vgg*``, ``resnet*``): Torch-Pruning's ``BNScalePruner``, i.e. an L1
    penalty on every BatchNorm ``gamma`` (``reg * sign(gamma)`` added to its gradient after each
    backward pass), and importance ``|gamma|`` (averaged over the BatchNorms of a residual
    group), not normalised, so one global threshold compares raw ``|gamma|`` as in the paper.
  * TNNs without BatchNorm (``mlp``, ``lenet5``) have no ``gamma`` to penalise. There the
    penalty is the group lasso on each unit's whole dependency group: ``reg * sum_u ||w_u||_2``,
    where ``w_u`` holds every parameter that is removed with unit ``u`` (its incoming weights and
    bias, and its column in every layer that reads it). Written ``w_u = s_u * v_u`` with
    ``||v_u||_2 = 1``, this is exactly slimming's ``reg * sum_u |s_u|`` on the unit's implicit
    scale ``s_u = ||w_u||_2``, and the importance is that scale, ``||w_u||_2``. Because the
    scale of a unit's weights depends on its layer's fan-in, the importances are divided by
    their layer's mean before the global ranking (Torch-Pruning's default normaliser).
    Torch-Pruning's own ``GroupNormPruner`` is not used: its regulariser is a weight decay
    scaled per unit (``reg * alpha**k * w``), not a lasso that pulls whole units to zero.

- ``l1norm`` (Li et al., 2017): the trained plain TNN is pruned by the L1 norm of each unit's
  weights, Torch-Pruning's ``MagnitudeImportance(p=1)`` with its defaults (L1 over the unit's
  dependency group, divided by the layer's mean so that layers compare under one global
  threshold).

Safeguards, so that no layer is emptied and no baseline collapses:

- In the global ranking, the ``ceil((1 - max_pruning_ratio) * n)`` most important units of every
  layer (at least one) get infinite importance, so no layer loses more than
  ``max_pruning_ratio`` of its units. Torch-Pruning's own ``max_pruning_ratio`` is passed as
  well, but a one-shot step only checks it before pruning, and a group whose units would all
  fall below the global threshold is silently left unpruned instead of being capped.
- The global pruning ratio is found by bisection on the number of removed units: each trial
  prunes a deep copy and counts its parameters (or MACs, with :mod:`switchprune.evaluation`),
  and the result is the least pruning whose count is at most ``target_ratio`` times the
  unpruned one, so the target is met and approached as closely as the units allow.
- Fallback: when even the global pruning with every layer at ``max_pruning_ratio`` stays above
  the target, every layer is pruned by one common ratio instead (Torch-Pruning's non-global
  mode, same importances), found by bisection too. It may go beyond ``max_pruning_ratio``,
  since the target needs that, but always keeps at least one unit per layer; a warning says so.
  A target that even one unit per layer cannot meet raises ``ValueError``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import TensorDataset
from torch_pruning.pruner import function

from switchprune.evaluation import count_macs, count_params
from switchprune.models import ModelSpec, TaskNet, build_model

METHODS = ("slimming", "l1norm")
METRICS = ("params", "macs")
# No layer loses more than this share of its units in the global ranking.
MAX_PRUNING_RATIO = 0.95
# Sparsity coefficient of slimming (Liu et al. use 1e-4 for VGG on CIFAR).
SLIMMING_REG = 1e-4

_OUT_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_IN_FNS = (function.prune_conv_in_channels, function.prune_linear_in_channels)


# switchprune.training.fit builds a fresh TNN; fine-tuning and slimming train a given model.
def train_sgd(
    model: nn.Module,
    train: TensorDataset,
    epochs: int,
    *,
    lr: float,
    seed: int,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    batch_size: int = 64,
) -> list[float]:
    """Train ``model`` in place with SGD, as the other methods of the benchmark are trained.

    SGD with momentum 0.9 and weight decay 5e-4, a cosine learning-rate schedule stepped per
    epoch, mini-batches shuffled by a generator seeded from ``seed`` and the epoch.

    Args:
        model: The network; batches are moved to the device of its parameters.
        train: ``(x, y)`` tensors.
        epochs: Passes over ``train`` (0 leaves the model unchanged).
        lr: Initial learning rate.
        seed: Seeds torch and the shuffling.
        extra_loss: Added to the cross-entropy of every batch.
        after_backward: Called with the model after each backward pass, before the optimiser
            step (a pruner's ``regularize``).
        batch_size: Mini-batch size.

    Returns:
        Wall time of each epoch, in seconds.
    """
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    x_all, y_all = train.tensors
    loss_fn = nn.CrossEntropyLoss()
    seconds = []
    for epoch in range(epochs):
        started = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        order = torch.randperm(
            len(y_all), generator=torch.Generator().manual_seed(seed * 7919 + epoch)
        )
        model.train()
        for i in range(0, len(y_all), batch_size):
            idx = order[i : i + batch_size]
            loss = loss_fn(model(x_all[idx].to(device)), y_all[idx].to(device))
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            opt.step()
        seconds.append(time.perf_counter() - started)
    model.eval()
    return seconds


class ProtectedImportance(tp.importance.Importance):
    """Another importance whose top units of every layer are made unprunable (infinite score).

    Args:
        base: The importance that ranks the units.
        max_pruning_ratio: Share of a layer's units that may be removed at most; at least one
            unit is always protected.
    """

    def __init__(self, base: tp.importance.Importance, max_pruning_ratio: float) -> None:
        self.base = base
        self.max_pruning_ratio = max_pruning_ratio

    def kept(self, size: int) -> int:
        """How many of a layer's ``size`` units are protected."""
        return min(size, max(1, math.ceil(size * (1.0 - self.max_pruning_ratio) - 1e-9)))

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        """Scores of ``group``'s units, with the protected ones at ``inf``."""
        imp = self.base(group)
        if imp is None:
            return None
        imp = imp.detach().float().clone()
        imp[torch.topk(imp, self.kept(len(imp))).indices] = math.inf
        return imp


class GroupLassoPruner(tp.pruner.BasePruner):
    """Torch-Pruning pruner whose ``regularize`` adds the group lasso of every unit's group.

    The penalty is ``reg * sum_u ||w_u||_2`` over the units ``u`` of every prunable group, where
    ``w_u`` is every parameter removed with the unit (weights and bias of the layers that write
    it, its input column in the layers that read it, BatchNorm parameters). Its gradient,
    ``reg * w_u / ||w_u||_2``, is added to the parameters' gradients after the backward pass,
    the way ``BNScalePruner.regularize`` adds its L1 term.

    Args:
        *args: Passed to :class:`torch_pruning.pruner.BasePruner`.
        reg: Coefficient of the penalty.
        **kwargs: Passed to :class:`torch_pruning.pruner.BasePruner`.
    """

    def __init__(self, *args: object, reg: float = SLIMMING_REG, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.reg = reg
        # The groups do not change while the model trains: resolve every slice of every unit's
        # parameters once, since ``regularize`` runs after every backward pass.
        self._plan: list[tuple[int, list[_Slice]]] = []
        for group in self.DG.get_all_groups(
            ignored_layers=self.ignored_layers, root_module_types=self.root_module_types
        ):
            slices = []
            for i, (dep, idxs) in enumerate(group):
                root_idxs = group[i].root_idxs
                if any(r is None for r in root_idxs):
                    continue
                layer, fn = dep.layer, dep.pruning_fn
                params: list[tuple[nn.Parameter | None, int]] = []
                if fn in _OUT_FNS:
                    params = [(layer.weight, 0), (layer.bias, 0)]
                elif fn in _IN_FNS:
                    params = [(layer.weight, 1)]
                elif fn == function.prune_batchnorm_out_channels and layer.affine:
                    params = [(layer.weight, 0), (layer.bias, 0)]
                for param, dim in params:
                    if param is not None:
                        slices.append(_Slice.of(param, dim, idxs, root_idxs))
            if slices:
                size = self.DG.get_out_channels(group[0].dep.target.module)
                self._plan.append((int(size), slices))

    @torch.no_grad()
    def regularize(self, model: nn.Module, reg: float | None = None) -> None:
        """Add the group-lasso gradient to the parameters' ``.grad`` (call after backward).

        Args:
            model: The model being trained (its parameters were resolved at construction).
            reg: Coefficient for this call, instead of the pruner's.
        """
        reg = self.reg if reg is None else reg
        for size, slices in self._plan:
            device = slices[0].param.device
            sq = torch.zeros(size, device=device)
            values = [s.values() for s in slices]
            for s, w in zip(slices, values, strict=True):
                per_unit = w.pow(2).movedim(s.dim, 0).reshape(w.shape[s.dim], -1).sum(1)
                sq.index_add_(0, s.root.to(device), per_unit)
            scale = reg / (sq.sqrt() + 1e-12)
            for s, w in zip(slices, values, strict=True):
                if s.param.grad is not None:
                    s.add_to_grad(w * scale[s.root.to(device)].view(s.shape))


@dataclasses.dataclass(frozen=True)
class _Slice:
    """The part of one parameter that belongs to a group's units, along ``dim``."""

    param: nn.Parameter
    dim: int
    rows: torch.Tensor | None  # None: the whole dimension, in order
    root: torch.Tensor  # the group's unit of every row
    shape: tuple[int, ...]  # broadcasts a per-row factor

    @classmethod
    def of(cls, param: nn.Parameter, dim: int, idxs: list[int], root: list[int]) -> _Slice:
        rows = torch.tensor([int(i) for i in idxs], dtype=torch.long)
        whole = torch.equal(rows, torch.arange(param.shape[dim]))
        shape = [1] * param.dim()
        shape[dim] = -1
        root_t = torch.tensor([int(r) for r in root], dtype=torch.long)
        return cls(param, dim, None if whole else rows, root_t, tuple(shape))

    def values(self) -> torch.Tensor:
        if self.rows is None:
            return self.param.detach()
        return self.param.detach().index_select(self.dim, self.rows.to(self.param.device))

    def add_to_grad(self, g: torch.Tensor) -> None:
        assert self.param.grad is not None
        if self.rows is None:
            self.param.grad.add_(g)
        else:
            self.param.grad.index_add_(self.dim, self.rows.to(self.param.device), g)


def _sync_spec(model: TaskNet) -> None:
    """Make ``model.spec`` and ``model.groups`` report the widths the pruned layers have."""
    modules = dict(model.named_modules())
    groups = []
    for g in model.groups:
        writer = modules[g.writers[0]]
        size = writer.out_channels if isinstance(writer, nn.Conv2d) else writer.out_features
        groups.append(dataclasses.replace(g, size=int(size)))
    model.groups = groups
    model.spec = model.spec.with_widths({g.name: g.size for g in groups})


def _detached_copy(model: TaskNet) -> TaskNet:
    """A deep copy in eval mode, without gate factors (the original is left as it was)."""
    attached = [(gate, gate.factors) for gate in model.gates()]
    model.set_factors(None)
    try:
        work = copy.deepcopy(model)
    finally:
        for gate, s in attached:
            gate.factors = s
    return work.eval()


def _measure(metric: str, in_shape: tuple[int, ...]) -> Callable[[nn.Module], int]:
    if metric == "params":
        return count_params
    if metric == "macs":
        return lambda m: count_macs(m, in_shape)
    raise ValueError(f"unknown target metric {metric!r} (known: {', '.join(METRICS)})")


def _prune_copy(
    model: TaskNet,
    importance: tp.importance.Importance,
    ratio: float,
    *,
    global_pruning: bool,
    max_pruning_ratio: float,
) -> TaskNet:
    """Prune a copy of ``model`` one-shot at ``ratio`` with Torch-Pruning's pruner."""
    work = _detached_copy(model)
    device = next(work.parameters()).device
    example = torch.zeros(1, *work.spec.in_shape, device=device)
    pruner = tp.pruner.BasePruner(
        work,
        example,
        importance=importance,
        global_pruning=global_pruning,
        pruning_ratio=ratio,
        max_pruning_ratio=max_pruning_ratio,
        ignored_layers=[work.classifier],
    )
    if ratio > 0:
        pruner.step()
    _sync_spec(work)
    return work.eval()


def _ranked_sizes(model: TaskNet, importance: tp.importance.Importance) -> list[int]:
    """Unit count of every group the pruner ranks (scored by ``importance``, not the classifier)."""
    work = _detached_copy(model)
    example = torch.zeros(1, *work.spec.in_shape, device=next(work.parameters()).device)
    dg = tp.DependencyGraph().build_dependency(work, example_inputs=example)
    scores = (importance(g) for g in dg.get_all_groups(ignored_layers=[work.classifier]))
    return [len(s) for s in scores if s is not None]


def prune_to_target(
    model: TaskNet,
    importance: tp.importance.Importance,
    *,
    target_metric: str,
    target_ratio: float,
    max_pruning_ratio: float = MAX_PRUNING_RATIO,
) -> tuple[TaskNet, str]:
    """Prune a copy of ``model`` globally to at most ``target_ratio`` of its params or MACs.

    Args:
        model: The trained network (left untouched).
        importance: Torch-Pruning importance that ranks the units.
        target_metric: ``params`` or ``macs``.
        target_ratio: Largest allowed share of the unpruned count.
        max_pruning_ratio: Largest share of a layer's units the global ranking may remove.

    Returns:
        The pruned copy (its spec and groups report the new widths) and how it was pruned:
        ``global``, or ``uniform`` when the fallback was needed (see the module docstring).

    Raises:
        ValueError: Unknown metric, or a target that one unit per layer cannot meet.
    """
    measure = _measure(target_metric, model.spec.in_shape)
    budget = target_ratio * measure(_detached_copy(model))
    sizes = _ranked_sizes(model, importance)
    pruned = _global_search(model, importance, measure, budget, sizes, max_pruning_ratio)
    if pruned is not None:
        return pruned, "global"
    # Every layer is at the cap and the net is still too large: prune all layers alike.
    found = _uniform_search(model, importance, measure, budget, sizes)
    if found is None:
        raise ValueError(
            f"a {target_metric} target of {target_ratio:g} cannot be met without emptying a layer"
        )
    pruned, ratio = found
    warnings.warn(
        f"global pruning with max_pruning_ratio={max_pruning_ratio:g} cannot reach a "
        f"{target_metric} ratio of {target_ratio:g}; every layer was pruned by a common ratio "
        f"of {ratio:.3f} instead",
        stacklevel=2,
    )
    return pruned, "uniform"


def _global_search(
    model: TaskNet,
    importance: tp.importance.Importance,
    measure: Callable[[nn.Module], int],
    budget: float,
    sizes: list[int],
    max_pruning_ratio: float,
) -> TaskNet | None:
    """The least global pruning within ``budget``, by bisection on the removed units.

    Returns:
        The pruned copy, or ``None`` when even every layer at ``max_pruning_ratio`` exceeds it.
    """
    total = sum(sizes)
    capped = ProtectedImportance(importance, max_pruning_ratio)
    free = total - sum(capped.kept(n) for n in sizes)

    def global_at(n: int) -> TaskNet:
        # Torch-Pruning removes ``total - int(total * (1 - ratio))`` units: exactly n here.
        ratio = max(0.0, (n - 0.5) / total)
        return _prune_copy(
            model, capped, ratio, global_pruning=True, max_pruning_ratio=max_pruning_ratio
        )

    best = global_at(0)
    if measure(best) <= budget:
        return best
    best = global_at(free)
    if measure(best) > budget:
        return None
    lo, hi = 0, free  # cost(lo) > budget >= cost(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = global_at(mid)
        if measure(candidate) <= budget:
            hi, best = mid, candidate
        else:
            lo = mid
    return best


def _uniform_search(
    model: TaskNet,
    importance: tp.importance.Importance,
    measure: Callable[[nn.Module], int],
    budget: float,
    sizes: list[int],
) -> tuple[TaskNet, float] | None:
    """The least common per-layer ratio within ``budget``, by bisection.

    Returns:
        The pruned copy and its ratio, or ``None`` when one unit per layer exceeds ``budget``.
    """
    one = ProtectedImportance(importance, 1.0)
    # Just below 1 - 1/n: the smallest layer keeps exactly one unit (int() truncates).
    r_max = 1.0 - 1.0 / min(sizes) - 1e-9

    def uniform_at(ratio: float) -> TaskNet:
        return _prune_copy(model, one, ratio, global_pruning=False, max_pruning_ratio=1.0)

    best = uniform_at(r_max)
    if measure(best) > budget:
        return None
    lo_r, hi_r = 0.0, r_max
    for _ in range(20):
        mid_r = (lo_r + hi_r) / 2
        candidate = uniform_at(mid_r)
        if measure(candidate) <= budget:
            hi_r, best = mid_r, candidate
        else:
            lo_r = mid_r
    return best, hi_r


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def slimming_importance(model: nn.Module) -> tp.importance.Importance:
    """The unit ranking of slimming: raw ``|gamma|`` with BatchNorm, else the group L2 norm."""
    if _has_batchnorm(model):
        return tp.importance.BNScaleImportance(normalizer=None)
    return tp.importance.GroupMagnitudeImportance(
        p=2, group_reduction="sum", bias=True, normalizer=_sqrt_over_mean
    )


def _sqrt_over_mean(sq_norms: torch.Tensor) -> torch.Tensor:
    # Squared group norms in, group L2 norms divided by their layer's mean out.
    norms = sq_norms.sqrt()
    return norms / norms.mean().clamp(min=1e-12)


def train_slimming(
    spec: ModelSpec,
    train: TensorDataset,
    *,
    epochs: int,
    lr: float,
    seed: int,
    reg: float = SLIMMING_REG,
    device: torch.device | str = "cpu",
) -> TaskNet:
    """Train a fresh TNN of ``spec`` with slimming's sparsity penalty (see module docstring).

    Args:
        spec: Full-width spec of the TNN.
        train: Training data.
        epochs: Training epochs.
        lr: SGD learning rate.
        seed: Seeds the initialisation and the shuffling.
        reg: Coefficient of the L1 (BatchNorm) or group-lasso (no BatchNorm) penalty.
        device: Where to train.

    Returns:
        The trained, full-width TNN on the CPU, in eval mode.
    """
    torch.manual_seed(seed)
    model = build_model(spec).to(device).eval()
    model.set_factors(None)
    example = torch.zeros(1, *spec.in_shape, device=device)
    kind = tp.pruner.BNScalePruner if _has_batchnorm(model) else GroupLassoPruner
    pruner = kind(
        model,
        example,
        importance=slimming_importance(model),
        reg=reg,
        ignored_layers=[model.classifier],
    )
    train_sgd(model, train, epochs, lr=lr, seed=seed, after_backward=pruner.regularize)
    return model.cpu().eval()


def run_baseline(
    method: str,
    spec: ModelSpec,
    train: TensorDataset,
    *,
    target_metric: str,
    target_ratio: float,
    epochs: int,
    finetune_epochs: int,
    lr: float,
    seed: int,
    trained_plain: nn.Module | None = None,
    max_pruning_ratio: float = MAX_PRUNING_RATIO,
    slimming_reg: float = SLIMMING_REG,
    device: torch.device | str = "cpu",
) -> dict[str, nn.Module]:
    """Train (or reuse), prune to a target and fine-tune one baseline.

    Args:
        method: ``slimming`` or ``l1norm``.
        spec: Full-width spec of the TNN.
        train: ``(x, y)`` training tensors (normalised float images, int64 labels).
        target_metric: ``params`` or ``macs``.
        target_ratio: Largest allowed share of the unpruned TNN's params or MACs.
        epochs: Training epochs (slimming's sparse training, or the plain TNN's for ``l1norm``
            when ``trained_plain`` is not given).
        finetune_epochs: Fine-tuning epochs after pruning, at ``lr / 5``.
        lr: SGD learning rate of the TNN.
        seed: Seeds initialisation, shuffling and fine-tuning.
        trained_plain: ``l1norm`` only: an already trained plain TNN of ``spec`` and ``seed``,
            which is copied, never modified.
        max_pruning_ratio: Largest share of a layer's units the global ranking may remove.
        slimming_reg: Coefficient of slimming's sparsity penalty.
        device: Where to train; the returned models are on the CPU.

    Returns:
        ``{"pruned": model right after pruning, "pruned+ft": a fine-tuned copy of it}``, both in
        eval mode. They are ordinary ``TaskNet`` objects whose ``spec`` reports the new widths.

    Raises:
        ValueError: Unknown method or metric, or an unreachable target.
        TypeError: ``trained_plain`` is not a ``TaskNet``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r} (known: {', '.join(METHODS)})")
    _measure(target_metric, spec.in_shape)  # fail before training on a bad metric
    if method == "slimming":
        trained = train_slimming(
            spec, train, epochs=epochs, lr=lr, seed=seed, reg=slimming_reg, device=device
        )
        importance = slimming_importance(trained)
    else:
        if trained_plain is None:
            torch.manual_seed(seed)
            trained = build_model(spec).to(device)
            train_sgd(trained, train, epochs, lr=lr, seed=seed)
        else:
            if not isinstance(trained_plain, TaskNet):
                raise TypeError("trained_plain must be a TaskNet")
            trained = trained_plain
        importance = tp.importance.MagnitudeImportance(p=1)
    pruned, _mode = prune_to_target(
        _detached_copy(trained).cpu(),
        importance,
        target_metric=target_metric,
        target_ratio=target_ratio,
        max_pruning_ratio=max_pruning_ratio,
    )
    tuned = copy.deepcopy(pruned).to(device)
    train_sgd(tuned, train, finetune_epochs, lr=lr / 5, seed=seed)
    return {"pruned": pruned.eval(), "pruned+ft": tuned.cpu().eval()}


__all__ = [
    "MAX_PRUNING_RATIO",
    "METHODS",
    "SLIMMING_REG",
    "GroupLassoPruner",
    "ProtectedImportance",
    "prune_to_target",
    "run_baseline",
    "slimming_importance",
    "train_sgd",
    "train_slimming",
]
