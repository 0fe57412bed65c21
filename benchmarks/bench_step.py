"""Entry point at the old path: the script is r2d2/bench/bench_step.py (inside the package, so that
`r2d2 bench` works from an installed package). `python benchmarks/bench_step.py ...` runs it;
importing this module gives that module."""

import importlib
import runpy
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the checkout's r2d2 importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":
    runpy.run_module("r2d2.bench.bench_step", run_name="__main__", alter_sys=True)
else:
    sys.modules[__name__] = importlib.import_module("r2d2.bench.bench_step")
