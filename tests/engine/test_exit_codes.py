"""One exit-status rule for every ``r2d2`` command (issue 17 item 13; docs/training.md, "Exit
status"): 0 success; 2 the command cannot run as given (usage, config, an input it names that
does not exist, an ``--out`` that cannot be written), found before any work; 1 the run started
and failed. Each failure is one line on stderr unless ``R2D2_DEBUG=1``."""

import os
from pathlib import Path

import pytest
import torch

from r2d2 import cli

ROOT = str(Path(__file__).resolve().parents[2])
TINY = os.path.join(ROOT, "r2d2", "configs", "tiny.yaml")
QUIET = [
    "--logging.progress=false",
    "--logging.tensorboard=false",
    "--logging.plot=false",
    "--train.eval_at_end=false",
]


def _run(capsys, *argv):
    """``r2d2 ARGV`` in this process: (status, stderr); argparse's own exit counts as its status."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err.strip()


def _one_line(err):
    assert err and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("cmd", ["pretrain", "finetune"])
def test_training_usage_errors_exit_2(tmp_path, capsys, cmd):
    out = ["--out", str(tmp_path / "run")] + (
        [] if cmd == "pretrain" else ["--train.task=retrieval"]
    )
    rc, err = _run(capsys, cmd, "--config", str(tmp_path / "none.yaml"), *out)
    assert (
        rc == 2 and _one_line(err) == f"r2d2 {cmd}: --config: no such file {tmp_path / 'none.yaml'}"
    )
    rc, err = _run(capsys, cmd, "--config", TINY, *out, "--optim.lr=abc")
    assert rc == 2 and "optim.lr='abc' has the wrong type" in _one_line(err)
    rc, err = _run(capsys, cmd, "--config", TINY, *out, "--nosuch")
    assert rc == 2 and "unrecognised argument '--nosuch'" in _one_line(err)
    rc, err = _run(
        capsys,
        cmd,
        "--config",
        TINY,
        *out,
        *QUIET,
        "--data.format=jsonl",
        f"--data.path={tmp_path / 'none.jsonl'}",
    )
    assert rc == 2 and "(data.format=jsonl): no such file" in _one_line(err)  # was 1
    rc, err = _run(capsys, cmd, "--config", TINY)  # --out is required: argparse
    assert rc == 2
    wrong = "--train.task=retrieval" if cmd == "pretrain" else "--train.task=pretrain"
    rc, err = _run(capsys, cmd, "--config", TINY, "--out", str(tmp_path / "run"), wrong)
    assert rc == 2 and "train.task" in _one_line(err)


def test_training_run_time_failure_exits_1(tmp_path, capsys):
    # every line of the annotation file is broken: found while running, a run-time failure
    (tmp_path / "bad.jsonl").write_text("{broken\n" * 20, encoding="utf-8")
    rc, err = _run(
        capsys,
        "pretrain",
        "--config",
        TINY,
        "--out",
        str(tmp_path / "run"),
        *QUIET,
        "--data.format=jsonl",
        f"--data.path={tmp_path / 'bad.jsonl'}",
    )
    assert rc == 1 and _one_line(err).startswith("r2d2 pretrain: ")


def test_r2d2_debug_keeps_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("R2D2_DEBUG", "1")
    rc, err = _run(
        capsys, "pretrain", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")
    )
    assert (
        rc == 2
        and "Traceback" in err
        and err.splitlines()[-1].startswith("r2d2 pretrain: --config")
    )


def test_eval_exit_statuses(tmp_path, capsys):
    from r2d2.engine.model import R2D2Model, model_preset

    rc, err = _run(capsys, "eval", "retrieval", "--checkpoint", str(tmp_path), "--retrieval.k=0")
    assert rc == 2  # a bad override: argparse's error
    rc, err = _run(
        capsys,
        "eval",
        "retrieval",
        "--checkpoint",
        str(tmp_path / "none"),
        "--data.format=synthetic",
    )
    assert rc == 2 and "no such folder" in _one_line(err)
    torch.manual_seed(0)
    R2D2Model(model_preset("tiny")).save_pretrained(str(tmp_path / "model"))
    rc, err = _run(
        capsys,
        "eval",
        "retrieval",
        "--checkpoint",
        str(tmp_path / "model"),
        "--data.format=icr",
        f"--data.path={tmp_path / 'none.json'}",
        "--out",
        str(tmp_path / "e"),
    )
    assert rc == 2 and f"data.path='{tmp_path / 'none.json'}': no such file or folder" in _one_line(
        err
    )
    (tmp_path / "icr.json").write_text("{broken\n", encoding="utf-8")
    rc, err = _run(
        capsys,
        "eval",
        "retrieval",
        "--checkpoint",
        str(tmp_path / "model"),
        "--data.format=icr",
        f"--data.path={tmp_path / 'icr.json'}",
        "--out",
        str(tmp_path / "e"),
    )
    assert rc == 1 and "icr.json:1: not valid JSON" in _one_line(err)
    (tmp_path / "f").write_text("x")
    rc, err = _run(
        capsys,
        "eval",
        "retrieval",
        "--checkpoint",
        str(tmp_path / "model"),
        "--data.format=synthetic",
        "--out",
        str(tmp_path / "f" / "e"),
    )
    assert rc == 2 and "--out" in _one_line(err)


def test_bench_doctor_convert_and_the_router(tmp_path, capsys):
    assert _run(capsys, "bench", "nosuchsuite")[0] == 2
    (tmp_path / "f").write_text("x")
    rc, err = _run(capsys, "bench", "kernels", "--out", str(tmp_path / "f" / "rows.jsonl"))
    assert rc == 2 and "is not a folder" in _one_line(err)
    assert _run(capsys, "doctor", "--bogus")[0] == 2  # was 0: the argument was ignored
    rc, err = _run(capsys, "convert", "official", str(tmp_path / "none.pth"), str(tmp_path / "out"))
    assert rc == 2 and "no such checkpoint" in _one_line(err)  # was 1
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    rc, err = _run(capsys, "convert", "official", str(tmp_path / "junk.pth"), str(tmp_path / "out"))
    assert rc == 1 and _one_line(err).startswith("r2d2 convert: ")  # was a traceback
    assert _run(capsys, "nosuchcommand")[0] == 2
    assert _run(capsys, "--version")[0] == 0


def test_bench_device_name_says_thread_in_the_singular(one_thread):
    # issue 17 item 14: "1 threads"
    from r2d2.bench import harness

    harness.device_name.cache_clear()  # cached per process; other tests ran with more threads
    assert harness.device_name("cpu").endswith(", 1 thread)")
