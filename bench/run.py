"""``make bench``: does the switcher earn its place? Ours with each scorer against the baselines.

On MNIST (the official 10,000 test images, split 8,000 / 2,000 with a fixed seed), for every
TNN, target and seed, with the same data, epochs and fine-tuning budget:

- ``unpruned``: the plain TNN;
- ``ours`` with each scorer (``switcher``, ``magnitude``, ``group_norm``, ``random``): the same
  schedule (budget line, ramp, alternation, compaction), only the source of the unit scores
  differs (the torchvision TNNs: the default scorer only);
- ``slimming`` and ``l1norm``: Network Slimming and L1-norm filter pruning with Torch-Pruning's
  own pruners (``bench/baselines.py``), one shot after training, matched to the same params or
  MACs target: the weak references;
- each of those pruned models as it is and after the same fine-tuning (``+ft``);
- the peers at their best (``bench/recipes.py``): ``depgraph``, ``slimming-recipe`` and
  ``iterative``, their authors' recipes at the same target and the same epochs as ours, each
  with its strength chosen first, per TNN and target, on a validation split of one seed.

Then the paper's claims: the no-penalty mode's compression, and ``compression: auto`` on a
narrow and a wide MLP and on digits against MNIST. ``results.json`` holds one record per run;
``results.md`` the tables and the verdict, computed from those records.

The runs are in ``bench/measurement.py``, the tables in ``bench/report.py``, the settings in
``bench/settings.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measurement import (  # noqa: E402
    WORKER_DATA,
    add_latency,
    label,
    load_dataset,
    run_claims,
    run_grid,
    run_tnn,
    worker_pool,
)
from recipes import GRIDS, RECIPES  # noqa: E402
from report import write_results  # noqa: E402
from settings import ARCHS, MNIST_DIR, SETTINGS, Setting, out_dir  # noqa: E402

from switchprune.config import TrainConfig  # noqa: E402
from switchprune.evaluation import retain_freed_memory  # noqa: E402
from switchprune.scoring import SCORERS  # noqa: E402

# (kind, arch, seed or recipe, setting, scorers, the arch's recipe choices)
Job = tuple[str, Any, Any, Setting, tuple[str, ...], dict[str, Any]]
Rows = list[dict[str, Any]]
Choices = dict[str, dict[str, dict[tuple[str, float], dict[str, Any]]]]


def run_job(job: Job) -> tuple[Any, ...]:
    """One pool job: ``("tnn", arch, seed, ...)``, ``("grid", arch, recipe, ...)`` or claims.

    Args:
        job: ``(kind, arch, seed or recipe, setting, scorers, choices)``.

    Returns:
        ``(kind, arch, seed or recipe, records or choice, models to time per target,
        seconds)``.
    """
    kind, arch, key, setting, scorers, choices = job
    t0 = time.perf_counter()
    if kind == "claims":
        rows = run_claims(WORKER_DATA, setting, (key,))
        return kind, arch, key, rows, [], time.perf_counter() - t0
    if kind == "grid":
        chosen = run_grid(WORKER_DATA["mnist"], arch, key, setting)
        return kind, arch, key, chosen, [], time.perf_counter() - t0
    rows, groups = run_tnn(WORKER_DATA["mnist"], arch, key, setting, scorers, choices)
    return kind, arch, key, rows, groups, time.perf_counter() - t0


def _longest_first(archs: tuple[str, ...]) -> list[str]:
    return sorted(archs, key=lambda a: -list(ARCHS).index(a))


def _grid_jobs(setting: Setting, recipes: tuple[str, ...]) -> list[Job]:
    """The strength selection of every recipe and TNN, longest first."""
    return [("grid", arch, recipe, setting, (), {})
            for arch in _longest_first(setting.archs) for recipe in recipes]  # fmt: skip


def _jobs(setting: Setting, scorers: tuple[str, ...], claims: bool, choices: Choices) -> list[Job]:
    """Every TNN and seed, longest first so that the workers finish together, then the claims."""
    jobs: list[Job] = [
        ("tnn", arch, seed, setting, scorers, choices.get(arch, {}))
        for arch in _longest_first(setting.archs)
        for seed in setting.seeds_for(arch)
    ]
    if claims:
        jobs += [("claims", None, seed, setting, scorers, {}) for seed in setting.claim_seeds]
    return jobs


def train_all(
    setting: Setting,
    scorers: tuple[str, ...],
    recipes: tuple[str, ...],
    claims: bool,
    datasets: dict[str, Any],
    workers: int,
) -> tuple[Rows, list[tuple[Rows, list[dict[str, nn.Module]]]], Choices]:
    """Choose the recipes' strengths, then run every TNN and seed, printing a line for each.

    Args:
        setting: What to run.
        scorers: The unit scorers of ours.
        recipes: The peer recipes to run.
        claims: Also run the paper-claim cases.
        datasets: ``mnist`` and ``digits``.
        workers: Training processes (1: in this process).

    Returns:
        Every record; per TNN job its records with the models to time; the recipes' choices.
    """
    rows: Rows = []
    latency_groups: list[tuple[Rows, list[dict[str, nn.Module]]]] = []
    choices: Choices = {}
    with worker_pool(datasets, workers) as run:
        for _kind, arch, recipe, chosen, _, seconds in run(run_job, _grid_jobs(setting, recipes)):
            choices.setdefault(arch, {})[recipe] = chosen
            print(f"bench: grid {arch}/{recipe}: "
                  + ", ".join(f"{m} {r}: {c['strength']:g}" for (m, r), c in chosen.items())
                  + f" ({seconds:.0f} s)", flush=True)  # fmt: skip
        for kind, arch, seed, new, groups, seconds in run(
            run_job, _jobs(setting, scorers, claims, choices)
        ):
            rows += new
            if groups:
                latency_groups.append((new, groups))
            print(f"bench: {kind} {arch or ''}/seed {seed}: "
                  + ", ".join(f"{label(r)}@{r['target_ratio']} {100 * r['accuracy']:.2f}%"
                              for r in new if "+ft" not in r["method"])
                  + f" ({seconds:.0f} s)", flush=True)  # fmt: skip
    return rows, latency_groups, choices


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``bench/run.py``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument(
        "--mnist-dir", default=str(MNIST_DIR), help="directory of the MNIST IDX files"
    )
    parser.add_argument("--out", default=None, help="default: reports/bench (default setting) "
                        "or reports/bench-<setting>")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for timing")
    parser.add_argument(
        "--workers", type=int, default=2, help="training processes (1: in this process)"
    )
    parser.add_argument("--scorers", default=",".join(SCORERS), help="comma-separated")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="the peer recipes, comma-separated (empty: none)")  # fmt: skip
    parser.add_argument("--no-claims", action="store_true", help="skip the paper-claim runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    setting = SETTINGS[args.setting]
    scorers = tuple(s for s in args.scorers.split(",") if s)
    recipes = tuple(r for r in args.recipes.split(",") if r)
    if unknown := set(recipes) - set(RECIPES):
        raise SystemExit(f"bench: unknown recipes {sorted(unknown)} (known: {list(RECIPES)})")
    retained = retain_freed_memory()  # steady forward times
    out = out_dir(args.setting, args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="switchprune-bench-data-") as tmp:
        datasets = {
            ds: load_dataset(ds, Path(args.mnist_dir), Path(tmp), setting.data_limit)
            for ds in ("mnist", "digits")
        }
    mnist = datasets["mnist"]
    rows, latency_groups, choices = train_all(
        setting, scorers, recipes, not args.no_claims, datasets, args.workers
    )
    train_seconds = time.perf_counter() - started
    torch.set_num_threads(args.threads)
    for new, groups in latency_groups:  # on a quiet machine, after training
        add_latency(new, groups, mnist["meta"].in_shape, setting.latency_repeats)
    meta = {
        "setting": args.setting,
        "seeds": list(setting.seeds),
        "epochs": setting.epochs,
        "finetune_epochs": setting.finetune_epochs,
        "arch_seeds": {a: list(setting.seeds_for(a)) for a in setting.archs},
        "arch_epochs": {a: setting.epochs_for(a) for a in setting.archs},
        "control_targets": {a: [list(t) for t in ts] for a, ts in setting.control_targets.items()},
        "n_train": len(mnist["train"]),
        "n_test": len(mnist["test"]),
        "archs": {a: dataclasses.asdict(ARCHS[a]) for a in setting.archs},
        "scorers": list(scorers),
        "recipes": list(recipes),
        "recipe_grids": {r: list(GRIDS[r]) for r in recipes},
        "recipe_choices": [
            {"arch": arch, "recipe": recipe, "target_metric": m, "target_ratio": ratio, **c}
            for arch, by_recipe in choices.items()
            for recipe, by_target in by_recipe.items()
            for (m, ratio), c in by_target.items()
        ],
        "default_scorer": TrainConfig().scorer,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads",
        "allocator": "freed memory retained" if retained else "system default",
        "workers": args.workers,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    written = write_results(out, rows, meta, scorers)
    print(f"bench: wrote {written} in {meta['wall_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
