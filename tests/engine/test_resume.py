"""Kill-and-resume exactness: a real ``r2d2 pretrain`` process killed with SIGKILL after a checkpoint
and resumed with ``--resume`` logs bitwise the same losses as an uninterrupted run (CPU,
deterministic mode), with dropout on (so the global RNG must be restored exactly where the killed
run saved it; the data loader must not draw from it). Also: checkpoint writers killed mid-save
leave the previous checkpoint and ``latest`` valid."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r2d2.engine.checkpoint import Checkpointer, TrainState
from r2d2.engine.observability import read_log

ROOT = str(Path(__file__).resolve().parents[2])
STEPS = 16
ARGS = [
    "--config",
    os.path.join(ROOT, "r2d2", "configs", "tiny.yaml"),
    f"--train.max_steps={STEPS}",
    "--train.checkpoint_every=3",
    "--train.log_every=1",
    "--train.deterministic=true",
    "--data.batch_size=8",
    "--data.synthetic_size=256",
    "--logging.progress=false",
    "--logging.tensorboard=false",
    "--logging.plot=false",
    "--train.eval_at_end=false",
    # dropout draws from the global RNG every step (BERT's default in base/large)
    "--model.text.dropout=0.1",
    "--model.vision.dropout=0.1",
]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return env


def _cmd(out, *extra):
    return [sys.executable, "-m", "r2d2", "pretrain", "--out", str(out), *ARGS, *extra]


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_log(os.path.join(out, "log.jsonl"))]


def _kill_and_resume(tmp_path, extra=(), min_rows=0):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = subprocess.run(
        _cmd(ref, *extra), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-2000:]

    proc = subprocess.Popen(
        _cmd(cut, *extra), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 900
    while not latest.exists() or len(_losses(cut)) < min_rows:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: only what is on disk survives
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(latest.read_text().strip()[len("step_") : -len(".pt")])
    done = len(_losses(cut))
    assert killed_at < STEPS and done < STEPS, "the run finished before it was killed"
    assert not (cut / "model").exists()

    res = subprocess.run(
        _cmd(cut, *extra, "--resume"),
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from step {killed_at}" in res.stdout + res.stderr
    want, got = _losses(ref), _losses(cut)
    assert [s for s, _ in got] == list(
        range(1, STEPS + 1)
    )  # rows after the checkpoint rewritten once
    assert got == want  # bitwise: JSON floats round-trip exactly
    return read_log(os.path.join(ref, "log.jsonl")), read_log(os.path.join(cut, "log.jsonl"))


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    _kill_and_resume(tmp_path)


def _write_shards(folder, n_shards=3, per_shard=30):
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"shard-{s}.tar")) as w:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                    buf, format="JPEG"
                )
                jpg = buf.getvalue() if i % 9 else b"corrupt"  # every ninth image cannot be decoded
                w.write({"__key__": f"s{s}_{i:03d}", "jpg": jpg, "txt": f"第{s}个分片的第{i}张图"})
    return str(folder / f"shard-{{0..{n_shards - 1}}}.tar")


@pytest.mark.slow
def test_sigkill_then_resume_webdataset_with_workers_and_accumulation(tmp_path):
    # streams: 2 DataLoader workers (the resumed loader must take the worker round robin where
    # the killed one stood), a shuffle buffer, corrupt samples, grad accumulation, several epochs
    urls = _write_shards(tmp_path)
    ref, cut = _kill_and_resume(
        tmp_path,
        [
            "--data.format=webdataset",
            f"--data.path={urls}",
            "--data.num_workers=2",
            "--data.shuffle_buffer=16",
            "--train.grad_accum=2",
            "--data.max_skip_rate=0.3",
        ],
        min_rows=4,
    )
    assert [r["skipped_decode"] for r in cut] == [r["skipped_decode"] for r in ref]
    assert ref[-1]["skipped_decode"] > 0 and ref[-1]["samples"] == STEPS * 8 > 90  # past one pass


def test_cli_refuses_to_overwrite_or_resume_nothing(tmp_path):
    r = subprocess.run(
        _cmd(tmp_path / "none", "--resume"), env=_env(), cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 2 and "--resume but" in r.stderr
    (tmp_path / "x" / "checkpoints").mkdir(parents=True)
    (tmp_path / "x" / "checkpoints" / "latest").write_text("step_000001.pt\n")
    r = subprocess.run(_cmd(tmp_path / "x"), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "already holds a run" in r.stderr


def test_checkpoint_files_are_pruned_and_restore_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    ck = Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        path = ck.save(model, opt, None, TrainState(step=step))
    after_save = torch.rand(3)  # the draw that follows the saved RNG state
    files = sorted(os.listdir(ck.dir))
    assert files == ["latest", "step_000002.pt", "step_000003.pt"]  # no .tmp left, oldest pruned
    assert ck.latest() == path
    torch.manual_seed(123)
    fresh = torch.nn.Linear(3, 2)
    state, _ = ck.load(path, fresh)
    assert state.step == 3
    assert torch.equal(torch.rand(3), after_save)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    (tmp_path / "checkpoints" / "latest").write_text("step_000009.pt\n")
    with pytest.raises(FileNotFoundError, match=r"step_000009\.pt, which does not exist"):
        ck.latest()


WRITER = r"""
import io, os, sys, torch
import r2d2.engine.checkpoint as C
out, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
opt = torch.optim.AdamW(model.parameters())
ck = C.Checkpointer(out, keep=3)
ck.save(model, opt, None, C.TrainState(step=1))
print("saved 1", flush=True)
with torch.no_grad():
    model.weight.add_(1.0)
if mode == "payload":      # die halfway through writing the checkpoint file
    real = torch.save
    def dying(obj, f):
        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os._exit(9)
    torch.save = dying
elif mode == "pointer":    # die after the file is complete, while moving `latest`
    real_replace = os.replace
    def dying_replace(src, dst):
        if os.path.basename(dst) == "latest":
            os._exit(9)
        real_replace(src, dst)
    os.replace = dying_replace
elif mode == "loop":       # a big checkpoint rewritten until the parent kills us
    model = torch.nn.Linear(2048, 2048)
    opt = torch.optim.AdamW(model.parameters())
step = 2
while True:
    ck.save(model, opt, None, C.TrainState(step=step))
    print("saved", step, flush=True)
    step += 1
"""


def _check_latest_is_valid(out, want_step=None):
    ck = Checkpointer(str(out), keep=3)  # a new run's checkpointer also clears stale .tmp files
    path = ck.latest()
    state, _ = ck.load(
        path,
        torch.nn.Linear(*torch.load(path, weights_only=False)["objective"]["weight"].shape[::-1]),
    )
    if want_step is not None:
        assert state.step == want_step
    assert not [f for f in os.listdir(ck.dir) if f.endswith(".tmp")]
    return state.step


@pytest.mark.parametrize("mode", ["payload", "pointer"])
def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_and_latest_valid(tmp_path, mode):
    r = subprocess.run(
        [sys.executable, "-c", WRITER, str(tmp_path), mode],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 9 and "saved 1" in r.stdout, r.stderr[-2000:]
    files = set(os.listdir(tmp_path / "checkpoints"))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000001.pt"
    if mode == "payload":  # the half-written file never got its final name
        assert "step_000002.pt.tmp" in files and "step_000002.pt" not in files
        assert os.path.getsize(tmp_path / "checkpoints" / "step_000002.pt.tmp") > 0
    else:  # the new file is complete, but `latest` still names the previous one
        assert "step_000002.pt" in files and "latest.tmp" in files
    _check_latest_is_valid(tmp_path, want_step=1)
    # the checkpoint holds the weights from before the failed save
    torch.manual_seed(0)
    before = torch.nn.Linear(64, 64)
    got = torch.load(tmp_path / "checkpoints" / "step_000001.pt", weights_only=False)["objective"]
    assert torch.equal(got["weight"], before.weight.detach())


def test_sigkill_at_a_random_moment_of_repeated_saves(tmp_path):
    import random

    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "loop"],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().startswith("saved 1")
    proc.stdout.readline()  # the first big save completed: from now on every phase can be hit
    time.sleep(random.uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _check_latest_is_valid(tmp_path) >= 2
