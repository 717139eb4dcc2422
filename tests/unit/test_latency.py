"""``train.target_metric: latency``: the measured table, its cache, and training against it.

A scripted device whose time is a forward pass's FLOPs (``FlopCounterMode``) makes every
prediction checkable exactly: a layer's FLOPs are bilinear in its input and output widths, so
the table interpolates them without error, and the network's are the sum of its layers'. The
device's block (the channels a kernel handles at once) is set by each test, not read from the
machine. Whether a real device's times are predicted well is the benchmark's question.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from model_support import REPRESENTATIVE_ARCHS, flop_timer
from switchprune import latency
from switchprune.config import TrainConfig
from switchprune.cost import CostModel
from switchprune.evaluation import forward_pass
from switchprune.models import ModelSpec, TaskNet, build_model, vgg
from switchprune.training import FitResult, fit

CPU = torch.device("cpu")
# The tables here count FLOPs, linear in the batch: a small one tests the same sums, quicker.
SETTING = latency.Setting(batch=8)


@pytest.fixture(autouse=True)
def blocks(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Set the device's block (1 unless a test says otherwise)."""

    def set_block(size: int) -> None:
        monkeypatch.setattr(latency, "block", lambda device, runtime="torch": size)

    set_block(1)
    return set_block


def networkflop_timer(model: TaskNet, widths: Mapping[str, int]) -> float:
    net = latency.narrowed(model, widths)
    return flop_timer({"n": forward_pass(net, model.spec.in_shape, SETTING.batch, CPU)})["n"]


def table(model: TaskNet, cache: Path, timer: latency.Timer = flop_timer) -> latency.LatencyModel:
    costs = CostModel(model)
    return latency.measure(
        model, costs.layers, model.spec.in_shape, CPU, setting=SETTING, timer=timer, cache=cache
    )


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
    # The cache's keying is the subject, not the network: the MLP's table is the cheapest.
    model = tiny_net("mlp").eval()
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


def test_the_table_is_timed_with_freed_memory_retained_as_evaluate_times(
    tiny_net: Callable[..., TaskNet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Page faults of a process's allocator would be in the table but not in ``evaluate``'s
    times; a table measured otherwise is not read back."""
    model = tiny_net("mlp").eval()
    retained: list[bool] = []
    monkeypatch.setattr(latency, "retain_freed_memory", lambda: retained.append(True) or True)

    def after_retaining(runs: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        assert retained, "timed before the allocator retains freed memory"
        return flop_timer(runs)

    table(model, tmp_path, timer=after_retaining)
    keys = [json.loads(p.read_text())["key"] for p in tmp_path.glob("*.json")]
    assert keys and all(k["retained_memory"] is True for k in keys)
    monkeypatch.setattr(latency, "retain_freed_memory", lambda: False)
    calls: list[int] = []

    def counting(runs: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        calls.append(len(runs))
        return flop_timer(runs)

    table(model, tmp_path, timer=counting)
    assert calls  # where memory is not retained, the retained table is not reused


def test_a_width_is_timed_as_its_whole_blocks(
    tiny_net: Callable[..., TaskNet], blocks: Callable[[int], None], tmp_path: Path
) -> None:
    """33 channels cost what 48 do where kernels work on 16: the table is read at whole blocks."""
    blocks(4)
    model = tiny_net("resnet20").eval()
    model.set_factors(None)
    lm = table(model, tmp_path)
    assert lm.block == 4
    for layer in lm.layers:  # every grid point is a whole number of blocks, or the full width
        assert all(w % 4 == 0 or w == layer.out_full for w in layer.couts), layer
    full = model.group_sizes()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        whole = {
            n: 4 * int(torch.randint(1, s // 4 + 1, (1,), generator=g)) for n, s in full.items()
        }
        short = {
            n: max(1, w - int(torch.randint(0, 4, (1,), generator=g))) for n, w in whole.items()
        }
        assert lm(short) == pytest.approx(lm(whole), rel=1e-9), (short, whole)
        # At whole blocks the table is the device's own time.
        assert lm(whole) == pytest.approx(networkflop_timer(model, whole), rel=1e-6), whole
    # One more unit costs a share of the next block's time, not nothing or a whole block.
    first = model.groups[0].name
    at = {**full, first: 4}
    step = lm({**at, first: 8}) - lm(at)
    assert lm.marginal(at)[first] == pytest.approx(step / 4)


def fit_to_latency(spec: ModelSpec, samples: int, **train: Any) -> FitResult:
    """``fit`` to a latency target on ``samples`` random inputs of ten classes (seeded)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *spec.in_shape, generator=g)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (samples,), generator=g))
    cfg = TrainConfig(device="cpu", baseline=False, target_metric="latency", **train)
    return fit(spec, data, None, cfg, progress=False)


def test_training_to_a_latency_target_reaches_it_and_reports_it(
    monkeypatch: pytest.MonkeyPatch, blocks: Callable[[int], None], tmp_path: Path
) -> None:
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(latency, "time_passes", flop_timer)
    blocks(4)
    spec = ModelSpec("vgg11", (3, 8, 8), 10, vgg.default_widths("vgg11", 0.125))
    result = fit_to_latency(spec, 64, epochs=3, batch_size=32, target_ratio=0.5)
    ratio = result.metrics["train_latency_ratio"]
    assert 0.4 <= ratio <= 0.5 + 1e-9
    # The prediction is the compacted network's own time on that device.
    widths = {k: max(1, int((v > 0).sum())) for k, v in result.factors.items()}
    full = build_model(spec)
    # Whole blocks kept: every group a multiple of 4 units, or whole.
    sizes = full.group_sizes()
    assert all(w % 4 == 0 or w == sizes[k] for k, w in widths.items()), widths
    assert any(w < sizes[k] for k, w in widths.items()), widths
    assert ratio == pytest.approx(
        networkflop_timer(full, widths) / networkflop_timer(full, full.group_sizes()), rel=1e-6
    )
    assert all("latency_ratio" in r for r in result.history)
    again = fit_to_latency(spec, 64, epochs=3, batch_size=32, target_ratio=0.5)  # from the cache
    assert all(torch.equal(result.factors[k], again.factors[k]) for k in result.factors)


def test_drift_between_timer_calls_does_not_reach_the_predicted_speedups(
    tiny_net: Callable[..., TaskNet], tmp_path: Path
) -> None:
    """A machine that gets slower from one timer call to the next (a busy neighbour) moves every
    time alike within a call: the whole networks are timed in one call, and the speedups the
    table predicts at its calibration points stay the device's own."""
    model = tiny_net("resnet20").eval()
    model.set_factors(None)
    calls: list[int] = []

    def drifting(runs: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        calls.append(len(runs))
        return {k: v * 1.2 ** len(calls) for k, v in flop_timer(runs).items()}

    lm = table(model, tmp_path, timer=drifting)
    assert len(calls) > 1  # the drift did reach the layers' calls
    full = model.group_sizes()
    for share in latency.CALIBRATION:
        widths = {g: max(1, round(share * n)) for g, n in full.items()}
        expected = networkflop_timer(model, full) / networkflop_timer(model, widths)
        assert lm() / lm(widths) == pytest.approx(expected, rel=1e-6), share


def test_a_target_beyond_the_tables_floor_is_named_before_training(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(latency, "time_passes", flop_timer)
    spec = ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 16, "fc2": 8})
    for ratio, warned in ((0.5, False), (0.02, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="switchprune.training"):
            fit_to_latency(spec, 32, epochs=1, batch_size=16, target_ratio=ratio, width_multiple=4)
        lines = [r.getMessage() for r in caplog.records if "predicts at most" in r.getMessage()]
        assert bool(lines) is warned, lines
        if warned:
            assert "train.target_ratio 0.02" in lines[0] and "every group at 4 units" in lines[0]


@pytest.mark.parametrize(
    "module, shape",
    [
        (torch.nn.Conv2d(6, 10, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (6, 9, 8)),
        (torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), (8, 5, 5)),
        (torch.nn.Linear(12, 7), (12,)),
    ],
    ids=["conv", "depthwise", "linear"],
)
def test_the_onnxruntime_layers_compute_what_the_torch_layers_do(
    module: torch.nn.Module, shape: tuple[int, ...]
) -> None:
    """The one-node graphs timed for ``evaluate.runtime: onnxruntime`` are the layers."""
    from switchprune.onnx_export import session

    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    got = session(latency._onnx_layer(module, shape)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), module(x), atol=1e-5)


@pytest.mark.slow
def test_an_onnxruntime_table_is_measured_in_onnxruntime_and_cached_apart(
    tiny_net: Callable[..., TaskNet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each calibration point is a whole-network ONNX export; two points show the runtime as
    # well as four (the calibration itself is checked on the scripted device above).
    monkeypatch.setattr(latency, "CALIBRATION", (0.5, 1.0))
    model = tiny_net("mlp").eval()
    model.set_factors(None)
    costs = CostModel(model)
    setting = latency.Setting(runtime="onnxruntime", batch=8, threads=1)

    def measure(timer: latency.Timer) -> latency.LatencyModel:
        return latency.measure(
            model, costs.layers, model.spec.in_shape, CPU, setting=setting, timer=timer,
            cache=tmp_path,
        )  # fmt: skip

    seen: list[str] = []

    def real(runs: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        outputs = [run() for run in runs.values()]  # onnxruntime returns numpy arrays
        seen.extend(type(o[0]).__module__ for o in outputs)  # type: ignore[index]
        return latency.time_passes(runs)

    lm = measure(real)
    assert seen and set(seen) == {"numpy"}
    assert lm() > 0 and lm.layers and all(v > 0 for layer in lm.layers for r in layer.ms for v in r)
    keys = [json.loads(p.read_text())["key"] for p in tmp_path.glob("*.json")]
    assert keys and all(k["runtime"].startswith("onnxruntime ") and k["batch"] == 8 for k in keys)
    assert all(k["threads"] == 1 for k in keys)

    def refuse(runs: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        raise AssertionError("measured again")

    assert measure(refuse)() == lm()  # the cache, keyed by runtime, batch and threads
    with pytest.raises(AssertionError, match="measured again"):  # torch's is another table
        latency.measure(model, costs.layers, model.spec.in_shape, CPU, timer=refuse, cache=tmp_path)


def test_the_report_names_the_prediction_by_runtime_and_batch() -> None:
    from switchprune.stages.evaluate import _predicted

    assert _predicted({"train_latency_ratio": 0.5}) == {"latency_predicted_speedup_b256": 256}
    stored = {"train_latency_ratio": 0.5, "train_latency_runtime": "onnxruntime"}
    assert _predicted({**stored, "train_latency_batch": 64}) == {
        "onnx_latency_predicted_speedup_b64": 64
    }
    assert _predicted({"train_latency_ratio": 0.0}) == {} and _predicted({}) == {}


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
    evaluate_cfg = EvaluateConfig(latency_repeats=2, device="cpu", batch_size=64)
    metrics = train_stage.run(
        dataclasses.replace(cfg, target_ratio=0.5),
        model_cfg=ModelConfig(arch="mlp", hidden=(64, 32)),
        prepared_dir=prepared,
        trained_dir=tmp_path / "trained",
        progress=False,
        evaluate_cfg=evaluate_cfg,
    )
    assert 0.3 <= metrics["train_latency_ratio"] <= 0.5 + 1e-9
    dirs = {"trained_dir": tmp_path / "trained", "model_dir": tmp_path / "m"}
    prune.run(PruneConfig(), **dirs)
    report = evaluate.run(evaluate_cfg, prepared_dir=prepared, **dirs)
    # The table was measured at the evaluation's batch: the prediction sits beside its timing.
    predicted = report["latency_predicted_speedup_b64"]
    assert predicted == pytest.approx(1.0 / metrics["train_latency_ratio"])
    assert "latency_speedup_b64" in report and "latency_noisy_b64" in report
    assert "latency_speedup_b256" in report and "latency_predicted_speedup_b256" not in report
    assert any(k["batch"] == 64 for k in map(json.loads, _keys(tmp_path / "cache")))


def _keys(cache: Path) -> list[str]:
    return [json.dumps(json.loads(p.read_text())["key"]) for p in cache.rglob("*.json")]
