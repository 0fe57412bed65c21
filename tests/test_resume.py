"""Kill-and-resume exactness: a real ``r2d2 pretrain`` process killed with SIGKILL after a checkpoint
and resumed with ``--resume`` logs bitwise the same losses as an uninterrupted run (CPU,
deterministic mode). Also: atomic checkpoint files and the ``latest`` pointer."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from r2d2.engine.checkpoint import Checkpointer, TrainState
from r2d2.engine.observability import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
ARGS = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"--train.max_steps={STEPS}",
        "--train.checkpoint_every=3", "--train.log_every=1", "--train.deterministic=true",
        "--data.batch_size=8", "--data.synthetic_size=256", "--logging.progress=false",
        "--logging.tensorboard=false", "--logging.plot=false", "--train.eval_at_end=false"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return env


def _cmd(out, *extra):
    return [sys.executable, "-m", "r2d2", "pretrain", "--out", str(out), *ARGS, *extra]


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_log(os.path.join(out, "log.jsonl"))]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cmd(ref), check=True, env=_env(), cwd=ROOT, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(cut), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not latest.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: only what is on disk survives
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(latest.read_text().strip()[len("step_"):-len(".pt")])
    done = len(_losses(cut))
    assert killed_at < STEPS and done < STEPS, "the run finished before it was killed"
    assert not (cut / "model").exists()

    res = subprocess.run(_cmd(cut, "--resume"), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from step {killed_at}" in res.stdout + res.stderr
    want, got = _losses(ref), _losses(cut)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # rows after the checkpoint rewritten once
    assert got == want  # bitwise: JSON floats round-trip exactly


def test_cli_refuses_to_overwrite_or_resume_nothing(tmp_path):
    r = subprocess.run(_cmd(tmp_path / "none", "--resume"), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--resume but" in r.stderr
    (tmp_path / "x" / "checkpoints").mkdir(parents=True)
    (tmp_path / "x" / "checkpoints" / "latest").write_text("step_000001.pt\n")
    r = subprocess.run(_cmd(tmp_path / "x"), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "already holds a run" in r.stderr


def test_checkpoint_files_are_atomic_and_pruned(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    ck = Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        path = ck.save(model, opt, None, TrainState(step=step))
    after_save = torch.rand(3)  # the draw that follows the saved RNG state
    files = sorted(os.listdir(ck.dir))
    assert files == ["latest", "step_000002.pt", "step_000003.pt"]  # no .tmp left, oldest pruned
    assert ck.latest() == path
    # a crash mid-write leaves only a .tmp: `latest` still names the last complete file
    (tmp_path / "checkpoints" / "step_000004.pt.tmp").write_bytes(b"partial")
    assert ck.latest() == path
    torch.manual_seed(123)
    fresh = torch.nn.Linear(3, 2)
    state, _ = ck.load(path, fresh)
    assert state.step == 3
    assert torch.equal(torch.rand(3), after_save)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    (tmp_path / "checkpoints" / "latest").write_text("step_000009.pt\n")
    with pytest.raises(FileNotFoundError, match="step_000009.pt, which does not exist"):
        ck.latest()
