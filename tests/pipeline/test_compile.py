"""The compiled Kubeflow pipeline: what the cluster will be asked to run.

``pipeline.yaml`` holds two YAML documents: the pipeline spec (tasks, executors, resources,
parameters) and the Kubernetes platform spec (node selectors, tolerations, secrets).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from components.image import IMAGE
from kfp_support import ROOT, USER_FILE, in_fresh_thread
from pipeline.compile import compile_pipeline, data_version, main
from pipeline.pipeline import SECTIONS

from switchprune.config import SECTIONS as CONFIGS
from switchprune.config import KubeflowConfig, from_struct, load_params
from switchprune.dvcfiles import default_remote
from switchprune.errors import InputError

VERBS = ("preprocess", "train", "prune", "evaluate", "register", "promote")
S3_KEYS = ["SWITCHPRUNE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
KUBE: KubeflowConfig = load_params(ROOT / "params.yaml")["kubeflow"]


class Compiled:
    def __init__(self, path: Path) -> None:
        self.text = path.read_text()
        docs = list(yaml.safe_load_all(self.text))
        assert len(docs) == 2
        self.spec, platform = docs
        self.executors: dict[str, Any] = self.spec["deploymentSpec"]["executors"]
        self.platform: dict[str, Any] = platform["platforms"]["kubernetes"]["deploymentSpec"][
            "executors"
        ]
        self.tasks: dict[str, Any] = self.spec["root"]["dag"]["tasks"]
        self.inputs: dict[str, Any] = self.spec["root"]["inputDefinitions"]["parameters"]

    def container(self, verb: str) -> dict[str, Any]:
        return self.executors[f"exec-{verb}"]["container"]

    def secrets(self, verb: str) -> dict[str, dict[str, str]]:
        """Environment variable -> (secret, key, optional) of one task."""
        out: dict[str, Any] = {}
        for entry in self.platform.get(f"exec-{verb}", {}).get("secretAsEnv", []):
            for pair in entry["keyToEnv"]:
                out[pair["envVar"]] = (entry["secretName"], pair["secretKey"], entry["optional"])
        return out


def _compile(tmp: Path, params: Path, root: Path = ROOT) -> Compiled:
    return Compiled(in_fresh_thread(compile_pipeline, params, tmp / "pipeline.yaml", root))


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``pipeline/compile.py ARGV`` in this process: its exit status and its stderr."""
    capsys.readouterr()
    code = in_fresh_thread(main, argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    secret = "do-not-leak-this-secret-value"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", secret)
        mp.setenv("MLFLOW_TRACKING_URI", "http://user:do-not-leak@mlflow.example:5000")
        out = _compile(tmp_path_factory.mktemp("compiled"), ROOT / "params.yaml")
    assert secret not in out.text and "do-not-leak" not in out.text
    return out


def test_the_six_stages_run_in_dvc_order(compiled: Compiled) -> None:
    assert set(compiled.tasks) == set(VERBS)
    deps = {verb: set(task.get("dependentTasks", [])) for verb, task in compiled.tasks.items()}
    assert deps == {
        "preprocess": set(),
        "train": {"preprocess"},
        "prune": {"train"},
        "evaluate": {"preprocess", "train", "prune"},
        "register": {"preprocess", "train", "prune", "evaluate"},  # train: the history
        "promote": {"register"},
    }


def test_every_executor_runs_the_project_image(compiled: Compiled) -> None:
    assert set(compiled.executors) == {f"exec-{verb}" for verb in VERBS}
    for verb in VERBS:
        container = compiled.container(verb)
        assert container["image"] == IMAGE
        # A lightweight component: kfp is in the image, not pip-installed at start-up.
        assert "pip install" not in " ".join(container["command"])
        assert f"def {verb}(" in container["command"][-1]


def test_train_gets_the_gpu_node_placement_and_no_other_task_does(compiled: Compiled) -> None:
    accelerator = compiled.container("train")["resources"]["accelerator"]
    assert accelerator["resourceType"] == KUBE.gpu_type == "nvidia.com/gpu"
    assert accelerator["resourceCount"] == str(KUBE.gpus_per_node) == "1"
    train = compiled.platform["exec-train"]
    assert (
        train["nodeSelector"]["labels"] == KUBE.node_selector == {"nvidia.com/gpu.present": "true"}
    )
    assert train["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    for verb in set(VERBS) - {"train"}:
        assert "accelerator" not in compiled.container(verb)["resources"]
        assert "nodeSelector" not in compiled.platform.get(f"exec-{verb}", {})
        assert "tolerations" not in compiled.platform.get(f"exec-{verb}", {})


def test_every_task_has_cpu_and_memory_requests_and_limits(compiled: Compiled) -> None:
    for verb in VERBS:
        res = compiled.container(verb)["resources"]
        train = verb == "train"
        assert res["resourceCpuRequest"] == KUBE.cpu_request == "500m"
        assert res["resourceMemoryRequest"] == KUBE.memory_request == "1Gi"
        assert res["resourceCpuLimit"] == (KUBE.train_cpu_limit if train else KUBE.cpu_limit)
        assert res["resourceMemoryLimit"] == (
            KUBE.train_memory_limit if train else KUBE.memory_limit
        )
    assert compiled.container("train")["resources"]["resourceMemoryLimit"] == "16Gi"
    assert compiled.container("prune")["resources"]["resourceMemoryLimit"] == "4Gi"


def test_credentials_come_from_secrets_only_where_needed(compiled: Compiled) -> None:
    s3 = {key: (KUBE.s3_secret, key, False) for key in S3_KEYS}
    mlflow = {
        "MLFLOW_TRACKING_URI": (KUBE.mlflow_secret, "MLFLOW_TRACKING_URI", False),
        "MLFLOW_TRACKING_USERNAME": (KUBE.mlflow_secret, "MLFLOW_TRACKING_USERNAME", True),
        "MLFLOW_TRACKING_PASSWORD": (KUBE.mlflow_secret, "MLFLOW_TRACKING_PASSWORD", True),
        "MLFLOW_S3_ENDPOINT_URL": (KUBE.s3_secret, "SWITCHPRUNE_S3_ENDPOINT", False),
    }
    assert compiled.secrets("preprocess") == s3
    assert compiled.secrets("register") == {**s3, **mlflow}
    assert compiled.secrets("promote") == {**s3, **mlflow}
    for verb in ("train", "prune", "evaluate"):
        assert compiled.secrets(verb) == {}
    # No credential is a pipeline parameter.
    assert set(compiled.inputs) == {*SECTIONS, "dvc_remote", "data_md5", "git_commit"}


def test_caching_and_retries(compiled: Compiled) -> None:
    caching = {v: t["cachingOptions"].get("enableCache", False) for v, t in compiled.tasks.items()}
    assert caching == {
        "preprocess": True,
        "train": True,
        "prune": True,
        "evaluate": True,
        "register": False,
        "promote": False,
    }
    retries = {v: t.get("retryPolicy", {}).get("maxRetryCount") for v, t in compiled.tasks.items()}
    assert retries == {
        "preprocess": KUBE.retries,
        "train": None,
        "prune": None,
        "evaluate": None,
        "register": KUBE.retries,
        "promote": KUBE.retries,
    }


def test_parameter_defaults_are_the_params_yaml_sections(compiled: Compiled) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    configs = load_params(ROOT / "params.yaml")
    assert set(SECTIONS) == set(raw) - {"kubeflow"}
    for name in SECTIONS:
        default = compiled.inputs[name]["defaultValue"]
        assert compiled.inputs[name]["parameterType"] == "STRUCT"
        # Numbers travel as doubles and null cannot travel at all (the key takes its default).
        assert default == {k: v for k, v in raw[name].items() if v is not None}, name
        assert from_struct(CONFIGS[name], default) == configs[name], name
    assert compiled.inputs["dvc_remote"]["defaultValue"] == "s3://switchprune-dvc/cache"
    # The bundled digits are prepared from scikit-learn in the pod: no DVC version to fetch.
    assert compiled.inputs["data_md5"]["defaultValue"] == ""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert compiled.inputs["git_commit"]["defaultValue"] == head and len(head) == 40


def test_the_kubeflow_section_shapes_the_yaml(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["kubeflow"].update(
        gpus_per_node=0,
        node_selector={"pool": "cpu-large", "zone": "b"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml"}],
        train_memory_limit="32Gi",
        retries=1,
        s3_secret="other-s3",
    )
    params["train"]["epochs"] = 7
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    out = _compile(tmp_path, path)
    assert "accelerator" not in out.container("train")["resources"]
    assert out.platform["exec-train"]["nodeSelector"]["labels"] == {
        "pool": "cpu-large",
        "zone": "b",
    }
    assert out.platform["exec-train"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml"}
    ]
    assert out.container("train")["resources"]["resourceMemoryLimit"] == "32Gi"
    assert out.tasks["promote"]["retryPolicy"]["maxRetryCount"] == 1
    assert out.secrets("preprocess")["AWS_ACCESS_KEY_ID"] == (
        "other-s3",
        "AWS_ACCESS_KEY_ID",
        False,
    )
    assert out.inputs["train"]["defaultValue"]["epochs"] == 7


def test_compile_script_writes_the_file_and_refuses_bad_params(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pipeline.yaml"
    script = [sys.executable, str(ROOT / "pipeline" / "compile.py")]
    ok = subprocess.run([*script, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # Nothing on stderr: a refusal below is the only line the script writes there.
    assert ok.stderr == ""
    assert len(list(yaml.safe_load_all(out.read_text()))) == 2

    # The script is ``main``: its refusals are checked without another interpreter start.
    bad = tmp_path / "bad.yaml"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["epochs"] = 2.5
    bad.write_text(yaml.safe_dump(params))
    refused = tmp_path / "refused.yaml"
    code, err = _main(["--params", str(bad), "--out", str(refused)], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        "compile: error: [train] epochs must be an integer, got 2.5"
    ]
    assert not refused.exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[core]\n    analytics = false\n", "no default DVC remote"),
        ("[core]\n    remote = gone\n['remote \"other\"']\n    url = s3://b/p\n", "no default"),
    ],
)
def test_a_dvc_config_without_a_default_remote_is_refused(
    tmp_path: Path, config: str, message: str
) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(config)
    with pytest.raises(InputError, match=message):
        default_remote(tmp_path)


def test_data_tracked_with_dvc_add_is_fetched_by_its_recorded_hash(tmp_path: Path) -> None:
    from switchprune.config import DataConfig

    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "mnist.dvc").write_text(
        "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: mnist\n"
    )
    idx = DataConfig(dataset="idx", idx_dir="data/raw/mnist")
    assert data_version(idx, tmp_path) == (
        raw / "mnist.dvc",
        "0123456789abcdef0123456789abcdef.dir",
    )
    # Untracked data has no version: the pod prepares it from its source.
    assert data_version(DataConfig(dataset="mnist"), tmp_path)[1] == ""
    (raw / "mnist.dvc").write_text("outs: []\n")
    with pytest.raises(InputError, match="no 'outs\\[0\\].md5'"):
        data_version(idx, tmp_path)


def test_only_untracked_downloadable_data_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    _compile(tmp_path, ROOT / "params.yaml")
    assert "warning" not in capsys.readouterr().err  # the bundled digits
    params["data"]["dataset"] = "mnist"
    path = tmp_path / "mnist.yaml"
    path.write_text(yaml.safe_dump(params))
    _compile(tmp_path, path)
    assert "not from a DVC-versioned copy" in capsys.readouterr().err


def test_the_default_remote_is_read_from_the_dvc_config(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(
        "[core]\n    remote = mine\n['remote \"other\"']\n    url = s3://other/x\n"
        "['remote \"mine\"']\n    url = s3://mine/cache\n    endpointurl = http://x:9000\n"
    )
    assert default_remote(tmp_path) == ("mine", "s3://mine/cache")


def test_a_folder_datasets_keys_pass_through_as_a_pipeline_parameter() -> None:
    """Every key of a folder dataset reaches preprocess, train and evaluate unchanged."""
    from pipeline.pipeline import section_parameter

    from switchprune.config import DataConfig
    from switchprune.data import source_dir

    cfg = DataConfig(
        dataset="folder",
        folder_dir="data/raw/flowers",
        image_size=32,
        loader="stream",
        num_workers=2,
        augment="standard",
    )
    value = section_parameter(cfg)
    assert value["folder_dir"] == "data/raw/flowers" and value["image_size"] == 32
    # A Struct carries numbers as doubles.
    as_struct = {
        k: float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
        for k, v in value.items()
    }
    assert from_struct(DataConfig, as_struct) == cfg
    # The cluster downloads the DVC-tracked folder to where preprocess reads it.
    assert source_dir(cfg, Path("/tmp/raw")) == Path("data/raw/flowers")
    assert "image_size" not in section_parameter(DataConfig())  # null: left out, the default


def _task_constant(out: Compiled, verb: str, name: str) -> Any:
    value = out.tasks[verb]["inputs"]["parameters"].get(name, {})
    return value.get("runtimeValue", {}).get("constant")


def test_a_user_file_network_travels_in_the_compiled_pipeline(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    (project / "mynets").mkdir()
    shutil.copy(USER_FILE, project / "mynets" / "net.py")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["arch"] = "mynets/net.py:build_mixed"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = _compile(tmp_path, project / "params.yaml", project)
    text = (project / "mynets" / "net.py").read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    for verb in ("train", "prune", "evaluate"):
        assert _task_constant(out, verb, "arch_source") == text
        assert _task_constant(out, verb, "arch_sha256") == digest
    for verb in ("preprocess", "register", "promote"):
        assert "arch_source" not in out.tasks[verb]["inputs"].get("parameters", {})


def test_a_built_in_network_carries_no_source(compiled: Compiled) -> None:
    for verb in ("train", "prune", "evaluate"):
        assert not _task_constant(compiled, verb, "arch_source")


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("no/such/net.py:build", "no/such/net.py is not a file; the cluster could not build"),
        ("_pytest.python:build", "_pytest is not installed in the project image"),
    ],
)
def test_make_compile_refuses_an_arch_the_cluster_could_not_build(
    tmp_path: Path,
    arch: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["arch"] = arch
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "pipeline.yaml"
    monkeypatch.chdir(tmp_path)
    code, err = _main(["--params", "params.yaml", "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_a_module_the_image_installs_compiles(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["arch"] = "torchvision.models:resnet18"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = _compile(tmp_path, tmp_path / "params.yaml")
    assert not _task_constant(out, "train", "arch_source")
