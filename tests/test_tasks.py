"""Downstream tasks: two-stage re-ranking, retrieval / matching / zero-shot evaluation, CLI."""

import os

import numpy as np
import pytest
import torch

from r2d2.engine.metrics import retrieval_metrics
from r2d2.engine.tasks.rerank import OUTSIDE_SHIFT, rerank, shard_rows, topk_stable


def _grid_sim(n_img, n_txt, seed):
    # multiples of 1/64 in [-1, 1]: many ties, and `sim - 2` is exact in float32
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 65, (n_img, n_txt), generator=g).float() / 64


class TableScorer:
    """A stub cross encoder: a fixed random probability per (image, text) pair."""

    def __init__(self, n_img, n_txt, seed):
        g = torch.Generator().manual_seed(seed + 1)
        self.table = torch.rand(n_img, n_txt, generator=g)
        self.calls = 0

    def __call__(self, img_idx, txt_idx):
        self.calls += 1
        return self.table[img_idx, txt_idx]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_rerank_permutes_only_inside_topk(seed, direction):
    rng = np.random.default_rng(seed)
    n_img, n_txt = int(rng.integers(1, 9)), int(rng.integers(1, 30))
    k = int(rng.integers(1, 12))
    sim = _grid_sim(n_img, n_txt, seed)
    scorer = TableScorer(n_img, n_txt, seed)
    out = rerank(sim, scorer, k, direction, pair_batch=int(rng.integers(1, 8)))
    pre = sim if direction == "i2t" else sim.t()
    table = scorer.table if direction == "i2t" else scorer.table.t()
    kk = min(k, pre.shape[1])
    for q in range(pre.shape[0]):
        pre_order = np.argsort(-pre[q].numpy(), kind="stable").tolist()
        new_order = np.argsort(-out[q].numpy(), kind="stable").tolist()
        # same candidates in the top k, the tail untouched
        assert set(new_order[:kk]) == set(pre_order[:kk])
        assert new_order[kk:] == pre_order[kk:]
        # inside the top k: ordered by p + cosine (an independent recomputation)
        head = pre_order[:kk]
        expect = sorted(head, key=lambda c: (-(table[q, c] + pre[q, c]).item(), c))
        assert new_order[:kk] == expect
        assert torch.allclose(out[q, head], table[q, head] + pre[q, head])
        tail = pre_order[kk:]
        assert torch.equal(out[q, tail], pre[q, tail] - OUTSIDE_SHIFT)


def test_rerank_batches_pairs():
    sim = _grid_sim(5, 40, 0)
    scorer = TableScorer(5, 40, 0)
    rerank(sim, scorer, k=16, direction="i2t", pair_batch=7)
    assert scorer.calls == -(-5 * 16 // 7)  # ceil(80 / 7) scorer calls


def test_rerank_with_oracle_scorer_fixes_recall_inside_k():
    # pre-rank puts the right text at rank 2 for every image; an oracle cross encoder fixes R@1
    n = 6
    sim = torch.zeros(n, n)
    for i in range(n):
        sim[i, (i + 1) % n], sim[i, (i + 2) % n], sim[i, i] = 0.9, 0.8, 0.7
    oracle = lambda im, tx: (im == tx).float()  # noqa: E731
    pre = retrieval_metrics(sim, [[i] for i in range(n)], list(range(n)), ks=(1, 3))
    out_i2t = rerank(sim, oracle, 3, "i2t")
    out_t2i = rerank(sim, oracle, 3, "t2i")
    two = retrieval_metrics(out_i2t, [[i] for i in range(n)], list(range(n)), ks=(1, 3), sim_t2i=out_t2i)
    assert pre["i2t_r1"] == 0.0 and two["i2t_r1"] == 100.0 and two["t2i_r1"] == 100.0
    # k=1 cannot help: the oracle only sees the wrong top-1 text
    out1 = rerank(sim, oracle, 1, "i2t")
    assert retrieval_metrics(out1, [[i] for i in range(n)], list(range(n)), ks=(1,))["i2t_r1"] == 0.0


def test_topk_stable_and_shards():
    v, i = topk_stable(torch.tensor([[0.5, 0.75, 0.5, 0.75]]), 3)
    assert i.tolist() == [[1, 3, 0]] and v.tolist() == [[0.75, 0.75, 0.5]]
    assert [shard_rows(10, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert [shard_rows(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]


def test_rerank_bad_args():
    with pytest.raises(ValueError, match="direction"):
        rerank(torch.zeros(2, 2), lambda a, b: a.float(), 1, "x2y")
    with pytest.raises(ValueError, match="k \\(0\\)"):
        rerank(torch.zeros(2, 2), lambda a, b: a.float(), 0, "i2t")


def _dist_rerank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sim = _grid_sim(7, 11, 3)  # 7 image rows over 2-3 ranks: uneven shards
        scorer = TableScorer(7, 11, 3)
        for direction in ("i2t", "t2i"):
            out = rerank(sim, scorer, 4, direction, pair_batch=3)
            torch.save((out, scorer.calls), os.path.join(out_dir, f"{direction}_{rank}.pt"))
            scorer.calls = 0
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [3])  # uneven shards: 7 -> 3,3,1 and 11 -> 4,4,3
def test_rerank_distributed_matches_single_process(tmp_path, world):
    import torch.multiprocessing as mp

    mp.spawn(_dist_rerank_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    sim, scorer = _grid_sim(7, 11, 3), TableScorer(7, 11, 3)
    for direction, n_rows in (("i2t", 7), ("t2i", 11)):
        ref = rerank(sim, scorer, 4, direction, pair_batch=3)
        calls = []
        for r in range(world):
            out, c = torch.load(tmp_path / f"{direction}_{r}.pt")
            assert torch.equal(out, ref), f"rank {r} {direction}"
            calls.append(c)
        # each rank scored only its shard of the query rows
        from r2d2.engine.tasks.rerank import shard_rows
        expect = [-(-(4 * (shard_rows(n_rows, r, world)[1] - shard_rows(n_rows, r, world)[0])) // 3)
                  for r in range(world)]
        assert calls == expect


# ---------------------------------------------------------------- task evaluators on a stub model
from dataclasses import dataclass  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from r2d2.engine.tasks.matching import MatchingObjective, evaluate_matching  # noqa: E402
from r2d2.engine.tasks.retrieval import RetrievalEvalConfig, RetrievalSet, evaluate_retrieval  # noqa: E402
from r2d2.engine.tasks.zeroshot import class_embeddings, evaluate_zeroshot  # noqa: E402


@dataclass
class Rec:  # duck-types r2d2.engine.data.records.Record
    image: str
    text: str
    image_id: str
    label: int | None = None


class StubModel(torch.nn.Module):
    """The token-level API of R2D2Model on lookup tables: an image is a tensor whose first pixel
    holds its number, a text a row of token ids whose first id is its number; "token states"
    carry those numbers, embeddings and ITM logits are looked up."""

    def __init__(self, img_emb, txt_emb, itm_logit):
        super().__init__()
        self.img_emb = torch.nn.Parameter(img_emb)
        self.txt_emb = torch.nn.Parameter(txt_emb)
        self.itm = torch.nn.Parameter(itm_logit)  # [n_img, n_txt] logit of "match"
        self.visual = torch.nn.Identity()
        self.config = type("Cfg", (), {"has_cross": True, "image_size": 2})()

    @property
    def device(self):
        return self.itm.device

    def _text_inputs(self, ids, mask):
        return ids, mask

    def image_tokens(self, images):
        return images[:, 0, 0, :1, None]                      # [B, 1, 1]

    def text_tokens(self, ids, mask=None):
        return ids[:, :1, None].float()                        # [B, 1, 1]

    def image_embed(self, tokens):
        return F.normalize(self.img_emb[tokens[:, 0, 0].long()], dim=-1)

    def text_embed(self, tokens):
        return F.normalize(self.txt_emb[tokens[:, 0, 0].long()], dim=-1)

    def encode_image(self, images):
        return self.image_embed(self.image_tokens(images))

    def encode_text(self, ids, mask):
        return self.text_embed(self.text_tokens(ids, mask))

    def itm_logits(self, image_tokens, text_tokens, text_mask):
        z = self.itm[image_tokens[:, 0, 0].long(), text_tokens[:, 0, 0].long()]
        logits = torch.stack([-z / 2, z / 2], -1)
        return logits, logits * 0.5


def _load_image(path):  # "img/<n>.jpg" -> a 3x2x2 tensor holding n
    return torch.full((3, 2, 2), float(int(os.path.basename(path).split(".")[0])))


def _tokenizer(texts_in_order):
    index = {t: i for i, t in enumerate(texts_in_order)}

    def tokenize(texts):
        ids = torch.tensor([[index[t], 0, 0] for t in texts])
        return ids, torch.ones_like(ids)
    return tokenize


def _caption_set(n_img, per_img):
    recs = [Rec(f"img/{i}.jpg", f"图{i}的第{c}句", str(i)) for i in range(n_img) for c in range(per_img)]
    return recs, RetrievalSet.from_records(recs)


def test_retrieval_set_from_records_groups_duplicates():
    recs = [Rec("a.jpg", "猫", "a"), Rec("a.jpg", "小猫", "a"), Rec("b.jpg", "猫", "b"),
            Rec("c.jpg", "狗", "c"), Rec("a.jpg", "猫", "a")]
    rs = RetrievalSet.from_records(recs)
    assert rs.images == ["a.jpg", "b.jpg", "c.jpg"] and rs.texts == ["猫", "小猫", "狗"]
    assert rs.img2txt == [[0, 1], [0], [2]] and rs.txt2img == [[0, 1], [0], [2]]
    with pytest.raises(ValueError, match="no records"):
        RetrievalSet.from_records([])


def test_evaluate_retrieval_prerank_and_oracle_rerank():
    n_img, per = 12, 2
    recs, rs = _caption_set(n_img, per)
    g = torch.Generator().manual_seed(5)
    img_emb = torch.randn(n_img, 8, generator=g)
    owner = torch.tensor([i for i in range(n_img) for _ in range(per)])
    txt_emb = img_emb[owner] + 1.5 * torch.randn(n_img * per, 8, generator=g)  # noisy dual encoder
    itm = torch.where(owner[None, :] == torch.arange(n_img)[:, None], 8.0, -8.0)  # oracle cross encoder
    model = StubModel(img_emb, txt_emb, itm)
    res = evaluate_retrieval(model, rs, _tokenizer(rs.texts), _load_image, RetrievalEvalConfig(k=10, batch_size=5, pair_batch=9))
    sim = F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).t()
    assert res.pre_rank == pytest.approx(retrieval_metrics(sim, rs.img2txt, rs.txt2img))
    # with an oracle ITM, R@1 after re-ranking = R@10 before (the right item was in the top 10)
    assert res.two_stage["i2t_r1"] == pytest.approx(res.pre_rank["i2t_r10"])
    assert res.two_stage["t2i_r1"] == pytest.approx(res.pre_rank["t2i_r10"])
    # the noise was strong enough that re-ranking has work to do
    assert res.pre_rank["i2t_r1"] < res.pre_rank["i2t_r10"] and res.pre_rank["t2i_r1"] < res.pre_rank["t2i_r10"]
    only = evaluate_retrieval(model, rs, _tokenizer(rs.texts), _load_image, RetrievalEvalConfig(rerank=False))
    assert only.two_stage is None and only.pre_rank == res.pre_rank


def test_matching_objective_hand_case_and_grad():
    itm = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    model = StubModel(torch.randn(2, 4), torch.randn(2, 4), itm.clone())
    obj = MatchingObjective(model)
    batch = {"images": torch.stack([_load_image("0.jpg"), _load_image("1.jpg"), _load_image("1.jpg")]),
             "input_ids": torch.tensor([[0], [0], [1]]), "attention_mask": torch.ones(3, 1, dtype=torch.long),
             "labels": torch.tensor([1, 0, 1])}
    out = obj(batch)
    z = torch.tensor([2.0, 0.5, 3.0])
    lab = torch.tensor([1, 0, 1])
    ti = F.cross_entropy(torch.stack([-z / 2, z / 2], -1), lab)
    it = F.cross_entropy(torch.stack([-z / 4, z / 4], -1), lab)
    assert out["loss"].item() == pytest.approx(((ti + it) / 2).item(), rel=1e-6)
    assert out["itm_loss"].item() == pytest.approx(out["loss"].item())
    out["loss"].backward()
    assert model.itm.grad[0, 1] == 0 and model.itm.grad[0, 0] < 0 and model.itm.grad[1, 0] > 0
    with pytest.raises(ValueError, match="0/1"):
        obj({**batch, "labels": torch.tensor([1, 2, 0])})
    with pytest.raises(KeyError, match="labels"):
        obj({k: v for k, v in batch.items() if k != "labels"})


def test_evaluate_matching_auc_accuracy():
    itm = torch.tensor([[3.0, -2.0, 0.1], [-0.2, 4.0, -3.0]])
    model = StubModel(torch.randn(2, 4), torch.randn(3, 4), itm)
    texts = ["t0", "t1", "t2"]
    recs = [Rec("img/0.jpg", "t0", "0", 1), Rec("img/0.jpg", "t1", "0", 0), Rec("img/0.jpg", "t2", "0", 0),
            Rec("img/1.jpg", "t1", "1", 1), Rec("img/1.jpg", "t0", "1", 1), Rec("img/1.jpg", "t2", "1", 0)]
    res = evaluate_matching(model, recs, _tokenizer(texts), _load_image, batch_size=4)
    # logits 3, -2, 0.1 | 4, -0.2, -3 with labels 1,0,0 | 1,1,0: positives {3, 4, -0.2},
    # negatives {-2, 0.1, -3}; pairs won: 3 -> 3, 4 -> 3, -0.2 -> 2 of 3 -> AUC 8/9
    assert res.auc == pytest.approx(8 / 9)
    # score > 0.5 iff logit > 0: predictions 1,0,1 | 1,0,0 vs labels 1,0,0 | 1,1,0 -> 4/6
    assert res.accuracy == pytest.approx(400 / 6)
    with pytest.raises(ValueError, match="0/1 label"):
        evaluate_matching(model, [Rec("img/0.jpg", "t0", "0")], _tokenizer(texts), _load_image)


def test_zeroshot_prompt_ensemble_and_accuracy():
    classes = ["猫", "狗", "鸟"]
    templates = ("一张{}的照片", "{}")
    prompts = [t.format(c) for c in classes for t in templates]
    g = torch.Generator().manual_seed(0)
    txt_emb = torch.randn(len(prompts), 6, generator=g)
    cls = F.normalize(F.normalize(txt_emb, dim=-1).view(3, 2, 6).mean(1), dim=-1)
    # image i sits exactly on class (i % 3)'s averaged embedding except image 3 on class 2's
    img_emb = cls[[0, 1, 2, 2]]
    model = StubModel(img_emb, txt_emb, torch.zeros(4, 6))
    tok = _tokenizer(prompts)
    assert torch.allclose(class_embeddings(model, classes, templates, tok), cls, atol=1e-6)
    recs = [Rec(f"img/{i}.jpg", classes[lab], str(i), lab) for i, lab in enumerate([0, 1, 2, 0])]
    res = evaluate_zeroshot(model, recs, classes, tok, _load_image, templates, batch_size=3)
    assert res.top1 == pytest.approx(75.0) and res.top5 == 100.0
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_zeroshot(model, recs, classes, tok, _load_image, ("没有占位符",))


def test_eval_cli_writes_json_markdown_plot(tmp_path, monkeypatch):
    import json as _json

    import r2d2.engine.tasks.cli as cli

    n_img = 6
    for i in range(n_img):  # the reader checks the files exist
        (tmp_path / f"{i}.jpg").write_bytes(b"x")
    lines = [f"{i}#{c}\t图{i}的第{c}句" for i in range(n_img) for c in range(2)]
    (tmp_path / "test.txt").write_text("\n".join(lines + ["99#0\t缺图"]) + "\n", encoding="utf-8")
    texts = [line.split("\t")[1] for line in lines]
    g = torch.Generator().manual_seed(1)
    img_emb = torch.randn(n_img, 8, generator=g)
    owner = torch.arange(2 * n_img) // 2
    model = StubModel(img_emb, img_emb[owner] + torch.randn(2 * n_img, 8, generator=g),
                      torch.where(owner[None] == torch.arange(n_img)[:, None], 5.0, -5.0))
    monkeypatch.setattr(cli, "load_model", lambda ckpt, device: model)
    monkeypatch.setattr(cli, "make_tokenize", lambda m, d, ckpt: _tokenizer(texts))
    monkeypatch.setattr(cli, "make_load_image", lambda m: _load_image)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"data:\n  format: flickr30k_cna\n  path: {tmp_path / 'test.txt'}\nretrieval:\n  k: 4\n")
    out = tmp_path / "run"
    rc = cli.main(["retrieval", "--config", str(cfg), "--checkpoint", str(tmp_path),
                   "--out", str(out), "--retrieval.pair_batch=5"])
    assert rc == 0
    rep = _json.loads((out / "eval_retrieval.json").read_text(encoding="utf-8"))
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
    import r2d2.engine.tasks.cli as cli

    with pytest.raises(SystemExit):
        cli.main(["retrieval", "--checkpoint", str(tmp_path), "--retrieval.k=0"])
    assert "RetrievalEvalConfig.k must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["retrieval", "--checkpoint", str(tmp_path), "--data.nope=1"])
    assert "unknown field(s) ['nope']" in capsys.readouterr().err


CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.startswith("eval_")))
def test_eval_configs_parse(name):
    from r2d2.engine.tasks.cli import load_eval_config

    task = {"icm": "matching", "iqm": "matching", "zeroshot": "zeroshot"}.get(name[5:-5], "retrieval")
    cfg = load_eval_config(os.path.join(CONFIGS, name), [], task)
    assert (cfg.data.path or cfg.data.format == "synthetic") and cfg.out.endswith(name[5:-5])
    if name == "eval_flickr30k_cna.yaml":
        assert cfg.retrieval.k == 128  # the official Flickr30k-CNA setting


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.startswith("finetune_ccmb_")))
def test_finetune_configs_parse(name):
    from r2d2.engine.config import load_config

    cfg = load_config(os.path.join(CONFIGS, name), [])
    assert cfg.data.format == "ccmb_" + name[len("finetune_ccmb_"):-5]
    assert cfg.train.task == ("matching" if cfg.data.format in ("ccmb_icm", "ccmb_iqm") else "retrieval")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_finetune_then_two_stage_at_least_as_good_as_prerank(tmp_path):
    """End to end on the engine: retrieval fine-tuning (GCPR + FGR) of the tiny preset on the
    synthetic set with the Trainer, then two-stage evaluation of held-out pairs. The cross
    encoders must have learned (held-out matching AUC) for the two-stage claim to mean anything.

    64 px images: at the preset's 32 px both stages fail on the same shape/count confusions (a
    shape is ~5 pixels), so re-ranking has nothing to fix. Measured with this recipe (two-stage
    minus pre-rank mean recall, train.seed 0/1/2): +1.4, -0.1, +2.2; t2i R@1 65.2 -> 70.4 at
    seed 0, the seed used here. The margin is small against run-to-run float noise (with two
    intra-op threads the reduction order varies and one run in three flipped it), so the run is
    pinned: one thread and deterministic algorithms, which reproduce 89.6 vs 88.2 bit for bit.
    Before ``initializer_range`` scaled the tiny init, the cross encoders sat at ITM AUC 0.5 and
    this test failed."""
    from r2d2.engine.config import load_config
    from r2d2.engine.data.loader import eval_records
    from r2d2.engine.data.synthetic import open_image
    from r2d2.engine.data.transforms import eval_transform
    from r2d2.engine.trainer import Trainer

    cfg = load_config(os.path.join(CONFIGS, "tiny.yaml"), [
        "--train.task=retrieval", "--train.max_steps=600", "--data.batch_size=32",
        "--model.vision.image_size=64", "--train.seed=0", "--train.deterministic=true",
        "--loss.mlm=false", "--loss.tgd=false", "--loss.fgd=false", "--loss.fgr_weight=4.0",
        "--optim.lr=2e-3", "--optim.warmup_steps=10", "--data.synthetic_eval_size=128",
        "--train.checkpoint_every=0", "--train.log_every=20", "--logging.progress=false",
        "--logging.tensorboard=false", "--logging.plot=false"])
    trainer = Trainer(cfg, str(tmp_path / "run"))
    trainer.fit()
    rs = RetrievalSet.from_records(eval_records(cfg.data))
    tf = eval_transform(trainer.image_size)
    res = evaluate_retrieval(trainer.model, rs, trainer.tokenize, lambda key: tf(open_image(key, 64)),
                             RetrievalEvalConfig(k=8))
    chance_r1 = 100.0 / res.n_images
    assert res.pre_rank["t2i_r1"] > 3 * chance_r1, res.pre_rank  # the dual encoders learned
    recs = eval_records(cfg.data)
    pairs = [Rec(r.image, r.text, r.image_id, 1) for r in recs] + \
            [Rec(r.image, recs[(i + 17) % len(recs)].text, r.image_id, 0) for i, r in enumerate(recs)]
    itm = evaluate_matching(trainer.model, pairs, trainer.tokenize, lambda key: tf(open_image(key, 64)))
    assert itm.auc > 0.9, itm.to_dict()  # the cross encoders learned
    assert res.two_stage["mean_recall"] >= res.pre_rank["mean_recall"], (res.pre_rank, res.two_stage)
    assert res.two_stage["t2i_r1"] > res.pre_rank["t2i_r1"], (res.pre_rank, res.two_stage)


def test_synthetic_eval_sets():
    from r2d2.engine.data.synthetic import read_synthetic
    from r2d2.engine.tasks.cli import synthetic_eval_set

    held = read_synthetic(20, "eval", 3).records
    assert synthetic_eval_set("retrieval", 20, 3).records == held
    pairs = synthetic_eval_set("matching", 20, 3).records
    pos = [r for r in pairs if r.label == 1]
    neg = [r for r in pairs if r.label == 0]
    assert [(r.image, r.text, r.image_id) for r in pos] == [(r.image, r.text, r.image_id) for r in held]
    caption_of = {r.image: r.text for r in held}
    assert len(neg) == 20 and all(r.text != caption_of[r.image] for r in neg)
    with pytest.raises(ValueError, match="zeroshot"):
        synthetic_eval_set("zeroshot", 20, 3)


def test_eval_cli_on_the_synthetic_set_matches_the_end_of_run_eval(tmp_path):
    # A real (tiny, random) save_pretrained model through the whole CLI, no files to read.
    import json as _json

    import r2d2.engine.tasks.cli as cli
    from r2d2.engine.model import R2D2Model, model_preset
    from r2d2.engine.tokenizer import build_tokenizer

    torch.manual_seed(0)
    model = R2D2Model(model_preset("tiny"), tokenizer=build_tokenizer(None, 32))
    model.save_pretrained(str(tmp_path / "model"))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("data:\n  format: synthetic\n  synthetic_size: 24\nretrieval:\n  k: 4\n")
    for task in ("retrieval", "matching"):
        rc = cli.main([task, "--config", str(cfg), "--checkpoint", str(tmp_path / "model"),
                       "--out", str(tmp_path / "run")])
        assert rc == 0
    rep = _json.loads((tmp_path / "run" / "eval_retrieval.json").read_text(encoding="utf-8"))
    assert rep["metrics"]["n_images"] == 24 and rep["skipped"] == 0
    mat = _json.loads((tmp_path / "run" / "eval_matching.json").read_text(encoding="utf-8"))
    assert 0.0 <= mat["metrics"]["auc"] <= 1.0
    with pytest.raises(ValueError, match="zeroshot"):
        cli.main(["zeroshot", "--config", str(cfg), "--checkpoint", str(tmp_path / "model"),
                  "--out", str(tmp_path / "run")])
