"""Data-parallel training on torch.distributed: set-up under torchrun, and the collectives used.

`torchrun --nproc_per_node=N -m offpg_offline.train DATASET ...` (or `offpg train --nproc N`)
starts N copies of the trainer. Each reads the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), joins a process group (gloo on CPU, nccl on CUDA) and trains on
its own part of every batch. After each backward pass the gradients are averaged over ranks
(an all-reduce of one flat buffer), so every rank takes the same optimizer step:

    g = (1/N) Σ_r ∇L_r(θ),   L_r = the surrogate on rank r's B/N units of the global batch.

When L is a mean over the units (episodes, or steps for `per-step`) and every rank holds the
same number of them, g is the gradient of the global batch: N processes reproduce the
1-process run up to float rounding. The KL penalty, a mean over rows, is reweighted by
`row_weight` on each rank for the same reason. Batch-wide statistics (self-normalised weights,
standardised returns, PSIS) are then taken per rank instead of over the global batch.
Metrics, checkpoints and tracking happen on rank 0 only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, slots=True)
class Context:
    """Where this process sits: rank r of N, and the device its tensors live on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the process that logs, checkpoints and evaluates (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when gradients must be averaged across processes."""
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` → this rank's GPU when CUDA is available, else the CPU; `cuda` → this rank's GPU.

    Raises:
        ValueError: an unknown name, or `cuda` on a machine without a usable GPU.
    """
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device cuda was requested but torch sees no CUDA GPU; use --device cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto") -> Context:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    Idempotent: a process group that already exists is reused.
    """
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    context = Context(rank, world_size, local_rank, resolve_device(device, local_rank))
    if world_size > 1 and not dist.is_initialized():
        if context.device.type == "cuda":
            torch.cuda.set_device(context.device)
        backend = "nccl" if context.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return context


def teardown(context: Context) -> None:
    """Leave the process group (after a barrier, so no rank exits while others still talk)."""
    if context.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def average_gradients(module: nn.Module, context: Context) -> None:
    """Replace every parameter's gradient by its mean over ranks (one all-reduce)."""
    if not context.distributed:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= context.world_size
    offset = 0
    for param in params:
        size = param.numel()
        param.grad = flat[offset : offset + size].view_as(param).clone()
        offset += size


def broadcast_parameters(module: nn.Module, context: Context) -> None:
    """Copy rank 0's parameters and buffers to every rank (a common starting point)."""
    if not context.distributed:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def mean_over_ranks(value: Tensor, context: Context) -> float:
    """The mean of a scalar over ranks (the global batch's loss when each rank holds B/N)."""
    if not context.distributed:
        return float(value.detach())
    total = value.detach().reshape(1).to(torch.float64).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / context.world_size


def row_weight(n_rows: int, context: Context) -> float:
    """N · M_r / M: the factor that makes a per-rank mean over rows (the KL penalty) average
    over ranks to the mean over the global batch's M rows, when ranks hold unequal row counts
    (whole episodes of different lengths). One all-reduce of the row count; 1 on one process.
    """
    if not context.distributed:
        return 1.0
    total = torch.tensor([n_rows], dtype=torch.int64, device=context.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return context.world_size * n_rows / int(total)


def local_part(n_units: int, context: Context) -> slice:
    """This rank's contiguous share of a global batch of `n_units` units.

    Raises:
        ValueError: `n_units` is not a multiple of the world size (equal shares keep the
            averaged gradient equal to the global batch's).
    """
    if n_units % context.world_size:
        raise ValueError(
            f"a batch of {n_units} units cannot be split evenly over {context.world_size} "
            f"processes; choose a batch size that is a multiple of {context.world_size}"
        )
    share = n_units // context.world_size
    return slice(context.rank * share, (context.rank + 1) * share)


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The command that starts `nproc` trainer processes on this machine via torchrun.

    `--standalone` picks a free rendezvous port, so concurrent jobs do not collide.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "offpg_offline.train",
        *args,
    ]
