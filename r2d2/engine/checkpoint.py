"""Training checkpoints: everything needed to continue a run exactly, written atomically.

Layout under ``<out>/checkpoints/``::

    step_000100.pt     objective (student + teacher + heads), optimizer, scheduler, step,
                       data position, counters, every rank's RNG states, the resolved config
    latest             the file name of the newest complete checkpoint

A checkpoint is first written to ``<name>.tmp``, flushed to disk, then renamed; ``latest`` is
replaced the same way after it. A crash at any moment therefore leaves ``latest`` pointing at a
complete file; a write that fails (disk full) removes its ``.tmp`` at once and leaves ``latest``
as it was. Only rank 0 writes; every rank reads. With FSDP2 the sharded states are gathered
into full (unsharded, CPU) state dicts by ``torch.distributed.checkpoint.state_dict``, so a
checkpoint does not depend on the number of processes that wrote it.

Checkpoints are data, never code. They hold only tensors and plain containers (dicts, lists,
tuples, str, int, float, bool, None): the Python and numpy RNG states are stored as tensors and
ints, the config as a plain dict, data positions as ints. Every load goes through
``torch.load(..., weights_only=True)`` (:func:`safe_load`); a file that needs anything else to
load (a pickled class or function: a ``__reduce__`` payload, or the numpy RNG state of a
checkpoint written before this format) is refused with one line naming the type and the file,
and nothing in it runs. ``r2d2 convert checkpoint OLD NEW --trust-source`` re-saves such a file
in this format, for files the user trusts.

A checkpoint is written only when every floating-point tensor of the weights and the optimizer
state is finite (:class:`NonFiniteStateError` otherwise, nothing written), so a checkpoint on
disk is always one that was verified.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from r2d2.dist import dist_info, is_dist
from r2d2.engine.errors import RunError

LATEST = "latest"
_NAME = re.compile(r"^step_(\d+)\.pt$")
FORMAT = 2
"""``format`` key of a checkpoint: 2 = plain data (loads with ``weights_only=True``)."""


class CheckpointError(RuntimeError, RunError):
    """A checkpoint cannot be read, written or used; the message is one line naming the file
    (a failure at run time: exit status 1)."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs a pickled class or function to load: refused, nothing in it ran."""


class CorruptCheckpointError(CheckpointError):
    """The file is empty, truncated or not a checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's weights or optimizer state do not fit the model / optimizer of this run."""


class NonFiniteStateError(CheckpointError):
    """The weights or the optimizer state hold NaN/Inf: the checkpoint was not written."""


class CheckpointWriteError(CheckpointError):
    """Writing failed (disk full, permissions); the partial file is removed, ``latest`` kept."""


# ---------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """This process's RNG states as plain data (tensors and ints; see the module docstring)."""
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    st = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss,
        },
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    py, npst = st["python"], st["numpy"]
    if isinstance(py, dict):
        random.setstate(
            (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"])
        )
    else:  # the tuple of random.getstate() (a checkpoint re-saved from the old format keeps none)
        random.setstate(py)
    if isinstance(npst, dict):
        np.random.set_state(
            (
                npst["kind"],
                npst["key"].numpy().astype(np.uint32),
                npst["pos"],
                npst["has_gauss"],
                npst["cached_gaussian"],
            )
        )
    else:
        np.random.set_state(npst)
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------- plain data
_SCALARS = (str, int, float, bool, type(None))


def to_plain(obj, where: str = "checkpoint"):
    """``obj`` with numpy values turned into tensors / Python numbers and the old RNG-state tuples
    into :func:`rng_state`'s format; raises TypeError naming the first value that is neither a
    tensor, a plain container nor a scalar (such a value would need code to load)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            raise TypeError(
                f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not a plain tensor"
            )
        return obj.detach() if isinstance(obj, torch.nn.Parameter) else obj
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{where}: a numpy array of Python objects is not plain data")
        return torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
    if isinstance(obj, (torch.dtype, torch.device)):
        return obj  # allowed by weights_only
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{where}: key {k!r} ({type(k).__name__}) is not a str or int")
            out[k] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        # the old RNG states: random.getstate() / np.random.get_state() tuples
        if len(obj) == 5 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
            return {
                "kind": obj[0],
                "key": torch.from_numpy(obj[1].astype(np.int64)),
                "pos": int(obj[2]),
                "has_gauss": int(obj[3]),
                "cached_gaussian": float(obj[4]),
            }
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    raise TypeError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not plain data "
        "(checkpoints hold only tensors, dicts, lists, tuples, str, int, float, bool, None)"
    )


def _plain_rng(st: dict) -> dict:
    """An RNG-state dict (old or new format) in the new format."""
    st = dict(st)
    py = st.get("python")
    if isinstance(py, (tuple, list)) and len(py) == 3:
        st["python"] = {
            "version": int(py[0]),
            "state": torch.tensor(list(py[1]), dtype=torch.int64),
            "gauss_next": py[2],
        }
    return to_plain(st, "rng")


def _non_finite(*state_dicts) -> tuple[int, int, list[str]]:
    """(bad, total, first names) over the floating-point tensors of nested state dicts."""
    bad, total, names = 0, 0, []

    def walk(o, name):
        nonlocal bad, total
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() or o.is_complex():
                total += 1
                if not bool(torch.isfinite(o).all()):
                    bad += 1
                    if len(names) < 3:
                        names.append(name)
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{name}.{i}")

    for sd, prefix in state_dicts:
        walk(sd, prefix)
    return bad, total, names


# ---------------------------------------------------------------------------- reading
def _unsafe_message(path: str, name: str) -> str:
    old = name.startswith("numpy.")
    why = (
        "it was probably written before checkpoints became plain data (its numpy RNG state)"
        if old
        else "that is code, not data"
    )
    return (
        f"{path}: refused: loading it needs {name} ({why}); nothing in it was run. Checkpoints "
        f"hold only tensors and plain containers; if you trust the file's source, re-save it: "
        f"r2d2 convert checkpoint {path} NEW.pt --trust-source"
    )


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def safe_load(path: str):
    """``torch.load(path, weights_only=True)`` on the CPU; never unpickles code. Raises
    :class:`UnsafeCheckpointError` (the file needs a class or function: one line naming it and the
    file) or :class:`CorruptCheckpointError` (empty, truncated, not a torch file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise UnsafeCheckpointError(_unsafe_message(path, m.group(1))) from None
        raise CorruptCheckpointError(
            f"{path}: not a readable checkpoint ({_first_line(e)})"
        ) from None
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: no such file") from None
    except EOFError:
        raise CorruptCheckpointError(
            f"{path}: not a readable checkpoint (empty or truncated)"
        ) from None
    except Exception as e:  # noqa: BLE001 - zip/stream errors of a truncated file, garbage, permissions
        msg = _first_line(e)
        if "central directory" in msg or "PytorchStreamReader" in msg:
            msg = "truncated or corrupt: " + msg.split(". ")[0]
        raise CorruptCheckpointError(f"{path}: not a readable checkpoint ({msg})") from None


def read_checkpoint(path: str) -> dict:
    """A training checkpoint file, read safely and checked to be one (has ``objective``)."""
    ck = safe_load(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("objective"), dict):
        raise CorruptCheckpointError(
            f"{path}: not an r2d2 training checkpoint (no 'objective' state dict)"
        )
    return ck


def _step_of(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------- writing
def _disk_of(folder: str) -> str:
    """``mount point (device)`` of the file system holding ``folder``."""
    p = os.path.abspath(folder)
    while not os.path.ismount(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    dev = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1 and parts[1] == p:
                    dev = parts[0]
    except OSError:
        pass
    return f"{p} ({dev})" if dev else p


def _os_error_in(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # a partial file can be gigabytes on a full disk: remove it now, not at the next start
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, Exception):
            raise
        raise _write_error(e, path) from None


def _write_error(e: Exception, path: str) -> CheckpointWriteError:
    folder, name = os.path.dirname(path) or ".", os.path.basename(path)
    ose = _os_error_in(e)
    if ose is not None and ose.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f", {shutil.disk_usage(folder).free / 2**20:.0f} MiB free now"
        except OSError:
            free = ""
        what = "no space left on device" if ose.errno == errno.ENOSPC else "disk quota exceeded"
        return CheckpointWriteError(
            f"{what}: the disk {_disk_of(folder)} holding {folder} is full{free}; {name} was not "
            "written (its partial .tmp removed) and 'latest' still names the previous checkpoint"
        )
    why = f"[Errno {ose.errno}] {ose.strerror}" if ose is not None else _first_line(e)
    return CheckpointWriteError(
        f"{path} not written ({why}); its partial .tmp removed, 'latest' unchanged"
    )


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - every failure is re-raised as a CheckpointWriteError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise _write_error(e, path) from None


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


_ERRORS = {
    c.__name__: c
    for c in (
        CheckpointError,
        UnsafeCheckpointError,
        CorruptCheckpointError,
        CheckpointMismatchError,
        NonFiniteStateError,
        CheckpointWriteError,
    )
}


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

    def _load_model_and_optim(
        self, objective, optimizer, model_sd: dict, optim_sd: dict | None, path: str = "checkpoint"
    ) -> None:
        _check_fit(objective, model_sd, path)
        try:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

                opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
                set_state_dict(
                    objective,
                    optimizer,
                    model_state_dict=model_sd,
                    optim_state_dict=optim_sd or {},
                    options=opts,
                )
                return
            objective.load_state_dict(model_sd)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointMismatchError(
                f"{path}: the weights do not fit the model of the config ({_first_line(e)})"
            ) from None
        if optimizer is not None and optim_sd is not None:
            try:
                optimizer.load_state_dict(optim_sd)
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointMismatchError(
                    f"{path}: the optimizer state does not fit this run's optimizer ({_first_line(e)}); "
                    "resume with the config the run was started with (its config.yaml)"
                ) from None

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        objective,
        optimizer,
        scheduler,
        state: TrainState,
        extra: dict | None = None,
        rank_state: dict | None = None,
    ) -> str:
        """Write ``step_<step>.pt`` and point ``latest`` at it; returns the path (all ranks call).
        ``rank_state``: this rank's own part of the data position (gathered like the RNG states).
        Raises :class:`NonFiniteStateError` (NaN/Inf in the weights or optimizer state: nothing
        written) or :class:`CheckpointWriteError` (disk full...: the partial file removed,
        ``latest`` unchanged) on every rank."""
        model_sd, optim_sd = self._model_and_optim_states(objective, optimizer)
        ranks = _all_rank_states(rank_state)
        name = f"step_{state.step:06d}.pt"
        path = os.path.join(self.dir, name)
        err: CheckpointError | None = None
        if self.rank == 0:
            try:
                bad, total, names = _non_finite((model_sd, "objective"), (optim_sd, "optimizer"))
                if bad:
                    raise NonFiniteStateError(
                        f"step {state.step}: {bad} of {total} tensors of the weights / optimizer state "
                        f"hold NaN or Inf (first: {', '.join(names)}); checkpoint {name} not written"
                    )
                try:
                    ck = to_plain(
                        {
                            "format": FORMAT,
                            "objective": model_sd,
                            "optimizer": optim_sd,
                            "scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "state": vars(state).copy(),
                            "rng": [_plain_rng(r["rng"]) for r in ranks],
                            "rank_data": [r["data"] for r in ranks],
                            "extra": extra or {},
                        }
                    )
                except TypeError as e:  # a programming error: never write what could not be loaded
                    raise CheckpointError(f"{name} not written: {e}") from None
                _atomic_save(ck, path)
                _atomic_write_text(os.path.join(self.dir, LATEST), name + "\n")
                self._prune(name)
            except CheckpointError as e:
                err = e
        if is_dist():  # every rank learns rank 0's outcome (and waits for the write, as a barrier)
            box = [None if err is None else (type(err).__name__, str(err))]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and err is None:
                err = _ERRORS.get(box[0][0], CheckpointError)(box[0][1])
        if err is not None:
            raise err
        return path

    def _prune(self, newest: str) -> None:
        steps = sorted(f for f in os.listdir(self.dir) if _NAME.match(f))
        for f in steps[: -self.keep]:
            if f != newest:
                os.remove(os.path.join(self.dir, f))

    def latest(self) -> str | None:
        """Path of the newest complete checkpoint, or None."""
        ptr = os.path.join(self.dir, LATEST)
        if not os.path.isfile(ptr):
            return None
        with open(ptr) as f:
            name = f.read().strip()
        if not _NAME.match(name):
            raise CorruptCheckpointError(
                f"{ptr} holds {name[:80]!r}, not a checkpoint name (step_NNNNNN.pt)"
            )
        path = os.path.join(self.dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{ptr} points at {name}, which does not exist")
        return path

    def candidates(self) -> tuple[list[str], list[str]]:
        """(checkpoint paths to try on resume, newest first; notes on what ``latest`` said): the
        file ``latest`` names, then the older step files beside it. When ``latest`` names no
        file, every step file, newest first."""
        notes: list[str] = []
        files = (
            sorted(((_step_of(f), f) for f in os.listdir(self.dir) if _NAME.match(f)), reverse=True)
            if os.path.isdir(self.dir)
            else []
        )
        try:
            named = self.latest()
        except (FileNotFoundError, CorruptCheckpointError) as e:
            notes.append(f"{e}; trying the other checkpoints")
            named = None
        if named is None:
            return [os.path.join(self.dir, f) for _, f in files], notes
        top = _step_of(os.path.basename(named))
        return [named] + [os.path.join(self.dir, f) for s, f in files if s < top], notes

    def load_newest(
        self, objective, optimizer=None, scheduler=None, restore_rng: bool = True
    ) -> tuple[str, TrainState, dict, list[str]]:
        """Resume from the newest checkpoint that loads: ``(path, TrainState, extra, notes)``, the
        notes saying which files were skipped and why. A file that is empty, truncated or refused
        (needs code to load) is skipped; weights that do not fit the model stop at once (an older
        file of the same run would not fit either). None loads: one-line :class:`CheckpointError`."""
        paths, notes = self.candidates()
        reasons = list(notes)
        for p in paths:
            try:
                ck = read_checkpoint(p)
            except (CorruptCheckpointError, UnsafeCheckpointError) as e:
                notes.append(f"skipped {os.path.basename(p)}: {e}")
                reasons.append(str(e))
                continue
            state, extra = self._restore(p, ck, objective, optimizer, scheduler, restore_rng)
            return p, state, extra, notes
        if not paths and not notes:
            raise CheckpointError(f"no checkpoint in {self.dir}")
        what = "; ".join(reasons) if reasons else f"no checkpoint file in {self.dir}"
        if paths:
            what = f"none of the {len(paths)} checkpoint(s) in {self.dir} loads: {what}"
        raise CheckpointError(what)

    def load(
        self, path: str, objective, optimizer=None, scheduler=None, restore_rng: bool = True
    ) -> tuple[TrainState, dict]:
        """Restore everything from ``path``; returns (TrainState, extra). RNG states are those of
        this rank when the world size is unchanged (otherwise rank 0's, with a warning); with
        ``restore_rng=False`` they are returned as ``extra["rng_state"]`` for the caller to set
        right before it draws (so nothing in between can consume them). ``extra["rank_data"]``
        is every rank's saved data position (a list in rank order). The file is read with
        ``weights_only=True`` (:func:`safe_load`)."""
        return self._restore(
            path, read_checkpoint(path), objective, optimizer, scheduler, restore_rng
        )

    def _restore(self, path, ck, objective, optimizer, scheduler, restore_rng):
        for k in ("state", "rng"):
            if k not in ck:
                raise CorruptCheckpointError(
                    f"{path}: not a training checkpoint to resume (no {k!r}); "
                    "use it with train.init_from"
                )
        self._load_model_and_optim(objective, optimizer, ck["objective"], ck.get("optimizer"), path)
        if scheduler is not None and ck.get("scheduler") is not None:
            scheduler.load_state_dict(ck["scheduler"])
        rank, world = dist_info()
        rngs = ck["rng"]
        if len(rngs) != world:
            import warnings

            warnings.warn(
                f"checkpoint was written by {len(rngs)} processes, resuming with {world}: "
                "RNG states cannot be matched per rank, the run continues but not bitwise",
                stacklevel=1,
            )
        mine = rngs[rank if len(rngs) == world else 0]
        extra = dict(ck.get("extra", {}))
        extra["rank_data"] = ck.get("rank_data", [{} for _ in rngs])
        if restore_rng:
            set_rng_state(mine)
        else:
            extra["rng_state"] = mine
        return TrainState(**ck["state"]), extra


def _check_fit(objective, sd: dict, path: str) -> None:
    """One-line :class:`CheckpointMismatchError` when ``sd`` is not the objective's (another preset
    or model override): shape mismatches, unexpected and missing keys, as ``train.init_from`` says."""
    own = objective.state_dict()
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    if shapes or unexpected or missing:
        raise CheckpointMismatchError(
            f"{path}: the weights do not fit the model of the config (model.preset and overrides): "
            f"shape mismatches {shapes[:3]}, unexpected {unexpected[:3]}, missing {len(missing)} of "
            f"{len(own)} {missing[:3]}; resume with the config the run was started with (its config.yaml)"
        )


def load_weights(path: str) -> dict:
    """The objective's state dict from a checkpoint file or a checkpoint directory (its ``latest``),
    read with ``weights_only=True``."""
    if os.path.isdir(path):
        inner = (
            os.path.join(path, "checkpoints")
            if os.path.isdir(os.path.join(path, "checkpoints"))
            else path
        )
        p = Checkpointer.__new__(Checkpointer)
        p.dir = inner
        found = p.latest()
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint ('latest' pointer) found")
        path = found
    return read_checkpoint(path)["objective"]


def resave_trusted(src: str, dst: str) -> dict:
    """``r2d2 convert checkpoint --trust-source``: load ``src`` with full unpickling (runs whatever
    code it carries: only for files the user trusts), turn it into plain data (the old RNG-state
    tuples, numpy values) and write ``dst`` atomically; the result is read back with
    ``weights_only=True`` before this returns. TypeError names a value that cannot be plain data."""
    try:
        ck = safe_load(src)
    except UnsafeCheckpointError:
        ck = torch.load(src, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or not isinstance(ck.get("objective"), dict):
        raise CorruptCheckpointError(
            f"{src}: not an r2d2 training checkpoint (no 'objective' state dict)"
        )
    ck = dict(ck)
    if isinstance(ck.get("rng"), list):
        ck["rng"] = [_plain_rng(r) if isinstance(r, dict) else r for r in ck["rng"]]
    ck["format"] = FORMAT
    ck = to_plain(ck, os.path.basename(src))
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    _atomic_save(ck, dst)
    return read_checkpoint(dst)
