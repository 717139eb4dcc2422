"""The promotion gate: each rule refuses with a reason that names it."""

from __future__ import annotations

import pytest

from switchprune.config import PromoteConfig
from switchprune.promotion import check_gate

GOOD = {
    "test_accuracy": 0.95,
    "baseline_accuracy": 0.96,
    "params_ratio": 0.4,
    "max_abs_logit_diff_f64": 1e-9,
}
CFG = PromoteConfig(min_accuracy=0.9, max_accuracy_drop=0.02, max_params_ratio=0.6)


def test_a_good_model_passes_without_a_champion() -> None:
    assert check_gate(CFG, GOOD, None, 1) == (True, "passed the gate")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"test_accuracy": 0.85, "baseline_accuracy": 0.86}, "min_accuracy"),
        ({"baseline_accuracy": 0.99}, "max_accuracy_drop"),
        ({"params_ratio": 0.7}, "max_params_ratio"),
        ({"max_abs_logit_diff_f64": 23.6}, "max_logit_diff"),
        ({"max_abs_logit_diff_f64": float("nan")}, "max_logit_diff"),
    ],
)
def test_each_threshold_refuses(change: dict, needle: str) -> None:
    ok, reason = check_gate(CFG, {**GOOD, **change}, None, 1)
    assert not ok and needle in reason


def test_a_refusal_lists_every_failing_condition() -> None:
    bad = {
        "test_accuracy": 0.85,
        "baseline_accuracy": 0.99,
        "params_ratio": 0.7,
        "max_abs_logit_diff_f64": 0.5,
    }
    champion = {"version": 1, "metrics": {"test_accuracy": 0.97}}
    ok, reason = check_gate(CFG, bad, champion, 2)
    assert not ok
    parts = reason.split("; ")
    needles = (
        "min_accuracy",
        "max_accuracy_drop",
        "max_logit_diff",
        "max_params_ratio",
        "champion version 1",
    )
    assert len(parts) == len(needles), reason
    for part, needle in zip(parts, needles, strict=True):
        assert needle in part, reason


def test_a_single_failure_is_named_alone() -> None:
    ok, reason = check_gate(CFG, {**GOOD, "params_ratio": 0.7}, None, 1)
    assert not ok and "; " not in reason and reason.startswith("params_ratio 0.7000")


def test_every_missing_metric_is_named() -> None:
    ok, reason = check_gate(CFG, {"baseline_accuracy": 0.9}, None, 5)
    assert not ok
    for key in ("test_accuracy", "params_ratio", "max_abs_logit_diff_f64"):
        assert f"the run of version 5 has no metric '{key}'" in reason


def test_missing_metric_refuses() -> None:
    ok, reason = check_gate(CFG, {"test_accuracy": 0.95}, None, 3)
    assert not ok and "params_ratio" in reason and "version 3" in reason


def test_worse_than_champion_refuses_unless_disabled() -> None:
    champion = {"version": 1, "metrics": {"test_accuracy": 0.97}}
    ok, reason = check_gate(CFG, GOOD, champion, 2)
    assert not ok and "champion version 1" in reason
    relaxed = PromoteConfig(min_accuracy=0.9, max_params_ratio=0.6, not_worse_than_champion=False)
    assert check_gate(relaxed, GOOD, champion, 2)[0]


def test_the_champion_itself_and_better_models_pass() -> None:
    champion = {"version": 2, "metrics": {"test_accuracy": 0.97}}
    assert check_gate(CFG, GOOD, champion, 2)[0]  # re-promoting the champion
    better = {"version": 1, "metrics": {"test_accuracy": 0.94}}
    assert check_gate(CFG, GOOD, better, 2)[0]


def test_a_run_without_the_logit_difference_is_refused() -> None:
    metrics = {k: v for k, v in GOOD.items() if k != "max_abs_logit_diff_f64"}
    ok, reason = check_gate(CFG, metrics, None, 4)
    assert not ok and "max_abs_logit_diff_f64" in reason and "version 4" in reason


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({}, "no 'model_name'"),
        ({"model_name": "m", "version": "abc"}, "'version' must be a positive integer"),
        ({"model_name": "m", "version": True}, "'version' must be a positive integer"),
        ([1, 2], "no 'model_name'"),
    ],
    ids=["empty", "version-abc", "version-bool", "a-list"],
)
def test_a_malformed_registration_is_one_error_naming_the_file(
    tmp_path, doc: object, needle: str
) -> None:
    import json

    from switchprune.io import ArtifactError
    from switchprune.stages.promote import read_registration

    path = tmp_path / "register.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=needle) as info:
        read_registration(path)
    assert "register.json" in str(info.value)


def test_a_good_registration_is_read(tmp_path) -> None:
    from switchprune.stages.promote import read_registration

    (tmp_path / "register.json").write_text('{"model_name": "m", "version": 3}')
    assert read_registration(tmp_path / "register.json") == ("m", 3)
