"""The end-of-run evaluation of ``r2d2 pretrain`` / ``finetune`` (``train.eval_at_end``):
dual-encoder retrieval on the held-out split, with the same image checks as ``r2d2 eval``."""

from __future__ import annotations

import json
import os

from r2d2.dist import dist_info
from r2d2.engine.data.loader import read_eval
from r2d2.engine.data.records import DataError
from r2d2.engine.data.synthetic import open_image
from r2d2.engine.data.transforms import eval_transform
from r2d2.engine.tasks.evaluate import drop_undecodable
from r2d2.engine.tasks.retrieval import RetrievalEvalConfig, RetrievalSet, evaluate_retrieval


def heldout_image_loader(image_size: int):
    """``key -> [3, H, W]`` tensor through the eval transform (synthetic keys rendered on a
    canvas of at least 64 px, as in training)."""
    tf = eval_transform(image_size)
    canvas = max(64, image_size)
    return lambda key: tf(open_image(key, canvas))


def read_heldout(data_cfg, load) -> tuple:
    """``(read, records, mismatched)``: the held-out split's records whose images ``load``
    decodes, without matching sets' mismatched pairs (label 0: no ground truth for retrieval,
    no reference caption, no prompt of their image); undecodable images are counted in
    ``read`` as ``corrupt_image``, ``mismatched`` is how many label-0 pairs were left out."""
    read = read_eval(data_cfg)
    records = [r for r in read.records if r.label != 0]
    mismatched = len(read.records) - len(records)
    read, records, _ = drop_undecodable(read, records, None, load)
    return read, records, mismatched


def no_eval_reason(cfg, model) -> str | None:
    """Why ``train.eval_at_end`` cannot evaluate this run (one line), or None when it can."""
    d = cfg.data
    if not hasattr(model, "encode_image"):
        return f"the model ({type(model).__name__}) has no encode_image"
    if d.format != "synthetic" and not d.eval_path:
        return (
            f"data.eval_path is not set (data.format={d.format} has no built-in held-out split); "
            "set it to a held-out annotation file, or --train.eval_at_end=false"
        )
    return None


def evaluate_heldout(trainer, out: str, model=None) -> dict | None:
    """Dual-encoder retrieval on the held-out split (zero-shot after pretrain); prints R@1/5/10
    under a heading that says which, writes eval.json.

    Like ``r2d2 eval``, every held-out image is loaded once up front (each rank a share); one that
    is present but does not decode is left out with its pairs and counted (``corrupt_image``),
    beside what the reader skipped (missing images, empty captions), in eval.json's ``skipped`` /
    ``skip_reasons`` and the printed summary. Matching sets' mismatched pairs (label 0) are no
    retrieval ground truth and are left out too. Returns None (after one printed line saying why)
    when there is nothing to evaluate."""
    from r2d2.engine.objective import task_module  # the objective module imports the tasks

    mod = task_module(trainer.cfg.train.task)
    if mod is not None:  # captioning, text-to-image: their own held-out evaluation
        return mod.evaluate_heldout(trainer, out, model)
    model = trainer.model if model is None else model
    rank, _ = dist_info()
    why = no_eval_reason(trainer.cfg, model)
    if why is not None:
        if rank == 0:
            print(f"no end-of-run evaluation: {why}", flush=True)
        return None
    load = heldout_image_loader(trainer.image_size)
    read, records, mismatched = read_heldout(trainer.cfg.data, load)
    reasons = read.reasons
    skipped = sum(reasons.values())
    where = trainer.cfg.data.eval_path or "the synthetic held-out split"
    if not records:
        raise DataError(
            f"end-of-run evaluation: no usable pair in {where} (skipped {skipped}: "
            f"{dict(reasons)}); the trained model is in {os.path.join(out, 'model')}"
        )
    rset = RetrievalSet.from_records(records)
    k = trainer.cfg.train.eval_rerank_k
    rerank = k > 0 and getattr(getattr(model, "config", None), "has_cross", False)
    res = evaluate_retrieval(
        model,
        rset,
        trainer.tokenize,
        load,
        RetrievalEvalConfig(k=max(k, 1), rerank=rerank, image_cache_dtype="float32"),
    )
    m = res.pre_rank
    task = trainer.cfg.train.task
    # by what it is: a pre-trained model meets the held-out set zero-shot; a fine-tuned one was
    # trained for it (retrieval) or next to it (matching: the ITM heads, evaluated here as
    # dual-encoder retrieval)
    title = "zero-shot retrieval" if task == "pretrain" else f"retrieval after {task} fine-tuning"
    report = {
        "evaluation": title,
        "split": "held-out",
        "n_images": res.n_images,
        "n_texts": res.n_texts,
        "chance_r1_i2t": 100.0
        * sum(len(t) for t in rset.img2txt)
        / len(rset.img2txt)
        / res.n_texts,
        "chance_r1_t2i": 100.0
        * sum(len(i) for i in rset.txt2img)
        / len(rset.txt2img)
        / res.n_images,
        **m,
        "skipped": skipped,
        "skip_reasons": dict(reasons),
    }
    if mismatched:
        report["mismatched_pairs_left_out"] = mismatched
    if res.two_stage is not None:
        report["rerank_k"] = k
        report["pre_rank+rank"] = res.two_stage
    if rank == 0:
        with open(os.path.join(out, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(
            f"{report['evaluation']} on {res.n_images} held-out images / {res.n_texts} texts "
            f"(chance R@1 ~ {report['chance_r1_i2t']:.1f}% i2t, {report['chance_r1_t2i']:.1f}% t2i):"
        )
        if skipped:
            print(f"  skipped {skipped} held-out pairs of {where}: {dict(reasons)}")
        rows = [("pre-rank", m)]
        if res.two_stage is not None:
            rows.append((f"pre-rank + ITM re-rank of the top {k}", res.two_stage))
        for title, r in rows:
            if len(rows) > 1:
                print(f"  {title}:")
            print(
                f"  image->text  R@1 {r['i2t_r1']:.1f}  R@5 {r['i2t_r5']:.1f}  R@10 {r['i2t_r10']:.1f}"
            )
            print(
                f"  text->image  R@1 {r['t2i_r1']:.1f}  R@5 {r['t2i_r5']:.1f}  R@10 {r['t2i_r10']:.1f}"
            )
            print(f"  mean recall {r['mean_recall']:.1f}", flush=True)
    return report
