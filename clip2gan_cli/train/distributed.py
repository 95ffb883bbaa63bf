"""Multi-process training under torchrun: rank layout, process group, and the collective calls the loop makes.

Every helper is a no-op for a single process (world_size 1), so the loop calls them unconditionally.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..device import resolve_device


@dataclass
class DistributedContext:
    """Rank layout of this process (world_size 1 when not started by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_spec: str) -> DistributedContext:
    """Join the process group torchrun set up (env://); nccl on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistributedContext(rank, world_size, local_rank, initialised_here=False)
    use_cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda") or device_spec.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank, initialised_here=True)


def close_distributed(dist_ctx: DistributedContext) -> None:
    """Leave the process group, if this process created it."""
    if dist_ctx.initialised_here:
        torch.distributed.destroy_process_group()


def device_for(device_spec: str, dist_ctx: DistributedContext) -> torch.device:
    """The device this rank trains on (one GPU per process under torchrun)."""
    device = resolve_device(device_spec)
    if dist_ctx.enabled and device.type == "cuda":
        return torch.device("cuda", dist_ctx.local_rank)
    return device


def barrier(dist_ctx: DistributedContext) -> None:
    if dist_ctx.enabled:
        torch.distributed.barrier()


def broadcast_parameters(module: nn.Module) -> None:
    """Make every rank start from rank 0's weights."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        torch.distributed.broadcast(tensor.data, src=0)


def wrap_data_parallel(mapper: nn.Module, device: torch.device, dist_ctx: DistributedContext) -> nn.Module:
    """The mapper in DistributedDataParallel under torchrun; itself for one process."""
    if not dist_ctx.enabled:
        return mapper
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(mapper, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_gradients(module: nn.Module, dist_ctx: DistributedContext) -> None:
    """Average gradients across ranks. The critic is not wrapped in DDP because its gradient
    penalty differentiates D's output with respect to its input (autograd.grad with create_graph),
    which DDP's reducer does not support; stylegan2-ada syncs its networks the same manual way."""
    if not dist_ctx.enabled:
        return
    for param in module.parameters():
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
            param.grad.div_(dist_ctx.world_size)


def reduce_for_logging(values: dict[str, torch.Tensor], dist_ctx: DistributedContext) -> dict[str, float]:
    """Scalars as floats, averaged over ranks (one all-reduce; a NaN on any rank shows on all)."""
    names = list(values)
    stacked = torch.stack([values[name].detach().float().reshape(()) for name in names])
    if dist_ctx.enabled:
        torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.SUM)
        stacked /= dist_ctx.world_size
    return dict(zip(names, stacked.tolist()))
