"""Thresholding, folding and compaction, cost polynomials of compacted nets, and the model file."""

from __future__ import annotations

import os
import random

import pytest
import torch
from torch import nn

from model_support import ALL_ARCH_PARAMS
from switchprune.config import PruneConfig
from switchprune.cost import CostModel
from switchprune.evaluation import count_macs, count_params
from switchprune.io import ArtifactError, load_model_file, save_model
from switchprune.models import TaskNet
from switchprune.pruning import (
    compact,
    fold_factors,
    kept_widths,
    masked_factors,
    threshold_factors,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 5
TOL = 1e-5


def _batch(in_shape: tuple[int, int, int], n: int = 8, seed: int = 99) -> torch.Tensor:
    return torch.randn(n, *in_shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _gated_logits(
    model: TaskNet, factors: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Logits of the full model gated by the factors of the kept units only (eval mode)."""
    model.eval()
    model.set_factors(masked_factors(factors, kept))
    try:
        return model(x)
    finally:
        model.set_factors(None)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    assert a.dtype == b.dtype == torch.float32
    return float((a - b).abs().max())


def _check_compaction(model: TaskNet, factors, kept, x) -> TaskNet:
    """Compact and assert the smaller net reproduces the gated one; return the smaller net."""
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    small = compact(model, factors, kept)
    # The full model is left untouched (weights and gates).
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    assert all(gate.factors is None for gate in model.gates())
    # The small net is ungated, in eval mode and exactly as wide as the kept units.
    assert not small.training
    assert all(gate.factors is None for gate in small.gates())
    assert small.group_sizes() == kept_widths(kept)
    assert small.spec.widths == kept_widths(kept)
    assert small.spec.in_shape == model.spec.in_shape
    with torch.no_grad():
        out = small(x)
    ref = _gated_logits(model, factors, kept, x)
    assert _max_diff(out, ref) <= TOL
    return small


# --------------------------------------------------------------------------------------------
# Thresholding
# --------------------------------------------------------------------------------------------


def test_threshold_keeps_exactly_the_factors_above_threshold():
    factors = {"a": torch.tensor([0.0, 0.3, 0.0, 1.2, 0.05]), "b": torch.tensor([2.0, 0.0, 0.5])}
    kept = threshold_factors(factors, PruneConfig())
    assert kept["a"].tolist() == [1, 3, 4]
    assert kept["b"].tolist() == [0, 2]
    assert all(v.dtype == torch.int64 for v in kept.values())
    assert kept_widths(kept) == {"a": 3, "b": 2}
    # The threshold is strict: a factor equal to it is removed.
    kept = threshold_factors(factors, PruneConfig(threshold=0.3))
    assert kept["a"].tolist() == [3]
    assert kept["b"].tolist() == [0, 2]


@pytest.mark.parametrize("min_units", [1, 3])
def test_all_zero_group_keeps_min_units(min_units):
    factors = {
        "dead": torch.zeros(8),
        "tiny": torch.zeros(2),
        "mostly_dead": torch.tensor([0.0, 0.0, 0.7, 0.0, 0.0, 0.2]),
        "alive": torch.tensor([1.0, 0.5, 0.25, 2.0]),
    }
    kept = threshold_factors(factors, PruneConfig(min_units=min_units))
    widths = kept_widths(kept)
    assert widths["dead"] == min_units
    # Ties among zeros resolve by index, deterministically.
    assert kept["dead"].tolist() == list(range(min_units))
    # Never more units than the group has.
    assert widths["tiny"] == min(2, min_units)
    # The largest factors are the ones kept when the floor applies.
    if min_units == 1:
        assert kept["mostly_dead"].tolist() == [2, 5]
    else:
        assert kept["mostly_dead"].tolist() == [0, 2, 5]
    assert kept["alive"].tolist() == [0, 1, 2, 3]
    for name, idx in kept.items():
        assert idx.numel() >= 1
        assert torch.equal(idx, torch.sort(idx).values)
        assert idx.unique().numel() == idx.numel()
        assert int(idx.max()) < factors[name].numel()


def test_width_multiple_rounds_up_without_exceeding_full_width():
    g = torch.Generator().manual_seed(0)
    factors = {
        "five_of_16": torch.zeros(16),
        "eight_of_16": torch.zeros(16),
        "five_of_6": torch.zeros(6),
        "none_of_10": torch.zeros(10),
    }
    factors["five_of_16"][torch.randperm(16, generator=g)[:5]] = torch.rand(5, generator=g) + 0.1
    factors["eight_of_16"][:8] = 1.0
    factors["five_of_6"][1:] = torch.tensor([0.4, 0.3, 0.2, 0.9, 0.8])
    kept = threshold_factors(factors, PruneConfig(), multiple=4)
    widths = kept_widths(kept)
    assert widths == {"five_of_16": 8, "eight_of_16": 8, "five_of_6": 6, "none_of_10": 4}
    # The extra units are the next largest factors: every truly positive factor survives.
    for name, s in factors.items():
        positive = set(torch.nonzero(s > 0).flatten().tolist())
        assert positive <= set(kept[name].tolist()), name
    # The multiple combines with min_units: 3 rounds up to 4.
    kept = threshold_factors({"z": torch.zeros(10)}, PruneConfig(min_units=3), multiple=4)
    assert kept_widths(kept) == {"z": 4}
    kept = threshold_factors({"z": torch.zeros(3)}, PruneConfig(min_units=1), multiple=4)
    assert kept_widths(kept) == {"z": 3}


def test_relative_threshold_scales_with_each_groups_largest_factor():
    factors = {
        "big": torch.tensor([10.0, 5.0, 0.9, 2.0, 1.1]),
        "small": torch.tensor([0.10, 0.05, 0.009, 0.02, 0.011]),
    }
    kept = threshold_factors(factors, PruneConfig(threshold=0.1, relative=True))
    # tau = 1.0 and 0.01: the same pattern is kept in both groups.
    assert kept["big"].tolist() == [0, 1, 3, 4]
    assert kept["small"].tolist() == [0, 1, 3, 4]
    # The absolute threshold treats them differently.
    kept = threshold_factors(factors, PruneConfig(threshold=0.1))
    assert kept["big"].tolist() == [0, 1, 2, 3, 4]
    assert kept["small"].tolist() == [0]  # 0.10 is not > 0.1: min_units keeps the largest
    # An all-zero group under a relative threshold still keeps min_units.
    kept = threshold_factors({"z": torch.zeros(5)}, PruneConfig(threshold=0.5, relative=True))
    assert kept_widths(kept) == {"z": 1}


def test_masked_factors_zero_removed_units_and_detach():
    s = torch.tensor([0.5, 0.0, 2.0, 1.0], requires_grad=True)
    out = masked_factors({"a": s}, {"a": torch.tensor([0, 3])})
    assert out["a"].tolist() == [0.5, 0.0, 0.0, 1.0]
    assert not out["a"].requires_grad
    assert s.tolist() == [0.5, 0.0, 2.0, 1.0]


# --------------------------------------------------------------------------------------------
# Folding and compaction, every architecture
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCH_PARAMS)
def test_fold_factors_reproduces_the_gated_model(arch, tiny_net, random_factors, in_shapes):
    model = tiny_net(arch)
    factors = random_factors(model, seed=1)
    x = _batch(in_shapes[arch])
    with torch.no_grad():
        model.set_factors(factors)
        gated = model(x)
        fold_factors(model, factors)
        assert all(gate.factors is None for gate in model.gates())
        folded = model(x)
    assert _max_diff(folded, gated) <= TOL
    assert (gated - tiny_net(arch)(x)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ALL_ARCH_PARAMS)
def test_compacted_model_matches_gated_model(arch, tiny_net, random_factors, in_shapes):
    model = tiny_net(arch)
    factors = random_factors(model)
    # Every group has an exact zero, one has a single survivor.
    assert all(bool((f == 0).any()) for f in factors.values())
    assert sorted(int((f > 0).sum()) for f in factors.values())[0] == 1
    kept = threshold_factors(factors, PruneConfig())
    for name, f in factors.items():
        assert kept[name].tolist() == torch.nonzero(f > 0).flatten().tolist()
    x = _batch(in_shapes[arch])
    # The gating matters, so agreement below is not vacuous.
    with torch.no_grad():
        plain = model(x)
    assert (plain - _gated_logits(model, factors, kept, x)).abs().max() > 1e-3
    small = _check_compaction(model, factors, kept, x)
    assert count_params(small) < count_params(model)
    # The classifier keeps every output, no group was emptied.
    assert small.classifier.out_features == NUM_CLASSES
    assert small(x).shape == (x.shape[0], NUM_CLASSES)
    assert min(small.group_sizes().values()) >= 1
    # Residual stage groups really were compacted (all their writers and readers).
    if arch.startswith("resnet"):
        modules = dict(small.named_modules())
        for g in small.groups:
            assert g.size < model.group_sizes()[g.name]
            for writer in g.writers:
                assert modules[writer].out_channels == g.size
            for reader in g.readers:
                m = modules[reader]
                assert (m.in_channels if isinstance(m, nn.Conv2d) else m.in_features) == g.size


# The group reduced to a single unit: first and last groups (the last one feeds the classifier,
# LeNet's conv2 feeds a flatten) and every residual stream (several writers, several readers).
SPARSE_CASES = [
    ("mlp", "fc1"),
    ("mlp", "fc2"),
    ("lenet5", "conv1"),
    ("lenet5", "conv2"),
    ("lenet5", "fc1"),
    ("vgg11", "conv1"),
    ("vgg11", "conv8"),
    ("vgg16", "conv1"),
    ("vgg16", "conv13"),
    ("resnet20", "s1b0"),
    ("resnet20", "s3b2"),
    ("resnet20", "stage1"),
    ("resnet20", "stage2"),
    ("resnet20", "stage3"),
    ("resnet56", "s2b0"),
    ("resnet56", "stage1"),
    ("resnet56", "stage2"),
    ("resnet56", "stage3"),
]


@pytest.mark.parametrize(("arch", "sparse"), SPARSE_CASES)
def test_compaction_with_single_survivor_in_group(
    arch, sparse, tiny_net, random_factors, in_shapes
):
    model = tiny_net(arch)
    factors = random_factors(model, seed=5, sparse_group=sparse)
    kept = threshold_factors(factors, PruneConfig())
    assert kept_widths(kept)[sparse] == 1
    small = _check_compaction(model, factors, kept, _batch(in_shapes[arch], seed=5))
    assert small.group_sizes()[sparse] == 1


def test_compaction_of_every_residual_stream_at_once(tiny_net, random_factors, in_shapes):
    model = tiny_net("resnet20")
    factors = random_factors(model, seed=2)
    for stage in ("stage1", "stage2", "stage3"):
        f = torch.zeros(model.group_sizes()[stage])
        f[-1] = 1.3
        factors[stage] = f
    kept = threshold_factors(factors, PruneConfig())
    small = _check_compaction(model, factors, kept, _batch(in_shapes["resnet20"]))
    assert small.classifier.in_features == 1
    assert small.stage2[0].shortcut_conv.weight.shape[:2] == (1, 1)


@pytest.mark.parametrize("min_units", [1, 3])
@pytest.mark.parametrize("arch", ["mlp", "lenet5", "vgg11", "resnet20"])
def test_all_zero_group_is_never_emptied(arch, min_units, tiny_net, random_factors, in_shapes):
    model = tiny_net(arch)
    factors = random_factors(model, seed=3)
    names = [g.name for g in model.groups]
    dead = ["stage2"] if arch.startswith("resnet") else [names[0], names[-1]]
    for name in dead:
        factors[name] = torch.zeros_like(factors[name])
    kept = threshold_factors(factors, PruneConfig(min_units=min_units))
    for name in dead:
        assert kept_widths(kept)[name] == min_units
    small = _check_compaction(model, factors, kept, _batch(in_shapes[arch]))
    for name in dead:
        assert small.group_sizes()[name] == min_units
    for m in small.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            assert m.weight.numel() > 0
    assert small.classifier.out_features == NUM_CLASSES


@pytest.mark.parametrize("arch", ["mlp", "vgg11", "resnet20"])
def test_width_multiple_compaction_keeps_multiples(arch, tiny_net, random_factors, in_shapes):
    model = tiny_net(arch)
    factors = random_factors(model, seed=4)
    full = model.group_sizes()
    kept = threshold_factors(factors, PruneConfig(), multiple=4)
    widths = kept_widths(kept)
    for name, w in widths.items():
        assert w % 4 == 0 or w == full[name]
        assert int((factors[name] > 0).sum()) <= w <= full[name]
    small = _check_compaction(model, factors, kept, _batch(in_shapes[arch]))
    assert small.group_sizes() == widths


@pytest.mark.parametrize("arch", ALL_ARCH_PARAMS)
def test_relative_threshold_compaction(arch, tiny_net, random_factors, in_shapes):
    model = tiny_net(arch)
    factors = random_factors(model, seed=6)
    kept = threshold_factors(factors, PruneConfig(threshold=0.6, relative=True))
    for name, f in factors.items():
        expected = max(1, int((f > 0.6 * f.max()).sum()))
        assert kept_widths(kept)[name] == expected
    _check_compaction(model, factors, kept, _batch(in_shapes[arch]))


@pytest.mark.parametrize("arch", ALL_ARCH_PARAMS)
def test_compacted_size_matches_cost_model(arch, tiny_net, random_factors, in_shapes):
    model = tiny_net(arch)
    cost = CostModel(model)
    factors = random_factors(model, seed=7)
    kept = threshold_factors(factors, PruneConfig())
    small = compact(model, factors, kept)
    widths = kept_widths(kept)
    n_params = sum(p.numel() for p in small.parameters())
    assert n_params == cost.params(widths)
    assert count_params(small) == n_params
    assert count_macs(small, in_shapes[arch]) == cost.macs(widths)
    assert count_macs(small, in_shapes[arch]) < count_macs(model, in_shapes[arch])
    # The compacted net's own cost model at its full (= kept) widths agrees too.
    own = CostModel(small)
    assert own.params() == n_params
    assert own.macs() == cost.macs(widths)


def test_compaction_of_a_model_with_live_gates(tiny_net, random_factors, in_shapes):
    """The model may still carry the switcher's (non-leaf, differentiable) factors on its gates."""
    model = tiny_net("vgg11")
    weight = torch.tensor(1.0, requires_grad=True)
    factors = {k: v * weight for k, v in random_factors(model).items()}  # graph, not leaves
    model.set_factors(factors)
    kept = threshold_factors(factors, PruneConfig())
    small = compact(model, factors, kept)
    # The caller's gates are as they were.
    assert all(gate.factors is factors[gate.group] for gate in model.gates())
    model.set_factors(None)
    x = _batch(in_shapes["vgg11"])
    with torch.no_grad():
        assert _max_diff(small(x), _gated_logits(model, factors, kept, x)) <= TOL


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "lenet5", "vgg16", "resnet56"])
def test_save_load_round_trip(arch, tiny_net, random_factors, in_shapes, tmp_path):
    model = tiny_net(arch)
    factors = random_factors(model, seed=8)
    kept = threshold_factors(factors, PruneConfig())
    small = compact(model, factors, kept)
    path = tmp_path / "sub" / "model.pt"
    save_model(small, path, kept=kept, note="x")
    assert path.is_file()
    # Written atomically: no temporary file is left behind.
    assert os.listdir(path.parent) == ["model.pt"]
    loaded, blob = load_model_file(path)
    assert type(loaded) is type(small)
    assert not loaded.training
    assert loaded.spec == small.spec
    assert blob["note"] == "x"
    assert {k: v.tolist() for k, v in blob["kept"].items()} == {
        k: v.tolist() for k, v in kept.items()
    }
    x = _batch(in_shapes[arch])
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    for (ka, va), (kb, vb) in zip(
        loaded.state_dict().items(), small.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)


def _saved_bytes(tiny_net, tmp_path) -> bytes:
    src = tmp_path / "good.pt"
    save_model(tiny_net("mlp"), src)
    return src.read_bytes()


def test_truncated_file_raises_artifact_error_with_path(tiny_net, tmp_path):
    data = _saved_bytes(tiny_net, tmp_path)
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as info:
        load_model_file(path)
    assert str(path) in str(info.value)


def test_random_bytes_file_raises_artifact_error_with_path(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ArtifactError) as info:
        load_model_file(path)
    assert str(path) in str(info.value)


def test_missing_and_wrong_content_files_raise_artifact_error(tiny_net, tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(ArtifactError, match="not found") as info:
        load_model_file(missing)
    assert str(missing) in str(info.value)
    # A readable checkpoint that is not a model: no spec.
    no_spec = tmp_path / "no_spec.pt"
    torch.save({"state_dict": tiny_net("mlp").state_dict()}, no_spec)
    with pytest.raises(ArtifactError) as info:
        load_model_file(no_spec)
    assert str(no_spec) in str(info.value)
    # A spec whose widths disagree with the weights.
    model = tiny_net("mlp")
    bad = tmp_path / "bad_widths.pt"
    spec = model.spec.to_dict()
    spec["widths"]["fc1"] += 1
    torch.save({"spec": spec, "state_dict": model.state_dict()}, bad)
    with pytest.raises(ArtifactError) as info:
        load_model_file(bad)
    assert str(bad) in str(info.value)
    # Not a mapping at all.
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(ArtifactError, match="expected a mapping"):
        load_model_file(tensor_file)
