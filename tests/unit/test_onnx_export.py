"""ONNX export of every architecture behind its input contract, checked with onnxruntime."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model_support import IN_SHAPES, REPRESENTATIVE_ARCHS, make_tiny_net
from switchprune import onnx_export
from switchprune.onnx_export import (
    ATOL,
    ONNX_FILE,
    RTOL,
    OnnxExportError,
    compare,
    export_checked,
    onnx_pass,
    random_pixels,
    read_contract,
    session,
)
from switchprune.serving import InputContract, ServedModel


def contract_for(model: torch.nn.Module, mean: float = 0.4) -> InputContract:
    channels = model.spec.in_shape[0]
    return InputContract(
        shape=tuple(model.spec.in_shape),
        mean=(mean,) * channels,
        std=(0.25,) * channels,
        classes=tuple(f"class-{i}" for i in range(model.spec.num_classes)),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``exported(arch)``: the checked export of ``make_tiny_net(arch)`` behind
    ``contract_for``, made once per module (an export costs a trace of the network)."""
    root = tmp_path_factory.mktemp("onnx")
    paths: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in paths:
            model = make_tiny_net(arch)
            folder = root / str(len(paths))
            folder.mkdir()
            export_checked(model, contract_for(model), folder / ONNX_FILE)
            paths[arch] = folder / ONNX_FILE
        return paths[arch]

    return get


@pytest.mark.parametrize("arch", REPRESENTATIVE_ARCHS)
def test_every_arch_exports_and_matches_pytorch(arch: str, tiny_net, exported) -> None:
    # Random full-width nets, logits unscaled: deep ones reach large logits, where float32
    # rounding alone exceeds an absolute 1e-4; the tolerance follows their scale.
    model = tiny_net(arch)
    contract = contract_for(model)
    path = exported(arch)
    # A fresh session on the file, raw pixels at a batch size the export never saw.
    x = random_pixels(5, IN_SHAPES[arch], seed=7)
    got = session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = ServedModel(model, contract).eval()(x).numpy()
        # The same as the bare network on the prepared data's normalisation.
        normalised = (x.float() / 255.0 - 0.4) / 0.25
        assert np.array_equal(expected, model.eval()(normalised).numpy())
    assert got.shape == expected.shape == (5, expected.shape[1])
    assert np.abs(got - expected).max() <= ATOL + RTOL * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_the_graph_takes_uint8_and_refuses_floats(exported) -> None:
    sess = session(exported("lenet5"))
    (declared,) = sess.get_inputs()
    assert declared.type == "tensor(uint8)" and declared.shape[1:] == [1, 8, 8]
    floats = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    with pytest.raises(Exception, match="(?i)type"):
        sess.run(None, {"input": floats})


def test_the_file_carries_the_contract(tiny_net, exported) -> None:
    model = tiny_net("mlp")
    contract = contract_for(model)
    path = exported("mlp")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["classes"]) == [f"class-{i}" for i in range(model.spec.num_classes)]
    assert json.loads(props["input_dtype"]) == "uint8"
    assert json.loads(props["input_layout"]) == "NCHW"
    assert json.loads(props["input_shape"]) == [1, 8, 8]
    assert json.loads(props["mean"]) == [0.4] and json.loads(props["std"]) == [0.25]
    assert read_contract(path) == contract


def test_a_mismatch_is_refused_and_leaves_no_file(tiny_net, tmp_path: Path) -> None:
    path = tmp_path / ONNX_FILE
    path.write_bytes(b"stale copy of an older model")
    model = tiny_net("mlp")
    with pytest.raises(OnnxExportError, match="does not match PyTorch"):
        export_checked(model, contract_for(model), path, atol=-1.0, rtol=0.0)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_the_tolerance_catches_a_wrong_normalisation(arch: str, tiny_net) -> None:
    # A graph that normalises with another mean (here by 0.02, a few grey levels) is not the
    # model: the relative tolerance still tells it apart, on a shallow and on a deep network.
    model = tiny_net(arch)
    data = onnx_export.export_bytes(model, contract_for(model, mean=0.42))
    x = random_pixels(3, IN_SHAPES[arch])
    diff, scale = compare(model, contract_for(model), data, x)
    assert diff > ATOL + RTOL * scale
    same, scale = compare(model, contract_for(model, mean=0.42), data, x)
    assert same <= ATOL + RTOL * scale


def test_latency_is_measured_at_both_batch_sizes(tiny_net, exported) -> None:
    model = tiny_net("lenet5")
    path = exported("lenet5")
    for batch in (1, 256):
        run = onnx_pass(path, IN_SHAPES["lenet5"], batch, threads=1)
        (logits,) = run()
        assert logits.shape == (batch, model.spec.num_classes)


def test_the_file_names_no_path_of_this_machine(exported) -> None:
    # The exporter records each node's stack trace, with absolute source paths: dropped, so
    # the same model gives the same bytes in any checkout. (The file holds export_bytes' bytes.)
    import switchprune

    data = exported("lenet5").read_bytes()
    source_root = str(Path(switchprune.__file__).resolve().parents[1]).encode()
    assert source_root not in data and onnx_export.STACK_TRACE_KEY.encode() not in data
    assert b"pkg.torch.onnx.class_hierarchy" in data  # the rest of the metadata stays
