"""End to end on the engine: retrieval fine-tuning (GCPR + FGR) of the tiny preset on the embedded
synthetic set with the Trainer, then two-stage evaluation of held-out pairs. Slow (a few CPU
minutes): ``pytest -m slow tests/tasks/test_retrieval_e2e.py``."""

import os

import pytest

from _helpers.eval_stubs import Rec

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "r2d2", "configs")

# The recipe and the held-out set; the measured margins below are for exactly these.
RECIPE = [
    "--train.task=retrieval",
    "--train.max_steps=600",
    "--data.batch_size=32",
    "--model.vision.image_size=64",
    "--model.temperature_min=0.05",
    "--train.deterministic=true",
    "--loss.mlm=false",
    "--loss.tgd=false",
    "--loss.fgd=false",
    "--loss.fgr_weight=4.0",
    "--optim.lr=2e-3",
    "--optim.warmup_steps=10",
    "--data.synthetic_eval_size=1024",
    "--train.checkpoint_every=0",
    "--train.log_every=50",
    "--logging.progress=false",
    "--logging.tensorboard=false",
    "--logging.plot=false",
]
RERANK_K = 8


def _twin_pairs(recs):
    """Matching pairs for the cross encoders' hard case: every held-out image with its caption
    (label 1) and with the caption of another held-out image of the same two colours but another
    shape or count (label 0), the confusion that remains after training."""
    from r2d2.engine.data.synthetic import attributes, parse_key

    key = [attributes(*parse_key(r.image)) for r in recs]
    pairs = []
    for i, r in enumerate(recs):
        twin = next(
            (
                recs[j].text
                for j in range(len(recs))
                if j != i
                and recs[j].text != r.text
                and (key[j]["bg"], key[j]["fg"]) == (key[i]["bg"], key[i]["fg"])
            ),
            None,
        )
        if twin is not None:
            pairs += [Rec(r.image, r.text, r.image_id, 1), Rec(r.image, twin, r.image_id, 0)]
    return pairs


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_finetune_then_two_stage_at_least_as_good_as_prerank(tmp_path):
    """After retrieval fine-tuning, pre-rank + ITM re-rank of the top 8 beats pre-rank alone on
    1,024 held-out pairs (1,024 images, 439 distinct captions; chance R@1 about 0.2%), where
    R@1 and R@5 are far from saturated (pre-rank R@1 20-30%).

    Measured with this recipe (train.seed 0 / 1 / 2; one thread, deterministic algorithms;
    2026-12-01, torch 2.13.0 CPU): pre-rank mean recall 67.3 / 63.0 / 68.0, pre-rank + rank
    71.0 / 68.5 / 72.1 (+3.7 / +5.5 / +4.1); i2t R@1 +2.7 / +6.5 / +6.1, t2i R@1 +7.1 / +7.7 /
    +7.1. Seed 0 with two threads and no deterministic algorithms (another float reduction
    order for 600 steps, so in effect another model): 67.6 -> 70.1 (+2.5), i2t R@1 +3.8, t2i
    R@1 +1.8. The test trains seed 0 (the one-thread run reproduces its numbers exactly, three
    runs) and requires +1.0 mean recall and no loss at R@1 either way: under half the smallest
    margin measured, so a different machine's float noise cannot flip it.

    Why ``model.temperature_min=0.05``: with the learned temperature free, it collapses to about
    0.005 on this toy set, the cosines inside a query's top 8 then differ by about 0.01, so
    ``p + cosine`` is decided by p alone, and the tiny cross encoders rank about as well as the
    dual encoders do: the two-stage minus pre-rank mean recall measured -2.4 to +1.1 over seeds,
    set sizes (128 / 512 / 1,024) and recipe variants (600 / 1,200 steps, two cross layers, FGR
    weight 10, GCPR weight 0.25, batch 64, a frozen ViT, a 0.02 floor), i.e. no gain. The previous version of this test (128 held-out pairs, R@5/R@10 at 100,
    learned temperature) claimed 89.6 vs 88.2 and t2i R@1 65.2 -> 70.4 at seed 0; on this
    machine the same code (also at the commit that measured it) gives 86.8 vs 87.0 and t2i R@1
    60.0 -> 60.0, and seed 1 gives 89.6 vs 88.9: its margin was one or two queries of
    environment-dependent float noise. With the temperature floored the dual encoders are
    softer while the cross encoders, trained on hard negatives, are as good as before (on 512
    held-out pairs ITM alone picks the right image among a text's top 8 for 43% of the texts
    either way), so re-ranking helps by a clear margin. Note what this does not show: the
    two-stage score here does not beat the best pre-ranking this CPU budget reaches with a free
    temperature (72-75 mean recall at 1,024)."""
    import torch

    from r2d2.engine.config import load_config
    from r2d2.engine.data.loader import eval_records
    from r2d2.engine.data.synthetic import open_image
    from r2d2.engine.data.transforms import eval_transform
    from r2d2.engine.tasks.matching import evaluate_matching
    from r2d2.engine.tasks.retrieval import RetrievalEvalConfig, RetrievalSet, evaluate_retrieval
    from r2d2.engine.trainer import Trainer

    cfg = load_config(os.path.join(CONFIGS, "tiny.yaml"), RECIPE + ["--train.seed=0"])
    trainer = Trainer(cfg, str(tmp_path / "run"))
    trainer.fit()
    recs = eval_records(cfg.data)
    rs = RetrievalSet.from_records(recs)
    tf = eval_transform(trainer.image_size)

    def load(key):
        return tf(open_image(key, 64))

    res = evaluate_retrieval(
        trainer.model,
        rs,
        trainer.tokenize,
        load,
        RetrievalEvalConfig(k=RERANK_K, batch_size=128, pair_batch=512),
    )
    pre, two = res.pre_rank, res.two_stage
    print("pre-rank", pre, "\npre-rank + rank", two)
    assert (res.n_images, res.n_texts) == (1024, 439)
    assert pre["t2i_r1"] > 15 and pre["i2t_r1"] > 15, pre  # the dual encoders learned (chance 0.2%)
    assert pre["i2t_r5"] < 95 and pre["t2i_r5"] < 95, pre  # and the set is not saturated
    itm = evaluate_matching(
        trainer.model, _twin_pairs(recs), trainer.tokenize, load, batch_size=256
    )
    print("ITM on same-colour twins", itm.to_dict())
    # the cross encoders learned shape and count, not colour only (a colour-only ITM: 0.5 here;
    # measured 0.76 at seed 0)
    assert itm.auc > 0.65, itm.to_dict()
    assert two["mean_recall"] >= pre["mean_recall"] + 1.0, (pre, two)
    assert two["i2t_r1"] >= pre["i2t_r1"] and two["t2i_r1"] >= pre["t2i_r1"], (pre, two)
    # re-ranking the top 8 cannot change R@10
    assert two["i2t_r10"] == pre["i2t_r10"] and two["t2i_r10"] == pre["t2i_r10"]
    assert torch.isfinite(res.scores_i2t).all()
