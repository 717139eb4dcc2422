"""``make bench-scaling``: data-parallel training at 1 and 2 processes on the CPU.

For the MLP, LeNet-5 and a quarter-width ResNet-18 (small-image stem), ``torchrun
--nproc_per_node N`` runs :func:`switchprune.training.fit` (magnitude scorer, target mode) on
the same synthetic 28×28 data and global batch, one thread per process, and reports:

- training samples per second (the median epoch after the first) and the scaling efficiency
  (samples/s at N processes ÷ N × samples/s at one);
- the time of one all-reduce of the network's gradients (what DistributedDataParallel moves per
  TNN step; the switcher's few parameters add little), measured over gloo in the same group;
- the bytes all-reduced per step, also for full-width torchvision ResNet-18 and ResNet-50
  (ImageNet classifier), from which :func:`estimate` derives, on paper, the efficiency of 8
  GPUs on one node and of 2 × 8 GPUs at 100 Gb/s.

Results: ``reports/bench/scaling.json`` and ``scaling.md``. Two processes on a 2-core machine
share the cores with nothing else only on a quiet machine; the figures say what they measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {"mlp": {"hidden": (256, 128)}, "lenet5": {}, "resnet18": {"width_multiplier": 0.25}}
IN_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
# On paper: a ring all-reduce sends 2 (n - 1) / n of the gradient bytes over the slowest link.
# Per-GPU compute per step is an assumption (32 images per GPU, i.e. a global batch of 256 on
# 8 GPUs, at the training throughput of a current data-centre GPU), stated in the report.
PAPER = {
    "resnet18": {"compute_ms": 32 / 3000 * 1000},
    "resnet50": {"compute_ms": 32 / 1200 * 1000},
}
LINKS = {
    "1 node × 8 GPUs (NVLink, ~100 GB/s bus bandwidth)": (8, 100e9),
    "2 nodes × 8 GPUs (100 Gb/s between nodes)": (16, 100e9 / 8),
}


def worker(arch: str, samples: int, epochs: int, batch: int, out: Path) -> None:
    """One process of a ``torchrun`` job: train, time an all-reduce, rank 0 writes ``out``."""
    from switchprune.config import ModelConfig, TrainConfig
    from switchprune.distributed import session
    from switchprune.models import build_model, spec_from_config
    from switchprune.training import fit

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *IN_SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (samples,), generator=g)
    spec = spec_from_config(ModelConfig(arch=arch, **ARCHS[arch]), IN_SHAPE, NUM_CLASSES)
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch,
        scorer="magnitude",
        compression="target",
        target_ratio=0.5,
        baseline=False,
        device="cpu",
        threads=1,
    )
    with session(torch.device("cpu")):
        result = fit(spec, torch.utils.data.TensorDataset(x, y), None, cfg, progress=False)
        grads = sum(p.numel() for p in build_model(spec).parameters() if p.requires_grad)
        buffer = torch.zeros(grads)
        times = []
        for i in range(25):
            if dist.is_initialized():
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(buffer)
                if i >= 5:
                    times.append((time.perf_counter() - start) * 1000)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
    seconds = [r["seconds"] for r in result.history][1:] or [result.history[0]["seconds"]]
    if rank == 0:
        record = {
            "arch": arch,
            "processes": world,
            "samples_per_second": samples / statistics.median(seconds),
            "epoch_seconds": seconds,
            "gradient_parameters": grads,
            "bytes_per_step": 4 * grads,
            "all_reduce_ms": statistics.median(times) if times else 0.0,
            "steps_per_epoch": -(-samples // batch),
        }
        out.write_text(json.dumps(record))


def _torchvision_bytes() -> dict[str, int]:
    import torchvision

    return {
        name: 4 * sum(p.numel() for p in getattr(torchvision.models, name)().parameters())
        for name in ("resnet18", "resnet50")
    }


def estimate(bytes_per_step: dict[str, int]) -> list[dict[str, Any]]:
    """On-paper data-parallel efficiency of ResNet-18/50 on the :data:`LINKS` setups.

    A ring all-reduce of ``B`` bytes over ``n`` GPUs sends ``2 (n - 1) / n × B`` over the slowest
    link; with no overlap a step takes compute + all-reduce, with perfect overlap (DDP's
    buckets) the longer of the two.
    """
    rows = []
    for name, paper in PAPER.items():
        for setup, (n, bandwidth) in LINKS.items():
            comm_ms = 2 * (n - 1) / n * bytes_per_step[name] / bandwidth * 1000
            compute = paper["compute_ms"]
            rows.append(
                {
                    "network": name,
                    "setup": setup,
                    "compute_ms": compute,
                    "all_reduce_ms": comm_ms,
                    "efficiency_no_overlap": compute / (compute + comm_ms),
                    "efficiency_full_overlap": compute / max(compute, comm_ms),
                }
            )
    return rows


def _markdown(records: list[dict[str, Any]], paper: list[dict[str, Any]], meta: dict) -> str:
    lines = [
        "# Data-parallel scaling on the CPU",
        "",
        f"`bench/scaling.py` on {meta['machine']}, torch {meta['torch']}, gloo, one thread per "
        f"process, {meta['samples']} synthetic 28×28 samples, global batch {meta['batch']}, "
        f"{meta['epochs']} epochs (the first is not timed). Ran {meta['date']}.",
        "",
        "| network | gradient MB/step | samples/s, 1 process | samples/s, 2 | efficiency "
        "| all-reduce ms/step (2) | all-reduce share of a step (2) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arch in ARCHS:
        one = next(r for r in records if r["arch"] == arch and r["processes"] == 1)
        two = next(r for r in records if r["arch"] == arch and r["processes"] == 2)
        step_ms = 1000 * meta["batch"] / two["samples_per_second"]  # one global batch
        lines.append(
            f"| {arch} | {one['bytes_per_step'] / 1e6:.2f} | {one['samples_per_second']:.0f} "
            f"| {two['samples_per_second']:.0f} "
            f"| {two['samples_per_second'] / (2 * one['samples_per_second']):.2f} "
            f"| {two['all_reduce_ms']:.2f} | {two['all_reduce_ms'] / step_ms:.1%} |"
        )
    lines += [
        "",
        "## On paper: 8 and 16 GPUs",
        "",
        "Gradient bytes per step of the full-width torchvision networks (ImageNet classifier): "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in meta["torchvision_bytes"].items())
        + ". Assumed compute per step and GPU (32 images): ResNet-18 "
        f"{PAPER['resnet18']['compute_ms']:.1f} ms, ResNet-50 "
        f"{PAPER['resnet50']['compute_ms']:.1f} ms.",
        "",
        "| network | setup | compute ms | all-reduce ms | efficiency, no overlap "
        "| efficiency, full overlap |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in paper:
        lines.append(
            f"| {r['network']} | {r['setup']} | {r['compute_ms']:.1f} | {r['all_reduce_ms']:.1f} "
            f"| {r['efficiency_no_overlap']:.0%} | {r['efficiency_full_overlap']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every network at 1 and 2 processes under ``torchrun`` and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="ARCH", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.samples, args.epochs, args.batch, args.json)
        return
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    records = []
    with tempfile.TemporaryDirectory(prefix="switchprune-scaling-") as tmp:
        for arch in ARCHS:
            for n in (1, 2):
                out = Path(tmp) / f"{arch}-{n}.json"
                cmd = [torchrun, "--standalone", f"--nproc_per_node={n}", __file__]
                cmd += ["--worker", arch, "--json", str(out), "--samples", str(args.samples)]
                cmd += ["--epochs", str(args.epochs), "--batch", str(args.batch)]
                subprocess.run(cmd, check=True, env=env, cwd=ROOT)
                records.append(json.loads(out.read_text()))
                print(json.dumps(records[-1]), flush=True)
    tv_bytes = _torchvision_bytes()
    paper = estimate(tv_bytes)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "samples": args.samples,
        "batch": args.batch,
        "epochs": args.epochs,
        "date": time.strftime("%Y-%m-%d"),
        "torchvision_bytes": tv_bytes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "records": records, "paper": paper}
    (args.out / "scaling.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "scaling.md").write_text(_markdown(records, paper, meta))
    print((args.out / "scaling.md").read_text())


if __name__ == "__main__":
    main()
