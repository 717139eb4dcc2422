"""The model card: its text says what the reports say, and its pictures are real PNGs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from switchprune.card import CardInputs, format_number, render_card, write_card

SPEC = {"arch": "mlp", "in_shape": [1, 8, 8], "num_classes": 10, "widths": {"fc1": 12}}
WIDTHS = {"fc1": {"kept": 12, "full": 300}, "fc2": {"kept": 100, "full": 100}}
REPORT = {
    "test_accuracy": 0.975,
    "params_before": 50610.0,
    "params_after": 20225.0,
    "macs_before": 50200.0,
    "macs_after": 19994.0,
    "latency_ms_before_b1": 0.023880999,
    "latency_ms_after_b1": 0.022002999,
    "data_md5": "8ace1a9eac8493a844f391181acd785e.dir",
}
META = {"in_shape": [1, 8, 8], "mean": [0.3077], "std": [0.3818], "dataset": "digits"}
PARAMS = {"model": {"arch": "mlp", "hidden": [300, 100]}, "train": {"epochs": 30, "seed": 0}}
HISTORY = [
    {"epoch": 1, "loss": 2.0, "val_accuracy": 0.5, "params_ratio": 1.0, "baseline_loss": 2.1},
    {"epoch": 2, "loss": 1.0, "val_accuracy": 0.9, "params_ratio": 0.4, "baseline_loss": 1.1},
]
CARD = CardInputs(
    model_name="digits", spec=SPEC, widths=WIDTHS, report=REPORT, meta=META, params=PARAMS
)
WITH_HISTORY = dataclasses.replace(CARD, history=HISTORY)


def test_card_rows_carry_the_report_numbers() -> None:
    text = render_card(WITH_HISTORY)
    assert text.startswith("# digits\n")
    assert "| parameters | 50610 | 20225 |" in text
    assert "| MACs per sample | 50200 | 19994 |" in text
    assert "| latency, batch 1 (ms) | 0.023881 | 0.022003 |" in text
    assert "(`test_accuracy`) | 0.975 |" in text
    assert "`8ace1a9eac8493a844f391181acd785e.dir`" in text
    assert "| `fc1` | 300 | 12 | 4.0% |" in text and "| `fc2` | 100 | 100 | 100.0% |" in text
    assert "| `epochs` | 30 |" in text
    assert "| 0 | 0.3077 | 0.3818 |" in text and "`[N, 1, 8, 8]`" in text
    assert 'switchprune.load_model("models:/digits@champion")' in text
    assert 'mlflow.pytorch.load_model("models:/digits@champion")' in text
    assert "training_curves.png" in text
    # Keys the report lacks are left out rather than shown empty.
    assert "baseline_accuracy" not in text and "size (bytes)" not in text


def test_card_without_history_has_no_curves() -> None:
    text = render_card(CARD)
    assert "training_curves.png" not in text and "Last epoch" not in text


def test_card_sections_come_in_reading_order() -> None:
    headings = [line for line in render_card(WITH_HISTORY).splitlines() if line.startswith("#")]
    assert headings == [
        "# digits",
        "## Widths per gate group",
        "## Evaluation (test split)",
        "## Training",
        "## Input",
        "## Loading",
    ]


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
