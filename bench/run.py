"""``make bench``: the switcher against the methods a user would pick instead, in one run.

For every dataset, task network and seed, with the same data, epochs and fine-tuning budget:

- ``unpruned``: the plain TNN;
- ``ours``: alternating SNN/TNN training, thresholded, compacted (``ours+ft``: then fine-tuned);
  where the TNN's kept widths are multiples (``WIDTH_MULTIPLES``), ``ours-w1`` is the same
  without them;
- ``slimming@params`` / ``slimming@macs``: Network Slimming (L1 on BN γ, or on a learnable
  per-unit scale where a layer has no BatchNorm), a global threshold placed so that the pruned
  net has the parameters (or MACs) ours reached, compaction, fine-tuning;
- ``l1norm@params`` / ``l1norm@macs``: L1-norm filter pruning of the trained plain TNN (the
  smallest-norm units of every layer, one keep ratio for all layers, set to match ours),
  compaction, fine-tuning.

Ablations of the switcher's open choices run on one dataset and TNN. Results go to
``reports/bench/``: ``results.json``, ``results.md`` and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from switchprune.config import DataConfig, ModelConfig, PruneConfig, TrainConfig
from switchprune.cost import CostModel
from switchprune.data import load_meta, load_split, prepare_data
from switchprune.evaluation import (
    accuracy_from_logits,
    count_macs,
    count_params,
    predict_logits,
    retain_freed_memory,
)
from switchprune.models import ModelSpec, TaskNet, build_model, spec_from_config
from switchprune.pruning import compact, kept_widths, threshold_factors
from switchprune.training import FitResult, budget_offset, fit

ROOT = Path(__file__).resolve().parents[1]
ARCHS: dict[str, ModelConfig] = {
    "mlp": ModelConfig(arch="mlp", hidden=(300, 100)),
    "lenet5": ModelConfig(arch="lenet5"),
    # A VGG sized for the CPU: vgg11 at half the width (32..256 channels). At a quarter of the
    # width (16..128) forward time is dominated by per-layer overheads, not by MACs.
    "vgg": ModelConfig(arch="vgg11", width_multiplier=0.5),
}
# ``train.width_multiple`` of ours per TNN. CPU convolution kernels (AVX-512: 16 floats per
# vector) run widths in multiples of 16 much faster than odd ones; the VGG is also run without it
# (``ours-w1``) to show the effect. The small LeNet-5 layers lose accuracy at that granularity.
WIDTH_MULTIPLES = {"mlp": 1, "lenet5": 1, "vgg": 16}


@dataclasses.dataclass(frozen=True)
class Setting:
    """How much to run."""

    seeds: tuple[int, ...]
    epochs: dict[str, int]
    finetune_epochs: dict[str, int]
    archs: tuple[str, ...]
    datasets: tuple[str, ...]
    ablation_seeds: tuple[int, ...]
    latency_repeats: int
    mnist_limit: int | None = None  # use only this many MNIST images (quick settings)
    time_repro: bool = True


SETTINGS = {
    "default": Setting(
        seeds=(0, 1, 2),
        epochs={"digits": 30, "mnist": 10},
        finetune_epochs={"digits": 5, "mnist": 2},
        archs=("mlp", "lenet5", "vgg"),
        datasets=("digits", "mnist"),
        ablation_seeds=(0, 1, 2),
        latency_repeats=30,
    ),
    "quick": Setting(
        seeds=(0,),
        epochs={"digits": 6, "mnist": 2},
        finetune_epochs={"digits": 1, "mnist": 1},
        archs=("mlp", "lenet5", "vgg"),
        datasets=("digits", "mnist"),
        ablation_seeds=(0,),
        latency_repeats=5,
        mnist_limit=3000,
    ),
    "tiny": Setting(
        seeds=(0,),
        epochs={"digits": 2, "mnist": 1},
        finetune_epochs={"digits": 1, "mnist": 1},
        archs=("mlp",),
        datasets=("digits", "mnist"),
        ablation_seeds=(0,),
        latency_repeats=2,
        mnist_limit=600,
        time_repro=False,
    ),
}

# The switcher's configuration in the benchmark: the package defaults, one target for all nets.
TARGET_RATIO = 0.3
# SGD learning rate per TNN, the same for every method (LeNet-5 has no BatchNorm and no ReLU
# after its convolutions, and diverges at the MLP's rate). Fine-tuning uses a fifth of it.
LEARNING_RATES = {"mlp": 0.05, "lenet5": 0.01, "vgg": 0.05}
SLIMMING_L1 = 1e-4


def train_config(epochs: int, seed: int, arch: str, **overrides: Any) -> TrainConfig:
    """The package defaults with the benchmark's budget, target and the TNN's learning rate."""
    return dataclasses.replace(
        TrainConfig(device="cpu", baseline=False),
        epochs=epochs,
        seed=seed,
        target_ratio=TARGET_RATIO,
        tnn_lr=LEARNING_RATES[arch],
        **{"width_multiple": WIDTH_MULTIPLES[arch], **overrides},
    )


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_dataset(
    name: str, mnist_dir: Path, work: Path, limit: int | None
) -> dict[str, Any] | None:
    """Prepared train/test tensors of a dataset, or ``None`` (with a note) when it is absent."""
    out = work / name
    if name == "digits":
        cfg = DataConfig(dataset="digits", val_fraction=0.0, test_fraction=0.2)
    else:
        if not mnist_dir.is_dir():
            print(f"bench: skipping mnist: {mnist_dir} does not exist", flush=True)
            return None
        cfg = DataConfig(dataset="idx", idx_dir=str(mnist_dir), val_fraction=0.0, test_fraction=0.2)
    prepare_data(cfg, raw_dir=work / "raw", out_dir=out)
    meta = load_meta(out)
    train, test = load_split(out, "train"), load_split(out, "test")
    if limit:
        train = TensorDataset(*(t[: int(limit * 0.8)] for t in train.tensors))
        test = TensorDataset(*(t[: int(limit * 0.2)] for t in test.tensors))
    return {"meta": meta, "train": train, "test": test}


# ----------------------------------------------------------------------------------------------
# Training helpers for the baselines
# ----------------------------------------------------------------------------------------------


def train_plain(
    model: nn.Module,
    train: TensorDataset,
    epochs: int,
    *,
    lr: float,
    seed: int,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    extra_params: list[nn.Parameter] | None = None,
    batch_size: int = 64,
) -> list[float]:
    """SGD with momentum and a cosine schedule, as ``fit`` uses; returns seconds per epoch."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(
        [
            {"params": list(model.parameters()), "weight_decay": 5e-4},
            {"params": extra_params or [], "weight_decay": 0.0},
        ],
        lr=lr,
        momentum=0.9,
    )
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
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds.append(time.perf_counter() - started)
    model.eval()
    return seconds


def slimming_scores(model: TaskNet, scales: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Per-unit importance of Network Slimming: |γ| of the BatchNorm (or of the learned scale)."""
    modules = dict(model.named_modules())
    out = {}
    for g in model.groups:
        if g.name in scales:
            out[g.name] = scales[g.name].detach().abs()
        else:
            out[g.name] = torch.stack([modules[n].weight.detach().abs() for n in g.norms]).mean(0)
    return out


def l1norm_scores(model: TaskNet) -> dict[str, torch.Tensor]:
    """Per-unit importance of L1-norm filter pruning: the L1 norm of the unit's incoming weights."""
    modules = dict(model.named_modules())
    return {
        g.name: sum(modules[w].weight.detach().abs().flatten(1).sum(1) for w in g.writers)
        for g in model.groups
    }


def keep_global(
    scores: dict[str, torch.Tensor], costs: CostModel, metric: str, budget: float
) -> dict[str, torch.Tensor]:
    """Keep the globally highest-scored units whose network fits the budget (≥ 1 per layer)."""
    offset = budget_offset(scores, costs, metric, budget)
    kept = {}
    for name, s in scores.items():
        idx = torch.nonzero(s > offset).flatten()
        kept[name] = idx if idx.numel() else torch.argmax(s).view(1)
    return kept


def keep_uniform(
    scores: dict[str, torch.Tensor], costs: CostModel, metric: str, budget: float
) -> dict[str, torch.Tensor]:
    """Keep the same share of every layer (largest scores), the largest share that fits."""

    def kept_at(ratio: float) -> dict[str, torch.Tensor]:
        out = {}
        for name, s in scores.items():
            n = max(1, math.ceil(ratio * s.numel()))
            out[name] = torch.sort(torch.argsort(-s, stable=True)[:n]).values
        return out

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if float(costs.cost(metric, kept_widths(kept_at(mid)))) <= budget:
            lo = mid
        else:
            hi = mid
    return kept_at(lo)


def ones_like_groups(model: TaskNet) -> dict[str, torch.Tensor]:
    """Factors of 1 for every group (compaction without scaling)."""
    return {g.name: torch.ones(g.size) for g in model.groups}


# ----------------------------------------------------------------------------------------------
# One cell: a dataset, a TNN, a seed
# ----------------------------------------------------------------------------------------------


def measure(model: nn.Module, data: dict[str, Any]) -> dict[str, float]:
    """Accuracy, size and MACs of a model on the test split."""
    _x, y = data["test"].tensors
    cpu = torch.device("cpu")
    return {
        "accuracy": accuracy_from_logits(predict_logits(model, data["test"], cpu), y),
        "params": float(count_params(model)),
        "macs": float(count_macs(model, data["meta"].in_shape)),
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
    for batch, rounds in ((1, repeats), (256, max(5, repeats // 2))):
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


def train_ours(
    spec: ModelSpec, data: dict[str, Any], cfg: TrainConfig
) -> tuple[FitResult, dict[str, torch.Tensor], TaskNet]:
    """Ours: switched training, thresholding and compaction; the fit, kept units and model."""
    result = fit(spec, data["train"], None, cfg, switched=True, progress=False)
    assert result.factors is not None
    kept = threshold_factors(result.factors, PruneConfig())
    return result, kept, compact(result.model, result.factors, kept)


def run_cell(
    data: dict[str, Any], arch: str, seed: int, epochs: int, finetune: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Every method on one dataset, TNN and seed."""
    meta = data["meta"]
    spec = spec_from_config(ARCHS[arch], meta.in_shape, meta.num_classes)
    results: dict[str, dict[str, Any]] = {}

    plain = fit(
        spec, data["train"], None, train_config(epochs, seed, arch), switched=False, progress=False
    )
    base = measure(plain.model, data)
    timed: dict[str, nn.Module] = {"unpruned": plain.model}
    base["epoch_seconds"] = plain.metrics["epoch_seconds"]
    results["unpruned"] = base

    ours, kept, small = train_ours(spec, data, train_config(epochs, seed, arch))
    timed["ours"] = small  # ours+ft is the same module, fine-tuned in place: timed once
    results["ours"] = {
        **measure(small, data),
        "epoch_seconds": ours.metrics["epoch_seconds"],
        "widths": kept_widths(kept),
        "full_widths": ours.model.group_sizes(),
    }
    ft_seconds = train_plain(small, data["train"], finetune, lr=LEARNING_RATES[arch] / 5, seed=seed)
    results["ours+ft"] = {
        **measure(small, data),
        "epoch_seconds": ours.metrics["epoch_seconds"],
        "finetune_seconds": sum(ft_seconds),
    }
    if WIDTH_MULTIPLES[arch] > 1:
        odd, odd_kept, timed["ours-w1"] = train_ours(
            spec, data, train_config(epochs, seed, arch, width_multiple=1)
        )
        results["ours-w1"] = {
            **measure(timed["ours-w1"], data),
            "epoch_seconds": odd.metrics["epoch_seconds"],
            "widths": kept_widths(odd_kept),
        }

    costs = CostModel(build_model(spec))
    targets = {"params": results["ours"]["params"], "macs": results["ours"]["macs"]}

    # Network Slimming: L1 on the scaling factors during training.
    torch.manual_seed(seed)
    slim = build_model(spec)
    scales = {
        g.name: nn.Parameter(torch.ones(g.size))
        for g in slim.groups
        if all(n is None for n in g.norms)
    }
    modules = dict(slim.named_modules())
    bn_weights = [modules[n].weight for g in slim.groups for n in g.norms if n is not None]

    def l1() -> torch.Tensor:
        terms = [s.abs().sum() for s in scales.values()] + [w.abs().sum() for w in bn_weights]
        return SLIMMING_L1 * sum(terms)

    # Learned scales act as gates, set anew before every forward pass (BatchNorm γ of conv nets
    # needs no extra module).
    def with_scales(module: nn.Module, _inputs: object) -> None:
        slim.set_factors(
            {
                g.name: scales[g.name].abs() if g.name in scales else torch.ones(g.size)
                for g in slim.groups
            }
        )

    hook = slim.register_forward_pre_hook(with_scales)
    slim_seconds = train_plain(
        slim,
        data["train"],
        epochs,
        lr=LEARNING_RATES[arch],
        seed=seed,
        extra_loss=l1,
        extra_params=list(scales.values()),
    )
    hook.remove()
    slim_factors = {
        g.name: scales[g.name].detach().abs() if g.name in scales else torch.ones(g.size)
        for g in slim.groups
    }
    slim.set_factors(None)
    scores = slimming_scores(slim, scales)
    for metric in ("params", "macs"):
        keep = keep_global(scores, costs, metric, targets[metric])
        pruned = compact(slim, slim_factors, keep)
        train_plain(pruned, data["train"], finetune, lr=LEARNING_RATES[arch] / 5, seed=seed)
        timed[f"slimming@{metric}"] = pruned
        results[f"slimming@{metric}"] = {
            **measure(pruned, data),
            "epoch_seconds": statistics.median(slim_seconds),
        }

    # L1-norm filter pruning of the trained plain TNN.
    scores = l1norm_scores(plain.model)
    for metric in ("params", "macs"):
        keep = keep_uniform(scores, costs, metric, targets[metric])
        pruned = compact(plain.model, ones_like_groups(plain.model), keep)
        train_plain(pruned, data["train"], finetune, lr=LEARNING_RATES[arch] / 5, seed=seed)
        timed[f"l1norm@{metric}"] = pruned
        results[f"l1norm@{metric}"] = {
            **measure(pruned, data),
            "epoch_seconds": base["epoch_seconds"],
        }
    for name, latency in interleaved_latency(timed, meta.in_shape, repeats).items():
        results[name].update(latency)
    results["ours+ft"].update({k: v for k, v in results["ours"].items() if k.startswith("latency")})
    return results


ABLATIONS: dict[str, dict[str, Any]] = {
    "default (k=8)": {},
    "k=1": {"tnn_steps_per_snn_step": 1},
    "k=4": {"tnn_steps_per_snn_step": 4},
    "grad_into_tnn": {"detach_factors": False},
    "snn_input=rows": {"snn_input": "rows"},
    "alternation=epoch, k=1": {"alternation": "epoch", "tnn_steps_per_snn_step": 1},
    "paper: no penalty": {"compression": "none"},
    "penalty=0.05": {"compression": "penalty", "penalty": 0.05},
}


def run_ablation(
    data: dict[str, Any], arch: str, seed: int, epochs: int, name: str
) -> dict[str, float]:
    """One ablation variant of ours on one dataset, TNN and seed."""
    meta = data["meta"]
    spec = spec_from_config(ARCHS[arch], meta.in_shape, meta.num_classes)
    res, _kept, small = train_ours(spec, data, train_config(epochs, seed, arch, **ABLATIONS[name]))
    x, y = data["test"].tensors
    return {
        "accuracy": accuracy_from_logits(
            predict_logits(small, data["test"], torch.device("cpu")), y
        ),
        "params_ratio": count_params(small) / count_params(res.model),
        "macs_ratio": count_macs(small, meta.in_shape) / count_macs(res.model, meta.in_shape),
        "epoch_seconds": res.metrics["epoch_seconds"],
    }


def time_default_repro() -> float | None:
    """Wall time of the default ``dvc repro evaluate`` (the four model stages) in a fresh copy."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    with tempfile.TemporaryDirectory(prefix="switchprune-bench-") as tmp:
        dst = Path(tmp)
        for rel in files:
            if (
                rel.startswith(("reports/", "tests/"))
                or rel == "dvc.lock"
                or not (ROOT / rel).is_file()
            ):
                continue
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes((ROOT / rel).read_bytes())
        from switchprune.data import export_digits

        export_digits(dst / "data/raw/digits")
        env = {
            **os.environ,
            "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
        started = time.perf_counter()
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "dvc"), "repro", "evaluate"],
            cwd=dst,
            env=env,
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            print(f"bench: dvc repro failed:\n{proc.stderr[-2000:]}", flush=True)
            return None
        return elapsed


# ----------------------------------------------------------------------------------------------
# Aggregation and reports
# ----------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per dataset and row (``arch / method``): mean ± std over seeds, ratios to unpruned."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for cell in cells:
        ds, arch = cell["dataset"], cell["arch"]
        base = cell["methods"]["unpruned"]
        for method, m in cell["methods"].items():
            row = out.setdefault(ds, {}).setdefault(f"{arch} / {method}", {"runs": []})
            row["runs"].append(
                {
                    "accuracy": m["accuracy"],
                    "params": m["params"],
                    "macs": m["macs"],
                    "params_ratio": m["params"] / base["params"],
                    "macs_ratio": m["macs"] / base["macs"],
                    "latency_speedup_b1": base["latency_ms_b1"] / m["latency_ms_b1"],
                    "latency_speedup_b256": base["latency_ms_b256"] / m["latency_ms_b256"],
                    "train_time_ratio": m["epoch_seconds"] / base["epoch_seconds"],
                }
            )
    for rows in out.values():
        for row in rows.values():
            for key in row["runs"][0]:
                row[key] = mean_std([r[key] for r in row["runs"]])
    return out


def markdown(summary: dict[str, Any], ablations: dict[str, Any], meta: dict[str, Any]) -> str:
    """The tables of results.md."""
    lines = [
        "# switchprune benchmark",
        "",
        f"Setting `{meta['setting']}`, seeds {meta['seeds']}, epochs {meta['epochs']}, "
        f"fine-tuning epochs {meta['finetune_epochs']}; {meta['machine']}; "
        f"total {meta['wall_seconds'] / 60:.1f} min.",
        "Ratios are against the unpruned TNN of the same seed (params and MACs: smaller is "
        "better; latency speedup = unpruned / pruned median forward time, larger is better; "
        "train time ratio = median seconds per training epoch / the unpruned TNN's). "
        "Baselines are matched to the parameters (`@params`) or MACs (`@macs`) ours reached.",
        f"Ours keeps widths in multiples of {meta.get('width_multiples', {})} "
        "(`train.width_multiple`); `ours-w1` is ours without. Latency: batch 1 and 256, "
        "channels-first float32, all models of a cell timed in turns, allocator: "
        f"{meta.get('allocator', 'system default')}.",
        "",
    ]
    if meta.get("repro_seconds") is not None:
        lines += [
            f"Wall time of the default `dvc repro` (four model stages, digits): "
            f"{meta['repro_seconds']:.1f} s.",
            "",
        ]
    for ds, rows in summary.items():
        lines += [
            f"## {ds}",
            "",
            "| TNN / method | accuracy % | params | MACs | params ratio | MACs ratio "
            "| speedup b1 | speedup b256 | train time ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            acc, acc_sd = r["accuracy"]
            lines.append(
                f"| {name} | {100 * acc:.2f} ± {100 * acc_sd:.2f} | {r['params'][0]:,.0f} "
                f"| {r['macs'][0]:,.0f} | {r['params_ratio'][0]:.3f} | {r['macs_ratio'][0]:.3f} "
                f"| {r['latency_speedup_b1'][0]:.2f} | {r['latency_speedup_b256'][0]:.2f} "
                f"| {r['train_time_ratio'][0]:.2f} |"
            )
        lines.append("")
    if ablations:
        lines += [
            f"## Ablations ({ablations['dataset']} / {ablations['arch']}, "
            "ours without fine-tuning)",
            "",
            "| variant | accuracy % | params ratio | MACs ratio | epoch seconds |",
            "|---|---|---|---|---|",
        ]
        for name, r in ablations["variants"].items():
            lines.append(
                f"| {name} | {100 * r['accuracy'][0]:.2f} ± {100 * r['accuracy'][1]:.2f} "
                f"| {r['params_ratio'][0]:.3f} | {r['macs_ratio'][0]:.3f} "
                f"| {r['epoch_seconds'][0]:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], cells: list[dict[str, Any]], out: Path) -> list[str]:
    """Accuracy against MACs for every method; kept width per layer for ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colours = {
        "unpruned": "black",
        "ours": "tab:blue",
        "ours+ft": "tab:cyan",
        "ours-w1": "tab:purple",
        "slimming": "tab:orange",
        "l1norm": "tab:green",
    }
    for ds, rows in summary.items():
        archs = sorted({name.split(" / ")[0] for name in rows}, key=list(ARCHS).index)
        fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 4), squeeze=False)
        for ax, arch in zip(axes[0], archs, strict=True):
            mine = {n.split(" / ")[1]: r for n, r in rows.items() if n.startswith(f"{arch} / ")}
            # Zoom on the useful range; a collapsed result is drawn on the floor with its value.
            floor = 100 * mine["unpruned"]["accuracy"][0] - 5
            for method, r in mine.items():
                acc, sd = 100 * r["accuracy"][0], 100 * r["accuracy"][1]
                colour = colours.get(method, colours[method.split("@")[0]])
                marker = "o" if "@params" in method or "@" not in method else "s"
                if acc < floor:
                    ax.plot(r["macs"][0], floor, marker="v", color=colour, linestyle="none")
                    ax.annotate(f"{acc:.0f}%", (r["macs"][0], floor), fontsize=7)
                else:
                    ax.errorbar(
                        r["macs"][0],
                        acc,
                        yerr=sd,
                        marker=marker,
                        color=colour,
                        linestyle="none",
                        label=method,
                    )
            ax.set_ylim(bottom=floor - 0.5)
            ax.set_xscale("log")
            ax.set_xlabel("MACs per sample")
            ax.set_title(f"{ds} / {arch}")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("test accuracy (%)")
        fig.tight_layout()
        path = out / f"accuracy_vs_macs_{ds}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    for cell in cells:
        if cell["seed"] != cells[0]["seed"]:
            continue
        ours = cell["methods"]["ours"]
        names = list(ours["full_widths"])
        fig, ax = plt.subplots(figsize=(max(4, len(names) * 0.6), 3.5))
        ax.bar(names, [ours["full_widths"][n] for n in names], color="lightgray", label="full")
        ax.bar(names, [ours["widths"][n] for n in names], color="tab:blue", label="kept (ours)")
        ax.set_ylabel("units")
        ax.set_title(f"{cell['dataset']} / {cell['arch']}: kept width per layer")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
        fig.tight_layout()
        path = out / f"widths_{cell['dataset']}_{cell['arch']}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write reports/bench/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument(
        "--mnist-dir",
        default=str(ROOT.parent / "shared" / "data" / "mnist-t10k"),
        help="directory of the MNIST IDX files (skipped when absent)",
    )
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    setting = SETTINGS[args.setting]
    torch.set_num_threads(args.threads)
    retained = retain_freed_memory()  # steady forward times, see its docstring
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells: list[dict[str, Any]] = []
    ablations: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="switchprune-bench-data-") as tmp:
        datasets = {}
        for name in setting.datasets:
            data = load_dataset(
                name,
                Path(args.mnist_dir),
                Path(tmp),
                setting.mnist_limit if name == "mnist" else None,
            )
            if data is not None:
                datasets[name] = data
        for ds, data in datasets.items():
            for arch in setting.archs:
                for seed in setting.seeds:
                    t0 = time.perf_counter()
                    methods = run_cell(
                        data,
                        arch,
                        seed,
                        setting.epochs[ds],
                        setting.finetune_epochs[ds],
                        setting.latency_repeats,
                    )
                    cells.append({"dataset": ds, "arch": arch, "seed": seed, "methods": methods})
                    print(
                        f"bench: {ds}/{arch}/seed {seed}: "
                        + ", ".join(f"{m} {100 * r['accuracy']:.2f}%" for m, r in methods.items())
                        + f" ({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
        # Ablations on the first dataset with the smallest TNN of the setting.
        ds = next(iter(datasets))
        arch = setting.archs[0]
        variants = {}
        for name in ABLATIONS:
            runs = [
                run_ablation(datasets[ds], arch, seed, setting.epochs[ds], name)
                for seed in setting.ablation_seeds
            ]
            variants[name] = {k: mean_std([r[k] for r in runs]) for k in runs[0]}
            print(
                f"bench: ablation {name}: {100 * variants[name]['accuracy'][0]:.2f}%, "
                f"params ratio {variants[name]['params_ratio'][0]:.3f}",
                flush=True,
            )
        ablations = {"dataset": ds, "arch": arch, "variants": variants}
    repro = time_default_repro() if setting.time_repro else None
    meta = {
        "setting": args.setting,
        "seeds": list(setting.seeds),
        "epochs": setting.epochs,
        "finetune_epochs": setting.finetune_epochs,
        "target_ratio": TARGET_RATIO,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads",
        "allocator": "freed memory retained" if retained else "system default",
        "width_multiples": WIDTH_MULTIPLES,
        "wall_seconds": time.perf_counter() - started,
        "repro_seconds": repro,
        "skipped": [d for d in setting.datasets if d not in {c["dataset"] for c in cells}],
    }
    summary = summarise(cells)
    meta["plots"] = plot(summary, cells, out)
    (out / "results.json").write_text(
        json.dumps(
            {"meta": meta, "summary": summary, "cells": cells, "ablations": ablations}, indent=1
        )
        + "\n"
    )
    (out / "results.md").write_text(markdown(summary, ablations, meta) + "\n")
    print(f"bench: wrote {out / 'results.md'} in {meta['wall_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
