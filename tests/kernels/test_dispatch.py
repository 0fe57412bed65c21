"""Backend dispatch: the auto pick order (capabilities faked), what an unavailable backend says,
and that auto's pick is logged once per (op, device)."""

import logging

import pytest
import torch

from r2d2 import _ext
from r2d2.kernels import (
    BackendUnavailable,
    KernelConfig,
    attention,
    contrastive_loss,
    dispatch,
    distill_kl,
)


def test_auto_on_cpu_is_runnable():
    for op, row in dispatch.describe("cpu").items():
        assert row[row["auto"]] == "ok", (op, row)


def _fake(monkeypatch, *, ext: bool, cuda_ext: bool, triton: bool, interpret: bool = False):
    """Pretend this install has (or lacks) the extension, its CUDA part and triton."""
    monkeypatch.setattr(_ext, "available", lambda: ext)
    monkeypatch.setattr(_ext, "cuda_built", lambda: ext and cuda_ext)
    monkeypatch.setattr(_ext, "has_op", lambda name: ext)
    monkeypatch.setattr(_ext, "why_missing", lambda: None if ext else "r2d2._C is not built (x)")
    monkeypatch.setattr(dispatch, "triton_importable", lambda: triton)
    monkeypatch.setattr(dispatch, "triton_interpret", lambda: interpret)


@pytest.mark.parametrize(
    "ext, cuda_ext, triton, want",
    [
        (True, True, True, "cuda"),  # the CUDA extension first, when it is built
        (True, True, False, "cuda"),
        (True, False, True, "triton"),  # a CPU-only extension: Triton next
        (False, False, True, "triton"),
        (True, False, False, "eager"),  # neither: eager
        (False, False, False, "eager"),
    ],
)
def test_auto_order_on_cuda_tensors(monkeypatch, ext, cuda_ext, triton, want):
    _fake(monkeypatch, ext=ext, cuda_ext=cuda_ext, triton=triton)
    assert dispatch.auto_backend("distill_kl", "cuda") == want
    assert dispatch.auto_backend("distill_kl", torch.device("cuda", 1)) == want


@pytest.mark.parametrize(
    "ext, triton, interpret, want",
    [
        (True, True, True, "eager"),  # the C++ kernel is a correctness path, slower than eager
        (True, False, False, "eager"),
        (False, True, True, "eager"),  # never Triton on CPU, even under the interpreter
        (False, False, False, "eager"),
    ],
)
def test_auto_order_on_cpu_tensors(monkeypatch, ext, triton, interpret, want):
    _fake(monkeypatch, ext=ext, cuda_ext=False, triton=triton, interpret=interpret)
    assert dispatch.auto_backend("distill_kl", "cpu") == want


def test_unavailable_backends_name_why(monkeypatch):
    _fake(monkeypatch, ext=True, cuda_ext=False, triton=False)
    why = dispatch.why_unavailable
    assert "needs the r2d2._C CUDA build; this install has CPU only" in why(
        "distill_kl", "cuda", "cuda"
    )
    assert "needs the triton package" in why("distill_kl", "triton", "cuda")
    _fake(monkeypatch, ext=False, cuda_ext=False, triton=True, interpret=False)
    assert "r2d2._C is not built (x)" in why("distill_kl", "cuda", "cuda")
    assert "r2d2._C is not built (x)" in why("distill_kl", "cpp", "cpu")
    assert "TRITON_INTERPRET=1" in why("distill_kl", "triton", "cpu")


def test_cuda_backend_on_cpu_tensors_names_why():
    s = torch.randn(3, 7)
    with pytest.raises(
        BackendUnavailable, match=r"distill_kl: backend='cuda' needs CUDA tensors, got cpu tensors"
    ):
        distill_kl(s, s, backend="cuda")
    for op, spec in dispatch.registered_ops().items():
        if "cuda" in spec.backends:
            assert "needs CUDA tensors" in dispatch.why_unavailable(op, "cuda", "cpu"), op


def test_xformers_backend_on_cpu_tensors_names_why():
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(BackendUnavailable, match="attention: backend='xformers' needs"):
        attention(q, q, q, backend="xformers")


def test_unknown_backend():
    f = torch.randn(2, 4)
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        contrastive_loss(f, f, torch.tensor(10.0), backend="nope")


def test_kernel_config_validates():
    with pytest.raises(ValueError, match=r"kernels\.attention"):
        KernelConfig(attention="fast")


def _picks(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "r2d2.kernels" and "(auto)" in r.getMessage()
    ]


def test_auto_pick_is_logged_once_per_op_and_device(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_announced", set())
    caplog.set_level(logging.INFO, logger="r2d2")
    pick = dispatch.auto_backend("distill_kl", "cpu")
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    for _ in range(3):
        distill_kl(s, t)
    dispatch.resolve("distill_kl", "auto", "cuda")  # another device: its own line
    dispatch.resolve("distill_kl", "auto", "cuda:0")  # same device type: no new line
    dispatch.resolve("contrastive", "auto", "cpu")  # another op: its own line
    dispatch.resolve("distill_kl", "eager", "cpu")  # explicit backends are not announced
    lines = _picks(caplog)
    assert lines.count(f"distill_kl on cpu tensors: backend={pick!r} (auto)") == 1, lines
    assert sum(line.startswith("distill_kl on cuda tensors") for line in lines) == 1, lines
    assert sum(line.startswith("contrastive on cpu tensors") for line in lines) == 1, lines
    assert len(lines) == 3, lines


def test_library_use_is_silent_without_logging_configured(capfd):
    """The r2d2 logger has a NullHandler: no 'no handlers' notice, no output on stderr."""
    import r2d2

    logger = logging.getLogger("r2d2")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers), r2d2
    dispatch._announced.discard(("distill_kl", "cpu", dispatch.auto_backend("distill_kl", "cpu")))
    distill_kl(torch.randn(2, 5), torch.randn(2, 5))
    assert "backend=" not in capfd.readouterr().err
