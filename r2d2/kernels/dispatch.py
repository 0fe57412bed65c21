"""Backend selection shared by every op.

Every op is called through one functional entry point with ``backend=``:
  eager     plain PyTorch reference (fp32 math); the spec, the test oracle, the CPU fallback
  triton    Triton kernels; on CPU tensors only under TRITON_INTERPRET=1 (how CI tests them)
  cuda      the CUDA kernels of the compiled extension r2d2._C (CUDA tensors)
  cpp       the C++ CPU kernels of r2d2._C (CPU tensors), where an op has one
  sdpa      torch.nn.functional.scaled_dot_product_attention (attention only)
  xformers  xformers.ops.memory_efficient_attention (attention only, when installed)
  auto      the best one that can run on the given device; it says once what it picked

``auto`` picks, unless an op overrides it: on CUDA tensors the CUDA extension when built, else
Triton, else eager; on CPU tensors the C++ kernels of r2d2._C when built, else eager (Triton on CPU
runs only under the interpreter, for tests). Each pick is logged once per (op, device type) at
INFO on the ``r2d2.kernels`` logger: the ``r2d2`` command shows it on stderr; a library user sees
it after configuring logging (``logging.basicConfig(level=logging.INFO)``).

An op whose ``OpSpec`` has a ``tuning`` (attention) instead measures its candidates per shape
class on the device types the tuning names: its functional form passes its arguments as
``resolve(..., call=...)`` and autotune.py picks (and logs each class's pick).

A requested backend that cannot run raises ``BackendUnavailable`` naming why.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields

import torch

from r2d2 import _ext
from r2d2.kernels import autotune
from r2d2.kernels.common import (  # BackendUnavailable, triton_interpret: re-exported
    BackendUnavailable,
    concrete_device,
    triton_importable,
    triton_interpret,
    xformers_importable,
)

log = logging.getLogger("r2d2.kernels")

BACKENDS = ("auto", "eager", "triton", "cuda", "cpp", "sdpa", "xformers")


@dataclass(frozen=True)
class OpSpec:
    name: str
    backends: tuple[str, ...]  # backends this op implements
    ext_op: str | None = None  # torch.ops.r2d2.<ext_op> for cuda/cpp
    auto_cuda: tuple[str, ...] = ("cuda", "triton", "eager")
    auto_cpu: tuple[str, ...] = ("cpp", "eager")
    # Measured auto (autotune.py) on the device types it names, instead of the orders above.
    tuning: autotune.Tuning | None = None


_REGISTRY: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    _REGISTRY[spec.name] = spec
    if spec.tuning is not None:
        autotune.register(spec.name, spec.tuning)
    return spec


def registered_ops() -> dict[str, OpSpec]:
    # Complete whenever this module can be imported: importing r2d2.kernels.dispatch runs
    # r2d2/kernels/__init__.py first, which imports (and so registers) every op package.
    return dict(_REGISTRY)


def why_unavailable(op: str, backend: str, device: torch.device | str) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    spec = _REGISTRY.get(op)
    if spec is None:
        return f"unknown op {op!r}; known: {sorted(_REGISTRY)}"
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {BACKENDS}"
    if backend not in spec.backends:
        return f"op {op!r} has no {backend!r} backend (it has {spec.backends})"
    if backend == "eager":
        return None
    if backend == "triton":
        if not triton_importable():
            return "backend='triton' needs the triton package (pip install triton)"
        if device.type == "cpu" and not triton_interpret():
            return (
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
                "is imported"
            )
        if device.type not in ("cpu", "cuda"):
            return f"backend='triton' does not run on {device.type} tensors"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend='cuda' needs CUDA tensors, got {device.type} tensors"
        if not _ext.available():
            return f"backend='cuda' needs the compiled extension: {_ext.why_missing()}"
        if not _ext.cuda_built():
            return "backend='cuda' needs the r2d2._C CUDA build; this install has CPU only"
        if spec.ext_op and not _ext.has_op(spec.ext_op):
            return f"r2d2._C has no op {spec.ext_op!r} (rebuild the extension)"
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"backend='cpp' runs on CPU tensors, got {device.type} tensors"
        if not _ext.available():
            return f"backend='cpp' needs the compiled extension: {_ext.why_missing()}"
        if spec.ext_op and not _ext.has_op(spec.ext_op):
            return f"r2d2._C has no op {spec.ext_op!r} (rebuild the extension)"
        return None
    if backend == "sdpa":
        return None
    if backend == "xformers":
        if not xformers_importable():
            return "backend='xformers' needs the xformers package, which is not installed"
        if device.type != "cuda":
            return "backend='xformers' needs CUDA tensors"
        return None
    return f"unhandled backend {backend!r}"


# (op, device type, pick) already logged: once each, not once per call (ops run every step).
_announced: set[tuple[str, str, str]] = set()


def _why(op: str) -> autotune.Why:
    return functools.partial(why_unavailable, op)


def _measured(spec: OpSpec, device: torch.device) -> bool:
    return spec.tuning is not None and device.type in spec.tuning.device_types


def auto_backend(op: str, device: torch.device | str) -> str:
    """The backend ``auto`` picks for ``op`` on ``device`` (without announcing it). For an op
    that measures on this device type it is the pick of the tuning's reference class (measured
    now if it has not been): calls pick per their own class."""
    device = torch.device(device)
    spec = _REGISTRY[op]
    if _measured(spec, device):
        key = spec.tuning.reference_key(concrete_device(device))
        pick = autotune.lookup(op, key) or autotune.measure(
            op, spec.backends, spec.tuning, key, None, _why(op)
        )
        if why_unavailable(op, pick, device) is None:
            return pick
    order = spec.auto_cuda if device.type == "cuda" else spec.auto_cpu
    for b in order:
        if b in spec.backends and why_unavailable(op, b, device) is None:
            return b
    return "eager"


def resolve(op: str, backend: str, device: torch.device | str, call: tuple | None = None) -> str:
    """Turn a requested backend into the one that will run, or raise BackendUnavailable.

    ``call``: the op's arguments, for an op whose ``auto`` measures per shape class (its
    ``Tuning.class_key`` files them under a class; autotune.py logs each class's pick)."""
    device = torch.device(device)
    if backend == "auto":
        spec = _REGISTRY[op]
        if call is not None and _measured(spec, device):
            key = spec.tuning.class_key(*call)
            if key is None:
                return "eager"  # nothing to compute, nothing to measure
            hit = autotune.lookup(op, key)
            if hit is not None:
                return hit
            return autotune.measure(op, spec.backends, spec.tuning, key, call, _why(op))
        pick = auto_backend(op, device)
        key = (op, device.type, pick)
        if key not in _announced:
            _announced.add(key)
            log.info("%s on %s tensors: backend=%r (auto)", op, device.type, pick)
        return pick
    reason = why_unavailable(op, backend, device)
    if reason is not None:
        raise BackendUnavailable(f"{op}: {reason}")
    return backend


@dataclass
class KernelConfig:
    """Which backend each op uses inside the model and losses (one of ``BACKENDS``)."""

    attention: str = "auto"
    """Self- and cross-attention in every encoder."""
    contrastive: str = "auto"
    """The GCPR all-gather contrastive loss."""
    distill_kl: str = "auto"
    """KL between teacher and student distributions (target-guided distillation)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v not in BACKENDS:
                raise ValueError(
                    f"kernels.{f.name}={v!r} is not a backend; expected one of {BACKENDS}"
                )


def describe(device: torch.device | str) -> dict[str, dict[str, str]]:
    """For each op: every backend with 'ok' or the reason it cannot run, plus the auto pick."""
    out: dict[str, dict[str, str]] = {}
    for name, spec in sorted(registered_ops().items()):
        row = {b: (why_unavailable(name, b, device) or "ok") for b in spec.backends}
        row["auto"] = auto_backend(name, device)
        out[name] = row
    return out


def state_dict() -> dict[str, list[dict]]:
    """The kernels' process state worth keeping across a resume: for each op that measures its
    ``auto`` picks, the picks made so far (JSON-able records, ``autotune.export``)."""
    return {
        name: autotune.export(name, spec.tuning)
        for name, spec in sorted(_REGISTRY.items())
        if spec.tuning is not None
    }


def load_state_dict(state: dict | list | None, device: torch.device | str | None = None) -> int:
    """Take a :func:`state_dict` of an earlier run of the same job. ``device``: take only the
    records of its device type, for it; None: every record whose device type this process has
    (CPU; CUDA when available, on the current device). A bare list is the attention picks of a
    checkpoint written before the state was keyed by op. Returns how many picks were taken."""
    if not state:
        return 0
    if isinstance(state, list):
        state = {"attention": state}
    taken = 0
    for op, records in state.items():
        spec = _REGISTRY.get(op)
        if spec is None or spec.tuning is None or not isinstance(records, list):
            continue
        if device is not None:
            devices = [concrete_device(device)]
        else:
            types = {r.get("device") for r in records if isinstance(r, dict)}
            devices = [
                concrete_device(t)
                for t in sorted(types & {"cpu", "cuda"})
                if t != "cuda" or torch.cuda.is_available()
            ]
        for dev in devices:
            taken += autotune.load(op, spec.backends, spec.tuning, records, dev, _why(op))
    return taken
