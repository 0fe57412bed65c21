"""How a plain model is spread over processes, in the torchtitan order: activation
checkpointing -> compile (per block, in the trainer) -> FSDP2 ``fully_shard`` or DDP; and back:
an unsharded copy of an FSDP2 model for export.

``init_distributed`` joins the torchrun process group when ``WORLD_SIZE > 1``.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing as apply_ac,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from r2d2.dist import dist_info, is_dist
from r2d2.engine.config import RunConfig
from r2d2.engine.errors import TrainingError


def init_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """Join the torchrun group when WORLD_SIZE > 1; returns (rank, world, device)."""
    want_cuda = cfg.train.device == "cuda" or (
        cfg.train.device == "auto" and torch.cuda.is_available()
    )
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and cfg.distributed.strategy != "none" and not is_dist():
        backend = cfg.distributed.backend
        if backend == "auto":
            backend = "nccl" if want_cuda else "gloo"
        if want_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s)
        )
    device = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    rank, world = dist_info()
    return rank, world, device


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block in backward; returns how many blocks were wrapped.
    A model offering ``set_activation_checkpointing(bool)`` does it itself."""
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(True)
        return -1
    blocks = [m for m in model.modules() if _is_block(m)]
    apply_ac(model, check_fn=_is_block)
    return len(blocks)


def _is_block(m: nn.Module) -> bool:
    name = type(m).__name__
    return name.endswith(("Block", "Layer")) and any(isinstance(c, nn.Linear) for c in m.modules())


def _outermost_blocks(module: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = []
    inner: set[int] = set()
    for m in module.modules():
        if id(m) in inner or not _is_block(m):
            continue
        found.append(m)
        inner.update(id(c) for c in m.modules())
    return found


def shard_fsdp(objective: nn.Module, device: torch.device) -> list[nn.Parameter]:
    """FSDP2: ``fully_shard`` each transformer block (student and teacher alike, so the EMA update
    sees matching shards), then the whole objective. fully_shard cannot shard 0-d parameters (the
    temperature): they stay replicated and are returned, for the trainer to average their
    gradients itself."""
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    scalars = [p for p in objective.parameters() if p.ndim == 0]
    for m in list(objective.modules()):
        if _is_block(m):
            fully_shard(m, mp_policy=mp)
    fully_shard(objective, mp_policy=mp, ignored_params=set(scalars) or None)
    return [p for p in scalars if p.requires_grad]


def plain_model(trainer):
    """The student model with ordinary (unsharded) parameters on every rank: FSDP2's sharded
    parameters are gathered into a fresh copy, built by the model's ``unsharded_twin(kernels)``
    (a new model of the same architecture and settings); otherwise the trained model itself."""
    if trainer.strategy != "fsdp":
        return trainer.model
    twin = getattr(trainer.model, "unsharded_twin", None)
    if not callable(twin):  # checked before training too (check_fsdp_export)
        raise TrainingError(
            f"distributed.strategy=fsdp: {type(trainer.model).__name__} cannot be exported "
            "unsharded (it has no unsharded_twin)"
        )
    sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    plain = twin(trainer.cfg.kernels)
    plain.load_state_dict({k: v.detach().cpu() for k, v in sd.items()})
    return plain.to(trainer.device)
