"""``make bench`` (second part): the switcher mechanisms tried, against the fixed scorers.

Same data, split, schedule and target as ``bench/run.py`` (MNIST 8,000 / 2,000, 10 epochs),
on the MLP at 0.13 of the parameters, where scores matter most; only the switcher's training
differs. Writes ``ablations.json`` (one record per run) and ``ablations.md`` beside the main
results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measurement import WORKER_DATA, load_dataset, measure, run_ours, worker_pool  # noqa: E402
from settings import ARCHS, MNIST_DIR, SETTINGS, out_dir, train_config  # noqa: E402

from switchprune.models import spec_from_config  # noqa: E402

# What the switcher's settings still allow. The variants the ablations rejected (no prior,
# straight-through gates, SNN steps on a held-out share) are no longer options: their figures
# are in reports/bench/ablations-removed.md, made by the commit it names.
SWITCHER_VARIANTS: dict[str, dict[str, Any]] = {
    "switcher: magnitude prior, stochastic gates T=0.1 (its defaults)": {},
    "switcher, stochastic gates T=0.3": {"gate_temperature": 0.3},
    "switcher, k=1": {"tnn_steps_per_snn_step": 1},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "magnitude (control, the default scorer)": {"scorer": "magnitude"},
    "random (control)": {"scorer": "random"},
    **{name: {"scorer": "switcher", **o} for name, o in SWITCHER_VARIANTS.items()},
}
ARCH, METRIC, RATIO = "mlp", "params", 0.13


def run_variant(job: tuple[str, int, int]) -> dict[str, Any]:
    """One variant and seed: ``(variant, seed, epochs)`` -> its record."""
    variant, seed, epochs = job
    meta = WORKER_DATA["meta"]
    spec = spec_from_config(ARCHS[ARCH], meta.in_shape, meta.num_classes)
    cfg = train_config(epochs, seed, ARCH, target_metric=METRIC, target_ratio=RATIO,
                       **VARIANTS[variant])  # fmt: skip
    ours = run_ours(spec, WORKER_DATA, cfg)
    m = measure(ours.model, WORKER_DATA, {"params": 1.0, "macs": 1.0})
    return {"variant": variant, "seed": seed, "accuracy": m["accuracy"], "params": m["params"],
            "widths": ours.widths}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run every variant over the setting's seeds and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--mnist-dir", default=str(MNIST_DIR))
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--workers", type=int, default=2, help="training processes (1: in this process)"
    )
    args = parser.parse_args(argv)
    setting = SETTINGS[args.setting]
    out = out_dir(args.setting, args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="switchprune-ablations-") as tmp:
        data = load_dataset("mnist", Path(args.mnist_dir), Path(tmp), setting.data_limit)
    jobs = [(v, seed, setting.epochs) for v in VARIANTS for seed in setting.seeds]
    with worker_pool(data, args.workers, args.threads) as run:
        records = list(run(run_variant, jobs))
    for variant in VARIANTS:
        accs = [100 * r["accuracy"] for r in records if r["variant"] == variant]
        print(f"bench: ablation {variant}: {statistics.fmean(accs):.2f}%", flush=True)
    lines = [
        f"# Switcher mechanisms ({ARCH}, {METRIC} target {RATIO}, MNIST "
        f"{len(data['train']):,} / {len(data['test']):,}, {setting.epochs} epochs, seeds "
        f"{list(setting.seeds)}; {(time.perf_counter() - started) / 60:.1f} min)",
        "",
        "| variant | accuracy % (mean ± sd) | worst seed | widths (first seed) |",
        "|---|---|---|---|",
    ]
    for variant in VARIANTS:
        rs = [r for r in records if r["variant"] == variant]
        accs = [100 * r["accuracy"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {variant} | {statistics.fmean(accs):.2f} ± {sd:.2f} | {min(accs):.2f} "
                     f"| {rs[0]['widths']} |")  # fmt: skip
    (out / "ablations.json").write_text(json.dumps({"records": records}, indent=1) + "\n")
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    print(f"bench: wrote {out / 'ablations.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
