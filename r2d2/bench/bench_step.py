"""Benchmark one full R2D2 pre-training step: eager vs compile vs our kernels, same run, same batch.

One step = forward of every objective (GCPR contrastive with the EMA teacher's distillation, FGR
hard-negative ITM, MLM, TgD/FgD distillation; whatever ``LossConfig()`` enables), backward, AdamW
step, zero_grad, EMA teacher update. Configurations, all measured in this one process:

  eager           KernelConfig(attention=sdpa|eager, contrastive=eager, distill_kl=eager)
  eager+compile   the same under torch.compile
  ours            KernelConfig(auto): fused kernels where the device has them
  ours+compile    the same under torch.compile
  apex            eager + apex FusedLayerNorm / FusedAdam, only where apex imports (else a
                  ``skipped`` row says why)

The eager baseline's attention is SDPA by default (``--eager-attention``): plain PyTorch users get
SDPA for free, so beating anything weaker would flatter us.

Batch: ``--batch N``; ``--batch-max N``: the largest of N, N/2, N/4, ... at which eager fits (one
probe each); or on CUDA by default the largest batch at which *eager* fits (doubling, then
bisection, on OOM). Every configuration then runs at that batch so the ``x eager`` ratios compare
equal work. Separately, ``max_batch`` rows give the largest batch each of eager and ours fits
with activation checkpointing (the largest contrastive batch per GPU); ``--max-batch-budget``
bounds that search in seconds (the row then says whether it finished, and the bounds it found).

A configuration that fails (a compile error, an OOM, anything) gets a row with ``status`` and
``error`` and the others go on; rows are appended to ``--out`` as they are measured, so a
timeout loses nothing already measured. ``--budget S`` skips (with a row) what would start after
S seconds.

Throughput: samples/s = batch / median step time; TFLOP/s from r2d2.engine.flops (analytic
matmul FLOPs per sample of this objective at this global batch, the teacher's passes included);
MFU = that / the data-sheet bf16 peak. Peak memory: max_memory_allocated over one step, weights
and optimizer state included. Timing: torch.utils.benchmark (docs/benchmarks.md says why not
do_bench for a whole step).

--quick: CPU: the ``tiny`` preset at batch 4 in fp32 without the compile configs (inductor's C++
build takes minutes on a shared CPU): smoke rows, labelled cpu. CUDA: ``base`` at the largest of
64, 32, ... that fits, eager and ours, no max-batch search: a real base figure in a minute.

    python benchmarks/bench_step.py [--quick] [--device cuda|cpu] [--preset base large]
        [--batch N | --batch-max N] [--configs ...] [--budget S] [--max-batch-only]
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from r2d2.bench import harness

CONFIGS = ("eager", "eager+compile", "ours", "ours+compile", "apex")


def _apex():
    """(FusedLayerNorm, FusedAdam), or the reason apex cannot be used (a string)."""
    try:
        from apex.normalization import FusedLayerNorm
        from apex.optimizers import FusedAdam
    except ImportError as e:
        return f"apex not importable ({e})"
    return FusedLayerNorm, FusedAdam


def _kernels(config: str, eager_attention: str):
    from r2d2.kernels import KernelConfig

    if config.startswith("ours"):
        return KernelConfig()
    return KernelConfig(attention=eager_attention, contrastive="eager", distill_kl="eager")


def _swap_layernorm(module: torch.nn.Module, fused_ln) -> int:
    """Replace every nn.LayerNorm by apex's FusedLayerNorm with the same weights; returns count."""
    n = 0
    for name, child in module.named_children():
        if type(child) is torch.nn.LayerNorm:
            new = fused_ln(
                child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine
            )
            if child.elementwise_affine:
                new.load_state_dict(child.state_dict())
            setattr(module, name, new.to(child.weight.device))
            n += 1
        else:
            n += _swap_layernorm(child, fused_ln)
    return n


def synthetic_batch(cfg, batch: int, device, text_len: int | None = None, seed: int = 0) -> dict:
    """Random images, token ids with ragged lengths (padding exercised), unique image ids."""
    g = torch.Generator().manual_seed(seed)
    L = text_len or cfg.max_text_len
    size = cfg.vision.image_size
    lengths = torch.randint(max(2, L // 2), L + 1, (batch,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    # ids above the special tokens (BERT vocabularies keep them in the first ~100 slots)
    ids = torch.randint(
        min(110, cfg.text.vocab_size - 1), cfg.text.vocab_size, (batch, L), generator=g
    )
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, cfg.text.pad_id))
    return {
        "images": torch.randn(batch, 3, size, size, generator=g).to(device),
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "image_ids": torch.arange(batch).to(device),
    }


def flops_per_sample(cfg, loss, batch: dict, world: int = 1) -> float | None:
    """Analytic training FLOPs per sample of this objective on this batch (r2d2.engine.flops):
    the global contrastive batch and the captions' real-token fraction (MLM's token count)."""
    try:
        from r2d2.engine import flops
    except ImportError:
        return None
    b, L = batch["input_ids"].shape
    return flops.flops_per_sample(
        cfg,
        loss,
        text_len=L,
        global_batch=b * world,
        world=world,
        text_valid_frac=float(batch["attention_mask"].float().mean()),
    )


class Step:
    """A model + objective + optimizer for one configuration, and its ``run(batch)`` step."""

    def __init__(
        self,
        preset: str,
        config: str,
        device: str,
        *,
        eager_attention: str = "sdpa",
        checkpointing: bool = False,
        loss: dict | None = None,
    ):
        from r2d2.engine.losses import LossConfig, R2D2ForPretraining
        from r2d2.engine.model import R2D2Model, model_preset

        self.cfg = model_preset(preset)
        self.device = torch.device(device)
        self.loss = LossConfig(**(loss or {}))
        kernels = _kernels(config, eager_attention)
        # what each op will run (auto resolved now: attention's auto measures on its first CUDA
        # call, which must not happen inside torch.compile tracing)
        from r2d2.kernels.dispatch import resolve

        self.kernel_picks = {
            op: resolve(op, getattr(kernels, op), self.device)
            for op in ("attention", "contrastive", "distill_kl")
        }
        self.eager_attention = eager_attention
        model = R2D2Model(self.cfg, kernels)
        model.set_activation_checkpointing(checkpointing)
        apex = _apex() if config == "apex" else None
        if isinstance(apex, str):
            raise RuntimeError(apex)
        if apex:
            _swap_layernorm(model, apex[0])
        self.objective = R2D2ForPretraining(model, self.loss).to(self.device)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        if apex:
            self.opt = apex[1](params, lr=1e-5, weight_decay=0.02)
        else:
            self.opt = torch.optim.AdamW(
                params, lr=1e-5, weight_decay=0.02, fused=self.device.type == "cuda" or None
            )
        self.forward = (
            torch.compile(self.objective) if config.endswith("compile") else self.objective
        )
        # bf16 autocast on GPU as in training; fp32 on CPU, where bf16 matmuls are emulated.
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        self.dtype = "bfloat16" if self.device.type == "cuda" else "float32"

    def run(self, batch: dict) -> torch.Tensor:
        with self.autocast:
            loss = self.forward(batch)["loss"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.objective.ema_update()
        return loss.detach()

    def close(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        compiled = self.forward is not self.objective
        del self.opt, self.objective, self.forward
        if compiled:  # dynamo's caches hold the module (and its GPU memory) otherwise
            torch._dynamo.reset()
        _free(self.device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fits(step: Step, batch: int) -> bool:
    """One step at ``batch`` (twice: the optimizer state is allocated by the first) without OOM."""
    data = synthetic_batch(step.cfg, batch, step.device)
    try:
        step.run(data)
        step.run(data)
        return True
    except torch.OutOfMemoryError:
        step.opt.zero_grad(set_to_none=True)
        return False
    finally:
        del data
        _free(step.device)


@dataclass
class BatchSearch:
    """Result of :func:`largest_batch`: ``fits`` = largest batch seen to fit (0: not even 1),
    ``fails`` = smallest seen to fail (None: none up to the cap), ``complete`` = False when the
    deadline stopped the search before ``fails - fits`` reached the granularity."""

    fits: int
    fails: int | None
    complete: bool
    probes: list = field(default_factory=list)


def largest_batch(
    try_fit: Callable[[int], bool],
    start: int = 16,
    cap: int = 4096,
    granularity: int = 8,
    deadline: float | None = None,
) -> BatchSearch:
    """Largest batch ``b <= cap`` with ``try_fit(b)``: double from ``start`` until a failure or
    the cap (halve from ``start`` while it fails), then bisect until the bounds are within
    ``granularity`` and within a quarter of the fit (so a small fit is found exactly, and a fit
    below ``start`` is found rather than reported as 0). ``deadline`` (time.monotonic()) stops
    early with the bounds found so far."""
    probes: list[tuple[int, bool]] = []

    def probe(b: int) -> bool:
        ok = bool(try_fit(b))
        probes.append((b, ok))
        return ok

    def late() -> bool:
        return deadline is not None and time.monotonic() > deadline

    lo, hi = 0, None
    b = max(1, min(start, cap))
    if probe(b):
        lo = b
        while lo < cap:
            if late():
                return BatchSearch(lo, None, False, probes)
            nb = min(2 * lo, cap)
            if probe(nb):
                lo = nb
            else:
                hi = nb
                break
        if hi is None:
            return BatchSearch(lo, None, True, probes)  # fits at the cap
    else:
        hi = b
        while lo == 0 and hi > 1:
            if late():
                return BatchSearch(0, hi, False, probes)
            if probe(hi // 2):
                lo = hi // 2
            else:
                hi //= 2
        if lo == 0:
            return BatchSearch(0, hi, True, probes)  # not even batch 1
    g = max(1, min(granularity, lo // 4))
    while hi - lo > g:
        if late():
            return BatchSearch(lo, hi, False, probes)
        mid = (lo + hi) // 2 // g * g
        mid = mid if lo < mid < hi else lo + g
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return BatchSearch(lo, hi, True, probes)


def _shape(preset: str, cfg, batch: int) -> dict:
    return {
        "preset": preset,
        "batch": batch,
        "text_len": cfg.max_text_len,
        "image_size": cfg.vision.image_size,
    }


def _step_row(
    step: Step, preset: str, config: str, batch: int, quick: bool, rep_ms: float | None
) -> dict:
    data = synthetic_batch(step.cfg, batch, step.device)
    from torch._dynamo.utils import counters

    counters.clear()
    for _ in range(1 if quick else 3):  # compile, optimizer-state allocation, autotuning
        step.run(data)
    compiled = config.endswith("compile")
    # a value dynamo specialised on (a step counter, say) recompiles on later steps: warm up
    # until no new graph appears, so compilation stays out of the timing (dynamo's cache limit
    # bounds this loop anyway)
    for _ in range(12 if compiled else 0):
        before = counters["stats"]["unique_graphs"]
        step.run(data)
        if counters["stats"]["unique_graphs"] == before:
            break
    graphs_before = counters["stats"]["unique_graphs"]
    if rep_ms is None:
        rep_ms = 100 if quick else 1000
    # the warm-up is the loop above: no extra budget here (warmup=0 is honoured)
    timing = harness.measure(
        lambda: step.run(data),
        device=step.device,
        rep=rep_ms,
        warmup=0,
        flush_l2=False,
        min_blocks=3 if quick else None,
    )
    # graph breaks cap what compile can fuse; recompiles during timing would inflate it
    breaks = sum(counters["graph_break"].values()) if compiled else None
    recompiled = counters["stats"]["unique_graphs"] - graphs_before if compiled else None
    peak = None
    if step.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step.run(data)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    fps = flops_per_sample(step.cfg, step.loss, data)
    kernels = dict(step.kernel_picks)
    if config.startswith("ours") and step.device.type == "cuda":
        # attention's auto picks per shape class (text self, image self, cross; fwd+bwd), during
        # the warm-up above: record every class's pick, not only the reference class's
        from r2d2.kernels.attention import auto_picks

        kernels["attention_auto"] = {c: p.backend for c, p in auto_picks().items()}
    row = harness.make_row(
        op="train_step",
        provider=config,
        mode="fwd+bwd+opt",
        shape=_shape(preset, step.cfg, batch),
        timing=timing,
        flops=fps * batch if fps else None,
        peak_mem=peak,
        device=step.device,
        dtype=step.dtype,
        samples_per_s=batch / (timing.median_ms / 1e3),
        flops_per_sample=fps,
        kernels=kernels,
        eager_attention=step.eager_attention,
        graph_breaks=breaks,
        graphs_compiled_while_timed=recompiled,
    )
    row["mfu"] = row["frac_peak_flops"]  # MFU = achieved model FLOP/s over the data-sheet peak
    return row


@dataclass
class Plan:
    """What :func:`run` measures for one preset (the command line, resolved)."""

    batch: int | None = None  # fixed batch
    batch_max: int | None = None  # largest of batch_max, /2, /4 ... that eager fits
    configs: tuple = CONFIGS
    quick: bool = False
    eager_attention: str = "sdpa"
    steps: bool = True  # the per-configuration step rows
    max_batch: bool = True  # the checkpointed largest-batch search (CUDA)
    max_batch_start: int = 64
    max_batch_cap: int = 16384
    max_batch_granularity: int = 16
    max_batch_budget: float | None = None  # seconds for the two searches together
    rep_ms: float | None = None
    deadline: float | None = None  # time.monotonic() after which nothing new starts


def _late(plan: Plan) -> bool:
    return plan.deadline is not None and time.monotonic() > plan.deadline


def _pick_batch(preset: str, device: str, plan: Plan) -> int:
    cuda = torch.device(device).type == "cuda"
    if plan.batch is not None:
        return plan.batch
    if not cuda:
        return plan.batch_max or 4
    s = Step(preset, "eager", device, eager_attention=plan.eager_attention)
    try:
        if plan.batch_max:
            b = plan.batch_max
            while b >= 1 and not fits(s, b):
                b //= 2
        else:
            b = largest_batch(lambda n: fits(s, n)).fits
    finally:
        s.close()
    print(f"[{preset}] largest batch eager fits: {b}", file=sys.stderr)
    return b


def run(preset: str, device: str, plan: Plan, sink: harness.RowWriter) -> list[dict]:
    """Measure ``plan`` for ``preset``; every row goes to ``sink`` as soon as it exists."""
    start = len(sink.rows)
    cuda = torch.device(device).type == "cuda"
    from r2d2.engine.model import model_preset

    cfg = model_preset(preset)
    configs = list(plan.configs)
    mode = "fwd+bwd+opt"
    dtype = "bfloat16" if cuda else "float32"  # what Step trains in (status rows too)
    if plan.steps:
        batch = _pick_batch(preset, device, plan)
        shape = _shape(preset, cfg, batch)
        if batch < 1:
            for c in configs:
                sink.add(
                    harness.status_row(
                        op="train_step",
                        provider=c,
                        mode=mode,
                        shape=shape,
                        status="oom",
                        error="eager fits no batch",
                        device=device,
                        dtype=dtype,
                    )
                )
            configs = []
        for config in configs:

            def skip(why: str, status: str = "skipped", config=config) -> None:
                sink.add(
                    harness.status_row(
                        op="train_step",
                        provider=config,
                        mode=mode,
                        shape=shape,
                        status=status,
                        error=why,
                        device=device,
                        dtype=dtype,
                    )
                )
                print(f"[{status}] {preset} {config}: {why}", file=sys.stderr)

            if plan.quick and not cuda and config.endswith("compile"):
                skip(
                    "torch.compile configs are skipped under --quick on CPU (inductor's C++ "
                    "build takes minutes on a shared CPU); run without --quick"
                )
                continue
            if config == "apex" and isinstance(_apex(), str):
                skip(_apex())
                continue
            if _late(plan):
                skip("out of --budget before it started")
                continue
            step = None
            try:
                step = Step(preset, config, device, eager_attention=plan.eager_attention)
                sink.add(_step_row(step, preset, config, batch, plan.quick, plan.rep_ms))
            except torch.OutOfMemoryError as e:
                skip(f"OOM at batch {batch} ({str(e).splitlines()[0][:120]})", "oom")
            except Exception as e:  # noqa: BLE001  (a compile failure must not lose the others)
                first = (str(e).strip().splitlines() or [""])[0][:300]
                skip(f"{type(e).__name__}: {first}", "failed")
            finally:
                if step is not None:
                    step.close()
                _free(torch.device(device))
    if plan.max_batch:
        max_batch_rows(preset, device, plan, sink)
    return sink.rows[start:]


def max_batch_rows(preset: str, device: str, plan: Plan, sink: harness.RowWriter) -> list[dict]:
    """Largest batch (= contrastive batch on one GPU) with activation checkpointing, eager vs ours.
    Capacity rows: no timing fields, the batch found and whether the search finished."""
    rows = []
    mode = "fwd+bwd+opt (checkpointed)"
    budget = plan.max_batch_budget
    end = None if budget is None else time.monotonic() + budget
    for i, config in enumerate(("eager", "ours")):
        shape = {"preset": preset}
        if _late(plan):
            rows.append(
                sink.add(
                    harness.status_row(
                        op="max_batch",
                        provider=config,
                        mode=mode,
                        shape=shape,
                        status="skipped",
                        error="out of --budget before it started",
                        device=device,
                    )
                )
            )
            continue
        # eager gets half the search budget, ours what is left of it
        own = None if end is None else (min(end, time.monotonic() + budget / 2) if i == 0 else end)
        deadline = min((d for d in (plan.deadline, own) if d is not None), default=None)
        step = None
        try:
            step = Step(
                preset, config, device, eager_attention=plan.eager_attention, checkpointing=True
            )
            found = largest_batch(
                lambda n, step=step: fits(step, n),
                start=plan.max_batch_start,
                cap=plan.max_batch_cap,
                granularity=plan.max_batch_granularity,
                deadline=deadline,
            )
            rows.append(
                sink.add(
                    harness.make_row(
                        op="max_batch",
                        provider=config,
                        mode=mode,
                        shape=shape,
                        timing=None,
                        device=device,
                        dtype="bfloat16",
                        max_batch=found.fits,
                        max_batch_fails=found.fails,
                        max_batch_cap=plan.max_batch_cap,
                        search_complete=found.complete,
                        probes=found.probes,
                        kernels=step.kernel_picks,
                    )
                )
            )
        except Exception as e:  # noqa: BLE001
            rows.append(
                sink.add(
                    harness.status_row(
                        op="max_batch",
                        provider=config,
                        mode=mode,
                        shape=shape,
                        status="failed",
                        error=e,
                        device=device,
                    )
                )
            )
        finally:
            if step is not None:
                step.close()
    ok = {r["provider"]: r for r in rows if r.get("max_batch")}
    if "eager" in ok and "ours" in ok:
        ok["ours"]["batch_ratio"] = ok["ours"]["max_batch"] / ok["eager"]["max_batch"]
    return rows


def _summary(rows: list[dict]) -> None:
    for r in rows:
        name = f"  {r['shape']['preset']:<6} {r['provider']:<14}"
        if r.get("status", "ok") != "ok":
            continue  # print_table listed it with its reason
        if r["op"] == "train_step":
            print(
                f"{name} {r['samples_per_s']:9.1f} samples/s  MFU "
                f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')}"
            )
        else:
            bound = (
                ""
                if r["search_complete"]
                else f" (search stopped early; fails at {r['max_batch_fails']})"
            )
            print(f"{name} max batch (checkpointed) {r['max_batch']}{bound}")


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__.splitlines()[0])
    ap.add_argument(
        "--preset",
        nargs="+",
        default=None,
        help="model presets (default: base large on CUDA, base under --quick on CUDA, tiny on CPU)",
    )
    ap.add_argument(
        "--batch", type=int, default=None, help="fixed batch (default: largest eager fits)"
    )
    ap.add_argument(
        "--batch-max",
        type=int,
        default=None,
        help="the largest of N, N/2, N/4, ... at which eager fits (one probe each)",
    )
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument(
        "--eager-attention",
        choices=("sdpa", "eager"),
        default="sdpa",
        help="attention backend of the eager baseline",
    )
    ap.add_argument(
        "--no-max-batch", action="store_true", help="skip the checkpointed max-batch search"
    )
    ap.add_argument(
        "--max-batch-only", action="store_true", help="only the checkpointed max-batch search"
    )
    ap.add_argument("--max-batch-start", type=int, default=64)
    ap.add_argument("--max-batch-cap", type=int, default=16384)
    ap.add_argument("--max-batch-granularity", type=int, default=16)
    ap.add_argument(
        "--max-batch-budget",
        type=float,
        default=None,
        metavar="S",
        help="seconds for the eager and ours searches together (default: unbounded)",
    )
    ap.add_argument(
        "--rep-ms",
        type=float,
        default=None,
        help="timing budget per configuration in ms (default 1000, 100 under --quick)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="S",
        help="nothing new starts after S seconds (skipped rows say so)",
    )
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    cuda = args.device == "cuda"
    if args.max_batch_only and args.no_max_batch:
        ap.error("--max-batch-only and --no-max-batch exclude each other")
    harness.measured_peaks(args.device)  # before any model fills the GPU
    if args.preset:
        presets = args.preset
    else:
        presets = ["tiny"] if not cuda else (["base"] if args.quick else ["base", "large"])
    sink = harness.RowWriter(args.out)
    batch_max = args.batch_max or (64 if args.quick and cuda and args.batch is None else None)
    for preset in presets:
        plan = Plan(
            batch=args.batch,
            batch_max=batch_max,
            configs=tuple(args.configs),
            quick=args.quick,
            eager_attention=args.eager_attention,
            steps=not args.max_batch_only,
            # on CPU nothing runs out of memory: only an explicit --max-batch-only
            # searches there (up to the cap; a plumbing check, not a capacity)
            max_batch=args.max_batch_only
            or (cuda and not args.no_max_batch and not args.quick and preset != "tiny"),
            max_batch_start=args.max_batch_start,
            max_batch_cap=args.max_batch_cap,
            max_batch_granularity=args.max_batch_granularity,
            max_batch_budget=args.max_batch_budget,
            rep_ms=args.rep_ms,
            deadline=None if args.budget is None else t0 + args.budget,
        )
        run(preset, args.device, plan, sink)
    rows = harness.add_ratios(sink.rows, baseline="eager")
    harness.print_table([r for r in rows if r["op"] == "train_step"])
    _summary(rows)
    if args.out:
        print(f"rows appended to {args.out} as they were measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
