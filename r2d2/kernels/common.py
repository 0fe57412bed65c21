"""Helpers shared by every op package: what is installed, the interpreter switch, dtype names,
device normalisation, the error a backend that cannot run raises.

Nothing here imports another module of ``r2d2.kernels``: ``dispatch``, ``autotune`` and the op
packages all sit above it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton runs its interpreter (``TRITON_INTERPRET=1``): the only way Triton runs
    on CPU tensors, and how CI tests the kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def xformers_importable() -> bool:
    return importlib.util.find_spec("xformers") is not None


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
"""Short dtype names, as log lines and saved autotune picks write them."""


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name` for the names of ``DTYPE_NAMES`` (KeyError otherwise)."""
    return {v: k for k, v in DTYPE_NAMES.items()}[name]


def concrete_device(device: torch.device | str) -> torch.device:
    """``device`` with the current CUDA device filled in for a bare ``cuda``, so that two spellings
    of one GPU compare equal (``cuda`` and ``cuda:0`` on a one-GPU process)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
