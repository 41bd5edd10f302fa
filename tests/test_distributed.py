"""A converted model (one conv probed, one recomputed) under DistributedDataParallel: 2 CPU processes, gloo."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from xconv_patch import Recipe, convert
from xconv_patch.probes import ProbeSpec

WORLD_SIZE = 2


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def _gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    copies = [torch.empty_like(tensor) for _ in range(WORLD_SIZE)]
    dist.all_gather(copies, tensor.contiguous())
    return copies


def _train(rank: int, port: int, results: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same weights and data on every rank: only the probes may differ
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    model = convert(_small_cnn(), recipe=Recipe(ProbeSpec(probes=4)), input_shape=x.shape)
    storage = [layer.storage for layer in model.xconv_report.layers]
    assert storage == ["probed", "recomputed"], storage  # the first conv probed, the second recomputed

    nn.functional.cross_entropy(model(x), y).backward()
    patched_weight, bias = model[0].weight.grad, model[8].bias.grad
    local_grads_differ = not torch.equal(*_gathered(patched_weight))
    exact_grads_agree = torch.equal(*_gathered(bias))
    model.zero_grad()

    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    in_sync = all(torch.equal(*_gathered(parameter.detach())) for parameter in model.parameters())
    (results / f"rank{rank}").write_text(f"{local_grads_differ} {exact_grads_agree} {in_sync} {losses[-1] < losses[0]}")
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ddp_trains_in_sync_with_different_probes_per_rank(tmp_path: Path) -> None:
    mp.spawn(_train, args=(_free_port(), tmp_path), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        local_grads_differ, exact_grads_agree, in_sync, loss_fell = (tmp_path / f"rank{rank}").read_text().split()
        assert local_grads_differ == "True", "ranks drew the same probes"
        assert exact_grads_agree == "True", "exact gradients should not depend on the rank"
        assert in_sync == "True", "parameters diverged across ranks"
        assert loss_fell == "True"
