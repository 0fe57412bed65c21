"""The benchmark harness, scripts, report, bench_step and ``r2d2 bench``, on CPU.

No timing is asserted here beyond the ordering of quantiles: speed lives in benchmarks/, not in
tests. What is checked: the numbers a row derives (throughput, fractions of peak, ratios), that
rows reach the file as they are measured, that a failing or skipped case leaves a row saying
why, the largest-batch search on simulated memory limits, the report's plot ticks, the real
kernel scripts' rows. The communication model and gpu_session.sh: test_bench_scaling_session.py.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "r2d2" / "bench"  # the scripts; benchmarks/ keeps entry points at the old paths
from r2d2.bench import harness, report  # noqa: E402


def _row(provider, median, shape=None, mode="fwd", mem=None, **kw):
    t = harness.Timing(median, median * 0.9, median * 1.1)
    return harness.make_row(
        op="toy",
        provider=provider,
        mode=mode,
        shape=shape or {"n": 8},
        timing=t,
        peak_mem=mem,
        device="cpu",
        **kw,
    )


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
    assert harness.measure(lambda: None, device="cuda", warmup=0, rep=7) == harness.Timing(
        2.0, 1.0, 3.0
    )
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
    ms = harness.modes(lambda: x * x, [x])
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
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms and t2.median_ms > 0
    assert harness.peak_memory_bytes(lambda: torch.empty(1 << 24, device="cuda"), "cuda") >= 1 << 26
    peaks = harness.measured_peaks("cuda")
    assert peaks["gbps"] > 100 and peaks["bf16_tflops"] > 10
    row = harness.make_row(
        op="mm",
        provider="x",
        mode="fwd",
        shape={"n": 2048},
        timing=t,
        flops=2 * 2048**3,
        device="cuda",
        dtype="bfloat16",
    )
    assert row["frac_measured_flops"] == pytest.approx(row["tflops"] / peaks["bf16_tflops"])


# ---------------------------------------------------------------------------------- rows


def test_make_row_fields_and_fractions(monkeypatch):
    r = harness.make_row(
        op="toy",
        provider="eager",
        mode="fwd",
        shape={"n": 8},
        timing=harness.Timing(2.0, 1.0, 3.0),
        flops=4e9,
        nbytes=2e9,
        device="cpu",
        dtype="float32",
        note="x",
    )
    for k in (
        "device",
        "driver",
        "torch",
        "triton",
        "git_sha",
        "timestamp",
        "run_id",
        "status",
        "tflops",
        "gbps",
        "frac_peak_flops",
        "frac_peak_bw",
        "peak_mem_bytes",
    ):
        assert k in r, k
    assert r["tflops"] == pytest.approx(4e9 / 2e-3 / 1e12)
    assert r["gbps"] == pytest.approx(2e9 / 2e-3 / 1e9)
    assert r["status"] == "ok" and r["note"] == "x" and r["dtype"] == "float32"
    json.dumps(r)  # JSONL-serialisable
    # the fractions on a GPU: data sheet by name and dtype class, measured peaks when known
    env = dict(harness.environment("cpu"), device="NVIDIA H100 80GB HBM3", device_type="cuda")
    monkeypatch.setattr(harness, "environment", lambda device: env)
    monkeypatch.setattr(
        harness, "measured_peaks", lambda device: {"gbps": 3000.0, "bf16_tflops": 700.0}
    )
    g = harness.make_row(
        op="toy",
        provider="ours",
        mode="fwd",
        shape={"n": 8},
        timing=harness.Timing(1.0, 1.0, 1.0),
        flops=500e9,
        nbytes=2e9,
        device="cuda",
        dtype="bfloat16",
    )
    assert g["frac_peak_flops"] == pytest.approx(500 / 989)  # 500 TFLOP/s of the H100's 989
    assert g["frac_peak_bw"] == pytest.approx(2000 / 3350)
    assert g["frac_measured_flops"] == pytest.approx(500 / 700)
    assert g["frac_measured_bw"] == pytest.approx(2000 / 3000)
    f32 = harness.make_row(
        op="toy",
        provider="ours",
        mode="fwd",
        shape={"n": 8},
        timing=harness.Timing(1.0, 1.0, 1.0),
        flops=30e9,
        device="cuda",
        dtype="float32",
    )
    assert f32["frac_peak_flops"] == pytest.approx(30 / 67) and f32["frac_measured_flops"] is None


def test_peak_lookup_prefers_the_longest_name():
    """Device names that contain another entry's key resolve to their own entry."""
    look = harness._lookup
    assert look(harness.PEAK_GBPS, "NVIDIA H100 PCIe") != look(
        harness.PEAK_GBPS, "NVIDIA H100 80GB HBM3"
    )
    assert look(harness.PEAK_GBPS, "NVIDIA L40S") != look(harness.PEAK_GBPS, "NVIDIA L4")
    assert harness.peak_tflops("NVIDIA A10G", "bf16") != harness.peak_tflops("NVIDIA A10", "bf16")
    assert look(harness.PEAK_GBPS, "NVIDIA A100-SXM4-40GB") < look(
        harness.PEAK_GBPS, "NVIDIA A100-SXM4-80GB"
    )
    assert look(harness.PEAK_GBPS, "cpu (Intel Xeon)") is None
    pcie = "NVIDIA H100 PCIe"
    assert harness.peak_tflops(pcie, "float16") == harness.peak_tflops(pcie, "bf16")  # one class
    assert harness.peak_tflops(pcie, "float32") < harness.peak_tflops(pcie, "bf16")


def test_add_ratios_pairs_within_a_run():
    rows = [
        _row("eager", 4.0, mem=100),
        _row("ours", 2.0, mem=50),
        _row("slow", 8.0),
        _row("ours", 1.0, shape={"n": 16}),  # no eager row for this shape
        _row("eager", 6.0, mode="bwd"),
        _row("ours", 3.0, mode="bwd"),
    ]
    other_run = dict(_row("ours", 1.0), run_id="another-run")
    skipped = harness.status_row(
        op="toy",
        provider="ours",
        mode="fwd",
        shape={"n": 8},
        status="skipped",
        error="not importable",
        device="cpu",
    )
    harness.add_ratios(rows + [other_run, skipped])
    assert [r["ratio"] for r in rows] == [1.0, 2.0, 0.5, None, 1.0, 2.0]
    assert rows[1]["mem_ratio"] == 0.5 and rows[2]["mem_ratio"] is None
    assert other_run["ratio"] is None and skipped["ratio"] is None  # never across runs


def test_status_rows_say_why():
    r = harness.status_row(
        op="toy",
        provider="x",
        mode="fwd",
        shape={"n": 1},
        status="failed",
        error=RuntimeError("backend compiler failed\nlong trace"),
        device="cpu",
    )
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
    sink.add(
        harness.status_row(
            op="toy",
            provider="xformers",
            mode="fwd",
            shape={"n": 8},
            status="skipped",
            error="not importable",
            device="cpu",
        )
    )
    rows = harness.read_rows([path])
    assert [r["provider"] for r in rows] == ["eager", "ours", "xformers"]
    assert rows[1]["ratio"] == 2.0 and rows[2]["status"] == "skipped"
    assert harness.RowWriter(None).add(_row("eager", 1.0))["ratio"] == 1.0  # memory only


KILLED = """
import os, sys
sys.path.insert(0, sys.argv[2])
import harness
sink = harness.RowWriter(sys.argv[1])
for p in ("eager", "ours"):
    sink.add(harness.make_row(op="k", provider=p, mode="fwd", shape={"n": 1},
                              timing=harness.Timing(1.0, 1.0, 1.0), device="cpu"))
os.kill(os.getpid(), 9)  # killed before the script's end, as a phase timeout would
"""


def test_rows_survive_a_killed_script(tmp_path):
    out = tmp_path / "k.jsonl"
    rc = subprocess.call([sys.executable, "-c", KILLED, str(out), str(BENCH)])
    assert rc != 0
    assert [r["provider"] for r in harness.read_rows([out])] == ["eager", "ours"]


def test_write_read_and_report(tmp_path):
    rows = harness.add_ratios(
        [
            _row("eager", 4.0, flops=1e9),
            _row("ours", 2.0, flops=1e9),
            _row("eager", 3.0, shape={"n": 16}),
            _row("ours", 1.5, shape={"n": 16}),
        ]
    )
    rows.append(
        harness.status_row(
            op="toy",
            provider="apex",
            mode="fwd",
            shape={"n": 8},
            status="skipped",
            error="apex not importable",
            device="cpu",
        )
    )
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


@pytest.mark.parametrize(
    "lo,hi", [(0.0007, 1.3), (0.7, 1.3), (0.25, 13.0), (0.5, 2000.0), (0.77, 12.0)]
)
def test_plot_ticks_are_few_and_apart(lo, hi):
    """The y labels of the ratio plot: 1x always (the eager line), at most 7, never crowded."""
    ticks = report.ratio_ticks(lo, hi)
    assert 1.0 in ticks and 1 <= len(ticks) <= 7 and all(lo <= t <= hi for t in ticks)
    gap = (math.log(hi) - math.log(lo)) / 8
    assert all(math.log(b / a) >= gap for a, b in itertools.pairwise(ticks))


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
    assert Path(args.out).parent == harness.results_dir() and args.out.endswith("_cpu.jsonl")
    assert harness.parser("x").parse_args(["--device", "cpu", "--no-out"]).out is None
    harness.budgets = harness.DEFAULT


# ---------------------------------------------------------------------------------- bench_step


@pytest.mark.parametrize("limit", [0, 1, 5, 16, 17, 100, 777, 1000, 4096, 5000])
@pytest.mark.parametrize("start,cap,gran", [(16, 4096, 8), (64, 16384, 16)])
def test_largest_batch_on_a_simulated_memory_limit(limit, start, cap, gran):
    from r2d2.bench import bench_step

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
    from r2d2.bench import bench_step

    r = bench_step.largest_batch(
        lambda b: b <= 1000, start=16, cap=4096, deadline=time.monotonic() - 1
    )
    assert not r.complete and r.fits == 16 and r.fails is None and r.probes == [(16, True)]


class _FakeStep:
    """Stands in for bench_step.Step: no model, raises what its config is told to."""

    raises: ClassVar[dict] = {}

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
    return harness.make_row(
        op="train_step",
        provider=config,
        mode="fwd+bwd+opt",
        shape={"preset": preset, "batch": batch},
        device="cpu",
        timing=harness.Timing(2.0 if config == "eager" else 1.0, 1.0, 2.0),
    )


def test_bench_step_rows_per_config_failures_and_kill(tmp_path, monkeypatch):
    """One failing configuration (a compile error, an OOM) leaves a row and the others go on;
    apex absent is a skipped row; rows are on disk before a kill interrupts the run."""
    from r2d2.bench import bench_step

    class BackendCompilerFailed(RuntimeError):
        pass

    _FakeStep.raises = {
        "eager+compile": BackendCompilerFailed("inductor: bad\nstack"),
        "apex": torch.OutOfMemoryError("CUDA out of memory. Tried 2 GiB"),
    }
    monkeypatch.setattr(bench_step, "Step", _FakeStep)
    monkeypatch.setattr(bench_step, "_step_row", _fake_row)
    monkeypatch.setattr(bench_step, "_apex", lambda: (object, object))  # "importable"
    out = tmp_path / "step.jsonl"
    sink = harness.RowWriter(out)
    plan = bench_step.Plan(
        batch=4, configs=("eager", "eager+compile", "ours", "apex"), max_batch=False
    )
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
    from r2d2.bench import bench_step

    _FakeStep.raises = {}
    monkeypatch.setattr(bench_step, "Step", _FakeStep)
    monkeypatch.setattr(bench_step, "_step_row", _fake_row)
    sink = harness.RowWriter(None)
    late = bench_step.Plan(
        batch=4, configs=("eager", "ours"), max_batch=False, deadline=time.monotonic() - 1
    )
    bench_step.run("tiny", "cpu", late, sink)
    assert [r["status"] for r in sink.rows] == ["skipped", "skipped"]
    assert all("budget" in r["error"] for r in sink.rows)
    sink = harness.RowWriter(None)
    bench_step.run(
        "tiny", "cpu", bench_step.Plan(batch=0, configs=("eager",), max_batch=False), sink
    )
    assert sink.rows[0]["status"] == "oom"  # no batch fits: said, never run at batch 0


def test_max_batch_rows_have_no_placeholder_timing(monkeypatch):
    from r2d2.bench import bench_step

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
    from r2d2.cli import bench as bench_cli

    monkeypatch.delenv("R2D2_BENCHMARKS_DIR", raising=False)
    assert bench_cli.find_benchmarks_dir() == BENCH
    monkeypatch.setenv("R2D2_BENCHMARKS_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        bench_cli,
        "find_benchmarks_dir",
        lambda: (_ for _ in ()).throw(FileNotFoundError("no benchmarks/ here")),
    )
    assert bench_cli.main(["step"]) == 2
    assert "no benchmarks/ here" in capsys.readouterr().err


FAKE_STEP = """
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
"""


def test_cli_runs_scripts_and_report(tmp_path, monkeypatch, capfd):
    """The plumbing on a stand-in step script: args passed through, one run id, rows, report."""
    from r2d2.cli import bench as bench_cli

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


ROW_FIELDS = (
    "op",
    "provider",
    "mode",
    "shape",
    "status",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "device",
    "device_type",
    "torch",
    "git_sha",
    "timestamp",
    "run_id",
    "dtype",
)


def _check_kernel_rows(rows, op, providers, modes):
    assert {r["provider"] for r in rows} >= set(providers) and {r["mode"] for r in rows} >= set(
        modes
    )
    for r in rows:
        assert all(k in r for k in ROW_FIELDS), set(ROW_FIELDS) - set(r)
        assert r["op"] == op and r["status"] == "ok" and r["device_type"] == "cpu"
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["dtype"] == "float32"
        assert (r.get("gbps") or r.get("tflops")) and r["frac_peak_flops"] is None
        if r["provider"] == "eager":
            assert r["ratio"] == 1.0
        json.dumps(r)


def _quick(monkeypatch):
    """QUICK budgets in the harness the scripts use (r2d2.bench.harness)."""
    monkeypatch.setattr(harness, "budgets", harness.QUICK)


def test_distill_kl_script_cpu_quick(monkeypatch):
    _quick(monkeypatch)
    from r2d2.bench import bench_distill_kl

    rows = bench_distill_kl.run("cpu", quick=True)
    _check_kernel_rows(rows, "distill_kl", ["eager"], ["fwd", "bwd", "fwd+bwd"])


@pytest.mark.slow
def test_contrastive_and_attention_scripts_cpu_quick(tmp_path):
    """The real scripts end to end (main: rows to a file) under the Triton interpreter."""
    out = tmp_path / "k.jsonl"
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    for script in ("bench_contrastive.py", "bench_attention.py"):
        subprocess.run(
            [sys.executable, str(BENCH / script), "--quick", "--device", "cpu", "--out", str(out)],
            check=True,
            env=env,
            cwd=tmp_path,
        )
    rows = harness.read_rows([out])
    _check_kernel_rows(
        [r for r in rows if r["op"] == "contrastive"],
        "contrastive",
        ["eager", "triton"],
        ["fwd+bwd"],
    )
    _check_kernel_rows(
        [r for r in rows if r["op"] == "attention"],
        "attention",
        ["eager", "sdpa", "triton"],
        ["fwd", "fwd+bwd"],
    )
    causal = {r["provider"] for r in rows if r["op"] == "attention" and r["shape"].get("causal")}
    assert causal == {"eager", "sdpa", "triton"}  # the decoder's causal case, every provider


def test_attention_bench_causal_flops_count_visible_pairs():
    """Causal cases count only the (query, key) pairs a query may see (bottom-right) and that
    are not padding: L (L + 1) / 2 per (batch, head) unpadded, checked pair by pair padded."""
    from r2d2.bench import bench_attention

    B, H, L, D = 3, 2, 20, 16
    c = dict(name="decoder_self", Lq=L, Lk=L, B=B, H=H, D=D, kmask=False, qmask=False)
    flops = bench_attention.make_inputs(dict(c, causal=True), torch.float32, "cpu")[4]
    assert flops == 4.0 * H * D * B * L * (L + 1) / 2
    full = bench_attention.make_inputs(c, torch.float32, "cpu")[4]
    assert full == 4.0 * H * D * B * L * L
    _, _, _, mask, flops, _ = bench_attention.make_inputs(
        dict(c, causal=True, kmask=True, qmask=True), torch.float32, "cpu"
    )
    pairs = sum(
        1
        for b in range(B)
        for i in range(L)
        for j in range(L)
        if j <= i and mask[b, i] and mask[b, j]
    )
    assert flops == 4.0 * H * D * pairs


@pytest.mark.slow
def test_cli_step_quick_real(tmp_path):
    """The real training-step bench end to end on the tiny preset (about 30 s on 2 cores)."""
    from r2d2.cli import bench as bench_cli
    from r2d2.engine import flops
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
    from r2d2.bench import bench_step

    cfg = model_preset("tiny")
    frac = float(bench_step.synthetic_batch(cfg, 4, "cpu")["attention_mask"].float().mean())
    want = flops.flops_per_sample(
        cfg, LossConfig(), text_len=32, global_batch=4, text_valid_frac=frac
    )
    for c in ("eager", "ours"):
        r = rows[c]
        assert r["status"] == "ok" and r["device_type"] == "cpu" and r["dtype"] == "float32"
        assert r["samples_per_s"] == pytest.approx(4 / (r["median_ms"] / 1e3))
        assert r["flops_per_sample"] == pytest.approx(want)  # this objective, this batch
        assert r["tflops"] == pytest.approx(
            r["flops_per_sample"] * 4 / (r["median_ms"] / 1e3) / 1e12
        )
        assert r["kernels"]["attention"] == "sdpa" and r["mfu"] is None
    assert rows["eager"]["ratio"] == 1.0 and rows["ours"]["ratio"] > 0
