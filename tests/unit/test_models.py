"""Task networks: specs, gate groups, gate placement, the classifier and the MAC/param counts."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from model_support import ALL_ARCH_PARAMS, REPRESENTATIVE_ARCHS
from switchprune.config import OWN_ARCHS, TORCHVISION_ARCHS, ModelConfig
from switchprune.cost import CostModel
from switchprune.evaluation import count_macs, count_params
from switchprune.models import (
    ARCHS,
    Gate,
    ModelSpec,
    build_model,
    build_with_state,
    spec_from_config,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 5


def _batch(in_shape: tuple[int, int, int], n: int = 6, seed: int = 123) -> torch.Tensor:
    return torch.randn(n, *in_shape, generator=torch.Generator().manual_seed(seed))


def _out_dim(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _in_dim(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def test_every_architecture_has_a_test_input(in_shapes):
    assert set(in_shapes) >= set(ARCHS)


# The representatives: the MLP, a BatchNorm conv net through the dependency graph, a residual
# net (whose stage streams are checked below) and the user's file (concatenation, grouped and
# depthwise convs). Compaction equivalence, which needs these groups right, runs on every arch.
@pytest.mark.parametrize("arch", REPRESENTATIVE_ARCHS)
def test_spec_and_groups_are_consistent(arch, tiny_net):
    model = tiny_net(arch)
    modules = dict(model.named_modules())
    assert model.spec.arch == arch
    assert model.spec.num_classes == NUM_CLASSES
    # One group per spec width, with the spec's size.
    assert model.group_sizes() == model.spec.widths
    assert len({g.name for g in model.groups}) == len(model.groups)
    gate_groups = {gate.group for gate in model.gates()}
    assert gate_groups == set(model.spec.widths), "every group has a gate and every gate a group"
    for g in model.groups:
        assert len(g.writers) == len(g.norms) >= 1
        assert len(g.readers) >= 1
        for writer, norm in zip(g.writers, g.norms, strict=True):
            assert isinstance(modules[writer], nn.Conv2d | nn.Linear)
            assert _out_dim(modules[writer]) == g.size
            if norm is not None:
                assert isinstance(modules[norm], nn.BatchNorm2d)
                assert modules[norm].num_features == g.size
        for reader in g.readers:
            # A Linear after flatten reads ``size * positions`` inputs.
            assert _in_dim(modules[reader]) % g.size == 0
    # Residual nets tie every writer of a stage stream into one group.
    if arch == "resnet20":
        stage = {g.name: g for g in model.groups}["stage2"]
        assert len(stage.writers) == 1 + len(model.stage2) > 2
        assert any("shortcut_conv" in w for w in stage.writers)
        assert "stage2.0.conv1" not in stage.writers
        assert {"stage2.0.conv1", "stage2.0.shortcut_conv"} <= set(
            {g.name: g for g in model.groups}["stage1"].readers
        )


@pytest.mark.parametrize("arch", REPRESENTATIVE_ARCHS)
def test_spec_round_trip_rebuilds_same_network(arch, tiny_net, in_shapes):
    model = tiny_net(arch)
    spec = ModelSpec.from_dict(model.spec.to_dict())
    assert spec == model.spec
    clone = build_model(spec)
    clone.load_state_dict(model.state_dict(), strict=True)
    x = _batch(in_shapes[arch])
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), model(x))


@pytest.mark.parametrize("arch", ALL_ARCH_PARAMS)
def test_a_network_built_to_hold_a_state_is_the_network_it_came_from(arch, tiny_net, in_shapes):
    """``build_with_state`` leaves a torchvision network's weights uninitialised for the state
    to fill: every tensor such a network holds must be in its state dict, and nothing stays on
    the meta device."""
    model = tiny_net(arch)
    if arch in TORCHVISION_ARCHS:
        named = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        assert named == set(model.state_dict())
        plain = [
            (name, key)
            for name, m in model.named_modules()
            for key, value in vars(m).items()
            if isinstance(value, torch.Tensor)
        ]
        assert plain == [], "tensors outside parameters and buffers would not be filled"
    rebuilt = build_with_state(model.spec, model.state_dict()).eval()
    assert not any(t.is_meta for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    x = _batch(in_shapes[arch])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        build_with_state(model.spec, dict(list(model.state_dict().items())[1:]))


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        spec_from_config(ModelConfig(arch="alexnet"), (1, 8, 8), 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model(ModelSpec("alexnet", (1, 8, 8), 10, {}))


def test_width_multiplier_scales_and_never_reaches_zero():
    full = spec_from_config(ModelConfig(arch="vgg11"), (3, 16, 16), 10).widths
    quarter = spec_from_config(ModelConfig(arch="vgg11", width_multiplier=0.25), (3, 16, 16), 10)
    assert full["conv1"] == 64 and quarter.widths["conv1"] == 16
    assert quarter.widths["conv8"] == 128
    tiny = spec_from_config(ModelConfig(arch="resnet20", width_multiplier=0.01), (3, 8, 8), 10)
    assert min(tiny.widths.values()) == 1
    assert len(tiny.widths) == 3 + 3 * 3


@pytest.mark.parametrize("arch", REPRESENTATIVE_ARCHS)
def test_set_factors_none_is_identity_and_gates_change_output(
    arch, tiny_net, random_factors, in_shapes
):
    model = tiny_net(arch)
    x = _batch(in_shapes[arch])
    with torch.no_grad():
        plain = model(x)
        ones = {g.name: torch.ones(g.size) for g in model.groups}
        model.set_factors(ones)
        assert torch.allclose(model(x), plain, atol=1e-6)
        model.set_factors(random_factors(model))
        assert all(gate.factors is not None for gate in model.gates())
        gated = model(x)
        assert (gated - plain).abs().max() > 1e-3
        model.set_factors(None)
        assert all(gate.factors is None for gate in model.gates())
        assert torch.equal(model(x), plain)


# The representatives, plus torchvision's ResNet-18: a residual stream found by the dependency
# graph, whose downsample convs are writers of the stream too (the gate placement is the subject).
@pytest.mark.parametrize("arch", [*REPRESENTATIVE_ARCHS, "resnet18"])
def test_zero_factor_cuts_the_unit_from_every_writer(arch, tiny_net, in_shapes):
    """A unit whose factor is 0 has no influence, however its incoming weights change.

    This checks that the gate sits after every writer (and its BatchNorm) of the group, in
    particular after every writer of a residual stream, and that nothing else leaks the unit.
    """
    model = tiny_net(arch)
    x = _batch(in_shapes[arch])
    with torch.no_grad():
        plain = model(x)
    g_noise = torch.Generator().manual_seed(7)
    # One perturbed copy for all groups: each group's perturbation is undone after its check.
    perturbed = tiny_net(arch)
    pmods = dict(perturbed.named_modules())
    for group in model.groups:
        j = group.size // 2
        touched: list[torch.Tensor] = []
        with torch.no_grad():
            for writer, norm in zip(group.writers, group.norms, strict=True):
                w = pmods[writer]
                touched += [w.weight]
                touched += [w.bias] if w.bias is not None else []
                touched += [pmods[norm].bias, pmods[norm].running_mean] if norm is not None else []
            saved = [t.clone() for t in touched]
            for writer, norm in zip(group.writers, group.norms, strict=True):
                w = pmods[writer]
                # Positive noise: the unit stays alive after the ReLUs of the perturbed net.
                w.weight[j] += torch.randn(w.weight[j].shape, generator=g_noise).abs()
                if w.bias is not None:
                    w.bias[j] += 5.0
                if norm is not None:
                    pmods[norm].bias[j] += 5.0
                    pmods[norm].running_mean[j] -= 1.0
        factors = {g.name: torch.ones(g.size) for g in model.groups}
        factors[group.name][j] = 0.0
        with torch.no_grad():
            # Without a gate the perturbation matters...
            perturbed.set_factors(None)
            assert (plain - perturbed(x)).abs().max() > 1e-4, group.name
            # ...with the unit's factor at 0 it does not.
            model.set_factors(factors)
            perturbed.set_factors(factors)
            assert torch.allclose(model(x), perturbed(x), atol=1e-6), group.name
            for t, before in zip(touched, saved, strict=True):
                t.copy_(before)
        model.set_factors(None)
    # The reference model was never modified.
    with torch.no_grad():
        assert torch.equal(model(x), tiny_net(arch)(x))


@pytest.mark.parametrize("arch", REPRESENTATIVE_ARCHS)
def test_classifier_keeps_all_outputs_and_is_never_gated(arch, tiny_net, random_factors, in_shapes):
    model = tiny_net(arch)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == NUM_CLASSES
    name = model.classifier_name
    assert all(name not in g.writers for g in model.groups)
    assert all(g.name != name for g in model.groups)
    # The classifier reads exactly one group (the last one).
    assert sum(name in g.readers for g in model.groups) == 1
    captured: list[torch.Tensor] = []
    hook = model.classifier.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model.set_factors(random_factors(model))
        x = _batch(in_shapes[arch])
        with torch.no_grad():
            logits = model(x)
    finally:
        hook.remove()
        model.set_factors(None)
    # Nothing (in particular no gate) acts on the classifier's output.
    assert len(captured) == 1
    assert torch.equal(logits, captured[0])
    assert logits.shape == (x.shape[0], NUM_CLASSES)


def test_gate_scales_channel_dimension():
    gate = Gate("g")
    x = torch.randn(2, 3, 4, 4)
    assert gate(x) is x
    gate.factors = torch.tensor([0.0, 2.0, 1.0])
    y = gate(x)
    assert torch.equal(y[:, 0], torch.zeros(2, 4, 4))
    assert torch.equal(y[:, 1], 2 * x[:, 1])
    assert torch.equal(y[:, 2], x[:, 2])
    gate.factors = torch.tensor([3.0, 0.0])
    y2 = gate(torch.ones(4, 2))
    assert torch.equal(y2, torch.tensor([[3.0, 0.0]] * 4))


@pytest.mark.parametrize("arch", OWN_ARCHS)
def test_counts_agree_with_cost_model_and_torch_pruning(arch, tiny_net, in_shapes):
    model = tiny_net(arch)
    in_shape = in_shapes[arch]
    macs = count_macs(model, in_shape)
    cost = CostModel(model)
    assert macs > 0
    assert macs == cost.macs()
    assert count_params(model) == sum(p.numel() for p in model.parameters()) == cost.params()

    # Torch-Pruning's counter (adapted from ptflops) returns ``(flops, params)`` as floats per
    # sample and, with ``layer_wise``, per-module dicts. Its Conv2d/Linear figure is our MAC count
    # plus one add per output element for a bias; on top it counts 2 ops per element for every
    # affine BatchNorm (and would count nn.ReLU / pooling modules, but these nets use the
    # functional forms, and gates are not known to it). So compare per layer after removing the
    # bias adds, and the total after also adding the BatchNorm ops.
    example = torch.zeros(1, *in_shape)
    flops, params, layer_flops, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    assert params == count_params(model)
    out_numel: dict[nn.Module, int] = {}
    in_numel: dict[nn.Module, int] = {}

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        out_numel[m] = int(out[0].numel())
        in_numel[m] = int(inp[0][0].numel())

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(example)
    for h in handles:
        h.remove()
    ours_total = 0
    bias_adds = 0
    bn_ops = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            bias = out_numel[m] if m.bias is not None else 0
            if isinstance(m, nn.Conv2d):
                ours = m.in_channels * m.kernel_size[0] * m.kernel_size[1] * out_numel[m]
            else:
                ours = m.in_features * m.out_features
            assert layer_flops[m] - bias == ours
            ours_total += ours
            bias_adds += bias
        elif isinstance(m, nn.BatchNorm2d):
            bn_ops += 2 * in_numel[m]
    assert ours_total == macs
    assert flops == macs + bias_adds + bn_ops


@pytest.mark.parametrize("shape", [(4, 3, 28, 28), (2, 5, 7, 9), (3, 2, 3, 4), (1, 1, 2, 2)])
def test_max_pool2x2_matches_max_pool2d_values_and_gradients(shape):
    from switchprune.models.base import max_pool2x2

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5), requires_grad=True)
    ours = max_pool2x2(x)
    ref = nn.functional.max_pool2d(x, 2)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)
    # Continuous random inputs have no ties, so the gradient goes to the same single maximum.
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6))
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), x)
    assert torch.equal(g_ours, g_ref)


def test_copied_network_gates_its_own_units(tiny_net, in_shapes):
    import copy

    model = tiny_net("vgg11")
    model.set_factors(None)  # the gate list is looked up (and kept) before the copy
    clone = copy.deepcopy(model)
    assert all(a is not b for a, b in zip(model.gates(), clone.gates(), strict=True))
    assert {id(g) for g in clone.gates()} == {id(m) for m in clone.modules() if isinstance(m, Gate)}
    clone.set_factors({g.name: torch.zeros(g.size) for g in clone.groups})
    x = _batch(in_shapes["vgg11"])
    with torch.no_grad():
        assert not torch.equal(model(x), clone(x))
        assert all(g.factors is None for g in model.gates())
