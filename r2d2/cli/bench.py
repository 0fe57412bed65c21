"""``r2d2 bench [kernels|step|scaling|all] [--quick]``: run the benchmark scripts, then the report.

The scripts and their harness are the package :mod:`r2d2.bench`, so this works from any install
(``$R2D2_BENCHMARKS_DIR`` runs the scripts of another folder instead). Each script runs in its own
process so that one failing or unavailable benchmark does not lose the others' rows; all rows go
to one JSONL file (default ``benchmarks/results/<date>_<device>.jsonl`` of the checkout, or of
the current directory for an installed package: :func:`r2d2.bench.harness.results_dir`),
rendered at the end by ``report.py`` into ``.md`` and ``.png`` beside it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from r2d2.cli import UsageError, check_out_dir, guarded

KERNEL_SCRIPTS = ("bench_distill_kl.py", "bench_contrastive.py", "bench_attention.py")
SUITES = {
    "kernels": KERNEL_SCRIPTS,
    "step": ("bench_step.py",),
    "scaling": ("bench_scaling.py",),
}
SUITES["all"] = SUITES["kernels"] + SUITES["step"] + SUITES["scaling"]


def find_benchmarks_dir() -> Path:
    """The folder of the bench scripts: ``$R2D2_BENCHMARKS_DIR`` when set, else the package
    ``r2d2.bench``; FileNotFoundError when the one asked for has no ``harness.py``."""
    if os.environ.get("R2D2_BENCHMARKS_DIR"):
        c = Path(os.environ["R2D2_BENCHMARKS_DIR"])
        if not (c / "harness.py").is_file():
            raise FileNotFoundError(f"R2D2_BENCHMARKS_DIR={c}: no harness.py there")
        return c
    import r2d2.bench

    return Path(r2d2.bench.__file__).resolve().parent


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="r2d2 bench", description=__doc__.splitlines()[0])
    ap.add_argument(
        "suite",
        nargs="?",
        default="all",
        choices=sorted(SUITES),
        help="kernels: the per-op scripts; step: the training step; scaling: 1..N "
        "processes and the communication model; all: every one (default)",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes; a CPU run takes minutes")
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available"
    )
    ap.add_argument(
        "--out",
        default=None,
        help="JSONL for every script's rows (default "
        "benchmarks/results/<date>_<device>.jsonl of the "
        "checkout, or of the current directory)",
    )
    ap.add_argument("--no-report", action="store_true", help="skip rendering .md/.png")
    return ap


@guarded("r2d2 bench")
def main(argv: list[str] | None = None) -> int:
    """Exit status: 2 when the command cannot run as given (no scripts folder, an --out
    that cannot be written), 1 when a script or the report failed, else 0."""
    args = _parser().parse_args(argv)
    try:
        bench_dir = find_benchmarks_dir()
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if args.out:
        if Path(args.out).is_dir():
            raise UsageError(
                f"--out {args.out}: is a folder; --out names the JSONL file of the rows"
            )
        check_out_dir(str(Path(args.out).parent), flag=f"--out {args.out}: its folder")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.out:
        out = Path(args.out)
    else:
        from r2d2.bench import harness

        out = harness.default_out_path(device)
    env = dict(os.environ)
    # one run id for every script of this suite: ratios pair rows of the same run only
    env.setdefault("R2D2_BENCH_RUN", f"bench-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    if device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")  # CPU triton paths run only in the interpreter
        if args.quick:
            # one thread per process: on a shared CI CPU, OpenMP threads spinning at barriers
            # against other jobs made the step 10-30x slower and its spread meaningless
            env.setdefault("OMP_NUM_THREADS", "1")
    # the scripts import r2d2 (r2d2.bench.harness): the one this command runs from, installed or not
    import r2d2

    pkg_root = str(Path(r2d2.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    failed, ran = [], []
    for script in SUITES[args.suite]:
        path = bench_dir / script
        if not path.is_file():
            print(f"[skip] {script}: not in {bench_dir}", file=sys.stderr)
            continue
        cmd = [sys.executable, str(path), "--device", device, "--out", str(out)]
        cmd += ["--quick"] if args.quick else []
        print(f"\n=== {script} ({device}{', quick' if args.quick else ''}) ===", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, env=env)
        print(f"=== {script}: exit {rc} in {time.perf_counter() - t0:.0f} s ===", flush=True)
        (failed if rc else ran).append(script)
    if ran and out.is_file() and not args.no_report:
        rc = subprocess.call([sys.executable, str(bench_dir / "report.py"), str(out)], env=env)
        failed += ["report.py"] if rc else []
    print(
        f"\nrows: {out}"
        + ("  (CPU figures: smoke only, not GPU results)" if device == "cpu" else "")
    )
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
