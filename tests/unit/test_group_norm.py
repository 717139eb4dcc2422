"""``train.scorer: group_norm``: DepGraph's score, checked against Torch-Pruning's own."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from model_support import REPRESENTATIVE_ARCHS
from switchprune.models import TaskNet
from switchprune.scoring import build_scorer
from switchprune.scoring.scorers import GroupNormScorer, SwitcherSpec
from switchprune.scoring.units import group_norm_scores, magnitude_scores


def _perturbed(model: TaskNet, seed: int = 3) -> TaskNet:
    """Random biases and BatchNorm affine terms, so every coupled parameter counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name in ("bias", "weight") if isinstance(module, nn.BatchNorm2d) else ("bias",):
                p = getattr(module, name, None)
                if isinstance(p, torch.Tensor):
                    p.copy_(torch.randn(p.shape, generator=g))
    return model


def _torch_pruning_norms(model: TaskNet, in_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per group (by its first writer), the root of Torch-Pruning's summed squared importance.

    Torch-Pruning scores no depthwise filter (its depthwise out-channel pruning is not among
    the functions it scores), though removing the unit removes it: those are added here.
    """
    example = torch.zeros(1, *in_shape)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    importance = tp.importance.GroupMagnitudeImportance(
        p=2, group_reduction="sum", normalizer=None, bias=True
    )
    names = {module: name for name, module in model.named_modules()}
    out = {}
    for group in dg.get_all_groups(ignored_layers=[model.classifier]):
        imp = importance(group)
        if imp is None:
            continue
        for dep, idxs in group:
            if dep.pruning_fn == function.prune_depthwise_conv_out_channels:
                imp = imp + dep.layer.weight.detach()[idxs].flatten(1).pow(2).sum(1)
        out[names[group[0].dep.target.module]] = imp.sqrt()
    return out


@pytest.mark.parametrize("arch", REPRESENTATIVE_ARCHS)
def test_group_norm_is_torch_pruning_group_importance(
    arch: str, tiny_net: Callable[..., TaskNet], in_shapes: dict[str, tuple[int, int, int]]
) -> None:
    model = _perturbed(tiny_net(arch)).eval()
    ours = group_norm_scores(model)
    theirs = _torch_pruning_norms(model, in_shapes[arch])
    compared = 0
    for g in model.groups:
        found = [theirs[w] for w in g.writers if w in theirs]
        assert found, f"{g.name}: no Torch-Pruning group for its writers {g.writers}"
        norm = found[0]
        torch.testing.assert_close(ours[g.name], norm / norm.mean(), rtol=1e-4, atol=1e-6)
        compared += 1
    assert compared == len(model.groups)


def test_group_norm_counts_what_magnitude_leaves_out(
    tiny_net: Callable[..., TaskNet],
) -> None:
    """A unit with small incoming but large outgoing weights ranks low by magnitude only."""
    model = tiny_net("mlp").eval()
    g = model.groups[0]
    modules = dict(model.named_modules())
    with torch.no_grad():
        modules[g.writers[0]].weight[0].mul_(0.01)
        for reader in g.readers:
            modules[reader].weight[:, 0].mul_(1000.0)
    assert int(magnitude_scores(model)[g.name].argmin()) == 0
    assert int(group_norm_scores(model)[g.name].argmax()) == 0


def test_group_norm_is_a_scorer_of_its_own() -> None:
    spec = SwitcherSpec(hidden=4, mode="budget", scorer="group_norm")
    from switchprune.models import ModelSpec, build_model

    model = build_model(ModelSpec("mlp", (1, 8, 8), 10, {"fc1": 8, "fc2": 4}))
    scorer = build_scorer(spec, model)
    assert isinstance(scorer, GroupNormScorer)
    assert not list(scorer.parameters())  # nothing to learn
    scores = scorer.scores(model)
    assert {k: v.shape[0] for k, v in scores.items()} == model.group_sizes()
