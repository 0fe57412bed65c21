"""``r2d2 pretrain`` / ``r2d2 finetune`` as users run them: an input that does not exist gives one
clear line on stderr (no traceback) and exit code 2 before anything runs, bad data one line and
exit code 1, and a preset that names a multi-GPU strategy runs as one process
when started without torchrun (the README's base.yaml command)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r2d2.cli.train import finetune, pretrain

ROOT = str(Path(__file__).resolve().parents[2])
TINY = [
    "--config",
    os.path.join(ROOT, "r2d2", "configs", "tiny.yaml"),
    "--logging.progress=false",
    "--logging.tensorboard=false",
    "--logging.plot=false",
    "--train.eval_at_end=false",
]


def _one_line_error(capsys, rc, needle, code=1):
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err
    return err


def test_missing_annotation_file_is_one_line(tmp_path, capsys):
    rc = pretrain(
        [
            *TINY,
            "--out",
            str(tmp_path / "run"),
            "--data.format=jsonl",
            f"--data.path={tmp_path / 'nope.jsonl'}",
        ]
    )
    _one_line_error(
        capsys, rc, f"data.path='{tmp_path / 'nope.jsonl'}' (data.format=jsonl): no such file", 2
    )


def test_malformed_ccmb_line_is_one_line(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "icr.json").write_text(
        json.dumps({"image_path": "a.jpg", "text": "一张图"}) + "\n{broken\n", encoding="utf-8"
    )
    rc = finetune(
        [
            *TINY,
            "--out",
            str(tmp_path / "run"),
            "--train.task=retrieval",
            "--data.format=ccmb_icr",
            f"--data.path={tmp_path / 'icr.json'}",
            "--train.max_steps=1",
        ]
    )
    _one_line_error(capsys, rc, f"{tmp_path / 'icr.json'}:2: not valid JSON")


def test_missing_shards_are_one_line(tmp_path, capsys):
    rc = pretrain(
        [
            *TINY,
            "--out",
            str(tmp_path / "run"),
            "--data.format=webdataset",
            f"--data.path={tmp_path}/shard-{{000..003}}.tar",
        ]
    )
    _one_line_error(capsys, rc, "4 of 4 shard files do not exist", 2)


def test_readme_base_command_without_torchrun(tmp_path):
    # `r2d2 pretrain --config configs/base.yaml --out runs/base --train.max_steps=100000
    # --data.batch_size=128`: base.yaml sets distributed.strategy=ddp; without torchrun the run is
    # one process, and the preset's shards (data/shards/...) are named in one line, before any
    # ViT-B model is built
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "r2d2",
            "pretrain",
            "--config",
            "configs/base.yaml",
            "--out",
            str(tmp_path / "base"),
            "--train.max_steps=100000",
            "--data.batch_size=128",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "r2d2 pretrain: data.path='data/shards/shard-{000000..000999}.tar': 1000 of 1000 shard files do "
        "not exist (first: data/shards/shard-000000.tar)"
    ]


@pytest.mark.slow
def test_base_preset_runs_as_one_process_on_shards(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "shard-0.tar")) as w:
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                buf, format="JPEG"
            )
            w.write({"__key__": f"k{i}", "jpg": buf.getvalue(), "txt": f"第{i}张"})
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    # the base preset with a tiny model (ViT-B + RoBERTa-base do not fit a test): ddp, webdataset,
    # 8 workers in the preset -> one worker per shard here
    base = os.path.join(ROOT, "r2d2", "configs", "base.yaml")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "r2d2",
            "pretrain",
            "--config",
            base,
            "--out",
            str(tmp_path / "run"),
            "--model.preset=tiny",
            f"--data.path={tmp_path}/shard-0.tar",
            "--data.num_workers=1",
            "--data.batch_size=8",
            "--data.max_text_len=16",
            "--train.max_steps=2",
            "--train.log_every=1",
            "--train.precision=fp32",
            "--train.eval_at_end=false",
            "--logging.progress=false",
            "--logging.tensorboard=false",
            "--logging.plot=false",
            "--distributed.find_unused_parameters=true",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed.strategy=ddp needs several processes" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2] and all(np.isfinite(x["loss"]) for x in rows)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--optim.betas=[a,b]"], "optim.betas=['a', 'b'] must be two numbers"),
        (["--model.vision.layerz=2"], "model.vision.layerz is not a VisionConfig field"),
        (["--data.format=ccmb_foo", "--data.path=x"], "data.format='ccmb_foo' is not allowed"),
    ],
)
def test_config_errors_are_one_line_exit_2(tmp_path, capsys, args, needle):
    rc = pretrain(["--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err


def _held_out(tmp_path, n=6, corrupt=1):
    """A jsonl held-out set: n decodable images (distinct colours), then `corrupt` files that are
    present but do not decode."""
    lines = []
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 255 - 40 * i, 7 * i)).save(tmp_path / f"h{i}.png")
        lines.append({"image": f"h{i}.png", "text": f"第{i}张"})
    for j in range(corrupt):
        (tmp_path / f"bad{j}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        lines.append({"image": f"bad{j}.jpg", "text": f"坏{j}"})
    lines.append({"image": "gone.jpg", "text": "没有"})
    path = tmp_path / "held.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    return path


def test_end_of_run_eval_skips_and_counts_undecodable_images(tmp_path, capsys):
    held = _held_out(tmp_path)
    out = tmp_path / "run"
    rc = pretrain(
        [
            *TINY[:-1],
            "--out",
            str(out),
            "--train.max_steps=1",
            "--data.batch_size=8",
            "--data.synthetic_size=16",
            f"--data.eval_path={held}",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["n_images"] == 6 and report["n_texts"] == 6
    assert (
        report["skip_reasons"] == {"missing_image": 1, "corrupt_image": 1}
        and report["skipped"] == 2
    )
    assert "skipped 2 held-out pairs" in cap.out and "corrupt_image" in cap.out


def test_end_of_run_eval_without_a_held_out_set_says_why(tmp_path, capsys):
    Image.new("RGB", (16, 16), (9, 99, 199)).save(tmp_path / "a.png")
    ann = tmp_path / "train.jsonl"
    ann.write_text(
        "\n".join(json.dumps({"image": "a.png", "text": f"图{i}"}) for i in range(8)),
        encoding="utf-8",
    )
    out = tmp_path / "run"
    rc = pretrain(
        [
            *TINY[:-1],
            "--out",
            str(out),
            "--train.max_steps=1",
            "--data.batch_size=4",
            "--data.format=jsonl",
            f"--data.path={ann}",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    assert "no end-of-run evaluation: data.eval_path is not set" in cap.out
    assert not (out / "eval.json").exists() and (out / "model").is_dir()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data.vocab={tmp}/none.txt"], "data.vocab='{tmp}/none.txt': no such file"),
        (
            ["--train.init_from={tmp}/none"],
            "train.init_from='{tmp}/none': no such file or directory",
        ),
        (
            ["--train.eval_at_end=true", "--data.eval_path={tmp}/none.jsonl"],
            "data.eval_path='{tmp}/none.jsonl': no such file",
        ),
    ],
)
def test_missing_input_files_are_one_line_before_training(tmp_path, capsys, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = pretrain([*TINY, "--out", str(tmp_path / "run"), *args])
    _one_line_error(capsys, rc, needle.replace("{tmp}", str(tmp_path)), 2)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_init_from_another_preset_is_one_line(tmp_path, capsys):
    from r2d2.engine.model import R2D2Model, model_preset

    cfg = model_preset("tiny")
    cfg.text.intermediate = 128  # another shape than tiny's
    R2D2Model(cfg).save_pretrained(str(tmp_path / "other"))
    rc = pretrain(
        [*TINY, "--out", str(tmp_path / "run"), f"--train.init_from={tmp_path / 'other'}"]
    )
    _one_line_error(capsys, rc, "the weights do not fit the model of the config")


def test_grad_accum_not_dividing_the_batch_is_a_config_error(tmp_path, capsys):
    rc = pretrain([*TINY, "--out", str(tmp_path / "run"), "--train.grad_accum=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "data.batch_size=32 is not divisible by train.grad_accum=3" in err, err


def test_data_path_over_the_synthetic_preset_is_not_ignored(tmp_path, capsys):
    # issue 17 item 3: tiny.yaml is synthetic; --data.path used to be ignored (exit 0 after
    # training on the synthetic set). The format comes from the path, and the run says so.
    rc = pretrain(
        [
            *TINY,
            "--out",
            str(tmp_path / "run"),
            f"--data.path={tmp_path / 'train.jsonl'}",
            "--train.max_steps=1",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert f"data.format=jsonl (inferred from --data.path='{tmp_path / 'train.jsonl'}'" in cap.out
    assert cap.err.strip() == (
        f"r2d2 pretrain: data.path='{tmp_path / 'train.jsonl'}' (data.format=jsonl): no such file"
    )


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_out_that_cannot_be_written_is_one_line_before_the_model(
    tmp_path, capsys, monkeypatch, where
):
    # issue 17 item 10: a 20-line traceback used to come after the model was built
    import r2d2.engine.trainer as trainer_mod

    (tmp_path / "f").write_text("x")
    out = {
        "a file": tmp_path / "f",
        "under a file": tmp_path / "f" / "run",
        "read-only": tmp_path / "ro" / "run",
    }[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir(mode=0o555)
        if os.geteuid() == 0:  # root writes through permission bits: a read-only file system, then
            import errno
            import tempfile

            def erofs(*a, **k):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

            monkeypatch.setattr(tempfile, "mkstemp", erofs)
    monkeypatch.setattr(trainer_mod.Trainer, "__init__", lambda *a, **k: pytest.fail("model built"))
    rc = pretrain([*TINY, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"r2d2 pretrain: --out {out}: ") and (
        "not a folder" in err or "cannot write" in err
    ), err


def test_demo_hint_only_when_the_presets_own_init_from_is_missing(tmp_path, capsys, monkeypatch):
    # issue 17 item 14: "run bash scripts/demo.sh first" was printed for any missing init_from
    monkeypatch.chdir(tmp_path)  # runs/demo/model (relative) does not exist here
    ft = [
        a
        if not a.endswith("tiny.yaml")
        else os.path.join(ROOT, "r2d2", "configs", "finetune_tiny.yaml")
        for a in TINY
    ]
    rc = finetune([*ft, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert (
        rc == 2
        and "train.init_from='runs/demo/model': no such file" in err
        and "scripts/demo.sh" in err
    ), err
    rc = finetune([*ft, "--out", str(tmp_path / "b"), f"--train.init_from={tmp_path / 'mine'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"train.init_from='{tmp_path / 'mine'}': no such file" in err, err
    assert "demo.sh" not in err and len(err.splitlines()) == 1


@pytest.mark.usefixtures("one_thread")
def test_finetune_says_what_it_loaded_and_heads_its_eval_by_what_it_is(tmp_path, capsys):
    # issue 17 item 14: nothing said init_from was loaded; the block was headed "zero-shot retrieval"
    from r2d2.engine.model import R2D2Model, model_preset

    R2D2Model(model_preset("tiny")).save_pretrained(str(tmp_path / "init"))
    ft = [
        a
        if not a.endswith("tiny.yaml")
        else os.path.join(ROOT, "r2d2", "configs", "finetune_tiny.yaml")
        for a in TINY[:-1]
    ]
    rc = finetune(
        [
            *ft,
            "--out",
            str(tmp_path / "run"),
            f"--train.init_from={tmp_path / 'init'}",
            "--train.max_steps=1",
            "--data.batch_size=8",
            "--data.synthetic_size=16",
            "--data.synthetic_eval_size=8",
            "--train.checkpoint_every=0",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    assert f"initialised from train.init_from={tmp_path / 'init'}" in cap.out
    assert "retrieval after retrieval fine-tuning on 8 held-out images" in cap.out
    assert "zero-shot" not in cap.out
    assert (
        json.loads((tmp_path / "run" / "eval.json").read_text())["evaluation"]
        == "retrieval after retrieval fine-tuning"
    )


def _wds_shards(tmp_path, n_shards=2, per_shard=8):
    import webdataset as wds

    rng = np.random.default_rng(0)
    for s in range(n_shards):
        with wds.TarWriter(str(tmp_path / f"shard-{s}.tar")) as w:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
                    buf, format="JPEG"
                )
                w.write({"__key__": f"s{s}_{i}", "jpg": buf.getvalue(), "txt": f"第{s}{i}张"})
    return f"{tmp_path}/shard-{{0..{n_shards - 1}}}.tar"


@pytest.mark.usefixtures("one_thread")
def test_truncated_shards_are_in_the_log_row(tmp_path, capsys, caplog):
    # issue 17 item 6: a shard truncated mid-file lost samples with skipped=0 and nothing in the log
    urls = _wds_shards(tmp_path)
    data = (tmp_path / "shard-0.tar").read_bytes()
    (tmp_path / "shard-0.tar").write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    rc = pretrain(
        [
            *TINY,
            "--out",
            str(out),
            f"--data.path={urls}",
            "--data.shuffle_buffer=0",
            "--data.batch_size=4",
            "--train.max_steps=4",
            "--train.log_every=1",
            "--train.checkpoint_every=0",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert (
        rows[-1]["truncated_shards"] >= 1
        and rows[0]["truncated_shards"] <= rows[-1]["truncated_shards"]
    )
    assert all(r["skipped"] == 0 and "truncated_shard" not in r["skip_reasons"] for r in rows)
    assert "shard-0.tar is damaged" in caplog.text  # the r2d2 command prints it on stderr
