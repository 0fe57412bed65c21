"""The training loop. Components are built by small functions (one job each) and applied to a
plain model in the torchtitan order: activation checkpointing -> compile -> FSDP2 / DDP.

Per optimizer step: ``grad_accum`` micro-batches are fetched first, the usable sample counts are
summed over micro-batches and ranks (one all-reduce), and micro-batch ``i`` of ``n_i`` samples
backpropagates ``loss_i * n_i * world / N`` so the gradient is that of the mean over all ``N``
samples of the step whatever the accumulation, the world size or the skipped samples (DDP divides
by ``world``). The same all-reduce carries each micro-batch's size squared: GCPR all-gathers
equal shapes, so ranks whose micro-batches differ (possible only when a bad sample found no
replacement) stop together with a clear error instead of a collective mismatch or a hang. Then:
non-finite check (skip the step, count it; ``train.max_bad_steps`` in a row stops the run) -> clip
-> AdamW -> schedule -> EMA teacher.

Checkpoints (``r2d2.engine.checkpoint``) are data, read with ``weights_only=True``. One is written
only when the state is trusted: not while non-finite steps are in a row (the checkpoint waits for
the next interval), and never with NaN/Inf in the weights or optimizer state (the run stops,
naming the last good checkpoint). ``--resume`` takes the newest checkpoint that loads, saying
which newer ones it skipped and why.

Resume: the checkpoint's data position is read back and checked (``data.loader.resume_position``),
and the RNG states are restored last, after the data loader has started, so that nothing between
the restore and the first forward draws from them.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from r2d2.dist import dist_info, is_dist
from r2d2.engine.cli import RunError
from r2d2.engine.checkpoint import (CheckpointError, Checkpointer, NonFiniteStateError, TrainState,
                                     set_rng_state)
from r2d2.engine.config import RunConfig
from r2d2.engine.observability import Observer, peak_memory_gb

NO_DECAY_HINTS = ("bias", "norm", "embed", "temp", "logit_scale", "pos_", "cls_token", "ln_")


class TrainingError(RuntimeError, RunError):
    """The run cannot go on (too many bad steps, too many skipped samples, a checkpoint that does
    not load or cannot be written): one line, exit status 1."""


# ---------------------------------------------------------------------------- set-up helpers
def init_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """Join the torchrun group when WORLD_SIZE > 1; returns (rank, world, device)."""
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and cfg.distributed.strategy != "none" and not is_dist():
        backend = cfg.distributed.backend
        if backend == "auto":
            backend = "nccl" if want_cuda else "gloo"
        if want_cuda:
            torch.cuda.set_device(local)
        import datetime

        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    device = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    rank, world = dist_info()
    return rank, world, device


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only; not on norms, biases, embeddings, temperatures."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        low = name.lower()
        (no_decay if p.ndim < 2 or any(h in low for h in NO_DECAY_HINTS) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "true"
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt, cfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block in backward; returns how many blocks were wrapped.
    A model offering ``set_activation_checkpointing(bool)`` does it itself."""
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(True)
        return -1
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac)

    blocks = [m for m in model.modules() if _is_block(m)]
    apply_ac(model, check_fn=_is_block)
    return len(blocks)


def _is_block(m: nn.Module) -> bool:
    name = type(m).__name__
    return name.endswith(("Block", "Layer")) and any(isinstance(c, nn.Linear) for c in m.modules())


def _outermost_blocks(module: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = []
    inner: set[int] = set()
    for m in module.modules():
        if id(m) in inner or not _is_block(m):
            continue
        found.append(m)
        inner.update(id(c) for c in m.modules())
    return found


def shard_fsdp(objective: nn.Module, device: torch.device) -> list[nn.Parameter]:
    """FSDP2: ``fully_shard`` each transformer block (student and teacher alike, so the EMA update
    sees matching shards), then the whole objective. fully_shard cannot shard 0-d parameters (the
    temperature): they stay replicated and are returned, for the trainer to average their
    gradients itself."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    scalars = [p for p in objective.parameters() if p.ndim == 0]
    for m in list(objective.modules()):
        if _is_block(m):
            fully_shard(m, mp_policy=mp)
    fully_shard(objective, mp_policy=mp, ignored_params=set(scalars) or None)
    return [p for p in scalars if p.requires_grad]


def build_objective(cfg: RunConfig) -> nn.Module:
    """The model wrapped in the objective of ``train.task`` (imports are lazy on purpose: the
    model, losses and tasks packages are separate components)."""
    from r2d2.engine.model import R2D2Model

    model = R2D2Model(cfg.model.build_config(), kernels=cfg.kernels)
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
    if cfg.train.task in ("pretrain", "retrieval"):
        from r2d2.engine.losses import R2D2ForPretraining

        if cfg.train.freeze_image_encoder:
            # The official retrieval fine-tuning: the ViT is fixed (no graph, no optimizer state);
            # vision_proj, the text encoder and the cross encoders train.
            model.visual.requires_grad_(False)
        return R2D2ForPretraining(model, cfg.loss.build_config())
    from r2d2.engine.tasks.matching import MatchingObjective

    return MatchingObjective(model, freeze_image_encoder=cfg.train.freeze_image_encoder)


def check_input_files(cfg: RunConfig) -> None:
    """The files a config names besides the data (``data.vocab``, ``train.init_from``) must exist:
    checked before the model is built, each a one-line :class:`TrainingError` naming the field.
    (Not at config time: a saved config is loaded on machines without them, e.g. to compare.)"""
    v = cfg.data.vocab
    if v is not None and not os.path.isfile(v):
        raise TrainingError(f"data.vocab={v!r}: no such file (expected a BERT vocab.txt, one token per "
                            "line; null = the built-in vocabulary)")
    p = cfg.train.init_from
    if p and not os.path.exists(p):
        rel = "" if os.path.isabs(p) else f", relative to the current directory {os.getcwd()}"
        raise TrainingError(f"train.init_from={p!r}: no such file or directory{rel} (expected a "
                            "save_pretrained folder such as <run>/model, a run folder or a checkpoint "
                            "file; configs/finetune_tiny.yaml starts from the demo's runs/demo/model: "
                            "run bash scripts/demo.sh first)")


def load_init(model: nn.Module, path: str) -> None:
    """Weights to start from: a ``save_pretrained`` directory or a training checkpoint. Weights
    that do not fit the model (another preset) are a ValueError naming the first mismatches."""
    strict = os.path.isfile(os.path.join(path, "config.json")) and hasattr(type(model), "from_pretrained")
    if strict:  # a whole model: every weight must be there
        from safetensors import SafetensorError

        try:
            sd = type(model).from_pretrained(path).state_dict()
        except SafetensorError as e:  # e.g. a pickle renamed model.safetensors: never unpickled
            raise ValueError(f"train.init_from={path!r}: model.safetensors is not a safetensors "
                             f"file ({e})") from None
    else:
        from r2d2.engine.checkpoint import load_weights

        sd = load_weights(path)
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    if shapes or unexpected or len(missing) == len(own) or (strict and missing):
        raise ValueError(f"train.init_from={path!r}: the weights do not fit the model of the config "
                         f"(model.preset and overrides): shape mismatches {shapes[:3]}, unexpected "
                         f"{unexpected[:3]}, missing {len(missing)} of {len(own)} {missing[:3]}")
    model.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------------------- the loop
@dataclass
class FitResult:
    step: int
    last_loss: float
    log_path: str
    checkpoint: str | None
    stopped_by_signal: bool = False


class Trainer:
    """``Trainer(cfg, out).fit()``. ``objective`` / ``tokenize`` may be injected (tests use toys);
    otherwise they come from ``train.task`` and the model's tokenizer."""

    def __init__(self, cfg: RunConfig, out: str, resume: bool = False, objective: nn.Module | None = None,
                 tokenize=None, image_size: int | None = None, flops_per_sample: float | None = None) -> None:
        self.cfg, self.out, self.resume = cfg, out, resume
        self.rank, self.world, self.device = init_distributed(cfg)
        t = cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        from r2d2.engine.data.loader import check_data_source
        from r2d2.engine.data.records import DataError

        try:  # before building a model of hundreds of millions of parameters
            check_data_source(cfg.data, eval_too=t.eval_at_end)
        except DataError as e:
            raise TrainingError(str(e)) from None
        check_input_files(cfg)
        if cfg.data.batch_size % t.grad_accum:  # RunConfig checks it; a config edited by hand
            raise TrainingError(f"data.batch_size={cfg.data.batch_size} is not divisible by "
                                f"train.grad_accum={t.grad_accum}")
        torch.manual_seed(t.seed)  # same initial weights on every rank
        self.objective = objective if objective is not None else build_objective(cfg)
        self.model = getattr(self.objective, "model", self.objective)
        self.image_size = image_size or cfg.data.image_size or getattr(getattr(self.model, "config", None),
                                                                        "image_size", 224)
        self.tokenize, self.tokenizer = tokenize, None
        if self.tokenize is None:
            from r2d2.engine.data.loader import Tokenize
            from r2d2.engine.tokenizer import build_tokenizer

            try:
                self.tokenizer = build_tokenizer(cfg.data.vocab, max_length=cfg.data.max_text_len)
            except (OSError, ValueError) as e:  # unreadable or malformed vocab.txt
                raise TrainingError(f"data.vocab={cfg.data.vocab!r}: {e}") from None
            self.tokenize = Tokenize(self.tokenizer, cfg.data.max_text_len)
            if getattr(self.model, "tokenizer", "absent") is None:
                self.model.tokenizer = self.tokenizer  # the losses read [MASK] / special ids from it
        self.flops_per_sample = flops_per_sample if flops_per_sample is not None else self._flops()
        self.precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.strategy = cfg.distributed.strategy
        if self.strategy == "auto":
            self.strategy = "ddp" if self.world > 1 else "none"
        elif self.world == 1 and self.strategy in ("ddp", "fsdp"):
            # base.yaml / large.yaml name their multi-GPU strategy; started without torchrun
            # there is no process group to join, so the run is an ordinary single process.
            print(f"distributed.strategy={self.strategy} needs several processes (torchrun "
                  "--nproc_per_node=N -m r2d2 ...); WORLD_SIZE is unset or 1, so this run is a single "
                  "process", flush=True)
            self.strategy = "none"
        if self.world > 1 and self.strategy == "none":
            raise TrainingError("WORLD_SIZE > 1 but distributed.strategy=none")
        self.objective.to(self.device)
        self._wrap()
        self.optimizer = build_optimizer(self.objective, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)
        self.ckpt = Checkpointer(out, t.keep_checkpoints, fsdp=self.strategy == "fsdp")
        self.state = TrainState()
        self._stop = False
        self._bad_in_a_row = 0

    def _flops(self) -> float:
        try:
            from r2d2.engine import flops

            cfg = self.cfg
            if cfg.train.task != "matching" and hasattr(flops, "flops_per_sample"):
                # the run's objective (which terms are on) and its contrastive batch: one
                # micro-batch over all ranks
                return flops.flops_per_sample(
                    self.model.config, cfg.loss.build_config(), text_len=cfg.data.max_text_len,
                    global_batch=cfg.data.batch_size // cfg.train.grad_accum, image_size=self.image_size,
                    world=self.world)
            teacher = getattr(self.objective, "teacher", None) is not None
            shape = flops.shape_from_config(self.model.config, cfg.data.max_text_len, self.image_size, teacher)
            return flops.r2d2_flops_per_sample(shape)
        except (AttributeError, ImportError, TypeError, ValueError):
            return float("nan")  # unknown architecture: TFLOP/s and MFU are reported as null

    def _wrap(self) -> None:
        t = self.cfg.train
        if t.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if t.compile:
            # per transformer block, as torchtitan does: the objective calls the encoders' parts
            # directly (not model.forward), and small graphs compile fast and reuse across blocks
            for block in _outermost_blocks(self.model):  # the student (the teacher runs no_grad once)
                block.compile()
        self.replicated: list[nn.Parameter] = []
        if self.strategy == "fsdp":
            self.replicated = shard_fsdp(self.objective, self.device)
            self.wrapped = self.objective
        elif self.strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=ids, find_unused_parameters=self.cfg.distributed.find_unused_parameters)
        else:
            self.wrapped = self.objective

    # ---------------------------------------------------------------- signals
    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True

    def _should_stop(self) -> bool:
        if not is_dist():
            return self._stop
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self._coll_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def _coll_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _all_sum(self, values: list[float]) -> list[float]:
        if not is_dist():
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._coll_device())
        dist.all_reduce(t)
        return t.tolist()

    # ---------------------------------------------------------------- fit
    def fit(self) -> FitResult:
        from r2d2.engine.data.loader import DataCursor, build_train_data, resume_position
        from r2d2.engine.data.records import SHARD_EVENTS, SKIP_REASONS, DataError

        cfg, t = self.cfg, self.cfg.train
        extra: dict = {}
        last_ckpt = None  # the newest checkpoint known good: verified when written, or loaded
        if self.resume:
            try:  # the newest that loads; skipped newer ones are reported below
                path, self.state, extra, notes = self.ckpt.load_newest(
                    self.objective, self.optimizer, self.scheduler, restore_rng=False)
            except CheckpointError as e:
                raise TrainingError(f"--resume: {e}") from None
            last_ckpt = path
        obs = Observer(self.out, t.max_steps, self.state.step, enabled=self.rank == 0,
                       progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard)
        if self.resume:
            for n in notes:
                obs.message(f"--resume: {n}")
            obs.message(f"resumed from step {self.state.step} ({path})")
            picks = extra.get("attention_picks")
            if picks:  # the backends the run trained with, not a new (noisy) measurement
                from r2d2.kernels.attention import load_picks

                n = load_picks(picks, self.device)
                if n:
                    obs.message(f"attention auto: {n} of {len(picks)} picks taken from the checkpoint")
        micro_global = cfg.data.batch_size // t.grad_accum
        try:
            start, stream_state, note = resume_position(
                extra.get("data_position"), extra.get("rank_data", []), cfg.data, self.state.step,
                extra.get("config"), self.rank, self.world) if self.resume else (0, None, None)
            if note:
                obs.message(f"--resume: {note}")
            data = build_train_data(cfg.data, self.tokenize, self.image_size, micro_global, self.rank,
                                    self.world, start_sample=start, stream_state=stream_state)
        except DataError as e:
            raise TrainingError(str(e)) from None
        self.cursor = DataCursor(cfg.data.format, data.stream, self.world, data.workers, start, stream_state)
        self.read_skipped, self.read_reasons = data.read_skipped, Counter(data.read_reasons)
        if data.read_skipped:
            total = data.read_skipped + (data.num_records or 0)
            obs.message(f"reader skipped {data.read_skipped} of {total} samples: {dict(data.read_reasons)}")
            if data.read_skipped / max(1, total) > cfg.data.max_skip_rate:
                raise TrainingError(f"{data.read_skipped} of {total} samples unusable "
                                    f"({dict(data.read_reasons)}): skip rate above data.max_skip_rate="
                                    f"{cfg.data.max_skip_rate}")
        old = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        from r2d2.engine.flops import device_name, mfu

        dev_name = cfg.logging.device_name or device_name(self.device)
        it = iter(data.loader)
        # The RNG last: nothing between here and the first forward may draw from it, or a resumed
        # run would not continue the stream of the run it resumes (dropout, MLM masks draw here).
        if "rng_state" in extra:
            set_rng_state(extra["rng_state"])
        else:
            torch.manual_seed(t.seed + 1000 * self.rank)  # loss-side randomness differs per rank
        last_loss = float("nan")
        reasons = Counter(self.state.skip_reasons)
        window = {"t": time.perf_counter(), "samples": 0, "tokens": 0}
        names = list(SKIP_REASONS) + ["other"]
        try:
            while self.state.step < t.max_steps:
                micro = [_next_batch(it) for _ in range(t.grad_accum)]
                local = Counter()
                for b in micro:
                    local.update(b["skip_reasons"])
                sizes = [b["size"] for b in micro]
                local["other"] = sum(v for k, v in local.items() if k not in SKIP_REASONS and k != "other")
                sums = self._all_sum(sizes + [s * s for s in sizes] + [local[k] for k in names] +
                                     [sum(float(b["attention_mask"].sum()) for b in micro if b["size"])])
                n_micro, sq = sums[:len(sizes)], sums[len(sizes):2 * len(sizes)]
                step_reasons = {k: int(v) for k, v in zip(names, sums[2 * len(sizes):-1]) if v}
                # damaged-shard events are no samples: logged as truncated_shards, not skipped
                skipped = sum(v for k, v in step_reasons.items() if k not in SHARD_EVENTS)
                tokens = sums[-1]
                n_all = sum(n_micro)
                if any(abs(q * self.world - n * n) > 0.5 for n, q in zip(n_micro, sq)):
                    # sum(n^2) * W == (sum n)^2 iff every rank has the same n: GCPR's all-gather
                    # needs that; say so on every rank instead of a collective mismatch or hang
                    raise TrainingError(f"micro-batch sizes differ across ranks (rank {self.rank}: {sizes}): "
                                        f"a sample found no decodable replacement in its draws; skipped so "
                                        f"far {dict(reasons + Counter(step_reasons))}")
                reasons.update(step_reasons)
                if n_all == 0:
                    raise TrainingError("every sample of a whole step was skipped: "
                                        f"{dict(reasons)}")
                terms = self._forward_backward(micro, n_all)
                loss = terms["loss"]
                self.cursor.advance(micro, micro_global)
                self.state.samples += int(n_all)
                self.state.skipped += int(skipped)
                self.state.skip_reasons = dict(reasons)
                seen = self.state.samples + self.state.skipped
                if seen >= 100 and self.state.skipped / seen > cfg.data.max_skip_rate:
                    raise TrainingError(f"skipped {self.state.skipped} of {seen} samples while loading "
                                        f"({dict(reasons)}): above data.max_skip_rate={cfg.data.max_skip_rate}")
                grad_norm = self._clip()
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state.bad_steps += 1
                    self._bad_in_a_row += 1
                    obs.message(f"step {self.state.step + 1}: non-finite loss/grad ({loss}, {grad_norm}); "
                                f"step skipped ({self._bad_in_a_row} in a row)")
                    if self._bad_in_a_row >= t.max_bad_steps:
                        raise TrainingError(f"{self._bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                                            f"{t.max_bad_steps}); last good checkpoint: {_good(last_ckpt)}")
                else:
                    self._bad_in_a_row = 0
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if hasattr(self.objective, "ema_update"):
                        self.objective.ema_update()
                    last_loss = loss
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                self.state.step += 1
                window["samples"] += n_all
                window["tokens"] += tokens
                dt = time.perf_counter() - window["t"]
                obs.step(loss, window["samples"] / max(dt, 1e-9))
                if self.state.step % t.log_every == 0 or self.state.step == t.max_steps:
                    sps = window["samples"] / max(dt, 1e-9)
                    # the numbers are per process (samples_per_s counts the whole world)
                    fl = self.flops_per_sample * sps / self.world
                    row = {"step": self.state.step, "loss": terms["loss"], **terms, "lr": lr, "grad_norm": grad_norm,
                           "samples_per_s": sps, "tokens_per_s": window["tokens"] / max(dt, 1e-9),
                           "tflops": fl / 1e12 if math.isfinite(fl) else None,
                           "mfu": mfu(fl, dev_name, self.precision) if math.isfinite(fl) else None,
                           "peak_mem_gb": peak_memory_gb(self.device),
                           "skipped": self.read_skipped + self.state.skipped, "skipped_read": self.read_skipped,
                           "skipped_decode": self.state.skipped,
                           "skip_reasons": {k: v for k, v in (self.read_reasons + reasons).items()
                                            if k not in SHARD_EVENTS},
                           "truncated_shards": reasons.get("truncated_shard", 0),
                           "bad_steps": self.state.bad_steps, "samples": self.state.samples}
                    obs.log(row)
                    window = {"t": time.perf_counter(), "samples": 0, "tokens": 0}
                stop = self._should_stop()
                if stop or (t.checkpoint_every and self.state.step % t.checkpoint_every == 0):
                    if self._bad_in_a_row:  # the state of a non-finite streak is not trusted
                        obs.message(f"step {self.state.step}: checkpoint not written: {self._bad_in_a_row} "
                                    f"non-finite step(s) in a row; last good checkpoint: {_good(last_ckpt)}")
                    else:
                        last_ckpt = self._save_checked(last_ckpt)
                if stop:
                    done = "checkpoint written" if last_ckpt and last_ckpt.endswith(
                        f"step_{self.state.step:06d}.pt") else f"no checkpoint written (last good: {_good(last_ckpt)})"
                    obs.message(f"SIGTERM: {done} at step {self.state.step}; exiting")
                    obs.close(plot=False)
                    return FitResult(self.state.step, last_loss, obs.log_path, last_ckpt, True)
            if not (t.checkpoint_every and self.state.step % t.checkpoint_every == 0) or last_ckpt is None:
                last_ckpt = self._save_checked(last_ckpt)
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        png = obs.close(plot=cfg.logging.plot)
        if png:
            obs.message(f"loss curves: {png}")
        return FitResult(self.state.step, last_loss, obs.log_path, last_ckpt)

    def _forward_backward(self, micro: list[dict], n_all: float) -> dict[str, float]:
        """Backward of the step-mean loss over all micro-batches; returns its (global) terms."""
        sums: dict[str, float] = {}
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" \
            else contextlib.nullcontext()
        for i, b in enumerate(micro):
            if b["size"] == 0:  # every sample of this micro-batch was skipped
                if self.world > 1:
                    raise TrainingError(f"rank {self.rank}: a whole micro-batch was unusable "
                                        f"({dict(b['skip_reasons'])}); ranks cannot skip a backward "
                                        "without desynchronising the gradient all-reduce")
                continue
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.strategy != "ddp" else self.wrapped.no_sync()
            if self.strategy == "fsdp" and not last:
                self.wrapped.set_requires_gradient_sync(False)
            elif self.strategy == "fsdp":
                self.wrapped.set_requires_gradient_sync(True)
            batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
            with sync:
                with amp:
                    out = self.wrapped(batch)
                weight = b["size"] * self.world / n_all
                (out["loss"] * weight).backward()
            for k, v in out.items():
                if k == "loss" or k.endswith("_loss"):
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * b["size"]
        for p in self.replicated:  # FSDP-ignored parameters: average their gradients like DDP
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)
        keys = sorted(sums)
        totals = self._all_sum([sums[k] for k in keys])
        return {k: v / n_all for k, v in zip(keys, totals)}

    def _clip(self) -> float:
        params = [p for p in self.objective.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2 DTensor
            norm = norm.full_tensor()
        return float(norm)

    def _save_checked(self, last_ckpt: str | None) -> str:
        """:meth:`save`, its failures one-line :class:`TrainingError`: NaN/Inf in the weights or the
        optimizer state (nothing written; the run cannot go on), a write that failed (disk full:
        the partial file is removed, ``latest`` still names ``last_ckpt``)."""
        try:
            return self.save()
        except NonFiniteStateError as e:
            raise TrainingError(f"{e}; the run stops, last good checkpoint: {_good(last_ckpt)}") from None
        except CheckpointError as e:
            raise TrainingError(f"checkpoint at step {self.state.step}: {e}") from None

    def save(self) -> str:
        from r2d2.kernels.attention import export_picks

        extra = {"config": self.cfg.to_dict(), "data_position": self.cursor.global_state(),
                 "attention_picks": export_picks()}  # rank 0's: every rank takes them on resume
        return self.ckpt.save(self.objective, self.optimizer, self.scheduler, self.state,
                              extra=extra, rank_state=self.cursor.rank_state())


def _good(path: str | None) -> str:
    return path if path else "none (no checkpoint was written before)"


def _next_batch(it) -> dict:
    """The next batch; a data error raised in a DataLoader worker arrives with the worker's
    traceback in its message: keep the one line that says what is wrong."""
    from r2d2.engine.data.records import DataError

    try:
        return next(it)
    except DataError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        last = lines[-1] if lines else str(e)
        raise TrainingError(last.split("DataError: ", 1)[-1]) from None


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
