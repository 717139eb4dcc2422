"""Typed, validated configuration: refusals, coercions and ``params.yaml`` loading."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchprune.config import (
    REMOVED_KEYS,
    SECTIONS,
    ConfigError,
    DataConfig,
    EvaluateConfig,
    KubeflowConfig,
    ModelConfig,
    PromoteConfig,
    PruneConfig,
    RegisterConfig,
    TrainConfig,
    from_dict,
    from_struct,
    load_params,
    to_dict,
)


def refusal(cls: type, data: dict[str, Any]) -> str:
    """The single message of the ConfigError that ``from_dict`` raises."""
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data)
    assert type(info.value) is ConfigError
    assert len(info.value.args) == 1
    message = str(info.value)
    assert "\n" not in message  # one message, one line
    return message


BAD = [
    # unknown key
    pytest.param(TrainConfig, {"epochz": 3}, "train", "epochz", id="unknown-train"),
    pytest.param(PruneConfig, {"threshhold": 0.1}, "prune", "threshhold", id="unknown-prune"),
    # wrong types
    pytest.param(TrainConfig, {"epochs": "5"}, "train", "epochs", id="str-for-int"),
    pytest.param(TrainConfig, {"batch_size": 64.0}, "train", "batch_size", id="float-for-int"),
    pytest.param(TrainConfig, {"epochs": True}, "train", "epochs", id="bool-for-int"),
    pytest.param(DataConfig, {"download": 1}, "data", "download", id="int-for-bool"),
    pytest.param(TrainConfig, {"baseline": "yes"}, "train", "baseline", id="str-bool"),
    pytest.param(TrainConfig, {"tnn_lr": "0.1"}, "train", "tnn_lr", id="str-for-float"),
    pytest.param(TrainConfig, {"tnn_lr": False}, "train", "tnn_lr", id="bool-for-float"),
    pytest.param(TrainConfig, {"compression": "l1"}, "train", "compression", id="bad-choice"),
    pytest.param(EvaluateConfig, {"device": "gpu"}, "evaluate", "device", id="bad-device"),
    pytest.param(ModelConfig, {"hidden": 300}, "model", "hidden", id="int-for-list"),
    pytest.param(ModelConfig, {"hidden": [300, "100"]}, "model", "hidden", id="bad-list-item"),
    pytest.param(DataConfig, {"idx_dir": 5}, "data", "idx_dir", id="int-for-optional-str"),
    # out of range
    pytest.param(TrainConfig, {"epochs": 0}, "train", "epochs", id="epochs-0"),
    pytest.param(TrainConfig, {"target_ratio": 1.5}, "train", "target_ratio", id="ratio-1.5"),
    pytest.param(TrainConfig, {"target_ratio": 0}, "train", "target_ratio", id="ratio-0"),
    pytest.param(PruneConfig, {"threshold": -1}, "prune", "threshold", id="threshold--1"),
    pytest.param(DataConfig, {"val_fraction": 0.7}, "data", "val_fraction", id="val-0.7"),
    pytest.param(
        TrainConfig, {"epochs": 3, "warmup_epochs": 3}, "train", "warmup_epochs", id="warmup"
    ),
    pytest.param(ModelConfig, {"hidden": []}, "model", "hidden", id="no-layers"),
    pytest.param(PruneConfig, {"min_units": 0}, "prune", "min_units", id="min-units-0"),
    pytest.param(DataConfig, {"dataset": "idx"}, "data", "idx_dir", id="idx-needs-dir"),
    pytest.param(
        PruneConfig, {"relative": True, "threshold": 1.0}, "prune", "threshold", id="rel-thr"
    ),
    # names, URIs and Kubernetes values
    pytest.param(RegisterConfig, {"alias": "champion"}, "register", "alias", id="reg-champion"),
    pytest.param(RegisterConfig, {"model_name": "-x"}, "register", "model_name", id="bad-name"),
    pytest.param(PromoteConfig, {"s3_uri": "s3://A"}, "promote", "s3_uri", id="bad-bucket"),
    pytest.param(KubeflowConfig, {"cpu_limit": "2 cores"}, "kubeflow", "cpu_limit", id="qty"),
    pytest.param(KubeflowConfig, {"tolerations": [1]}, "kubeflow", "tolerations", id="tol"),
    pytest.param(
        KubeflowConfig, {"node_selector": {"a": 1}}, "kubeflow", "node_selector", id="selector"
    ),
    pytest.param(KubeflowConfig, {"train_nodes": 0}, "kubeflow", "train_nodes", id="nodes-0"),
    pytest.param(KubeflowConfig, {"gpus_per_node": -1}, "kubeflow", "gpus_per_node", id="gpus"),
    pytest.param(
        KubeflowConfig, {"trainjob_s3_uri": "s3://A"}, "kubeflow", "trainjob_s3_uri", id="tj-uri"
    ),
    pytest.param(
        KubeflowConfig, {"trainjob_timeout": 1}, "kubeflow", "trainjob_timeout", id="tj-timeout"
    ),
]


@pytest.mark.parametrize(("cls", "data", "section", "key"), BAD)
def test_from_dict_refuses_with_one_error_naming_section_and_key(
    cls: type, data: dict[str, Any], section: str, key: str
) -> None:
    message = refusal(cls, data)
    assert message.startswith(f"[{section}] ")
    assert key in message


def test_unknown_key_lists_the_known_keys() -> None:
    message = refusal(TrainConfig, {"epochz": 3, "zzz": 1})
    assert "'epochz'" in message and "zzz" not in message  # one key at fault, the first
    assert "epochs" in message


def test_wrong_type_message_says_what_was_expected_and_got() -> None:
    message = refusal(TrainConfig, {"epochs": 2.5})
    assert message == "[train] epochs must be an integer, got 2.5"


MESSAGES = [
    (DataConfig, {"image_size": 0}, "[data] image_size must be null or in [1, 4096]"),
    (TrainConfig, {"snn_momentum": 1.0}, "[train] snn_momentum must be in [0, 1)"),
    (TrainConfig, {"tnn_lr": 0}, "[train] tnn_lr must be > 0 or auto"),
    (
        TrainConfig,
        {"device": "gpu"},
        "[train] device must be one of ['auto', 'cpu', 'cuda'], got 'gpu'",
    ),
    (ModelConfig, {"hidden": 300}, "[model] hidden must be a list, got int 300"),
    (ModelConfig, {"hidden": [8, "4"]}, "[model] hidden[1] must be an integer, got '4'"),
    (
        PromoteConfig,
        {"s3_uri": "http://b"},
        "[promote] s3_uri must be s3://bucket[/prefix] with a valid bucket name, got 'http://b'",
    ),
    (
        KubeflowConfig,
        {"tolerations": [{"key": 1}]},
        "[kubeflow] tolerations[0]['key'] must be a string, got 1",
    ),
    (
        KubeflowConfig,
        {"train_nodes": 2, "gpus_per_node": 0},
        "[kubeflow] train_nodes > 1 needs gpus_per_node >= 1 (several nodes train on GPUs)",
    ),
]


@pytest.mark.parametrize(("cls", "data", "message"), MESSAGES)
def test_messages_say_the_whole_rule_and_where(cls: type, data: dict[str, Any], message: str):
    assert refusal(cls, data) == message


def test_non_mapping_section_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^\[train\] must be a mapping"):
        from_dict(TrainConfig, [1, 2])  # type: ignore[arg-type]


def test_ints_widen_to_floats_and_lists_become_tuples() -> None:
    cfg = from_dict(TrainConfig, {"tnn_lr": 1, "target_ratio": 1, "penalty": 0})
    assert cfg.tnn_lr == 1.0 and type(cfg.tnn_lr) is float
    assert type(cfg.target_ratio) is float and type(cfg.penalty) is float
    model = from_dict(ModelConfig, {"hidden": [32, 16], "width_multiplier": 2})
    assert model.hidden == (32, 16) and isinstance(model.hidden, tuple)
    assert type(model.width_multiplier) is float
    prune = from_dict(PruneConfig, {"threshold": 1})
    assert prune.threshold == 1.0 and type(prune.threshold) is float


def test_none_and_empty_mean_defaults_and_configs_are_frozen() -> None:
    for cls in SECTIONS.values():
        assert from_dict(cls, None) == cls() == from_dict(cls, {})
    cfg = from_dict(TrainConfig, {"epochs": 3})
    with pytest.raises(AttributeError):
        cfg.epochs = 4  # type: ignore[misc]


def test_configs_built_directly_or_copied_are_validated_too() -> None:
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="target_ratio"):
        dataclasses.replace(TrainConfig(), target_ratio=2.0)
    assert dataclasses.replace(TrainConfig(), epochs=3).epochs == 3


def test_configs_keep_the_callers_strings_so_pickled_records_do_not_change() -> None:
    """Pickle writes a string shared by several keys once: sharing shows in the bytes."""
    raw = {"device": "".join(["au", "to"]), "amp": "".join(["au", "to"])}  # equal, not shared
    plain = to_dict(from_dict(TrainConfig, raw))
    assert plain["device"] is raw["device"] and plain["amp"] is raw["amp"]
    assert pickle.dumps(plain) == pickle.dumps({**to_dict(TrainConfig()), **raw})


def test_struct_numbers_become_ints_only_where_the_field_is_an_int() -> None:
    cfg = from_struct(TrainConfig, {"epochs": 4.0, "tnn_lr": 1.0, "target_ratio": 1.0})
    assert (cfg.epochs, type(cfg.epochs), type(cfg.tnn_lr)) == (4, int, float)
    assert type(cfg.target_ratio) is float
    model = from_struct(ModelConfig, {"hidden": [8.0, 4.0]})
    assert model.hidden == (8, 4) and all(type(h) is int for h in model.hidden)
    assert from_struct(DataConfig, {"image_size": 32.0}).image_size == 32
    with pytest.raises(ConfigError, match=r"^\[data\] image_size must be an integer, got 32.5$"):
        from_struct(DataConfig, {"image_size": 32.5})


def test_optional_string_accepts_none_and_a_string() -> None:
    assert from_dict(DataConfig, {"idx_dir": None}).idx_dir is None
    cfg = from_dict(DataConfig, {"dataset": "idx", "idx_dir": "raw/idx"})
    assert cfg.idx_dir == "raw/idx"


@pytest.mark.parametrize("cls", list(SECTIONS.values()))
def test_to_dict_round_trips_through_yaml(cls: type) -> None:
    cfg = cls()
    plain = to_dict(cfg)
    assert all(not isinstance(v, tuple) for v in plain.values())
    assert from_dict(cls, yaml.safe_load(yaml.safe_dump(plain))) == cfg


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_load_params_builds_requested_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: 2\n  tnn_lr: 1\nmodel:\n  hidden: [8, 4]\n")
    p = load_params(path, ["model", "train"])
    assert set(p) == {"model", "train"}
    assert p["train"] == TrainConfig(epochs=2, tnn_lr=1.0)
    assert p["model"].hidden == (8, 4)
    everything = load_params(path)
    assert set(everything) == set(SECTIONS)
    assert everything["prune"] == PruneConfig()


def test_load_params_reads_the_repository_params_yaml() -> None:
    path = Path(__file__).resolve().parents[2] / "params.yaml"
    p = load_params(path)
    assert isinstance(p["train"], TrainConfig)


def test_load_params_names_the_bad_key(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: 2\n  target_ratio: 1.5\n")
    with pytest.raises(ConfigError, match=r"^\[train\] target_ratio must be in \(0, 1\]$"):
        load_params(path, ["train"])


def test_a_params_yaml_still_setting_gpu_count_is_told_the_replacement(tmp_path: Path) -> None:
    path = write(tmp_path, "kubeflow:\n  gpu_type: nvidia.com/gpu\n  gpu_count: 2\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value) == (
        "[kubeflow] gpu_count was removed: use gpus_per_node (GPUs on each of train_nodes nodes)"
    )


def test_load_params_refuses_an_unknown_section(tmp_path: Path) -> None:
    """A misspelt section would otherwise leave all its keys silently at their defaults."""
    path = write(tmp_path, "trian:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_params(path, ["train"])


def test_load_params_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found") as info:
        load_params(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_load_params_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "train: {epochs: 2\nmodel: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


@pytest.mark.parametrize("text", ["- train\n- model\n", "just a string\n", "42\n"])
def test_load_params_non_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_params(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("# nothing\n", "is empty"),
        ("model:\n  hidden: [8]\n", "has no section 'train'"),
        ("train:\n  epochs: 2\n  epochs: 3\n", "duplicate key 'epochs'"),
        ("train:\n  epochs: 2\ntrain:\n  epochs: 3\n", "duplicate key 'train'"),
    ],
    ids=["empty", "missing-section", "duplicate-key", "duplicate-section"],
)
def test_load_params_refuses_what_would_silently_train_on_defaults(
    tmp_path: Path, text: str, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        load_params(write(tmp_path, text), ["train"])
    assert "params.yaml" in str(info.value)


def test_load_params_unreadable_files_are_one_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read parameter file") as info:
        load_params(tmp_path, ["train"])  # a directory
    assert str(tmp_path) in str(info.value)
    binary = tmp_path / "params.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81train")
    with pytest.raises(ConfigError, match="params.bin"):
        load_params(binary, ["train"])


def test_negative_split_seed_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^\[data\] split_seed must be >= 0$"):
        from_dict(DataConfig, {"split_seed": -1}, "data")


@pytest.mark.parametrize(
    ("cls", "key", "replacement"),
    [
        (TrainConfig, "alternation", "tnn_steps_per_snn_step"),
        (TrainConfig, "detach_factors", "never take gradients"),
        (TrainConfig, "snn_input", "per-unit statistics"),
        (TrainConfig, "snn_holdout", "own training batches"),
        (TrainConfig, "snn_gates", "gate_temperature"),
        (TrainConfig, "snn_prior", "starts from magnitude"),
        (PruneConfig, "round_to", "train.width_multiple"),
        (KubeflowConfig, "gpu_count", "gpus_per_node"),
    ],
)
def test_a_removed_key_is_refused_naming_what_replaced_it(
    cls: type, key: str, replacement: str
) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(cls, {key: 1})
    message = str(err.value)
    assert "\n" not in message and key in message and "was removed" in message
    assert replacement in message


def test_params_yaml_and_the_readme_name_every_key_and_no_other() -> None:
    """``params.yaml`` sets every key of every section; the README documents each one."""
    root = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    readme = (root / "README.md").read_text()
    for name, cls in SECTIONS.items():
        known = {f.name for f in dataclasses.fields(cls)}
        assert set(raw.get(name) or {}) == known, name
        missing = sorted(k for k in known if f"`{k}`" not in readme and f"{name}.{k}" not in readme)
        assert not missing, f"[{name}] keys the README does not document: {missing}"
    for _section, key in REMOVED_KEYS:
        assert f"`{key}`" in readme, key  # the README says what replaced it
