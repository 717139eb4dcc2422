"""ONNX export of every architecture, checked against PyTorch with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model_support import IN_SHAPES, TEST_ARCHS
from switchprune import onnx_export
from switchprune.onnx_export import (
    MAX_ABS_DIFF,
    ONNX_FILE,
    OnnxExportError,
    export_checked,
    latency_ms,
    session,
)


def logits_of_order_one(model: torch.nn.Module, in_shape: tuple[int, ...]) -> torch.nn.Module:
    """Scale the classifier so logits are O(1), as a trained net's are: float32 rounding alone
    differs by ~1e-4 between two correct engines at the logits of 60 some random nets reach."""
    with torch.no_grad():
        scale = model.eval()(torch.randn(8, *in_shape)).abs().max().item()
        if scale > 1.0:
            classifier = dict(model.named_modules())[model.classifier_name]
            classifier.weight.mul_(1.0 / scale)
            if classifier.bias is not None:
                classifier.bias.mul_(1.0 / scale)
    return model


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_every_arch_exports_and_matches_pytorch(arch: str, tiny_net, tmp_path: Path) -> None:
    model = logits_of_order_one(tiny_net(arch), IN_SHAPES[arch])
    path = tmp_path / ONNX_FILE
    diff = export_checked(model, IN_SHAPES[arch], path)
    assert diff <= MAX_ABS_DIFF
    # A fresh session on the file, at a batch size the export never saw (dynamic batch axis).
    x = torch.randn(5, *IN_SHAPES[arch], generator=torch.Generator().manual_seed(7))
    got = session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    assert got.shape == expected.shape == (5, expected.shape[1])
    assert np.abs(got - expected).max() <= MAX_ABS_DIFF
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_a_mismatch_is_refused_and_leaves_no_file(tiny_net, tmp_path: Path) -> None:
    path = tmp_path / ONNX_FILE
    path.write_bytes(b"stale copy of an older model")
    with pytest.raises(OnnxExportError, match="does not match PyTorch"):
        export_checked(tiny_net("mlp"), IN_SHAPES["mlp"], path, tolerance=-1.0)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_latency_is_measured_at_both_batch_sizes(tiny_net, tmp_path: Path) -> None:
    path = tmp_path / ONNX_FILE
    export_checked(tiny_net("lenet5"), IN_SHAPES["lenet5"], path)
    for batch in (1, 256):
        ms = latency_ms(path, IN_SHAPES["lenet5"], batch, warmup=1, repeats=3, threads=1)
        assert 0.0 < ms < 10_000.0


def test_the_file_names_no_path_of_this_machine(tiny_net, tmp_path: Path) -> None:
    # The exporter records each node's stack trace, with absolute source paths: dropped, so
    # the same model gives the same bytes in any checkout.
    import switchprune

    data = onnx_export.export_bytes(tiny_net("lenet5"), IN_SHAPES["lenet5"])
    source_root = str(Path(switchprune.__file__).resolve().parents[1]).encode()
    assert source_root not in data and onnx_export.STACK_TRACE_KEY.encode() not in data
    assert b"pkg.torch.onnx.class_hierarchy" in data  # the rest of the metadata stays
