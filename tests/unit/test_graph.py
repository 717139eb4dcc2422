"""torchvision and user networks: groups from the dependency graph, rebuild, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from model_support import IN_SHAPES, USER_ARCH
from switchprune.config import ConfigError, ModelConfig, load_params
from switchprune.cost import CostModel
from switchprune.evaluation import count_macs, count_params
from switchprune.io import ArtifactError, load_model_file, save_model
from switchprune.models import GraphError, build_model, spec_from_config
from switchprune.pruning import compact

pytestmark = pytest.mark.usefixtures("single_thread")

USER_FILE = Path(USER_ARCH.rpartition(":")[0])
GRAPH_ARCHS = ("resnet18", "resnet34", "mobilenet_v2", "vgg16_bn", USER_ARCH)


def _residual_sparse_factors(model, seed: int) -> dict[str, torch.Tensor]:
    """Random factors with zeros in every group; every residual group keeps a single unit."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for grp in model.groups:
        f = 0.5 + torch.rand(grp.size, generator=g)
        order = torch.randperm(grp.size, generator=g)
        n_zero = grp.size - 1 if len(grp.writers) > 1 else max(1, grp.size // 3)
        f[order[:n_zero]] = 0.0
        factors[grp.name] = f
    return factors


@pytest.mark.parametrize("arch", GRAPH_ARCHS)
def test_compacted_file_alone_rebuilds_the_gated_network(arch, tiny_net, tmp_path):
    """Compaction with zeros (a residual group down to one unit), saved, loaded in a new process."""
    model = tiny_net(arch)
    if arch != "vgg16_bn":
        assert any(len(g.writers) > 1 for g in model.groups), "a group tied by an addition"
    if arch in ("mobilenet_v2", USER_ARCH):
        modules = dict(model.named_modules())
        depthwise = [
            w
            for g in model.groups
            for w in g.writers
            if isinstance(modules[w], nn.Conv2d) and modules[w].groups > 1
        ]
        assert depthwise, "depthwise convs are writers of their input's group"
    factors = _residual_sparse_factors(model, seed=3)
    kept = {k: torch.nonzero(v > 0).flatten() for k, v in factors.items()}
    x = torch.randn(5, *IN_SHAPES[arch], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(x)
        model.set_factors(factors)
        gated = model(x)
        model.set_factors(None)
    assert (gated - plain).abs().max() > 1e-3
    small = compact(model, factors, kept)
    save_model(small, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import json, sys, torch\n"
        "from switchprune.io import load_model_file\n"
        "from switchprune.evaluation import count_macs, count_params\n"
        "m, _ = load_model_file(sys.argv[1] + '/model.pt')\n"
        "x = torch.load(sys.argv[1] + '/x.pt', weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save(m(x), sys.argv[1] + '/out.pt')\n"
        "macs = count_macs(m, tuple(x.shape[1:]))\n"
        "print(json.dumps({'params': count_params(m), 'macs': macs}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert (out - gated).abs().max() <= 1e-5
    counted = json.loads(done.stdout.strip().splitlines()[-1])
    widths = {k: int(v.numel()) for k, v in kept.items()}
    cost = CostModel(model)
    assert counted["params"] == cost.params(widths) == count_params(small)
    assert counted["macs"] == cost.macs(widths) == count_macs(small, IN_SHAPES[arch])
    assert counted["params"] < count_params(model)


def test_concatenation_and_flatten_are_exact(tmp_path):
    """Readers of concatenated groups (offsets) and a Linear after a flatten (positions)."""
    arch = f"{USER_FILE}:build_branches"
    torch.manual_seed(0)
    model = build_model(spec_from_config(ModelConfig(arch=arch), (3, 8, 8), 4)).eval()
    groups = {g.name: g for g in model.groups}
    assert set(groups) == {"net.a", "net.b", "net.mix"}
    assert groups["net.a"].spans == ((0, 1),) and groups["net.b"].spans == ((6, 1),)
    assert groups["net.mix"].spans == ((0, 16),)  # 4x4 positions per channel
    factors = {
        "net.a": torch.tensor([0.0, 1.0, 0.0, 2.0, 0.5, 0.0]),
        "net.b": torch.tensor([1.0] * 3 + [0.0] * 7),
        "net.mix": torch.tensor([0.0, 1.5] * 6),
    }
    kept = {k: torch.nonzero(v > 0).flatten() for k, v in factors.items()}
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        model.set_factors(factors)
        gated = model(x)
        model.set_factors(None)
    small = compact(model, factors, kept)
    assert small.spec.kept == {k: tuple(v.tolist()) for k, v in kept.items()}
    assert small.group_sizes() == {"net.a": 3, "net.b": 3, "net.mix": 6}
    # The mixing conv now reads 3 + 3 channels; b's span moved down by a's 3 removed units.
    assert {g.name: g.spans for g in small.groups}["net.b"] == ((3, 1),)
    with torch.no_grad():
        assert (small(x) - gated).abs().max() <= 1e-5
    cost = CostModel(model)
    widths = small.group_sizes()
    assert cost.params(widths) == count_params(small)
    assert cost.macs(widths) == count_macs(small, (3, 8, 8))
    # Compacting the compacted network again composes kept indices from the full network.
    again = compact(
        small,
        {k: torch.ones(v) for k, v in widths.items()},
        {
            "net.a": torch.tensor([1, 2]),
            "net.b": torch.tensor([0, 1, 2]),
            "net.mix": torch.arange(6),
        },
    )
    assert again.spec.kept["net.a"] == (3, 4)
    save_model(again, tmp_path / "m.pt")
    rebuilt, _ = load_model_file(tmp_path / "m.pt")
    assert rebuilt.group_sizes() == {"net.a": 2, "net.b": 3, "net.mix": 6}


def test_user_file_hash_is_recorded_and_a_changed_file_is_refused(tmp_path):
    source = tmp_path / "mynet.py"
    shutil.copy(USER_FILE, source)
    arch = f"{source}:build"
    spec = spec_from_config(ModelConfig(arch=arch), (3, 16, 16), 5)
    assert len(spec.source_sha256) == 64
    model = build_model(spec)
    save_model(model, tmp_path / "model.pt")
    loaded, _ = load_model_file(tmp_path / "model.pt")
    assert loaded.spec == spec
    source.write_text(source.read_text() + "\n# edited\n")
    with pytest.raises((GraphError, ArtifactError), match="changed since this model was saved"):
        load_model_file(tmp_path / "model.pt")


def test_package_module_builder(tmp_path, monkeypatch):
    pkg = tmp_path / "my_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(USER_FILE, pkg / "nets.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = spec_from_config(ModelConfig(arch="my_models.nets:build"), (1, 8, 8), 3)
    assert spec.source_sha256 and spec.num_classes == 3
    assert build_model(spec)(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        (f"{USER_FILE}:build_with_groupnorm", r"layer 'norm' \(GroupNorm\)"),
        (f"{USER_FILE}:build_not_a_module", "not a torch.nn.Module"),
        (f"{USER_FILE}:no_such_function", "has no function 'no_such_function'"),
        ("missing/file.py:build", "is not a file"),
        ("no_such_package_xyz.nets:build", "cannot import no_such_package_xyz.nets"),
    ],
)
def test_networks_that_cannot_be_handled_get_one_clear_error(arch, message):
    with pytest.raises(GraphError, match=message):
        spec_from_config(ModelConfig(arch=arch), (3, 8, 8), 4)


def test_a_network_without_a_linear_classifier_is_refused():
    with pytest.raises(GraphError, match="no nn.Linear with 4 outputs"):
        spec_from_config(ModelConfig(arch=f"{USER_FILE}:build_no_classifier"), (3, 8, 8), 4)


def test_small_input_stems():
    small = build_model(spec_from_config(ModelConfig(arch="resnet18"), (1, 28, 28), 10))
    assert small.spec.options["small_input"] is True
    assert small.net.conv1.kernel_size == (3, 3) and small.net.conv1.stride == (1, 1)
    assert isinstance(small.net.maxpool, nn.Identity)
    big = build_model(spec_from_config(ModelConfig(arch="resnet18"), (3, 96, 96), 10))
    assert big.spec.options["small_input"] is False
    assert big.net.conv1.kernel_size == (7, 7) and isinstance(big.net.maxpool, nn.MaxPool2d)
    forced = spec_from_config(ModelConfig(arch="resnet18", small_input=False), (1, 28, 28), 10)
    assert forced.options["small_input"] is False
    mobile = build_model(spec_from_config(ModelConfig(arch="mobilenet_v2"), (1, 28, 28), 10))
    assert mobile.net.features[0][0].stride == (1, 1)
    assert mobile.net.features[2].conv[1][0].stride == (1, 1)
    vgg = build_model(spec_from_config(ModelConfig(arch="vgg11_bn"), (1, 8, 8), 10))
    pools = [m for m in vgg.net.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3  # 8 -> 4 -> 2 -> 1, the others would empty the map
    assert vgg(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_width_multiplier_keeps_the_first_units_of_every_group():
    full = spec_from_config(ModelConfig(arch="resnet18"), (3, 16, 16), 10)
    half = spec_from_config(ModelConfig(arch="resnet18", width_multiplier=0.5), (3, 16, 16), 10)
    assert half.widths == {k: max(1, round(v * 0.5)) for k, v in full.widths.items()}
    assert build_model(half).group_sizes() == half.widths


def test_config_refuses_unknown_arch_and_widening_a_graph_network(tmp_path):
    for model, message in [
        ({"arch": "resnet99"}, "unknown architecture 'resnet99'"),
        ({"arch": "resnet18", "width_multiplier": 2.0}, "must be <= 1"),
    ]:
        path = tmp_path / "params.yaml"
        path.write_text(json.dumps({"model": model}))
        with pytest.raises(ConfigError, match=message):
            load_params(path, ["model"])
