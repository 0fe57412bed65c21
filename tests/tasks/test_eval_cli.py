"""``r2d2 eval``: files written, config and input errors as one line, task/format pairing, MUGE's
protocol, PRD2 checkpoints, the presets in configs/, and agreement with the trainer's eval.json."""

import base64
import io
import json
import os

import pytest
import torch
from PIL import Image

import r2d2.cli.eval as cli
import r2d2.engine.tasks.config as eval_config
import r2d2.engine.tasks.evaluate as evaluate
from _helpers.eval_stubs import StubModel
from _helpers.eval_stubs import load_stub_image as _load_image
from _helpers.eval_stubs import stub_tokenizer as _tokenizer

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
CONFIGS = os.path.join(ROOT, "r2d2", "configs")


def _stub_cli(monkeypatch, model, texts):
    monkeypatch.setattr(evaluate, "load_model", lambda ckpt, device: model)
    monkeypatch.setattr(evaluate, "make_tokenize", lambda m, d, ckpt: _tokenizer(texts))
    monkeypatch.setattr(evaluate, "make_load_image", lambda m: _load_image)


def test_eval_cli_writes_json_markdown_plot(tmp_path, monkeypatch):
    n_img = 6
    for i in range(n_img):  # the reader checks the files exist
        (tmp_path / f"{i}.jpg").write_bytes(b"x")
    lines = [f"{i}#{c}\t图{i}的第{c}句" for i in range(n_img) for c in range(2)]
    (tmp_path / "test.txt").write_text("\n".join(lines + ["99#0\t缺图"]) + "\n", encoding="utf-8")
    texts = [line.split("\t")[1] for line in lines]
    g = torch.Generator().manual_seed(1)
    img_emb = torch.randn(n_img, 8, generator=g)
    owner = torch.arange(2 * n_img) // 2
    model = StubModel(
        img_emb,
        img_emb[owner] + torch.randn(2 * n_img, 8, generator=g),
        torch.where(owner[None] == torch.arange(n_img)[:, None], 5.0, -5.0),
    )
    _stub_cli(monkeypatch, model, texts)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"data:\n  format: flickr30k_cna\n  path: {tmp_path / 'test.txt'}\nretrieval:\n  k: 4\n"
    )
    out = tmp_path / "run"
    rc = cli.main(
        [
            "retrieval",
            "--config",
            str(cfg),
            "--checkpoint",
            str(tmp_path),
            "--out",
            str(out),
            "--retrieval.pair_batch=5",
        ]
    )
    assert rc == 0
    rep = json.loads((out / "eval_retrieval.json").read_text(encoding="utf-8"))
    assert rep["skipped"] == 1 and rep["skip_reasons"] == {"missing_image": 1}
    assert rep["config"]["k"] == 4 and rep["config"]["pair_batch"] == 5
    m = rep["metrics"]
    assert m["n_images"] == n_img and m["n_texts"] == 2 * n_img
    assert m["pre_rank+rank"]["mean_recall"] >= m["pre_rank"]["mean_recall"]
    md = (out / "eval_retrieval.md").read_text(encoding="utf-8")
    assert "| pre_rank+rank |" in md and f"{m['pre_rank']['i2t_r1']:.2f}" in md
    png = (out / "recall_at_k.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_eval_cli_rejects_bad_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["retrieval", "--checkpoint", str(tmp_path), "--retrieval.k=0"])
    assert "retrieval.k=0 must be a positive int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["retrieval", "--checkpoint", str(tmp_path), "--data.nope=1"])
    assert "data.nope is not a EvalDataConfig field" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.startswith("eval_")))
def test_eval_configs_parse(name):
    task = {"icm": "matching", "iqm": "matching", "zeroshot": "zeroshot"}.get(
        name[5:-5], "retrieval"
    )
    cfg = eval_config.load_eval_config(os.path.join(CONFIGS, name), [], task)
    assert (cfg.data.path or cfg.data.format == "synthetic") and cfg.out.endswith(name[5:-5])
    if name == "eval_flickr30k_cna.yaml":
        assert cfg.retrieval.k == 128  # the official Flickr30k-CNA setting


@pytest.mark.parametrize(
    "name", sorted(f for f in os.listdir(CONFIGS) if f.startswith("finetune_ccmb_"))
)
def test_finetune_configs_parse(name):
    from r2d2.engine.config import load_config

    cfg = load_config(os.path.join(CONFIGS, name), [])
    assert cfg.data.format == "ccmb_" + name[len("finetune_ccmb_") : -5]
    assert cfg.train.task == (
        "matching" if cfg.data.format in ("ccmb_icm", "ccmb_iqm") else "retrieval"
    )


def test_synthetic_eval_sets():
    from r2d2.engine.data.synthetic import read_synthetic

    held = read_synthetic(20, "eval", 3).records
    assert evaluate.synthetic_eval_set("retrieval", 20, 3).records == held
    pairs = evaluate.synthetic_eval_set("matching", 20, 3).records
    pos = [r for r in pairs if r.label == 1]
    neg = [r for r in pairs if r.label == 0]
    assert [(r.image, r.text, r.image_id) for r in pos] == [
        (r.image, r.text, r.image_id) for r in held
    ]
    caption_of = {r.image: r.text for r in held}
    assert len(neg) == 20 and all(r.text != caption_of[r.image] for r in neg)
    with pytest.raises(ValueError, match="zeroshot"):
        evaluate.synthetic_eval_set("zeroshot", 20, 3)


@pytest.mark.parametrize(
    "task,fmt,hint",
    [
        ("retrieval", "icm", "r2d2 eval matching"),
        ("retrieval", "iqm", "twin is iqr"),
        ("matching", "icr", "matching needs icm"),
        ("zeroshot", "flickr30k_cn", "zeroshot reads"),
    ],
)
def test_eval_cli_refuses_a_format_the_task_cannot_read(tmp_path, capsys, task, fmt, hint):
    # icm/iqm label-0 pairs used as retrieval ground truth would reward wrong matches
    with pytest.raises(SystemExit) as e:
        cli.main([task, "--checkpoint", str(tmp_path), f"--data.format={fmt}", "--data.path=x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"data.format={fmt!r} cannot be evaluated by `r2d2 eval {task}`" in err and hint in err


def _tiny_checkpoint(path, preset):
    from r2d2.engine.model import R2D2Model, model_preset
    from r2d2.engine.tokenizer import build_tokenizer

    torch.manual_seed(0)
    R2D2Model(model_preset(preset), tokenizer=build_tokenizer(None, 32)).save_pretrained(str(path))
    return str(path)


@pytest.mark.usefixtures("one_thread")
def test_eval_cli_prd2_matching_is_one_clear_line_and_retrieval_notes_pre_rank_only(
    tmp_path, capsys
):
    ckpt = _tiny_checkpoint(tmp_path / "prd2", "prd2-tiny")
    args = [
        "--checkpoint",
        ckpt,
        "--data.format=synthetic",
        "--data.synthetic_size=12",
        "--data.max_text_len=16",
        "--out",
        str(tmp_path / "run"),
    ]
    assert cli.main(["matching", *args]) == 1  # found by loading the model: a run-time failure
    err = capsys.readouterr().err.strip()
    assert err.startswith("r2d2 eval matching: error: matching scores pairs with the ITM heads")
    assert "PRD2" in err and "\n" not in err and "Traceback" not in err
    assert cli.main(["retrieval", *args]) == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "run" / "eval_retrieval.json").read_text(encoding="utf-8"))
    assert rep["metrics"]["pre_rank+rank"] is None
    note = "no cross encoders (PRD2 / cross_layers=0): pre-rank only"
    assert any(note in n for n in rep["notes"]) and note in out
    assert note in (tmp_path / "run" / "eval_retrieval.md").read_text(encoding="utf-8")


def test_eval_cli_bad_input_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "none"
    assert (
        cli.main(
            [
                "retrieval",
                "--checkpoint",
                str(ckpt),
                "--data.format=icr",
                f"--data.path={tmp_path / 'absent.json'}",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("r2d2 eval retrieval: error:") and "\n" not in err


def _jpeg_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 128, 255)).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def test_eval_cli_muge_ranks_against_the_whole_pool_t2i_mean_recall(tmp_path, monkeypatch):
    # 8 pool images; the 3 queries name images 0, 1 (+2) and 3; images 4..7 are pool-only.
    d = tmp_path / "muge"
    (d / "valid_imgs").mkdir(parents=True)
    payload = _jpeg_b64()
    (d / "valid_imgs.tsv").write_text(
        "".join(f"{i}\t{payload}\n" for i in range(8)), encoding="utf-8"
    )
    for i in range(8):
        (d / "valid_imgs" / f"{i}.jpg").write_bytes(base64.b64decode(payload))
    queries = [
        {"query_id": 0, "query_text": "红色", "item_ids": [0]},
        {"query_id": 1, "query_text": "蓝色", "item_ids": [1, 2]},
        {"query_id": 2, "query_text": "绿色", "item_ids": [3, 99]},  # 99: not in the pool
        {"query_id": 3, "query_text": None, "item_ids": [4]},  # null: empty, not "None"
        {"query_id": 4, "query_text": 7, "item_ids": [5]},
    ]  # a number: its own reason
    (d / "valid_queries.jsonl").write_text(
        "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries), encoding="utf-8"
    )
    texts = ["红色", "蓝色", "绿色"]
    g = torch.Generator().manual_seed(2)
    img = torch.randn(8, 6, generator=g)
    txt = torch.stack(
        [img[0], img[1] + img[6] * 3, img[3]]
    )  # query 1 is closest to pool-only image 6
    _stub_cli(monkeypatch, StubModel(img, txt, torch.zeros(8, 3)), texts)
    cfg = eval_config.load_eval_config(os.path.join(CONFIGS, "eval_muge.yaml"), [], "retrieval")
    assert cfg.data.gallery.endswith("valid_imgs.tsv")
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "retrieval",
                "--config",
                os.path.join(CONFIGS, "eval_muge.yaml"),
                "--checkpoint",
                str(d),
                f"--data.path={d / 'valid_queries.jsonl'}",
                f"--data.gallery={d / 'valid_imgs.tsv'}",
                f"--data.image_root={d / 'valid_imgs'}",
                "--retrieval.k=4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rep = json.loads((out / "eval_retrieval.json").read_text(encoding="utf-8"))
    m = rep["metrics"]
    assert m["n_images"] == 8 and m["n_texts"] == 3 and m["protocol"] == "t2i"
    assert rep["skip_reasons"] == {"not_in_gallery": 1, "empty_text": 1, "non_string_text": 1}
    for stage in ("pre_rank", "pre_rank+rank"):
        r = m[stage]
        assert r["mean_recall"] == pytest.approx((r["t2i_r1"] + r["t2i_r5"] + r["t2i_r10"]) / 3)
    assert m["pre_rank"]["t2i_r1"] == pytest.approx(200 / 3)  # query 1 loses to a pool-only image
    md = (out / "eval_retrieval.md").read_text(encoding="utf-8")
    assert "mean_recall = mean of t2i_r1 t2i_r5 t2i_r10 (MUGE protocol" in md

    # the default pool is <split>_imgs.tsv beside the queries; with none there, a clear error
    def default_pool_run() -> int:
        return cli.main(
            [
                "retrieval",
                "--config",
                os.path.join(CONFIGS, "eval_muge.yaml"),
                "--checkpoint",
                str(d),
                f"--data.path={d / 'valid_queries.jsonl'}",
                "--data.gallery=null",
                f"--data.image_root={d / 'valid_imgs'}",
                "--out",
                str(out),
            ]
        )

    assert default_pool_run() == 0
    (d / "valid_imgs.tsv").rename(d / "elsewhere.tsv")
    assert default_pool_run() == 2


def test_zeroshot_preset_and_docs_use_the_default_templates():
    from r2d2.engine.tasks.zeroshot import DEFAULT_TEMPLATES

    cfg = eval_config.load_eval_config(os.path.join(CONFIGS, "eval_zeroshot.yaml"), [], "zeroshot")
    assert tuple(cfg.zeroshot.templates) == DEFAULT_TEMPLATES
    with open(os.path.join(ROOT, "docs", "downstream.md"), encoding="utf-8") as f:
        doc = f.read()
    section = doc[doc.index("## Zero-shot classification") :]
    assert all(f"`{t}`" in section for t in DEFAULT_TEMPLATES)
    assert section.count("{}") == len(DEFAULT_TEMPLATES)  # and no other template is listed


@pytest.mark.usefixtures("one_thread")
def test_eval_cli_on_the_synthetic_set_equals_the_runs_eval_json(tmp_path, capsys):
    # A real (tiny, briefly trained) run: its end-of-run eval.json and `r2d2 eval retrieval` on the
    # same held-out split with configs/eval_synthetic.yaml must report the same numbers. 40 px so
    # the synthetic canvas (max(64, size)) and the image size both matter.
    from r2d2.cli.train import pretrain

    run = tmp_path / "run"
    assert (
        pretrain(
            [
                "--config",
                os.path.join(CONFIGS, "tiny.yaml"),
                "--out",
                str(run),
                "--train.max_steps=2",
                "--data.synthetic_eval_size=24",
                "--model.vision.image_size=40",
                "--train.checkpoint_every=0",
                "--logging.progress=false",
                "--logging.tensorboard=false",
                "--logging.plot=false",
            ]
        )
        == 0
    )
    ref = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    assert ref["rerank_k"] == 16
    for task in ("retrieval", "matching"):
        assert (
            cli.main(
                [
                    task,
                    "--config",
                    os.path.join(CONFIGS, "eval_synthetic.yaml"),
                    "--checkpoint",
                    str(run / "model"),
                    "--data.synthetic_size=24",
                    "--out",
                    str(run),
                ]
            )
            == 0
        )
    got = json.loads((run / "eval_retrieval.json").read_text(encoding="utf-8"))["metrics"]
    keys = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"]
    assert (got["n_images"], got["n_texts"]) == (ref["n_images"], ref["n_texts"])
    assert {k: got["pre_rank"][k] for k in keys} == {k: ref[k] for k in keys}
    assert got["pre_rank+rank"] == ref["pre_rank+rank"]
    mat = json.loads((run / "eval_matching.json").read_text(encoding="utf-8"))["metrics"]
    assert 0.0 <= mat["auc"] <= 1.0 and mat["n_pairs"] == 48
    with pytest.raises(SystemExit):  # zeroshot cannot read the synthetic set
        cli.main(
            [
                "zeroshot",
                "--config",
                os.path.join(CONFIGS, "eval_synthetic.yaml"),
                "--checkpoint",
                str(run / "model"),
            ]
        )


def test_a_corrupt_image_is_left_out_and_counted_not_fatal(tmp_path):
    """A present but undecodable image (truncated JPEG, garbage bytes) drops its pairs with a
    count instead of stopping the evaluation at its first batch; check_images=false restores the
    one-line stop."""
    from r2d2.engine.model import R2D2Model, model_preset

    model_dir = tmp_path / "model"
    R2D2Model(model_preset("tiny")).save_pretrained(str(model_dir))
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(6):
        arr = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / f"{i}.jpg", quality=90)
        lines += [json.dumps({"image_path": f"{i}.jpg", "text": f"图{i}"}, ensure_ascii=False)]
    good = (tmp_path / "0.jpg").read_bytes()
    (tmp_path / "4.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (tmp_path / "5.jpg").write_bytes(b"not an image at all")  # garbage
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = [
        "retrieval",
        "--checkpoint",
        str(model_dir),
        "--data.format=icr",
        f"--data.path={tmp_path / 'test.jsonl'}",
        "--device=cpu",
    ]
    assert cli.main(args + ["--out", str(tmp_path / "run")]) == 0
    rep = json.loads((tmp_path / "run" / "eval_retrieval.json").read_text(encoding="utf-8"))
    assert rep["skipped"] == 2 and rep["skip_reasons"] == {"corrupt_image": 2}
    assert rep["metrics"]["n_images"] == 4 and rep["metrics"]["n_texts"] == 4
    assert cli.main(args + ["--out", str(tmp_path / "run2"), "--data.check_images=false"]) == 1


@pytest.mark.usefixtures("one_thread")
def test_eval_cli_takes_a_run_folder_like_init_from(tmp_path, capsys):
    # issue 17 item 14: --checkpoint RUN was refused although train.init_from takes it
    run = tmp_path / "run"
    _tiny_checkpoint(run / "model", "tiny")
    (run / "checkpoints").mkdir()
    args = [
        "--data.format=synthetic",
        "--data.synthetic_size=8",
        "--data.max_text_len=16",
        "--device=cpu",
    ]
    assert (
        cli.main(["retrieval", "--checkpoint", str(run), *args, "--out", str(tmp_path / "e")]) == 0
    )
    assert (
        f"--checkpoint {run} is a run folder: evaluating its model/ ({run / 'model'})"
        in capsys.readouterr().out
    )
    rep = json.loads((tmp_path / "e" / "eval_retrieval.json").read_text(encoding="utf-8"))
    assert rep["checkpoint"] == str(run / "model")
    assert cli.main(["retrieval", "--checkpoint", str(tmp_path / "nothing"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"r2d2 eval retrieval: error: --checkpoint {tmp_path / 'nothing'}: no such folder (expected a "
        "save_pretrained folder, e.g. <run>/model, or a run folder)"
    )
