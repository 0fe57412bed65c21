"""Training checkpoints: everything needed to continue a run exactly, written atomically.

Layout under ``<out>/checkpoints/``::

    step_000100.pt     objective (student + teacher + heads), optimizer, scheduler, step,
                       data position, counters, every rank's RNG states, the resolved config
    latest             the file name of the newest complete checkpoint

A checkpoint is first written to ``<name>.tmp``, flushed to disk, then renamed; ``latest`` is
replaced the same way after it. A crash at any moment therefore leaves ``latest`` pointing at a
complete file. Only rank 0 writes; every rank reads. With FSDP2 the sharded states are gathered
into full (unsharded, CPU) state dicts by ``torch.distributed.checkpoint.state_dict``, so a
checkpoint does not depend on the number of processes that wrote it.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from r2d2.dist import dist_info, is_dist

LATEST = "latest"
_NAME = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _all_rank_states(rank_state: dict | None) -> list:
    """Every rank's ``{"rng": RNG states, "data": its own data position}``, in rank order."""
    mine = {"rng": rng_state(), "data": rank_state or {}}
    if not is_dist():
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


@dataclass
class TrainState:
    """The loop's own counters (saved and restored with the checkpoint)."""

    step: int = 0
    samples: int = 0
    skipped: int = 0
    """samples skipped while loading (decode time, all ranks); read-time skips are the reader's"""
    bad_steps: int = 0
    skip_reasons: dict = field(default_factory=dict)
    """decode-time skips by reason (all ranks)"""


class Checkpointer:
    """Saves and restores (objective, optimizer, scheduler, TrainState, RNG) under ``<out>/checkpoints``."""

    def __init__(self, out: str, keep: int = 2, fsdp: bool = False) -> None:
        self.dir = os.path.join(out, "checkpoints")
        self.keep, self.fsdp = keep, fsdp
        self.rank, _ = dist_info()
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            # A writer killed mid-save leaves its temporary file; only rank 0 writes, and it is
            # not writing now, so any .tmp here is such a leftover (possibly gigabytes).
            for f in os.listdir(self.dir):
                if f.endswith(".tmp"):
                    os.remove(os.path.join(self.dir, f))

    # ------------------------------------------------------------------ states
    def _model_and_optim_states(self, objective, optimizer) -> tuple[dict, dict]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(objective, optimizer, options=opts)
        return objective.state_dict(), optimizer.state_dict()

    def _load_model_and_optim(self, objective, optimizer, model_sd: dict, optim_sd: dict | None) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            set_state_dict(objective, optimizer, model_state_dict=model_sd,
                           optim_state_dict=optim_sd or {}, options=opts)
            return
        objective.load_state_dict(model_sd)
        if optimizer is not None and optim_sd is not None:
            optimizer.load_state_dict(optim_sd)

    # ------------------------------------------------------------------ save / load
    def save(self, objective, optimizer, scheduler, state: TrainState, extra: dict | None = None,
             rank_state: dict | None = None) -> str:
        """Write ``step_<step>.pt`` and point ``latest`` at it; returns the path (all ranks call).
        ``rank_state``: this rank's own part of the data position (gathered like the RNG states)."""
        model_sd, optim_sd = self._model_and_optim_states(objective, optimizer)
        ranks = _all_rank_states(rank_state)
        name = f"step_{state.step:06d}.pt"
        path = os.path.join(self.dir, name)
        if self.rank == 0:
            _atomic_save({"objective": model_sd, "optimizer": optim_sd,
                          "scheduler": scheduler.state_dict() if scheduler is not None else None,
                          "state": vars(state).copy(), "rng": [r["rng"] for r in ranks],
                          "rank_data": [r["data"] for r in ranks], "extra": extra or {}}, path)
            _atomic_write_text(os.path.join(self.dir, LATEST), name + "\n")
            self._prune(name)
        if is_dist():
            dist.barrier()
        return path

    def _prune(self, newest: str) -> None:
        steps = sorted(f for f in os.listdir(self.dir) if _NAME.match(f))
        for f in steps[:-self.keep]:
            if f != newest:
                os.remove(os.path.join(self.dir, f))

    def latest(self) -> str | None:
        """Path of the newest complete checkpoint, or None."""
        ptr = os.path.join(self.dir, LATEST)
        if not os.path.isfile(ptr):
            return None
        with open(ptr) as f:
            name = f.read().strip()
        path = os.path.join(self.dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{ptr} points at {name}, which does not exist")
        return path

    def load(self, path: str, objective, optimizer=None, scheduler=None,
             restore_rng: bool = True) -> tuple[TrainState, dict]:
        """Restore everything from ``path``; returns (TrainState, extra). RNG states are those of
        this rank when the world size is unchanged (otherwise rank 0's, with a warning); with
        ``restore_rng=False`` they are returned as ``extra["rng_state"]`` for the caller to set
        right before it draws (so nothing in between can consume them). ``extra["rank_data"]``
        is every rank's saved data position (a list in rank order)."""
        ck = torch.load(path, map_location="cpu", weights_only=False)
        self._load_model_and_optim(objective, optimizer, ck["objective"], ck["optimizer"])
        if scheduler is not None and ck.get("scheduler") is not None:
            scheduler.load_state_dict(ck["scheduler"])
        rank, world = dist_info()
        rngs = ck["rng"]
        if len(rngs) != world:
            import warnings

            warnings.warn(f"checkpoint was written by {len(rngs)} processes, resuming with {world}: "
                          "RNG states cannot be matched per rank, the run continues but not bitwise")
        mine = rngs[rank if len(rngs) == world else 0]
        extra = dict(ck.get("extra", {}))
        extra["rank_data"] = ck.get("rank_data", [{} for _ in rngs])
        if restore_rng:
            set_rng_state(mine)
        else:
            extra["rng_state"] = mine
        return TrainState(**ck["state"]), extra


def load_weights(path: str) -> dict:
    """The objective's state dict from a checkpoint file or a checkpoint directory (its ``latest``)."""
    if os.path.isdir(path):
        inner = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        p = Checkpointer.__new__(Checkpointer)
        p.dir = inner
        found = p.latest()
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint ('latest' pointer) found")
        path = found
    return torch.load(path, map_location="cpu", weights_only=False)["objective"]
