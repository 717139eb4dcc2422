"""``train.target_metric: latency``: the measured table, its cache, and training against it.

A scripted device whose time is a forward pass's FLOPs (``FlopCounterMode``) makes every
prediction checkable exactly: a layer's FLOPs are bilinear in its input and output widths, so
the table interpolates them without error, and the network's are the sum of its layers'.
Whether a real device's times are predicted well is the benchmark's question.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch

from model_support import REPRESENTATIVE_ARCHS, flop_timer
from switchprune import latency
from switchprune.config import TrainConfig
from switchprune.cost import CostModel
from switchprune.evaluation import forward_pass
from switchprune.models import ModelSpec, TaskNet, build_model, vgg
from switchprune.training import fit

CPU = torch.device("cpu")


def networkflop_timer(model: TaskNet, widths: Mapping[str, int]) -> float:
    net = latency.narrowed(model, widths)
    return flop_timer({"n": forward_pass(net, model.spec.in_shape, latency.BATCH, CPU)})["n"]


def table(model: TaskNet, cache: Path, timer: latency.Timer = flop_timer) -> latency.LatencyModel:
    costs = CostModel(model)
    return latency.measure(model, costs.layers, model.spec.in_shape, CPU, timer=timer, cache=cache)


@pytest.mark.parametrize("arch", REPRESENTATIVE_ARCHS)
def test_the_table_predicts_the_network_at_any_widths(
    arch: str, tiny_net: Callable[..., TaskNet], tmp_path: Path
) -> None:
    model = tiny_net(arch).eval()
    model.set_factors(None)
    lm = table(model, tmp_path)
    assert lm() == pytest.approx(networkflop_timer(model, model.group_sizes()), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # uneven widths, off the grid and off the calibration points
        widths = {
            name: int(torch.randint(1, size + 1, (1,), generator=g))
            for name, size in model.group_sizes().items()
        }
        assert lm(widths) == pytest.approx(networkflop_timer(model, widths), rel=1e-6), widths


def test_a_rerun_reads_the_cache_and_another_thread_count_measures_again(
    tiny_net: Callable[..., TaskNet], tmp_path: Path
) -> None:
    model = tiny_net("vgg11_bn").eval()
    first = table(model, tmp_path)

    def refuse(runs: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        raise AssertionError(f"measured again: {sorted(runs)}")

    rng = torch.random.get_rng_state()
    again = table(model, tmp_path, timer=refuse)
    narrow = {**model.group_sizes(), model.groups[0].name: 3}
    assert again() == first() and again(narrow) == first(narrow)
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        with pytest.raises(AssertionError, match="measured again"):
            table(model, tmp_path, timer=refuse)
    finally:
        torch.set_num_threads(before)
    # Measuring builds modules: the global generator is left as it was.
    table(model, tmp_path / "fresh")
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_a_damaged_cache_entry_is_measured_again(
    tiny_net: Callable[..., TaskNet], tmp_path: Path
) -> None:
    model = tiny_net("mlp").eval()
    expected = table(model, tmp_path)()
    for path in tmp_path.glob("*.json"):
        path.write_text("{not json")
    calls: list[int] = []

    def counting(runs: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        calls.append(len(runs))
        return flop_timer(runs)

    assert table(model, tmp_path, timer=counting)() == pytest.approx(expected)
    assert calls  # measured, not read
    assert all(json.loads(p.read_text())["key"] for p in tmp_path.glob("*.json"))


def test_training_to_a_latency_target_reaches_it_and_reports_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(latency, "time_passes", flop_timer)
    spec = ModelSpec("vgg11", (3, 8, 8), 10, vgg.default_widths("vgg11", 0.125))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (64,), generator=g))
    cfg = TrainConfig(
        epochs=3,
        batch_size=32,
        device="cpu",
        baseline=False,
        target_metric="latency",
        target_ratio=0.5,
    )
    result = fit(spec, data, None, cfg, progress=False)
    ratio = result.metrics["train_latency_ratio"]
    assert 0.4 <= ratio <= 0.5 + 1e-9
    # The prediction is the compacted network's own time on that device.
    widths = {k: max(1, int((v > 0).sum())) for k, v in result.factors.items()}
    full = build_model(spec)
    assert ratio == pytest.approx(
        networkflop_timer(full, widths) / networkflop_timer(full, full.group_sizes()), rel=1e-6
    )
    assert all("latency_ratio" in r for r in result.history)
    again = fit(spec, data, None, cfg, progress=False)  # from the cache: the same run
    assert all(torch.equal(result.factors[k], again.factors[k]) for k in result.factors)


@pytest.mark.slow
def test_the_stages_carry_the_prediction_to_the_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """train predicts, prune compacts, evaluate sets the prediction beside its own timing."""
    from switchprune.config import DataConfig, EvaluateConfig, ModelConfig, PruneConfig
    from switchprune.stages import evaluate, preprocess, prune
    from switchprune.stages import train as train_stage

    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(latency, "time_passes", flop_timer)
    prepared = tmp_path / "prepared"
    preprocess.run(DataConfig(), raw_dir=tmp_path / "raw", prepared_dir=prepared)
    cfg = TrainConfig(epochs=2, batch_size=128, device="cpu", target_metric="latency")
    metrics = train_stage.run(
        dataclasses.replace(cfg, target_ratio=0.5),
        model_cfg=ModelConfig(arch="mlp", hidden=(64, 32)),
        prepared_dir=prepared,
        trained_dir=tmp_path / "trained",
        progress=False,
    )
    assert 0.3 <= metrics["train_latency_ratio"] <= 0.5 + 1e-9
    dirs = {"trained_dir": tmp_path / "trained", "model_dir": tmp_path / "m"}
    prune.run(PruneConfig(), **dirs)
    report = evaluate.run(
        EvaluateConfig(latency_repeats=2, device="cpu"), prepared_dir=prepared, **dirs
    )
    predicted = report["latency_predicted_speedup_b256"]
    assert predicted == pytest.approx(1.0 / metrics["train_latency_ratio"])
    assert "latency_speedup_b256" in report and "latency_noisy_b256" in report
