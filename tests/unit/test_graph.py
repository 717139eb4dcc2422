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

from model_support import IN_SHAPES, USER_ARCH, make_tiny_net
from switchprune.config import ConfigError, ModelConfig, load_params
from switchprune.cost import CostModel
from switchprune.evaluation import count_macs, count_params
from switchprune.io import ArtifactError, load_model_file, save_model
from switchprune.models import GraphError, ModelSpec, build_model, spec_from_config
from switchprune.pruning import compact
from switchprune.pruning.compaction import layer_widths

pytestmark = pytest.mark.usefixtures("single_thread")

USER_FILE = Path(USER_ARCH.rpartition(":")[0])
GRAPH_ARCHS = ("resnet18", "resnet34", "mobilenet_v2", "vgg16_bn", USER_ARCH)
# A model loaded in another process may run other kernels: its logits agree to float32 rounding.
FRESH_ATOL = 1e-5


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


_LOAD_ALL = """
import json, sys, torch
from pathlib import Path
from switchprune.evaluation import count_macs, count_params
from switchprune.io import load_model_file
torch.set_num_threads(1)
results = {}
for job in sorted(Path(".").iterdir()):
    if not job.is_dir():
        continue
    try:
        m, _ = load_model_file(Path(job.joinpath("path.txt").read_text()))
        x = torch.load(job / "x.pt", weights_only=True)
        with torch.no_grad():
            torch.save(m(x), job / "out.pt")
        results[job.name] = {
            "module": type(m.net).__module__,
            "params": count_params(m),
            "macs": count_macs(m, tuple(x.shape[1:])),
        }
    except Exception as exc:
        results[job.name] = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(results))
"""


class FreshLoads:
    """Model files queued for loading in one fresh Python process (started on first read).

    One process for the whole module: each load still happens in a process that never built
    the network, and a torch start-up is paid once instead of once per model.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self.results: dict[str, dict] | None = None

    def add(self, name: str, model_path: Path, x: torch.Tensor) -> None:
        assert self.results is None, "queue every load before the first result is read"
        job = self.root / name
        job.mkdir()
        (job / "path.txt").write_text(str(model_path))
        torch.save(x, job / "x.pt")

    def result(self, name: str) -> tuple[dict, torch.Tensor | None]:
        if self.results is None:
            # The working directory holds the queued inputs and nothing else.
            done = subprocess.run(
                [sys.executable, "-c", _LOAD_ALL],
                cwd=self.root,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stderr
            self.results = json.loads(done.stdout.strip().splitlines()[-1])
        got = self.results[name]
        out = self.root / name / "out.pt"
        return got, torch.load(out, weights_only=True) if "error" not in got else None


def _gated_arch_case(arch: str, folder: Path) -> dict:
    """Compaction with zeros (a residual group down to one unit) of ``arch``, saved."""
    model = make_tiny_net(arch)
    modules = dict(model.named_modules())
    depthwise = [
        w
        for g in model.groups
        for w in g.writers
        if isinstance(modules[w], nn.Conv2d) and modules[w].groups > 1
    ]
    factors = _residual_sparse_factors(model, seed=3)
    kept = {k: torch.nonzero(v > 0).flatten() for k, v in factors.items()}
    x = torch.randn(5, *IN_SHAPES[arch], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(x)
        model.set_factors(factors)
        gated = model(x)
        model.set_factors(None)
    small = compact(model, factors, kept)
    save_model(small, folder / "model.pt")
    widths = {k: int(v.numel()) for k, v in kept.items()}
    cost = CostModel(model)
    return {
        "tied": any(len(g.writers) > 1 for g in model.groups),
        "depthwise": depthwise,
        "x": x,
        "plain": plain,
        "gated": gated,
        "cost_params": cost.params(widths),
        "cost_macs": cost.macs(widths),
        "small_params": count_params(small),
        "small_macs": count_macs(small, IN_SHAPES[arch]),
        "full_params": count_params(model),
    }


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[FreshLoads, dict, Path]:
    """Every model this module loads in a fresh process, saved first, then loaded in one go."""
    base = tmp_path_factory.mktemp("graph")
    loads = FreshLoads(base / "elsewhere")
    cases = {}
    for i, arch in enumerate(GRAPH_ARCHS):
        folder = base / f"arch{i}"
        folder.mkdir()
        cases[arch] = _gated_arch_case(arch, folder)
        loads.add(f"arch{i}", folder / "model.pt", cases[arch]["x"])
    _queue_user_network_cases(base, loads, cases)
    return loads, cases, base


@pytest.mark.slow  # a fresh Python process or an MLflow store
@pytest.mark.parametrize("arch", GRAPH_ARCHS)
def test_compacted_file_alone_rebuilds_the_gated_network(arch, fresh):
    """Compaction with zeros (a residual group down to one unit), saved, loaded in a new process."""
    loads, cases, _ = fresh
    case = cases[arch]
    if arch != "vgg16_bn":
        assert case["tied"], "a group tied by an addition"
    if arch in ("mobilenet_v2", USER_ARCH):
        assert case["depthwise"], "depthwise convs are writers of their input's group"
    assert (case["gated"] - case["plain"]).abs().max() > 1e-3
    counted, out = loads.result(f"arch{GRAPH_ARCHS.index(arch)}")
    assert "error" not in counted, counted
    assert (out - case["gated"]).abs().max() <= FRESH_ATOL
    assert counted["params"] == case["cost_params"] == case["small_params"]
    assert counted["macs"] == case["cost_macs"] == case["small_macs"]
    assert counted["params"] < case["full_params"]


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


def _queue_user_network_cases(base: Path, loads: FreshLoads, cases: dict) -> None:
    """Save the user-network models the tests below load in the fresh process."""

    # A network is run once per content in a process: each case gets content of its own, so
    # that the shared process has not run it for an earlier model.
    def own_copy(source: Path, name: str) -> None:
        source.write_bytes(USER_FILE.read_bytes() + f"# the {name} case\n".encode())

    # Travels with its file: the original is removed, the model loads from its copy.
    source = base / "mynets" / "net.py"
    source.parent.mkdir()
    own_copy(source, "travels")
    spec = spec_from_config(ModelConfig(arch=f"{source}:build"), (3, 16, 16), 5)
    model = build_model(spec).eval()
    save_model(model, base / "model" / "model.pt")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    cases["travels"] = {"spec": spec, "x": x, "expected": expected, "bytes": source.read_bytes()}
    shutil.rmtree(source.parent)
    loads.add("travels", base / "model" / "model.pt", x)
    # No copy, and the file at the arch's path edited; and no copy, the file gone.
    marker = base / "ran"
    for name in ("edited", "gone"):
        source = base / f"{name}.py"
        own_copy(source, name)
        arch = f"{source}:build"
        model = build_model(spec_from_config(ModelConfig(arch=arch), (3, 16, 16), 5))
        save_model(model, base / name / "model.pt")
        (base / name / "network.py").unlink()
        if name == "edited":
            source.write_text(source.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
        else:
            source.unlink()
        loads.add(name, base / name / "model.pt", torch.zeros(1))
    cases["marker"] = marker


@pytest.mark.slow  # a fresh Python process or an MLflow store
def test_a_user_network_travels_with_its_file_and_loads_from_the_copy_anywhere(fresh):
    loads, cases, base = fresh
    case = cases["travels"]
    assert len(case["spec"].source_sha256) == 64
    copy = base / "model" / "network.py"
    assert copy.read_bytes() == case["bytes"]
    # The original file is gone (removed before the process starts): the model still loads
    # from its copy, in another folder and process, under a private module name.
    assert not (base / "mynets").exists()
    got, out = loads.result("travels")
    assert "error" not in got, got
    assert (out - case["expected"]).abs().max() <= FRESH_ATOL
    assert got["module"].startswith("switchprune_user_")


@pytest.mark.slow  # a fresh Python process or an MLflow store
def test_a_changed_copy_or_a_changed_file_is_refused_before_it_runs(tmp_path, fresh):
    source = tmp_path / "mynet.py"
    shutil.copy(USER_FILE, source)
    model = build_model(spec_from_config(ModelConfig(arch=f"{source}:build"), (3, 16, 16), 5))
    save_model(model, tmp_path / "model" / "model.pt")
    copy = tmp_path / "model" / "network.py"
    marker = tmp_path / "ran"
    copy.write_text(copy.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ArtifactError, match="network.py: .*does not match its recorded SHA-256"):
        load_model_file(tmp_path / "model" / "model.pt")
    assert not marker.exists()
    # No copy, and the file at the arch's path edited: refused in a process that never ran it.
    loads, cases, _ = fresh
    got, _ = loads.result("edited")
    assert "changed since this model was saved" in got["error"]
    assert not cases["marker"].exists()
    got, _ = loads.result("gone")
    assert "the network's source" in got["error"] and "no stored copy (network.py)" in got["error"]


def test_package_module_builder(tmp_path, monkeypatch):
    pkg = tmp_path / "my_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(USER_FILE, pkg / "nets.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = spec_from_config(ModelConfig(arch="my_models.nets:build"), (1, 8, 8), 3)
    assert spec.source_sha256 and spec.num_classes == 3
    assert build_model(spec)(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.slow  # a fresh Python process or an MLflow store
def test_a_module_network_names_the_distribution_to_install_where_it_is_missing(tmp_path):
    site = tmp_path / "site"
    (site / "dist_models").mkdir(parents=True)
    (site / "dist_models" / "__init__.py").write_text("")
    shutil.copy(USER_FILE, site / "dist_models" / "nets.py")
    info = site / "dist_models-1.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dist-models\nVersion: 1.2.0\n")
    (info / "top_level.txt").write_text("dist_models\n")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from switchprune.config import ModelConfig\n"
        "from switchprune.io import save_model\n"
        "from switchprune.models import build_model, spec_from_config\n"
        "spec = spec_from_config(ModelConfig(arch='dist_models.nets:build'), (1, 8, 8), 3)\n"
        "print(spec.source_package)\n"
        "save_model(build_model(spec), sys.argv[2])\n"
    )
    model_path = tmp_path / "model" / "model.pt"
    run = [sys.executable, "-c", script, str(site), str(model_path)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "dist-models==1.2.0"
    assert not (model_path.parent / "network.py").exists()  # a module is installed, not copied
    # Where the package is not installed, the error says what to install.
    with pytest.raises(
        ArtifactError, match=r"cannot import dist_models.nets.*dist-models==1\.2\.0"
    ):
        load_model_file(model_path)


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
    def spec(arch: str, shape: tuple[int, int, int], **options: bool) -> ModelSpec:
        # Quarter widths: the stems are the subject, and a narrow network's graph is traced in
        # a fraction of the time of a full-width one (a 96 px ResNet-18 above all).
        return spec_from_config(ModelConfig(arch=arch, width_multiplier=0.25, **options), shape, 10)

    # On the meta device: structure and shapes only, no weights to initialise at full width.
    meta = torch.device("meta")
    with meta:
        small = build_model(spec("resnet18", (1, 28, 28)))
        big = build_model(spec("resnet18", (3, 96, 96)))
        mobile = build_model(spec("mobilenet_v2", (1, 28, 28)))
        vgg = build_model(spec("vgg11_bn", (1, 8, 8)))
    assert small.spec.options["small_input"] is True
    assert small.net.conv1.kernel_size == (3, 3) and small.net.conv1.stride == (1, 1)
    assert isinstance(small.net.maxpool, nn.Identity)
    assert big.spec.options["small_input"] is False
    assert big.net.conv1.kernel_size == (7, 7) and isinstance(big.net.maxpool, nn.MaxPool2d)
    forced = spec("resnet18", (1, 28, 28), small_input=False)
    assert forced.options["small_input"] is False
    assert mobile.net.features[0][0].stride == (1, 1)
    assert mobile.net.features[2].conv[1][0].stride == (1, 1)
    pools = [m for m in vgg.net.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3  # 8 -> 4 -> 2 -> 1, the others would empty the map
    assert vgg(torch.zeros(2, 1, 8, 8, device=meta)).shape == (2, 10)


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


def test_layers_left_ungated_are_named_with_the_reason(caplog):
    arch = USER_ARCH.replace(":build", ":build_mixed")
    with caplog.at_level("WARNING", logger="switchprune"):
        spec = spec_from_config(ModelConfig(arch=arch), (1, 8, 8), 4)
    model = build_model(spec)
    why = "its channels pass through the grouped convolution 'grouped'"
    assert model.ungated == {f"net.{n}": why for n in ("a", "b", "grouped")}
    logged = [r.getMessage() for r in caplog.records]
    assert any("layer 'grouped' is left whole (not gated)" in m for m in logged), logged
    widths = layer_widths(model, spec.widths)
    assert widths["net.a"]["gated"] is False and widths["net.a"]["why"] == why
    assert widths["net.head"]["gated"] is True
    assert "classifier" in widths["net.fc"]["why"]
