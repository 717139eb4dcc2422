"""The peers' own recipes (``bench/recipes.py``) on tiny networks and random data."""

from __future__ import annotations

import copy

import pytest
import torch
from bench_support import load_bench_script
from torch.utils.data import TensorDataset

from switchprune.config import ModelConfig, TrainConfig
from switchprune.evaluation import count_params
from switchprune.models import ModelSpec, build_model, spec_from_config

R = load_bench_script("recipes")
NUM_CLASSES = 5
CONFIGS = {
    "mlp": (ModelConfig(arch="mlp", hidden=(48, 32)), (1, 16, 16)),
    "vgg11": (ModelConfig(arch="vgg11", width_multiplier=0.125), (3, 16, 16)),
}
BUDGET = R.Budget(train_epochs=1, finetune_epochs=1, ramp_fraction=0.5)
LR = 0.05


def _spec(arch: str) -> ModelSpec:
    cfg, in_shape = CONFIGS[arch]
    return spec_from_config(cfg, in_shape, NUM_CLASSES)


def _data(in_shape: tuple[int, ...], n: int = 192) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, *in_shape, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)
    )


def _strength(recipe: str) -> float:
    return R.GRIDS[recipe][1]


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("recipe", R.RECIPES)
def test_every_recipe_meets_the_params_target_closely(arch: str, recipe: str) -> None:
    spec = _spec(arch)
    model = R.run_recipe(
        recipe, spec, _data(spec.in_shape), ("params", 0.3), _strength(recipe), BUDGET, LR, 0
    )
    ratio = count_params(model) / count_params(build_model(spec))
    assert 0.8 * 0.3 <= ratio <= 0.3
    assert model.classifier.out_features == NUM_CLASSES
    x = torch.randn(3, *spec.in_shape)
    assert model(x).shape == (3, NUM_CLASSES)


def test_budget_matches_our_switching_and_fixed_phases() -> None:
    assert R.budget_of(TrainConfig(epochs=10)) == R.Budget(8, 2, 0.5)
    assert R.budget_of(TrainConfig(epochs=3)) == R.Budget(2, 1, 0.5)
    assert R.budget_of(TrainConfig(epochs=1)) == R.Budget(1, 0, 0.5)


def test_fine_tuning_restarts_its_schedule_with_a_new_optimiser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = _spec("mlp")
    data = _data(spec.in_shape, n=128)  # 2 steps per epoch
    trained = R.sparse_train("depgraph", spec, data, 5e-4, 1, LR, 0)
    seen: list[tuple[int, float]] = []
    step = torch.optim.SGD.step

    def spy(self: torch.optim.SGD, *args: object, **kwargs: object) -> object:
        seen.append((id(self), self.param_groups[0]["lr"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    R.prune_and_finetune(trained, "depgraph", ("params", 0.3), data, 2, LR, 0)
    start = LR * R.FINETUNE_LR_FACTOR
    assert [lr for _, lr in seen] == pytest.approx([start, start, start / 2, start / 2])
    assert len({opt for opt, _ in seen}) == 1


def test_iterative_prunes_in_n_steps_down_a_linear_schedule() -> None:
    spec = _spec("vgg11")
    budget = R.Budget(train_epochs=2, finetune_epochs=0, ramp_fraction=0.5)
    model, costs = R.train_iterative(spec, _data(spec.in_shape), ("params", 0.2), 3, budget, LR, 0)
    assert len(costs) == 3
    goals = [1 - 0.8 * k / 3 for k in (1, 2, 3)]
    assert all(0.8 * g <= c <= g for c, g in zip(costs, goals, strict=True))
    assert costs == sorted(costs, reverse=True)
    assert count_params(model) / count_params(build_model(spec)) == pytest.approx(costs[-1])


def test_prune_steps_spread_over_the_ramp() -> None:
    assert R.prune_steps(4, 100, 0.5) == {12: 1, 25: 2, 38: 3, 50: 4}
    assert R.prune_steps(2, 100, 1.0) == {50: 1, 100: 2}
    # Fewer steps than prunes: every prune gets its own step while there are steps left.
    assert R.prune_steps(4, 3, 0.5) == {1: 1, 2: 2, 3: 4}


def test_training_after_a_prune_changes_the_new_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec("mlp")
    after_prune = []
    prune = R.prune_to_target

    def keep_copy(*args: object, **kwargs: object) -> object:
        pruned, mode = prune(*args, **kwargs)
        after_prune.append(copy.deepcopy(pruned.state_dict()))
        return pruned, mode

    monkeypatch.setattr(R, "prune_to_target", keep_copy)
    # One prune a quarter into training, no fine-tuning: only the training loop moves them.
    budget = R.Budget(train_epochs=1, finetune_epochs=0, ramp_fraction=0.25)
    model, costs = R.train_iterative(spec, _data(spec.in_shape), ("params", 0.3), 1, budget, LR, 0)
    assert len(costs) == 1 and len(after_prune) == 1
    final = model.state_dict()
    assert final.keys() == after_prune[0].keys()
    assert all(final[k].shape == after_prune[0][k].shape for k in final)
    assert any(not torch.equal(final[k], after_prune[0][k]) for k in final)


def test_fine_tuning_changes_the_pruned_model(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec("vgg11")
    data = _data(spec.in_shape)
    trained = R.sparse_train("slimming-recipe", spec, data, 1e-4, 1, LR, 0)
    untuned = R.prune_and_finetune(trained, "slimming-recipe", ("params", 0.3), data, 0, LR, 0)
    tuned = R.prune_and_finetune(trained, "slimming-recipe", ("params", 0.3), data, 1, LR, 0)
    a, b = untuned.state_dict(), tuned.state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_the_grid_chooses_by_validation_accuracy(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec("mlp")
    data = _data(spec.in_shape, n=100)
    val_acc = {1e-5: 0.5, 1e-4: 0.9, 1e-3: 0.7}
    trained_on: list[int] = []

    def fake_run(recipe, spec, train, target, strength, budget, lr, seed, cache):  # noqa: ANN001, ANN202
        trained_on.append(len(train))
        # The 0.13 target prefers the smallest value, tied with the largest.
        return strength if target[1] == 0.3 else {1e-5: 0.8, 1e-4: 0.1, 1e-3: 0.8}[strength]

    monkeypatch.setattr(R, "run_recipe", fake_run)
    monkeypatch.setattr(R, "predict_logits", lambda model, val, device: model)
    monkeypatch.setattr(R, "accuracy_from_logits", lambda logits, y: val_acc.get(logits, logits))
    targets = (("params", 0.3), ("params", 0.13))
    chosen = R.choose("slimming-recipe", spec, data, targets, BUDGET, LR, 3)
    assert chosen["params", 0.3]["strength"] == 1e-4
    assert chosen["params", 0.3]["val_accuracy"] == {"1e-05": 0.5, "0.0001": 0.9, "0.001": 0.7}
    assert chosen["params", 0.13]["strength"] == 1e-5  # a tie goes to the earlier value
    assert chosen["params", 0.3]["seed"] == 3
    assert trained_on == [90] * 6  # trained without the 10 % held out


def test_holdout_is_a_seeded_disjoint_split() -> None:
    data = TensorDataset(torch.arange(50).float()[:, None], torch.arange(50))
    train, val = R.holdout(data, 0.1, 0)
    assert len(val) == 5 and len(train) == 45
    assert set(train.tensors[1].tolist()).isdisjoint(val.tensors[1].tolist())
    again = R.holdout(data, 0.1, 0)[1]
    assert torch.equal(again.tensors[1], val.tensors[1])


def test_depgraph_regularisation_shrinks_the_weights() -> None:
    spec = _spec("vgg11")
    data = _data(spec.in_shape)

    def norm(reg: float) -> float:
        model = R.sparse_train("depgraph", spec, data, reg, 1, LR, 0)
        return float(sum(p.detach().pow(2).sum() for p in model.parameters()))

    assert norm(1.0) < norm(0.0)


def test_unknown_recipe_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown recipe"):
        R.importance("taylor", build_model(_spec("mlp")))
