"""Running the benchmark's cells: train, prune and measure each method, and time the results.

A cell is one TNN, seed and target. Every method in it gets the same data, epochs and
fine-tuning budget; each run becomes one record (a row of ``results.json``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from baselines import prune_to_target, slimming_importance, train_sgd, train_slimming
from recipes import RECIPES, Budget, budget_of, choose, run_recipe
from settings import ARCHS, BASELINES, LEARNING_RATES, TARGETS, Setting, train_config
from torch import nn
from torch.utils.data import TensorDataset

from switchprune.config import DataConfig, ModelConfig, PruneConfig, TrainConfig
from switchprune.data import load_meta, load_split, prepare_data
from switchprune.evaluation import (
    LATENCY_BATCHES,
    accuracy_from_logits,
    count_macs,
    count_params,
    forward_pass,
    predict_logits,
)
from switchprune.evaluation import interleaved_latency as lib_interleaved
from switchprune.models import ModelSpec, spec_from_config
from switchprune.pruning import compact, kept_widths, threshold_factors
from switchprune.training import fit

# The paper's claims: (data, name, TNN, compression). ``none`` is the no-penalty mode,
# ``auto`` picks its own ratio.
CLAIM_CASES: tuple[tuple[str, str, ModelConfig, str], ...] = (
    ("mnist", "mlp", ModelConfig(arch="mlp", hidden=(300, 100)), "none"),
    ("mnist", "lenet5", ModelConfig(arch="lenet5"), "none"),
    ("mnist", "mlp-narrow", ModelConfig(arch="mlp", hidden=(32, 16)), "auto"),
    ("mnist", "mlp", ModelConfig(arch="mlp", hidden=(300, 100)), "auto"),
    ("mnist", "mlp-wide", ModelConfig(arch="mlp", hidden=(1000, 300)), "auto"),
    ("digits", "mlp", ModelConfig(arch="mlp", hidden=(300, 100)), "auto"),
)


def load_dataset(name: str, mnist_dir: Path, work: Path, limit: int | None) -> dict[str, Any]:
    """Prepared train/test tensors of ``digits`` or ``mnist`` (80/20 split, seed 0).

    Args:
        name: ``digits`` (bundled) or ``mnist`` (the IDX files in ``mnist_dir``).
        mnist_dir: Directory of the MNIST IDX files.
        work: Scratch directory for the raw and prepared files.
        limit: Use only this many images (80 % train, 20 % test), or all.

    Returns:
        ``{"name", "meta", "train", "test"}``, the splits as ``TensorDataset``.
    """
    out = work / name
    if name == "digits":
        cfg = DataConfig(dataset="digits", val_fraction=0.0, test_fraction=0.2)
    else:
        if not mnist_dir.is_dir():
            raise SystemExit(f"bench: {mnist_dir} does not exist (the MNIST IDX files)")
        cfg = DataConfig(dataset="idx", idx_dir=str(mnist_dir), val_fraction=0.0, test_fraction=0.2)
    prepare_data(cfg, raw_dir=work / "raw", out_dir=out)
    meta = load_meta(out)
    train, test = load_split(out, "train"), load_split(out, "test")
    if limit:
        train = TensorDataset(*(t[: int(limit * 0.8)] for t in train.tensors))
        test = TensorDataset(*(t[: int(limit * 0.2)] for t in test.tensors))
    return {"name": name, "meta": meta, "train": train, "test": test}


def measure(model: nn.Module, data: dict[str, Any], base: dict[str, float]) -> dict[str, float]:
    """Accuracy, size and MACs of a model on the test split, with ratios to ``base``.

    Args:
        model: The network to measure.
        data: A dataset of :func:`load_dataset`.
        base: ``params`` and ``macs`` of the reference (empty: the model is the reference).

    Returns:
        ``accuracy``, ``params``, ``macs``, ``params_ratio`` and ``macs_ratio``.
    """
    _x, y = data["test"].tensors
    acc = accuracy_from_logits(predict_logits(model, data["test"], torch.device("cpu")), y)
    params, macs = float(count_params(model)), float(count_macs(model, data["meta"].in_shape))
    return {
        "accuracy": acc,
        "params": params,
        "macs": macs,
        "params_ratio": params / base["params"] if base else 1.0,
        "macs_ratio": macs / base["macs"] if base else 1.0,
    }


# What every pool worker holds, set once per process by :func:`init_worker`, read by the job
# functions (the data reaches each worker once, not with every job).
WORKER_DATA: dict[str, Any] = {}
Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


def init_worker(data: dict[str, Any], threads: int) -> None:
    """Give this process ``data`` (as :data:`WORKER_DATA`) and ``threads`` torch threads."""
    torch.set_num_threads(threads)
    WORKER_DATA.update(data)


@contextlib.contextmanager
def worker_pool(data: dict[str, Any], workers: int, threads: int = 1) -> Iterator[Mapper]:
    """An ordered ``map(fn, jobs)`` on ``workers`` spawned processes of one thread each.

    Small networks train faster on one thread per core than on two threads in turn.

    Args:
        data: What each worker holds in :data:`WORKER_DATA`.
        workers: Processes (1 or fewer: the jobs run in this process).
        threads: Torch threads when the jobs run in this process.

    Yields:
        The map: results in the jobs' order, each as soon as it and those before it end.
    """
    if workers <= 1:
        init_worker(data, threads)
        yield map
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=(data, 1)) as pool:
        yield pool.imap


# switchprune.evaluation.measure_latency times one model alone; ratios need the models in turns.
@torch.no_grad()
def interleaved_latency(
    models: dict[str, nn.Module], in_shape: tuple[int, ...], repeats: int
) -> dict[str, dict[str, float]]:
    """Median and spread of each model's forward time at batch 1 and 256, timed in turns.

    Timing the models in turns (:func:`switchprune.evaluation.interleaved_latency`), in the
    same process and moment, keeps drifts of the machine (frequency, caches, allocator state)
    out of the ratios; a time whose spread is too wide to trust is flagged ``noisy``.

    Args:
        models: The models to compare, by name.
        in_shape: Shape of one input, without the batch dimension.
        repeats: Timed rounds at each batch size.

    Returns:
        Per name, ``latency_ms_b{1,256}``, ``latency_iqr_ms_b{1,256}`` and
        ``latency_noisy_b{1,256}`` (1.0 or 0.0).
    """
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    cpu = torch.device("cpu")
    for batch in LATENCY_BATCHES:
        runs = {name: forward_pass(model, in_shape, batch, cpu) for name, model in models.items()}
        for name, timed in lib_interleaved(runs, warmup=3, repeats=repeats).items():
            out[name][f"latency_ms_b{batch}"] = timed.median_ms
            out[name][f"latency_iqr_ms_b{batch}"] = timed.iqr_ms
            out[name][f"latency_noisy_b{batch}"] = float(timed.noisy)
    return out


def record(
    data: dict[str, Any],
    arch: str,
    seed: int,
    method: str,
    scorer: str | None,
    target: tuple[str, float] | None,
    **values: Any,
) -> dict[str, Any]:
    """One row of ``results.json``.

    Args:
        data: The dataset the run used.
        arch: Name of the TNN.
        seed: The run's seed.
        method: ``unpruned``, ``ours``, ``ours+ft``, a baseline (``+ft``) or ``claim:<mode>``.
        scorer: The unit scorer of ``ours`` and the claims, else ``None``.
        target: ``(metric, ratio)``, or ``None`` without a target.
        **values: The measurements.

    Returns:
        The record.
    """
    return {
        "dataset": data["name"],
        "arch": arch,
        "method": method,
        "scorer": scorer,
        "target_metric": target[0] if target else None,
        "target_ratio": target[1] if target else None,
        "seed": seed,
        **values,
    }


def label(row: dict[str, Any]) -> str:
    """``ours[switcher]``, ``ours[magnitude]+ft``, ``slimming+ft``, ``unpruned``..."""
    if row["scorer"] and row["method"].startswith("ours"):
        return row["method"].replace("ours", f"ours[{row['scorer']}]")
    return row["method"]


@dataclasses.dataclass(frozen=True)
class Switched:
    """A switched training run, thresholded and compacted.

    Attributes:
        model: The compacted network.
        widths: Its kept width per group.
        trained: The full-width network it was cut from.
        metrics: The run's summary metrics (``epoch_seconds``...).
    """

    model: nn.Module
    widths: dict[str, int]
    trained: nn.Module
    metrics: dict[str, Any]


def run_ours(spec: ModelSpec, data: dict[str, Any], cfg: TrainConfig) -> Switched:
    """Ours: switched training, thresholding and compaction.

    Args:
        spec: Full-width spec of the TNN.
        data: A dataset of :func:`load_dataset`.
        cfg: Training configuration (scorer, target).

    Returns:
        The compacted model with its widths, the trained one and the run's metrics.
    """
    result = fit(spec, data["train"], None, cfg, switched=True, progress=False)
    assert result.factors is not None
    kept = threshold_factors(result.factors, PruneConfig())
    small = compact(result.model, result.factors, kept)
    return Switched(small, kept_widths(kept), result.model, result.metrics)


def prune_baseline(trained: nn.Module, method: str, metric: str, ratio: float) -> nn.Module:
    """A copy of a trained TNN pruned by a Torch-Pruning baseline to the target.

    Args:
        trained: Slimming's sparsely trained TNN (``slimming``) or the plain one (``l1norm``).
        method: ``slimming`` or ``l1norm``.
        metric: ``params`` or ``macs``.
        ratio: Largest allowed share of the unpruned count.

    Returns:
        The pruned copy, in eval mode.
    """
    if method == "slimming":
        importance = slimming_importance(trained)
    else:
        importance = tp.importance.MagnitudeImportance(p=1)
    pruned, _mode = prune_to_target(
        copy.deepcopy(trained), importance, target_metric=metric, target_ratio=ratio
    )
    return pruned.eval()


def fine_tuned(
    model: nn.Module, data: dict[str, Any], epochs: int, lr: float, seed: int
) -> nn.Module:
    """A copy of ``model`` fine-tuned with SGD at ``lr`` (the original is left as it was)."""
    tuned = copy.deepcopy(model)
    train_sgd(tuned, data["train"], epochs, lr=lr, seed=seed)
    return tuned


@dataclasses.dataclass(frozen=True)
class Cell:
    """One TNN and seed, trained once: what every target of the TNN starts from."""

    data: dict[str, Any]
    arch: str
    seed: int
    setting: Setting
    spec: ModelSpec
    plain: nn.Module
    slimmed: nn.Module
    base: dict[str, float]
    # The peer recipes' chosen strengths: recipe -> (metric, ratio) -> choice (see
    # ``recipes.choose``); a recipe missing here is not run.
    choices: dict[str, dict[tuple[str, float], dict[str, Any]]] = dataclasses.field(
        default_factory=dict
    )
    # Sparsely trained TNNs shared by the targets (``recipes.run_recipe``).
    sparse: dict[tuple[str, float], nn.Module] = dataclasses.field(default_factory=dict)

    @property
    def lr(self) -> float:
        """The TNN's learning rate."""
        return LEARNING_RATES[self.arch]

    @property
    def epochs(self) -> int:
        """The TNN's training epochs."""
        return self.setting.epochs_for(self.arch)

    @property
    def budget(self) -> Budget:
        """The peers' epochs, matched to ours."""
        return budget_of(train_config(self.epochs, self.seed, self.arch))

    def row(
        self, method: str, scorer: str | None, target: tuple[str, float], **values: Any
    ) -> dict[str, Any]:
        """A record of this cell (see :func:`record`)."""
        return record(self.data, self.arch, self.seed, method, scorer, target, **values)


def run_target(
    cell: Cell, target: tuple[str, float], scorers: tuple[str, ...]
) -> tuple[list[dict[str, Any]], dict[str, nn.Module]]:
    """Ours with every scorer and both baselines at one target, each also fine-tuned.

    Args:
        cell: The TNN and seed, with its trained plain and slimming networks.
        target: ``(metric, ratio)``.
        scorers: The unit scorers of ours.

    Returns:
        The records, and the models to time against each other, keyed as the records'
        labels without ``+ft`` (fine-tuning does not change a model's shape).
    """
    metric, ratio = target
    ft, lr = cell.setting.finetune_epochs, cell.lr
    timed: dict[str, nn.Module] = {"unpruned": cell.plain}
    rows: list[dict[str, Any]] = []
    for scorer in scorers:
        cfg = train_config(cell.epochs, cell.seed, cell.arch, scorer=scorer,
                           target_metric=metric, target_ratio=ratio)  # fmt: skip
        ours = run_ours(cell.spec, cell.data, cfg)
        timed[f"ours[{scorer}]"] = ours.model
        measured = measure(ours.model, cell.data, cell.base)
        seconds = ours.metrics["epoch_seconds"]
        rows.append(
            cell.row("ours", scorer, target, **measured, widths=ours.widths, epoch_seconds=seconds)
        )
        tuned = fine_tuned(ours.model, cell.data, ft, lr / 5, cell.seed)
        rows.append(cell.row("ours+ft", scorer, target, **measure(tuned, cell.data, cell.base)))
    for method in BASELINES:
        trained = cell.slimmed if method == "slimming" else cell.plain
        pruned = prune_baseline(trained, method, metric, ratio)
        timed[method] = pruned
        rows.append(cell.row(method, None, target, **measure(pruned, cell.data, cell.base)))
        tuned = fine_tuned(pruned, cell.data, ft, lr / 5, cell.seed)
        rows.append(cell.row(method + "+ft", None, target, **measure(tuned, cell.data, cell.base)))
    rows += recipe_rows(cell, target, timed)
    return rows, timed


def recipe_rows(
    cell: Cell, target: tuple[str, float], timed: dict[str, nn.Module]
) -> list[dict[str, Any]]:
    """The peer recipes at one target, with their chosen strengths, at our epoch budget.

    Args:
        cell: The TNN and seed, with the recipes' chosen strengths.
        target: ``(metric, ratio)``.
        timed: The models to time, updated in place (by recipe name).

    Returns:
        One record per recipe (``method`` is the recipe's name), with its ``strength``, the
        validation accuracy of every value tried (``grid``) and the seed they were tried on.
    """
    rows = []
    for recipe in RECIPES:
        if recipe not in cell.choices:
            continue
        chosen = cell.choices[recipe][target]
        model = run_recipe(recipe, cell.spec, cell.data["train"], target, chosen["strength"],
                           cell.budget, cell.lr, cell.seed, cell.sparse)  # fmt: skip
        timed[recipe] = model
        rows.append(cell.row(recipe, None, target, **measure(model, cell.data, cell.base),
                             strength=chosen["strength"], grid=chosen["val_accuracy"],
                             grid_seed=chosen["seed"]))  # fmt: skip
    return rows


def run_tnn(
    data: dict[str, Any],
    arch: str,
    seed: int,
    setting: Setting,
    scorers: tuple[str, ...],
    choices: dict[str, dict[tuple[str, float], dict[str, Any]]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, nn.Module]]]:
    """Every method, target and fine-tuning variant for one TNN and seed.

    Args:
        data: A dataset of :func:`load_dataset`.
        arch: Key of :data:`settings.ARCHS`.
        seed: Seeds every run.
        setting: Epochs and fine-tuning budget.
        scorers: The unit scorers of ours (a torchvision TNN runs the default only, and the
            controls run only at the setting's control targets: see
            :meth:`settings.Setting.scorers_at`).
        choices: The peer recipes' strengths per target (:func:`recipes.choose`, with the
            ``seed`` they were chosen on); none: no recipe is run.

    Returns:
        The records, and per target the models to time against each other (see
        :func:`run_target`).
    """
    meta, epochs = data["meta"], setting.epochs_for(arch)
    spec = spec_from_config(ARCHS[arch], meta.in_shape, meta.num_classes)
    plain = fit(spec, data["train"], None, train_config(epochs, seed, arch), switched=False,
                progress=False)  # fmt: skip
    base = measure(plain.model, data, {})
    rows = [record(data, arch, seed, "unpruned", None, None, **base,
                   epoch_seconds=plain.metrics["epoch_seconds"])]  # fmt: skip
    slimmed = train_slimming(spec, data["train"], epochs=epochs, lr=LEARNING_RATES[arch], seed=seed)
    cell = Cell(data, arch, seed, setting, spec, plain.model, slimmed, base, choices or {})
    groups = []
    for target in TARGETS[arch]:
        target_rows, timed = run_target(cell, target, setting.scorers_at(arch, target, scorers))
        rows += target_rows
        groups.append(timed)
    return rows, groups


def run_grid(
    data: dict[str, Any], arch: str, recipe: str, setting: Setting
) -> dict[tuple[str, float], dict[str, Any]]:
    """Choose a peer recipe's strength for every target of one TNN, on its first seed.

    Args:
        data: A dataset of :func:`load_dataset` (its training split is split again).
        arch: Key of :data:`settings.ARCHS`.
        recipe: One of :data:`recipes.RECIPES`.
        setting: The TNN's epochs and seeds.

    Returns:
        Per target, the choice (see :func:`recipes.choose`).
    """
    meta, seed = data["meta"], setting.seeds_for(arch)[0]
    spec = spec_from_config(ARCHS[arch], meta.in_shape, meta.num_classes)
    budget = budget_of(train_config(setting.epochs_for(arch), seed, arch))
    return choose(recipe, spec, data["train"], TARGETS[arch], budget, LEARNING_RATES[arch], seed)


def add_latency(
    rows: list[dict[str, Any]], groups: list[dict[str, nn.Module]], in_shape: tuple, repeats: int
) -> None:
    """Time each target's models round-robin and add latency and speedup to their records.

    Args:
        rows: The records of one :func:`run_tnn`, updated in place.
        groups: Its models to time, one group per target, in the order the records name the
            targets.
        in_shape: Shape of one input, without the batch dimension.
        repeats: Timed rounds at batch 1.
    """
    targeted = [r for r in rows if r["target_ratio"] is not None]
    # Targets in the records' order; they may hold different numbers of methods.
    targets = list(dict.fromkeys((r["target_metric"], r["target_ratio"]) for r in targeted))
    for timed, target in zip(groups, targets, strict=True):
        latency = interleaved_latency(timed, in_shape, repeats)
        for row in (r for r in targeted if (r["target_metric"], r["target_ratio"]) == target):
            timing = latency[label(row).removesuffix("+ft")]
            row.update(timing)
            for b in LATENCY_BATCHES:
                base = latency["unpruned"]
                row[f"latency_speedup_b{b}"] = base[f"latency_ms_b{b}"] / timing[f"latency_ms_b{b}"]
                # A speedup is only as trustworthy as both of its times.
                row[f"latency_noisy_b{b}"] = max(
                    base[f"latency_noisy_b{b}"], timing[f"latency_noisy_b{b}"]
                )


def run_claims(
    datasets: dict[str, dict[str, Any]], setting: Setting, seeds: tuple[int, ...]
) -> list[dict[str, Any]]:
    """(b) the no-penalty mode's compression; (c) the ratio ``compression: auto`` picks.

    Args:
        datasets: ``mnist`` and ``digits``, as :func:`load_dataset` returns them.
        setting: The epochs per dataset.
        seeds: Seeds of the runs.

    Returns:
        One ``claim:<mode>`` record per case and seed.
    """
    rows = []
    for ds, name, model_cfg, mode in CLAIM_CASES:
        data = datasets[ds]
        meta = data["meta"]
        spec = spec_from_config(model_cfg, meta.in_shape, meta.num_classes)
        for seed in seeds:
            cfg = train_config(
                setting.claim_epochs[ds],
                seed,
                "lenet5" if model_cfg.arch == "lenet5" else "mlp",
                compression=mode,
                switch_epochs_fraction=0.8,
                # The paper's mode has only the switcher's own zeros; ``auto`` uses the default.
                **({"scorer": "switcher"} if mode == "none" else {}),
            )
            ours = run_ours(spec, data, cfg)
            base = {"params": float(count_params(ours.trained)),
                    "macs": float(count_macs(ours.trained, meta.in_shape))}  # fmt: skip
            rows.append(
                record(data, name, seed, f"claim:{mode}", cfg.scorer, None,
                       **measure(ours.model, data, base), widths=ours.widths,
                       hidden=list(model_cfg.hidden) if model_cfg.arch == "mlp" else None,
                       reference_val_accuracy=ours.metrics.get("auto_reference_accuracy"))
            )  # fmt: skip
    return rows
