"""The model card of a registered version: Markdown text and its two pictures.

The card says what the model is (the architecture settings that apply to it), which data it
was trained on (``data_md5``), its classes in logit order, the kept width of every layer in
network order and why the layers left whole were not pruned, accuracy, size, MACs and latency
(median and spread) before and after compaction, the training settings, the input every
shipped form takes, and how to load it from a clean folder. The numbers are copied from the
reports, never recomputed, so the card and ``reports/evaluate.json`` cannot disagree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switchprune import __version__
from switchprune.config import OWN_ARCHS, TORCHVISION_ARCHS
from switchprune.evaluation import NOISY_IQR_SHARE, TRUSTED_REPEATS

CARD_FILE = "model_card.md"
WIDTHS_PLOT = "widths.png"
CURVES_PLOT = "training_curves.png"

# (report key before, report key after, label): the before/after table of the card.
_BEFORE_AFTER = (
    ("params_before", "params_after", "parameters"),
    ("macs_before", "macs_after", "MACs per sample"),
    ("bytes_before", "bytes_after", "size (bytes)"),
)
# Each runtime's latency keys (``str.format``: measure, tag, batch) and its label in the card.
_RUNTIMES = (("latency_{}_{tag}_b{batch}", ""), ("onnx_latency_{}_b{batch}_{tag}", "onnxruntime "))
TAGS = ("before", "after")
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
        widths: ``widths.json``: per gate group or ungated layer, ``kept`` and ``full``, with
            ``index`` (network order), ``label``, ``gated`` and, when not gated, ``why``
            (see :func:`switchprune.pruning.compaction.layer_widths`). Entries without them
            are shown as gate groups, in the order given.
        report: ``evaluate.json``.
        meta: The prepared data's ``meta.json`` (``mean``, ``std``, ``in_shape`` ...).
        params: Parameter sections (``model``, ``train``, ...), as logged.
        history: Per-epoch training records (``train_history.json``): the last epoch's line
            and the curves picture (neither when empty).
        class_names: The name of every class, by logit index (``DataMeta.labels``); empty:
            ``meta.json``'s ``class_names``, else the indices.
    """

    model_name: str
    spec: Mapping[str, Any]
    widths: Mapping[str, Mapping[str, Any]]
    report: Mapping[str, Any]
    meta: Mapping[str, Any]
    params: Mapping[str, Any]
    history: Sequence[Mapping[str, Any]] = ()
    class_names: Sequence[str] = ()

    @property
    def labels(self) -> list[str]:
        """The class names in logit order."""
        names = list(self.class_names) or [str(c) for c in self.meta.get("class_names", ())]
        count = int(self.spec.get("num_classes", self.meta.get("num_classes", len(names))))
        return names if names else [str(i) for i in range(count)]


@dataclass(frozen=True)
class LayerWidth:
    """One row of the widths table: a gate group or a layer left whole.

    Attributes:
        key: The group name (``width_<key>`` in MLflow) or, when not gated, the module path.
        label: Readable layer name, e.g. ``features.3 (conv 3×3)``.
        full: Units before compaction.
        kept: Units after.
        gated: Whether the layer carries a gate (and could lose units).
        why: For a layer left whole, why.
    """

    key: str
    label: str
    full: int
    kept: int
    gated: bool
    why: str = ""


def layer_rows(widths: Mapping[str, Mapping[str, Any]]) -> list[LayerWidth]:
    """The entries of ``widths.json`` in network order.

    Args:
        widths: ``widths.json`` (see :class:`CardInputs`).

    Returns:
        One row per entry, ordered by ``index`` (entries without one keep their place).
    """
    keyed = sorted(enumerate(widths.items()), key=lambda e: (e[1][1].get("index", e[0]), e[0]))
    return [
        LayerWidth(
            key=str(key),
            label=str(w.get("label", key)),
            full=int(w["full"]),
            kept=int(w["kept"]),
            gated=bool(w.get("gated", True)),
            why=str(w.get("why", "")),
        )
        for _, (key, w) in keyed
    ]


def render_card(card: CardInputs) -> str:
    """The model card as Markdown.

    Args:
        card: The reports and settings the card is made from.

    Returns:
        The card text.
    """
    sections = (
        _summary_section,
        _classes_section,
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
    arch = str(spec.get("arch", "?"))
    lines = [
        f"# {card.model_name}",
        "",
        f"A `{arch}` task network for {len(card.labels)} classes, trained with one factor per "
        "unit, then compacted: switched-off units were removed and the kept factors folded "
        "into the weights.",
        "",
        *_architecture_lines(card),
        f"- input shape (C, H, W): `{list(spec.get('in_shape', meta.get('in_shape', [])))}`",
        f"- classes: {len(card.labels)} (see [Classes](#classes))",
        f"- data (`data_md5`): `{card.report.get('data_md5', '')}`",
    ]
    if meta.get("dataset"):
        lines.append(f"- dataset: `{meta['dataset']}`")
    return [*lines, ""]


def _architecture_lines(card: CardInputs) -> list[str]:
    """The architecture and only the ``model`` settings that shape it."""
    spec = card.spec
    arch = str(spec.get("arch", "?"))
    options = spec.get("options") or {}
    section = card.params.get("model")
    model = section if isinstance(section, Mapping) else {}
    if arch in TORCHVISION_ARCHS:
        kind = "torchvision"
    elif arch in OWN_ARCHS:
        kind = "switchprune"
    else:
        kind = "your own builder"
    lines = [f"- architecture: `{arch}` ({kind})"]
    if arch == "mlp":
        hidden = model.get("hidden")
        if hidden is None:  # the full widths of the hidden layers, as pruned
            hidden = [w.full for w in layer_rows(card.widths) if w.gated]
        lines.append(f"- `hidden`: `{json.dumps(list(hidden))}`")
    if arch.startswith(("vgg", "resnet")) and arch in OWN_ARCHS:
        lines.append(f"- `width_multiplier`: {format_number(model.get('width_multiplier', 1.0))}")
    elif "width_multiplier" in options:  # torchvision and user networks: only when set
        lines.append(f"- `width_multiplier`: {format_number(options['width_multiplier'])}")
    if arch in TORCHVISION_ARCHS and "small_input" in options:
        lines.append(f"- `small_input`: {json.dumps(bool(options['small_input']))}")
    if spec.get("source_sha256"):
        lines.append(f"- network source SHA-256: `{spec['source_sha256']}` (stored beside it)")
    if spec.get("source_package"):
        lines.append(f"- network package: `{spec['source_package']}`")
    return lines


def _classes_section(card: CardInputs) -> list[str]:
    """The class of every logit, in index order."""
    lines = ["## Classes", "", "Logit `i` scores class `i`:", "", "| index | class |", "|---|---|"]
    lines += [f"| {i} | {name} |" for i, name in enumerate(card.labels)]
    return [*lines, ""]


def _widths_section(card: CardInputs) -> list[str]:
    """Full and kept width of every layer in network order, the layers left whole and why."""
    rows = layer_rows(card.widths)
    lines = [
        "## Widths per layer",
        "",
        "In network order; `group` is the name of its `width_<group>` metric.",
        "",
        "| group | layer | before | after | kept |",
        "|---|---|---|---|---|",
    ]
    for w in rows:
        share = (f"{w.kept / w.full:.1%}" if w.full else "-") if w.gated else "not pruned"
        lines.append(f"| `{w.key}` | {w.label} | {w.full} | {w.kept} | {share} |")
    lines += ["", f"![kept width per layer]({WIDTHS_PLOT})", ""]
    whole = [w for w in rows if not w.gated]
    if whole:
        lines += ["### Layers not pruned", "", "These layers carry no gate and keep every unit:"]
        lines += ["", *(f"- {w.label}: {w.why or 'not gated'}" for w in whole), ""]
    return lines


def _evaluation_section(card: CardInputs) -> list[str]:
    """The before/after table and the accuracy table, with the rows the report has."""
    fmt, report = format_number, card.report
    lines = ["## Evaluation (test split)", "", "| metric | before | after |", "|---|---|---|"]
    for before, after, label in _BEFORE_AFTER:
        if before in report and after in report:
            lines.append(f"| {label} | {fmt(report[before])} | {fmt(report[after])} |")
    timed = False
    batches = sorted({int(b) for k in report for b in re.findall(r"_b(\d+)", k)})
    for key, runtime in _RUNTIMES:
        for batch in batches:
            if key.format("ms", tag="before", batch=batch) not in report:
                continue
            timed = True
            shown = [_latency(report, key, tag, batch) for tag in ("before", "after")]
            lines.append(f"| {runtime}latency, batch {batch} (ms) | {shown[0]} | {shown[1]} |")
            lines.append(f"| {runtime}speedup, batch {batch} | | {_speedup(report, key, batch)} |")
    lines += ["", "| metric | value |", "|---|---|"]
    for key, label in _ACCURACY:
        if key in report:
            lines.append(f"| {label} (`{key}`) | {fmt(report[key])} |")
    lines.append("")
    if timed:
        lines += [_latency_note(card), ""]
    return lines


def _latency(report: Mapping[str, Any], key: str, tag: str, batch: int) -> str:
    """A median forward time with its interquartile range (or a note that it has none)."""
    median = format_number(report[key.format("ms", tag=tag, batch=batch)])
    iqr = report.get(key.format("iqr_ms", tag=tag, batch=batch))
    return (
        f"{median} (no spread recorded)" if iqr is None else f"{median} (IQR {format_number(iqr)})"
    )


def _speedup(report: Mapping[str, Any], key: str, batch: int) -> str:
    """Before ÷ after, or why it is not quoted: a noisy figure says nothing about speed."""
    prefix = key.split("_{}")[0]
    noisy = report.get(f"{prefix}_noisy_b{batch}")
    if noisy is None:  # a report from before the flag: judge by the spreads it has
        spreads = [report.get(key.format("iqr_ms", tag=t, batch=batch)) for t in TAGS]
        medians = [report[key.format("ms", tag=t, batch=batch)] for t in TAGS]
        noisy = any(
            i is None or i > NOISY_IQR_SHARE * m for i, m in zip(spreads, medians, strict=True)
        )
    predicted = report.get(f"{prefix}_predicted_speedup_b{batch}")
    also = f"; predicted {predicted:.2f}×" if isinstance(predicted, int | float) else ""
    if noisy:
        return (
            f"not quoted: noisy (an IQR above {NOISY_IQR_SHARE:.0%} of its median, or fewer "
            f"than {TRUSTED_REPEATS} timed passes){also}"
        )
    before, after = (report[key.format("ms", tag=t, batch=batch)] for t in TAGS)
    return f"{before / after:.2f}× measured{also}" if also else f"{before / after:.2f}×"


def _latency_note(card: CardInputs) -> str:
    """How the latencies were measured, and how little one run of them says."""
    section = card.params.get("evaluate")
    evaluate = section if isinstance(section, Mapping) else {}
    repeats = evaluate.get("latency_repeats")
    warmup = evaluate.get("latency_warmup")
    passes = f"{repeats} timed forward passes" if repeats is not None else "the timed passes"
    after = f" after {warmup} warm-up passes" if warmup is not None else " after warm-up"
    device = evaluate.get("device", "auto")
    threads = card.report.get("latency_threads")
    on = f" on {threads:g} threads" if isinstance(threads, int | float) else ""
    return (
        f"Latency: the median of {passes}{after}, with their interquartile range (IQR) in "
        f"brackets, the unpruned and the compacted model timed in turns{on}; PyTorch "
        f"(float32, `evaluate.device`: `{device}`; `auto` uses a GPU when there is one) and "
        "onnxruntime on the CPU, in one `evaluate` run on one machine. A speedup is quoted "
        f"only when both times have an IQR of at most {NOISY_IQR_SHARE:.0%} of their median "
        f"over at least {TRUSTED_REPEATS} passes; otherwise the figures are marked noisy. "
        "It is a single measurement of that machine, not a benchmark: compare before with "
        "after, not absolute times across machines."
    )


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
    """The input contract of every shipped form, and the normalisation they apply."""
    meta = card.meta
    mean = [float(v) for v in meta.get("mean", [])]
    std = [float(v) for v in meta.get("std", [])]
    in_shape = list(meta.get("in_shape", card.spec.get("in_shape", [])))
    shape = f"`[N, {', '.join(str(d) for d in in_shape)}]`"
    logits = f"float32 logits `[N, {len(card.labels)}]`"
    lines = [
        "## Input",
        "",
        f"Every form of this model takes the same input: raw pixels, `uint8` 0..255, shape "
        f"{shape} (N×C×H×W, as stored in the prepared data), and normalises them itself. A "
        "floating-point batch is refused with an error, never cast.",
        "",
        "| form | load it with | input | output |",
        "|---|---|---|---|",
        f"| PyTorch module | `switchprune.load_model(uri)` | `torch.uint8` tensor {shape} "
        f"| {logits} |",
        f"| MLflow pyfunc | `mlflow.pyfunc.load_model(uri)`, `mlflow models serve` | "
        f"`numpy.uint8` array {shape} | {logits} |",
        f"| ONNX | `model.onnx` in onnxruntime | `uint8` array {shape} | {logits} |",
        "",
        "Logit `i` scores class `i` (see [Classes](#classes)). "
        "`switchprune.load_model(uri, raw=False)` gives the bare network instead: it takes "
        "float32 input normalised per channel, pixels / 255, then `(x - mean) / std`, with",
        "",
        "| channel | mean | std |",
        "|---|---|---|",
    ]
    for c, (m, s) in enumerate(zip(mean, std, strict=False)):
        lines.append(f"| {c} | {format_number(m)} | {format_number(s)} |")
    return [*lines, ""]


def loading_snippet(card: CardInputs) -> str:
    """Python that loads the champion of ``card``'s model and classifies one raw image.

    It runs as it is in a clean folder with the package installed and ``MLFLOW_TRACKING_URI``
    naming the registry; with ``"champion/"`` for the URI it loads a pulled folder.
    """
    in_shape = ", ".join(str(int(d)) for d in card.meta.get("in_shape", card.spec["in_shape"]))
    return "\n".join(
        [
            "import torch",
            "",
            "import switchprune",
            "",
            f'model = switchprune.load_model("models:/{card.model_name}@champion")',
            f"classes = {json.dumps(card.labels, ensure_ascii=False)}",
            "",
            f"images = torch.zeros((1, {in_shape}), dtype=torch.uint8)  # raw pixels 0..255",
            "with torch.no_grad():",
            "    logits = model(images)",
            "print(classes[int(logits.argmax(1)[0])])",
        ]
    )


def _loading_section(card: CardInputs) -> list[str]:
    """How to load the model in a clean folder, by registry URI or from a pulled folder."""
    name = card.model_name
    return [
        "## Loading",
        "",
        f"Needs the `switchprune` package (`pip install switchprune=={__version__}`, or "
        "`pip install .` in its repository) and, for a `models:/` URI, `MLFLOW_TRACKING_URI` "
        "naming the registry:",
        "",
        "```python",
        loading_snippet(card),
        "```",
        "",
        f"A folder pulled with `switchprune pull {name}@champion --out champion/` loads the "
        'same way, offline: `switchprune.load_model("champion/")`. '
        f'`mlflow.pytorch.load_model("models:/{name}@champion")` gives the same module. '
        "Weights are read with `torch.load(weights_only=True)` and the network is rebuilt "
        "from its spec; the normalisation above is inside the loaded model.",
        "",
    ]


def _pyplot() -> Any:
    """Matplotlib's pyplot on the Agg backend (no display on servers and in containers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_widths(widths: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """A bar chart of full and kept width per layer, in network order, written as PNG.

    Layers left whole (``gated`` false) are drawn in their own colour.

    Args:
        widths: ``widths.json`` (see :class:`CardInputs`).
        path: The PNG file to write.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    rows = layer_rows(widths)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(rows) + 2.0), 4.5))
    try:
        xs = list(range(len(rows)))
        ax.bar(xs, [w.full for w in rows], color="#d0d0d0", label="before")
        gated = [i for i, w in enumerate(rows) if w.gated]
        whole = [i for i, w in enumerate(rows) if not w.gated]
        ax.bar(gated, [rows[i].kept for i in gated], color="#1f77b4", label="after")
        if whole:
            ax.bar(whole, [rows[i].kept for i in whole], color="#ff7f0e", label="not pruned")
        labels = [w.label for w in rows]
        ax.set_xticks(xs, labels, rotation=90 if len(rows) > 4 else 0, fontsize=8)
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
