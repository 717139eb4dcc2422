"""Data-parallel ``train`` under ``torchrun``: two processes train what one process trains.

Every run here is the real command line on two processes in a temporary project (``torchrun
--standalone --nproc_per_node 2``, started by hand or by the command itself), with
``SWITCHPRUNE_CHECK_RANKS=1``: the two processes compare their factors
and scorer after every SNN step and their task network after every epoch, and stop at the first
difference. The one-process reference runs the same stage in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pipeline.servers import S3Server

from switchprune import storage
from switchprune.config import DataConfig, ModelConfig, PruneConfig, TrainConfig, from_dict
from switchprune.data import load_split
from switchprune.io import BASELINE_FILE, SWITCHED_FILE, load_model_file
from switchprune.scoring import hard_widths
from switchprune.stages import preprocess, prune, train

TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {"OMP_NUM_THREADS": "1", "SWITCHPRUNE_CHECK_RANKS": "1"}
# digits: 1,293 training samples, so batches of 64 leave a last batch of 13 (not shared).
MLP = {"arch": "mlp", "hidden": [32, 16]}
BASE = {"epochs": 3, "batch_size": 64, "device": "cpu", "tnn_steps_per_snn_step": 4}
# The magnitude MLP of the shared two-process run (baseline too), and of every run compared with
# it: the killed, the resumed and the self-launched one.
MAGNITUDE = {**BASE, "scorer": "magnitude", "baseline": True}
# A small VGG: still a BatchNorm after every conv, at a sixteenth of the widths (4 to 32).
VGG = {"arch": "vgg11", "width_multiplier": 0.0625}
VGG_STEPS = {"batch_size": 128, "tnn_steps_per_snn_step": 2}
AGREED = re.compile(r"train: the 2 ranks agreed after all (\d+) SNN steps and every epoch")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    preprocess.run(DataConfig(), raw_dir=out / "raw", prepared_dir=out)
    return out


def launch(
    project: Path, args: list[str], env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in ``project`` in a process group of its own, killed whole on a timeout: a
    killed torchrun alone would leave its workers waiting for each other forever."""
    with subprocess.Popen(
        args,
        cwd=project,
        env={**os.environ, **ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as running:
        try:
            stdout, stderr = running.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(running.pid, signal.SIGKILL)
            running.communicate()
            raise
    proc = subprocess.CompletedProcess(args, running.returncode, stdout, stderr)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def torchrun(
    project: Path,
    *command: str,
    restarts: int = 0,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``torchrun`` of ``command`` (a script, or ``-m module``) on two processes in ``project``."""
    args = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2"]
    return launch(project, [*args, "--max-restarts", str(restarts), *command], env, check)


def write_params(project: Path, model: dict[str, Any], train_cfg: dict[str, Any]) -> Path:
    project.mkdir(parents=True, exist_ok=True)
    path = project / "params.yaml"
    sections = {"data": {"dataset": "digits"}, "model": model, "train": train_cfg}
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def cli_args(prepared: Path, out: str = "out") -> list[str]:
    return [
        "-m",
        "switchprune",
        "train",
        "--params",
        "params.yaml",
        "--prepared-dir",
        str(prepared),
        "--trained-dir",
        f"{out}/trained",
        "--checkpoint-dir",
        f"{out}/ckpt",
        "--reports-dir",
        f"{out}/reports",
        "--metrics",
        f"{out}/reports/train.json",
        "-q",
    ]


def train_two(prepared: Path, project: Path) -> tuple[Path, str]:
    """``switchprune train`` on two processes; the trained folder and the stderr."""
    proc = torchrun(project, *cli_args(prepared))
    return project / "out" / "trained", proc.stderr


def train_one(prepared: Path, project: Path, out: Path) -> tuple[Path, dict[str, float]]:
    """The same stage in one process (this one), from ``project``'s ``params.yaml``, in ``out``."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"].pop("nproc_per_node", None)
    trained = out / "one" / "trained"
    metrics = train.run(
        from_dict(TrainConfig, raw["train"]),
        model_cfg=from_dict(ModelConfig, raw["model"]),
        data_cfg=from_dict(DataConfig, raw["data"]),
        prepared_dir=prepared,
        trained_dir=trained,
        checkpoint_dir=out / "one" / "ckpt",
        progress=False,
    )
    return trained, metrics


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def widths(path: Path) -> dict[str, int]:
    return hard_widths(torch.load(path, weights_only=True)["factors"])


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@torch.no_grad()
def gated_accuracy(path: Path, prepared: Path) -> float:
    """Accuracy of a trained model under its factors on validation and test together (504)."""
    model, blob = load_model_file(path)
    model.set_factors(blob.get("factors"))
    model.eval()
    correct = total = 0
    for split in ("val", "test"):
        x, y = load_split(prepared, split).tensors
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def snn_steps_agreed(stderr: str) -> int:
    found = AGREED.findall(stderr)
    assert found, stderr[-4000:]
    return int(found[0])


# --- the shared run: the magnitude MLP on two processes, compared by (a), (e) and (f) ------------

KILLER = '''"""``switchprune``; rank 1 SIGKILLs itself at training forward KILL_AT, once."""
import atexit
import os
import signal
from pathlib import Path

import torch

from switchprune.cli import entry
from switchprune.models import TaskNet

attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
marker = Path("killed")
forwards = [0]


def count(module, args):
    if isinstance(module, TaskNet) and module.training and torch.is_grad_enabled():
        forwards[0] += 1
        kill_at = int(os.environ.get("KILL_AT", "0"))
        if kill_at and forwards[0] == kill_at and rank == "1" and attempt == "0":
            if not marker.exists():
                marker.write_text(str(forwards[0]))
                os.kill(os.getpid(), signal.SIGKILL)


torch.nn.modules.module.register_module_forward_pre_hook(count)
atexit.register(lambda: Path(f"forwards.{attempt}.{rank}").write_text(str(forwards[0])))
entry()  # the command's own entry point, arguments from sys.argv
'''
# An epoch is 21 TNN steps (the magnitude scorer's SNN steps run no forward), and the baseline
# trains its 3 epochs after the switched run: the 32nd forward is the middle of the switched
# run's epoch 2, whose checkpoint is not written.
KILL_AT = 32
FORWARDS_WHOLE = 2 * 3 * 21
FORWARDS_AFTER_EPOCH_1 = FORWARDS_WHOLE - 21


def killer_run(
    project: Path, prepared: Path, *extra: str, kill_at: int = 0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """The shared run's training by ``torchrun`` (``switchprune train`` counting its forwards)
    in ``project``."""
    write_params(project, MLP, MAGNITUDE)
    (project / "killer.py").write_text(KILLER)
    args = cli_args(prepared)[2:]  # the command's own arguments, after "-m switchprune"
    env = {**kwargs.pop("env", {}), "KILL_AT": str(kill_at)}
    return torchrun(project, "killer.py", *args, *extra, env=env, **kwargs)


@pytest.fixture(scope="module")
def whole(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The uninterrupted two-process run, as ``dvc repro`` starts it: plain ``switchprune
    train`` with ``nproc_per_node: 2``, which launches itself under torchrun. Its project
    folder and stderr."""
    project = tmp_path_factory.mktemp("whole")
    write_params(project, MLP, {**MAGNITUDE, "nproc_per_node": 2})
    return project, launch(project, [sys.executable, *cli_args(prepared)]).stderr


def trained(project: Path) -> Path:
    return project / "out" / "trained" / SWITCHED_FILE


# --- (a) the same updates ---------------------------------------------------------------------


def test_magnitude_mlp_on_two_processes_equals_one_process(
    prepared: Path, whole: tuple[Path, str], tmp_path: Path
) -> None:
    project, stderr = whole
    two = project / "out" / "trained"
    one, metrics = train_one(prepared, project, tmp_path)
    assert snn_steps_agreed(stderr) == 10
    for name in (SWITCHED_FILE, BASELINE_FILE):  # the baseline trains data-parallel too
        assert max_diff(state(two / name), state(one / name)) < 1e-4, name
    assert widths(two / SWITCHED_FILE) == widths(one / SWITCHED_FILE)
    # Rank 0 alone wrote the report: the metrics of the whole run, as one process has them.
    report = json.loads((project / "out" / "reports" / "train.json").read_text())
    assert report["train_params_ratio"] == pytest.approx(metrics["train_params_ratio"])
    assert report["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    history = json.loads((project / "out" / "reports" / "train_history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]


# --- (b), (c) every SNN step agrees; widths and accuracy are one process's ---------------------


@pytest.mark.parametrize(
    ("model", "overrides", "snn_steps"),
    [
        (MLP, {"scorer": "switcher", "snn_hidden": 8}, 10),
        # A BatchNorm net (normalised over the whole global batch, sync_bn: auto). Its learning
        # rate is 0.01: at the recipe's 0.05 this net's training is chaotic (a 1e-7 change of
        # one weight, in one process, ends as far from the unchanged run as two processes do).
        # Batches of 128 (11 an epoch, the last of 13 whole): every step of it pays two
        # all-reduces per BatchNorm, so half the steps, with an SNN step after every second.
        (VGG, {**VGG_STEPS, "scorer": "magnitude", "tnn_lr": 0.01}, 11),
    ],
    ids=["mlp-switcher", "vgg11-bn-magnitude"],
)
def test_ranks_agree_and_match_one_process(
    prepared: Path,
    tmp_path: Path,
    model: dict[str, Any],
    overrides: dict[str, Any],
    snn_steps: int,
) -> None:
    write_params(tmp_path, model, {**BASE, "baseline": False, **overrides})
    two, stderr = train_two(prepared, tmp_path)
    one, _ = train_one(prepared, tmp_path, tmp_path)
    assert snn_steps_agreed(stderr) == snn_steps  # 2 switching epochs of the 3
    assert widths(two / SWITCHED_FILE) == widths(one / SWITCHED_FILE)
    acc_two = gated_accuracy(two / SWITCHED_FILE, prepared)
    acc_one = gated_accuracy(one / SWITCHED_FILE, prepared)
    assert abs(acc_two - acc_one) <= 0.005, (acc_two, acc_one)
    # The same keys too: the synchronised BatchNorms were turned back into plain ones.
    assert max_diff(state(two / SWITCHED_FILE), state(one / SWITCHED_FILE)) < 1e-3
    compacted = prune.run(PruneConfig(), trained_dir=two, model_dir=tmp_path / "compact")
    assert compacted["params_after"] < compacted["params_before"]


def test_per_process_batchnorm_keeps_the_ranks_equal(prepared: Path, tmp_path: Path) -> None:
    """``sync_bn: false``: own batch statistics, running statistics averaged every epoch."""
    write_params(tmp_path, VGG, {**BASE, "baseline": False, "epochs": 2, "sync_bn": False})
    two, stderr = train_two(prepared, tmp_path)
    assert snn_steps_agreed(stderr) > 0  # and the task networks after every epoch
    assert gated_accuracy(two / SWITCHED_FILE, prepared) > 0.5


# Two checks of the distributed helpers in one job (each torchrun pays three torch imports): the
# synchronised BatchNorm first, then two ranks that disagree end the job.
HELPERS = """
import copy
import torch
from torch import nn
from switchprune import distributed

torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
    nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3),
)
x, y = 3 + torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,))
one = copy.deepcopy(net)
expected = one(x)
nn.functional.cross_entropy(expected, y).backward()
with distributed.session(torch.device("cpu")):
    rank = distributed.rank()
    assert distributed.to_sync_batchnorm(net, torch.device("cpu")) == 2
    ddp = nn.parallel.DistributedDataParallel(net)
    out = ddp(x[rank::2])
    assert (out - expected[rank::2]).abs().max() < 1e-5
    nn.functional.cross_entropy(out, y[rank::2]).backward()
    for p, q in zip(net.parameters(), one.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() < 1e-5 * (1 + q.grad.abs().max()), (p.grad, q.grad)
    for a, b in zip(net.buffers(), one.buffers(), strict=True):
        assert (a.double() - b.double()).abs().max() < 1e-5, (a, b)
    print("same as one process", flush=True)

    distributed.check_ranks_agree("after SNN step 7", {"factors": {"a": torch.ones(3)}})
    factors = {"a": torch.tensor([1.0, 0.0, float(rank)])}
    distributed.check_ranks_agree("after SNN step 8", {"factors": factors})
"""


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    project = tmp_path_factory.mktemp("helpers")
    (project / "helpers.py").write_text(HELPERS)
    return torchrun(project, "helpers.py", check=False)


def test_cpu_synchronised_batchnorm_gives_the_one_process_gradients(
    helpers: subprocess.CompletedProcess[str],
) -> None:
    """Shares of 5 normalised together: the outputs, gradients and running statistics of 10."""
    assert helpers.stdout.count("same as one process") == 2, helpers.stderr[-4000:]


# --- (d) refusals -----------------------------------------------------------------------------


def test_batch_size_the_processes_cannot_share_is_refused(prepared: Path, tmp_path: Path) -> None:
    write_params(tmp_path, MLP, {**BASE, "batch_size": 33})
    proc = torchrun(tmp_path, *cli_args(prepared), check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "batch_size" in line]
    assert lines and all(
        line.startswith("switchprune train: error: [train] batch_size 33 does not divide by the 2")
        for line in lines
    ), proc.stderr[-4000:]
    assert not (tmp_path / "out" / "trained").exists()


def test_ranks_that_disagree_are_named_with_the_step(
    helpers: subprocess.CompletedProcess[str],
) -> None:
    assert helpers.returncode != 0
    assert "RanksDisagreeError: ranks disagree after SNN step 8: their factors differ" in (
        helpers.stderr
    ), helpers.stderr[-4000:]
    assert "step 7" not in helpers.stderr


# --- (e) a process killed mid-epoch: torchrun restarts, every rank resumes ----------------------


def test_killed_rank_is_restarted_and_resumes_to_the_same_weights(
    prepared: Path, whole: tuple[Path, str], tmp_path: Path
) -> None:
    killer_run(tmp_path, prepared, kill_at=KILL_AT, restarts=1)
    assert (tmp_path / "killed").read_text() == str(KILL_AT)
    assert not (tmp_path / "forwards.0.1").exists()  # SIGKILL: no exit handler ran
    # Epoch 1 of the switched run came from the checkpoint, not trained again.
    assert int((tmp_path / "forwards.1.1").read_text()) == FORWARDS_AFTER_EPOCH_1
    a, b = state(trained(whole[0])), state(trained(tmp_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert widths(trained(whole[0])) == widths(trained(tmp_path))


def test_a_job_killed_mid_epoch_resumes_on_an_empty_disk_from_its_s3_checkpoints(
    prepared: Path, whole: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No restart: the job dies. The same command in an empty folder (a new node, nothing on
    its disk) resumes from the checkpoint rank 0 uploaded and trains the uninterrupted weights."""
    uri = ("--checkpoint-uri", "s3://ckpt/job")
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    with S3Server(tmp_path / "s3") as s3:
        env = {
            **s3.environment,
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        died = killer_run(killed, prepared, *uri, kill_at=KILL_AT, env=env, check=False)
        keys = storage.list_objects(storage.make_client(), "ckpt", "job/")
        assert [o["Key"] for o in keys] == ["job/switched.ckpt"]
        proc = killer_run(resumed, prepared, *uri, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert died.returncode != 0 and (killed / "killed").read_text() == str(KILL_AT)
    assert not (killed / "out" / "trained").exists()
    # Epoch 1 came from S3 (two of three epochs trained), and no checkpoint was kept locally.
    assert (resumed / "forwards.0.1").read_text() == str(FORWARDS_AFTER_EPOCH_1)
    assert not (resumed / "out" / "ckpt").exists() and not (killed / "out" / "ckpt").exists()
    a, b = state(trained(whole[0])), state(trained(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- (f) the train command launches itself -----------------------------------------------------


def test_nproc_per_node_makes_the_train_command_launch_itself_under_torchrun(
    whole: tuple[Path, str],
) -> None:
    """What ``dvc repro`` runs (plain ``switchprune train``) trains on ``nproc_per_node``
    processes: the shared run is one, and (a), (e) find it equal to the runs started by hand."""
    project, stderr = whole
    assert snn_steps_agreed(stderr) == 10  # two ranks compared their factors
    assert json.loads((project / "out" / "reports" / "train.json").read_text())
