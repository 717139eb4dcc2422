"""The Torch-Pruning baselines of the benchmark on tiny networks and random data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from bench_support import load_bench_script
from torch import nn
from torch.utils.data import TensorDataset

from switchprune.config import ModelConfig
from switchprune.evaluation import count_macs, count_params
from switchprune.models import ModelSpec, TaskNet, build_model, spec_from_config

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 5
CONFIGS = {
    "mlp": (ModelConfig(arch="mlp", hidden=(48, 32)), (1, 16, 16)),
    "vgg11": (ModelConfig(arch="vgg11", width_multiplier=0.125), (3, 16, 16)),
}


B = load_bench_script("baselines")


def _spec(arch: str) -> ModelSpec:
    cfg, in_shape = CONFIGS[arch]
    return spec_from_config(cfg, in_shape, NUM_CLASSES)


def _data(in_shape: tuple[int, int, int], n: int = 192) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, *in_shape, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)
    )


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _units(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


@pytest.fixture(scope="module")
def trained_plain() -> dict[str, TaskNet]:
    out = {}
    for arch in CONFIGS:
        torch.manual_seed(0)
        model = build_model(_spec(arch))
        B.train_sgd(model, _data(_spec(arch).in_shape), 1, lr=0.05, seed=0)
        out[arch] = model
    return out


@pytest.fixture(scope="module")
def results(trained_plain: dict[str, TaskNet]) -> dict[tuple[str, str], dict]:
    out = {}
    for arch in CONFIGS:
        spec = _spec(arch)
        plain = trained_plain[arch]
        before = copy.deepcopy(plain.state_dict())
        for method in B.METHODS:
            models = B.run_baseline(
                method,
                spec,
                _data(spec.in_shape),
                target_metric="params",
                target_ratio=0.3,
                epochs=1,
                finetune_epochs=1,
                lr=0.05,
                seed=0,
                trained_plain=plain if method == "l1norm" else None,
            )
            out[arch, method] = {"models": models, "plain_before": before}
    return out


CASES = [(arch, method) for arch in CONFIGS for method in B.METHODS]


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_meets_the_params_target_closely(results, arch: str, method: str) -> None:
    full = count_params(build_model(_spec(arch)))
    for model in results[arch, method]["models"].values():
        ratio = count_params(model) / full
        assert 0.8 * 0.3 <= ratio <= 0.3


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_no_layer_is_emptied_and_the_classifier_keeps_its_outputs(
    results, arch: str, method: str
) -> None:
    model = results[arch, method]["models"]["pruned"]
    assert all(min(_units(layer)) >= 1 for layer in _layers(model))
    assert model.classifier.out_features == NUM_CLASSES
    assert count_params(model) < count_params(build_model(_spec(arch)))


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_pruned_models_give_logits_and_match_their_spec(results, arch: str, method: str) -> None:
    spec = _spec(arch)
    for model in results[arch, method]["models"].values():
        x = torch.randn(7, *spec.in_shape)
        assert model(x).shape == (7, NUM_CLASSES)
        # The reported widths rebuild the same network.
        rebuilt = build_model(model.spec)
        rebuilt.load_state_dict(model.state_dict())
        rebuilt.eval()
        torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_fine_tuning_changes_the_pruned_model(results, arch: str, method: str) -> None:
    models = results[arch, method]["models"]
    pruned, tuned = models["pruned"].state_dict(), models["pruned+ft"].state_dict()
    assert pruned.keys() == tuned.keys()
    assert any(not torch.equal(pruned[k], tuned[k]) for k in pruned)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_trained_plain_is_not_modified(results, trained_plain, arch: str) -> None:
    before = results[arch, "l1norm"]["plain_before"]
    after = trained_plain[arch].state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_macs_target_is_met() -> None:
    spec = _spec("vgg11")
    torch.manual_seed(0)
    model = build_model(spec).eval()
    pruned, mode = B.prune_to_target(
        model, tp.importance.MagnitudeImportance(p=1), target_metric="macs", target_ratio=0.3
    )
    ratio = count_macs(pruned, spec.in_shape) / count_macs(model, spec.in_shape)
    assert mode == "global"
    assert 0.8 * 0.3 <= ratio <= 0.3


def test_global_ranking_caps_a_layer_whose_scores_are_all_smallest() -> None:
    spec = _spec("vgg11")
    torch.manual_seed(0)
    model = build_model(spec).eval()
    with torch.no_grad():
        for i in range(1, 9):
            getattr(model, f"bn{i}").weight.uniform_(0.5, 1.0)
        model.bn3.weight.mul_(1e-3)  # globally the least important units
    pruned, mode = B.prune_to_target(
        model,
        tp.importance.BNScaleImportance(normalizer=None),
        target_metric="params",
        target_ratio=0.5,
        max_pruning_ratio=0.75,
    )
    assert mode == "global"
    width = spec.widths["conv3"]
    assert pruned.spec.widths["conv3"] == width // 4  # the cap, not zero and not untouched
    assert count_params(pruned) <= 0.5 * count_params(model)


def test_falls_back_to_a_uniform_ratio_when_the_cap_blocks_the_target() -> None:
    spec = _spec("mlp")
    torch.manual_seed(0)
    model = build_model(spec).eval()
    imp = tp.importance.MagnitudeImportance(p=1)
    with pytest.warns(UserWarning, match="common ratio"):
        pruned, mode = B.prune_to_target(
            model, imp, target_metric="params", target_ratio=0.06, max_pruning_ratio=0.5
        )
    assert mode == "uniform"
    assert count_params(pruned) <= 0.06 * count_params(model)
    assert all(min(_units(layer)) >= 1 for layer in _layers(pruned))
    with pytest.raises(ValueError, match="emptying a layer"):
        B.prune_to_target(model, imp, target_metric="params", target_ratio=1e-4)


def test_unknown_method_or_metric_is_refused() -> None:
    spec = _spec("mlp")
    kwargs = {"epochs": 0, "finetune_epochs": 0, "lr": 0.05, "seed": 0}
    with pytest.raises(ValueError, match="baseline"):
        B.run_baseline(
            "taylor", spec, _data(spec.in_shape), target_metric="params", target_ratio=0.3, **kwargs
        )
    with pytest.raises(ValueError, match="metric"):
        B.run_baseline(
            "l1norm", spec, _data(spec.in_shape), target_metric="flops", target_ratio=0.3, **kwargs
        )


def test_group_lasso_gradient_agrees_with_autograd() -> None:
    spec = _spec("mlp")
    torch.manual_seed(0)
    model = build_model(spec).eval()
    reg = 0.1
    pruner = B.GroupLassoPruner(
        model,
        torch.zeros(1, *spec.in_shape),
        importance=B.slimming_importance(model),
        reg=reg,
        ignored_layers=[model.classifier],
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pruner.regularize(model)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    # Reference: reg * sum over hidden units of the L2 norm of (row, bias, next layer's column).
    penalty = torch.zeros(())
    for writer, reader in (("fc1", "fc2"), ("fc2", "classifier")):
        w, r = getattr(model, writer), getattr(model, reader)
        unit = torch.cat([w.weight, w.bias[:, None], r.weight.t()], dim=1)
        penalty = penalty + reg * unit.norm(dim=1).sum()
    for p in model.parameters():
        p.grad = None
    penalty.backward()
    for name, p in model.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got[name], expected)


def test_slimming_penalty_shrinks_batchnorm_scales() -> None:
    spec = _spec("vgg11")
    data = _data(spec.in_shape, n=192)  # 3 steps: the L1 pull is at most 3 * lr * reg

    def mean_gamma(reg: float) -> float:
        model = B.train_slimming(spec, data, epochs=1, lr=0.05, seed=0, reg=reg)
        gammas = [m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        return float(torch.cat(gammas).mean())

    assert mean_gamma(1.0) < mean_gamma(0.0) - 0.1
