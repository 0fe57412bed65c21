"""The benchmark harness, report and ``r2d2 bench`` plumbing, on CPU with tiny work.

No timing is asserted here beyond ordering of quantiles: speed lives in benchmarks/, not tests.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402
import report  # noqa: E402


def _row(provider, median, shape=None, mode="fwd", mem=None, **kw):
    t = harness.Timing(median, median * 0.9, median * 1.1)
    return harness.make_row(op="toy", provider=provider, mode=mode, shape=shape or {"n": 8},
                            timing=t, peak_mem=mem, device="cpu", **kw)


def test_measure_quantiles_ordered_and_plausible():
    t = harness.measure(lambda: time.sleep(0.002), device="cpu", warmup=1, rep=30)
    assert t.p20_ms <= t.median_ms <= t.p80_ms
    assert 1.5 < t.median_ms < 200  # a 2 ms sleep, generous for a loaded shared machine


def test_measure_resets_grads():
    x = torch.randn(8, requires_grad=True)
    calls = []

    def fn():
        calls.append(x.grad)
        (x * 2).sum().backward()

    harness.measure(fn, device="cpu", warmup=0, rep=5, grad_to_none=[x])
    assert calls and all(g is None for g in calls)


def test_modes_fwd_bwd():
    x = torch.randn(4, 3, requires_grad=True)
    ms = harness.modes(lambda: (x * x), [x])
    assert set(ms) == {"fwd", "bwd", "fwd+bwd"}
    fn, g2n = ms["bwd"]
    assert g2n == [x]
    fn()
    fn()  # retain_graph: a second backward of the held forward works
    x.grad = None
    ms["fwd+bwd"][0]()
    assert x.grad is not None and x.grad.shape == x.shape
    assert ms["fwd"][0]().shape == (4, 3)


def test_make_row_fields():
    r = harness.make_row(op="toy", provider="eager", mode="fwd", shape={"n": 8},
                         timing=harness.Timing(2.0, 1.0, 3.0), flops=4e9, nbytes=2e9,
                         device="cpu", dtype="float32", note="x")
    for k in ("device", "driver", "torch", "triton", "git_sha", "timestamp", "tflops", "gbps",
              "frac_peak_flops", "frac_peak_bw", "peak_mem_bytes"):
        assert k in r, k
    assert r["tflops"] == pytest.approx(4e9 / 2e-3 / 1e12)
    assert r["gbps"] == pytest.approx(2e9 / 2e-3 / 1e9)
    assert r["device_type"] == "cpu" and r["device"].startswith("cpu")
    assert r["frac_peak_flops"] is None and r["frac_peak_bw"] is None  # no CPU peak is claimed
    assert r["note"] == "x" and r["dtype"] == "float32"
    json.dumps(r)  # JSONL-serialisable


def test_peak_tables_match_gpu_names():
    assert harness._lookup(harness.PEAK_GBPS, "NVIDIA H100 80GB HBM3") == 3350.0
    assert harness._lookup(harness.PEAK_GBPS, "NVIDIA H100 PCIe") == 2000.0
    assert harness._lookup(harness.PEAK_GBPS, "NVIDIA H200") == 4800.0
    assert harness.peak_memory_bytes(lambda: None, "cpu") is None


def test_add_ratios():
    rows = [_row("eager", 4.0, mem=100), _row("ours", 2.0, mem=50), _row("slow", 8.0),
            _row("ours", 1.0, shape={"n": 16}),  # no eager row for this shape
            _row("eager", 6.0, mode="bwd"), _row("ours", 3.0, mode="bwd")]
    harness.add_ratios(rows)
    ratios = [r["ratio"] for r in rows]
    assert ratios == [1.0, 2.0, 0.5, None, 1.0, 2.0]
    assert rows[1]["mem_ratio"] == 0.5 and rows[2]["mem_ratio"] is None


def test_write_read_and_report(tmp_path):
    rows = harness.add_ratios([_row("eager", 4.0, flops=1e9), _row("ours", 2.0, flops=1e9),
                               _row("eager", 3.0, shape={"n": 16}), _row("ours", 1.5, shape={"n": 16})])
    path = harness.write_rows(rows[:2], tmp_path / "sub" / "r.jsonl")
    harness.write_rows(rows[2:], path)  # appends
    assert len(harness.read_rows([path])) == 4
    md, png = report.render([path])
    text = md.read_text()
    assert text.startswith("# Benchmarks on cpu") and "not GPU results" in text
    assert "## toy — n=8" in text and "## toy — n=16" in text
    assert "| fwd | ours | 2 [1.8-2.2] |" in text and "| 2.00 |" in text
    assert png is not None and png.stat().st_size > 1000


def test_parser_defaults():
    args = harness.parser("x").parse_args(["--quick", "--device", "cpu"])
    assert args.quick and args.device == "cpu"
    assert Path(args.out).parent == harness.RESULTS_DIR and args.out.endswith("_cpu.jsonl")
    assert harness.parser("x").parse_args(["--device", "cpu", "--no-out"]).out is None


def test_cli_finds_benchmarks_and_errors_clearly(tmp_path, monkeypatch, capsys):
    from r2d2.engine import bench_cli

    assert bench_cli.find_benchmarks_dir() == BENCH
    monkeypatch.setenv("R2D2_BENCHMARKS_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_cli, "find_benchmarks_dir",
                        lambda: (_ for _ in ()).throw(FileNotFoundError("no benchmarks/ here")))
    assert bench_cli.main(["step"]) == 2
    assert "no benchmarks/ here" in capsys.readouterr().err


FAKE_STEP = '''
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
args = harness.parser("fake").parse_args()
rows = [harness.make_row(op="fake", provider=p, mode="fwd", shape={"n": 1},
                         timing=harness.Timing(m, m, m), device=args.device)
        for p, m in (("eager", 2.0), ("ours", 1.0))]
harness.write_rows(harness.add_ratios(rows), args.out)
print("quick" if args.quick else "full")
'''


def test_cli_runs_scripts_and_report(tmp_path, monkeypatch, capfd):
    """The plumbing on a stand-in step script: args passed through, rows written, report rendered."""
    from r2d2.engine import bench_cli

    fake = tmp_path / "benchmarks"
    fake.mkdir()
    for f in ("harness.py", "report.py"):
        shutil.copy(BENCH / f, fake / f)
    (fake / "bench_step.py").write_text(FAKE_STEP)
    monkeypatch.setenv("R2D2_BENCHMARKS_DIR", str(fake))
    out = tmp_path / "rows.jsonl"
    assert bench_cli.main(["step", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert "quick" in capfd.readouterr().out
    rows = harness.read_rows([out])
    assert [r["ratio"] for r in rows] == [1.0, 2.0]
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()


@pytest.mark.slow
def test_cli_step_quick_real(tmp_path):
    """The real training-step bench end to end on the tiny preset (about 1.5 min on 2 cores)."""
    from r2d2.engine import bench_cli

    out = tmp_path / "step_cpu.jsonl"
    assert bench_cli.main(["step", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    rows = [r for r in harness.read_rows([out]) if r["op"] == "train_step"]
    assert {r["provider"] for r in rows} >= {"eager", "ours"}
    assert all(r["samples_per_s"] > 0 and r["device_type"] == "cpu" for r in rows)


def test_comm_model_formulas():
    import bench_scaling as bs

    dims = dict(b=4, d=8, L=5, img_tokens=10, wv=6, wt=6, params=1000)
    one = bs.comm_bytes(1, **dims)
    assert all(v == 0 for v in one.values())  # one rank sends nothing
    c8, c16 = bs.comm_bytes(8, **dims), bs.comm_bytes(16, **dims)
    # all-gather terms grow with N - 1; the DDP all-reduce tends to 2 x 4 bytes x params
    assert c16["gcpr_gather"] / c8["gcpr_gather"] == pytest.approx(15 / 7)
    assert c16["fgr_global"] / c8["fgr_global"] == pytest.approx(15 / 7)
    assert c8["ddp_grads"] == pytest.approx(2 * 7 / 8 * 1000 * 4)
    t = (10 * 6 + 5 * 6) * 4
    assert c8["fgr_global"] == 7 * 4 * (2 * t + 5 * 8) + 2 * 7 * 4 * t


def test_docs_table_is_the_scripts_output():
    """docs/benchmarks.md carries the model's table as bench_scaling.py computes it."""
    import bench_scaling as bs

    text = bs.DOCS.read_text()
    body = text.split(bs.BEGIN, 1)[1].split(bs.END, 1)[0].strip()
    assert body == bs.comm_table().strip(), (
        "docs/benchmarks.md is stale: run python benchmarks/bench_scaling.py --model-only --write-docs")
