"""The switcher network: shapes and signs of its factors, start-up values, equivariance, zeros."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_support import REPRESENTATIVE_ARCHS
from switchprune.models import TaskNet
from switchprune.scoring import (
    MIN_FACTOR,
    N_STATS,
    Switcher,
    SwitcherSpec,
    kept_count,
    unit_statistics,
)

pytestmark = pytest.mark.usefixtures("single_thread")

MODES = ("relu", "budget")


def _switcher(mode: str, seed: int = 0, hidden: int = 32) -> Switcher:
    torch.manual_seed(seed)
    return Switcher(SwitcherSpec(hidden, mode))


def _spread_head(snn: Switcher, seed: int = 1) -> None:
    """A 'trained' head: scores that differ clearly from unit to unit."""
    last = snn.head[-1]
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        last.weight.copy_(0.3 * torch.randn(last.weight.shape, generator=g))
        last.bias.fill_(1.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", REPRESENTATIVE_ARCHS)
def test_one_non_negative_factor_per_unit_and_near_one_at_start(arch, mode, tiny_net):
    model = tiny_net(arch)
    snn = _switcher(mode)
    if mode == "budget":
        snn.offset.fill_(-1e9)  # every unit on
    factors = snn(model)
    assert list(factors) == [g.name for g in model.groups]
    for g in model.groups:
        f = factors[g.name].detach()
        assert f.shape == (g.size,)
        assert f.dtype == torch.float32
        assert torch.isfinite(f).all()
        assert (f >= 0).all()
        if mode == "relu":
            # Last layer: bias 1, weights ~0: the task network starts (almost) unchanged.
            assert (f - 1).abs().max() < 0.1, g.name
            assert (f > 0).all()
        else:
            assert (f > 0).all()
            assert abs(float(f.mean()) - 1.0) < 1e-5, g.name
            assert (f - 1).abs().max() < 0.1, g.name
    # The factors are a differentiable function of the switcher's parameters. (A weighted sum:
    # in budget mode the plain sum of a group is fixed by the mean-1 normalisation.)
    g = torch.Generator().manual_seed(2)
    total = sum((f * torch.rand(f.shape, generator=g)).sum() for f in factors.values())
    total.backward()
    grads = [p.grad for p in snn.head.parameters()]
    assert all(gr is not None for gr in grads)
    assert any(float(gr.abs().sum()) > 0 for gr in grads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["mlp", "vgg11", "resnet20"])
def test_raised_offset_gives_exact_zeros(arch, mode, tiny_net):
    model = tiny_net(arch)
    snn = _switcher(mode)
    _spread_head(snn)
    with torch.no_grad():
        scores = snn.scores(model)
        all_scores = torch.cat(list(scores.values()))
        snn.offset.fill_(float(all_scores.median()))
        factors = snn(model)
    total_zero = 0
    for g in model.groups:
        s, f = scores[g.name], factors[g.name]
        top = torch.zeros(g.size, dtype=torch.bool)
        top[s.argmax()] = True
        above = s > snn.offset
        off = ~above & ~top  # the group's top unit is never switched off
        assert torch.equal(f == 0, off), g.name  # exactly 0 at or below the offset, else > 0
        assert (f[~off] > 0).all()
        total_zero += int(off.sum())
        if mode == "relu":
            assert torch.equal(f[above], s[above])
            if not bool(above.any()):
                assert float(f[top]) == pytest.approx(max(float(s[top]), MIN_FACTOR), rel=1e-6)
        else:
            assert abs(float(f[~off].mean()) - 1.0) < 1e-5
            # exp(score - 1) normalised: the order of the kept scores is preserved.
            ratio = f[~off] / torch.exp(s[~off] - 1.0)
            assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
    n_units = sum(g.size for g in model.groups)
    assert 0 < total_zero < n_units
    assert total_zero >= int((all_scores <= snn.offset).sum()) - len(model.groups)
    # Above every score, each group keeps only its top unit (never negative, never NaN).
    with torch.no_grad():
        snn.offset.fill_(float(all_scores.max()) + 1.0)
        factors = snn(model)
    for g in model.groups:
        f = factors[g.name]
        assert torch.isfinite(f).all()
        assert torch.nonzero(f).flatten().tolist() == [int(scores[g.name].argmax())]
        assert float(f.max()) >= (MIN_FACTOR if mode == "relu" else 1.0 - 1e-6)


def _permute_mlp_fc1(model: TaskNet, perm: torch.Tensor) -> None:
    with torch.no_grad():
        model.fc1.weight.copy_(model.fc1.weight[perm])
        model.fc1.bias.copy_(model.fc1.bias[perm])
        model.fc2.weight.copy_(model.fc2.weight[:, perm])


@pytest.mark.parametrize("mode", MODES)
def test_mlp_factors_are_permutation_equivariant(mode, tiny_net):
    model = tiny_net("mlp")
    twin = tiny_net("mlp")
    perm = torch.randperm(model.fc1.out_features, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(perm, torch.arange(len(perm)))
    _permute_mlp_fc1(twin, perm)
    # The permuted twin computes the same function.
    x = torch.randn(4, *model.spec.in_shape)
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x), atol=1e-5)
    snn = _switcher(mode)
    _spread_head(snn)
    with torch.no_grad():
        before = snn(model)
        after = snn(twin)
    # Not trivially equal: the factors differ from unit to unit.
    assert float(before["fc1"].max() - before["fc1"].min()) > 0.1
    assert torch.allclose(after["fc1"], before["fc1"][perm], atol=1e-5)
    assert not torch.allclose(after["fc1"], before["fc1"], atol=1e-3)
    # fc2's statistics are symmetric in its inputs: its factors do not move at all.
    assert torch.allclose(after["fc2"], before["fc2"], atol=1e-5)


def test_conv_factors_are_permutation_equivariant(tiny_net):
    """The same within a BatchNorm conv layer: out channels, BN entries and next layer's inputs."""
    model = tiny_net("vgg11")
    twin = tiny_net("vgg11")
    n = model.conv3.out_channels
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        twin.conv3.weight.copy_(twin.conv3.weight[perm])
        for t in (twin.bn3.weight, twin.bn3.bias, twin.bn3.running_mean, twin.bn3.running_var):
            t.copy_(t[perm])
        twin.conv4.weight.copy_(twin.conv4.weight[:, perm])
        x = torch.randn(2, *model.spec.in_shape)
        assert torch.allclose(model(x), twin(x), atol=1e-4)
    snn = _switcher("relu")
    _spread_head(snn)
    with torch.no_grad():
        before, after = snn(model), snn(twin)
    assert float(before["conv3"].max() - before["conv3"].min()) > 0.1
    assert torch.allclose(after["conv3"], before["conv3"][perm], atol=1e-5)
    for name in ("conv1", "conv2", "conv5"):
        assert torch.allclose(after[name], before[name], atol=1e-6)


@pytest.mark.parametrize("arch", ["lenet5", "resnet20"])
def test_unit_statistics_shape_and_normalisation(arch, tiny_net):
    model = tiny_net(arch)
    modules = dict(model.named_modules())
    for index, g in enumerate(model.groups):
        x = unit_statistics(g, modules, index / 10.0)
        assert x.shape == (g.size, N_STATS)
        assert torch.isfinite(x).all()
        # Per-unit columns are z-scored within the layer, the two context columns are constant.
        per_unit = x[:, :-2]
        assert per_unit.mean(0).abs().max() < 1e-4
        assert torch.allclose(x[:, -2], torch.full((g.size,), index / 10.0))
        assert torch.allclose(
            x[:, -1], torch.full((g.size,), float(torch.log(torch.tensor(g.size))) / 10)
        )


def test_gradient_reaches_task_network_only_when_asked(tiny_net):
    model = tiny_net("resnet20")
    snn = _switcher("relu")
    _spread_head(snn)
    sum(f.sum() for f in snn(model).values()).backward()
    assert all(p.grad is None for p in model.parameters())
    assert snn.head[0].weight.grad is not None
    sum(f.sum() for f in snn(model, grad=True).values()).backward()
    assert model.conv.weight.grad is not None
    assert float(model.conv.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("mode", MODES)
def test_spec_round_trip_rebuilds_same_switcher(mode, tiny_net):
    model = tiny_net("resnet20")
    snn = _switcher(mode)
    _spread_head(snn)
    snn.offset.fill_(0.9)
    spec = SwitcherSpec.from_dict(snn.spec.to_dict())
    assert spec == snn.spec
    clone = Switcher(spec)
    clone.load_state_dict(snn.state_dict(), strict=True)
    assert float(clone.offset) == pytest.approx(0.9)
    with torch.no_grad():
        a, b = snn(model), clone(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_factors_drive_the_task_network_gates(tiny_net):
    """Switcher output plugs into ``set_factors`` and zeros remove units from the forward pass."""
    model = tiny_net("mlp")
    snn = _switcher("relu")
    _spread_head(snn)
    with torch.no_grad():
        scores = torch.cat(list(snn.scores(model).values()))
        snn.offset.fill_(float(scores.median()))
        factors = snn(model)
    model.set_factors(factors)
    hidden: list[torch.Tensor] = []
    hook = model.gate1.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    with torch.no_grad():
        model(torch.randn(3, *model.spec.in_shape))
    hook.remove()
    off = factors["fc1"] == 0
    assert off.any()
    assert (hidden[0][:, off] == 0).all()
    assert isinstance(model.fc1, nn.Linear)


@pytest.mark.parametrize(
    ("above", "size", "multiple", "expected"),
    [
        (0, 10, 1, 1),  # never empty
        (7, 10, 1, 7),
        (0, 64, 8, 8),  # at least one multiple
        (11, 64, 8, 8),  # nearest multiple, down
        (12, 64, 8, 16),  # halfway rounds up
        (61, 64, 8, 64),
        (3, 5, 8, 5),  # a group narrower than the multiple stays whole
        (299, 300, 8, 296),  # never wider than the group
    ],
)
def test_kept_count_rounds_to_the_nearest_multiple(above, size, multiple, expected):
    assert kept_count(above, size, multiple) == expected


def test_budget_gate_keeps_multiples_of_the_width_multiple():
    snn = Switcher(SwitcherSpec(mode="budget", multiple=8))
    scores = torch.randn(64, generator=torch.Generator().manual_seed(4))
    for offset in (-10.0, -0.5, 0.0, 0.7, 1.5, 10.0):
        snn.offset.fill_(offset)
        factors = snn.gate(scores)
        on = factors > 0
        above = int((scores > offset).sum())
        assert int(on.sum()) == kept_count(above, 64, 8)
        assert int(on.sum()) % 8 == 0
        # The kept units are the best scored ones.
        if bool((~on).any()):
            assert float(scores[on].min()) > float(scores[~on].max())
        assert float(factors[on].mean()) == pytest.approx(1.0)


def test_spec_multiple_round_trips_and_defaults_to_one():
    spec = SwitcherSpec(mode="budget", multiple=8)
    assert SwitcherSpec.from_dict(spec.to_dict()) == spec
    legacy = spec.to_dict()
    del legacy["multiple"]
    assert SwitcherSpec.from_dict(legacy).multiple == 1
