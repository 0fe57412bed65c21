"""``r2d2 doctor`` tells the truth about this install, and the ``r2d2`` command's logging shows
each auto backend pick once. (A broken or absent r2d2._C: tests/kernels/test_ext_fallback.py.)"""

from __future__ import annotations

import logging

import pytest
import torch

from r2d2 import _ext, cli
from r2d2.cli import doctor
from r2d2.kernels import dispatch, distill_kl


def _fields(out: str) -> dict[str, str]:
    head = out.split("\nops on ", 1)[0]
    return dict(line.split(None, 1) for line in head.splitlines() if line.strip())


def test_doctor_prints_every_field_of_the_issue(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    f = _fields(out)
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    assert f["torch"] == torch.__version__
    assert f["torch_cuda"] == (torch.version.cuda or "none (CPU build)")  # CUDA
    assert f["cuda_available"] == str(torch.cuda.is_available())
    assert f["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    assert f["triton"] == version("triton")
    assert f["xformers"] == version("xformers") and f["apex"] == version("apex")
    if _ext.available():  # CPU / CUDA parts of the extension
        assert f["r2d2._C"] == ("CPU+CUDA" if _ext.cuda_built() else "CPU only")
    else:
        assert f["r2d2._C"].startswith("unavailable: ") and _ext.why_missing() in f["r2d2._C"]
    # ...and which backend auto picks for each op, on each device this machine has.
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        section = out.split(f"ops on {dev} tensors:\n", 1)[1].split("\nops on ", 1)[0]
        for op in dispatch.registered_ops():
            assert f"  {op}: auto -> {dispatch.auto_backend(op, dev)}\n" in section, (op, out)
            for backend in dispatch.registered_ops()[op].backends:
                why = dispatch.why_unavailable(op, backend, dev) or "ok"
                assert f"      {backend:<9} {why}" in section, (op, backend)


@pytest.fixture
def r2d2_logger():
    """The ``r2d2`` logger as the test found it, restored afterwards (the CLI configures it)."""
    logger = logging.getLogger("r2d2")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def test_cli_shows_each_auto_pick_once_on_stderr(r2d2_logger, monkeypatch, capsys):
    monkeypatch.setattr(dispatch, "_announced", set())
    monkeypatch.delenv("R2D2_LOG_LEVEL", raising=False)
    assert cli.main(["--version"]) == 0  # any command: the dispatcher sets logging up first
    capsys.readouterr()
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    for _ in range(3):
        distill_kl(s, t)
    pick = dispatch.auto_backend("distill_kl", "cpu")
    err = capsys.readouterr().err
    assert err.count("distill_kl on cpu tensors") == 1, err
    assert f"I r2d2.kernels: distill_kl on cpu tensors: backend={pick!r} (auto)\n" in err
    # Configured twice (e.g. a subcommand calling main again): still one handler, one line.
    cli.configure_logging()
    monkeypatch.setattr(dispatch, "_announced", set())
    distill_kl(s, t)
    assert capsys.readouterr().err.count("distill_kl on cpu tensors") == 1


@pytest.mark.parametrize(
    "argv, env, shown",
    [
        (["-q", "--version"], None, False),
        (["--version"], "WARNING", False),
        (["-v", "--version"], "ERROR", True),  # a flag beats the variable
        (["--version"], "debug", True),
    ],
)
def test_cli_log_level_flags_and_env(r2d2_logger, monkeypatch, capsys, argv, env, shown):
    monkeypatch.setattr(dispatch, "_announced", set())
    if env is None:
        monkeypatch.delenv("R2D2_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("R2D2_LOG_LEVEL", env)
    assert cli.main(argv) == 0
    distill_kl(torch.randn(2, 4), torch.randn(2, 4))
    assert ("(auto)" in capsys.readouterr().err) == shown


def test_cli_rejects_a_bad_log_level(r2d2_logger, monkeypatch, capsys):
    monkeypatch.setenv("R2D2_LOG_LEVEL", "chatty")
    assert cli.main(["--version"]) == 2
    assert "R2D2_LOG_LEVEL='chatty' is not a level" in capsys.readouterr().err
