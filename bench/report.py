"""The benchmark's results from its records: aggregation, the verdict, JSON and Markdown.

Every figure of ``results.md`` and of the verdict in ``results.json`` is computed here from the
records (one per run), so the two files always agree with each other.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from measurement import label
from recipes import RECIPES
from settings import BASELINES

from switchprune.config import TrainConfig

Cells = dict[tuple[str, str, str, float], dict[str, list[dict[str, Any]]]]
# What ours is compared with in the peers' verdict: the recipes at our epoch budget, and the
# one-shot baselines after their fine-tuning (the weak references).
PEERS = (*RECIPES, *(b + "+ft" for b in BASELINES))
# The strength each recipe's grid chooses, by name.
STRENGTH_NAMES = {"depgraph": "reg", "slimming-recipe": "s", "iterative": "N"}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _var(values: list[float]) -> float:
    return statistics.variance(values) if len(values) > 1 else 0.0


def cells(rows: list[dict[str, Any]]) -> Cells:
    """Rows grouped by (dataset, arch, target metric, ratio), then by method label.

    Args:
        rows: The records.

    Returns:
        Per target, the records of every method label, with the TNN's ``unpruned`` ones.
    """
    out: Cells = {}
    unpruned = [r for r in rows if r["method"] == "unpruned"]
    for r in rows:
        if r["target_ratio"] is None:
            continue
        key = (r["dataset"], r["arch"], r["target_metric"], r["target_ratio"])
        out.setdefault(key, {}).setdefault(label(r), []).append(r)
    for key, methods in out.items():
        methods["unpruned"] = [u for u in unpruned if (u["dataset"], u["arch"]) == key[:2]]
    return out


def _switcher_vs_best_fixed(acc: dict[str, list[float]], scorers: tuple[str, ...]) -> dict:
    """The switcher's accuracies against the best fixed scorer's, in one cell."""
    sw = acc["ours[switcher]"]
    fixed = {s: acc[f"ours[{s}]"] for s in scorers if s != "switcher"}
    best = max(fixed, key=lambda s: statistics.fmean(fixed[s]))
    diff = statistics.fmean(sw) - statistics.fmean(fixed[best])
    se = math.sqrt(_var(sw) / len(sw) + _var(fixed[best]) / len(fixed[best]))
    sd = max(math.sqrt(_var(sw)), math.sqrt(_var(fixed[best])))
    return {"best_fixed": best, "switcher_minus_best": diff, "se": se,
            "within_sd": diff >= -sd, "better": diff > 2 * se}  # fmt: skip


def versus(mine: list[float], theirs: list[float]) -> dict[str, Any]:
    """Ours against one peer: the difference of the means, its standard error and the outcome.

    ``wins``: ours is higher by more than two standard errors of the difference; ``loses``:
    lower by more than two; ``ties``: otherwise; ``untested``: either side has a single value,
    so no standard error can be estimated.

    Args:
        mine: Ours' accuracies (one per seed).
        theirs: The peer's accuracies.

    Returns:
        ``{"diff", "se", "outcome"}``.
    """
    diff = statistics.fmean(mine) - statistics.fmean(theirs)
    se = math.sqrt(_var(mine) / len(mine) + _var(theirs) / len(theirs))
    if min(len(mine), len(theirs)) < 2:
        outcome = "untested"
    else:
        outcome = "wins" if diff > 2 * se else "loses" if diff < -2 * se else "ties"
    return {"diff": diff, "se": se, "outcome": outcome}


def verdict(rows: list[dict[str, Any]], scorers: tuple[str, ...]) -> dict[str, Any]:
    """The switcher against the best fixed scorer, and ours against the peers, per cell.

    ``within_sd``: the switcher's mean is at least the best fixed scorer's minus one standard
    deviation (the larger of the two). ``better``: its mean is higher by more than two
    standard errors of the difference. ``vs_peers``: ours with the default scorer (or, where it
    did not run, the first scorer that did) against every peer recipe and one-shot baseline
    that ran (:func:`versus`). A cell holds only the scorers that ran in it.

    Args:
        rows: The records.
        scorers: The unit scorers that were run.

    Returns:
        ``{"cells": [...]}``, one entry per TNN and target.
    """
    out: dict[str, Any] = {"cells": []}
    for (ds, arch, metric, ratio), methods in cells(rows).items():
        acc = {m: [r["accuracy"] for r in rs] for m, rs in methods.items()}
        present = tuple(s for s in scorers if f"ours[{s}]" in acc)
        cell: dict[str, Any] = {"dataset": ds, "arch": arch, "target_metric": metric,
                                "target_ratio": ratio, "scorers": list(present)}  # fmt: skip
        if "switcher" in present and len(present) > 1:
            cell |= _switcher_vs_best_fixed(acc, present)
        unpruned = acc["unpruned"]
        for scorer in present:
            worst = min(acc[f"ours[{scorer}]"]) - statistics.fmean(unpruned)
            cell[f"worst_seed_drop[{scorer}]"] = -worst
            for ft in ("", "+ft"):
                mine = statistics.fmean(acc[f"ours[{scorer}]{ft}"])
                cell[f"beats_baselines[{scorer}]{ft}"] = all(
                    mine > statistics.fmean(acc[b + ft]) for b in BASELINES if b + ft in acc
                )
        if present:
            default = TrainConfig().scorer
            mine_scorer = default if default in present else present[0]
            cell["ours_scorer"] = mine_scorer
            cell["vs_peers"] = {
                p: versus(acc[f"ours[{mine_scorer}]"], acc[p]) for p in PEERS if p in acc
            }
        out["cells"].append(cell)
    return out


def _intro(meta: dict[str, Any]) -> list[str]:
    return [
        "# switchprune benchmark",
        "",
        f"Setting `{meta['setting']}`: MNIST ({meta['n_train']:,} train / {meta['n_test']:,} test "
        f"images), seeds {meta['seeds']}, {meta['epochs']} epochs, {meta['finetune_epochs']} "
        f"fine-tuning epochs (`+ft`); {meta['machine']}; total {meta['wall_seconds'] / 60:.1f} "
        "min. Accuracy: mean ± sample standard deviation over seeds, of the compacted (or "
        "pruned) model on the test split. Ratios are against the unpruned TNN of the same seed. "
        "`ours[...]` is the same schedule with the unit scores from the learned switcher or from "
        "the controls; `slimming` and `l1norm` are Torch-Pruning's pruners at the same target, "
        "one shot after training (`+ft`: then fine-tuned), the weak references; `depgraph`, "
        "`slimming-recipe` and `iterative` are the peers' own recipes at the same target and "
        "the same epochs as `ours` (no `+ft`: their fine-tuning is inside the budget), each "
        "with its strength chosen on a validation split (see the chosen-strengths table).",
        "",
        *_per_arch(meta),
    ]


def _per_arch(meta: dict[str, Any]) -> list[str]:
    """A line on the TNNs whose seeds, epochs or scorers differ from the setting's."""
    seeds, epochs = meta.get("arch_seeds", {}), meta.get("arch_epochs", {})
    controls = meta.get("control_targets", {})
    other = [a for a in seeds if seeds[a] != meta["seeds"] or epochs.get(a) != meta["epochs"]]
    lines = []
    if other:
        lines += [
            "Other budgets (every method of the TNN alike): "
            + "; ".join(f"{a}: seeds {seeds[a]}, {epochs[a]} epochs" for a in other)
            + ".",
            "",
        ]
    if controls:
        lines += [
            "The scorer controls run only at: "
            + "; ".join(
                f"{a}: " + ", ".join(f"{m} {r}" for m, r in ts) for a, ts in controls.items()
            )
            + " (elsewhere ours has the default scorer only, as on the torchvision TNNs).",
            "",
        ]
    return lines


def _cell_tables(rows: list[dict[str, Any]]) -> list[str]:
    """One table per TNN and target: every method's accuracy, size and speedup."""
    lines: list[str] = []
    for (_ds, arch, metric, ratio), methods in cells(rows).items():
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
            s1, s256 = _speedup(rs, 1), _speedup(rs, 256)
            lines.append(f"| {name} | {acc:.2f} ± {sd:.2f} | {pr:.3f} | {mr:.3f} | {s1} "
                         f"| {s256} |")  # fmt: skip
        lines.append("")
    return lines


def _speedup(rs: list[dict[str, Any]], batch: int) -> str:
    """Mean speedup over the seeds, with how many of them were timed too noisily to trust."""
    mean = statistics.fmean(r.get(f"latency_speedup_b{batch}", 1.0) for r in rs)
    noisy = sum(r.get(f"latency_noisy_b{batch}", 0.0) > 0 for r in rs)
    return f"{mean:.2f}" + (f" (noisy {noisy}/{len(rs)})" if noisy else "")


def _verdict_table(v: dict[str, Any]) -> list[str]:
    """The switcher against the best fixed scorer (none when no cell compares them)."""
    if not any("best_fixed" in c for c in v["cells"]):
        return []
    lines = [
        "## Verdict: the learned switcher against the best fixed scorer",
        "",
        "| TNN, target | best fixed scorer | switcher − best (points) | 2 SE | within 1 SD "
        "| better by > 2 SE | switcher's worst seed below unpruned mean (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in (c for c in v["cells"] if "best_fixed" in c):
        lines.append(
            f"| {c['arch']}, {c['target_metric']} {c['target_ratio']} | {c['best_fixed']} "
            f"| {100 * c['switcher_minus_best']:+.2f} | {200 * c['se']:.2f} "
            f"| {'yes' if c['within_sd'] else 'no'} | {'yes' if c['better'] else 'no'} "
            f"| {100 * c['worst_seed_drop[switcher]']:.2f} |"
        )
    lines.append("")
    return lines


def _baselines_table(v: dict[str, Any], scorers: tuple[str, ...]) -> list[str]:
    """Whether ours, with each scorer, beats both baselines' mean accuracy in each cell."""
    lines = [
        "## Ours against the Torch-Pruning baselines (mean accuracy above both)",
        "",
        "| TNN, target | " + " | ".join(f"{s} | {s}+ft" for s in scorers) + " |",
        "|---|" + "---|" * (2 * len(scorers)),
    ]
    for c in v["cells"]:
        marks = [
            "–"
            if f"beats_baselines[{s}]{ft}" not in c
            else "yes"
            if c[f"beats_baselines[{s}]{ft}"]
            else "no"
            for s in scorers
            for ft in ("", "+ft")
        ]
        lines.append(f"| {c['arch']}, {c['target_metric']} {c['target_ratio']} | "
                     + " | ".join(marks) + " |")  # fmt: skip
    lines.append("")
    return lines


def _peers_table(v: dict[str, Any]) -> list[str]:
    """Ours (default scorer) against every peer: wins, ties or loses, per cell and in total."""
    peers = [p for p in PEERS if any(p in c.get("vs_peers", {}) for c in v["cells"])]
    if not peers:
        return []
    lines = [
        "## Verdict: ours against the peers at the same target",
        "",
        "Ours (the scorer named) minus each peer, in accuracy points, ± two standard errors of "
        "the difference; **wins** / **loses**: beyond two standard errors, else **ties** "
        "(**untested** with one seed). The recipes have ours' epochs; the one-shot `+ft` "
        "baselines have the fine-tuning epochs more.",
        "",
        "| TNN, target | ours | " + " | ".join(peers) + " |",
        "|---|---|" + "---|" * len(peers),
    ]
    tally: dict[str, dict[str, int]] = {p: {} for p in peers}
    for c in v["cells"]:
        marks = []
        for p in peers:
            if p not in c.get("vs_peers", {}):
                marks.append("–")
                continue
            vp = c["vs_peers"][p]
            tally[p][vp["outcome"]] = tally[p].get(vp["outcome"], 0) + 1
            marks.append(f"{100 * vp['diff']:+.2f} ± {200 * vp['se']:.2f} **{vp['outcome']}**")
        lines.append(f"| {c['arch']}, {c['target_metric']} {c['target_ratio']} "
                     f"| {c.get('ours_scorer', '–')} | " + " | ".join(marks) + " |")  # fmt: skip
    lines.append("")
    for p in peers:
        counts = ", ".join(f"{o} in {n}" for o, n in sorted(tally[p].items()))
        lines.append(f"- against `{p}`: ours {counts} of {sum(tally[p].values())} cells")
    lines.append("")
    return lines


def _strengths_table(rows: list[dict[str, Any]]) -> list[str]:
    """The strength each recipe chose per cell, with the validation accuracy of each value."""
    chosen = [r for r in rows if r["method"] in RECIPES and "strength" in r]
    if not chosen:
        return []
    lines = [
        "## The peer recipes' chosen strengths",
        "",
        "Chosen once per TNN and target on one seed (`grid_seed`; the other seeds reuse it), by "
        "the validation accuracy of the fine-tuned model trained on 90 % of the training split "
        "and measured on the other 10 %; ties go to the smaller value.",
        "",
        "| TNN, target | recipe | chosen | validation accuracy % per value | grid seed |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for r in chosen:
        key = (r["arch"], r["target_metric"], r["target_ratio"], r["method"])
        if key in seen:
            continue
        seen.add(key)
        grid = ", ".join(f"{k}: {100 * a:.2f}" for k, a in r["grid"].items())
        lines.append(f"| {r['arch']}, {r['target_metric']} {r['target_ratio']} | {r['method']} "
                     f"| {STRENGTH_NAMES[r['method']]} = {r['strength']:g} | {grid} "
                     f"| {r['grid_seed']} |")  # fmt: skip
    lines.append("")
    return lines


def claims_table(claims: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the paper-claim runs (none when there are none).

    Args:
        claims: The ``claim:<mode>`` records.

    Returns:
        The lines of the section.
    """
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


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], scorers: tuple[str, ...]) -> str:
    """The tables of results.md, every figure computed from ``rows``.

    Args:
        rows: The records.
        meta: The run's settings and machine (``results.json``'s ``meta``).
        scorers: The unit scorers that were run.

    Returns:
        The Markdown text, without a final newline.
    """
    v = verdict(rows, scorers)
    lines = _intro(meta) + _cell_tables(rows) + _peers_table(v) + _strengths_table(rows)
    lines += _verdict_table(v) + _baselines_table(v, scorers)
    lines += claims_table([r for r in rows if r["method"].startswith("claim:")])
    return "\n".join(lines)


def write_results(
    out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], scorers: tuple[str, ...]
) -> Path:
    """Write ``results.json`` (meta, verdict, records) and ``results.md`` into ``out``.

    Args:
        out: An existing directory.
        rows: The records.
        meta: The run's settings and machine.
        scorers: The unit scorers that were run.

    Returns:
        The path of ``results.md``.
    """
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "verdict": verdict(rows, scorers), "records": rows}, indent=1)
        + "\n"
    )
    (out / "results.md").write_text(markdown(rows, meta, scorers) + "\n")
    return out / "results.md"
