"""``train.task=caption``: the trainer's two entry points (see :data:`r2d2.engine.objective.TASK_MODULES`).

``build_objective(cfg, model)``   the R2D2 model (already initialised from ``train.init_from``)
                                  becomes an :class:`R2D2Captioner` (decoder copied from its
                                  text-image cross encoder) inside a :class:`CaptionObjective`
``evaluate_heldout(trainer, out, model)``  the end-of-run evaluation: captions of the held-out
                                  split scored with BLEU / ROUGE-L / CIDEr-D, next to the two
                                  baselines, into ``<out>/caption_eval.json`` and stdout
"""

from __future__ import annotations

import os

from torch import nn

from r2d2.dist import dist_info
from r2d2.engine.data.records import DataError
from r2d2.engine.errors import TrainingError
from r2d2.engine.model.captioner import R2D2Captioner, prompt_token_ids
from r2d2.engine.tasks.caption.objective import CaptionObjective


def build_objective(cfg, model: nn.Module) -> CaptionObjective:
    """The captioning objective around a captioner made from ``model``."""
    from r2d2.engine.tokenizer import build_tokenizer

    c = cfg.caption
    try:
        captioner = R2D2Captioner.from_r2d2(model, c)
    except ValueError as e:  # a PRD2 model: no cross encoder to decode with
        raise TrainingError(f"train.task=caption: {e}") from None
    tc = captioner.config.text
    tok = build_tokenizer(cfg.data.vocab, max_length=tc.max_positions)
    prompt = prompt_token_ids(tok, c.prompt)
    if cfg.data.max_text_len + len(prompt) > tc.max_positions:
        raise TrainingError(
            f"data.max_text_len={cfg.data.max_text_len} + the {len(prompt)} tokens of "
            f"caption.prompt exceed text.max_positions={tc.max_positions}"
        )
    if cfg.train.freeze_image_encoder:
        captioner.visual.requires_grad_(False)
    return CaptionObjective(captioner, c.label_smoothing, prompt, cfg.data.max_text_len)


def evaluate_heldout(trainer, out: str, model=None) -> dict | None:
    """Caption the held-out split (the synthetic ``eval`` split, or ``data.eval_path``), score
    it and the baselines (training captions of ``data``), write ``caption_eval.json``."""
    from r2d2.engine.tasks.caption import evaluate as ev
    from r2d2.engine.tasks.heldout import heldout_image_loader, read_heldout

    cfg = trainer.cfg
    model = trainer.model if model is None else model
    rank, _ = dist_info()
    if cfg.data.format != "synthetic" and not cfg.data.eval_path:
        if rank == 0:
            print(
                "no end-of-run evaluation: data.eval_path is not set (the held-out captions); "
                "set it, or --train.eval_at_end=false",
                flush=True,
            )
        return None
    if getattr(model, "tokenizer", None) is None:
        model.tokenizer = trainer.tokenizer
    load = heldout_image_loader(trainer.image_size)
    read, records, _ = read_heldout(cfg.data, load)
    where = cfg.data.eval_path or "the synthetic held-out split"
    if not records:
        raise DataError(
            f"end-of-run evaluation: no usable caption in {where} (skipped {read.skipped}: "
            f"{dict(read.reasons)}); the trained model is in {os.path.join(out, 'model')}"
        )
    train = ev.train_records_of(cfg.data) if cfg.caption.baselines else None
    report = ev.evaluate_captions(
        model, records, load, cfg.caption, train, read.skipped, dict(read.reasons)
    )
    report["split"] = where
    if rank == 0:
        ev.write_report(report, out)
        ev.print_report(report, where)
    return report
