"""The benchmark harness, scripts, report, ``r2d2 bench`` and gpu_session.sh plumbing, on CPU.

No timing is asserted here beyond the ordering of quantiles: speed lives in benchmarks/, not in
tests. What is checked: the numbers a row derives (throughput, fractions of peak, ratios), that
rows reach the file as they are measured, that a failing or skipped case leaves a row saying
why, the largest-batch search on simulated memory limits, the report's plot ticks, the real
kernel scripts' rows, the communication model against the bytes the code sends, and the GPU
session script's phases, budget and exit codes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402
import report  # noqa: E402


def _row(provider, median, shape=None, mode="fwd", mem=None, **kw):
    t = harness.Timing(median, median * 0.9, median * 1.1)
    return harness.make_row(op="toy", provider=provider, mode=mode, shape=shape or {"n": 8},
                            timing=t, peak_mem=mem, device="cpu", **kw)


@pytest.fixture
def restore_budgets():
    yield
    harness.budgets = harness.DEFAULT


# ---------------------------------------------------------------------------------- timing


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


def test_measure_cuda_passes_budgets_through(monkeypatch):
    """The do_bench path gets warmup=0 as 0 (``warmup or 25`` made it 25) and the quantiles."""
    import triton.testing

    seen = {}

    def fake_do_bench(fn, warmup, rep, grad_to_none=None, quantiles=None):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        return [2.0, 1.0, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert harness.measure(lambda: None, device="cuda", warmup=0, rep=7) == harness.Timing(2.0, 1.0, 3.0)
    assert seen == {"warmup": 0, "rep": 7, "quantiles": [0.5, 0.2, 0.8]}
    harness.measure(lambda: None, device="cuda")
    assert seen["warmup"] == harness.DEFAULT.warmup_ms and seen["rep"] == harness.DEFAULT.rep_ms


def test_quick_switches_budgets(restore_budgets):
    calls = []
    harness.parser("x").parse_args(["--quick", "--device", "cpu", "--no-out"])
    assert harness.budgets is harness.QUICK
    harness.measure(lambda: calls.append(1), device="cpu")  # warm-up 0 = exactly one call first
    assert len(calls) >= 1 + harness.QUICK.min_blocks
    harness.parser("x").parse_args(["--device", "cpu", "--no-out"])
    assert harness.budgets is harness.DEFAULT


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


@pytest.mark.gpu
def test_measure_and_peaks_on_cuda():
    """On the GPU: do_bench timing, the torch.utils.benchmark path, peak memory, measured peaks."""
    a = torch.randn(2048, 2048, device="cuda")
    t = harness.measure(lambda: a @ a, device="cuda", warmup=0, rep=20)
    t2 = harness.measure(lambda: a @ a, device="cuda", flush_l2=False, rep=20)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms and 0 < t2.median_ms
    assert harness.peak_memory_bytes(lambda: torch.empty(1 << 24, device="cuda"), "cuda") >= 1 << 26
    peaks = harness.measured_peaks("cuda")
    assert peaks["gbps"] > 100 and peaks["bf16_tflops"] > 10
    row = harness.make_row(op="mm", provider="x", mode="fwd", shape={"n": 2048}, timing=t,
                           flops=2 * 2048**3, device="cuda", dtype="bfloat16")
    assert row["frac_measured_flops"] == pytest.approx(row["tflops"] / peaks["bf16_tflops"])


# ---------------------------------------------------------------------------------- rows


def test_make_row_fields_and_fractions(monkeypatch):
    r = harness.make_row(op="toy", provider="eager", mode="fwd", shape={"n": 8},
                         timing=harness.Timing(2.0, 1.0, 3.0), flops=4e9, nbytes=2e9,
                         device="cpu", dtype="float32", note="x")
    for k in ("device", "driver", "torch", "triton", "git_sha", "timestamp", "run_id", "status",
              "tflops", "gbps", "frac_peak_flops", "frac_peak_bw", "peak_mem_bytes"):
        assert k in r, k
    assert r["tflops"] == pytest.approx(4e9 / 2e-3 / 1e12)
    assert r["gbps"] == pytest.approx(2e9 / 2e-3 / 1e9)
    assert r["status"] == "ok" and r["note"] == "x" and r["dtype"] == "float32"
    json.dumps(r)  # JSONL-serialisable
    # the fractions on a GPU: data sheet by name and dtype class, measured peaks when known
    env = dict(harness.environment("cpu"), device="NVIDIA H100 80GB HBM3", device_type="cuda")
    monkeypatch.setattr(harness, "environment", lambda device: env)
    monkeypatch.setattr(harness, "measured_peaks", lambda device: {"gbps": 3000.0, "bf16_tflops": 700.0})
    g = harness.make_row(op="toy", provider="ours", mode="fwd", shape={"n": 8},
                         timing=harness.Timing(1.0, 1.0, 1.0), flops=500e9, nbytes=2e9,
                         device="cuda", dtype="bfloat16")
    assert g["frac_peak_flops"] == pytest.approx(500 / 989)      # 500 TFLOP/s of the H100's 989
    assert g["frac_peak_bw"] == pytest.approx(2000 / 3350)
    assert g["frac_measured_flops"] == pytest.approx(500 / 700)
    assert g["frac_measured_bw"] == pytest.approx(2000 / 3000)
    f32 = harness.make_row(op="toy", provider="ours", mode="fwd", shape={"n": 8},
                           timing=harness.Timing(1.0, 1.0, 1.0), flops=30e9, device="cuda",
                           dtype="float32")
    assert f32["frac_peak_flops"] == pytest.approx(30 / 67) and f32["frac_measured_flops"] is None


def test_peak_lookup_prefers_the_longest_name():
    """Device names that contain another entry's key resolve to their own entry."""
    look = harness._lookup
    assert look(harness.PEAK_GBPS, "NVIDIA H100 PCIe") != look(harness.PEAK_GBPS, "NVIDIA H100 80GB HBM3")
    assert look(harness.PEAK_GBPS, "NVIDIA L40S") != look(harness.PEAK_GBPS, "NVIDIA L4")
    assert harness.peak_tflops("NVIDIA A10G", "bf16") != harness.peak_tflops("NVIDIA A10", "bf16")
    assert look(harness.PEAK_GBPS, "NVIDIA A100-SXM4-40GB") < look(harness.PEAK_GBPS, "NVIDIA A100-SXM4-80GB")
    assert look(harness.PEAK_GBPS, "cpu (Intel Xeon)") is None
    pcie = "NVIDIA H100 PCIe"
    assert harness.peak_tflops(pcie, "float16") == harness.peak_tflops(pcie, "bf16")  # one class
    assert harness.peak_tflops(pcie, "float32") < harness.peak_tflops(pcie, "bf16")


def test_add_ratios_pairs_within_a_run():
    rows = [_row("eager", 4.0, mem=100), _row("ours", 2.0, mem=50), _row("slow", 8.0),
            _row("ours", 1.0, shape={"n": 16}),  # no eager row for this shape
            _row("eager", 6.0, mode="bwd"), _row("ours", 3.0, mode="bwd")]
    other_run = dict(_row("ours", 1.0), run_id="another-run")
    skipped = harness.status_row(op="toy", provider="ours", mode="fwd", shape={"n": 8},
                                 status="skipped", error="not importable", device="cpu")
    harness.add_ratios(rows + [other_run, skipped])
    assert [r["ratio"] for r in rows] == [1.0, 2.0, 0.5, None, 1.0, 2.0]
    assert rows[1]["mem_ratio"] == 0.5 and rows[2]["mem_ratio"] is None
    assert other_run["ratio"] is None and skipped["ratio"] is None  # never across runs


def test_status_rows_say_why():
    r = harness.status_row(op="toy", provider="x", mode="fwd", shape={"n": 1}, status="failed",
                           error=RuntimeError("backend compiler failed\nlong trace"), device="cpu")
    assert r["status"] == "failed" and r["error"] == "RuntimeError: backend compiler failed"
    assert r["median_ms"] is None and r["device_type"] == "cpu" and r["run_id"]
    with pytest.raises(ValueError, match="status"):
        harness.status_row(op="toy", provider="x", mode="fwd", shape={}, status="ok")


def test_row_writer_appends_each_row_at_once(tmp_path):
    path = tmp_path / "rows.jsonl"
    sink = harness.RowWriter(path)
    sink.add(_row("eager", 4.0))
    assert len(harness.read_rows([path])) == 1  # on disk before the next row exists
    sink.add(_row("ours", 2.0))
    sink.add(harness.status_row(op="toy", provider="xformers", mode="fwd", shape={"n": 8},
                                status="skipped", error="not importable", device="cpu"))
    rows = harness.read_rows([path])
    assert [r["provider"] for r in rows] == ["eager", "ours", "xformers"]
    assert rows[1]["ratio"] == 2.0 and rows[2]["status"] == "skipped"
    assert harness.RowWriter(None).add(_row("eager", 1.0))["ratio"] == 1.0  # memory only


KILLED = '''
import os, sys
sys.path.insert(0, sys.argv[2])
import harness
sink = harness.RowWriter(sys.argv[1])
for p in ("eager", "ours"):
    sink.add(harness.make_row(op="k", provider=p, mode="fwd", shape={"n": 1},
                              timing=harness.Timing(1.0, 1.0, 1.0), device="cpu"))
os.kill(os.getpid(), 9)  # killed before the script's end, as a phase timeout would
'''


def test_rows_survive_a_killed_script(tmp_path):
    out = tmp_path / "k.jsonl"
    rc = subprocess.call([sys.executable, "-c", KILLED, str(out), str(BENCH)])
    assert rc != 0
    assert [r["provider"] for r in harness.read_rows([out])] == ["eager", "ours"]


def test_write_read_and_report(tmp_path):
    rows = harness.add_ratios([_row("eager", 4.0, flops=1e9), _row("ours", 2.0, flops=1e9),
                               _row("eager", 3.0, shape={"n": 16}), _row("ours", 1.5, shape={"n": 16})])
    rows.append(harness.status_row(op="toy", provider="apex", mode="fwd", shape={"n": 8},
                                   status="skipped", error="apex not importable", device="cpu"))
    path = harness.write_rows(rows[:2], tmp_path / "sub" / "r.jsonl")
    harness.write_rows(rows[2:], path)  # appends
    assert len(harness.read_rows([path])) == 5
    md, png = report.render([path])
    text = md.read_text()
    assert text.startswith("# Benchmarks on cpu") and "not GPU results" in text
    assert "## toy — n=8" in text and "## toy — n=16" in text
    assert "| fwd | ours | 2 [1.8-2.2] |" in text and "| 2.00 |" in text
    assert "| fwd | apex | skipped |" in text and "apex not importable" in text
    assert png is not None and png.stat().st_size > 1000


@pytest.mark.parametrize("lo,hi", [(0.0007, 1.3), (0.7, 1.3), (0.25, 13.0), (0.5, 2000.0), (0.77, 12.0)])
def test_plot_ticks_are_few_and_apart(lo, hi):
    """The y labels of the ratio plot: 1x always (the eager line), at most 7, never crowded."""
    ticks = report.ratio_ticks(lo, hi)
    assert 1.0 in ticks and 1 <= len(ticks) <= 7 and all(lo <= t <= hi for t in ticks)
    gap = (math.log(hi) - math.log(lo)) / 8
    assert all(math.log(b / a) >= gap for a, b in zip(ticks, ticks[1:]))


def test_plot_has_no_minor_labels(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    rows = harness.add_ratios([_row("eager", 4.0), _row("ours", 3.1), _row("triton", 900.0)])
    assert report.plot(rows, tmp_path / "p.png").stat().st_size > 1000
    ax = figs[0].axes[0]
    assert not [t for t in ax.yaxis.get_minorticklabels() if t.get_text()]
    labels = [t.get_text() for t in ax.yaxis.get_majorticklabels()]
    assert "1x" in labels and len(labels) <= 7


def test_parser_defaults():
    args = harness.parser("x").parse_args(["--quick", "--device", "cpu"])
    assert args.quick and args.device == "cpu"
    assert Path(args.out).parent == harness.RESULTS_DIR and args.out.endswith("_cpu.jsonl")
    assert harness.parser("x").parse_args(["--device", "cpu", "--no-out"]).out is None
    harness.budgets = harness.DEFAULT


# ---------------------------------------------------------------------------------- bench_step


@pytest.mark.parametrize("limit", [0, 1, 5, 16, 17, 100, 777, 1000, 4096, 5000])
@pytest.mark.parametrize("start,cap,gran", [(16, 4096, 8), (64, 16384, 16)])
def test_largest_batch_on_a_simulated_memory_limit(limit, start, cap, gran):
    import bench_step

    probes = []

    def fits(b):
        probes.append(b)
        return b <= limit

    r = bench_step.largest_batch(fits, start=start, cap=cap, granularity=gran)
    assert r.complete and r.fits <= limit and all(b >= 1 for b in probes)  # never batch 0
    if limit >= cap:
        assert r.fits == cap and r.fails is None
    else:
        assert r.fails > limit  # a batch that really failed bounds the answer
        # within the granularity, and within a quarter of itself for small fits (a fit under
        # `start` is found, never reported as 0)
        assert limit - r.fits < max(1, min(gran, r.fits // 4))
    assert len(probes) <= 2 * math.log2(cap) + 4


def test_largest_batch_stops_at_the_deadline():
    import bench_step

    r = bench_step.largest_batch(lambda b: b <= 1000, start=16, cap=4096,
                                 deadline=time.monotonic() - 1)
    assert not r.complete and r.fits == 16 and r.fails is None and r.probes == [(16, True)]


class _FakeStep:
    """Stands in for bench_step.Step: no model, raises what its config is told to."""

    raises: dict = {}

    def __init__(self, preset, config, device, **kw):
        self.config = config
        self.kernel_picks = {"attention": "sdpa"}
        if config in self.raises:
            raise self.raises[config]

    def close(self):
        pass


def _fake_row(step, preset, config, batch, quick, rep_ms):
    if config == "ours+compile":
        raise KeyboardInterrupt  # a phase timeout's SIGINT in the middle of the run
    return harness.make_row(op="train_step", provider=config, mode="fwd+bwd+opt",
                            shape={"preset": preset, "batch": batch}, device="cpu",
                            timing=harness.Timing(2.0 if config == "eager" else 1.0, 1.0, 2.0))


def test_bench_step_rows_per_config_failures_and_kill(tmp_path, monkeypatch):
    """One failing configuration (a compile error, an OOM) leaves a row and the others go on;
    apex absent is a skipped row; rows are on disk before a kill interrupts the run."""
    import bench_step

    class BackendCompilerFailed(RuntimeError):
        pass

    _FakeStep.raises = {"eager+compile": BackendCompilerFailed("inductor: bad\nstack"),
                        "apex": torch.OutOfMemoryError("CUDA out of memory. Tried 2 GiB")}
    monkeypatch.setattr(bench_step, "Step", _FakeStep)
    monkeypatch.setattr(bench_step, "_step_row", _fake_row)
    monkeypatch.setattr(bench_step, "_apex", lambda: (object, object))  # "importable"
    out = tmp_path / "step.jsonl"
    sink = harness.RowWriter(out)
    plan = bench_step.Plan(batch=4, configs=("eager", "eager+compile", "ours", "apex"),
                           max_batch=False)
    bench_step.run("tiny", "cpu", plan, sink)
    rows = {r["provider"]: r for r in harness.read_rows([out])}
    assert rows["eager"]["status"] == rows["ours"]["status"] == "ok"
    assert rows["ours"]["ratio"] == 2.0
    assert rows["eager+compile"]["status"] == "failed"
    assert rows["eager+compile"]["error"].startswith("BackendCompilerFailed: inductor: bad")
    assert rows["apex"]["status"] == "oom" and "out of memory" in rows["apex"]["error"]
    # apex not importable: a skipped row, not a silent gap; then a kill mid-run keeps the rest
    monkeypatch.setattr(bench_step, "_apex", lambda: "apex not importable (No module named 'apex')")
    out2 = tmp_path / "step2.jsonl"
    plan = bench_step.Plan(batch=4, configs=("eager", "apex", "ours+compile"), max_batch=False)
    with pytest.raises(KeyboardInterrupt):
        bench_step.run("tiny", "cpu", plan, harness.RowWriter(out2))
    rows = harness.read_rows([out2])
    assert [(r["provider"], r["status"]) for r in rows] == [("eager", "ok"), ("apex", "skipped")]
    assert "No module named 'apex'" in rows[1]["error"]


def test_bench_step_budget_and_no_batch(monkeypatch):
    import bench_step

    _FakeStep.raises = {}
    monkeypatch.setattr(bench_step, "Step", _FakeStep)
    monkeypatch.setattr(bench_step, "_step_row", _fake_row)
    sink = harness.RowWriter(None)
    late = bench_step.Plan(batch=4, configs=("eager", "ours"), max_batch=False,
                           deadline=time.monotonic() - 1)
    bench_step.run("tiny", "cpu", late, sink)
    assert [r["status"] for r in sink.rows] == ["skipped", "skipped"]
    assert all("budget" in r["error"] for r in sink.rows)
    sink = harness.RowWriter(None)
    bench_step.run("tiny", "cpu", bench_step.Plan(batch=0, configs=("eager",), max_batch=False), sink)
    assert sink.rows[0]["status"] == "oom"  # no batch fits: said, never run at batch 0


def test_max_batch_rows_have_no_placeholder_timing(monkeypatch):
    import bench_step

    limits = {"eager": 300, "ours": 1000}
    _FakeStep.raises = {}
    monkeypatch.setattr(bench_step, "Step", _FakeStep)
    monkeypatch.setattr(bench_step, "fits", lambda step, b: b <= limits[step.config])
    sink = harness.RowWriter(None)
    plan = bench_step.Plan(max_batch_start=64, max_batch_cap=4096, max_batch_granularity=16)
    rows = bench_step.max_batch_rows("base", "cpu", plan, sink)
    assert [r["max_batch"] for r in rows] == [288, 992]  # within 16 of the limits 300, 1000
    for r in rows:
        assert r["median_ms"] is None and r["p20_ms"] is None and r["tflops"] is None
        assert r["search_complete"] and r["max_batch_fails"] - r["max_batch"] <= 16
    assert rows[1]["batch_ratio"] == pytest.approx(rows[1]["max_batch"] / rows[0]["max_batch"])


# ---------------------------------------------------------------------------------- the CLI


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
import os, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
args = harness.parser("fake").parse_args()
sink = harness.RowWriter(args.out)
for p, m in (("eager", 2.0), ("ours", 1.0)):
    sink.add(harness.make_row(op="fake", provider=p, mode="fwd", shape={"n": 1},
                              timing=harness.Timing(m, m, m), device=args.device))
print("quick" if args.quick else "full", os.environ.get("R2D2_BENCH_RUN"))
'''


def test_cli_runs_scripts_and_report(tmp_path, monkeypatch, capfd):
    """The plumbing on a stand-in step script: args passed through, one run id, rows, report."""
    from r2d2.engine import bench_cli

    fake = tmp_path / "benchmarks"
    fake.mkdir()
    for f in ("harness.py", "report.py"):
        shutil.copy(BENCH / f, fake / f)
    (fake / "bench_step.py").write_text(FAKE_STEP)
    monkeypatch.setenv("R2D2_BENCHMARKS_DIR", str(fake))
    monkeypatch.delenv("R2D2_BENCH_RUN", raising=False)
    out = tmp_path / "rows.jsonl"
    assert bench_cli.main(["step", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    printed = capfd.readouterr().out
    assert "quick bench-" in printed
    rows = harness.read_rows([out])
    assert [r["ratio"] for r in rows] == [1.0, 2.0] and rows[0]["run_id"].startswith("bench-")
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()


ROW_FIELDS = ("op", "provider", "mode", "shape", "status", "median_ms", "p20_ms", "p80_ms",
              "device", "device_type", "torch", "git_sha", "timestamp", "run_id", "dtype")


def _check_kernel_rows(rows, op, providers, modes):
    assert {r["provider"] for r in rows} >= set(providers) and {r["mode"] for r in rows} >= set(modes)
    for r in rows:
        assert all(k in r for k in ROW_FIELDS), set(ROW_FIELDS) - set(r)
        assert r["op"] == op and r["status"] == "ok" and r["device_type"] == "cpu"
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["dtype"] == "float32"
        assert (r.get("gbps") or r.get("tflops")) and r["frac_peak_flops"] is None
        if r["provider"] == "eager":
            assert r["ratio"] == 1.0
        json.dumps(r)


def _quick(monkeypatch):
    """QUICK budgets in both harness module objects (scripts import it as harness or
    benchmarks.harness)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import harness as pkg_harness

    for h in (harness, pkg_harness):
        monkeypatch.setattr(h, "budgets", h.QUICK)


def test_distill_kl_script_cpu_quick(monkeypatch):
    _quick(monkeypatch)
    import bench_distill_kl

    rows = bench_distill_kl.run("cpu", quick=True)
    _check_kernel_rows(rows, "distill_kl", ["eager"], ["fwd", "bwd", "fwd+bwd"])


@pytest.mark.slow
def test_contrastive_and_attention_scripts_cpu_quick(tmp_path):
    """The real scripts end to end (main: rows to a file) under the Triton interpreter."""
    out = tmp_path / "k.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for script in ("bench_contrastive.py", "bench_attention.py"):
        subprocess.run([sys.executable, str(BENCH / script), "--quick", "--device", "cpu",
                        "--out", str(out)], check=True, env=env, cwd=tmp_path)
    rows = harness.read_rows([out])
    _check_kernel_rows([r for r in rows if r["op"] == "contrastive"], "contrastive",
                       ["eager", "triton"], ["fwd+bwd"])
    _check_kernel_rows([r for r in rows if r["op"] == "attention"], "attention",
                       ["eager", "sdpa", "triton"], ["fwd", "fwd+bwd"])


@pytest.mark.slow
def test_cli_step_quick_real(tmp_path):
    """The real training-step bench end to end on the tiny preset (about 30 s on 2 cores)."""
    from r2d2.engine import bench_cli, flops
    from r2d2.engine.losses import LossConfig
    from r2d2.engine.model import model_preset

    out = tmp_path / "step_cpu.jsonl"
    assert bench_cli.main(["step", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    rows = {r["provider"]: r for r in harness.read_rows([out]) if r["op"] == "train_step"}
    assert set(rows) == {"eager", "eager+compile", "ours", "ours+compile", "apex"}
    for c in ("eager+compile", "ours+compile"):
        assert rows[c]["status"] == "skipped" and "--quick" in rows[c]["error"]
    import importlib.util

    if importlib.util.find_spec("apex") is None:  # absent: a skipped row, not a missing one
        assert rows["apex"]["status"] == "skipped" and "apex" in rows["apex"]["error"]
    import bench_step

    cfg = model_preset("tiny")
    frac = float(bench_step.synthetic_batch(cfg, 4, "cpu")["attention_mask"].float().mean())
    want = flops.flops_per_sample(cfg, LossConfig(), text_len=32, global_batch=4,
                                  text_valid_frac=frac)
    for c in ("eager", "ours"):
        r = rows[c]
        assert r["status"] == "ok" and r["device_type"] == "cpu" and r["dtype"] == "float32"
        assert r["samples_per_s"] == pytest.approx(4 / (r["median_ms"] / 1e3))
        assert r["flops_per_sample"] == pytest.approx(want)  # this objective, this batch
        assert r["tflops"] == pytest.approx(r["flops_per_sample"] * 4 / (r["median_ms"] / 1e3) / 1e12)
        assert r["kernels"]["attention"] == "sdpa" and r["mfu"] is None
    assert rows["eager"]["ratio"] == 1.0 and rows["ours"]["ratio"] > 0


# ---------------------------------------------------------------------------------- scaling


def test_comm_model_formulas():
    import bench_scaling as bs

    dims = dict(b=4, d=8, L=5, img_tokens=10, wv=6, wt=6, params=1000)
    assert all(v == 0 for v in bs.comm_bytes(1, **dims).values())  # one rank sends nothing
    c8, c16 = bs.comm_bytes(8, **dims), bs.comm_bytes(16, **dims)
    # every GCPR and FGR term is a per-rank block sent N - 1 times (the ring's state N times)
    for k in ("gcpr_gather", "gcpr_eager", "fgr_global"):
        assert c16[k] / c8[k] == pytest.approx(15 / 7)
    assert c8["ddp_grads"] == pytest.approx(2 * 7 / 8 * 1000 * 4)
    # gather mode: the text block and its ids gathered, images stay local; O(B) statistics
    # (8 fp32 fields + an int32 index per column, all-reduced); text gradients reduce-scattered
    b, d = 4, 8
    assert c8["gcpr_gather"] == 7 * b * (8 * d + 8) + 2 * 7 * b * 36 + 7 * 4 + 7 * b * (4 * d + 4)
    assert c8["gcpr_eager"] == 7 * b * (16 * d + 8) + 7 * b * 8 * d
    assert c8["gcpr_gather"] < c8["gcpr_eager"]
    no_teacher = bs.comm_bytes(8, teacher=False, **dims)
    assert c8["gcpr_gather"] - no_teacher["gcpr_gather"] == 7 * b * 4 * d + 2 * 7 * b * 3 * 4
    # gloo has no reduce-scatter: r2d2.dist all-reduces, twice the backward bytes
    gloo = bs.comm_bytes(8, gloo=True, **dims)
    assert gloo["gcpr_gather"] - c8["gcpr_gather"] == 7 * b * (4 * d + 4)
    t = (10 * 6 + 5 * 6) * 4
    assert c8["fgr_global"] == 7 * 4 * (2 * t + 5) + 7 * 4 * t
    m8, m16 = bs.gathered_memory(8, **{k: v for k, v in dims.items() if k != "params"}), \
        bs.gathered_memory(16, **{k: v for k, v in dims.items() if k != "params"})
    assert m8["gcpr_ring"] == m16["gcpr_ring"] and m16["gcpr_gather"] == 2 * m8["gcpr_gather"]


def test_docs_table_is_the_scripts_output():
    """docs/benchmarks.md carries the model's table as bench_scaling.py computes it."""
    import bench_scaling as bs

    text = bs.DOCS.read_text()
    body = text.split(bs.BEGIN, 1)[1].split(bs.END, 1)[0].strip()
    assert body == bs.comm_table().strip(), (
        "docs/benchmarks.md is stale: run python benchmarks/bench_scaling.py --model-only --write-docs")


B_LOCAL, D_FEAT, WORLD = 2, 8, 3


def _count_worker(rank, world, port, out_dir):
    """Run the contrastive loss (forward + backward) per backend/mode, counting what each rank
    sends with the ring formulas the model uses (all_gather (N-1) s, all_reduce 2 (N-1)/N S,
    P2P the tensor)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from r2d2.kernels import contrastive as C
    from r2d2.kernels import contrastive_dist as CD
    from r2d2.kernels.dispatch import why_unavailable

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sent = [0.0]
    orig = {n: getattr(dist, n) for n in ("all_gather", "all_reduce", "batch_isend_irecv")}

    def nbytes(t):
        return t.numel() * t.element_size()

    def all_gather(parts, t, *a, **k):
        sent[0] += (world - 1) * nbytes(t)
        return orig["all_gather"](parts, t, *a, **k)

    def all_reduce(t, *a, **k):
        sent[0] += 2 * (world - 1) / world * nbytes(t)
        return orig["all_reduce"](t, *a, **k)

    def batch_isend_irecv(ops):
        sent[0] += sum(nbytes(o.tensor) for o in ops if "isend" in getattr(o.op, "__name__", ""))
        return orig["batch_isend_irecv"](ops)

    dist.all_gather, dist.all_reduce, dist.batch_isend_irecv = all_gather, all_reduce, batch_isend_irecv
    g = torch.Generator().manual_seed(rank)
    res = {}
    try:
        for backend, mode in (("eager", "gather"), ("triton", "gather"), ("triton", "ring")):
            if why_unavailable("contrastive", backend, "cpu") is not None:
                continue
            img, txt, ti, tt = (F.normalize(torch.randn(B_LOCAL, D_FEAT, generator=g), dim=1)
                                for _ in range(4))
            img.requires_grad_()
            txt.requires_grad_()
            s = torch.tensor(20.0, requires_grad=True)
            sent[0] = 0.0
            out = C.contrastive_loss(img, txt, s, image_ids=torch.arange(B_LOCAL) + rank * B_LOCAL,
                                     teacher_image_feat=ti, teacher_text_feat=tt, distill_alpha=0.4,
                                     backend=backend, mode=mode, return_negatives=True, seed=3)
            out.loss.backward()
            res[f"{backend}-{mode}"] = sent[0]
        res["batched_p2p"] = CD._BATCH_P2P
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_comm_model_matches_the_bytes_the_loss_sends(tmp_path):
    """Three gloo ranks: the model's GCPR terms equal what the contrastive loss sends."""
    import torch.multiprocessing as mp

    import bench_scaling as bs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_count_worker, args=(WORLD, port, str(tmp_path)), nprocs=WORLD, join=True)
    from r2d2.kernels.dispatch import why_unavailable

    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    dims = dict(b=B_LOCAL, d=D_FEAT, L=1, img_tokens=1, wv=1, wt=1, params=0)
    model = bs.comm_bytes(WORLD, gloo=True, **dims)
    fused = why_unavailable("contrastive", "triton", "cpu") is None
    for r in got:
        assert r["eager-gather"] == pytest.approx(model["gcpr_eager"])
        if fused:  # the Triton interpreter runs the fused backends' communication on CPU
            assert r["batched_p2p"], "ring fell back to plain isend: its bytes were not counted"
            assert r["triton-gather"] == pytest.approx(model["gcpr_gather"])
            assert r["triton-ring"] == pytest.approx(model["gcpr_ring"])


# ---------------------------------------------------------------------------------- gpu_session.sh

SESSION = ROOT / "scripts" / "gpu_session.sh"


def _session(tmp_path, *args, env=None, timeout=240):
    e = dict(os.environ, PYTHON=sys.executable)
    e.update(env or {})
    return subprocess.run(["bash", str(SESSION), *args, "--out", str(tmp_path)], env=e,
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_session_plan_fits_one_device_call(tmp_path):
    """--dry-run: every phase, each with a cap, inside a budget that fits a 600 s command."""
    p = _session(tmp_path, "--dry-run")
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if " cap " in ln]
    names = [ln.split()[0] for ln in lines]
    assert names == ["env", "build", "doctor", "gpu_tests", "step", "kernels_distill_kl",
                     "kernels_contrastive", "kernels_attention", "step_compile", "max_batch", "report"]
    budget = int(p.stdout.split("budget ")[-1].split("s")[0])
    assert budget <= 540  # the device tool's 600 s per command, with room to return files
    assert "--max-batch-budget" in p.stdout and "--batch-max" in p.stdout


def test_session_cpu_phases_results_and_exit_codes(tmp_path):
    """--cpu on a seeded rows file: the report phase renders the layout; a phase over its cap
    times out (exit 1, summary says so); a phase that cannot get its minimum is skipped (exit 3)."""
    stem = time.strftime("%Y-%m-%d", time.gmtime()) + "_cpu"
    harness.write_rows(harness.add_ratios([_row("eager", 2.0), _row("ours", 1.0)]),
                       tmp_path / f"{stem}.jsonl")
    p = _session(tmp_path, "--cpu", "--phases", "report")
    assert p.returncode == 0, p.stdout + p.stderr
    for suffix in (".jsonl", ".md", ".png"):
        assert (tmp_path / f"{stem}{suffix}").is_file(), suffix
    summary = (tmp_path / "session.md").read_text()
    assert "| report | ok | 0 |" in summary and (tmp_path / "logs.tar.gz").is_file()
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back
    slow = tmp_path / "slowpy"  # a python that takes 30 s to start: past a 1 s cap
    slow.write_text(f"#!/bin/sh\nsleep 30\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    p = _session(tmp_path, "--cpu", "--phases", "report",
                 env={"PYTHON": str(slow), "R2D2_SESSION_CAP_REPORT": "1", "R2D2_SESSION_MIN_REPORT": "1"})
    assert p.returncode == 1 and "| report | timeout | 124 |" in (tmp_path / "session.md").read_text()
    p = _session(tmp_path, "--cpu", "--phases", "step", "--budget", "30")
    assert p.returncode == 3 and "skipped (budget)" in (tmp_path / "session.md").read_text()


@pytest.mark.slow
def test_session_cpu_end_to_end(tmp_path):
    """Every phase of the CPU mode for real (tiny settings): rows from each bench phase."""
    p = _session(tmp_path, "--cpu", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    stem = time.strftime("%Y-%m-%d", time.gmtime()) + "_cpu"
    rows = harness.read_rows([tmp_path / f"{stem}.jsonl"])
    assert {r["op"] for r in rows} >= {"train_step", "distill_kl", "max_batch"}
    assert len({r["run_id"] for r in rows}) == 1
    assert (tmp_path / "gpu_tests.xml").is_file() and (tmp_path / f"{stem}.png").is_file()
