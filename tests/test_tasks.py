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
