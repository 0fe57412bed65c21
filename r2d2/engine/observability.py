"""What a run reports: a tqdm bar, ``<out>/log.jsonl``, TensorBoard scalars, ``<out>/loss.png``.

Every log row holds ``step`` and ``loss`` (the total) plus each ``*_loss`` term, ``lr``,
``grad_norm``, ``samples_per_s``, ``tokens_per_s``, ``tflops`` (achieved, from the analytic count
in :mod:`r2d2.engine.flops`), ``mfu`` (None on devices without a peak entry), ``peak_mem_gb``,
``skipped`` (samples skipped so far: ``skipped_read``, dropped by the reader when the annotation
file was read, plus ``skipped_decode``, found while loading, all ranks), ``skip_reasons`` (both
by reason; TensorBoard gets one scalar per reason) and ``bad_steps`` (non-finite steps so far).
Only rank 0 writes. On resume the rows after the resumed step are dropped, so the log reads as
one run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from r2d2.engine.flops import mfu


@dataclass
class ThroughputWindow:
    """Samples and tokens (all ranks) since the last log row, and when that window began."""

    t: float = field(default_factory=time.perf_counter)
    samples: float = 0.0
    tokens: float = 0.0

    def add(self, samples: float, tokens: float) -> None:
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> tuple[float, float]:
        """(samples/s, tokens/s) over the window so far."""
        dt = max(time.perf_counter() - self.t, 1e-9)
        return self.samples / dt, self.tokens / dt


def metrics_row(
    *,
    step: int,
    terms: dict[str, float],
    lr: float,
    grad_norm: float,
    window: ThroughputWindow,
    flops_per_sample: float,
    world: int,
    device_name: str,
    precision: str,
    device: torch.device,
    read_skipped: int,
    read_reasons: Counter,
    skipped: int,
    reasons: Counter,
    shard_events: tuple,
    bad_steps: int,
    samples: int,
) -> dict:
    """One ``log.jsonl`` row (the keys of the module docstring). Throughput is the world's;
    ``tflops`` and ``mfu`` are per process (the achieved FLOP/s of one device), null when the
    model's FLOP count is unknown. Damaged-shard events are reported as ``truncated_shards``,
    not as skipped samples."""
    sps, tps = window.rates()
    fl = flops_per_sample * sps / world
    return {
        "step": step,
        "loss": terms["loss"],
        **terms,
        "lr": lr,
        "grad_norm": grad_norm,
        "samples_per_s": sps,
        "tokens_per_s": tps,
        "tflops": fl / 1e12 if math.isfinite(fl) else None,
        "mfu": mfu(fl, device_name, precision) if math.isfinite(fl) else None,
        "peak_mem_gb": peak_memory_gb(device),
        "skipped": read_skipped + skipped,
        "skipped_read": read_skipped,
        "skipped_decode": skipped,
        "skip_reasons": {
            k: v for k, v in (read_reasons + reasons).items() if k not in shard_events
        },
        "truncated_shards": reasons.get("truncated_shard", 0),
        "bad_steps": bad_steps,
        "samples": samples,
    }


def _truncate_log(path: str, step: int) -> None:
    """Keep rows with ``step <= step`` (a resumed run rewrites what came after its checkpoint)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:  # a half-written last line of a killed run
                continue
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def read_log(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


class Observer:
    """Rank-0 reporting; on other ranks every method is a no-op."""

    def __init__(
        self,
        out: str,
        max_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.enabled = enabled
        self.out = out
        self.log_path = os.path.join(out, "log.jsonl")
        self.bar = self.tb = None
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        _truncate_log(self.log_path, start_step)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=max_steps,
                initial=start_step,
                desc="train",
                dynamic_ncols=True,
                mininterval=1.0,
            )
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=start_step + 1)
        self._t = time.perf_counter()

    def step(self, loss: float, samples_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.1f}", refresh=False
            )

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean, ensure_ascii=False) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if k == "step":
                    continue
                if isinstance(v, dict):  # e.g. skip_reasons: one scalar per reason
                    for sub, x in v.items():
                        if isinstance(x, (int, float)) and not isinstance(x, bool):
                            self.tb.add_scalar(f"train/{k}/{sub}", x, row["step"])
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self, plot: bool = True) -> str | None:
        """Close the bar and writer; draw the loss curves; returns the PNG path (or None)."""
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if plot and os.path.isfile(self.log_path):
            return plot_losses(self.log_path, os.path.join(self.out, "loss.png"))
        return None


def plot_losses(log_path: str, png: str) -> str | None:
    """``loss`` and every ``*_loss`` column against ``step``, one panel each."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        return None
    keys = ["loss"] + sorted({k for r in rows for k in r if k.endswith("_loss") and k != "loss"})
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1.2)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # CPU: the process's peak resident set (Linux reports KiB)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except (ImportError, OSError):
        return float("nan")
