"""``make bench-latency``: does asking for a latency give that latency, and at what accuracy?

For torchvision ResNet-18 and MobileNetV2 (a quarter of the width, small-image stems) on the
MNIST split of ``make bench``, per seed, in one process at a fixed thread count:

1. the latency table (:mod:`switchprune.latency`) is measured, before any training, on this
   CPU with PyTorch, batch 256 (cached: the runs read it);
2. ours is trained with ``train.target_metric: latency`` at each target (0.5 and 0.33: two and
   three times faster), and with ``macs`` at a grid of MACs targets;
3. every compacted network is timed against the unpruned one, in turns
   (:func:`switchprune.evaluation.interleaved_latency`, 20 rounds, the noisy flag of each).

A latency run's accuracy is set against the MACs runs' accuracy at the same measured speedup,
read off the line through the MACs runs of its seed (interpolated between the two whose
speedups surround it, extended past the ends). ``latency.json`` holds one record per run and
the summary; ``latency.md`` the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measurement import load_dataset, measure, run_ours  # noqa: E402
from settings import ARCHS, MNIST_DIR, ROOT, TORCHVISION, train_config  # noqa: E402

from switchprune import latency  # noqa: E402
from switchprune.evaluation import (  # noqa: E402
    forward_pass,
    interleaved_latency,
    retain_freed_memory,
)
from switchprune.models import build_model, spec_from_config  # noqa: E402


@dataclasses.dataclass(frozen=True)
class LatencySetting:
    """How much to run."""

    seeds: tuple[int, ...]
    epochs: int
    latency_targets: tuple[float, ...]
    macs_targets: tuple[float, ...]
    archs: tuple[str, ...] = TORCHVISION
    repeats: int = 20
    data_limit: int | None = None


SETTINGS = {
    "default": LatencySetting(
        seeds=(0, 1, 2), epochs=3, latency_targets=(0.5, 0.33), macs_targets=(0.5, 0.3, 0.2)
    ),
    "tiny": LatencySetting(
        seeds=(0,),
        epochs=1,
        latency_targets=(0.5,),
        macs_targets=(0.6, 0.3),
        archs=("resnet18",),
        repeats=3,
        data_limit=200,
    ),
}


def run_cell(
    arch: str, seed: int, data: dict[str, Any], setting: LatencySetting
) -> list[dict[str, Any]]:
    """Every target of one TNN and seed: train, compact, time against the unpruned network.

    Returns:
        One record per target: ``arch, seed, target_metric, target_ratio, accuracy``, the
        measured speedup with its noisy flag, and for a latency target the predicted one.
    """
    meta = data["meta"]
    spec = spec_from_config(ARCHS[arch], meta.in_shape, meta.num_classes)
    torch.manual_seed(seed)
    unpruned = build_model(spec).eval()
    base = measure(unpruned, data, {})
    targets = [("latency", r) for r in setting.latency_targets]
    targets += [("macs", r) for r in setting.macs_targets]
    rows = []
    for metric, ratio in targets:
        cfg = train_config(setting.epochs, seed, arch, target_metric=metric, target_ratio=ratio)
        started = time.perf_counter()
        ours = run_ours(spec, data, cfg)
        row = {
            "arch": arch,
            "seed": seed,
            "target_metric": metric,
            "target_ratio": ratio,
            **measure(ours.model, data, base),
            "train_seconds": time.perf_counter() - started,
        }
        if "train_latency_ratio" in ours.metrics:
            row["predicted_speedup"] = 1.0 / ours.metrics["train_latency_ratio"]
        row.update(_speedup(unpruned, ours.model, meta.in_shape, setting.repeats))
        rows.append(row)
        print(f"bench-latency: {arch}/seed {seed} {metric} {ratio}: "
              f"{100 * row['accuracy']:.2f}%, speedup {row['speedup']:.2f}"
              + (f" (predicted {row['predicted_speedup']:.2f})" if "predicted_speedup" in row
                 else ""), flush=True)  # fmt: skip
    return rows


def _speedup(
    unpruned: torch.nn.Module, small: torch.nn.Module, in_shape: tuple[int, ...], repeats: int
) -> dict[str, float]:
    """Batch-256 time of both networks in turns, their ratio, and whether it can be trusted."""
    cpu = torch.device("cpu")
    runs = {
        "before": forward_pass(unpruned, in_shape, latency.BATCH, cpu),
        "after": forward_pass(small, in_shape, latency.BATCH, cpu),
    }
    timed = interleaved_latency(runs, warmup=3, repeats=repeats)
    before, after = timed["before"], timed["after"]
    return {
        "ms_before": before.median_ms,
        "ms_after": after.median_ms,
        "iqr_ms_before": before.iqr_ms,
        "iqr_ms_after": after.iqr_ms,
        "speedup": before.median_ms / after.median_ms,
        "noisy": float(before.noisy or after.noisy),
    }


def at_equal_speedup(macs_rows: list[dict[str, Any]], speedup: float) -> float:
    """The MACs runs' accuracy at ``speedup``, on the line through them (sorted by speedup).

    Raises:
        ValueError: Fewer than two MACs runs.
    """
    points = sorted((r["speedup"], r["accuracy"]) for r in macs_rows)
    if len(points) < 2:
        raise ValueError("at least two MACs targets are needed to compare at equal speedup")
    i = 0
    while i < len(points) - 2 and points[i + 1][0] < speedup:
        i += 1
    (s0, a0), (s1, a1) = points[i], points[i + 1]
    return a0 if s1 == s0 else a0 + (a1 - a0) * (speedup - s0) / (s1 - s0)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per TNN and latency target, over the seeds: speedups and accuracies (mean, sd).

    Returns:
        One entry per TNN and target: requested, measured and predicted speedup, their
        relative errors, the accuracy and the MACs runs' accuracy at the same speedup.
    """
    out = []
    keys = sorted({(r["arch"], r["target_ratio"]) for r in rows if r["target_metric"] == "latency"})
    for arch, ratio in keys:
        runs = [r for r in rows if (r["arch"], r["target_ratio"], r["target_metric"]) ==
                (arch, ratio, "latency")]  # fmt: skip
        paired = []
        for r in runs:
            macs = [m for m in rows if (m["arch"], m["seed"], m["target_metric"]) ==
                    (arch, r["seed"], "macs")]  # fmt: skip
            paired.append(at_equal_speedup(macs, r["speedup"]))
        measured = [r["speedup"] for r in runs]
        predicted = [r["predicted_speedup"] for r in runs]
        out.append({
            "arch": arch,
            "target_ratio": ratio,
            "requested_speedup": 1.0 / ratio,
            "measured_speedup": _mean_sd(measured),
            "predicted_speedup": _mean_sd(predicted),
            "measured_vs_requested": statistics.fmean(m * ratio - 1.0 for m in measured),
            "predicted_vs_measured": statistics.fmean(
                p / m - 1.0 for p, m in zip(predicted, measured, strict=True)
            ),
            "accuracy": _mean_sd([r["accuracy"] for r in runs]),
            "macs_accuracy_at_equal_speedup": _mean_sd(paired),
            "noisy_runs": sum(r["noisy"] > 0 for r in runs),
            "runs": len(runs),
        })  # fmt: skip
    return out


def _mean_sd(values: list[float]) -> list[float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return [statistics.fmean(values), sd]


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The summary as a Markdown table, with how it was measured."""
    lines = [
        "# Latency targets",
        "",
        f"{meta['machine']}; batch {latency.BATCH}, PyTorch, {meta['threads']} threads; "
        f"seeds {meta['seeds']}, {meta['epochs']} epochs, MNIST ({meta['n_train']:,} train / "
        f"{meta['n_test']:,} test images); total {meta['wall_seconds'] / 60:.1f} min. Measured: "
        "the median of 20 batch-256 passes of the unpruned and the compacted network, timed in "
        "turns. The MACs runs' accuracy is read at the latency run's measured speedup on the "
        "line through its seed's MACs runs. Mean ± sd over seeds.",
        "",
        "| TNN | requested | measured | measured ÷ requested − 1 | predicted | predicted ÷ "
        "measured − 1 | accuracy % | MACs target at that speedup % | noisy runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        (m, msd), (p, psd) = s["measured_speedup"], s["predicted_speedup"]
        (a, asd), (b, bsd) = s["accuracy"], s["macs_accuracy_at_equal_speedup"]
        lines.append(
            f"| {s['arch']} | {s['requested_speedup']:.2f}× | {m:.2f} ± {msd:.2f}× | "
            f"{100 * s['measured_vs_requested']:+.1f} % | {p:.2f} ± {psd:.2f}× | "
            f"{100 * s['predicted_vs_measured']:+.1f} % | {100 * a:.2f} ± {100 * asd:.2f} | "
            f"{100 * b:.2f} ± {100 * bsd:.2f} | {s['noisy_runs']}/{s['runs']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the latency benchmark and write ``latency.json`` and ``latency.md``.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--mnist-dir", default=str(MNIST_DIR))
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads, fixed throughout")
    args = parser.parse_args(argv)
    setting = SETTINGS[args.setting]
    torch.set_num_threads(args.threads)
    retained = retain_freed_memory()  # steady forward times, as evaluate and the table time
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="switchprune-bench-latency-") as tmp:
        data = load_dataset("mnist", Path(args.mnist_dir), Path(tmp), setting.data_limit)
        # Tables measured in this run, on this machine as it is now: not an older cache's.
        before = os.environ.get(latency.CACHE_ENV)
        os.environ[latency.CACHE_ENV] = str(Path(tmp) / "cache")
        try:
            rows = [
                r
                for a in setting.archs
                for s in setting.seeds
                for r in run_cell(a, s, data, setting)
            ]
        finally:
            if before is None:
                os.environ.pop(latency.CACHE_ENV, None)
            else:
                os.environ[latency.CACHE_ENV] = before
    meta = {
        "setting": args.setting,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": args.threads,
        "retained_memory": retained,
        "seeds": list(setting.seeds),
        "epochs": setting.epochs,
        "n_train": len(data["train"]),
        "n_test": len(data["test"]),
        "wall_seconds": time.perf_counter() - started,
    }
    summary = summarize(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta, "summary": summary, "runs": rows}
    (out / "latency.json").write_text(json.dumps(body, indent=2) + "\n")
    (out / "latency.md").write_text(markdown(summary, meta))
    print(f"bench-latency: wrote {out / 'latency.md'} in {meta['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
