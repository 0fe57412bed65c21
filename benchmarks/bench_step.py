"""Benchmark one full R2D2 pre-training step: eager vs compile vs our kernels, same run, same batch.

One step = forward of every objective (GCPR contrastive with the EMA teacher's distillation, FGR
hard-negative ITM, MLM, TgD/FgD distillation; whatever ``LossConfig()`` enables), backward, AdamW
step, zero_grad, EMA teacher update. Configurations, all measured in this one process:

  eager           KernelConfig(attention=sdpa|eager, contrastive=eager, distill_kl=eager)
  eager+compile   the same under torch.compile
  ours            KernelConfig(auto): fused kernels where the device has them
  ours+compile    the same under torch.compile
  apex            eager + apex FusedLayerNorm / FusedAdam, only where apex imports

The eager baseline's attention is SDPA by default (``--eager-attention``): plain PyTorch users get
SDPA for free, so beating anything weaker would flatter us.

Batch: ``--batch N``, or on CUDA by default the largest batch at which the *eager* configuration
fits (doubling, then bisection, on OOM); every configuration then runs at that batch so the
``x eager`` ratios compare equal work. Separately, ``max_batch`` rows give the largest batch each
of eager and ours fits with activation checkpointing (the largest contrastive batch per GPU).

Throughput: samples/s = batch / median step time; TFLOP/s from r2d2.engine.flops (analytic
matmul FLOPs per sample, teacher forward included); MFU = that / the data-sheet bf16 peak.
Peak memory: max_memory_allocated over one step, weights and optimizer state included.

On CPU (``--quick``: tiny preset, batch 4, fp32) the rows are smoke figures labelled cpu; the
compile variants are skipped under --quick there because inductor's C++ build takes minutes.

    python benchmarks/bench_step.py [--quick] [--device cuda|cpu] [--preset base large] [--batch N]
"""

from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CONFIGS = ("eager", "eager+compile", "ours", "ours+compile", "apex")


def _apex():
    try:
        from apex.normalization import FusedLayerNorm
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
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
            new = fused_ln(child.normalized_shape, eps=child.eps,
                           elementwise_affine=child.elementwise_affine)
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
    ids = torch.randint(min(110, cfg.text.vocab_size - 1), cfg.text.vocab_size, (batch, L), generator=g)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, cfg.text.pad_id))
    return {"images": torch.randn(batch, 3, size, size, generator=g).to(device),
            "input_ids": ids.to(device), "attention_mask": mask.to(device),
            "image_ids": torch.arange(batch).to(device)}


def flops_per_sample(cfg, text_len: int) -> float | None:
    """Analytic training FLOPs per sample from r2d2.engine.flops (None if that module is absent)."""
    try:
        from r2d2.engine import flops
    except ImportError:
        return None
    return flops.r2d2_flops_per_sample(flops.shape_from_config(cfg, text_len, teacher=True))


class Step:
    """A model + objective + optimizer for one configuration, and its ``run(batch)`` step."""

    def __init__(self, preset: str, config: str, device: str, *, eager_attention: str = "sdpa",
                 checkpointing: bool = False):
        from r2d2.engine.losses import LossConfig, R2D2ForPretraining
        from r2d2.engine.model import R2D2Model, model_preset

        self.cfg = model_preset(preset)
        self.device = torch.device(device)
        kernels = _kernels(config, eager_attention)
        # what each op will run (auto resolved now: attention's auto measures on its first CUDA
        # call, which must not happen inside torch.compile tracing)
        from r2d2.kernels.dispatch import resolve

        self.kernel_picks = {op: resolve(op, getattr(kernels, op), self.device)
                             for op in ("attention", "contrastive", "distill_kl")}
        self.eager_attention = eager_attention
        model = R2D2Model(self.cfg, kernels)
        model.set_activation_checkpointing(checkpointing)
        apex = _apex() if config == "apex" else None
        if apex:
            _swap_layernorm(model, apex[0])
        self.objective = R2D2ForPretraining(model, LossConfig()).to(self.device)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        if apex:
            self.opt = apex[1](params, lr=1e-5, weight_decay=0.02)
        else:
            self.opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.02,
                                         fused=self.device.type == "cuda" or None)
        self.forward = torch.compile(self.objective) if config.endswith("compile") else self.objective
        # bf16 autocast on GPU as in training; fp32 on CPU, where bf16 matmuls are emulated.
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
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
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def fits(step: Step, batch: int) -> bool:
    """One step at ``batch`` (twice: the optimizer state is allocated by the first) without OOM."""
    data = synthetic_batch(step.cfg, batch, step.device)
    try:
        step.run(data)
        step.run(data)
        return True
    except torch.cuda.OutOfMemoryError:
        step.opt.zero_grad(set_to_none=True)
        return False
    finally:
        del data
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(step: Step, start: int = 16, cap: int = 4096, granularity: int = 8) -> int:
    """Largest batch that fits (CUDA): double from ``start`` until OOM or ``cap``, then bisect."""
    if not fits(step, start):
        lo, hi = 0, start
    else:
        lo = start
        while lo * 2 <= cap and fits(step, lo * 2):
            lo *= 2
        hi = min(lo * 2, cap + 1)
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity or (lo + hi) // 2
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(step, mid) else (lo, mid)
    return lo


def _step_row(step: Step, preset: str, config: str, batch: int, text_len: int, quick: bool) -> dict:
    data = synthetic_batch(step.cfg, batch, step.device, text_len)
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
    timing = harness.measure(lambda: step.run(data), device=step.device, rep=100 if quick else 1000,
                             warmup=0 if quick else None, flush_l2=False,
                             min_blocks=3 if quick else None)
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
    fps = flops_per_sample(step.cfg, text_len)
    row = harness.make_row(
        op="train_step", provider=config, mode="fwd+bwd+opt",
        shape={"preset": preset, "batch": batch, "text_len": text_len,
               "image_size": step.cfg.vision.image_size},
        timing=timing, flops=fps * batch if fps else None, peak_mem=peak, device=step.device,
        dtype=step.dtype, samples_per_s=batch / (timing.median_ms / 1e3),
        kernels=step.kernel_picks, eager_attention=step.eager_attention, graph_breaks=breaks,
        graphs_compiled_while_timed=recompiled)
    row["mfu"] = row["frac_peak_flops"]  # MFU = achieved model FLOP/s over the data-sheet peak
    return row


def run(preset: str, device: str, *, batch: int | None, quick: bool, eager_attention: str,
        configs=CONFIGS, max_batch: bool = True) -> list[dict]:
    rows: list[dict] = []
    cuda = torch.device(device).type == "cuda"
    if quick and not cuda:
        configs = [c for c in configs if not c.endswith("compile")]
        print("[skip] torch.compile configs under --quick on CPU: inductor builds for minutes "
              "on this machine; run without --quick", file=sys.stderr)
    if "apex" in configs and _apex() is None:
        configs = [c for c in configs if c != "apex"]
        print("[skip] apex: not importable", file=sys.stderr)
    from r2d2.engine.model import model_preset

    text_len = model_preset(preset).max_text_len
    if batch is None:
        if not cuda:
            batch = 4
        else:
            s = Step(preset, "eager", device, eager_attention=eager_attention)
            batch = largest_batch(s)
            s.close()
            print(f"[{preset}] largest batch eager fits: {batch}", file=sys.stderr)
    for config in configs:
        step = None
        try:
            step = Step(preset, config, device, eager_attention=eager_attention)
            rows.append(_step_row(step, preset, config, batch, text_len, quick))
        except torch.cuda.OutOfMemoryError:
            print(f"[{preset}] {config}: OOM at batch {batch} (eager fitted it)", file=sys.stderr)
        finally:
            if step is not None:
                step.close()
    if max_batch and cuda:
        rows += max_batch_rows(preset, device, eager_attention)
    return rows


def max_batch_rows(preset: str, device: str, eager_attention: str) -> list[dict]:
    """Largest batch (= contrastive batch on one GPU) with activation checkpointing, eager vs ours."""
    rows = []
    for config in ("eager", "ours"):
        step = Step(preset, config, device, eager_attention=eager_attention, checkpointing=True)
        b = largest_batch(step, start=64, cap=16384, granularity=16)
        step.close()
        rows.append(harness.make_row(
            op="max_batch", provider=config, mode="fwd+bwd+opt (checkpointed)",
            shape={"preset": preset}, timing=harness.Timing(0.0, 0.0, 0.0), device=device,
            max_batch=b, dtype="bfloat16"))
    rows[1]["batch_ratio"] = rows[1]["max_batch"] / max(rows[0]["max_batch"], 1)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=None,
                    help="model presets (default: base large on CUDA, tiny on CPU/--quick)")
    ap.add_argument("--batch", type=int, default=None, help="fixed batch (default: largest eager fits)")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--eager-attention", choices=("sdpa", "eager"), default="sdpa",
                    help="attention backend of the eager baseline")
    ap.add_argument("--no-max-batch", action="store_true", help="skip the checkpointed max-batch search")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    harness.measured_peaks(args.device)  # before any model fills the GPU
    presets = args.preset or (["tiny"] if args.quick or not cuda else ["base", "large"])
    rows = []
    for preset in presets:
        rows += run(preset, args.device, batch=args.batch, quick=args.quick,
                    eager_attention=args.eager_attention, configs=args.configs,
                    max_batch=not args.no_max_batch and preset != "tiny")
    harness.add_ratios(rows, baseline="eager")
    harness.print_table([r for r in rows if r["op"] == "train_step"])
    for r in rows:
        if r["op"] == "train_step":
            print(f"  {r['shape']['preset']:<6} {r['provider']:<14} {r['samples_per_s']:9.1f} samples/s"
                  f"  MFU {'-' if r['mfu'] is None else format(r['mfu'], '.1%')}")
        else:
            print(f"  {r['shape']['preset']:<6} {r['provider']:<14} max batch (checkpointed) {r['max_batch']}")
    if args.out:
        print(f"rows appended to {harness.write_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
