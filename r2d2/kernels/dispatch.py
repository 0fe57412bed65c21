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

A requested backend that cannot run raises ``BackendUnavailable`` naming why.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from r2d2 import _ext

log = logging.getLogger("r2d2.kernels")

BACKENDS = ("auto", "eager", "triton", "cuda", "cpp", "sdpa", "xformers")


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


@dataclass(frozen=True)
class OpSpec:
    name: str
    backends: tuple[str, ...]          # backends this op implements
    ext_op: str | None = None          # torch.ops.r2d2.<ext_op> for cuda/cpp
    auto_cuda: tuple[str, ...] = ("cuda", "triton", "eager")
    auto_cpu: tuple[str, ...] = ("cpp", "eager")
    # Optional override for auto on a device (attention: the pick of its reference class;
    # attention() itself picks per shape class, see attention.py).
    auto_fn: Callable[[torch.device], str | None] | None = None


_REGISTRY: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    _REGISTRY[spec.name] = spec
    return spec


def registered_ops() -> dict[str, OpSpec]:
    # Importing the op modules registers them.
    import r2d2.kernels  # noqa: F401

    return dict(_REGISTRY)


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def xformers_importable() -> bool:
    return importlib.util.find_spec("xformers") is not None


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
            return ("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
                    "is imported")
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


def auto_backend(op: str, device: torch.device | str) -> str:
    """The backend ``auto`` picks for ``op`` on ``device`` (without announcing it)."""
    device = torch.device(device)
    spec = _REGISTRY[op]
    if spec.auto_fn is not None:
        pick = spec.auto_fn(device)
        if pick is not None and why_unavailable(op, pick, device) is None:
            return pick
    order = spec.auto_cuda if device.type == "cuda" else spec.auto_cpu
    for b in order:
        if b in spec.backends and why_unavailable(op, b, device) is None:
            return b
    return "eager"


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """Turn a requested backend into the one that will run, or raise BackendUnavailable."""
    device = torch.device(device)
    if backend == "auto":
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
                raise ValueError(f"kernels.{f.name}={v!r} is not a backend; expected one of {BACKENDS}")


def describe(device: torch.device | str) -> dict[str, dict[str, str]]:
    """For each op: every backend with 'ok' or the reason it cannot run, plus the auto pick."""
    out: dict[str, dict[str, str]] = {}
    for name, spec in sorted(registered_ops().items()):
        row = {b: (why_unavailable(name, b, device) or "ok") for b in spec.backends}
        row["auto"] = auto_backend(name, device)
        out[name] = row
    return out
