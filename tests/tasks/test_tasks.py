"""Downstream tasks: two-stage re-ranking, retrieval / matching / zero-shot evaluation (the CLI:
test_eval_cli.py; the slow end-to-end fine-tune + two-stage check: test_retrieval_e2e.py)."""

import os

import numpy as np
import pytest
import torch

from _helpers.eval_stubs import Rec, StubModel, TableScorer
from _helpers.eval_stubs import grid_sim as _grid_sim
from _helpers.eval_stubs import load_stub_image as _load_image
from _helpers.eval_stubs import stub_tokenizer as _tokenizer
from r2d2.engine.metrics import retrieval_metrics
from r2d2.engine.tasks.rerank import OUTSIDE_SHIFT, rerank, shard_rows, topk_stable


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
    two = retrieval_metrics(
        out_i2t, [[i] for i in range(n)], list(range(n)), ks=(1, 3), sim_t2i=out_t2i
    )
    assert pre["i2t_r1"] == 0.0 and two["i2t_r1"] == 100.0 and two["t2i_r1"] == 100.0
    # k=1 cannot help: the oracle only sees the wrong top-1 text
    out1 = rerank(sim, oracle, 1, "i2t")
    assert (
        retrieval_metrics(out1, [[i] for i in range(n)], list(range(n)), ks=(1,))["i2t_r1"] == 0.0
    )


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


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_rerank_candidate_shards_and_row_subsets_match_rows_mode(seed, direction):
    # One process: "candidates" scores the same pairs as "rows", so the matrices are equal; a row
    # subset re-ranks exactly those rows and leaves the others at their pre-rank scores.
    rng = np.random.default_rng(seed)
    n_img, n_txt, k = int(rng.integers(2, 9)), int(rng.integers(2, 20)), int(rng.integers(1, 6))
    sim = _grid_sim(n_img, n_txt, seed)
    ref = rerank(sim, TableScorer(n_img, n_txt, seed), k, direction, pair_batch=3)
    assert torch.equal(
        rerank(
            sim, TableScorer(n_img, n_txt, seed), k, direction, pair_batch=3, shard="candidates"
        ),
        ref,
    )
    n_q = n_img if direction == "i2t" else n_txt
    rows = torch.tensor(sorted(rng.choice(n_q, size=max(1, n_q // 2), replace=False).tolist()))
    scorer = TableScorer(n_img, n_txt, seed)
    sub = rerank(sim, scorer, k, direction, pair_batch=1, rows=rows)
    pre = sim if direction == "i2t" else sim.t()
    other = torch.ones(n_q, dtype=torch.bool)
    other[rows] = False
    assert torch.equal(sub[rows], ref[rows]) and torch.equal(sub[other], pre[other])
    assert scorer.calls == len(rows) * min(k, pre.shape[1])  # only the chosen rows were scored
    with pytest.raises(ValueError, match="shard"):
        rerank(sim, scorer, k, direction, shard="columns")


def _dist_rerank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sim = _grid_sim(7, 11, 3)  # 7 image rows over 2-3 ranks: uneven shards
        scorer = TableScorer(7, 11, 3)
        for direction in ("i2t", "t2i"):
            for shard in ("rows", "candidates"):
                out = rerank(sim, scorer, 4, direction, pair_batch=3, shard=shard)
                torch.save(
                    (out, scorer.calls), os.path.join(out_dir, f"{direction}_{shard}_{rank}.pt")
                )
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
        pre = sim if direction == "i2t" else sim.t()
        top = topk_stable(pre, 4)[1]
        for shard in ("rows", "candidates"):
            calls = []
            for r in range(world):
                out, c = torch.load(tmp_path / f"{direction}_{shard}_{r}.pt")
                assert torch.equal(out, ref), f"rank {r} {direction} {shard}"
                calls.append(c)
            # each rank scored only its shard: its query rows, or the pairs of its candidates
            if shard == "rows":
                owned = [
                    4 * (shard_rows(n_rows, r, world)[1] - shard_rows(n_rows, r, world)[0])
                    for r in range(world)
                ]
            else:
                owned = [
                    int(
                        (
                            (top >= shard_rows(pre.shape[1], r, world)[0])
                            & (top < shard_rows(pre.shape[1], r, world)[1])
                        ).sum()
                    )
                    for r in range(world)
                ]
            assert sum(owned) == 4 * n_rows
            assert calls == [-(-n // 3) for n in owned]


# ---------------------------------------------------------------- task evaluators on a stub model
import torch.nn.functional as F  # noqa: E402

from r2d2.engine.tasks.matching import MatchingObjective, evaluate_matching  # noqa: E402
from r2d2.engine.tasks.retrieval import RetrievalEvalConfig, RetrievalSet, evaluate_retrieval  # noqa: E402
from r2d2.engine.tasks.zeroshot import class_embeddings, evaluate_zeroshot  # noqa: E402


def _caption_set(n_img, per_img):
    recs = [
        Rec(f"img/{i}.jpg", f"图{i}的第{c}句", str(i)) for i in range(n_img) for c in range(per_img)
    ]
    return recs, RetrievalSet.from_records(recs)


def test_retrieval_set_from_records_groups_duplicates():
    recs = [
        Rec("a.jpg", "猫", "a"),
        Rec("a.jpg", "小猫", "a"),
        Rec("b.jpg", "猫", "b"),
        Rec("c.jpg", "狗", "c"),
        Rec("a.jpg", "猫", "a"),
    ]
    rs = RetrievalSet.from_records(recs)
    assert rs.images == ["a.jpg", "b.jpg", "c.jpg"] and rs.texts == ["猫", "小猫", "狗"]
    assert rs.img2txt == [[0, 1], [0], [2]] and rs.txt2img == [[0, 1], [0], [2]]
    with pytest.raises(ValueError, match="no records"):
        RetrievalSet.from_records([])


def test_evaluate_retrieval_prerank_and_oracle_rerank():
    n_img, per = 12, 2
    _recs, rs = _caption_set(n_img, per)
    g = torch.Generator().manual_seed(5)
    img_emb = torch.randn(n_img, 8, generator=g)
    owner = torch.tensor([i for i in range(n_img) for _ in range(per)])
    txt_emb = img_emb[owner] + 1.5 * torch.randn(n_img * per, 8, generator=g)  # noisy dual encoder
    itm = torch.where(
        owner[None, :] == torch.arange(n_img)[:, None], 8.0, -8.0
    )  # oracle cross encoder
    model = StubModel(img_emb, txt_emb, itm)
    res = evaluate_retrieval(
        model,
        rs,
        _tokenizer(rs.texts),
        _load_image,
        RetrievalEvalConfig(k=10, batch_size=5, pair_batch=9),
    )
    sim = F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).t()
    assert res.pre_rank == pytest.approx(retrieval_metrics(sim, rs.img2txt, rs.txt2img))
    # with an oracle ITM, R@1 after re-ranking = R@10 before (the right item was in the top 10)
    assert res.two_stage["i2t_r1"] == pytest.approx(res.pre_rank["i2t_r10"])
    assert res.two_stage["t2i_r1"] == pytest.approx(res.pre_rank["t2i_r10"])
    # the noise was strong enough that re-ranking has work to do
    assert (
        res.pre_rank["i2t_r1"] < res.pre_rank["i2t_r10"]
        and res.pre_rank["t2i_r1"] < res.pre_rank["t2i_r10"]
    )
    only = evaluate_retrieval(
        model, rs, _tokenizer(rs.texts), _load_image, RetrievalEvalConfig(rerank=False)
    )
    assert only.two_stage is None and only.pre_rank == res.pre_rank


def test_matching_objective_hand_case_and_grad():
    itm = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    model = StubModel(torch.randn(2, 4), torch.randn(2, 4), itm.clone())
    obj = MatchingObjective(model)
    batch = {
        "images": torch.stack([_load_image("0.jpg"), _load_image("1.jpg"), _load_image("1.jpg")]),
        "input_ids": torch.tensor([[0], [0], [1]]),
        "attention_mask": torch.ones(3, 1, dtype=torch.long),
        "labels": torch.tensor([1, 0, 1]),
    }
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
    recs = [
        Rec("img/0.jpg", "t0", "0", 1),
        Rec("img/0.jpg", "t1", "0", 0),
        Rec("img/0.jpg", "t2", "0", 0),
        Rec("img/1.jpg", "t1", "1", 1),
        Rec("img/1.jpg", "t0", "1", 1),
        Rec("img/1.jpg", "t2", "1", 0),
    ]
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


def _muge_like(n_pool=10):
    """A pool of ``n_pool`` images; queries name images 0..3 only. Query j's closest image in the
    whole pool is a gallery-only distractor (j + 6) unless j == 0; among the named images alone
    its own item would win."""
    g = torch.Generator().manual_seed(3)
    img_emb = torch.randn(n_pool, 8, generator=g)
    txt_emb = img_emb[:4].clone()
    for j in range(1, 4):
        txt_emb[j] = img_emb[j] + 1.2 * img_emb[j + 6]
    img_emb[7:10] = txt_emb[1:4] * 1.0  # the distractors sit exactly on the queries
    recs = [Rec(f"img/{j}.jpg", f"查询{j}", str(j)) for j in range(4)] + [
        Rec("img/0.jpg", "查询1", "0")
    ]
    gallery = [(f"img/{i}.jpg", str(i)) for i in range(n_pool)]
    return img_emb, txt_emb, recs, gallery


def test_retrieval_t2i_protocol_ranks_against_the_whole_pool():
    from r2d2.engine.metrics import t2i_metrics
    from r2d2.engine.tasks.retrieval import set_metrics

    img_emb, txt_emb, recs, gallery = _muge_like()
    texts = ["查询0", "查询1", "查询2", "查询3"]
    model = StubModel(img_emb, txt_emb, torch.zeros(10, 4))
    rs = RetrievalSet.from_records(recs, gallery, protocol="t2i")
    assert rs.images == [g[0] for g in gallery] and rs.queried_images == [0, 1, 2, 3]
    assert rs.txt2img == [[0], [1, 0], [2], [3]] and rs.img2txt[5] == []
    res = evaluate_retrieval(
        model, rs, _tokenizer(texts), _load_image, RetrievalEvalConfig(rerank=False)
    )
    sim = F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).t()
    expect = t2i_metrics(sim.t(), rs.txt2img)
    assert {k: res.pre_rank[k] for k in expect} == pytest.approx(expect)
    assert res.pre_rank["mean_recall"] == pytest.approx(
        np.mean([expect[f"t2i_r{k}"] for k in (1, 5, 10)])
    )
    # the distractors are in the pool: queries 1-3 miss at R@1 (only query 0 hits)
    assert res.pre_rank["t2i_r1"] == pytest.approx(25.0)
    named = RetrievalSet.from_records(recs, protocol="t2i")  # the old, easier gallery
    easy = set_metrics(named, sim[:4])
    assert easy["t2i_r1"] > res.pre_rank["t2i_r1"]
    assert (
        res.to_dict()["protocol"] == "t2i"
        and "t2i_r1 t2i_r5 t2i_r10" in res.to_dict()["mean_recall_of"]
    )
    with pytest.raises(ValueError, match="no text"):
        RetrievalSet.from_records(recs, gallery)  # a gallery needs the t2i protocol
    # re-ranking: i2t re-ranks only the queried images, t2i every query
    res2 = evaluate_retrieval(model, rs, _tokenizer(texts), _load_image, RetrievalEvalConfig(k=3))
    assert torch.equal(res2.scores_i2t[4:], res2.sim_i2t[4:])
    assert not torch.equal(res2.scores_i2t[:4], res2.sim_i2t[:4])


def test_prd2_retrieval_is_pre_rank_only_with_a_note():
    _recs, rs = _caption_set(5, 2)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(5, 4, generator=g)
    model = StubModel(
        img,
        img[torch.arange(10) // 2] + 0.3 * torch.randn(10, 4, generator=g),
        torch.zeros(5, 10),
        has_cross=False,
    )
    model.itm_logits = None  # a PRD2 model must never reach the cross encoders
    res = evaluate_retrieval(model, rs, _tokenizer(rs.texts), _load_image, RetrievalEvalConfig(k=4))
    assert res.two_stage is None and res.scores_i2t is None
    assert any("no cross encoders" in n for n in res.notes)
    assert res.to_dict()["notes"] == res.notes
    with pytest.raises(ValueError, match="PRD2"):
        evaluate_matching(
            StubModel(img, img, torch.zeros(5, 5), has_cross=False),
            [Rec("img/0.jpg", rs.texts[0], "0", 1)],
            _tokenizer(rs.texts),
            _load_image,
        )


def _dist_eval_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, rs, texts = _eval_fixture()
        loaded = []

        def load(path):
            loaded.append(path)
            return _load_image(path)

        res = evaluate_retrieval(
            model, rs, _tokenizer(texts), load, RetrievalEvalConfig(k=3, batch_size=2, pair_batch=4)
        )
        torch.save(
            (res.pre_rank, res.two_stage, res.scores_i2t, res.scores_t2i, loaded),
            os.path.join(out_dir, f"eval_{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _eval_fixture():
    _recs, rs = _caption_set(7, 2)  # 7 images over 3 ranks: shards 3, 3, 1
    g = torch.Generator().manual_seed(11)
    img = torch.randn(7, 6, generator=g)
    owner = torch.arange(14) // 2
    itm = torch.where(owner[None, :] == torch.arange(7)[:, None], 4.0, -4.0) + torch.randn(
        7, 14, generator=g
    )
    return StubModel(img, img[owner] + 1.0 * torch.randn(14, 6, generator=g), itm), rs, rs.texts


@pytest.mark.distributed
def test_evaluate_retrieval_distributed_shards_the_images_and_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    world = 3
    mp.spawn(_dist_eval_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    model, rs, texts = _eval_fixture()
    ref = evaluate_retrieval(
        model,
        rs,
        _tokenizer(texts),
        _load_image,
        RetrievalEvalConfig(k=3, batch_size=2, pair_batch=4),
    )
    seen = []
    for r in range(world):
        pre, two, s_i2t, s_t2i, loaded = torch.load(tmp_path / f"eval_{r}.pt")
        assert pre == ref.pre_rank and two == ref.two_stage
        assert torch.allclose(s_i2t, ref.scores_i2t, atol=1e-6) and torch.allclose(
            s_t2i, ref.scores_t2i, atol=1e-6
        )
        start, end = shard_rows(len(rs.images), r, world)
        assert loaded == rs.images[start:end]  # each rank decoded its own image shard, nothing more
        seen += loaded
    assert seen == rs.images
