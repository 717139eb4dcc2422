"""``make bench``: does the switcher earn its place? Ours with each scorer against the baselines.

On MNIST (the official 10,000 test images, split 8,000 / 2,000 with a fixed seed), for every
TNN, target and seed, with the same data, epochs and fine-tuning budget:

- ``unpruned``: the plain TNN;
- ``ours`` with each scorer (``switcher``, ``magnitude``, ``random``): the same schedule
  (budget line, ramp, alternation, compaction), only the source of the unit scores differs;
- ``slimming`` and ``l1norm``: Network Slimming and L1-norm filter pruning with Torch-Pruning's
  own pruners (``bench/baselines.py``), matched to the same params or MACs target;
- each pruned model as it is and after the same fine-tuning (``+ft``).

Then the paper's claims: the no-penalty mode's compression, and ``compression: auto`` on a
narrow and a wide MLP and on digits against MNIST. ``results.json`` holds one record per run;
``results.md`` the tables and the verdict, computed from those records.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import prune_to_target, slimming_importance, train_sgd, train_slimming  # noqa: E402

from switchprune.config import DataConfig, ModelConfig, PruneConfig, TrainConfig  # noqa: E402
from switchprune.data import load_meta, load_split, prepare_data  # noqa: E402
from switchprune.evaluation import (  # noqa: E402
    accuracy_from_logits,
    count_macs,
    count_params,
    predict_logits,
    retain_freed_memory,
)
from switchprune.models import ModelSpec, spec_from_config  # noqa: E402
from switchprune.pruning import compact, kept_widths, threshold_factors  # noqa: E402
from switchprune.scoring import SCORERS  # noqa: E402
from switchprune.training import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS: dict[str, ModelConfig] = {
    "mlp": ModelConfig(arch="mlp", hidden=(300, 100)),
    "lenet5": ModelConfig(arch="lenet5"),
    # vgg11 at a quarter of the width (16..128 channels): five seeds of every method fit the
    # hour on 2 CPU cores.
    "vgg": ModelConfig(arch="vgg11", width_multiplier=0.25),
}
# (metric, ratio) targets per TNN.
TARGETS: dict[str, tuple[tuple[str, float], ...]] = {
    "mlp": (("params", 0.3), ("params", 0.13)),
    "lenet5": (("params", 0.3), ("params", 0.13)),
    "vgg": (("params", 0.3), ("params", 0.13), ("macs", 0.3)),
}
# SGD learning rate per TNN, the same for every method (LeNet-5 has no BatchNorm and diverges
# at the MLP's rate). Fine-tuning uses a fifth of it.
LEARNING_RATES = {"mlp": 0.05, "lenet5": 0.01, "vgg": 0.05}
BASELINES = ("slimming", "l1norm")


@dataclasses.dataclass(frozen=True)
class Setting:
    """How much to run."""

    seeds: tuple[int, ...]
    epochs: int
    finetune_epochs: int
    archs: tuple[str, ...]
    latency_repeats: int
    data_limit: int | None = None  # use only this many MNIST images
    claim_seeds: tuple[int, ...] = (0, 1, 2)
    claim_epochs: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"digits": 30, "mnist": 10}
    )


SETTINGS = {
    "default": Setting(seeds=(0, 1, 2, 3, 4), epochs=10, finetune_epochs=2,
                       archs=("mlp", "lenet5", "vgg"), latency_repeats=20),
    "quick": Setting(seeds=(0, 1), epochs=3, finetune_epochs=1, archs=("mlp", "lenet5", "vgg"),
                     latency_repeats=3, data_limit=2000, claim_seeds=(0,),
                     claim_epochs={"digits": 6, "mnist": 3}),
    "tiny": Setting(seeds=(0,), epochs=1, finetune_epochs=1, archs=("mlp",),
                    latency_repeats=1, data_limit=500, claim_seeds=(0,),
                    claim_epochs={"digits": 2, "mnist": 1}),
}  # fmt: skip


def train_config(epochs: int, seed: int, arch: str, **overrides: Any) -> TrainConfig:
    """The package defaults with the benchmark's budget and the TNN's learning rate."""
    return dataclasses.replace(
        TrainConfig(device="cpu", baseline=False),
        epochs=epochs,
        seed=seed,
        tnn_lr=LEARNING_RATES[arch],
        **overrides,
    )


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_dataset(name: str, mnist_dir: Path, work: Path, limit: int | None) -> dict[str, Any]:
    """Prepared train/test tensors of ``digits`` or ``mnist`` (80/20 split, seed 0)."""
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


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def measure(model: nn.Module, data: dict[str, Any], base: dict[str, float]) -> dict[str, float]:
    """Accuracy, size and MACs of a model on the test split, with ratios to ``base``."""
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


@torch.no_grad()
def interleaved_latency(
    models: dict[str, nn.Module], in_shape: tuple[int, ...], repeats: int
) -> dict[str, dict[str, float]]:
    """Median forward time of each model at batch 1 and 256, measured round-robin.

    Timing the models in turns, in the same process and moment, keeps drifts of the machine
    (frequency, caches, allocator state) out of the ratios.
    """
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch, rounds in ((1, repeats), (256, max(3, repeats // 2))):
        x = torch.randn(batch, *in_shape, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {name: [] for name in models}
        for model in models.values():
            model.eval()
            for _ in range(3):  # warm-up
                model(x)
        for _ in range(rounds):
            for name, model in models.items():
                started = time.perf_counter()
                model(x)
                times[name].append((time.perf_counter() - started) * 1000.0)
        for name in models:
            out[name][f"latency_ms_b{batch}"] = statistics.median(times[name])
    return out


# ----------------------------------------------------------------------------------------------
# One TNN and seed: every method at every target
# ----------------------------------------------------------------------------------------------


def record(
    data: dict[str, Any],
    arch: str,
    seed: int,
    method: str,
    scorer: str | None,
    target: tuple[str, float] | None,
    **values: Any,
) -> dict[str, Any]:
    """One row of ``results.json``."""
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


def run_ours(
    spec: ModelSpec, data: dict[str, Any], cfg: TrainConfig
) -> tuple[nn.Module, dict[str, int], float]:
    """Ours: switched training, thresholding and compaction; the model, widths, epoch time."""
    result = fit(spec, data["train"], None, cfg, switched=True, progress=False)
    assert result.factors is not None
    kept = threshold_factors(result.factors, PruneConfig())
    return (
        compact(result.model, result.factors, kept),
        kept_widths(kept),
        result.metrics["epoch_seconds"],
    )


def run_tnn(
    data: dict[str, Any], arch: str, seed: int, setting: Setting, scorers: tuple[str, ...]
) -> tuple[list[dict[str, Any]], list[dict[str, nn.Module]]]:
    """Every method, target and fine-tuning variant for one TNN and seed.

    Returns:
        The records, and per target the models to time against each other (keyed as the
        records' labels without ``+ft``; fine-tuning does not change a model's shape).
    """
    meta, epochs, ft = data["meta"], setting.epochs, setting.finetune_epochs
    spec = spec_from_config(ARCHS[arch], meta.in_shape, meta.num_classes)
    lr = LEARNING_RATES[arch]
    plain = fit(spec, data["train"], None, train_config(epochs, seed, arch), switched=False,
                progress=False)  # fmt: skip
    base = measure(plain.model, data, {})
    rows = [record(data, arch, seed, "unpruned", None, None, **base,
                   epoch_seconds=plain.metrics["epoch_seconds"])]  # fmt: skip
    slim_model = train_slimming(spec, data["train"], epochs=epochs, lr=lr, seed=seed)
    groups = []
    for target in TARGETS[arch]:
        metric, ratio = target
        timed: dict[str, nn.Module] = {"unpruned": plain.model}
        group: dict[str, dict[str, Any]] = {}
        for scorer in scorers:
            cfg = train_config(epochs, seed, arch, scorer=scorer, target_metric=metric,
                               target_ratio=ratio)  # fmt: skip
            small, widths, seconds = run_ours(spec, data, cfg)
            key = f"ours[{scorer}]"
            timed[key] = small
            group[key] = record(data, arch, seed, "ours", scorer, target,
                                **measure(small, data, base), widths=widths,
                                epoch_seconds=seconds)  # fmt: skip
            tuned = copy.deepcopy(small)
            train_sgd(tuned, data["train"], ft, lr=lr / 5, seed=seed)
            group[key + "+ft"] = record(data, arch, seed, "ours+ft", scorer, target,
                                        **measure(tuned, data, base))  # fmt: skip
        for method in BASELINES:
            trained = slim_model if method == "slimming" else plain.model
            importance = slimming_importance(trained) if method == "slimming" else None
            pruned = _prune(trained, importance, metric, ratio)
            timed[method] = pruned
            group[method] = record(data, arch, seed, method, None, target,
                                   **measure(pruned, data, base))  # fmt: skip
            tuned = copy.deepcopy(pruned)
            train_sgd(tuned, data["train"], ft, lr=lr / 5, seed=seed)
            group[method + "+ft"] = record(data, arch, seed, method + "+ft", None, target,
                                           **measure(tuned, data, base))  # fmt: skip
        rows += group.values()
        groups.append(timed)
    return rows, groups


def add_latency(
    rows: list[dict[str, Any]], groups: list[dict[str, nn.Module]], in_shape: tuple, repeats: int
) -> None:
    """Time each target's models round-robin and add latency and speedup to their records."""
    targeted = [r for r in rows if r["target_ratio"] is not None]
    per_target = len(targeted) // max(1, len(groups))
    for index, timed in enumerate(groups):
        latency = interleaved_latency(timed, in_shape, repeats)
        for row in targeted[index * per_target : (index + 1) * per_target]:
            timing = latency[label(row).removesuffix("+ft")]
            row.update(timing)
            for b in (1, 256):
                row[f"latency_speedup_b{b}"] = (
                    latency["unpruned"][f"latency_ms_b{b}"] / timing[f"latency_ms_b{b}"]
                )


# One process per core: small networks train faster on one thread each than on two threads in
# turn. The data reaches each worker once.
_WORKER_DATA: dict[str, Any] = {}


def _init_worker(datasets: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    _WORKER_DATA.update(datasets)


def run_job(job: tuple[str, Any, int, Setting, tuple[str, ...]]) -> tuple[Any, ...]:
    """One pool job: ``("tnn", arch, seed, ...)`` or ``("claims", None, seed, ...)``."""
    kind, arch, seed, setting, scorers = job
    t0 = time.perf_counter()
    if kind == "claims":
        rows = run_claims(_WORKER_DATA, setting, (seed,))
        return kind, arch, seed, rows, [], time.perf_counter() - t0
    rows, groups = run_tnn(_WORKER_DATA["mnist"], arch, seed, setting, scorers)
    return kind, arch, seed, rows, groups, time.perf_counter() - t0


def _prune(trained: nn.Module, importance: Any, metric: str, ratio: float) -> nn.Module:
    """A pruned copy of a trained TNN, by Torch-Pruning, at the target (``l1norm`` default)."""
    import torch_pruning as tp

    importance = importance or tp.importance.MagnitudeImportance(p=1)
    pruned, _mode = prune_to_target(
        copy.deepcopy(trained), importance, target_metric=metric, target_ratio=ratio
    )
    return pruned.eval()


# ----------------------------------------------------------------------------------------------
# The paper's claims (b) and (c)
# ----------------------------------------------------------------------------------------------


def run_claims(
    datasets: dict[str, dict[str, Any]], setting: Setting, seeds: tuple[int, ...]
) -> list[dict[str, Any]]:
    """(b) the no-penalty mode's compression; (c) the ratio ``compression: auto`` picks."""
    rows = []
    cases = [
        ("mnist", "mlp", ModelConfig(arch="mlp", hidden=(300, 100)), "none"),
        ("mnist", "lenet5", ModelConfig(arch="lenet5"), "none"),
        ("mnist", "mlp-narrow", ModelConfig(arch="mlp", hidden=(32, 16)), "auto"),
        ("mnist", "mlp", ModelConfig(arch="mlp", hidden=(300, 100)), "auto"),
        ("mnist", "mlp-wide", ModelConfig(arch="mlp", hidden=(1000, 300)), "auto"),
        ("digits", "mlp", ModelConfig(arch="mlp", hidden=(300, 100)), "auto"),
    ]
    for ds, name, model_cfg, mode in cases:
        data = datasets[ds]
        meta = data["meta"]
        spec = spec_from_config(model_cfg, meta.in_shape, meta.num_classes)
        lr = LEARNING_RATES["lenet5" if model_cfg.arch == "lenet5" else "mlp"]
        for seed in seeds:
            cfg = dataclasses.replace(
                TrainConfig(device="cpu", baseline=False),
                epochs=setting.claim_epochs[ds],
                seed=seed,
                tnn_lr=lr,
                compression=mode,
                switch_epochs_fraction=0.8,
                # The paper's mode has only the switcher's own zeros; ``auto`` uses the default.
                **({"scorer": "switcher"} if mode == "none" else {}),
            )
            result = fit(spec, data["train"], None, cfg, switched=True, progress=False)
            assert result.factors is not None
            kept = threshold_factors(result.factors, PruneConfig())
            small = compact(result.model, result.factors, kept)
            base = {"params": float(count_params(result.model)),
                    "macs": float(count_macs(result.model, meta.in_shape))}  # fmt: skip
            rows.append(
                record(data, name, seed, f"claim:{mode}", cfg.scorer, None,
                       **measure(small, data, base), widths=kept_widths(kept),
                       hidden=list(model_cfg.hidden) if model_cfg.arch == "mlp" else None,
                       reference_val_accuracy=result.metrics.get("auto_reference_accuracy"))
            )  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------
# Aggregation and the verdict
# ----------------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def label(row: dict[str, Any]) -> str:
    """``ours[switcher]``, ``ours[magnitude]+ft``, ``slimming+ft``, ``unpruned``..."""
    if row["scorer"] and row["method"].startswith("ours"):
        return row["method"].replace("ours", f"ours[{row['scorer']}]")
    return row["method"]


def cells(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, float], dict[str, list]]:
    """Rows grouped by (dataset, arch, target metric, ratio), then by method label."""
    out: dict[tuple[str, str, str, float], dict[str, list]] = {}
    unpruned = [r for r in rows if r["method"] == "unpruned"]
    for r in rows:
        if r["target_ratio"] is None:
            continue
        key = (r["dataset"], r["arch"], r["target_metric"], r["target_ratio"])
        out.setdefault(key, {}).setdefault(label(r), []).append(r)
    for key, methods in out.items():
        methods["unpruned"] = [u for u in unpruned if (u["dataset"], u["arch"]) == key[:2]]
    return out


def verdict(rows: list[dict[str, Any]], scorers: tuple[str, ...]) -> dict[str, Any]:
    """The switcher against the best fixed scorer, and ours against the baselines, per cell.

    ``within_sd``: the switcher's mean is at least the best fixed scorer's minus one standard
    deviation (the larger of the two). ``better``: its mean is higher by more than two
    standard errors of the difference.
    """
    out: dict[str, Any] = {"cells": []}
    for (ds, arch, metric, ratio), methods in cells(rows).items():
        acc = {m: [r["accuracy"] for r in rs] for m, rs in methods.items()}
        cell: dict[str, Any] = {"dataset": ds, "arch": arch, "target_metric": metric,
                                "target_ratio": ratio}  # fmt: skip
        if "switcher" in scorers and len(scorers) > 1:
            sw = acc["ours[switcher]"]
            fixed = {s: acc[f"ours[{s}]"] for s in scorers if s != "switcher"}
            best = max(fixed, key=lambda s: statistics.fmean(fixed[s]))
            diff = statistics.fmean(sw) - statistics.fmean(fixed[best])
            se = math.sqrt(_var(sw) / len(sw) + _var(fixed[best]) / len(fixed[best]))
            sd = max(math.sqrt(_var(sw)), math.sqrt(_var(fixed[best])))
            cell |= {"best_fixed": best, "switcher_minus_best": diff, "se": se,
                     "within_sd": diff >= -sd, "better": diff > 2 * se}  # fmt: skip
        unpruned = acc["unpruned"]
        for scorer in scorers:
            worst = min(acc[f"ours[{scorer}]"]) - statistics.fmean(unpruned)
            cell[f"worst_seed_drop[{scorer}]"] = -worst
            for ft in ("", "+ft"):
                mine = statistics.fmean(acc[f"ours[{scorer}]{ft}"])
                cell[f"beats_baselines[{scorer}]{ft}"] = all(
                    mine > statistics.fmean(acc[b + ft]) for b in BASELINES
                )
        out["cells"].append(cell)
    return out


def _var(values: list[float]) -> float:
    return statistics.variance(values) if len(values) > 1 else 0.0


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], scorers: tuple[str, ...]) -> str:
    """The tables of results.md, every figure computed from ``rows``."""
    lines = [
        "# switchprune benchmark",
        "",
        f"Setting `{meta['setting']}`: MNIST ({meta['n_train']:,} train / {meta['n_test']:,} test "
        f"images), seeds {meta['seeds']}, {meta['epochs']} epochs, {meta['finetune_epochs']} "
        f"fine-tuning epochs (`+ft`); {meta['machine']}; total {meta['wall_seconds'] / 60:.1f} "
        "min. Accuracy: mean ± sample standard deviation over seeds, of the compacted (or "
        "pruned) model on the test split. Ratios are against the unpruned TNN of the same seed. "
        "`ours[...]` is the same schedule with the unit scores from the learned switcher or from "
        "the controls; `slimming` and `l1norm` are Torch-Pruning's pruners at the same target.",
        "",
    ]
    for key, methods in cells(rows).items():
        ds, arch, metric, ratio = key
        lines += [
            f"## {arch}, {metric} target {ratio}",
            "",
            "| method | accuracy % | params ratio | MACs ratio | speedup b1 | speedup b256 |",
            "|---|---|---|---|---|---|",
        ]
        for name, rs in methods.items():
            acc, sd = mean_sd([100 * r["accuracy"] for r in rs])
            pr = statistics.fmean(r["params_ratio"] for r in rs)
            mr = statistics.fmean(r["macs_ratio"] for r in rs)
            s1 = statistics.fmean(r.get("latency_speedup_b1", 1.0) for r in rs)
            s256 = statistics.fmean(r.get("latency_speedup_b256", 1.0) for r in rs)
            lines.append(f"| {name} | {acc:.2f} ± {sd:.2f} | {pr:.3f} | {mr:.3f} | {s1:.2f} "
                         f"| {s256:.2f} |")  # fmt: skip
        lines.append("")
    v = verdict(rows, scorers)
    if any("best_fixed" in c for c in v["cells"]):
        lines += [
            "## Verdict: the learned switcher against the best fixed scorer",
            "",
            "| TNN, target | best fixed scorer | switcher − best (points) | 2 SE | within 1 SD "
            "| better by > 2 SE | switcher's worst seed below unpruned mean (points) |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in v["cells"]:
            lines.append(
                f"| {c['arch']}, {c['target_metric']} {c['target_ratio']} | {c['best_fixed']} "
                f"| {100 * c['switcher_minus_best']:+.2f} | {200 * c['se']:.2f} "
                f"| {'yes' if c['within_sd'] else 'no'} | {'yes' if c['better'] else 'no'} "
                f"| {100 * c['worst_seed_drop[switcher]']:.2f} |"
            )
        lines.append("")
    lines += [
        "## Ours against the Torch-Pruning baselines (mean accuracy above both)",
        "",
        "| TNN, target | " + " | ".join(f"{s} | {s}+ft" for s in scorers) + " |",
        "|---|" + "---|" * (2 * len(scorers)),
    ]
    for c in v["cells"]:
        marks = [
            "yes" if c[f"beats_baselines[{s}]{ft}"] else "no" for s in scorers for ft in ("", "+ft")
        ]
        lines.append(f"| {c['arch']}, {c['target_metric']} {c['target_ratio']} | "
                     + " | ".join(marks) + " |")  # fmt: skip
    lines.append("")
    lines += claims_table([r for r in rows if r["method"].startswith("claim:")])
    return "\n".join(lines)


def claims_table(claims: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the paper-claim runs (none when there are none)."""
    lines: list[str] = []
    if claims:
        lines += [
            "## The paper's claims: compression without a target",
            "",
            "`claim:none` is the paper's task-loss-only mode (no penalty, no target); "
            "`claim:auto` is `compression: auto` (the smallest network whose validation accuracy "
            f"stays within {TrainConfig().max_accuracy_drop:.2f} of the unpruned one in the same "
            "run).",
            "",
            "| mode | data / TNN | params ratio | accuracy % | kept widths (first seed) |",
            "|---|---|---|---|---|",
        ]
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for r in claims:
            groups.setdefault((r["method"], r["dataset"], r["arch"]), []).append(r)
        for (method, ds, arch), rs in groups.items():
            pr, pr_sd = mean_sd([r["params_ratio"] for r in rs])
            acc, sd = mean_sd([100 * r["accuracy"] for r in rs])
            lines.append(f"| {method.split(':')[1]} | {ds} / {arch} | {pr:.3f} ± {pr_sd:.3f} "
                         f"| {acc:.2f} ± {sd:.2f} | {rs[0]['widths']} |")  # fmt: skip
        lines.append("")
    return lines


def _run_jobs(
    jobs: list[tuple[str, Any, int, Setting, tuple[str, ...]]],
    datasets: dict[str, Any],
    workers: int,
) -> Any:
    """Yield each job's result as it finishes, from a pool of ``workers`` processes."""
    if workers <= 1:
        _init_worker(datasets)
        yield from map(run_job, jobs)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(datasets,)) as pool:
        yield from pool.imap_unordered(run_job, jobs)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument(
        "--mnist-dir",
        default=str(ROOT.parent / "shared" / "data" / "mnist-t10k"),
        help="directory of the MNIST IDX files",
    )
    parser.add_argument("--out", default=None, help="default: reports/bench (default setting) "
                        "or reports/bench-<setting>")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for timing")
    parser.add_argument(
        "--workers", type=int, default=2, help="training processes (1: in this process)"
    )
    parser.add_argument("--scorers", default=",".join(SCORERS), help="comma-separated")
    parser.add_argument("--no-claims", action="store_true", help="skip the paper-claim runs")
    args = parser.parse_args(argv)
    setting = SETTINGS[args.setting]
    scorers = tuple(s for s in args.scorers.split(",") if s)
    retained = retain_freed_memory()  # steady forward times
    name = "bench" if args.setting == "default" else f"bench-{args.setting}"
    out = Path(args.out) if args.out else ROOT / "reports" / name
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    latency_groups: list[tuple[list[dict[str, Any]], list[dict[str, nn.Module]]]] = []
    with tempfile.TemporaryDirectory(prefix="switchprune-bench-data-") as tmp:
        datasets = {
            ds: load_dataset(ds, Path(args.mnist_dir), Path(tmp), setting.data_limit)
            for ds in ("mnist", "digits")
        }
    mnist = datasets["mnist"]
    # Longest jobs first, so that the workers finish together.
    jobs: list[tuple[str, Any, int, Setting, tuple[str, ...]]] = [
        ("tnn", arch, seed, setting, scorers)
        for arch in sorted(setting.archs, key=lambda a: -list(ARCHS).index(a))
        for seed in setting.seeds
    ]
    if not args.no_claims:
        jobs += [("claims", None, seed, setting, scorers) for seed in setting.claim_seeds]
    for kind, arch, seed, new, groups, seconds in _run_jobs(jobs, datasets, args.workers):
        rows += new
        if groups:
            latency_groups.append((new, groups))
        print(f"bench: {kind} {arch or ''}/seed {seed}: "
              + ", ".join(f"{label(r)}@{r['target_ratio']} {100 * r['accuracy']:.2f}%"
                          for r in new if "+ft" not in r["method"])
              + f" ({seconds:.0f} s)", flush=True)  # fmt: skip
    train_seconds = time.perf_counter() - started
    torch.set_num_threads(args.threads)
    for new, groups in latency_groups:  # on a quiet machine, after training
        add_latency(new, groups, mnist["meta"].in_shape, setting.latency_repeats)
    meta = {
        "setting": args.setting,
        "seeds": list(setting.seeds),
        "epochs": setting.epochs,
        "finetune_epochs": setting.finetune_epochs,
        "n_train": len(mnist["train"]),
        "n_test": len(mnist["test"]),
        "archs": {a: dataclasses.asdict(ARCHS[a]) for a in setting.archs},
        "scorers": list(scorers),
        "default_scorer": TrainConfig().scorer,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads",
        "allocator": "freed memory retained" if retained else "system default",
        "workers": args.workers,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "verdict": verdict(rows, scorers), "records": rows}, indent=1)
        + "\n"
    )
    (out / "results.md").write_text(markdown(rows, meta, scorers) + "\n")
    print(f"bench: wrote {out / 'results.md'} in {meta['wall_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
