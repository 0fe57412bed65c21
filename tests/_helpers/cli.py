"""Running ``r2d2`` commands inside the test process, and the flags that keep a tiny run quiet."""

import os
import sys
from pathlib import Path

from r2d2 import cli

ROOT = str(Path(__file__).resolve().parents[2])
TINY = os.path.join(ROOT, "r2d2", "configs", "tiny.yaml")
QUIET = [
    "--logging.progress=false",
    "--logging.tensorboard=false",
    "--logging.plot=false",
    "--train.eval_at_end=false",
]
"""No progress bar, TensorBoard, plot or end-of-run evaluation: what the tests do not look at."""
R2D2 = [sys.executable, "-m", "r2d2"]
"""``r2d2`` as a subprocess of this interpreter."""
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TORCHRUN += ["-m", "r2d2"]
"""``r2d2`` under torchrun, two processes on this machine."""


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``r2d2 ARGV`` in this process: (status, stderr stripped, stdout); argparse's own exit
    counts as its status."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.err.strip(), out.out


def one_line(err: str) -> str:
    """``err`` is one line without a traceback (the CLI's error contract); returns it."""
    assert err and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err
