"""benchmarks/bench_distill_kl.py runs in CI: its CPU mode, at a tiny shape, into a temporary
JSONL, with every field a result row must carry. (Timings are recorded, never asserted.)"""

from __future__ import annotations

import json

import pytest
import torch

from r2d2.bench import bench_distill_kl as bench
from r2d2.kernels.dispatch import why_unavailable

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cpu_mode_writes_complete_rows(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert (
        bench.main(["--device", "cpu", "--shape", "8x64", "--shape", "3x7", "--out", str(out)]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert all(r["error"] and why_unavailable("distill_kl", r["provider"], "cpu") for r in skipped)
    rows = [r for r in rows if r["status"] == "ok"]
    providers = ["eager"] + (["cpp"] if why_unavailable("distill_kl", "cpp", "cpu") is None else [])
    want = {
        (p, m, (r, c))
        for p in providers
        for m in ("fwd", "bwd", "fwd+bwd")
        for r, c in ((8, 64), (3, 7))
    }
    assert {
        (r["provider"], r["mode"], (r["shape"]["rows"], r["shape"]["cols"])) for r in rows
    } == want
    assert len(rows) == len(want)
    for r in rows:
        assert r["op"] == "distill_kl" and r["dtype"] == "float32"
        assert r["device_type"] == "cpu" and r["device"].startswith("cpu")
        assert r["torch"] == torch.__version__ and "triton" in r and "cuda" in r
        assert isinstance(r["git_sha"], str) and r["git_sha"]
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        n = r["shape"]["rows"] * r["shape"]["cols"]
        assert r["bytes"] == {"fwd": 12, "bwd": 8, "fwd+bwd": 20}[r["mode"]] * n  # fp32 formula
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] / 1e3) / 1e9)
        assert r["baseline"] == "eager"
        base = next(
            b
            for b in rows
            if b["provider"] == "eager" and b["mode"] == r["mode"] and b["shape"] == r["shape"]
        )
        assert r["ratio"] == pytest.approx(base["median_ms"] / r["median_ms"])
    assert "x eager" in capsys.readouterr().out  # the printed table


def test_gpu_cases_and_byte_formula():
    """What a GPU run measures: bf16 at (4096, 4096) and (8192, 32768), every fused backend
    against eager, in each of fwd / bwd / fwd+bwd."""
    shapes, dtype, providers = bench.cases("cuda", quick=False)
    assert shapes == [(4096, 4096), (8192, 32768)] and dtype == torch.bfloat16
    assert providers == ["eager", "triton", "cuda"]
    x = torch.zeros(2, 3, requires_grad=True)
    modes = bench.harness.modes(lambda: (x * 2).sum(), [x])
    assert list(modes) == ["fwd", "bwd", "fwd+bwd"]
    # bf16 saves a bf16 gradient, fp16 an fp32 one (distill_kl.saved_grad_dtype)
    assert [bench.nbytes(m, 4096, 4096, torch.bfloat16) for m in modes] == [
        6 * 4096 * 4096,
        4 * 4096 * 4096,
        10 * 4096 * 4096,
    ]
    assert bench.nbytes("fwd", 1, 1, torch.float16) == 2 * 2 + 4
