"""Measured ``auto``: pick an op's backend per shape class by timing the candidates.

For some ops the fastest backend depends on the shape, not only on the device (attention: 64-token
padded text, 197/257-token images and 64 x 257 cross-attention differ, and training wants the
fastest fwd+bwd where an eval loop wants the fastest forward). Such an op gives its ``OpSpec`` a
:class:`Tuning`; ``dispatch.resolve(op, "auto", device, call=...)`` on a device type the tuning
names then files the call under a class (``Tuning.class_key``) and returns the class's pick,
measuring it on the first call of the class:

  * every candidate that can run here is timed on fresh inputs shaped like that call
    (``Tuning.probe``, ``Tuning.time``): ``WARMUP`` untimed calls (Triton compiles and autotunes
    in these), then ``REPS[0]`` to ``REPS[1]`` timed calls until ``BUDGET_MS`` is measured; the
    median is kept and the fastest candidate wins;
  * it runs on a fresh thread, so grad mode, inference mode, saved-tensor hooks and activation
    checkpointing's recomputation frames of the caller (all thread-local) do not leak into it;
    the op's ``time`` runs under ``enable_grad`` on new leaves and restores the RNG state;
  * a candidate that raises is logged at WARNING and never picked; if none runs the call raises
    and nothing is remembered (the next call of the class measures again);
  * the result is logged once per class at INFO on the ``r2d2.kernels`` logger:
    ``<op> auto: <class> -> <backend> (<timings>; at <shape>)``;
  * ``R2D2_<OP>_AUTO=<backend>`` (e.g. ``R2D2_ATTENTION_AUTO``) replaces the measurement for
    every class of that op; such picks are not saved (the environment decides them each run);
  * inside CUDA graph capture nothing is measured (timing syncs): ``Tuning.capture_fallback`` runs
    for that call and the class is measured later;
  * under torch.compile the first call of a class is a graph break (the measurement runs
    eagerly); later calls are a dict lookup on a plain tuple, which traces.

Each process measures for itself: under DDP two ranks may pick different backends for a class
(their results agree to rounding). A training checkpoint carries the picks
(``r2d2.kernels.state_dict()`` / ``load_state_dict()``) so that a resumed run, on every rank, keeps
each class on the backend it trained with instead of re-timing, which can pick another on a noisy
measurement.

A class key is a plain tuple whose first two items are the device type and index.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from r2d2.kernels.common import BackendUnavailable

log = logging.getLogger("r2d2.kernels")

WARMUP = 2  # untimed calls per candidate (Triton compiles and autotunes in these)
REPS = (3, 10)  # timed calls per candidate: at least, at most ...
BUDGET_MS = 2.0  # ... stopping once this much has been timed

# (backend, device) -> None if the backend can run the op there, else why not.
Why = Callable[[str, torch.device], "str | None"]


@dataclass(frozen=True)
class AutoPick:
    """What ``auto`` chose for one shape class, and why."""

    backend: str
    timings_ms: dict[str, float]  # median ms per candidate that ran
    failed: dict[str, str]  # candidate -> the error it raised (never picked)
    unavailable: dict[str, str]  # candidate -> why it cannot run here
    measured_at: str  # the shape timed, e.g. "B=21 H=12 Lq=257 Lk=257 D=64"
    source: str  # "measured", "checkpoint" (load) or the environment variable's name


class Tuning:
    """How ``auto`` measures one op: subclass it in the op's package and pass an instance as
    ``OpSpec(tuning=...)``. Attributes may be replaced on the instance (tests do)."""

    candidates: tuple[str, ...] = ()
    """Backends timed, in this order (the ones that cannot run here are skipped)."""
    device_types: tuple[str, ...] = ("cuda",)
    """Device types where ``auto`` measures; elsewhere it takes the OpSpec's fixed order."""
    capture_fallback: str = "eager"
    """Backend for a first call of a class made inside CUDA graph capture (nothing measured)."""

    def class_key(self, *call) -> tuple | None:
        """The class of a call (the op's arguments, as ``resolve(call=...)`` got them): a tuple
        starting with the device type and index. None: nothing to compute, eager runs."""
        raise NotImplementedError

    def class_str(self, key: tuple) -> str:
        """A class as text: log lines and the keys of :func:`picks`."""
        raise NotImplementedError

    def reference_key(self, device: torch.device) -> tuple:
        """The class ``auto_backend(op, device)`` reports (it knows no shape)."""
        raise NotImplementedError

    def probe(self, key: tuple, call: tuple | None) -> Any:
        """The inputs a measurement of ``key`` times, shaped like ``call`` (None: the reference
        class)."""
        raise NotImplementedError

    def probe_str(self, probe: Any) -> str:
        """The shape timed, for the log line and ``AutoPick.measured_at``."""
        raise NotImplementedError

    def time(self, backend: str, probe: Any) -> float:
        """Median ms of ``backend`` on ``probe`` (use :func:`median_ms`)."""
        raise NotImplementedError

    def to_record(self, key: tuple) -> dict:
        """A class as a JSON-able dict, without the device index (a checkpoint's record)."""
        raise NotImplementedError

    def from_record(self, record: dict, device: torch.device) -> tuple:
        """The class of ``record`` on ``device``; KeyError, TypeError or ValueError for a record
        this version does not read."""
        raise NotImplementedError


# op -> class key -> pick. Read without the lock on the hot path (a dict lookup); written under it.
_PICKS: dict[str, dict[tuple, AutoPick]] = {}
_LOCK = threading.RLock()


def env_name(op: str) -> str:
    """The environment variable that pins ``op``'s auto pick: ``R2D2_<OP>_AUTO``."""
    return f"R2D2_{op.upper()}_AUTO"


def lookup(op: str, key: tuple) -> str | None:
    """The backend picked for class ``key`` of ``op``, or None if it has not been picked."""
    hit = _PICKS.get(op, {}).get(key)
    return None if hit is None else hit.backend


def picks(op: str) -> dict[str, AutoPick]:
    """Every class ``auto`` has picked for so far (class description -> AutoPick)."""
    with _LOCK:
        return {_TUNINGS[op].class_str(k): p for k, p in _PICKS.get(op, {}).items()}


def clear(op: str | None = None) -> None:
    """Forget every pick of ``op`` (every op: None), e.g. after changing ``R2D2_<OP>_AUTO``."""
    with _LOCK:
        for name in [op] if op is not None else list(_PICKS):
            _PICKS.get(name, {}).clear()


def remember(op: str, key: tuple, pick: AutoPick) -> None:
    """Set the pick of a class (what a measurement or a checkpoint does; tests inject picks)."""
    with _LOCK:
        _PICKS.setdefault(op, {})[key] = pick


# The Tuning of each op that measures (dispatch.register_op registers it).
_TUNINGS: dict[str, Tuning] = {}


def register(op: str, tuning: Tuning) -> None:
    with _LOCK:
        _TUNINGS[op] = tuning
        _PICKS.setdefault(op, {})


def median_ms(call: Callable[[], Any], device: torch.device) -> float:
    """Median wall time of ``call()`` in ms: ``WARMUP`` untimed calls, then ``REPS[0]`` to
    ``REPS[1]`` timed ones until ``BUDGET_MS`` is measured (CUDA events on a GPU)."""
    for _ in range(WARMUP):
        call()
    times: list[float] = []
    while len(times) < REPS[1] and (len(times) < REPS[0] or sum(times) < BUDGET_MS):
        if device.type == "cuda":
            with torch.cuda.device(device):
                start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                call()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_candidates(op: str, tuning: Tuning, probe, device: torch.device, name: str, why: Why):
    timings, failed, unavailable = {}, {}, {}
    for b in tuning.candidates:
        reason = why(b, device)
        if reason is not None:
            unavailable[b] = reason
            continue
        try:
            timings[b] = float(tuning.time(b, probe))
        except Exception as e:  # noqa: BLE001 - any failure disqualifies the candidate
            first = (str(e).strip().splitlines() or [""])[0][:200]
            failed[b] = f"{type(e).__name__}: {first}"
            log.warning(
                "%s auto: %s: candidate %r failed and is not picked: %s", op, name, b, failed[b]
            )
    return timings, failed, unavailable


def _isolated(fn: Callable[[], Any], device: torch.device):
    """Run ``fn()`` on a fresh thread and return its result (or raise its exception).

    Autograd's per-call context is thread-local: grad mode, inference mode, saved-tensor hooks
    and activation checkpointing's recomputation frames. The first call of a class often comes
    from inside a checkpointed block's forward, where the probe's own backward would be taken for
    the checkpoint's recomputation (every candidate then fails); a fresh thread times the
    candidates in a clean context whatever the caller is doing."""
    out: dict = {}

    def run():
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is per thread too
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name="r2d2-kernels-auto", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@torch.compiler.disable  # under torch.compile: one graph break, the first time a class is seen
def measure(
    op: str, backends: tuple[str, ...], tuning: Tuning, key: tuple, call: tuple | None, why: Why
) -> str:
    """Pick (and remember) the backend of class ``key`` of ``op``; ``call`` is the first call's
    arguments (None: the reference class). ``backends`` are the op's, ``why`` says why one cannot
    run (both from its OpSpec; dispatch passes them)."""
    with _LOCK:
        table = _PICKS.setdefault(op, {})
        hit = table.get(key)
        if hit is not None:
            return hit.backend
        name = tuning.class_str(key)
        device = torch.device(key[0], key[1])
        var = env_name(op)
        env = os.environ.get(var)
        if env:
            if env not in backends:
                raise ValueError(
                    f"{var}={env!r} is not an {op} backend; expected one of {backends}"
                )
            reason = why(env, device)
            if reason is not None:
                raise BackendUnavailable(f"{op}: {var}={env!r}: {reason}")
            table[key] = AutoPick(env, {}, {}, {}, "", var)
            log.info("%s auto: %s -> %s (%s)", op, name, env, var)
            return env
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Timing would sync inside the capture; use the fallback now, remember nothing.
            log.warning(
                "%s auto: %s first seen inside CUDA graph capture: not measured, %s used "
                "for this call (warm up outside the capture or pass backend=)",
                op,
                name,
                tuning.capture_fallback,
            )
            return tuning.capture_fallback
        probe = tuning.probe(key, call)
        timings, failed, unavailable = _isolated(
            lambda: _time_candidates(op, tuning, probe, device, name, why), device
        )
        at = tuning.probe_str(probe)
        if not timings:
            raise RuntimeError(
                f"{op} auto: no candidate ran for {name} (at {at}): "
                + "; ".join(f"{b}: {e}" for b, e in {**failed, **unavailable}.items())
                + f". Pass backend= explicitly or set {var}."
            )
        pick = min(timings, key=timings.get)
        table[key] = AutoPick(pick, timings, failed, unavailable, at, "measured")
        parts = [f"{b} {t:.3f} ms" for b, t in sorted(timings.items(), key=lambda x: x[1])]
        parts += [f"{b} failed" for b in failed]
        log.info("%s auto: %s -> %s (%s; at %s)", op, name, pick, ", ".join(parts), at)
        return pick


def export(op: str, tuning: Tuning) -> list[dict]:
    """The picks of ``op`` measured (or restored) so far as JSON-able records (the class's
    ``to_record`` plus ``backend``), without those the environment forced."""
    var = env_name(op)
    with _LOCK:
        return [
            dict(tuning.to_record(k), backend=p.backend)
            for k, p in _PICKS.get(op, {}).items()
            if p.source != var
        ]


def load(
    op: str,
    backends: tuple[str, ...],
    tuning: Tuning,
    records: list,
    device: torch.device,
    why: Why,
) -> int:
    """Take the records of :func:`export` (an earlier run of the same job) for ``device``. A
    class already picked here, a record for another device type or one this version does not
    read, and a backend that cannot run here are left alone (that class is measured as usual).
    With ``R2D2_<OP>_AUTO`` set nothing is taken. Returns how many picks were taken."""
    if os.environ.get(env_name(op)):
        return 0
    taken = 0
    with _LOCK:
        table = _PICKS.setdefault(op, {})
        for rec in records:
            try:
                backend = rec["backend"]
                key = tuning.from_record(rec, device)
            except (KeyError, TypeError, ValueError):
                continue  # a record this version does not read: measure that class instead
            if (
                rec.get("device") != device.type
                or key in table
                or backend not in backends
                or why(backend, device) is not None
            ):
                continue
            table[key] = AutoPick(backend, {}, {}, {}, "", "checkpoint")
            log.info("%s auto: %s -> %s (from the checkpoint)", op, tuning.class_str(key), backend)
            taken += 1
    return taken
