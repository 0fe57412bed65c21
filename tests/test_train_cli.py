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
