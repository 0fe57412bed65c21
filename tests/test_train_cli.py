"""``r2d2 pretrain`` / ``r2d2 finetune`` as users run them: bad data gives one clear line on stderr
(no traceback) and exit code 1, and a preset that names a multi-GPU strategy runs as one process
when started without torchrun (the README's base.yaml command)."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from r2d2.engine.train_cli import finetune, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--logging.progress=false",
        "--logging.tensorboard=false", "--logging.plot=false", "--train.eval_at_end=false"]


def _one_line_error(capsys, rc, needle):
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err
    return err


def test_missing_annotation_file_is_one_line(tmp_path, capsys):
    rc = pretrain([*TINY, "--out", str(tmp_path / "run"), "--data.format=jsonl",
                   f"--data.path={tmp_path / 'nope.jsonl'}"])
    _one_line_error(capsys, rc, f"data.path='{tmp_path / 'nope.jsonl'}' (data.format=jsonl): no such file")


def test_malformed_ccmb_line_is_one_line(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "icr.json").write_text(json.dumps({"image_path": "a.jpg", "text": "一张图"}) + "\n{broken\n",
                                       encoding="utf-8")
    rc = finetune([*TINY, "--out", str(tmp_path / "run"), "--train.task=retrieval", "--data.format=ccmb_icr",
                   f"--data.path={tmp_path / 'icr.json'}", "--train.max_steps=1"])
    _one_line_error(capsys, rc, f"{tmp_path / 'icr.json'}:2: not valid JSON")


def test_missing_shards_are_one_line(tmp_path, capsys):
    rc = pretrain([*TINY, "--out", str(tmp_path / "run"), "--data.format=webdataset",
                   f"--data.path={tmp_path}/shard-{{000..003}}.tar"])
    _one_line_error(capsys, rc, "4 of 4 shard files do not exist")


def test_readme_base_command_without_torchrun(tmp_path):
    # `r2d2 pretrain --config configs/base.yaml --out runs/base --train.max_steps=100000
    # --data.batch_size=128`: base.yaml sets distributed.strategy=ddp; without torchrun the run is
    # one process, and the preset's shards (data/shards/...) are named in one line, before any
    # ViT-B model is built
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "r2d2", "pretrain", "--config", "configs/base.yaml", "--out",
                        str(tmp_path / "base"), "--train.max_steps=100000", "--data.batch_size=128"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "r2d2 pretrain: data.path='data/shards/shard-{000000..000999}.tar': 1000 of 1000 shard files do "
        "not exist (first: data/shards/shard-000000.tar)"]


@pytest.mark.slow
def test_base_preset_runs_as_one_process_on_shards(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "shard-0.tar")) as w:
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
            w.write({"__key__": f"k{i}", "jpg": buf.getvalue(), "txt": f"第{i}张"})
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    # the base preset with a tiny model (ViT-B + RoBERTa-base do not fit a test): ddp, webdataset,
    # 8 workers in the preset -> one worker per shard here
    base = os.path.join(ROOT, "configs", "base.yaml")
    r = subprocess.run([sys.executable, "-m", "r2d2", "pretrain", "--config", base, "--out", str(tmp_path / "run"),
                        "--model.preset=tiny", f"--data.path={tmp_path}/shard-0.tar", "--data.num_workers=1", "--data.batch_size=8", "--data.max_text_len=16",
                        "--train.max_steps=2", "--train.log_every=1", "--train.precision=fp32",
                        "--train.eval_at_end=false", "--logging.progress=false", "--logging.tensorboard=false",
                        "--logging.plot=false", "--distributed.find_unused_parameters=true"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed.strategy=ddp needs several processes" in r.stdout
    rows = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    assert [x["step"] for x in rows] == [1, 2] and all(np.isfinite(x["loss"]) for x in rows)


@pytest.mark.parametrize("args, needle", [
    (["--optim.betas=[a,b]"], "optim.betas=['a', 'b'] must be two numbers"),
    (["--model.vision.layerz=2"], "model.vision.layerz is not a VisionConfig field"),
    (["--data.format=ccmb_foo", "--data.path=x"], "data.format='ccmb_foo' is not allowed"),
])
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
    rc = pretrain([*TINY[:-1], "--out", str(out), "--train.max_steps=1", "--data.batch_size=8",
                   "--data.synthetic_size=16", f"--data.eval_path={held}"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["n_images"] == 6 and report["n_texts"] == 6
    assert report["skip_reasons"] == {"missing_image": 1, "corrupt_image": 1} and report["skipped"] == 2
    assert "skipped 2 held-out pairs" in cap.out and "corrupt_image" in cap.out


def test_end_of_run_eval_without_a_held_out_set_says_why(tmp_path, capsys):
    Image.new("RGB", (16, 16), (9, 99, 199)).save(tmp_path / "a.png")
    ann = tmp_path / "train.jsonl"
    ann.write_text("\n".join(json.dumps({"image": "a.png", "text": f"图{i}"}) for i in range(8)), encoding="utf-8")
    out = tmp_path / "run"
    rc = pretrain([*TINY[:-1], "--out", str(out), "--train.max_steps=1", "--data.batch_size=4",
                   "--data.format=jsonl", f"--data.path={ann}"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    assert "no end-of-run evaluation: data.eval_path is not set" in cap.out
    assert not (out / "eval.json").exists() and (out / "model").is_dir()


@pytest.mark.parametrize("args, needle", [
    (["--data.vocab={tmp}/none.txt"], "data.vocab='{tmp}/none.txt': no such file"),
    (["--train.init_from={tmp}/none"], "train.init_from='{tmp}/none': no such file or directory"),
    (["--train.eval_at_end=true", "--data.eval_path={tmp}/none.jsonl"],
     "data.eval_path='{tmp}/none.jsonl': no such file"),
])
def test_missing_input_files_are_one_line_before_training(tmp_path, capsys, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = pretrain([*TINY, "--out", str(tmp_path / "run"), *args])
    _one_line_error(capsys, rc, needle.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_init_from_another_preset_is_one_line(tmp_path, capsys):
    from r2d2.engine.model import R2D2Model, model_preset

    cfg = model_preset("tiny")
    cfg.text.intermediate = 128  # another shape than tiny's
    R2D2Model(cfg).save_pretrained(str(tmp_path / "other"))
    rc = pretrain([*TINY, "--out", str(tmp_path / "run"), f"--train.init_from={tmp_path / 'other'}"])
    _one_line_error(capsys, rc, "the weights do not fit the model of the config")


def test_grad_accum_not_dividing_the_batch_is_a_config_error(tmp_path, capsys):
    rc = pretrain([*TINY, "--out", str(tmp_path / "run"), "--train.grad_accum=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "data.batch_size=32 is not divisible by train.grad_accum=3" in err, err
