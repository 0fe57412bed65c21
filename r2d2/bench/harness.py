"""Shared benchmark harness: timing, peak memory, JSONL rows, ratios against eager, a text table.

Every bench script in this package (``r2d2.bench``; ``benchmarks/`` at the top of the checkout keeps
thin entry points at the old paths) builds its cases with it so that all rows have the same
fields and the same method:

  * timing: ``triton.testing.do_bench`` on CUDA (CUDA events, L2 flushed between reps, median and
    20/80 percentiles); ``torch.utils.benchmark.Timer.blocked_autorange`` on CPU (quantiles of its
    per-block times). Both warm up first, so compilation and autotuning stay out of the numbers.
  * throughput: FLOPs and bytes come from formulas given by the caller, so every provider of one
    case is divided by the same work (a fused kernel that moves fewer bytes shows as more GB/s).
  * fraction of peak: against the data-sheet peak of a known GPU (``PEAK_GBPS`` here, FLOP/s from
    ``r2d2.engine.flops.PEAK_TFLOPS``) and, on CUDA, against the copy bandwidth and bf16 matmul
    rate measured once per process on the device itself (METHOD.md: data-sheet rates are leads).
    On a CPU both are None: there is no trustworthy peak to divide by.

Rows are plain dicts, one JSON object per line, so ``report.py`` and pytest-benchmark-style
comparisons can read them without importing torch. A script appends each row the moment it is
measured (:class:`RowWriter`), so a script killed by a timeout keeps every row it finished; a
case that fails or is skipped still gets a row (:func:`status_row`: ``status`` "failed" /
"oom" / "skipped" with the ``error``), so nothing vanishes silently.

``--quick`` (:func:`parser`) also shortens the timing budgets of :func:`measure` for the whole
process (:data:`QUICK`): fewer, shorter timed blocks, for smoke runs on CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# The checkout this package sits in (editable install, a run from the source tree); in an installed
# package it is site-packages, which has no benchmarks/ and no git.
REPO_ROOT = Path(__file__).resolve().parents[2]


def results_dir() -> Path:
    """Where rows go by default: ``$R2D2_BENCH_RESULTS``, else the checkout's
    ``benchmarks/results/`` when the package runs from a checkout, else ``benchmarks/results/``
    under the current directory (an installed package)."""
    if os.environ.get("R2D2_BENCH_RESULTS"):
        return Path(os.environ["R2D2_BENCH_RESULTS"])
    if (REPO_ROOT / "benchmarks").is_dir() and (REPO_ROOT / "pyproject.toml").is_file():
        return REPO_ROOT / "benchmarks" / "results"
    return Path.cwd() / "benchmarks" / "results"


# Data-sheet HBM/GDDR bandwidth in GB/s by device-name substring (longest match wins).
# Sources: NVIDIA H200, H100 (SXM5 / PCIe), A100 (40 / 80 GB SXM), L40S, L4, A10(G), T4, V100
# product data sheets.
PEAK_GBPS: dict[str, float] = {
    "H200": 4800.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-40GB": 1555.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 2039.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10G": 600.0,
    "A10": 600.0,
    "RTX 4090": 1008.0,
    "V100": 900.0,
    "T4": 320.0,
}

MIN_BLOCKS = 5  # fewest timed blocks a CPU measurement's quantiles come from


@dataclass
class Budgets:
    """Default time budgets of :func:`measure` in ms (do_bench's meaning), fewest timed blocks on
    the torch.utils.benchmark path."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0  # do_bench's default
    cpu_rep_ms: float = 200.0
    min_blocks: int = MIN_BLOCKS


DEFAULT = Budgets()
# --quick: a smoke run. On CPU one warm-up call and three short blocks (a slow provider, such as
# the Triton interpreter, then costs about five calls instead of seven or more).
QUICK = Budgets(warmup_ms=0.0, rep_ms=50.0, cpu_rep_ms=50.0, min_blocks=3)
budgets = DEFAULT  # what measure() uses when a budget is not passed; parser() sets QUICK

_DTYPE_CLASS = {
    "bfloat16": "bf16",
    "float16": "bf16",
    "bf16": "bf16",
    "fp16": "bf16",
    "float32": "fp32",
    "fp32": "fp32",
}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


# ----------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    """Fills ``--out``'s default after parsing, because it names the device chosen by ``--device``,
    and switches :func:`measure` to the :data:`QUICK` budgets under ``--quick``."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        global budgets
        ns = super().parse_args(args, namespace)
        budgets = QUICK if getattr(ns, "quick", False) else DEFAULT
        if getattr(ns, "out", None) is None and not getattr(ns, "no_out", False):
            ns.out = str(default_out_path(ns.device))
        if getattr(ns, "no_out", False):
            ns.out = None
        return ns


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every bench script shares: --quick, --out, --no-out, --device."""
    ap = _Parser(description=description)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small shapes and short timing budgets: a smoke run (each script takes "
        "seconds to about a minute on two shared CPU cores; docs/benchmarks.md "
        "gives the measured times)",
    )
    ap.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="JSONL file rows are appended to (default benchmarks/results/<date>_<device>.jsonl)",
    )
    ap.add_argument("--no-out", action="store_true", help="print the table only, write no file")
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda when available)",
    )
    return ap


def device_slug(device: str | torch.device) -> str:
    """'cpu' or the GPU's name made file-safe, e.g. 'nvidia-h100-80gb-hbm3'."""
    name = device_name(device)
    return "cpu" if name.startswith("cpu") else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out_path(device: str | torch.device) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return results_dir() / f"{date}_{device_slug(device)}.jsonl"


# ----------------------------------------------------------------------------------------------
# timing and memory


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def measure(
    fn: Callable[[], object],
    *,
    device: str | torch.device,
    warmup: float | None = None,
    rep: float | None = None,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    flush_l2: bool = True,
    min_blocks: int | None = None,
) -> Timing:
    """Median and 20/80 percentiles of ``fn()`` in milliseconds.

    ``warmup`` and ``rep`` are time budgets in ms (do_bench's meaning on both devices; None =
    the process's :data:`budgets`, 0 = none); ``grad_to_none`` tensors get ``.grad = None``
    before every rep so backward never accumulates. ``flush_l2=False`` on CUDA times with
    torch.utils.benchmark (which synchronizes the device around every timed block, so the host
    clock brackets finished GPU work) instead of do_bench: for a whole training step, whose
    working set is gigabytes against a 50-60 MB L2 (a flush changes nothing) and whose largest
    batch leaves no room for do_bench's 256 MB flush buffer (docs/benchmarks.md, "Timing").
    ``min_blocks``: fewest timed blocks on that path.
    """
    b = budgets
    warmup = b.warmup_ms if warmup is None else warmup
    if _is_cuda(device) and flush_l2:
        from triton.testing import do_bench

        # do_bench always runs at least one warm-up call, so warmup=0 means "no extra budget"
        q = do_bench(
            fn,
            warmup=warmup,
            rep=b.rep_ms if rep is None else rep,
            grad_to_none=grad_to_none,
            quantiles=[0.5, 0.2, 0.8],
        )
        return Timing(float(q[0]), float(q[1]), float(q[2]))

    from torch.utils import benchmark

    call = fn
    if grad_to_none:

        def call():  # reset grads inside the timed region: cheap, like do_bench's
            for t in grad_to_none:
                t.grad = None
            return fn()

    # CPU warm-up: at least one call, then until the budget is spent (first calls pay allocation
    # and one-off dispatch costs that steady-state training does not).
    budget_s = warmup / 1e3
    t0 = time.perf_counter()
    call()
    while time.perf_counter() - t0 < budget_s:
        call()
    timer = benchmark.Timer(
        stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads()
    )
    default_rep = b.rep_ms if _is_cuda(device) else b.cpu_rep_ms
    m = timer.blocked_autorange(min_run_time=(default_rep if rep is None else rep) / 1e3)
    times = list(m.times)
    # A slow fn gets one or two blocks in the budget; quantiles of those mean nothing, so top up
    # to min_blocks blocks of the same size (a slow fn is also a noisy one on a shared CPU).
    while len(times) < (min_blocks or b.min_blocks):
        times += timer.timeit(m.number_per_run).times
    times_ms = sorted(t * 1e3 for t in times)
    return Timing(statistics.median(times_ms), _quantile(times_ms, 0.2), _quantile(times_ms, 0.8))


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method) without a numpy import."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def peak_memory_bytes(fn: Callable[[], object], device: str | torch.device) -> int | None:
    """Bytes allocated at the peak of one ``fn()`` call above what was allocated before it.

    CUDA only: the caching allocator's counters are exact; a CPU process has no equivalent that
    excludes the interpreter and other threads, so CPU returns None rather than a guess.
    """
    if not _is_cuda(device):
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


# ----------------------------------------------------------------------------------------------
# fwd / bwd / fwd+bwd callables


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor) and o.requires_grad:
                return o
    raise TypeError(f"forward returned no tensor that requires grad: {type(out).__name__}")


def modes(
    fwd: Callable[[], object],
    inputs: Iterable[torch.Tensor],
    which: Sequence[str] = ("fwd", "bwd", "fwd+bwd"),
) -> dict[str, tuple[Callable, list]]:
    """``{mode: (callable, grad_to_none)}`` for fwd, bwd, fwd+bwd of ``fwd()``, as Liger does.

    * fwd: the forward alone (inputs still require grad, so autograd records as in training);
    * bwd: backward of one retained forward (``retain_graph=True``), the forward not timed;
    * fwd+bwd: both.
    A non-scalar output is back-propagated with one fixed random cotangent. Pass the returned
    ``grad_to_none`` list to :func:`measure` so gradients are reset, not accumulated, each rep.
    """
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out: dict[str, tuple[Callable, list]] = {}
    held = None
    dy = None

    def _cotangent(y):
        nonlocal dy
        if dy is None:
            dy = None if y.dim() == 0 else torch.randn_like(y)
        return dy

    if "fwd" in which:
        out["fwd"] = (fwd, [])
    if "bwd" in which:
        held = _first_tensor(fwd())
        g = _cotangent(held)

        def bwd():
            held.backward(g, retain_graph=True)

        out["bwd"] = (bwd, leaves)
    if "fwd+bwd" in which:

        def fwd_bwd():
            y = _first_tensor(fwd())
            y.backward(_cotangent(y))

        out["fwd+bwd"] = (fwd_bwd, leaves)
    return out


# ----------------------------------------------------------------------------------------------
# environment and rows


@functools.cache
def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index or 0)
    cpu = platform.processor() or platform.machine()
    try:  # the model name is what a reader can compare machines by
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"cpu ({cpu}, {n} thread{'' if n == 1 else 's'})"


@functools.cache
def _cmd(*args: str) -> str | None:
    try:
        return (
            subprocess.run(
                args, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def run_id() -> str:
    """Which run a row belongs to: ``$R2D2_BENCH_RUN`` (``r2d2 bench`` and gpu_session.sh set one
    for all their scripts) or one per process. Ratios pair rows of one run only, so a results
    file that several runs appended to never divides one run's time by another's."""
    return os.environ.get("R2D2_BENCH_RUN") or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


@functools.cache
def environment(device: str | torch.device) -> dict:
    """Fields identifying the run: device, driver, versions, git sha (dirty-marked)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    sha = _cmd("git", "rev-parse", "--short=12", "HEAD")
    if sha and _cmd("git", "status", "--porcelain", "--untracked-files=no"):
        sha += "-dirty"
    cuda = _is_cuda(device)
    driver = (
        _cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if cuda else None
    )
    return {
        "run_id": run_id(),
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": sha,
    }


def _lookup(table: dict[str, float], name: str) -> float | None:
    for key in sorted(table, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return table[key]
    return None


def peak_tflops(name: str, dtype: str | None) -> float | None:
    """Data-sheet dense TFLOP/s (from r2d2.engine.flops, one table for the whole project)."""
    try:
        from r2d2.engine.flops import peak_tflops as _peak
    except ImportError:
        return None
    return _peak(name, _DTYPE_CLASS.get(str(dtype).removeprefix("torch."), "bf16"))


def measured_peaks(device: str | torch.device) -> dict:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul TFLOP/s measured on this GPU; {} on CPU.

    Done once per process, about a second, so fraction-of-peak is against what this card does
    today (clocks, power cap), not only what its data sheet promises. Call it before filling the
    GPU (it needs ~2.3 GB); if it cannot allocate, the measured fractions stay None.
    """
    return _measured_peaks(str(torch.device(device)))


@functools.cache
def _measured_peaks(device: str) -> dict:
    if not _is_cuda(device):
        return {}
    try:
        src = torch.randn(1 << 28, device=device)  # 1 GiB: far larger than any L2
        dst = torch.empty_like(src)
        copy_ms = measure(functools.partial(dst.copy_, src), device=device).median_ms
        del src, dst
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        mm_ms = measure(functools.partial(torch.matmul, a, b), device=device).median_ms
        del a, b
    except torch.cuda.OutOfMemoryError:
        return {}
    finally:
        torch.cuda.empty_cache()
    return {"gbps": 2 * (1 << 28) * 4 / copy_ms / 1e6, "bf16_tflops": 2 * n**3 / mm_ms / 1e9}


def make_row(
    *,
    op: str,
    provider: str,
    mode: str,
    shape: dict,
    timing: Timing | None,
    flops: float | None = None,
    nbytes: float | None = None,
    peak_mem: int | None = None,
    device: str | torch.device | None = None,
    **extra,
) -> dict:
    """One result row: what ran, how long, throughput, fraction of peak, and the environment.

    ``device`` defaults to cuda when available; pass it when benchmarking on the CPU of a GPU box.
    ``timing=None`` is a measurement that is not a time (a capacity such as ``max_batch``): the
    time and throughput fields are None. Extra keyword arguments (dtype, batch, notes) are
    stored as given.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    sec = timing.median_ms / 1e3 if timing is not None else None
    tflops = flops / sec / 1e12 if flops and sec else None
    gbps = nbytes / sec / 1e9 if nbytes and sec else None
    sheet_flops = (
        peak_tflops(env["device"], extra.get("dtype")) if env["device_type"] == "cuda" else None
    )
    sheet_bw = _lookup(PEAK_GBPS, env["device"]) if env["device_type"] == "cuda" else None
    measured = measured_peaks(device) if (tflops or gbps) else {}
    dtype_class = _DTYPE_CLASS.get(str(extra.get("dtype", "")).removeprefix("torch."))
    row = {
        "op": op,
        "provider": provider,
        "mode": mode,
        "shape": dict(shape),
        "status": "ok",
        "error": None,
        "median_ms": timing and timing.median_ms,
        "p20_ms": timing and timing.p20_ms,
        "p80_ms": timing and timing.p80_ms,
        "flops": flops,
        "bytes": nbytes,
        "tflops": tflops,
        "gbps": gbps,
        "frac_peak_flops": tflops / sheet_flops if tflops and sheet_flops else None,
        "frac_peak_bw": gbps / sheet_bw if gbps and sheet_bw else None,
        # measured matmul peak only exists for bf16; other dtypes compare to the data sheet only
        "frac_measured_flops": (
            tflops / measured["bf16_tflops"]
            if tflops and measured and dtype_class == "bf16"
            else None
        ),
        "frac_measured_bw": gbps / measured["gbps"] if gbps and measured else None,
        "peak_mem_bytes": peak_mem,
        **env,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    row.update(extra)
    return row


STATUSES = ("ok", "failed", "oom", "skipped")


def status_row(
    *,
    op: str,
    provider: str,
    mode: str,
    shape: dict,
    status: str,
    error: BaseException | str | None = None,
    device: str | torch.device | None = None,
    **extra,
) -> dict:
    """A row for a case that produced no timing: ``status`` "failed" (an exception: its type and
    first line are kept), "oom", or "skipped" (``error`` says why: not importable, refused the
    case, out of budget). Timing and throughput fields are None; the environment is filled in as
    for :func:`make_row`, so a reader sees what was attempted where."""
    if status not in STATUSES or status == "ok":
        raise ValueError(f"status_row: status must be one of {STATUSES[1:]}, got {status!r}")
    if isinstance(error, BaseException):
        first = (str(error).strip().splitlines() or [""])[0][:300]
        error = f"{type(error).__name__}: {first}"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    row = {
        "op": op,
        "provider": provider,
        "mode": mode,
        "shape": dict(shape),
        "status": status,
        "error": error,
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "flops": None,
        "bytes": None,
        "tflops": None,
        "gbps": None,
        "frac_peak_flops": None,
        "frac_peak_bw": None,
        "frac_measured_flops": None,
        "frac_measured_bw": None,
        "peak_mem_bytes": None,
        **environment(device),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    row.update(extra)
    return row


def _key(row: dict) -> tuple:
    return (
        row.get("run_id"),
        row["op"],
        row["mode"],
        json.dumps(row["shape"], sort_keys=True),
        str(row.get("dtype")),
        row.get("device"),
    )


def _ratio_fields(r: dict, b: dict | None, baseline: str) -> None:
    ok = b is not None and r.get("median_ms") and b.get("median_ms")
    r["baseline"] = baseline if b is not None else None
    r["ratio"] = b["median_ms"] / r["median_ms"] if ok else None
    r["mem_ratio"] = (
        r["peak_mem_bytes"] / b["peak_mem_bytes"]
        if b is not None and r.get("peak_mem_bytes") and b.get("peak_mem_bytes")
        else None
    )


def add_ratios(rows: list[dict], baseline: str = "eager") -> list[dict]:
    """Add ``baseline``, ``ratio`` (baseline median / row median: >1 is faster than baseline) and
    ``mem_ratio`` (row peak / baseline peak) for rows sharing (run, op, mode, shape, dtype,
    device). Rows without a timing (status rows) get None."""
    base = {_key(r): r for r in rows if r["provider"] == baseline and r.get("median_ms")}
    for r in rows:
        _ratio_fields(r, base.get(_key(r)), baseline)
    return rows


def write_rows(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Append rows to a JSONL file (parents created), flushed; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
            f.flush()
    return path


class RowWriter:
    """Appends every row to the JSONL file the moment it is measured, so a script that is killed
    (a phase timeout, an OOM-killer, a crash in a later case) keeps every row it finished.

        sink = harness.RowWriter(args.out)         # args.out None (--no-out): rows kept in memory only
        sink.add(harness.make_row(...))            # written and flushed now; x eager filled in if
                                                   # the baseline row of the same case came first
        sink.add(harness.status_row(..., status="skipped", error="xformers not importable"))
        harness.print_table(sink.rows)             # at the end, as before

    ``rows`` holds what was added, in order. Ratios are set against the baseline rows already
    added; ``report.py`` recomputes them from the whole file anyway, so a baseline measured after
    its comparisons only delays the ratio to the report.
    """

    def __init__(self, path: str | os.PathLike | None, baseline: str = "eager"):
        self.path = Path(path) if path is not None else None
        self.baseline = baseline
        self.rows: list[dict] = []
        self._base: dict[tuple, dict] = {}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> dict:
        if row["provider"] == self.baseline and row.get("median_ms"):
            self._base[_key(row)] = row
        _ratio_fields(row, self._base.get(_key(row)), self.baseline)
        self.rows.append(row)
        if self.path is not None:
            write_rows([row], self.path)
        return row

    def extend(self, rows: Iterable[dict]) -> None:
        for r in rows:
            self.add(r)


def read_rows(paths: Iterable[str | os.PathLike]) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def print_table(rows: Sequence[dict], file=None) -> None:
    """A fixed-width table of the rows, device named in the header line."""
    if not rows:
        print("(no rows)", file=file)
        return
    devices = sorted({r.get("device", "?") for r in rows})
    print(
        f"device: {', '.join(devices)}"
        + (
            "   [CPU figures: not GPU results]"
            if all(r.get("device_type") == "cpu" for r in rows)
            else ""
        ),
        file=file,
    )
    head = (
        "op",
        "shape",
        "mode",
        "provider",
        "median ms",
        "p20",
        "p80",
        "TFLOP/s",
        "GB/s",
        "x eager",
        "peak MiB",
    )
    table = [head]
    notes = []
    for r in rows:
        mem = r.get("peak_mem_bytes")
        if r.get("status", "ok") != "ok":
            notes.append(
                f"  [{r['status']}] {r['op']} {shape_str(r['shape'])} {r['mode']} "
                f"{r['provider']}: {r.get('error') or ''}"
            )
            if r.get("median_ms") is None:
                continue
        table.append(
            (
                r["op"],
                shape_str(r["shape"]),
                r["mode"],
                r["provider"],
                _fmt(r["median_ms"], ".4g"),
                _fmt(r["p20_ms"], ".4g"),
                _fmt(r["p80_ms"], ".4g"),
                _fmt(r.get("tflops"), ".3g"),
                _fmt(r.get("gbps"), ".4g"),
                _fmt(r.get("ratio"), ".2f"),
                _fmt(mem / 2**20 if mem else None, ".1f"),
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip(), file=file)
    for n in notes:
        print(n, file=file)


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/harness.py outpath [--device cuda]``: the default results path (the
    date and the device slug gpu_session.sh names its files by)."""
    ap = argparse.ArgumentParser(description="print the default results path for a device")
    ap.add_argument("what", choices=("outpath", "slug"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    print(default_out_path(args.device) if args.what == "outpath" else device_slug(args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
