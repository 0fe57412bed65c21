"""The trainer's entry points for ``train.task=t2i`` (``objective.TASK_MODULES``):
:func:`build_objective` wraps the initialised R2D2 model in a text-to-image generator and its
diffusion loss; :func:`evaluate_heldout` is the end-of-run evaluation (:mod:`.evaluate`).

The generator's EMA lives inside the objective's model (a submodule), so checkpoints carry it and
``--resume`` restores it; the trainer calls :meth:`T2IObjective.ema_update` after every optimizer
step, the hook the pre-training objective's EMA teacher uses. FSDP is refused by the trainer
(the generator has no ``unsharded_twin`` to export into): text-to-image trains with DDP.
"""

from __future__ import annotations

import torch
from torch import nn

from r2d2.dist import dist_info
from r2d2.engine.config import RunConfig


class T2IObjective(nn.Module):
    """``objective(batch) -> {"loss"}``: the diffusion loss of the batch's images given their
    captions; ``.model`` is the :class:`~.model.T2IModel` the run exports."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model.loss(batch["images"], batch["input_ids"], batch["attention_mask"])
        return {"loss": out["loss"]}

    def ema_update(self) -> None:
        self.model.ema_update()


def build_objective(cfg: RunConfig, model) -> T2IObjective:
    """The generator around ``model`` (an initialised R2D2Model: its text encoder conditions)."""
    from r2d2.engine.tasks.t2i.model import T2IModel, T2IModelConfig, diffusers_module

    diffusers_module()  # one line naming the extra when diffusers is missing
    if not cfg.train.init_from:
        print(
            "train.init_from is unset: the R2D2 text encoder that conditions the generator is "
            "randomly initialised",
            flush=True,
        )
    size = cfg.data.image_size or model.config.vision.image_size
    mcfg = T2IModelConfig(cfg.t2i, image_size=size, max_text_len=cfg.data.max_text_len)
    return T2IObjective(T2IModel(model, mcfg))


def evaluate_heldout(trainer, out: str, model=None) -> dict | None:
    """Generate for held-out prompts and score them (rank 0; the others return None): writes
    ``t2i_eval.json``, ``grid.png`` (+ ``grid.txt``) and ``samples/`` into the run folder."""
    from r2d2.engine.data.loader import Tokenize
    from r2d2.engine.data.records import DataError
    from r2d2.engine.data.synthetic import open_image
    from r2d2.engine.data.transforms import resize_center_crop
    from r2d2.engine.model import R2D2Model
    from r2d2.engine.tasks.heldout import read_heldout
    from r2d2.engine.tasks.t2i.evaluate import evaluate_t2i

    if dist_info()[0] != 0:
        return None
    cfg = trainer.cfg
    model = trainer.model if model is None else model
    size = model.config.image_size
    canvas = max(64, size)

    def load(key: str):  # PIL images: the generator's real-image reference, not a model input
        return resize_center_crop(open_image(key, canvas), size)

    read, records, _ = read_heldout(cfg.data, load)
    if not records:
        raise DataError(
            f"end-of-run evaluation: no usable held-out pair (skipped {read.skipped}: "
            f"{dict(read.reasons)}); the trained model is in {out}/model"
        )
    if cfg.t2i.evaluator:
        evaluator = R2D2Model.from_pretrained(cfg.t2i.evaluator).to(trainer.device).eval()
    else:
        evaluator = model.r2d2
    tok = getattr(evaluator, "tokenizer", None) or trainer.tokenizer
    tokenize = Tokenize(tok, cfg.data.max_text_len)
    was_training = model.training
    model.eval()
    try:
        report = evaluate_t2i(model, evaluator, records, cfg.t2i, tokenize, load, out)
    finally:
        model.train(was_training)
    if read.skipped:
        report["skipped"], report["skip_reasons"] = read.skipped, dict(read.reasons)
    return report
