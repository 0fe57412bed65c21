"""Captioning as a task: the loss (prompt, padding and truncated endings not scored; label
smoothing as F.cross_entropy), ``r2d2 finetune`` with train.task=caption end to end (held-out
evaluation with both baselines), bad input counted, kill-and-resume exactness, DDP over 2 gloo
processes, ``r2d2 eval caption`` and ``r2d2 caption`` on written images."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _helpers.cli import R2D2, ROOT, TORCHRUN, run_cli
from r2d2.engine.data.loader import Tokenize
from r2d2.engine.model import R2D2Model
from r2d2.engine.model.captioner import R2D2Captioner
from r2d2.engine.model.config import model_preset
from r2d2.engine.observability import read_log
from r2d2.engine.tasks.caption.config import CaptionConfig
from r2d2.engine.tasks.caption.objective import CaptionObjective
from r2d2.engine.tokenizer import build_tokenizer

# tiny models, step-by-step decoding: extra threads only spin against the machine's other jobs
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = os.path.join(ROOT, "r2d2", "configs", "caption_tiny.yaml")
SMALL = [
    "--train.init_from=null",
    "--data.batch_size=8",
    "--data.synthetic_size=64",
    "--data.synthetic_eval_size=8",
    "--caption.baseline_pool=16",
    "--caption.max_length=8",
    "--logging.progress=false",
    "--logging.tensorboard=false",
    "--logging.plot=false",
]


def _captioner(prompt="", seed=0, max_len=12):
    torch.manual_seed(seed)
    cfg = model_preset("tiny")
    tok = build_tokenizer(max_length=max_len)
    r2d2 = R2D2Model(cfg, tokenizer=tok)
    return R2D2Captioner.from_r2d2(r2d2, CaptionConfig(prompt=prompt)).eval(), tok


def _batch(tok, texts, max_len=12):
    enc = tok(texts)
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    L = enc["input_ids"].shape[1]
    ids[:, :L], mask[:, :L] = enc["input_ids"], enc["attention_mask"]
    return {
        "images": torch.randn(len(texts), 3, 32, 32),
        "input_ids": ids,
        "attention_mask": mask,
        "truncated": enc["truncated"],
    }


TEXTS = ["红色背景上的圆形", "两个三角形", "白色背景上的绿色正方形"]


@pytest.mark.parametrize("prompt", ["", "一张图片"])
def test_loss_scores_caption_tokens_only(prompt):
    cap, tok = _captioner(prompt)
    pids = tok._tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    obj = CaptionObjective(cap, label_smoothing=0.0, prompt_ids=pids, max_text_len=12)
    b = _batch(tok, TEXTS[:2])  # short captions: no truncation
    with torch.no_grad():
        out = obj(b)
    # by hand: each row [CLS] + prompt + caption + [SEP]; targets = caption + [SEP]
    total, n = 0.0, 0
    for i, t in enumerate(TEXTS[:2]):
        body = tok._tok.encode(t, add_special_tokens=False).ids
        seq = torch.tensor([[tok.cls_id, *pids, *body, tok.sep_id]])
        with torch.no_grad():
            logits = cap(b["images"][i : i + 1], seq[:, :-1])[0].float()
        k = len(pids)
        tgt = seq[0, 1 + k :]
        total += F.cross_entropy(logits[k:], tgt, reduction="sum").item()
        n += len(tgt)
    assert out["tokens"].item() == n == sum(len(t) + 1 for t in TEXTS[:2])
    assert out["loss"].item() == pytest.approx(total / n, rel=1e-5)
    # the padding columns' ids do not matter
    b2 = dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 77))
    with torch.no_grad():
        assert obj(b2)["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_label_smoothing_matches_cross_entropy():
    cap, tok = _captioner()
    obj = CaptionObjective(cap, label_smoothing=0.1, max_text_len=12)
    b = _batch(tok, TEXTS)
    ids, mask, targets, scored = obj.inputs_and_targets(b)
    with torch.no_grad():
        logits = cap(b["images"], ids[:, :-1], mask[:, :-1]).float()
        want = F.cross_entropy(logits[scored], targets[scored], label_smoothing=0.1)
        assert obj(b)["loss"].item() == pytest.approx(want.item(), rel=1e-6)
        # and that is label smoothing: (1 - e) * NLL + e * mean over the vocabulary of -log p
        logp = logits[scored].log_softmax(-1)
        nll = -logp.gather(1, targets[scored][:, None])[:, 0]
        by_hand = (0.9 * nll - 0.1 * logp.mean(-1)).mean()
        assert want.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_truncated_caption_is_not_taught_to_end():
    cap, _ = _captioner()
    tok = build_tokenizer(max_length=8)
    obj = CaptionObjective(cap, label_smoothing=0.0, max_text_len=8)
    texts = ["一二三四五六七八九十", "一二三四五六", "一二三"]  # 10 > 6, 6 = 6 (fits), 3
    b = _batch(tok, texts, max_len=8)
    assert b["attention_mask"].sum(1).tolist() == [8, 8, 5]
    _, _, targets, scored = obj.inputs_and_targets(b)
    # row 0 was cut: its last target ([SEP]) is not scored; row 1 ends for real: scored
    assert targets[0, 6].item() == tok.sep_id and not scored[0, 6]
    assert targets[1, 6].item() == tok.sep_id and scored[1, 6]
    assert scored.sum(1).tolist() == [6, 7, 4]
    # the loader's Tokenize reports the same cut rows
    _, _, cut = Tokenize(tok, 8).encode(texts)
    assert cut.tolist() == [True, False, False]
    # without the mark a full row counts as cut (its [SEP] unscored)
    _, _, _, blind = obj.inputs_and_targets({k: v for k, v in b.items() if k != "truncated"})
    assert blind.sum(1).tolist() == [6, 6, 4]


def _images(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.mark.slow
def test_finetune_caption_end_to_end_with_bad_input(tmp_path, capsys):
    # a manifest with every kind of bad sample: missing file, corrupt bytes, empty caption,
    # over-long caption (truncated to data.max_text_len, its ending not scored)
    d = tmp_path / "data"
    d.mkdir()
    _images(d, 12)
    (d / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    lines = [{"image": f"{i}.png", "text": f"第{i}张图片有{i}个圆形"} for i in range(12)]
    lines += [
        {"image": "missing.png", "text": "不存在的图片"},
        {"image": "bad.jpg", "text": "坏掉的图片"},
        {"image": "0.png", "text": ""},
        {"image": "1.png", "text": "很长的描述" * 40},
    ]
    (d / "train.jsonl").write_text(
        "\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8"
    )
    out = tmp_path / "run"
    rc, err, stdout = run_cli(
        capsys,
        "finetune",
        "--config",
        CONFIG,
        "--out",
        str(out),
        *SMALL,
        "--train.max_steps=4",
        "--train.checkpoint_every=0",
        "--data.format=jsonl",
        f"--data.path={d / 'train.jsonl'}",
        f"--data.eval_path={d / 'train.jsonl'}",
        "--data.max_skip_rate=0.5",
    )
    assert rc == 0, err
    log = read_log(str(out / "log.jsonl"))
    assert [r["step"] for r in log][-1] == 4 and all(np.isfinite(r["loss"]) for r in log)
    reasons = log[-1]["skip_reasons"]
    assert reasons["missing_image"] == 1 and reasons["empty_text"] == 1
    rep = json.loads((out / "caption_eval.json").read_text(encoding="utf-8"))
    assert rep["skip_reasons"].get("corrupt_image") == 1  # left out of the evaluation, counted
    assert set(rep["scores"]) == {"model", "most_frequent", "nearest_image"}
    assert set(rep["scores"]["model"]) >= {"BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert "captioner" in stdout and "nearest training image" in stdout
    model = R2D2Captioner.from_pretrained(str(out / "model"))
    assert model.tokenizer is not None and model.caption.prompt == "一张图片"


def test_caption_cli_on_written_images(tmp_path, capsys):
    cap, _ = _captioner(prompt="一张图片")
    cap.save_pretrained(tmp_path / "cap")
    d = tmp_path / "imgs"
    d.mkdir()
    _images(d, 4)
    (d / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rc, err, stdout = run_cli(
        capsys,
        "caption",
        "--checkpoint",
        str(tmp_path / "cap"),
        str(d / "2.png"),
        str(d / "bad.jpg"),
        str(d / "missing.png"),
        str(d / "3.png"),
        "--beam",
        "2",
        "--max-len",
        "6",
    )
    assert rc == 1
    rows = [ln.split("\t") for ln in stdout.splitlines()]
    assert [r[0] for r in rows] == [str(d / "2.png"), str(d / "3.png")]
    assert all(len(r) == 2 and "一张图片" not in r[1] for r in rows)  # the prompt is stripped
    errs = [e for e in err.splitlines() if e.startswith("r2d2 caption:")]  # not the log lines
    assert len(errs) == 3 and "bad.jpg" in errs[0] and "missing.png" in errs[1]
    assert "2 of 4 images failed" in errs[2] and "Traceback" not in err
    # seeded sampling: the same seed, the same captions
    args = ["caption", "--checkpoint", str(tmp_path / "cap"), str(d / "0.png"), str(d / "1.png")]
    a = run_cli(capsys, *args, "--top-p", "0.9", "--seed", "3", "--max-len", "6")
    b = run_cli(capsys, *args, "--top-p", "0.9", "--seed", "3", "--max-len", "6")
    assert a[0] == 0 and a[2] == b[2] and len(a[2].splitlines()) == 2


def test_eval_caption_cli_on_the_synthetic_split(tmp_path, capsys):
    cap, _ = _captioner()
    cap.save_pretrained(tmp_path / "cap")
    rc, err, stdout = run_cli(
        capsys,
        "eval",
        "caption",
        "--checkpoint",
        str(tmp_path / "cap"),
        "--out",
        str(tmp_path / "eval"),
        "--data.format=synthetic",
        "--data.synthetic_size=6",
        "--caption.baseline_pool=12",
        "--caption.max_length=6",
        "--caption.eval_tokenize=char",
    )
    assert rc == 0, err
    rep = json.loads((tmp_path / "eval" / "caption_eval.json").read_text(encoding="utf-8"))
    assert rep["n_images"] == 6 and rep["tokenize"] == "char"
    assert set(rep["scores"]) == {"model", "most_frequent", "nearest_image"}
    assert len(rep["samples"]) == 6 and all(len(x["references"]) == 1 for x in rep["samples"])
    assert "baseline: most frequent training caption" in stdout and "CIDEr-D" in stdout


def test_caption_cli_errors(tmp_path, capsys):
    rc, err, _ = run_cli(capsys, "caption", "--checkpoint", str(tmp_path / "nope"), "x.png")
    assert rc == 2 and "nope" in err and len(err.splitlines()) == 1
    cap, _ = _captioner()
    cap.save_pretrained(tmp_path / "cap")
    rc, err, _ = run_cli(
        capsys, "caption", "--checkpoint", str(tmp_path / "cap"), "x.png", "--top-p", "0"
    )
    assert rc == 2 and "top_p" in err


# ------------------------------------------------------------------------ subprocess runs
STEPS = 8
RESUME_ARGS = [
    "--config",
    CONFIG,
    *SMALL,
    f"--train.max_steps={STEPS}",
    "--train.checkpoint_every=3",
    "--train.log_every=1",
    "--train.deterministic=true",
    "--train.eval_at_end=false",
    "--model.text.dropout=0.1",  # dropout draws from the global RNG every step
]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_log(os.path.join(out, "log.jsonl"))]


@pytest.mark.slow
def test_caption_kill_and_resume_is_exact(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    cmd = [sys.executable, "-m", "r2d2", "finetune", *RESUME_ARGS, "--out"]
    r = subprocess.run([*cmd, str(ref)], env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    proc = subprocess.Popen(
        [*cmd, str(cut)], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not latest.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert len(_losses(cut)) < STEPS
    res = subprocess.run(
        [*cmd, str(cut), "--resume"], env=_env(), cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert _losses(cut) == _losses(ref)  # bitwise


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_caption_two_processes_match_one_process(tmp_path, strategy):
    args = [
        "finetune",
        "--config",
        CONFIG,
        *SMALL,
        "--train.max_steps=4",
        "--train.log_every=1",
        "--train.checkpoint_every=0",
        "--train.eval_at_end=false",
        "--distributed.backend=gloo",
        f"--distributed.strategy={strategy}",
    ]
    runs = {}
    for name, launcher in (
        ("one", R2D2),
        ("two", TORCHRUN),
    ):
        out = tmp_path / name
        r = subprocess.run(
            [*launcher, *args, "--out", str(out)],
            env=_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = [r["loss"] for r in read_log(str(out / "log.jsonl"))]
    # the loss is a per-token mean per rank, averaged over ranks by sample count: close to the
    # one-process token mean, not bitwise
    np.testing.assert_allclose(runs["two"], runs["one"], rtol=2e-2)
    assert len(runs["one"]) == 4
    # the export of the two-process run is a whole captioner (FSDP: gathered from the shards)
    two = R2D2Captioner.from_pretrained(str(tmp_path / "two" / "model"))
    one = R2D2Captioner.from_pretrained(str(tmp_path / "one" / "model"))
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-2, msg=name)
