"""Text-to-image through the engine and the commands: the R-precision / attribute / palette
metrics on hand-made cases, exact kill-and-resume of a t2i run (EMA included) with its end-of-run
evaluation, ``r2d2 generate`` and ``r2d2 eval t2i`` (files written, one-line errors)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _helpers.cli import ROOT, TORCHRUN, run_cli
from _helpers.t2i import PROMPTS, small_generator
from r2d2.engine.checkpoint import load_weights
from r2d2.engine.data.synthetic import attributes, caption, read_synthetic, render
from r2d2.engine.data.transforms import to_tensor
from r2d2.engine.tasks.t2i.metrics import (
    attribute_agreement,
    candidate_sets,
    palette_background_accuracy,
    r_precision,
    synthetic_attributes,
)


# ------------------------------------------------------------------------------------ metrics
def _orthonormal(n, dim=None):
    q, _ = torch.linalg.qr(torch.randn(dim or n, n))
    return q.t()[:n]  # [n, dim], rows orthonormal


def test_candidate_sets_follow_the_100_candidate_rule():
    targets = list(range(0, 150, 7))
    sets = candidate_sets(targets, 150, 100, seed=1)
    for t, c in zip(targets, sets):
        assert c[0] == t and len(c) == 100 and len(set(c)) == 100 and all(0 <= j < 150 for j in c)
    small = candidate_sets([3], 30, 100)[0]  # a pool under 100: every prompt is a candidate
    assert sorted(small) == list(range(30)) and small[0] == 3
    assert candidate_sets(targets, 150, 100, seed=1) == sets  # seeded


def test_r_precision_on_known_cases():
    torch.manual_seed(0)
    text = _orthonormal(100, 128)
    cands = candidate_sets(list(range(100)), 100, 100)
    rp, chance, top = r_precision(text.clone(), text, cands)  # image i is prompt i's embedding
    assert rp == 1.0 and chance == pytest.approx(0.01) and top == list(range(100))
    perm = torch.randperm(100)
    perm = torch.where(perm == torch.arange(100), (perm + 1) % 100, perm)  # no fixed point
    rp, _, top = r_precision(text[perm], text, cands)
    assert rp == 0.0 and top == perm.tolist()
    const = torch.nn.functional.normalize(torch.ones(100, 128), dim=-1)
    rp, chance, _ = r_precision(const, text, cands)  # all tied: ties share the hit -> chance
    assert rp == pytest.approx(chance)
    pool = _orthonormal(30, 64)
    rp, chance, _ = r_precision(pool[:5], pool, candidate_sets(list(range(5)), 30, 100))
    assert rp == 1.0 and chance == pytest.approx(1 / 30)


def test_attribute_agreement_and_palette_background():
    recs = read_synthetic(60, "eval", 0).records
    pool = list(dict.fromkeys(r.text for r in recs))
    assert all(synthetic_attributes(p) for p in pool) and synthetic_attributes("一只猫") is None
    cands = candidate_sets(list(range(10)), len(pool), 20)
    own = attribute_agreement(pool[:10], pool, cands, top=list(range(10)))
    assert all(v["top1"] == 1.0 and 0 < v["chance"] < 1 for v in own.values())
    wrong_bg = [
        next(j for j in c if synthetic_attributes(pool[j])[0] != synthetic_attributes(pool[i])[0])
        for i, c in enumerate(cands)
    ]
    assert attribute_agreement(pool[:10], pool, cands, wrong_bg)["background"]["top1"] == 0.0
    assert attribute_agreement(["一只猫"], ["一只猫"], [[0]], [0]) is None
    imgs = [render(attributes(0, "eval", i), 32) for i in range(40)]
    prompts = [caption(attributes(0, "eval", i)) for i in range(40)]
    x = torch.stack([to_tensor(im) for im in imgs])
    assert palette_background_accuracy(x, prompts) == 1.0
    assert palette_background_accuracy(x, prompts[1:] + prompts[:1]) < 0.5


# ------------------------------------------------------------------------------------ training
STEPS = 8
TRAIN = [
    "--config",
    os.path.join(ROOT, "r2d2", "configs", "t2i_tiny.yaml"),
    "--train.init_from=",
    f"--train.max_steps={STEPS}",
    "--train.checkpoint_every=3",
    "--train.log_every=1",
    "--train.deterministic=true",
    "--data.batch_size=4",
    "--data.image_size=16",
    "--data.synthetic_size=64",
    "--data.synthetic_eval_size=40",
    "--t2i.block_out_channels=[8,16]",
    "--t2i.attention_levels=[false,true]",
    "--t2i.norm_groups=4",
    "--t2i.cross_dim=16",
    "--t2i.cond_dropout=0.5",  # both branches of the dropout draw in 8 steps
    "--t2i.ema_decay=0.9",
    "--logging.progress=false",
    "--logging.tensorboard=false",
    "--logging.plot=false",
]
EVAL = [
    "--t2i.steps=2",
    "--t2i.eval_prompts=6",
    "--t2i.eval_candidates=5",
    "--t2i.grid_prompts=2",
    "--t2i.grid_per_prompt=2",
]


def _finetune(out, *extra):
    return [sys.executable, "-m", "r2d2", "finetune", "--out", str(out), *TRAIN, *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _rows(out):
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


@pytest.mark.slow  # about 100 s on 2 loaded cores: two runs and a resume
def test_t2i_run_killed_and_resumed_matches_the_uninterrupted_run(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = subprocess.run(
        _finetune(ref, "--train.eval_at_end=true", *EVAL),
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # the end-of-run evaluation: the three image sets, the grid, the exported generator
    rep = json.loads((ref / "t2i_eval.json").read_text())
    assert {"generated", "unconditional", "real"} <= set(rep) and rep["n_prompts"] == 6
    assert rep["chance_r_precision"] == pytest.approx(20.0)
    assert "skipped" in rep["fid_is"]
    assert (ref / "grid.png").exists() and (ref / "grid.txt").exists()
    assert (ref / "model" / "unet" / "config.json").exists()
    assert "R-precision" in r.stdout and "FID / Inception score skipped" in r.stdout

    proc = subprocess.Popen(
        _finetune(cut, "--train.eval_at_end=false"),
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not latest.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = int(latest.read_text().strip()[len("step_") : -len(".pt")])
    assert killed_at < STEPS
    res = subprocess.run(
        _finetune(cut, "--train.eval_at_end=false", "--resume"),
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from step {killed_at}" in res.stdout + res.stderr
    assert [(x["step"], x["loss"]) for x in _rows(cut)] == [
        (x["step"], x["loss"]) for x in _rows(ref)
    ]
    name = f"step_{STEPS:06d}.pt"
    a = load_weights(str(ref / "checkpoints" / name))
    b = load_weights(str(cut / "checkpoints" / name))
    assert a.keys() == b.keys() and any(".ema." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert int(a["model.ema_updates"]) == STEPS


# ------------------------------------------------------------------------------------ commands
@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen") / "model"
    small_generator(seed=0).save_pretrained(str(d))
    return str(d)


def test_generate_writes_the_grid_and_every_image(tmp_path, capsys, gen_dir):
    out = tmp_path / "o" / "out.png"
    args = ["generate", "--checkpoint", gen_dir, *PROMPTS[:2], "-o", str(out)]
    rc, err, so = run_cli(capsys, *args, "--steps", "2", "--per-prompt", "3", "--seed", "7")
    assert rc == 0, err
    assert out.exists() and "wrote" in so
    lines = (tmp_path / "o" / "out.txt").read_text(encoding="utf-8").splitlines()
    assert lines[1:] == [f"[1] {PROMPTS[0]}", f"[2] {PROMPTS[1]}"]
    files = sorted(os.listdir(tmp_path / "o" / "out"))
    assert files == ["01_1.png", "01_2.png", "01_3.png", "02_1.png", "02_2.png", "02_3.png"]
    first = (tmp_path / "o" / "out" / "01_1.png").read_bytes()
    rc, err, _ = run_cli(capsys, *args, "--steps", "2", "--per-prompt", "3", "--seed", "7")
    assert rc == 0 and (tmp_path / "o" / "out" / "01_1.png").read_bytes() == first  # same seed


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--steps", "0"], "--steps 0"),
        (["--guidance", "-1"], "--guidance"),
        (["--per-prompt", "0"], "--per-prompt"),
        (["-o", "out.jpg"], ".png"),
        (["--checkpoint", "/nonexistent/model"], "no such folder"),
        (["--checkpoint", "R2D2"], "not a text-to-image model"),
    ],
)
def test_generate_bad_arguments_are_one_line(tmp_path, capsys, gen_dir, bad, says):
    opts = {"--checkpoint": gen_dir, "-o": str(tmp_path / "g.png")}
    i = 0
    extra = []
    while i < len(bad):
        if bad[i] in opts:
            v = bad[i + 1]
            opts[bad[i]] = os.path.join(gen_dir, "r2d2") if v == "R2D2" else v
        else:
            extra += bad[i : i + 2]
        i += 2
    argv = ["generate", PROMPTS[0], "--steps", "1"] + [x for kv in opts.items() for x in kv]
    rc, err, _ = run_cli(capsys, *argv, *extra)
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert says in err


def test_generate_without_prompts_is_a_usage_error(capsys, gen_dir):
    rc, err, _ = run_cli(capsys, "generate", "--checkpoint", gen_dir, "-o", "x.png")
    assert rc == 2 and "prompts" in err


def test_eval_t2i_scores_three_image_sets(tmp_path, capsys, gen_dir):
    ev = tmp_path / "evaluator"
    small_generator(seed=1).r2d2.save_pretrained(str(ev))  # a separate R2D2 as the evaluator
    common = ["eval", "t2i", "--checkpoint", gen_dir, "--data.format=synthetic"]
    common += ["--data.synthetic_size=40", *EVAL]
    rc, err, so = run_cli(capsys, *common, "--out", str(tmp_path / "e"), "--r2d2", str(ev))
    assert rc == 0, err
    rep = json.loads((tmp_path / "e" / "t2i_eval.json").read_text())
    assert rep["evaluator"] == str(ev) and rep["candidates_per_image"] == 5
    for name in ("generated", "unconditional", "real"):
        r = rep[name]
        assert 0 <= r["r_precision"] <= 100 and 0 <= r["itm_score"] <= 1
        assert set(r["attributes_top1"]) == {"background", "count", "colour", "shape"}
    assert rep["real"]["palette_background_acc"] == 1.0  # the real images' own backgrounds
    assert "skipped" in rep["fid_is"] and "Inception" in rep["fid_is"]["skipped"]
    assert len(os.listdir(tmp_path / "e" / "samples")) >= 6
    assert "wrote" in so
    rc, err, _ = run_cli(capsys, *common, "--out", str(tmp_path / "f"), "--r2d2", "/nope")
    assert rc == 2 and len(err.splitlines()) == 1 and "/nope" in err
    rc, err, _ = run_cli(
        capsys, *common, "--out", str(tmp_path / "g"), "--t2i.inception_weights=/nope.pth"
    )
    rep = json.loads((tmp_path / "g" / "t2i_eval.json").read_text())
    assert rc == 0 and "no such file" in rep["fid_is"]["skipped"]


@pytest.mark.distributed
@pytest.mark.slow  # about a minute: two gloo processes
def test_t2i_two_process_ddp_with_corrupt_images(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(40):
        name = tmp_path / f"{i}.png"
        if i % 10 == 3:
            name.write_bytes(b"\x89PNG truncated")
        elif i != 5:
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(name)
        lines.append(json.dumps({"image": str(name), "text": f"第{i}张图片"}, ensure_ascii=False))
    (tmp_path / "train.jsonl").write_text("\n".join(lines), encoding="utf-8")
    cmd = [*TORCHRUN, "finetune", "--out", str(tmp_path / "run"), *TRAIN]
    cmd += ["--train.max_steps=4", "--train.checkpoint_every=0", "--train.eval_at_end=false"]
    cmd += ["--data.format=jsonl", f"--data.path={tmp_path / 'train.jsonl'}"]
    cmd += ["--data.max_skip_rate=0.3", "--distributed.backend=gloo"]
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(tmp_path / "run")
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    assert rows[-1]["samples"] == 4 * 4  # every global batch full: bad samples were replaced
    assert rows[-1]["skip_reasons"]["missing_image"] == 1
    assert all(x["grad_norm"] > 0 and np.isfinite(x["loss"]) for x in rows)
    assert (tmp_path / "run" / "model" / "conditioner.safetensors").exists()
