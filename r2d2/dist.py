"""Small torch.distributed helpers shared by the kernels, the objectives and the engine."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def dist_info(group=None) -> tuple[int, int]:
    """(rank, world) within ``group``; (0, 1) when not distributed."""
    if not is_dist():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def reduce_scatter(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``x`` (``[world * n, ...]``, same shape on every rank) over the ranks and return this
    rank's ``[n, ...]`` slice. NCCL (and any backend but gloo) reduce-scatters; gloo has no
    reduce-scatter in most torch releases, so it all-reduces a copy and slices it (same result,
    world times the traffic: gloo runs on CPU test rigs, not at scale)."""
    rank, world = dist_info(group)
    if world == 1:
        return x
    x = x.contiguous()
    if dist.get_backend(group) == "gloo":
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x.chunk(world, 0)[rank]
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    rs(out, x, op=dist.ReduceOp.SUM, group=group)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient for the full tensor and returns the
    local slice, so the cross-rank gradient terms are not lost."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.group), None


def gather(x: torch.Tensor, group=None, *, with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from every rank along dim 0.

    With ``with_grad`` and a tensor that requires grad, backward returns to each rank the sum over
    ranks of the gradient of its slice. Identity when not distributed."""
    _, world = dist_info(group)
    if world == 1:
        return x
    if with_grad and x.requires_grad:
        return _GatherWithGrad.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts, 0)


def all_equal_rows(n: int, device, group=None, what: str = "tensors") -> None:
    """Raise the same ValueError on every rank unless every rank of ``group`` passes the same
    ``n`` (the row count of a tensor about to be all-gathered: gloo aborts the process and NCCL
    hangs on unequal sizes). One small all_gather; a no-op when not distributed."""
    _, world = dist_info(group)
    if world == 1:
        return
    dev = torch.device(device) if "nccl" in str(dist.get_backend(group)) else torch.device("cpu")
    mine = torch.tensor([n], dtype=torch.long, device=dev)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    sizes = [int(p) for p in parts]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"{what}: every rank must bring the same number of rows; per rank: {sizes}"
        )
