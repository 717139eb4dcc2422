"""The data-parallel plumbing that runs in one process: shares, BatchNorm swaps, settings.

The runs on several processes are in ``tests/integration/test_distributed.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from model_support import USER_ARCH  # tests/ is on sys.path
from switchprune import distributed
from switchprune.config import ConfigError, TrainConfig
from switchprune.data import Augmentation, TrainingData, shard, split_shard
from switchprune.models import ModelSpec, TaskNet
from switchprune.training import fit


@pytest.mark.parametrize("count", [64, 13, 2, 1])
def test_shares_of_a_batch_together_are_the_batch(count: int) -> None:
    batch = torch.arange(100, 100 + count)
    parts = [batch[shard(count, r, 2)] for r in range(2)]
    if count % 2:
        assert all(torch.equal(p, batch) for p in parts)  # not shared: every rank takes it all
    else:
        assert [p.tolist() for p in parts] == [batch[0::2].tolist(), batch[1::2].tolist()]
    assert shard(count) == slice(None)


def test_epoch_shares_with_augmentation_interleave_to_the_one_process_batches() -> None:
    """Each rank's crops and flips are those one process gives the same images."""
    g = torch.Generator().manual_seed(0)
    data = TrainingData(y=torch.arange(50), x=torch.randn(50, 3, 8, 8, generator=g))
    order = torch.randperm(50, generator=g)
    aug = Augmentation(pad=1, flip=True)

    def batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(7)
        epoch = data.epoch(order, 16, torch.device("cpu"), augment=aug, generator=gen, rank=rank,
                           world=world)  # fmt: skip
        return list(epoch)

    one, ranks = batches(0, 1), [batches(r, 2) for r in range(2)]
    assert [len(y) for y in (b[1] for b in one)] == [16, 16, 16, 2]
    assert [len(b[1]) for b in ranks[0]] == [8, 8, 8, 1]  # the last batch (2) is shared too
    for i, (x, y) in enumerate(one):
        for r in range(2):
            xr, yr = ranks[r][i]
            assert torch.equal(yr, y[r::2]) and torch.equal(xr, x[r::2])


def test_a_last_batch_the_ranks_cannot_share_is_taken_whole_by_each() -> None:
    data = TrainingData(y=torch.arange(13), x=torch.randn(13, 4))
    order = torch.arange(13)
    for rank in range(2):
        sizes = [len(y) for _x, y in data.epoch(order, 4, torch.device("cpu"), rank=rank, world=2)]
        assert sizes == [2, 2, 2, 1]  # 13 = 4 + 4 + 4 + 1: the 1 is not shared
    assert [len(y) for _x, y in data.epoch(order, 4, torch.device("cpu"))] == [4, 4, 4, 1]


def test_validation_shares_cover_the_split_once() -> None:
    data = TensorDataset(torch.arange(11).float().unsqueeze(1), torch.arange(11))
    parts = [split_shard(data, r, 3) for r in range(3)]
    labels = sorted(int(v) for p in parts for v in p.tensors[1])
    assert labels == list(range(11))
    assert split_shard(data, 0, 1) is data


# A hand-written net, and the user's graph network: gates hooked on its BatchNorms.
@pytest.mark.parametrize("arch", ["vgg11", USER_ARCH], ids=["vgg11", "user"])
def test_synchronised_batchnorm_round_trip_keeps_tensors_hooks_and_outputs(
    arch: str, tiny_net: Callable[..., TaskNet], random_factors: Callable[..., dict]
) -> None:
    """Alone, the synchronised layers compute what BatchNorm does; gates (hooks) stay on."""
    model = tiny_net(arch)
    reference = tiny_net(arch)
    factors = random_factors(model)
    params = [id(p) for p in model.parameters()]
    buffers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert distributed.to_sync_batchnorm(model, torch.device("cpu")) == count > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert [id(p) for p in model.parameters()] == params  # the optimiser's tensors
    x = torch.randn(4, *model.spec.in_shape)
    for train in (False, True):
        for net in (model, reference):
            net.train(train)
            net.set_factors(factors)
        assert torch.equal(model(x), reference(x))
    reference.eval().set_factors(None)  # (eval: no statistics change)
    assert not torch.equal(model.eval()(x), reference(x))  # the gates act: hooks went along
    reference.set_factors(factors)
    assert distributed.to_plain_batchnorm(model) == count
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {nn.BatchNorm2d}
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == buffers
    model.eval()
    reference.eval()
    assert torch.equal(model(x), reference(x))


def test_lone_process_helpers_communicate_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched() and distributed.is_main()
    assert distributed.world_size() == 1 and distributed.local_world_size() == 1
    t = torch.ones(3)
    distributed.average_([t])
    assert torch.equal(distributed.all_reduce_sum(t), torch.ones(3))
    distributed.check_ranks_agree("after SNN step 1", {"factors": {"a": t}})
    with distributed.session(torch.device("cpu")) as device:
        assert device == torch.device("cpu") and not distributed.active()


def test_rank_and_threads_come_from_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.threads("auto") is None  # alone: torch's own default
    assert distributed.threads(3) == 3
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() and distributed.rank() == 1 and not distributed.is_main()
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert distributed.threads("auto") == 4
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda _pid: {0})
    assert distributed.threads("auto") == 1
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


def test_batch_size_not_divisible_by_the_processes_is_one_line_naming_both() -> None:
    distributed.check_batch_size(64, 2)
    with pytest.raises(ConfigError, match=r"^\[train\] batch_size 33 does not divide by the 2 "):
        distributed.check_batch_size(33, 2)


def test_digest_tells_one_changed_bit() -> None:
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.zeros(())}
    b = {"x": torch.tensor([1.0, 2.0]), "y": torch.zeros(())}
    assert distributed.digest(a) == distributed.digest(b)
    b["x"][1] = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))
    assert distributed.digest(a) != distributed.digest(b)
    assert distributed.digest({"x": a["x"].bfloat16()}) != distributed.digest({"x": a["x"]})


def test_a_checkpoint_resumes_with_another_thread_count(tmp_path: Path) -> None:
    """Threads change the speed, not the result: not part of a checkpoint's fingerprint."""
    spec = ModelSpec("mlp", (1, 4, 4), 3, {"fc1": 8})
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 1, 4, 4, generator=g), torch.randint(0, 3, (40,)))
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu", baseline=False, threads=1)
    ckpt = tmp_path / "run.ckpt"
    fit(spec, data, None, cfg, progress=False, checkpoint_path=ckpt)
    seen: list[int] = []
    again = TrainConfig(epochs=2, batch_size=8, device="cpu", baseline=False, threads=2)
    fit(spec, data, None, again, progress=False, checkpoint_path=ckpt, on_epoch_end=seen.append)
    assert seen == []  # both epochs came from the checkpoint
