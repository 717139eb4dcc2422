"""Behaviour of alternating SNN/TNN training: freezing, determinism, resume, compression."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from switchprune.config import TrainConfig
from switchprune.cost import CostModel
from switchprune.io import load_torch
from switchprune.models import ModelSpec, build_model, vgg
from switchprune.scoring import (
    PRIOR_RANGE,
    Switcher,
    SwitcherSpec,
    budget_offset,
    hard_widths,
    magnitude_scores,
    ramped_target,
)
from switchprune.scoring.units import group_norm_scores
from switchprune.training import FitResult, _snn_step, _start, _tnn_step, fit, resolve_amp


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny nets run fastest on one thread, and do not stall when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MLP_SPEC = ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 32, "fc2": 16})
VGG_SPEC = ModelSpec("vgg11", (3, 8, 8), 10, vgg.default_widths("vgg11", 0.125))

# 200 samples in batches of 32: 7 batches per epoch (an odd count, which matters for resume).
BASE = {
    "epochs": 4,
    "batch_size": 32,
    "snn_hidden": 8,
    "device": "cpu",
    "baseline": False,
    "scorer": "switcher",
}


def make_data(in_shape: tuple[int, int, int], n: int = 200, seed: int = 0) -> TensorDataset:
    """Synthetic data whose labels depend on the inputs (a fixed random linear map)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *in_shape, generator=g)
    w = torch.randn(x[0].numel(), 10, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    return TensorDataset(x, y)


MLP_DATA = make_data(MLP_SPEC.in_shape)
VGG_DATA = make_data(VGG_SPEC.in_shape, n=96)


def make_cfg(**overrides: Any) -> TrainConfig:
    return TrainConfig(**{**BASE, **overrides})


def run(cfg: TrainConfig, spec: ModelSpec = MLP_SPEC, **kwargs: Any) -> FitResult:
    data = MLP_DATA if spec is MLP_SPEC else VGG_DATA
    return fit(spec, data, None, cfg, progress=False, **kwargs)


def equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_identical(a: FitResult, b: FitResult) -> None:
    assert equal_states(a.model.state_dict(), b.model.state_dict())
    if a.switcher is None:
        assert b.switcher is None and a.factors is None and b.factors is None
        return
    assert b.switcher is not None and a.factors is not None and b.factors is not None
    assert equal_states(a.switcher.state_dict(), b.switcher.state_dict())
    assert equal_states(a.factors, b.factors)
    assert a.metrics["train_params_ratio"] == b.metrics["train_params_ratio"]
    assert len(a.history) == len(b.history)
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra.keys() - {"seconds"}:
            assert ra[k] == rb[k], k


def bn_stats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The BatchNorm running statistics of a state dict."""
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def parameters(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of a state dict that are parameters of ``module`` (no buffers)."""
    names = {k for k, _ in module.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def fit_by_epoch(
    tmp_path: Path, cfg: TrainConfig, spec: ModelSpec = MLP_SPEC
) -> tuple[FitResult, list[dict[str, Any]]]:
    """``fit`` with a checkpoint after every epoch, and the networks' states read back from it."""
    ckpt = tmp_path / "run.ckpt"
    states: list[dict[str, Any]] = []

    def keep(epoch: int) -> None:
        blob = load_torch(ckpt)
        states.append({"tnn": blob["tnn"], "snn": blob["snn"], "frozen": blob["frozen"]})

    return run(cfg, spec, checkpoint_path=ckpt, on_epoch_end=keep), states


# --- 1. the other network is frozen in each phase ---------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"compression": "target"},
        {"compression": "penalty", "penalty": 1.0},
        {"compression": "none"},
        {"compression": "target", "scorer": "magnitude"},
    ],
    ids=["target", "penalty", "none", "magnitude"],
)
def test_snn_steps_move_only_the_switcher_and_tnn_steps_only_the_task_network(
    overrides: dict[str, Any],
) -> None:
    """Each step's change is confined to the network it trains, BatchNorm statistics included."""
    cfg = make_cfg(snn_lr=0.5, tnn_lr=0.1, **overrides)
    r = _start(VGG_SPEC, VGG_DATA, None, cfg, True, torch.device("cpu"))
    assert r.scorer is not None
    r.tnn.train()
    for _ in range(2):
        tnn_before = {k: v.clone() for k, v in r.tnn.state_dict().items()}
        snn_before = {k: v.clone() for k, v in r.scorer.state_dict().items()}
        _snn_step(r, 0.5)
        assert changed(parameters(tnn_before, r.tnn), r.tnn.state_dict()) == set()
        assert changed(bn_stats(tnn_before), r.tnn.state_dict()) == set()
        moved = changed(parameters(snn_before, r.scorer), r.scorer.state_dict())
        if r.opt_s is not None:
            assert {"head.0.weight", "head.2.weight"} <= moved
        else:
            assert list(r.scorer.parameters()) == []  # a control has nothing to move
        tnn_before = {k: v.clone() for k, v in r.tnn.state_dict().items()}
        snn_before = {k: v.clone() for k, v in r.scorer.state_dict().items()}
        with torch.no_grad():
            factors = r.scorer(r.tnn)
        x, y = VGG_DATA.tensors[0][:32], VGG_DATA.tensors[1][:32]
        _tnn_step(r, x, y, factors)
        assert changed(snn_before, r.scorer.state_dict()) == set()
        tnn_params = parameters(tnn_before, r.tnn)
        # Units that are off get no gradient; at this line most units are on.
        assert len(changed(tnn_params, r.tnn.state_dict())) > len(tnn_params) // 2
        assert changed(bn_stats(tnn_before), r.tnn.state_dict()) == set(bn_stats(tnn_before))
    # Whatever was frozen for a step is trainable again, with its usual BatchNorm momentum.
    assert all(p.requires_grad for p in r.tnn.parameters())
    assert all(p.requires_grad for p in r.scorer.parameters())
    assert all(
        m.momentum == 0.1 for m in r.tnn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    assert all(g.factors is None for g in r.tnn.gates())


def test_fixed_phase_trains_the_task_network_under_unchanging_factors(tmp_path: Path) -> None:
    cfg = make_cfg(epochs=4, switch_epochs_fraction=0.5, tnn_steps_per_snn_step=1)
    result, states = fit_by_epoch(tmp_path, cfg)
    assert result.switcher is not None and result.factors is not None
    # Switching epochs (0, 1): the switcher moves; fixed epochs (2, 3): frozen factors only.
    assert [s["frozen"] is not None for s in states] == [False, False, True, True]
    assert changed(parameters(states[0]["snn"], result.switcher), states[1]["snn"])
    for epoch in (2, 3):
        assert changed(states[epoch - 1]["snn"], states[epoch]["snn"]) <= {"offset"}
        assert changed(states[epoch - 1]["tnn"], states[epoch]["tnn"])
    assert equal_states(states[2]["frozen"], states[3]["frozen"])
    assert equal_states(states[3]["frozen"], result.factors)


@pytest.mark.parametrize(
    ("overrides", "switched"),
    [({"compression": "none"}, True), ({}, True), ({}, False)],
    ids=["switcher-none", "switcher-target", "baseline"],
)
def test_training_lowers_the_task_loss(overrides: dict[str, Any], switched: bool) -> None:
    history = run(make_cfg(epochs=6, tnn_lr=0.2, **overrides), switched=switched).history
    losses = [r["loss"] for r in history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.85 * losses[0]
    assert losses[-1] < losses[-2]


# --- 2. determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"compression": "penalty"}, {"tnn_steps_per_snn_step": 3}],
    ids=["target", "penalty", "k3"],
)
def test_same_seed_is_bit_identical_and_other_seed_differs(overrides: dict[str, Any]) -> None:
    a = run(make_cfg(**overrides))
    b = run(make_cfg(**overrides))
    assert_identical(a, b)
    c = run(make_cfg(seed=1, **overrides))
    assert c.switcher is not None and a.switcher is not None
    assert not equal_states(a.model.state_dict(), c.model.state_dict())
    assert not equal_states(a.switcher.state_dict(), c.switcher.state_dict())


def test_same_seed_is_bit_identical_with_batchnorm() -> None:
    cfg = make_cfg(epochs=2)
    assert_identical(run(cfg, VGG_SPEC), run(cfg, VGG_SPEC))


# --- 3. checkpoints and resume ----------------------------------------------------------------


class Interrupt(Exception):
    pass


def stop_after(epoch: int) -> Callable[[int], None]:
    def hook(e: int) -> None:
        if e == epoch:
            raise Interrupt

    return hook


def recorder(seen: list[int]) -> Callable[[int], None]:
    return seen.append


# epochs=5, switch_epochs_fraction=0.6: switch_end = 3, factors frozen at the start of epoch 3.
RESUME_CASES = [
    pytest.param(1, {}, True, id="batch"),
    pytest.param(0, {"tnn_steps_per_snn_step": 2}, True, id="k2-odd-steps"),
    pytest.param(1, {"compression": "penalty"}, True, id="penalty"),
    pytest.param(2, {}, True, id="freeze-after-resume"),
    pytest.param(3, {}, True, id="frozen-in-checkpoint"),
    pytest.param(3, {"warmup_epochs": 1, "tnn_steps_per_snn_step": 3}, True, id="warmup-frozen"),
    pytest.param(1, {}, False, id="baseline"),
]


@pytest.mark.parametrize(("stop", "overrides", "switched"), RESUME_CASES)
def test_interrupted_then_resumed_run_equals_uninterrupted_run(
    tmp_path: Path, stop: int, overrides: dict[str, Any], switched: bool
) -> None:
    cfg = make_cfg(epochs=5, switch_epochs_fraction=0.6, **overrides)
    reference = run(cfg, switched=switched)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Interrupt):
        run(cfg, switched=switched, checkpoint_path=ckpt, on_epoch_end=stop_after(stop))
    blob = load_torch(ckpt)
    saved_epoch = stop + 1
    assert blob["epoch"] == saved_epoch
    if switched:
        # The frozen factors are in the checkpoint exactly when the fixed phase had started.
        assert (blob["frozen"] is not None) == (saved_epoch > 3)
    seen: list[int] = []
    resumed = run(cfg, switched=switched, checkpoint_path=ckpt, on_epoch_end=recorder(seen))
    assert seen == list(range(saved_epoch, cfg.epochs))  # really resumed, not restarted
    assert_identical(reference, resumed)
    assert os.listdir(tmp_path) == ["run.ckpt"]  # no temporary files left behind


@pytest.mark.parametrize(
    ("first", "second_kwargs"),
    [
        ({"seed": 1}, {}),
        ({"tnn_lr": 0.01}, {}),
        ({}, {"switched": False}),
        ({}, {"n": 150}),
    ],
    ids=["seed", "lr", "switched", "data-size"],
)
def test_checkpoint_from_other_settings_is_ignored(
    tmp_path: Path, first: dict[str, Any], second_kwargs: dict[str, Any]
) -> None:
    ckpt = tmp_path / "run.ckpt"
    fit(MLP_SPEC, MLP_DATA, None, make_cfg(**first), progress=False, checkpoint_path=ckpt)
    assert load_torch(ckpt)["epoch"] == BASE["epochs"]
    switched = second_kwargs.get("switched", True)
    data = make_data(MLP_SPEC.in_shape, n=second_kwargs.get("n", 200))
    seen: list[int] = []
    cfg = make_cfg()
    result = fit(
        MLP_SPEC,
        data,
        None,
        cfg,
        switched=switched,
        progress=False,
        checkpoint_path=ckpt,
        on_epoch_end=recorder(seen),
    )
    assert seen == list(range(cfg.epochs))  # a fresh start
    assert_identical(result, fit(MLP_SPEC, data, None, cfg, switched=switched, progress=False))


def test_checkpoint_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while saving leaves the previous checkpoint whole and no temporary file."""
    cfg = make_cfg()
    ckpt = tmp_path / "run.ckpt"
    real_save = torch.save
    saves = {"n": 0}

    def crashing_save(obj: Any, fh: Any, *args: Any, **kwargs: Any) -> None:
        saves["n"] += 1
        if saves["n"] == 3:
            fh.write(b"half a checkpoint")
            raise Interrupt
        real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(Interrupt):
        run(cfg, checkpoint_path=ckpt)
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path) == ["run.ckpt"]
    assert load_torch(ckpt)["epoch"] == 2  # the last complete save
    seen: list[int] = []
    resumed = run(cfg, checkpoint_path=ckpt, on_epoch_end=recorder(seen))
    assert seen == [2, 3]
    assert_identical(run(cfg), resumed)
    assert os.listdir(tmp_path) == ["run.ckpt"]


# --- 4. compression control -------------------------------------------------------------------


def kept_ratio(spec: ModelSpec, factors: dict[str, torch.Tensor], metric: str) -> float:
    costs = CostModel(build_model(spec))
    widths = {k: int((v > 0).sum()) for k, v in factors.items()}
    return float(costs.cost(metric, widths)) / float(costs.cost(metric))


def assert_no_group_empty(factors: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    assert set(factors) == set(spec.widths)
    for name, v in factors.items():
        assert v.shape == (spec.widths[name],)
        assert bool((v >= 0).all()) and bool(torch.isfinite(v).all())
        assert int((v > 0).sum()) >= 1, f"group {name} was emptied"


@pytest.mark.parametrize(
    ("ratio", "overrides"),
    [(0.4, {}), (0.2, {}), (0.3, {"switch_epochs_fraction": 1.0}), (0.3, {"warmup_epochs": 1})],
    ids=["0.4", "0.2", "no-fixed-phase", "warmup"],
)
def test_target_mode_reaches_the_params_ratio(ratio: float, overrides: dict[str, Any]) -> None:
    result = run(make_cfg(target_ratio=ratio, **overrides))
    assert result.factors is not None
    assert_no_group_empty(result.factors, MLP_SPEC)
    reached = result.metrics["train_params_ratio"]
    assert reached == pytest.approx(kept_ratio(MLP_SPEC, result.factors, "params"))
    assert reached <= ratio + 1e-9
    assert reached >= ratio - 0.1  # reaches the target, does not overshoot far below it


def test_target_mode_reaches_the_macs_ratio_on_a_conv_net() -> None:
    result = run(make_cfg(epochs=3, target_metric="macs", target_ratio=0.3), VGG_SPEC)
    assert result.factors is not None
    assert_no_group_empty(result.factors, VGG_SPEC)
    reached = result.metrics["train_macs_ratio"]
    assert reached == pytest.approx(kept_ratio(VGG_SPEC, result.factors, "macs"))
    assert 0.2 <= reached <= 0.3 + 1e-9


def test_width_multiple_gives_hardware_friendly_widths_within_the_budget() -> None:
    result = run(make_cfg(epochs=3, target_ratio=0.3, width_multiple=8), VGG_SPEC)
    assert result.factors is not None and result.switcher is not None
    assert result.switcher.spec.multiple == 8
    widths = {k: int((v > 0).sum()) for k, v in result.factors.items()}
    assert all(w % 8 == 0 for w in widths.values()), widths
    assert widths != VGG_SPEC.widths
    assert result.metrics["train_params_ratio"] <= 0.3 + 1e-9


@pytest.mark.parametrize("metric", ["params", "macs"])
def test_budget_offset_with_a_width_multiple_meets_the_budget(metric: str) -> None:
    tnn = build_model(VGG_SPEC)
    costs = CostModel(tnn)
    g = torch.Generator().manual_seed(7)
    scores = {k: torch.randn(w, generator=g) for k, w in VGG_SPEC.widths.items()}
    budget = 0.3 * float(costs.cost(metric))
    offset = budget_offset(scores, costs, metric, budget, multiple=8)
    switcher = Switcher(SwitcherSpec(mode="budget", multiple=8))
    switcher.offset.fill_(offset)
    widths = {k: int((switcher.gate(v) > 0).sum()) for k, v in scores.items()}
    assert all(w % 8 == 0 for w in widths.values()), widths
    assert float(costs.cost(metric, widths)) <= budget
    # Without the multiple, the same budget gives other (odd) widths.
    plain = budget_offset(scores, costs, metric, budget)
    assert {k: max(1, int((v > plain).sum())) for k, v in scores.items()} != widths


def test_tiny_target_keeps_one_unit_per_group() -> None:
    result = run(make_cfg(target_ratio=0.01))
    assert result.factors is not None
    assert {k: int((v > 0).sum()) for k, v in result.factors.items()} == {"fc1": 1, "fc2": 1}


def test_none_mode_trains_the_switcher_on_the_task_loss_only() -> None:
    cfg = make_cfg(compression="none")
    result = run(cfg)
    assert result.switcher is not None and result.factors is not None
    assert result.switcher.spec.mode == "relu"
    assert float(result.switcher.offset) == 0.0
    assert_no_group_empty(result.factors, MLP_SPEC)
    torch.manual_seed(cfg.seed)
    fresh = Switcher(SwitcherSpec(cfg.snn_hidden))
    assert not equal_states(fresh.state_dict(), result.switcher.state_dict())
    assert result.metrics["train_params_ratio"] == pytest.approx(
        kept_ratio(MLP_SPEC, result.factors, "params")
    )
    assert all("params_ratio" in r for r in result.history)


def test_penalty_mode_switches_units_off_but_never_empties_a_group() -> None:
    mild = run(make_cfg(compression="penalty", penalty=0.0))
    harsh = run(make_cfg(compression="penalty", penalty=100.0))
    assert mild.factors is not None and harsh.factors is not None
    for result in (mild, harsh):
        assert_no_group_empty(result.factors, MLP_SPEC)
    kept = {k: int((v > 0).sum()) for k, v in harsh.factors.items()}
    assert sum(kept.values()) < sum(MLP_SPEC.widths.values())
    assert harsh.metrics["train_params_ratio"] < mild.metrics["train_params_ratio"]
    assert harsh.metrics["train_params_ratio"] == pytest.approx(
        kept_ratio(MLP_SPEC, harsh.factors, "params")
    )


@pytest.mark.parametrize("metric", ["params", "macs"])
@pytest.mark.parametrize("ratio", [0.0, 0.02, 0.1, 0.35, 0.8, 1.0])
def test_budget_offset_meets_the_budget_and_keeps_a_unit_per_group(
    metric: str, ratio: float
) -> None:
    tnn = build_model(VGG_SPEC)
    costs = CostModel(tnn)
    g = torch.Generator().manual_seed(3)
    scores = {k: torch.randn(w, generator=g) for k, w in VGG_SPEC.widths.items()}
    budget = ratio * float(costs.cost(metric))
    offset = budget_offset(scores, costs, metric, budget)

    switcher = Switcher(SwitcherSpec(mode="budget"))
    switcher.offset.fill_(offset)
    factors = {k: switcher.gate(v) for k, v in scores.items()}
    widths = {k: int((v > 0).sum()) for k, v in factors.items()}
    assert all(w >= 1 for w in widths.values())
    assert widths == hard_widths(factors)
    floor = float(costs.cost(metric, dict.fromkeys(widths, 1)))
    if budget >= floor:
        assert float(costs.cost(metric, widths)) <= budget
        # The lowest such offset: one more unit (the next score down) would break the budget.
        below = [float(s) for v in scores.values() for s in v if float(s) < offset]
        if below:
            lower = max(below)
            more = {k: max(1, int((v > lower).sum())) for k, v in scores.items()}
            assert float(costs.cost(metric, more)) > budget
    else:
        assert widths == dict.fromkeys(widths, 1)  # impossible budget: the floor
    if ratio == 1.0:
        assert widths == VGG_SPEC.widths


def test_ramped_target() -> None:
    assert ramped_target(0.4, 0.0, 0.5) == 1.0
    assert ramped_target(0.4, 0.5, 0.5) == pytest.approx(0.4)
    assert ramped_target(0.4, 1.0, 0.5) == pytest.approx(0.4)
    assert ramped_target(0.4, 3.0, 0.5) == pytest.approx(0.4)
    assert ramped_target(0.4, -1.0, 0.5) == 1.0
    assert ramped_target(0.25, 0.0, 0.0) == pytest.approx(0.25)  # no ramp: at once
    values = [ramped_target(0.3, t / 20, 0.8) for t in range(21)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert 0.3 < values[8] < 1.0  # halfway down the ramp
    assert values[16] == pytest.approx(0.3)


# --- 5. scorers and compression modes ---------------------------------------------------------


@pytest.mark.parametrize("scorer", ["magnitude", "random"])
def test_fixed_scorers_share_the_schedule_and_reach_the_target(scorer: str) -> None:
    result = run(make_cfg(scorer=scorer, target_ratio=0.3))
    assert result.factors is not None and result.switcher is not None
    assert result.switcher.spec.scorer == scorer
    assert list(result.switcher.parameters()) == []  # nothing to learn
    assert_no_group_empty(result.factors, MLP_SPEC)
    # Kept units are unscaled: the control only selects.
    assert all(set(v.unique().tolist()) <= {0.0, 1.0} for v in result.factors.values())
    assert 0.2 <= result.metrics["train_params_ratio"] <= 0.3 + 1e-9
    assert_identical(result, run(make_cfg(scorer=scorer, target_ratio=0.3)))


def test_magnitude_scorer_keeps_the_largest_incoming_norms() -> None:
    result = run(make_cfg(scorer="magnitude", target_ratio=0.3, switch_epochs_fraction=1.0))
    assert result.factors is not None
    modules = dict(result.model.named_modules())
    for name, f in result.factors.items():
        norms = modules[name].weight.detach().norm(dim=1)
        kept, dropped = norms[f > 0], norms[f == 0]
        if dropped.numel():
            assert float(kept.min()) >= float(dropped.max())


def test_group_norm_scorer_keeps_the_largest_coupled_norms_and_reaches_the_target() -> None:
    cfg = make_cfg(scorer="group_norm", target_ratio=0.3, switch_epochs_fraction=1.0)
    result = run(cfg)
    assert result.factors is not None and result.switcher is not None
    assert 0.2 <= result.metrics["train_params_ratio"] <= 0.3 + 1e-9
    scores = group_norm_scores(result.model)
    for name, f in result.factors.items():
        if (f == 0).any():
            assert float(scores[name][f > 0].min()) >= float(scores[name][f == 0].max())
    assert_identical(result, run(cfg))


def test_random_scorer_keeps_the_units_its_seed_ranks_first() -> None:
    a = run(make_cfg(scorer="random", target_ratio=0.3))
    b = run(make_cfg(scorer="random", target_ratio=0.3, seed=1))
    assert a.factors is not None and b.factors is not None and a.switcher is not None
    scores = a.switcher.scores(a.model)
    for name, f in a.factors.items():
        assert float(scores[name][f > 0].min()) >= float(scores[name][f == 0].max())
    assert any(not torch.equal(a.factors[k], b.factors[k]) for k in a.factors)


@pytest.mark.parametrize(
    "overrides",
    [
        {"gate_temperature": 0.1},
        {"gate_temperature": 0.3},
    ],
    ids=["T0.1", "T0.3"],
)
def test_switcher_variants_are_deterministic_and_reach_the_target(
    overrides: dict[str, Any],
) -> None:
    a, b = run(make_cfg(**overrides)), run(make_cfg(**overrides))
    assert_identical(a, b)
    assert a.factors is not None
    assert_no_group_empty(a.factors, MLP_SPEC)
    assert 0.3 <= a.metrics["train_params_ratio"] <= 0.4 + 1e-9
    other = run(make_cfg(seed=1, **overrides))
    assert not equal_states(a.model.state_dict(), other.model.state_dict())


def test_prior_switcher_starts_from_the_magnitude_order() -> None:
    tnn = build_model(MLP_SPEC)
    torch.manual_seed(0)
    snn = Switcher(SwitcherSpec(8, "budget", prior=True))
    modules = dict(tnn.named_modules())
    for name, s in snn.scores(tnn).items():
        norms = modules[name].weight.detach().norm(dim=1)
        # The learned part starts within ~0.01 of a constant: the order is magnitude's.
        top = torch.topk(norms, 5).indices
        assert set(torch.topk(s.detach(), 5).indices.tolist()) == set(top.tolist())


def test_auto_mode_finds_a_ratio_within_the_accuracy_drop() -> None:
    cfg = make_cfg(epochs=8, compression="auto", max_accuracy_drop=0.05, switch_epochs_fraction=0.9)
    data = make_data(MLP_SPEC.in_shape, n=400)
    val = make_data(MLP_SPEC.in_shape, n=200, seed=0)
    result = fit(MLP_SPEC, data, val, cfg, progress=False)
    assert result.factors is not None
    ratio = result.metrics["auto_ratio"]
    # Accepted ratios are powers of the shrink factor; the final net meets the accepted one.
    k = round(math.log(ratio) / math.log(cfg.auto_shrink))
    assert ratio == pytest.approx(cfg.auto_shrink**k)
    assert result.metrics["train_params_ratio"] <= ratio + 1e-9
    reference = result.metrics["auto_reference_accuracy"]
    assert reference == result.history[0]["val_accuracy"]
    if ratio < 1.0:
        # The epoch whose trial was accepted stayed within the drop.
        ok = [r for r in result.history[1:] if r["params_ratio"] <= ratio + 1e-9]
        assert ok and ok[0]["val_accuracy"] >= reference - cfg.max_accuracy_drop


def test_auto_mode_with_no_tolerance_keeps_more_than_with_a_loose_one() -> None:
    data = make_data(MLP_SPEC.in_shape, n=400)
    val = make_data(MLP_SPEC.in_shape, n=200, seed=0)
    strict = fit(MLP_SPEC, data, val, make_cfg(epochs=8, compression="auto",
                 max_accuracy_drop=0.0), progress=False)  # fmt: skip
    loose = fit(MLP_SPEC, data, val, make_cfg(epochs=8, compression="auto",
                max_accuracy_drop=0.9), progress=False)  # fmt: skip
    assert loose.metrics["auto_ratio"] < strict.metrics["auto_ratio"]
    assert loose.metrics["train_params_ratio"] < strict.metrics["train_params_ratio"]


def test_prior_switcher_moves_a_score_at_most_prior_range_from_magnitude() -> None:
    tnn = build_model(MLP_SPEC)
    snn = Switcher(SwitcherSpec(8, "budget", prior=True))
    with torch.no_grad():
        for p in snn.parameters():
            p.mul_(0).add_(torch.randn_like(p) * 50)  # a head gone wild
    prior = magnitude_scores(tnn)
    for name, s in snn.scores(tnn).items():
        gap = (s.detach() - torch.log(prior[name] + 1e-6)).abs()
        assert float(gap.max()) <= PRIOR_RANGE + 1e-6
        assert float(gap.max()) > 0.1 * PRIOR_RANGE  # the learned part does act


# --- 6. GPU readiness (checked with what the CPU allows) ---------------------------------------


@pytest.mark.parametrize(
    ("amp", "device", "bf16", "expected"),
    [
        ("auto", "cpu", True, None),
        ("fp16", "cpu", True, None),
        ("off", "cuda", True, None),
        ("auto", "cuda", True, torch.bfloat16),
        ("auto", "cuda", False, torch.float16),
        ("bf16", "cuda", False, torch.bfloat16),
        ("fp16", "cuda", True, torch.float16),
    ],
)
def test_mixed_precision_only_on_cuda(
    amp: str, device: str, bf16: bool, expected: torch.dtype | None
) -> None:
    got = resolve_amp(amp, torch.device(device), bf16_supported=lambda: bf16)
    assert got == expected


def test_training_steps_do_not_read_values_back_each_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU every ``float(tensor)`` waits for the device: steps must not do it."""
    reads = {"n": 0}
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item

    def counting_float(self: torch.Tensor) -> float:
        reads["n"] += 1
        return real_float(self)

    def counting_item(self: torch.Tensor) -> Any:
        reads["n"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "__float__", counting_float)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    result = run(make_cfg(epochs=4), switched=False)  # 7 steps an epoch
    assert len(result.history) == 4 and all(math.isfinite(r["loss"]) for r in result.history)
    assert reads["n"] == 0
