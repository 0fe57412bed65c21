"""The training loop, in named steps: :meth:`Trainer.fit` restores a checkpoint
(:meth:`~Trainer.restore`), builds the data pipeline (:meth:`~Trainer.setup_data`) and runs
:meth:`~Trainer.train`, which calls :meth:`~Trainer.train_step` per optimizer step, logs the row of
:func:`r2d2.engine.observability.metrics_row` and writes checkpoints. Components come from modules
with one job each (:mod:`~r2d2.engine.objective`, :mod:`~r2d2.engine.optim`,
:mod:`~r2d2.engine.parallel`, :mod:`~r2d2.engine.checkpoint`, :mod:`~r2d2.engine.data.loader`)
and are applied to a plain model in the torchtitan order: activation checkpointing -> compile ->
FSDP2 / DDP.

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
the kernels' autotuned picks are restored through ``r2d2.kernels.load_state_dict``, and the RNG
states are restored last, after the data loader has started, so that nothing between
the restore and the first forward draws from them.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from r2d2 import kernels
from r2d2.dist import is_dist
from r2d2.engine import flops
from r2d2.engine.checkpoint import (
    Checkpointer,
    CheckpointError,
    NonFiniteStateError,
    TrainState,
    set_rng_state,
)
from r2d2.engine.config import RunConfig
from r2d2.engine.data.loader import (
    DataCursor,
    Tokenize,
    build_train_data,
    check_data_source,
    resume_position,
)
from r2d2.engine.data.records import SHARD_EVENTS, SKIP_REASONS, DataError
from r2d2.engine.errors import TrainingError
from r2d2.engine.flops import device_name
from r2d2.engine.objective import build_objective, check_input_files, load_init  # noqa: F401  (public here)
from r2d2.engine.observability import Observer, ThroughputWindow, metrics_row
from r2d2.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from r2d2.engine.parallel import (
    _outermost_blocks,
    apply_activation_checkpointing,
    init_distributed,
    shard_fsdp,
)
from r2d2.engine.tokenizer import build_tokenizer

__all__ = [
    "FitResult",
    "Trainer",
    "TrainingError",
    "build_objective",
    "build_optimizer",
    "lr_factor",
    "param_groups",
    "shard_fsdp",
]


@dataclass
class FitResult:
    step: int
    last_loss: float
    log_path: str
    checkpoint: str | None
    stopped_by_signal: bool = False


class Trainer:
    """``Trainer(cfg, out).fit()``. ``objective`` / ``tokenize`` may be injected (tests use toys);
    otherwise they come from ``train.task`` and the model's tokenizer.

    The constructor checks the inputs and builds everything that does not depend on a
    checkpoint (objective, wrapping, optimizer, schedule); :meth:`fit` does the rest."""

    def __init__(
        self,
        cfg: RunConfig,
        out: str,
        resume: bool = False,
        objective: nn.Module | None = None,
        tokenize=None,
        image_size: int | None = None,
        flops_per_sample: float | None = None,
    ) -> None:
        self.cfg, self.out, self.resume = cfg, out, resume
        self.rank, self.world, self.device = init_distributed(cfg)
        t = cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        try:  # before building a model of hundreds of millions of parameters
            check_data_source(cfg.data, eval_too=t.eval_at_end)
        except DataError as e:
            raise TrainingError(str(e)) from None
        check_input_files(cfg)
        if cfg.data.batch_size % t.grad_accum:  # RunConfig checks it; a config edited by hand
            raise TrainingError(
                f"data.batch_size={cfg.data.batch_size} is not divisible by "
                f"train.grad_accum={t.grad_accum}"
            )
        torch.manual_seed(t.seed)  # same initial weights on every rank
        self.objective = objective if objective is not None else build_objective(cfg)
        self.model = getattr(self.objective, "model", self.objective)
        self.image_size = (
            image_size
            or cfg.data.image_size
            or getattr(getattr(self.model, "config", None), "image_size", 224)
        )
        self.tokenize, self.tokenizer = tokenize, None
        if self.tokenize is None:
            try:
                self.tokenizer = build_tokenizer(cfg.data.vocab, max_length=cfg.data.max_text_len)
            except (OSError, ValueError) as e:  # unreadable or malformed vocab.txt
                raise TrainingError(f"data.vocab={cfg.data.vocab!r}: {e}") from None
            self.tokenize = Tokenize(self.tokenizer, cfg.data.max_text_len)
            if getattr(self.model, "tokenizer", "absent") is None:
                self.model.tokenizer = (
                    self.tokenizer
                )  # the losses read [MASK] / special ids from it
        self.flops_per_sample = flops_per_sample if flops_per_sample is not None else self._flops()
        self.precision = (
            t.precision
            if t.precision != "auto"
            else ("bf16" if self.device.type == "cuda" else "fp32")
        )
        self.strategy = cfg.distributed.strategy
        if self.strategy == "auto":
            self.strategy = "ddp" if self.world > 1 else "none"
        elif self.world == 1 and self.strategy in ("ddp", "fsdp"):
            # base.yaml / large.yaml name their multi-GPU strategy; started without torchrun
            # there is no process group to join, so the run is an ordinary single process.
            print(
                f"distributed.strategy={self.strategy} needs several processes (torchrun "
                "--nproc_per_node=N -m r2d2 ...); WORLD_SIZE is unset or 1, so this run is a single "
                "process",
                flush=True,
            )
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
        self.last_ckpt: str | None = None  # the newest checkpoint known good: verified or loaded
        self.last_loss = float("nan")
        self.reasons: Counter = (
            Counter()
        )  # decode-time skip reasons (all ranks), this run and before

    def _flops(self) -> float:
        own = getattr(self.objective, "flops_per_sample", None)
        if callable(own):  # a task's objective that knows its own cost
            return float(own(self.cfg, self.image_size))
        try:
            cfg = self.cfg
            if cfg.train.task not in ("pretrain", "retrieval", "matching"):
                return float("nan")  # a task objective that does not say: reported as null
            if cfg.train.task != "matching" and hasattr(flops, "flops_per_sample"):
                # the run's objective (which terms are on) and its contrastive batch: one
                # micro-batch over all ranks
                return flops.flops_per_sample(
                    self.model.config,
                    cfg.loss,
                    text_len=cfg.data.max_text_len,
                    global_batch=cfg.data.batch_size // cfg.train.grad_accum,
                    image_size=self.image_size,
                    world=self.world,
                )
            teacher = getattr(self.objective, "teacher", None) is not None
            shape = flops.shape_from_config(
                self.model.config, cfg.data.max_text_len, self.image_size, teacher
            )
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
            for block in _outermost_blocks(
                self.model
            ):  # the student (the teacher runs no_grad once)
                block.compile()
        self.replicated: list[nn.Parameter] = []
        if self.strategy == "fsdp":
            if not callable(getattr(self.model, "unsharded_twin", None)):
                # found now, not after training, when the export would need it
                raise TrainingError(
                    f"distributed.strategy=fsdp: {type(self.model).__name__} cannot be "
                    "exported unsharded at the end (no unsharded_twin); use ddp"
                )
            self.replicated = shard_fsdp(self.objective, self.device)
            self.wrapped = self.objective
        elif self.strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.objective,
                device_ids=ids,
                find_unused_parameters=self.cfg.distributed.find_unused_parameters,
            )
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

    # ---------------------------------------------------------------- the run
    def fit(self) -> FitResult:
        """The whole run: restore (``--resume``), set up the data, train to ``train.max_steps``
        (or until SIGTERM), write the final checkpoint; returns where it ended."""
        extra, obs = self.restore()
        data = self.setup_data(extra, obs)
        old = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        try:
            it = iter(data.loader)
            # The RNG last: nothing between here and the first forward may draw from it, or a
            # resumed run would not continue the stream of the run it resumes (dropout, MLM masks
            # draw here).
            if "rng_state" in extra:
                set_rng_state(extra["rng_state"])
            else:
                torch.manual_seed(
                    self.cfg.train.seed + 1000 * self.rank
                )  # loss randomness per rank
            stopped = self.train(it, obs)
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        if stopped:
            return FitResult(self.state.step, self.last_loss, obs.log_path, self.last_ckpt, True)
        png = obs.close(plot=self.cfg.logging.plot)
        if png:
            obs.message(f"loss curves: {png}")
        return FitResult(self.state.step, self.last_loss, obs.log_path, self.last_ckpt)

    def restore(self) -> tuple[dict, Observer]:
        """With ``--resume``: load the newest checkpoint that loads (weights, optimizer, schedule,
        train state; not yet the RNG) and the kernels' state. Returns the checkpoint's ``extra``
        (``{}`` for a fresh run) and the run's :class:`Observer`, started at the resumed step."""
        cfg = self.cfg
        extra: dict = {}
        notes: list[str] = []
        if self.resume:
            try:  # the newest that loads; skipped newer ones are reported below
                path, self.state, extra, notes = self.ckpt.load_newest(
                    self.objective, self.optimizer, self.scheduler, restore_rng=False
                )
            except CheckpointError as e:
                raise TrainingError(f"--resume: {e}") from None
            self.last_ckpt = path
        self.reasons = Counter(self.state.skip_reasons)
        obs = Observer(
            self.out,
            cfg.train.max_steps,
            self.state.step,
            enabled=self.rank == 0,
            progress=cfg.logging.progress,
            tensorboard=cfg.logging.tensorboard,
        )
        if self.resume:
            for n in notes:
                obs.message(f"--resume: {n}")
            obs.message(f"resumed from step {self.state.step} ({self.last_ckpt})")
            # the backends the run trained with, not a new (noisy) measurement; checkpoints
            # written before kernels had a state dict hold the attention picks under their own key
            state = extra.get("kernels", extra.get("attention_picks"))
            n = kernels.load_state_dict(state) if state else 0
            if n:
                obs.message(f"kernels auto: {n} picks taken from the checkpoint")
        return extra, obs

    def setup_data(self, extra: dict, obs: Observer):
        """The training data from the resumed position (checked against the checkpoint's config),
        the cursor that tracks it, and the reader's skip counts (over ``data.max_skip_rate``:
        the run stops)."""
        cfg = self.cfg
        micro_global = cfg.data.batch_size // cfg.train.grad_accum
        try:
            start, stream_state, note = (
                resume_position(
                    extra.get("data_position"),
                    extra.get("rank_data", []),
                    cfg.data,
                    self.state.step,
                    extra.get("config"),
                    self.rank,
                    self.world,
                )
                if self.resume
                else (0, None, None)
            )
            if note:
                obs.message(f"--resume: {note}")
            data = build_train_data(
                cfg.data,
                self.tokenize,
                self.image_size,
                micro_global,
                self.rank,
                self.world,
                start_sample=start,
                stream_state=stream_state,
            )
        except DataError as e:
            raise TrainingError(str(e)) from None
        self.cursor = DataCursor(
            cfg.data.format, data.stream, self.world, data.workers, start, stream_state
        )
        self.read_skipped, self.read_reasons = data.read_skipped, Counter(data.read_reasons)
        if data.read_skipped:
            total = data.read_skipped + (data.num_records or 0)
            obs.message(
                f"reader skipped {data.read_skipped} of {total} samples: {dict(data.read_reasons)}"
            )
            if data.read_skipped / max(1, total) > cfg.data.max_skip_rate:
                raise TrainingError(
                    f"{data.read_skipped} of {total} samples unusable "
                    f"({dict(data.read_reasons)}): skip rate above data.max_skip_rate="
                    f"{cfg.data.max_skip_rate}"
                )
        return data

    def train(self, it, obs: Observer) -> bool:
        """Optimizer steps until ``train.max_steps``, logging every ``train.log_every`` and
        checkpointing every ``train.checkpoint_every`` and at the end. Returns True when SIGTERM
        stopped the run (after its checkpoint; the observer is closed without plotting)."""
        t = self.cfg.train
        dev_name = self.cfg.logging.device_name or device_name(self.device)
        window = ThroughputWindow()
        while self.state.step < t.max_steps:
            micro = [_next_batch(it) for _ in range(t.grad_accum)]
            terms, grad_norm, lr, n_all, tokens = self.train_step(micro, obs)
            window.add(n_all, tokens)
            obs.step(terms["loss"], window.rates()[0])
            if self.state.step % t.log_every == 0 or self.state.step == t.max_steps:
                obs.log(
                    metrics_row(
                        step=self.state.step,
                        terms=terms,
                        lr=lr,
                        grad_norm=grad_norm,
                        window=window,
                        flops_per_sample=self.flops_per_sample,
                        world=self.world,
                        device_name=dev_name,
                        precision=self.precision,
                        device=self.device,
                        read_skipped=self.read_skipped,
                        read_reasons=self.read_reasons,
                        skipped=self.state.skipped,
                        reasons=self.reasons,
                        shard_events=SHARD_EVENTS,
                        bad_steps=self.state.bad_steps,
                        samples=self.state.samples,
                    )
                )
                window = ThroughputWindow()
            stop = self._should_stop()
            if stop or (t.checkpoint_every and self.state.step % t.checkpoint_every == 0):
                self.checkpoint(obs)
            if stop:
                done = (
                    "checkpoint written"
                    if self.last_ckpt and self.last_ckpt.endswith(f"step_{self.state.step:06d}.pt")
                    else f"no checkpoint written (last good: {_good(self.last_ckpt)})"
                )
                obs.message(f"SIGTERM: {done} at step {self.state.step}; exiting")
                obs.close(plot=False)
                return True
        if (
            not (t.checkpoint_every and self.state.step % t.checkpoint_every == 0)
            or self.last_ckpt is None
        ):
            self.last_ckpt = self._save_checked()
        return False

    def train_step(
        self, micro: list[dict], obs: Observer
    ) -> tuple[dict, float, float, float, float]:
        """One optimizer step over the ``train.grad_accum`` micro-batches ``micro``: account the
        samples, forward/backward, clip, then AdamW + schedule + EMA, or skip a non-finite step.
        Returns (loss terms, grad norm, the lr it ran with, samples, tokens), all ranks."""
        t, d = self.cfg.train, self.cfg.data
        n_all, skipped, tokens = self._account(micro)
        terms = self._forward_backward(micro, n_all)
        loss = terms["loss"]
        self.cursor.advance(micro, d.batch_size // t.grad_accum)
        self.state.samples += int(n_all)
        self.state.skipped += int(skipped)
        self.state.skip_reasons = dict(self.reasons)
        seen = self.state.samples + self.state.skipped
        if seen >= 100 and self.state.skipped / seen > d.max_skip_rate:
            raise TrainingError(
                f"skipped {self.state.skipped} of {seen} samples while loading "
                f"({dict(self.reasons)}): above data.max_skip_rate={d.max_skip_rate}"
            )
        grad_norm = self._clip()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._skip_bad_step(loss, grad_norm, obs)
        else:
            self._bad_in_a_row = 0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if hasattr(self.objective, "ema_update"):
                self.objective.ema_update()
            self.last_loss = loss
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.state.step += 1
        return terms, grad_norm, lr, n_all, tokens

    def _account(self, micro: list[dict]) -> tuple[float, int, float]:
        """Step accounting, one all-reduce: usable samples per micro-batch, their squares (to see
        whether ranks differ), decode-time skip reasons and real text tokens. Updates
        ``self.reasons``; returns (samples, skipped samples, tokens) over all ranks."""
        names = list(SKIP_REASONS) + ["other"]
        local = Counter()
        for b in micro:
            local.update(b["skip_reasons"])
        sizes = [b["size"] for b in micro]
        local["other"] = sum(v for k, v in local.items() if k not in SKIP_REASONS and k != "other")
        sums = self._all_sum(
            sizes
            + [s * s for s in sizes]
            + [local[k] for k in names]
            + [sum(float(b["attention_mask"].sum()) for b in micro if b["size"])]
        )
        n_micro, sq = sums[: len(sizes)], sums[len(sizes) : 2 * len(sizes)]
        step_reasons = {k: int(v) for k, v in zip(names, sums[2 * len(sizes) : -1]) if v}
        # damaged-shard events are no samples: logged as truncated_shards, not skipped
        skipped = sum(v for k, v in step_reasons.items() if k not in SHARD_EVENTS)
        n_all = sum(n_micro)
        if any(abs(q * self.world - n * n) > 0.5 for n, q in zip(n_micro, sq)):
            # sum(n^2) * W == (sum n)^2 iff every rank has the same n: GCPR's all-gather needs
            # that; say so on every rank instead of a collective mismatch or hang
            raise TrainingError(
                f"micro-batch sizes differ across ranks (rank {self.rank}: {sizes}): "
                f"a sample found no decodable replacement in its draws; skipped so "
                f"far {dict(self.reasons + Counter(step_reasons))}"
            )
        self.reasons.update(step_reasons)
        if n_all == 0:
            raise TrainingError(f"every sample of a whole step was skipped: {dict(self.reasons)}")
        return n_all, skipped, sums[-1]

    def _skip_bad_step(self, loss: float, grad_norm: float, obs: Observer) -> None:
        """A non-finite loss or gradient: drop the gradients, count the step; ``train.max_bad_steps``
        in a row stops the run, naming the last good checkpoint."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.bad_steps += 1
        self._bad_in_a_row += 1
        obs.message(
            f"step {self.state.step + 1}: non-finite loss/grad ({loss}, {grad_norm}); "
            f"step skipped ({self._bad_in_a_row} in a row)"
        )
        if self._bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"{self._bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); last good checkpoint: {_good(self.last_ckpt)}"
            )

    def checkpoint(self, obs: Observer) -> None:
        """Write a checkpoint unless non-finite steps are in a row (that state is not trusted:
        the checkpoint waits for the next interval)."""
        if self._bad_in_a_row:
            obs.message(
                f"step {self.state.step}: checkpoint not written: {self._bad_in_a_row} "
                f"non-finite step(s) in a row; last good checkpoint: {_good(self.last_ckpt)}"
            )
        else:
            self.last_ckpt = self._save_checked()

    def _forward_backward(self, micro: list[dict], n_all: float) -> dict[str, float]:
        """Backward of the step-mean loss over all micro-batches; returns its (global) terms."""
        sums: dict[str, float] = {}
        amp = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        for i, b in enumerate(micro):
            if b["size"] == 0:  # every sample of this micro-batch was skipped
                if self.world > 1:
                    raise TrainingError(
                        f"rank {self.rank}: a whole micro-batch was unusable "
                        f"({dict(b['skip_reasons'])}); ranks cannot skip a backward "
                        "without desynchronising the gradient all-reduce"
                    )
                continue
            last = i == len(micro) - 1
            sync = (
                contextlib.nullcontext()
                if last or self.strategy != "ddp"
                else self.wrapped.no_sync()
            )
            if self.strategy == "fsdp" and not last:
                self.wrapped.set_requires_gradient_sync(False)
            elif self.strategy == "fsdp":
                self.wrapped.set_requires_gradient_sync(True)
            batch = {
                k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in b.items()
            }
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

    def _save_checked(self) -> str:
        """:meth:`save`, its failures one-line :class:`TrainingError`: NaN/Inf in the weights or the
        optimizer state (nothing written; the run cannot go on), a write that failed (disk full:
        the partial file is removed, ``latest`` still names ``last_ckpt``)."""
        try:
            return self.save()
        except NonFiniteStateError as e:
            raise TrainingError(
                f"{e}; the run stops, last good checkpoint: {_good(self.last_ckpt)}"
            ) from None
        except CheckpointError as e:
            raise TrainingError(f"checkpoint at step {self.state.step}: {e}") from None

    def save(self) -> str:
        """A checkpoint of the step just finished: the objective, optimizer, schedule, train
        state, RNG, the config, the data position of every rank and the kernels' state (rank
        0's: every rank takes it on resume)."""
        extra = {
            "config": self.cfg.to_dict(),
            "data_position": self.cursor.global_state(),
            "kernels": kernels.state_dict(),
        }
        return self.ckpt.save(
            self.objective,
            self.optimizer,
            self.scheduler,
            self.state,
            extra=extra,
            rank_state=self.cursor.rank_state(),
        )


def _good(path: str | None) -> str:
    return path if path else "none (no checkpoint was written before)"


def _next_batch(it) -> dict:
    """The next batch; a data error raised in a DataLoader worker arrives with the worker's
    traceback in its message: keep the one line that says what is wrong."""
    try:
        return next(it)
    except DataError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        last = lines[-1] if lines else str(e)
        raise TrainingError(last.split("DataError: ", 1)[-1]) from None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
