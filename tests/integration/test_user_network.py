"""A network of the user's own, from ``dvc repro`` and ``make release`` to every shipped form.

The network (a concatenation, a grouped conv inside a residual block) lives in the project as
``mynets/net.py``. After release, a fresh process in another folder, where no copy of that file
exists, gets the champion back from the registry and must compute the same logits on the same
raw ``uint8`` batch with ``switchprune.load_model``, the MLflow pyfunc (``mlflow models predict``
and ``serve``) and onnxruntime on the pulled ``model.onnx``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pipeline.servers import ModelServer

from project_support import BIN, ROOT, commit_all, copy_project, empty_store, run_tool, tool_env

MODEL = "switchprune-test-own-net"
ARCH = "mynets/net.py:build_mixed"

pytestmark = pytest.mark.slow

# Run in the folder without the network's file: the model loaded from the registry first, then
# `switchprune pull` of the champion (the command's own code, in this process) and onnxruntime
# on its model.onnx; every form on the same batch, logits saved.
LOAD_EVERY_FORM = """
import json, sys
import numpy as np, onnxruntime, torch
import switchprune
from switchprune import cli
torch.set_num_threads(1)
x = np.load("batch.npy")
model = switchprune.load_model(sys.argv[1])
with torch.no_grad():
    np.save("load_model.npy", model(torch.from_numpy(x)).numpy())
assert cli.main(["pull", sys.argv[2], "--out", "champion"]) == 0
session = onnxruntime.InferenceSession("champion/model.onnx", providers=["CPUExecutionProvider"])
np.save("onnx.npy", session.run(None, {session.get_inputs()[0].name: x})[0])
print(json.dumps(type(model).__module__))
"""


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory, project_files: list[str]) -> Path:
    """A project whose own network went through ``dvc repro`` and ``make release``."""
    dst = copy_project(tmp_path_factory.mktemp("own-net-repo"), project_files)
    (dst / "mynets").mkdir()
    shutil.copy(ROOT / "tests" / "models" / "user_net.py", dst / "mynets" / "net.py")
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["model"]["arch"] = ARCH
    params["train"].update(epochs=3, batch_size=64, target_ratio=0.5, tnn_steps_per_snn_step=1)
    params["evaluate"].update(latency_warmup=1, latency_repeats=2)
    params["register"]["model_name"] = MODEL
    params["promote"].update(min_accuracy=0.2, max_accuracy_drop=0.6, max_params_ratio=0.95)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(dst)
    empty_store(tmp_path_factory, dst / "mlflow.db")  # the embedded store, migrated
    run_tool([str(BIN / "dvc"), "repro"], dst)
    run_tool([sys.executable, "pipeline/local.py", "--release"], dst)
    return dst


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory, released: Path) -> dict[str, Any]:
    """A folder with no copy of the network: the champion pulled, every form run on one batch."""
    work = tmp_path_factory.mktemp("elsewhere")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{released / 'mlflow.db'}"}
    batch = np.random.default_rng(0).integers(0, 256, size=(5, 1, 8, 8), dtype=np.uint8)
    np.save(work / "batch.npy", batch)
    out = run_tool(
        [sys.executable, "-c", LOAD_EVERY_FORM, f"models:/{MODEL}@champion", f"{MODEL}@champion"],
        work,
        **env,
    )
    return {"work": work, "env": env, "batch": batch, "stdout": out}


def test_release_ships_the_networks_file_everywhere(released: Path, elsewhere: dict) -> None:
    source = (released / "mynets" / "net.py").read_bytes()
    assert (released / "models" / "compact" / "network.py").read_bytes() == source
    assert (elsewhere["work"] / "champion" / "network.py").read_bytes() == source
    promoted = released / ".s3" / "data" / "switchprune-models" / MODEL
    manifest = json.loads((promoted / "current.json").read_text())
    listed = {entry["name"] for entry in manifest["files"]}
    assert "network.py" in listed
    assert (promoted / f"v{manifest['version']}" / "network.py").read_bytes() == source
    assert not list(elsewhere["work"].rglob("net.py"))


def test_every_form_gives_the_same_logits_in_a_folder_without_the_file(elsewhere: dict) -> None:
    work = elsewhere["work"]
    reference = np.load(work / "load_model.npy")
    assert reference.shape == (5, 10)
    np.testing.assert_allclose(np.load(work / "onnx.npy"), reference, rtol=1e-4, atol=1e-5)

    (work / "input.json").write_text(json.dumps({"inputs": elsewhere["batch"].tolist()}))
    args = ["models", "predict", "-m", f"models:/{MODEL}@champion", "--env-manager", "local"]
    args += ["-i", "input.json", "-t", "json", "-o", "predicted.json"]
    # Started before the server, and checked after it: two independent processes, each mostly
    # interpreter start-up, run at once.
    predict = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *args],
        cwd=work,
        env=tool_env(**elsewhere["env"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = ModelServer(
        f"models:/{MODEL}@champion",
        env=tool_env(**elsewhere["env"]),
        cwd=work,
        log_path=work / "serve.log",
    )
    with server:
        status, answer = server.invoke({"inputs": elsewhere["batch"].tolist()})
        assert status == 200, answer
        np.testing.assert_allclose(_logits(answer), reference, rtol=1e-5, atol=1e-6)
        # The same images scaled to [0, 1]: refused, never cast to a black image.
        floats = (elsewhere["batch"] / 255.0).tolist()
        status, answer = server.invoke({"inputs": floats})
        assert 400 <= status < 500, answer
        assert "uint8" in json.dumps(answer)

    out, err = predict.communicate(timeout=600)
    assert predict.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    predicted = json.loads((work / "predicted.json").read_text())
    np.testing.assert_allclose(_logits(predicted), reference, rtol=1e-5, atol=1e-6)


def _logits(answer: Any) -> np.ndarray:
    if isinstance(answer, dict):
        answer = answer["predictions"]
    return np.asarray(answer, dtype=np.float64)
