"""torchvision networks on the benchmark's MNIST split: pruned to a MAC budget against unpruned.

For each architecture (small-image stem) and seed: the unpruned TNN and the switched TNN
(default scorer, ``target_metric: macs``) are trained with the same epochs and learning rate;
the switched one is thresholded and compacted. Reported: test accuracy of both, the MAC and
parameter ratios, and batch-1 / batch-256 CPU latency of both, timed round-robin in one process.

Usage: ``python bench/archs.py [--archs resnet18 mobilenet_v2] [--epochs 3] [--seeds 0]``.
Writes ``reports/bench/archs.json`` and ``archs.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measurement import interleaved_latency, load_dataset, measure, run_ours  # noqa: E402
from settings import MNIST_DIR, ROOT  # noqa: E402

from switchprune.config import ModelConfig, TrainConfig, recipe_lr  # noqa: E402
from switchprune.models import spec_from_config  # noqa: E402
from switchprune.training import fit  # noqa: E402


def run_arch(
    arch: str, data: dict[str, Any], epochs: int, seed: int, ratio: float, width: float = 1.0
) -> dict[str, Any]:
    """One architecture and seed: unpruned and pruned, trained alike, measured alike."""
    meta = data["meta"]
    model_cfg = ModelConfig(arch=arch, width_multiplier=width)
    spec = spec_from_config(model_cfg, meta.in_shape, meta.num_classes)
    cfg = TrainConfig(
        device="cpu",
        baseline=False,
        epochs=epochs,
        seed=seed,
        target_metric="macs",
        target_ratio=ratio,
    )
    started = time.perf_counter()
    plain = fit(spec, data["train"], None, cfg, switched=False, progress=False).model.eval()
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    small = run_ours(spec, data, cfg).model
    switched_s = time.perf_counter() - started
    base = measure(plain, data, {})
    pruned = measure(small, data, base)
    latency = interleaved_latency({"unpruned": plain, "pruned": small}, meta.in_shape, 10)
    mac_reduction = base["macs"] / pruned["macs"]
    speedup = latency["unpruned"]["latency_ms_b256"] / latency["pruned"]["latency_ms_b256"]
    return {
        "arch": arch,
        "width_multiplier": width,
        "seed": seed,
        "epochs": epochs,
        "tnn_lr": recipe_lr(cfg.tnn_lr, arch),
        "unpruned_accuracy": base["accuracy"],
        "pruned_accuracy": pruned["accuracy"],
        "accuracy_drop_points": 100 * (base["accuracy"] - pruned["accuracy"]),
        "macs_ratio": pruned["macs_ratio"],
        "params_ratio": pruned["params_ratio"],
        "mac_reduction": mac_reduction,
        "speedup_b256": speedup,
        "speedup_b1": latency["unpruned"]["latency_ms_b1"] / latency["pruned"]["latency_ms_b1"],
        "speedup_over_mac_reduction": speedup / mac_reduction,
        "latency_ms": latency,
        "train_seconds": {"unpruned": plain_s, "switched": switched_s},
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table of the README."""
    lines = [
        f"# torchvision networks on MNIST ({meta['n_train']} / {meta['n_test']}), "
        f"MACs target {meta['ratio']}, {meta['epochs']} epochs",
        "",
        "| arch | seed | unpruned % | pruned % | drop (points) | MACs ratio | params ratio "
        "| speedup b256 | speedup b1 | speedup ÷ MAC reduction |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['seed']} | {100 * r['unpruned_accuracy']:.2f} "
            f"| {100 * r['pruned_accuracy']:.2f} | {r['accuracy_drop_points']:+.2f} "
            f"| {r['macs_ratio']:.3f} | {r['params_ratio']:.3f} | {r['speedup_b256']:.2f}× "
            f"| {r['speedup_b1']:.2f}× | {r['speedup_over_mac_reduction']:.2f} |"
        )
    lines += ["", f"Machine: {meta['machine']}; torch threads {meta['threads']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the architectures and write the reports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--limit", type=int, default=None, help="samples (quick runs)")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier (quick runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        data = load_dataset("mnist", MNIST_DIR, Path(work), args.limit)
    rows = []
    for arch in args.archs:
        for seed in args.seeds:
            rows.append(run_arch(arch, data, args.epochs, seed, args.ratio, args.width))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "latency_ms"}), flush=True)
    meta = {
        "n_train": len(data["train"]),
        "n_test": len(data["test"]),
        "ratio": args.ratio,
        "epochs": args.epochs,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "threads": torch.get_num_threads(),
        "median_speedup_over_mac_reduction": statistics.median(
            r["speedup_over_mac_reduction"] for r in rows
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "archs.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / "archs.md").write_text(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
