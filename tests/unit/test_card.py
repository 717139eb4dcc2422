"""The model card: its text says what the reports say, and its pictures are real PNGs."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
import torch

from switchprune.card import CardInputs, format_number, layer_rows, render_card, write_card
from switchprune.config import ModelConfig
from switchprune.models import build_model, spec_from_config
from switchprune.pruning import kept_widths
from switchprune.pruning.compaction import layer_widths

SPEC = {"arch": "mlp", "in_shape": [1, 8, 8], "num_classes": 10, "widths": {"fc1": 12}}
WIDTHS = {
    "classifier": {
        "index": 2,
        "label": "classifier (linear)",
        "gated": False,
        "kept": 10,
        "full": 10,
        "why": "the classifier (one output per class)",
    },
    "fc1": {"index": 0, "label": "fc1 (linear)", "gated": True, "kept": 12, "full": 300},
    "fc2": {"index": 1, "label": "fc2 (linear)", "gated": True, "kept": 100, "full": 100},
}
REPORT = {
    "test_accuracy": 0.975,
    "params_before": 50610.0,
    "params_after": 20225.0,
    "macs_before": 50200.0,
    "macs_after": 19994.0,
    "latency_ms_before_b1": 0.023880999,
    "latency_ms_after_b1": 0.022002999,
    "latency_iqr_ms_before_b1": 0.0012,
    "latency_iqr_ms_after_b1": 0.00095,
    "data_md5": "8ace1a9eac8493a844f391181acd785e.dir",
}
META = {"in_shape": [1, 8, 8], "mean": [0.3077], "std": [0.3818], "dataset": "digits"}
PARAMS = {
    "model": {"arch": "mlp", "hidden": [300, 100], "width_multiplier": 1.0, "small_input": None},
    "train": {"epochs": 30, "seed": 0},
    "evaluate": {"latency_repeats": 20, "latency_warmup": 5, "device": "cpu"},
}
HISTORY = [
    {"epoch": 1, "loss": 2.0, "val_accuracy": 0.5, "params_ratio": 1.0, "baseline_loss": 2.1},
    {"epoch": 2, "loss": 1.0, "val_accuracy": 0.9, "params_ratio": 0.4, "baseline_loss": 1.1},
]
CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CARD = CardInputs(
    model_name="digits",
    spec=SPEC,
    widths=WIDTHS,
    report=REPORT,
    meta=META,
    params=PARAMS,
    class_names=CLASSES,
)
WITH_HISTORY = dataclasses.replace(CARD, history=HISTORY)


def test_card_rows_carry_the_report_numbers() -> None:
    text = render_card(WITH_HISTORY)
    assert text.startswith("# digits\n")
    assert "| parameters | 50610 | 20225 |" in text
    assert "| MACs per sample | 50200 | 19994 |" in text
    assert "(`test_accuracy`) | 0.975 |" in text
    assert "`8ace1a9eac8493a844f391181acd785e.dir`" in text
    assert "| `epochs` | 30 |" in text
    assert "| 0 | 0.3077 | 0.3818 |" in text and "`[N, 1, 8, 8]`" in text
    assert 'switchprune.load_model("models:/digits@champion")' in text
    assert 'mlflow.pytorch.load_model("models:/digits@champion")' in text
    assert "training_curves.png" in text
    # Keys the report lacks are left out rather than shown empty.
    assert "baseline_accuracy" not in text and "size (bytes)" not in text
    assert "batch 256" not in text


def test_latency_shows_its_spread_and_says_it_is_one_cpu_run() -> None:
    text = render_card(CARD)
    assert "| latency, batch 1 (ms) | 0.023881 (IQR 0.0012) | 0.022003 (IQR 0.00095) |" in text
    note = next(line for line in text.splitlines() if line.startswith("Latency:"))
    assert "median of 20 timed forward passes after 5 warm-up passes" in note
    assert "interquartile range" in note and "one `evaluate` run" in note and "CPU" in note
    # Both spreads are within 20 % of their medians: the speedup is quoted.
    assert "| speedup, batch 1 | | 1.09× |" in text
    # A report without the spread says so, and quotes no speedup from such figures.
    bare = {k: v for k, v in REPORT.items() if "iqr" not in k}
    text = render_card(dataclasses.replace(CARD, report=bare))
    assert (
        "| latency, batch 1 (ms) | 0.023881 (no spread recorded) | 0.022003 (no spread recorded) |"
    ) in text
    assert "| speedup, batch 1 | | not quoted: noisy" in text


@pytest.mark.parametrize(
    ("changes", "quoted"),
    [
        ({"latency_noisy_b1": 1.0}, False),
        ({"latency_noisy_b1": 0.0}, True),
        ({"latency_iqr_ms_after_b1": 0.0045}, False),  # no flag: judged by the spreads
    ],
    ids=["flagged", "trusted", "wide-spread"],
)
def test_a_noisy_latency_quotes_no_speedup(changes: dict[str, float], quoted: bool) -> None:
    report = {
        **REPORT,
        "onnx_latency_ms_b256_before": 2.0,
        "onnx_latency_ms_b256_after": 1.0,
        "onnx_latency_iqr_ms_b256_before": 0.1,
        "onnx_latency_iqr_ms_b256_after": 0.05,
        "onnx_latency_noisy_b256": 1.0,
        **changes,
    }
    text = render_card(dataclasses.replace(CARD, report=report))
    assert ("| speedup, batch 1 | | 1.09× |" in text) is quoted
    assert ("| speedup, batch 1 | | not quoted: noisy" in text) is not quoted
    assert "| onnxruntime latency, batch 256 (ms) | 2 (IQR 0.1) | 1 (IQR 0.05) |" in text
    assert "| onnxruntime speedup, batch 256 | | not quoted: noisy" in text


def test_a_latency_target_shows_the_predicted_speedup_beside_the_measured_one() -> None:
    report = {**REPORT, "latency_noisy_b1": 0.0, "latency_predicted_speedup_b1": 1.2}
    text = render_card(dataclasses.replace(CARD, report=report))
    assert "| speedup, batch 1 | | 1.09× measured; predicted 1.20× |" in text
    noisy = {**report, "latency_noisy_b1": 1.0}
    text = render_card(dataclasses.replace(CARD, report=noisy))
    assert "timed passes); predicted 1.20× |" in text


def test_classes_are_listed_in_logit_order() -> None:
    text = render_card(CARD)
    rows = [f"| {i} | {name} |" for i, name in enumerate(CLASSES)]
    positions = [text.index(row) for row in rows]
    assert positions == sorted(positions)
    assert f"classes = {json.dumps(list(CLASSES))}" in text  # the loading snippet's
    # Without names the class of a logit is its index.
    plain = render_card(dataclasses.replace(CARD, class_names=()))
    assert "| 9 | 9 |" in plain and "nine" not in plain
    from_meta = dataclasses.replace(CARD, class_names=(), meta={**META, "class_names": CLASSES})
    assert "| 9 | nine |" in render_card(from_meta)


def test_widths_come_in_network_order_with_the_layers_left_whole() -> None:
    text = render_card(CARD)
    rows = [
        "| `fc1` | fc1 (linear) | 300 | 12 | 4.0% |",
        "| `fc2` | fc2 (linear) | 100 | 100 | 100.0% |",
        "| `classifier` | classifier (linear) | 10 | 10 | not pruned |",
    ]
    positions = [text.index(row) for row in rows]
    assert positions == sorted(positions)  # network order, not the file's key order
    assert "- classifier (linear): the classifier (one output per class)" in text
    # A file without labels or flags (gate groups only) still renders, in its own order.
    old = {"fc2": {"kept": 4, "full": 8}, "fc1": {"kept": 6, "full": 9}}
    text = render_card(dataclasses.replace(CARD, widths=old))
    assert text.index("| `fc2` | fc2 | 8 | 4 | 50.0% |") < text.index("| `fc1` | fc1 | 9 | 6 |")
    assert "Layers not pruned" not in text


@pytest.mark.parametrize(
    ("spec", "model", "shown", "absent"),
    [
        (
            SPEC,
            {"arch": "mlp", "hidden": [300, 100], "width_multiplier": 1.0, "small_input": None},
            ["- `hidden`: `[300, 100]`"],
            ["width_multiplier", "small_input"],
        ),
        (
            {"arch": "resnet20", "in_shape": [3, 32, 32], "num_classes": 10, "widths": {}},
            {"arch": "resnet20", "hidden": [300, 100], "width_multiplier": 0.5},
            ["- `width_multiplier`: 0.5"],
            ["hidden", "small_input"],
        ),
        (
            {
                "arch": "resnet18",
                "in_shape": [3, 32, 32],
                "num_classes": 10,
                "widths": {},
                "options": {"small_input": True},
            },
            {"arch": "resnet18", "hidden": [300, 100], "width_multiplier": 1.0},
            ["- `small_input`: true", "(torchvision)"],
            ["hidden", "width_multiplier"],
        ),
        (
            {"arch": "lenet5", "in_shape": [1, 28, 28], "num_classes": 10, "widths": {}},
            {"arch": "lenet5", "hidden": [300, 100], "width_multiplier": 1.0},
            ["- architecture: `lenet5`"],
            ["hidden", "width_multiplier", "small_input"],
        ),
    ],
    ids=["mlp", "resnet20", "torchvision", "lenet5"],
)
def test_the_architecture_lists_only_the_settings_that_apply(
    spec: dict, model: dict, shown: list[str], absent: list[str]
) -> None:
    card = dataclasses.replace(CARD, spec=spec, params={**PARAMS, "model": model})
    summary = render_card(card).split("## Classes")[0]
    for needle in shown:
        assert needle in summary, summary
    for key in absent:
        assert key not in summary, summary


def test_the_input_contract_covers_every_form() -> None:
    text = render_card(CARD).split("## Input")[1].split("## Loading")[0]
    assert "raw pixels, `uint8` 0..255" in text and "refused" in text
    for form in ("switchprune.load_model(uri)", "mlflow.pyfunc.load_model(uri)", "model.onnx"):
        assert form in text
    assert "float32 logits `[N, 10]`" in text
    assert "load_model(uri, raw=False)" in text


def test_card_without_history_has_no_curves() -> None:
    text = render_card(CARD)
    assert "training_curves.png" not in text and "Last epoch" not in text


def test_card_sections_come_in_reading_order() -> None:
    headings = [line for line in render_card(WITH_HISTORY).splitlines() if line.startswith("#")]
    assert headings == [
        "# digits",
        "## Classes",
        "## Widths per layer",
        "### Layers not pruned",
        "## Evaluation (test split)",
        "## Training",
        "## Input",
        "## Loading",
    ]


def _widths_of(arch: str) -> dict:
    """``widths.json`` of a freshly built network, half of every group kept."""
    spec = spec_from_config(ModelConfig(arch=arch, hidden=(12, 8)), (3, 8, 8), 5)
    model = build_model(spec)
    kept = {g: torch.arange(max(1, n // 2)) for g, n in model.group_sizes().items()}
    return layer_widths(model, kept_widths(kept))


def test_widths_json_of_every_own_arch_ends_with_the_ungated_classifier() -> None:
    for arch in ("mlp", "lenet5", "vgg11", "resnet20"):
        widths = _widths_of(arch)
        rows = layer_rows(widths)
        assert [w.key for w in rows][-1] == "classifier", arch
        assert [w.gated for w in rows] == [True] * (len(rows) - 1) + [False], arch
        assert rows[-1].full == rows[-1].kept == 5 and "classifier" in rows[-1].why
        assert all(w.kept <= w.full for w in rows)
        assert sorted(w["index"] for w in widths.values()) == list(range(len(widths)))
    resnet = layer_rows(_widths_of("resnet20"))
    # The residual stream of a stage is one group written by several layers.
    assert resnet[0].key == "stage1" and "tied layers" in resnet[0].label
    assert resnet[1].label == "stage1.0.conv1 (conv 3×3)"


def test_a_grouped_convolution_is_listed_as_left_whole_and_why(tmp_path: Path) -> None:
    source = tmp_path / "grouped.py"
    source.write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build(num_classes, in_channels):
                return nn.Sequential(
                    nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                    nn.Conv2d(8, 6, 1), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes),
                )
            """
        )
    )
    rows = layer_rows(_widths_of(f"{source}:build"))
    by_key = {w.key: w for w in rows}
    assert [w.label for w in rows] == [
        "0 (conv 3×3)",
        "2 (grouped conv 3×3, 2 groups)",
        "4 (conv 1×1)",
        "8 (linear)",
    ]
    assert by_key["net.2"].why == "its channels pass through the grouped convolution '2'"
    assert not by_key["net.0"].gated and "grouped convolution '2'" in by_key["net.0"].why
    assert by_key["net.4"].gated and by_key["net.4"].kept == 3
    assert "classifier" in by_key["net.8"].why
    text = render_card(dataclasses.replace(CARD, widths=_widths_of(f"{source}:build")))
    assert "- 2 (grouped conv 3×3, 2 groups): its channels pass through the grouped" in text


def test_format_number() -> None:
    assert format_number(50610.0) == "50610"
    assert format_number(0.39962458012250546) == "0.399625"
    assert format_number(7.105427357601002e-15) == "7.10543e-15"
    assert format_number(float("nan")) == "nan"
    assert format_number(True) == "True"


def test_write_card_writes_text_and_pngs(tmp_path: Path) -> None:
    files = write_card(tmp_path, WITH_HISTORY)
    assert set(files) == {"model_card.md", "widths.png", "training_curves.png"}
    for name in ("widths.png", "training_curves.png"):
        data = files[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert files["model_card.md"].read_text() == render_card(WITH_HISTORY)
    (tmp_path / "plain").mkdir()
    assert set(write_card(tmp_path / "plain", CARD)) == {"model_card.md", "widths.png"}
    assert not (tmp_path / "plain" / "training_curves.png").exists()
