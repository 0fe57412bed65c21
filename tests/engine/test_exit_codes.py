"""One exit-status rule for every ``r2d2`` command (issue 17 item 13; docs/training.md, "Exit
status"): 0 success; 2 the command cannot run as given (usage, config, an input it names that
does not exist, an ``--out`` that cannot be written), found before any work; 1 the run started
and failed. Each failure is one line on stderr unless ``R2D2_DEBUG=1``."""

import pytest
import torch

from _helpers.cli import QUIET, TINY, one_line, run_cli


@pytest.mark.parametrize("cmd", ["pretrain", "finetune"])
def test_training_usage_errors_exit_2(tmp_path, capsys, cmd):
    out = ["--out", str(tmp_path / "run")] + (
        [] if cmd == "pretrain" else ["--train.task=retrieval"]
    )
    rc, err, _ = run_cli(capsys, cmd, "--config", str(tmp_path / "none.yaml"), *out)
    assert (
        rc == 2 and one_line(err) == f"r2d2 {cmd}: --config: no such file {tmp_path / 'none.yaml'}"
    )
    rc, err, _ = run_cli(capsys, cmd, "--config", TINY, *out, "--optim.lr=abc")
    assert rc == 2 and "optim.lr='abc' has the wrong type" in one_line(err)
    rc, err, _ = run_cli(capsys, cmd, "--config", TINY, *out, "--nosuch")
    assert rc == 2 and "unrecognised argument '--nosuch'" in one_line(err)
    rc, err, _ = run_cli(
        capsys,
        cmd,
        "--config",
        TINY,
        *out,
        *QUIET,
        "--data.format=jsonl",
        f"--data.path={tmp_path / 'none.jsonl'}",
    )
    assert rc == 2 and "(data.format=jsonl): no such file" in one_line(err)  # was 1
    rc, err, _ = run_cli(capsys, cmd, "--config", TINY)  # --out is required: argparse
    assert rc == 2
    wrong = "--train.task=retrieval" if cmd == "pretrain" else "--train.task=pretrain"
    rc, err, _ = run_cli(capsys, cmd, "--config", TINY, "--out", str(tmp_path / "run"), wrong)
    assert rc == 2 and "train.task" in one_line(err)


def test_training_run_time_failure_exits_1(tmp_path, capsys):
    # every line of the annotation file is broken: found while running, a run-time failure
    (tmp_path / "bad.jsonl").write_text("{broken\n" * 20, encoding="utf-8")
    rc, err, _ = run_cli(
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
    assert rc == 1 and one_line(err).startswith("r2d2 pretrain: ")


def test_r2d2_debug_keeps_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("R2D2_DEBUG", "1")
    rc, err, _ = run_cli(
        capsys, "pretrain", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")
    )
    assert (
        rc == 2
        and "Traceback" in err
        and err.splitlines()[-1].startswith("r2d2 pretrain: --config")
    )


def test_eval_exit_statuses(tmp_path, capsys):
    from r2d2.engine.model import R2D2Model, model_preset

    rc, err, _ = run_cli(
        capsys, "eval", "retrieval", "--checkpoint", str(tmp_path), "--retrieval.k=0"
    )
    assert rc == 2  # a bad override: argparse's error
    rc, err, _ = run_cli(
        capsys,
        "eval",
        "retrieval",
        "--checkpoint",
        str(tmp_path / "none"),
        "--data.format=synthetic",
    )
    assert rc == 2 and "no such folder" in one_line(err)
    torch.manual_seed(0)
    R2D2Model(model_preset("tiny")).save_pretrained(str(tmp_path / "model"))
    rc, err, _ = run_cli(
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
    assert rc == 2 and f"data.path='{tmp_path / 'none.json'}': no such file or folder" in one_line(
        err
    )
    (tmp_path / "icr.json").write_text("{broken\n", encoding="utf-8")
    rc, err, _ = run_cli(
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
    assert rc == 1 and "icr.json:1: not valid JSON" in one_line(err)
    (tmp_path / "f").write_text("x")
    rc, err, _ = run_cli(
        capsys,
        "eval",
        "retrieval",
        "--checkpoint",
        str(tmp_path / "model"),
        "--data.format=synthetic",
        "--out",
        str(tmp_path / "f" / "e"),
    )
    assert rc == 2 and "--out" in one_line(err)


def test_bench_doctor_convert_and_the_router(tmp_path, capsys):
    assert run_cli(capsys, "bench", "nosuchsuite")[0] == 2
    (tmp_path / "f").write_text("x")
    rc, err, _ = run_cli(capsys, "bench", "kernels", "--out", str(tmp_path / "f" / "rows.jsonl"))
    assert rc == 2 and "is not a folder" in one_line(err)
    assert run_cli(capsys, "doctor", "--bogus")[0] == 2  # was 0: the argument was ignored
    rc, err, _ = run_cli(
        capsys, "convert", "official", str(tmp_path / "none.pth"), str(tmp_path / "out")
    )
    assert rc == 2 and "no such checkpoint" in one_line(err)  # was 1
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    rc, err, _ = run_cli(
        capsys, "convert", "official", str(tmp_path / "junk.pth"), str(tmp_path / "out")
    )
    assert rc == 1 and one_line(err).startswith("r2d2 convert: ")  # was a traceback
    assert run_cli(capsys, "nosuchcommand")[0] == 2
    assert run_cli(capsys, "--version")[0] == 0


def test_bench_device_name_says_thread_in_the_singular(one_thread):
    # issue 17 item 14: "1 threads"
    from r2d2.bench import harness

    harness.device_name.cache_clear()  # cached per process; other tests ran with more threads
    assert harness.device_name("cpu").endswith(", 1 thread)")
