"""The model card of a registered version: Markdown text and its two pictures.

The card says what the model is (architecture, spec options), which data it was trained on
(``data_md5``), the kept width of every gate group, accuracy, size, MACs and latency before and
after compaction (the evaluation report), the training settings, how to load it and how to
normalise its input. The numbers are copied from the reports, never recomputed, so the card
and ``reports/evaluate.json`` cannot disagree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CARD_FILE = "model_card.md"
WIDTHS_PLOT = "widths.png"
CURVES_PLOT = "training_curves.png"

# (report key before, report key after, label): the before/after table of the card.
_BEFORE_AFTER = (
    ("params_before", "params_after", "parameters"),
    ("macs_before", "macs_after", "MACs per sample"),
    ("bytes_before", "bytes_after", "size (bytes)"),
    ("latency_ms_before_b1", "latency_ms_after_b1", "latency, batch 1 (ms)"),
    ("latency_ms_before_b256", "latency_ms_after_b256", "latency, batch 256 (ms)"),
)
_ACCURACY = (
    ("test_accuracy", "test accuracy of the compacted model"),
    ("gated_accuracy", "test accuracy of the gated full-width model"),
    ("baseline_accuracy", "test accuracy of the baseline (trained without pruning)"),
    ("accuracy_drop", "baseline − compacted"),
    ("params_ratio", "parameters kept"),
    ("macs_ratio", "MACs kept"),
    ("max_abs_logit_diff_f64", "max abs logit difference, gated vs compacted (float64)"),
)


def format_number(value: Any) -> str:
    """A report value as the card shows it: integers plainly, other reals with 6 significant digits.

    Args:
        value: A number (or anything else, shown with ``str``).

    Returns:
        The text, e.g. ``50610``, ``0.975``, ``7.10543e-15``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{float(value):.6g}"


@dataclass(frozen=True)
class CardInputs:
    """What a model card is made from: the reports and settings of one compacted model.

    Attributes:
        model_name: Registered model name (used in the loading snippet).
        spec: The compacted model's spec (``ModelSpec.to_dict()``).
        widths: ``widths.json``: ``{group: {"kept": k, "full": f}}``.
        report: ``evaluate.json``.
        meta: The prepared data's ``meta.json`` (``mean``, ``std``, ``in_shape`` ...).
        params: Parameter sections (``model``, ``train``, ...), as logged.
        history: Per-epoch training records (``train_history.json``): the last epoch's line
            and the curves picture (neither when empty).
    """

    model_name: str
    spec: Mapping[str, Any]
    widths: Mapping[str, Mapping[str, int]]
    report: Mapping[str, Any]
    meta: Mapping[str, Any]
    params: Mapping[str, Any]
    history: Sequence[Mapping[str, Any]] = ()


def render_card(card: CardInputs) -> str:
    """The model card as Markdown.

    Args:
        card: The reports and settings the card is made from.

    Returns:
        The card text.
    """
    sections = (
        _summary_section,
        _widths_section,
        _evaluation_section,
        _training_section,
        _input_section,
        _loading_section,
    )
    return "\n".join(line for section in sections for line in section(card))


def _summary_section(card: CardInputs) -> list[str]:
    """Title, what the model is, and which data it was trained on."""
    spec, meta = card.spec, card.meta
    lines = [
        f"# {card.model_name}",
        "",
        f"A `{spec.get('arch', '?')}` task network for {spec.get('num_classes', '?')} classes, "
        "trained with one factor per unit, then compacted: switched-off units were removed and "
        "the kept factors folded into the weights.",
        "",
        f"- architecture: `{spec.get('arch', '?')}`",
        f"- input shape (C, H, W): `{list(spec.get('in_shape', meta.get('in_shape', [])))}`",
        f"- classes: {spec.get('num_classes', '?')}",
    ]
    if spec.get("options"):
        lines.append(f"- spec options: `{json.dumps(spec['options'], sort_keys=True)}`")
    model_section = card.params.get("model")
    if isinstance(model_section, Mapping):
        lines.append(f"- `model` section: `{json.dumps(model_section, default=str)}`")
    lines.append(f"- data (`data_md5`): `{card.report.get('data_md5', '')}`")
    if meta.get("dataset"):
        lines.append(f"- dataset: `{meta['dataset']}`")
    return [*lines, ""]


def _widths_section(card: CardInputs) -> list[str]:
    """Full and kept width of every gate group, and the picture of them."""
    lines = [
        "## Widths per gate group",
        "",
        "| group | before | after | kept |",
        "|---|---|---|---|",
    ]
    for group, w in card.widths.items():
        full, kept = int(w["full"]), int(w["kept"])
        share = f"{kept / full:.1%}" if full else "-"
        lines.append(f"| `{group}` | {full} | {kept} | {share} |")
    return [*lines, "", f"![kept width per layer]({WIDTHS_PLOT})", ""]


def _evaluation_section(card: CardInputs) -> list[str]:
    """The before/after table and the accuracy table, with the rows the report has."""
    fmt, report = format_number, card.report
    lines = ["## Evaluation (test split)", "", "| metric | before | after |", "|---|---|---|"]
    for before, after, label in _BEFORE_AFTER:
        if before in report and after in report:
            lines.append(f"| {label} | {fmt(report[before])} | {fmt(report[after])} |")
    lines += ["", "| metric | value |", "|---|---|"]
    for key, label in _ACCURACY:
        if key in report:
            lines.append(f"| {label} (`{key}`) | {fmt(report[key])} |")
    return [*lines, ""]


def _training_section(card: CardInputs) -> list[str]:
    """The ``train`` settings, the last epoch's numbers and the curves picture."""
    fmt = format_number
    lines = ["## Training", ""]
    train = card.params.get("train")
    if isinstance(train, Mapping) and train:
        lines += ["| setting | value |", "|---|---|"]
        for key, value in train.items():
            shown = json.dumps(value) if isinstance(value, list | tuple | dict) else value
            lines.append(f"| `{key}` | {fmt(shown)} |")
        lines.append("")
    if card.history:
        last = card.history[-1]
        summary = ", ".join(
            f"{k} {fmt(last[k])}" for k in ("loss", "val_accuracy", "params_ratio") if k in last
        )
        lines += [f"Last epoch ({fmt(last.get('epoch', len(card.history)))}): {summary}.", ""]
        lines += [f"![training curves]({CURVES_PLOT})", ""]
    return lines


def _input_section(card: CardInputs) -> list[str]:
    """The input's shape and the per-channel normalisation."""
    meta = card.meta
    mean = [float(v) for v in meta.get("mean", [])]
    std = [float(v) for v in meta.get("std", [])]
    in_shape = list(meta.get("in_shape", card.spec.get("in_shape", [])))
    lines = [
        "## Input",
        "",
        f"A float32 batch of shape `[N, {', '.join(str(d) for d in in_shape)}]`: pixels scaled "
        "to [0, 1] (uint8 / 255), then normalised per channel, `(x - mean) / std`, with",
        "",
        "| channel | mean | std |",
        "|---|---|---|",
    ]
    for c, (m, s) in enumerate(zip(mean, std, strict=False)):
        lines.append(f"| {c} | {format_number(m)} | {format_number(s)} |")
    return [*lines, "", "The output is one logit per class.", ""]


def _loading_section(card: CardInputs) -> list[str]:
    """How to load the model, by weights only or as the MLflow flavour."""
    uri = f"models:/{card.model_name}@champion"
    return [
        "## Loading",
        "",
        "```python",
        "import switchprune",
        "",
        f'model = switchprune.load_model("{uri}")  # weights only',
        "",
        "import mlflow  # the MLflow flavour (needs switchprune importable)",
        "",
        f'model = mlflow.pytorch.load_model("{uri}")',
        "```",
        "",
        "`switchprune.load_model` rebuilds the network from its spec and reads the weights with "
        "`torch.load(weights_only=True)`; the `meta.json` that travels with the model holds the "
        "normalisation above.",
        "",
    ]


def _pyplot() -> Any:
    """Matplotlib's pyplot on the Agg backend (no display on servers and in containers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_widths(widths: Mapping[str, Mapping[str, int]], path: Path) -> Path:
    """A bar chart of full and kept width per gate group, written as PNG.

    Args:
        widths: ``widths.json``: ``{group: {"kept": k, "full": f}}``.
        path: The PNG file to write.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    groups = list(widths)
    full = [int(widths[g]["full"]) for g in groups]
    kept = [int(widths[g]["kept"]) for g in groups]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(groups) + 2.0), 3.5))
    try:
        xs = range(len(groups))
        ax.bar(xs, full, color="#d0d0d0", label="before")
        ax.bar(xs, kept, color="#1f77b4", label="after")
        ax.set_xticks(list(xs), groups, rotation=90 if len(groups) > 6 else 0, fontsize=8)
        ax.set_ylabel("units")
        ax.set_title("kept width per layer")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def plot_history(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Loss, validation accuracy and params ratio against epoch, written as PNG.

    Baseline curves (``baseline_loss``, ``baseline_val_accuracy``) are drawn dashed when present.

    Args:
        history: Per-epoch records with an ``epoch`` field.
        path: The PNG file to write.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    panels = (
        ("loss", "training loss"),
        ("val_accuracy", "validation accuracy"),
        ("params_ratio", "parameters kept"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(11.0, 3.2))
    try:
        for ax, (key, title) in zip(axes, panels, strict=True):
            for name, style in ((key, "-"), (f"baseline_{key}", "--")):
                points = [(r["epoch"], r[name]) for r in history if name in r]
                if points:
                    xs, ys = zip(*points, strict=True)
                    label = "baseline" if name.startswith("baseline_") else "switched"
                    ax.plot(xs, ys, style, marker=".", label=label)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if ax.lines:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def write_card(out_dir: Path, card: CardInputs) -> dict[str, Path]:
    """Write the card and its pictures into ``out_dir``.

    Args:
        out_dir: An existing folder.
        card: The reports and settings the card is made from (no curves picture without a
            history).

    Returns:
        The written files by name (``model_card.md``, ``widths.png`` and, with a history,
        ``training_curves.png``).
    """
    out_dir = Path(out_dir)
    files = {CARD_FILE: out_dir / CARD_FILE}
    files[CARD_FILE].write_text(render_card(card), encoding="utf-8")
    files[WIDTHS_PLOT] = plot_widths(card.widths, out_dir / WIDTHS_PLOT)
    if card.history:
        files[CURVES_PLOT] = plot_history(card.history, out_dir / CURVES_PLOT)
    return files
