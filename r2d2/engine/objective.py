"""What a run trains and what it hands on: the objective of ``train.task`` around a model built
from the config (optionally initialised from ``train.init_from``), the input files the config
names, and the ``save_pretrained`` export at the end."""

from __future__ import annotations

import importlib
import os
import pickle

from safetensors import SafetensorError
from torch import nn

from r2d2.dist import dist_info
from r2d2.engine.checkpoint import load_weights
from r2d2.engine.config import RunConfig
from r2d2.engine.errors import TrainingError
from r2d2.engine.losses import R2D2ForPretraining
from r2d2.engine.model import R2D2Model
from r2d2.engine.tasks.matching import MatchingObjective

# Tasks that train something beyond R2D2's own heads: each module provides
# ``build_objective(cfg, model) -> nn.Module`` (the R2D2 model, already initialised from
# ``train.init_from``, in; the objective out, its ``.model`` what the run exports with
# ``save_pretrained``) and ``evaluate_heldout(trainer, out, model)`` (the end-of-run evaluation).
TASK_MODULES = {
    "caption": "r2d2.engine.tasks.caption.task",
    "t2i": "r2d2.engine.tasks.t2i.task",
}


def task_module(task: str):
    """The module of a ``TASK_MODULES`` task, or None for R2D2's own tasks."""
    name = TASK_MODULES.get(task)
    return None if name is None else importlib.import_module(name)


def build_objective(cfg: RunConfig) -> nn.Module:
    """The model wrapped in the objective of ``train.task``: the pre-training objective (also
    for retrieval fine-tuning), the ITM matching objective, or a ``TASK_MODULES`` task's."""
    model = R2D2Model(cfg.model, kernels=cfg.kernels)
    if cfg.train.init_from:
        try:
            load_init(model, cfg.train.init_from)
        except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            # unreadable, not a checkpoint, or not weights of this model: one line
            msg = str(e).strip().splitlines()
            msg = msg[0] if msg else type(e).__name__
            if isinstance(e, (EOFError, pickle.UnpicklingError)):
                msg = f"not a checkpoint file ({msg})"
            if not msg.startswith("train.init_from="):
                msg = f"train.init_from={cfg.train.init_from!r}: {msg}"
            raise TrainingError(msg) from None
    mod = task_module(cfg.train.task)
    if mod is not None:
        return mod.build_objective(cfg, model)
    if cfg.train.task in ("pretrain", "retrieval"):
        if cfg.train.freeze_image_encoder:
            # The official retrieval fine-tuning: the ViT is fixed (no graph, no optimizer state);
            # vision_proj, the text encoder and the cross encoders train.
            model.visual.requires_grad_(False)
        return R2D2ForPretraining(model, cfg.loss)
    return MatchingObjective(model, freeze_image_encoder=cfg.train.freeze_image_encoder)


def missing_input_file(cfg: RunConfig) -> str | None:
    """What is wrong with the files a config names besides the data (``data.vocab``,
    ``train.init_from``), one line naming the field, or None when they exist. (Not checked at
    config time: a saved config is loaded on machines without them, e.g. to compare.)"""
    v = cfg.data.vocab
    if v is not None and not os.path.isfile(v):
        return (
            f"data.vocab={v!r}: no such file (expected a BERT vocab.txt, one token per "
            "line; null = the built-in vocabulary)"
        )
    p = cfg.train.init_from
    if p and not os.path.exists(p):
        rel = "" if os.path.isabs(p) else f", relative to the current directory {os.getcwd()}"
        return (
            f"train.init_from={p!r}: no such file or directory{rel} (expected a "
            "save_pretrained folder such as <run>/model, a run folder or a checkpoint file)"
        )
    return None


def check_input_files(cfg: RunConfig) -> None:
    """:func:`missing_input_file` as a :class:`TrainingError`, before the model is built."""
    msg = missing_input_file(cfg)
    if msg is not None:
        raise TrainingError(msg)


def load_init(model: nn.Module, path: str) -> None:
    """Weights to start from: a ``save_pretrained`` directory or a training checkpoint. Weights
    that do not fit the model (another preset) are a ValueError naming the first mismatches."""
    strict = os.path.isfile(os.path.join(path, "config.json")) and hasattr(
        type(model), "from_pretrained"
    )
    if strict:  # a whole model: every weight must be there
        try:
            sd = type(model).from_pretrained(path).state_dict()
        except SafetensorError as e:  # e.g. a pickle renamed model.safetensors: never unpickled
            raise ValueError(
                f"train.init_from={path!r}: model.safetensors is not a safetensors file ({e})"
            ) from None
    else:
        sd = load_weights(path)
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    own = model.state_dict()
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    if shapes or unexpected or len(missing) == len(own) or (strict and missing):
        raise ValueError(
            f"train.init_from={path!r}: the weights do not fit the model of the config "
            f"(model.preset and overrides): shape mismatches {shapes[:3]}, unexpected "
            f"{unexpected[:3]}, missing {len(missing)} of {len(own)} {missing[:3]}"
        )
    model.load_state_dict(sd, strict=False)


def export_pretrained(model: nn.Module, tokenizer, path: str) -> None:
    """``save_pretrained`` of the student model (rank 0), with the tokenizer's vocabulary."""
    rank, _ = dist_info()
    if rank != 0 or not hasattr(model, "save_pretrained"):
        return
    if getattr(model, "tokenizer", None) is None and tokenizer is not None:
        model.tokenizer = tokenizer  # so save_pretrained writes vocab.txt next to the weights
    model.save_pretrained(path)
