"""The benchmarks behind ``r2d2 bench``: the shared harness (:mod:`r2d2.bench.harness`), one
script per op (``bench_<op>.py``), the training step and scaling runs, and ``report.py`` (the
table and plot). Each script runs on its own (``python -m r2d2.bench.bench_distill_kl``);
``benchmarks/`` at the top of a checkout keeps entry points at the old paths and the results."""
