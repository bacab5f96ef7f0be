"""Data parallelism over processes of one machine (gloo), for train.py's `--workers`.

On the 2-core VM, two processes of one thread each train more puzzles per second than one
process with two threads (the model's matmuls are too small to keep two threads busy). Each
worker holds the whole model, draws its own share of the batch, and averages its gradients
with the others before an identical optimizer step, so the weights stay equal everywhere.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Every worker's gradients become the mean over workers, in one message. A parameter a
    worker's batch did not reach (self-conditioning is drawn per worker) counts as zero there."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in parameters:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def largest(value: float) -> float:
    """The largest of the workers' values (the slowest worker's step time paces the budget)."""
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def mean(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def check_in_sync(parameters: list[torch.nn.Parameter]) -> None:
    """Raises when the workers' weights have drifted apart (they must step identically)."""
    sums = torch.stack([p.detach().double().sum() for p in parameters])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("data-parallel workers hold different weights")
