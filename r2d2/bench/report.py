"""Render benchmark JSONL rows as a Markdown table and a matplotlib figure.

    python benchmarks/report.py benchmarks/results/2026-11-25_nvidia-h100-80gb-hbm3.jsonl
        -> ....md and ....png beside the input (or --out-stem PATH_WITHOUT_SUFFIX)

The Markdown groups rows by (op, shape), names the device in the title and marks CPU-only
results as such, so a table pasted into the README cannot be mistaken for a GPU figure; a case
that failed or was skipped is listed with its reason. Ratios are recomputed from the whole file
(rows of one run only, see harness.run_id). The figure has one panel per op: speed-up over eager
per provider, one group of bars per (shape, mode), the eager line at 1, on a log axis labelled at
a few round ratios.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from r2d2.bench import harness


def _f(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _mem(row: dict) -> str:
    b = row.get("peak_mem_bytes")
    return "" if not b else f"{b / 2**20:.0f}"


def _frac(row: dict) -> str:
    """The fraction of measured peak if known, else of the data sheet; the larger of FLOP/byte."""
    for f, b, tag in (
        ("frac_measured_flops", "frac_measured_bw", ""),
        ("frac_peak_flops", "frac_peak_bw", " (sheet)"),
    ):
        vals = [v for v in (row.get(f), row.get(b)) if v is not None]
        if vals:
            return f"{100 * max(vals):.0f}%{tag}"
    return ""


def _notes(row: dict) -> str:
    """Per-op extras: step throughput and MFU, scaling efficiency, the kernels auto picked."""
    out = []
    if row.get("samples_per_s") is not None:
        out.append(f"{row['samples_per_s']:.1f} samples/s")
    if row.get("mfu") is not None:
        out.append(f"MFU {100 * row['mfu']:.1f}%")
    if row.get("efficiency") is not None:
        out.append(f"efficiency {row['efficiency']:.2f}")
    if row.get("graph_breaks") is not None:
        out.append(f"{row['graph_breaks']} graph-break events while compiling")
    if row.get("graphs_compiled_while_timed"):
        out.append(f"recompiled {row['graphs_compiled_while_timed']}x while timed")
    if row.get("kernels"):
        out.append(" ".join(f"{k}={v}" for k, v in row["kernels"].items()))
    return "; ".join(out)


def _cell(text) -> str:
    """Free text made safe for one Markdown table cell."""
    return "" if text is None else str(text).replace("|", "/").replace("\n", " ")


def title(rows: list[dict]) -> str:
    devices = sorted({r.get("device", "?") for r in rows})
    cpu = all(r.get("device_type") == "cpu" for r in rows)
    label = " (CPU run: smoke figures, not GPU results)" if cpu else ""
    return f"Benchmarks on {', '.join(devices)}{label}"


def markdown(rows: list[dict]) -> str:
    """One table per (op, shape): mode x provider with time, spread, throughput, ratio, memory."""
    if not rows:
        return "(no rows)\n"
    env = rows[0]
    shas = sorted({str(r.get("git_sha")) for r in rows})
    lines = [
        f"# {title(rows)}",
        "",
        f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda') or '-'}, "
        f"driver {env.get('driver') or '-'}, git {', '.join(shas)}, "
        f"{min(r['timestamp'] for r in rows)} .. {max(r['timestamp'] for r in rows)}",
        "",
        "Median of repeated runs (p20-p80 in brackets); `x eager` = eager median / this "
        "median, measured in the same run; % peak = of the peak measured on the device "
        "(copy bandwidth, bf16 matmul) or, marked sheet, of the data sheet.",
        "",
    ]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], harness.shape_str(r["shape"]), str(r.get("dtype") or ""))].append(r)
    for (op, shape, dtype), rs in groups.items():
        lines += [
            f"## {op} — {shape}" + (f" — {dtype}" if dtype else ""),
            "",
            "| mode | provider | median ms [p20-p80] | TFLOP/s | GB/s | % peak | x eager | peak MiB | notes |",
            "|---|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in rs:
            if r.get("status", "ok") != "ok":  # attempted, no figure: say why
                lines.append(
                    f"| {r['mode']} | {r['provider']} | {r['status']} | | | | | | "
                    f"{_cell(r.get('error'))} |"
                )
                continue
            if r.get("max_batch") is not None:  # a capacity row, not a timing
                bound = (
                    ""
                    if r.get("search_complete", True)
                    else (f"search stopped early (fails at {r.get('max_batch_fails')}); ")
                )
                lines.append(
                    f"| {r['mode']} | {r['provider']} | max batch {r['max_batch']} | | | | "
                    f"{_f(r.get('batch_ratio'), '.2f')} | | {bound}batch vs eager |"
                )
                continue
            lines.append(
                f"| {r['mode']} | {r['provider']} | {r['median_ms']:.4g} "
                f"[{r['p20_ms']:.4g}-{r['p80_ms']:.4g}] | {_f(r.get('tflops'), '.3g')} | "
                f"{_f(r.get('gbps'), '.4g')} | {_frac(r)} | {_f(r.get('ratio'), '.2f')} | {_mem(r)} | "
                f"{_notes(r)} |"
            )
        lines.append("")
    return "\n".join(lines)


# candidate tick ratios, most telling first: eager's line, decades, then the halves and doubles
TICK_PRIORITY = (
    1.0,
    10.0,
    0.1,
    100.0,
    0.01,
    1000.0,
    0.001,
    2.0,
    0.5,
    5.0,
    0.2,
    20.0,
    0.05,
    50.0,
    0.02,
    200.0,
    0.005,
    500.0,
    0.002,
    1.5,
    3.0,
    0.75,
    1.25,
    0.9,
    1.1,
)


def ratio_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Round ratios inside [lo, hi] for a log axis, 1 first, then by :data:`TICK_PRIORITY`, each
    kept only if it lies far enough (in log space) from those already kept, at most ``most``.
    Matplotlib's log locator labels decades only, and its minor labels (all that shows on a
    range under a decade) print on top of each other."""
    import math

    span = math.log(hi) - math.log(lo)
    gap = span / (most + 1)
    kept: list[float] = []
    for t in TICK_PRIORITY:
        if lo <= t <= hi and all(abs(math.log(t / k)) >= gap for k in kept):
            kept.append(t)
        if len(kept) == most:
            break
    return sorted(kept)


def _wrap(text: str, width: int = 24) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def plot(rows: list[dict], path: str | Path) -> Path | None:
    """One panel per op: ratio vs eager per provider, grouped by (shape, mode)."""
    rows = [r for r in rows if r.get("ratio") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or the device machine
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ops = list(dict.fromkeys(r["op"] for r in rows))
    ncases = max(
        len({(harness.shape_str(r["shape"]), r["mode"]) for r in rows if r["op"] == op})
        for op in ops
    )
    fig, axes = plt.subplots(
        len(ops), 1, figsize=(max(8.0, 1.6 * ncases), 3.4 * len(ops)), squeeze=False
    )
    for ax, op in zip(axes[:, 0], ops):
        rs = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys((harness.shape_str(r["shape"]), r["mode"]) for r in rs))
        # the baseline is the line at 1, not a bar
        providers = list(
            dict.fromkeys(r["provider"] for r in rs if r["provider"] != r.get("baseline"))
        )
        width = 0.8 / max(len(providers), 1)
        vals_all = [1.0]
        for i, p in enumerate(providers):
            by_case = {
                (harness.shape_str(r["shape"]), r["mode"]): r["ratio"]
                for r in rs
                if r["provider"] == p
            }
            xs = [j + i * width for j, c in enumerate(cases) if c in by_case]
            vals = [by_case[c] for c in cases if c in by_case]
            vals_all += vals
            # bars grow from the eager line: up = faster, down = slower
            bars = ax.bar(xs, [v - 1 for v in vals], width, bottom=1.0, label=p)
            ax.bar_label(bars, labels=[f"{v:.3g}x" for v in vals], fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8)
        # log axis: a 0.1x and a 10x are equally far from eager, and one outlier cannot flatten
        # every other bar; room above and below for the bar labels
        lo, hi = min(vals_all) / 1.3, max(vals_all) * 1.3
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(FixedLocator(ratio_ticks(lo, hi)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{_wrap(s)}\n{m}" for s, m in cases], fontsize=6)
        ax.set_ylabel("speed-up vs eager (log)")
        ax.set_title(op)
        ax.legend(fontsize=7)
    fig.suptitle(title(rows), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(jsonl: list[str | Path], out_stem: str | Path | None = None) -> tuple[Path, Path | None]:
    """Write <stem>.md and <stem>.png from the rows of ``jsonl``; returns their paths."""
    rows = harness.add_ratios(harness.read_rows(jsonl), baseline="eager")
    stem = Path(out_stem) if out_stem else Path(jsonl[0]).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = stem.with_suffix(".md")
    md.write_text(markdown(rows))
    return md, plot(rows, stem.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="+", help="result files (rows of harness.make_row)")
    ap.add_argument(
        "--out-stem", default=None, help="output path without suffix (default: the first input's)"
    )
    args = ap.parse_args(argv)
    md, png = render(args.jsonl, args.out_stem)
    print(f"wrote {md}" + (f" and {png}" if png else " (no ratios to plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
