"""r2d2.engine.metrics against hand-computed cases and brute-force oracles."""

import numpy as np
import pytest
import torch

from r2d2.engine.metrics import (
    auc,
    binary_accuracy,
    ranks_of_targets,
    retrieval_metrics,
    t2i_metrics,
    topk_accuracy,
)


def test_retrieval_hand_case_multi_caption():
    # 2 images, 4 texts; texts 0,1 describe image 0, texts 2,3 image 1.
    sim = np.array(
        [
            [0.1, 0.9, 0.8, 0.0],  # image 0: best text 1 (correct) -> rank 0
            [0.7, 0.2, 0.3, 0.1],  # image 1: order 0,2,1,3 -> best correct (2) at rank 1
        ]
    )
    m = retrieval_metrics(sim, [[0, 1], [2, 3]], [0, 0, 1, 1], ks=(1, 2))
    assert m["i2t_r1"] == pytest.approx(50.0)
    assert m["i2t_r2"] == pytest.approx(100.0)
    # text columns: t0 -> [0.1,0.7] picks image 1 (wrong); t1 -> image 0 ok; t2 -> image 0 wrong;
    # t3 -> [0.0,0.1] picks image 1 ok. R@1 = 2/4; R@2 = 4/4 (only two images)
    assert m["t2i_r1"] == pytest.approx(50.0)
    assert m["t2i_r2"] == pytest.approx(100.0)
    assert m["mean_recall"] == pytest.approx(75.0)


@pytest.mark.parametrize(
    "convert",
    [
        lambda x: x,  # lists
        lambda x: torch.tensor(x),  # torch tensors (txt2img as a LongTensor raised)
        lambda x: np.asarray(x),  # numpy arrays
        lambda x: [torch.tensor(v) for v in x],  # a list of 0-d / 1-d tensors
    ],
)
def test_ground_truth_as_tensors_arrays_or_lists(convert):
    sim = np.array([[0.1, 0.9, 0.8, 0.0], [0.7, 0.2, 0.3, 0.1]])
    ref = retrieval_metrics(sim, [[0, 1], [2, 3]], [0, 0, 1, 1], ks=(1, 2))
    got = retrieval_metrics(
        torch.tensor(sim), convert([[0, 1], [2, 3]]), convert([0, 0, 1, 1]), ks=(1, 2)
    )
    assert got == ref
    assert t2i_metrics(sim.T, convert([0, 0, 1, 1]), ks=(1,)) == t2i_metrics(
        sim.T, [0, 0, 1, 1], ks=(1,)
    )
    assert ranks_of_targets(torch.tensor(sim), convert([[0, 1], [2, 3]])).tolist() == [0, 1]
    with pytest.raises(TypeError, match="integer indices"):
        retrieval_metrics(sim, [[0.5, 1], [2, 3]], [0, 0, 1, 1])
    with pytest.raises(TypeError, match="bool"):
        retrieval_metrics(sim, [[0, 1], [2, 3]], [True, 0, 1, 1])


def test_retrieval_default_keys_and_torch_input():
    sim = torch.eye(12)
    m = retrieval_metrics(sim, [[i] for i in range(12)], list(range(12)))
    assert set(m) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"}
    assert all(v == 100.0 for v in m.values())


def test_ties_lower_index_wins():
    # Constant scores: the stable order is the index order, so the correct item of row r sits at
    # rank r; R@1 is 1/3 (only row 0), R@2 is 2/3.
    sim = np.zeros((3, 3))
    m = retrieval_metrics(sim, [[0], [1], [2]], [0, 1, 2], ks=(1, 2))
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["t2i_r2"] == pytest.approx(200 / 3)
    # a tie between the correct item (index 2) and a wrong one with a lower index (0): wrong wins
    assert ranks_of_targets(np.array([[0.5, 0.1, 0.5]]), [[2]]).tolist() == [1]
    assert ranks_of_targets(np.array([[0.5, 0.1, 0.5]]), [[0]]).tolist() == [0]


def test_ranks_match_brute_force_random():
    rng = np.random.default_rng(1)
    sim = rng.integers(0, 4, size=(9, 23)).astype(float)  # many ties on purpose
    img2txt = [
        sorted(rng.choice(23, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(9)
    ]
    ranks = ranks_of_targets(sim, img2txt)

    def rank(r, c):  # items ranked before c: strictly better, or equal with a lower index
        return int(((sim[r] > sim[r, c]) | ((sim[r] == sim[r, c]) & (np.arange(23) < c))).sum())

    for r, cols in enumerate(img2txt):
        assert ranks[r] == min(rank(r, c) for c in cols)


def test_retrieval_bad_input():
    with pytest.raises(ValueError, match="img2txt has 1"):
        retrieval_metrics(np.zeros((2, 2)), [[0]], [0, 1])
    with pytest.raises(ValueError, match="txt2img"):
        retrieval_metrics(np.zeros((2, 2)), [[0], [1]], [0])
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics(np.zeros((2, 2)), [[0], [5]], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0], [0, 0]]), [[0], [1]], [0, 1])
    with pytest.raises(ValueError, match="no correct"):
        retrieval_metrics(np.zeros((2, 2)), [[0], []], [0, 1])


def test_t2i_metrics_multiple_correct():
    sim = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    m = t2i_metrics(sim, [[1, 2], 0], ks=(1, 3))
    # query 0: order 0,1,2 -> best correct (1) at rank 1; query 1: order 2,1,0 -> 0 at rank 2
    assert m["t2i_r1"] == 0.0 and m["t2i_r3"] == 100.0 and m["mean_recall"] == 50.0


@pytest.mark.parametrize(
    "scores,labels,expected",
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # sklearn docs example
        ([1, 2, 2, 3], [0, 0, 1, 1], 0.875),  # pos 2 ties neg 2 -> half a pair
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied
        ([3, 2, 1], [1, 0, 0], 1.0),
        ([3, 2, 1], [0, 1, 1], 0.0),
    ],
)
def test_auc_hand_cases(scores, labels, expected):
    assert auc(scores, labels) == pytest.approx(expected)


def test_auc_matches_pairwise_oracle():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, size=40).astype(float)
    y = rng.integers(0, 2, size=40)
    pos, neg = s[y == 1], s[y == 0]
    oracle = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(torch.tensor(s), torch.tensor(y)) == pytest.approx(oracle)


def test_average_ranks_match_scipy_rankdata():
    from scipy.stats import rankdata

    from r2d2.engine.metrics import _average_ranks

    rng = np.random.default_rng(4)
    for _ in range(50):
        x = rng.integers(0, 4, size=int(rng.integers(1, 30))).astype(float)  # ties on purpose
        assert np.array_equal(_average_ranks(x), rankdata(x))


def test_auc_bad_input():
    with pytest.raises(ValueError, match="one class"):
        auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="shape"):
        auc([0.1, 0.2, 0.3], [0, 1])


def test_binary_and_topk_accuracy():
    assert binary_accuracy([0.9, 0.5, 0.49, 0.1], [1, 1, 1, 0]) == pytest.approx(75.0)
    logits = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.3], [0.9, 0.05, 0.05]])
    acc = topk_accuracy(logits, [2, 1, 0], ks=(1, 2))
    # row 0: order 1,2,0 -> target 2 at rank 1; row 1 all tied -> target 1 at rank 1; row 2 rank 0
    assert acc == {"top1": pytest.approx(100 / 3), "top2": pytest.approx(100.0)}
    with pytest.raises(ValueError, match="out of range"):
        topk_accuracy(logits, [3, 0, 0])


def test_separate_t2i_matrix_and_multi_image_texts():
    sim_i2t = np.array([[0.9, 0.1], [0.2, 0.8]])  # i2t perfect
    sim_t2i = np.array([[0.1, 0.9], [0.7, 0.3]])  # t2i: both texts pick the wrong image
    m = retrieval_metrics(sim_i2t, [[0], [1]], [0, 1], ks=(1,), sim_t2i=sim_t2i)
    assert m == {"i2t_r1": 100.0, "t2i_r1": 0.0, "mean_recall": 50.0}
    # the same t2i matrix, but text 0 is also a correct description of image 1 -> hit
    m = retrieval_metrics(sim_i2t, [[0], [1, 0]], [[0, 1], 1], ks=(1,), sim_t2i=sim_t2i)
    assert m["t2i_r1"] == 50.0
    with pytest.raises(ValueError, match="sim_t2i has shape"):
        retrieval_metrics(sim_i2t, [[0], [1]], [0, 1], sim_t2i=np.zeros((3, 2)))


def test_float64_tensor_scores_keep_their_precision():
    """A 1e-12 margin between two texts is a real order in float64; a cast to float32 used to
    make it a tie (then the lower index wins) and give image 0 a miss."""
    import torch

    from r2d2.engine.metrics import retrieval_metrics

    sim = torch.tensor([[1.0, 1.0 + 1e-12], [0.0, 0.0]], dtype=torch.float64)
    img2txt, txt2img = [[1], [0]], [1, 0]
    assert retrieval_metrics(sim, img2txt, txt2img)["i2t_r1"] == 100.0
    assert retrieval_metrics(sim.numpy(), img2txt, txt2img)["i2t_r1"] == 100.0
    assert retrieval_metrics(sim.float(), img2txt, txt2img)["i2t_r1"] == 50.0  # the tie in fp32
