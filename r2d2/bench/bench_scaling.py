"""Data-parallel scaling of the pre-training step, measured on 1..N processes, and a model of the
communication volume per step for 8..512 GPUs.

Measured (weak scaling, fixed local batch): N processes each run the full step of bench_step.py
(DDP over the objective; the losses gather over the process group), gloo on CPU processes, NCCL
on GPUs (one process per visible GPU). Efficiency(N) = samples/s(N) / (N * samples/s(1)).
On CPU every process gets cpu_count // max(N) threads in every run, so N = 1 is not handed the
whole machine; CPU figures only show the plumbing and gloo's overhead, not GPU scaling. Each row
also carries ``model_bytes_per_rank``: what the model below predicts for that very run (its
contrastive backend and mode, negatives, process-group backend).

Model (bytes *sent* per rank per step, from the collectives the code in r2d2/ issues; NCCL's ring
algorithms: an all-gather of a per-rank block s sends (N-1) s, a reduce-scatter of a total S sends
(N-1)/N S, an all-reduce 2 (N-1)/N S; gloo has no reduce-scatter, so r2d2.dist.reduce_scatter
all-reduces and slices there, twice the bytes). b local batch, B = N b, d the embedding width
(features fp32), L text tokens, 1+P image tokens, nf = 4 + 3 (teacher) + 1 (negatives) fp32
column-statistic fields and one int32 index:

  GCPR gather   the fused backends' default (contrastive_dist.FusedGather); images stay local.
                fwd: all-gather the TEXT features, their ids (int64) and the teacher's text
                features: (N-1) b (4d + 8 + 4d); all-reduce the column statistics of all B
                texts (MAX, SUM, MIN over [nf + 1, B]): 2 (N-1) b 4 (nf + 1).
                bwd: all-gather the N loss gradients, (N-1) 4; reduce-scatter the text-feature
                gradients fp32 [B, d] and the per-column logit-scale terms [B]: (N-1) b (4d + 4).
  GCPR ring     (loss.gcpr_mode="ring", FusedRing) fwd: the text block (texts, ids, teacher texts)
                makes N-1 hops, its column-statistic accumulator N hops: (N-1) b (8d + 8) +
                N b 4 (nf + 1); bwd: the block with its column statistics [3, b] makes N-1 hops,
                the dT / ds accumulators N hops: (N-1) b (8d + 20) + N b (4d + 4); + (N-1) 4.
  GCPR eager    (the eager backend, and every CPU run) all-gathers image and text features with
                grad, ids and both teacher features: (N-1) b (16 d + 8); bwd reduce-scatters the
                image and text gradients: (N-1) b 8 d.
  FGR global    all-gather of the student image and text token states (with grad), the teacher's
                (without) and the bool text masks; bwd reduce-scatters the student ones' gradients:
                (N-1) b (2 t + L) + (N-1) b t,   t = ((1+P) Wv + L Wt) x 4 bytes (fp32 states)
  FGR local     negatives from the local batch: 0
  DDP gradients ring all-reduce of the fp32 gradients of the P_model parameters: 2 (N-1)/N P_model 4
  shape check   the objective all-gathers (b, L) once per step: (N-1) 16 (in the totals)

Memory held per rank for what the collectives bring (activations, fp32): GCPR gather B (12 d + 48)
(gathered texts, teacher texts, ids, column state, the dT buffer); GCPR ring b (24 d + 48) (two
blocks and accumulators in flight, independent of N); FGR global 2 B t + B L (gathered student and
teacher states, masks). Time at a given bandwidth is bytes / bandwidth and ignores latency and
overlap with compute.

    python benchmarks/bench_scaling.py [--quick] [--procs 1 2] [--model-only] [--write-docs]
        [--gcpr-mode gather|ring] [--fgr-negatives global|local]
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

from r2d2.bench import harness

DOCS = harness.REPO_ROOT / "docs" / "benchmarks.md"  # --write-docs: from a checkout only
BEGIN, END = "<!-- comm-model:begin (bench_scaling.py --write-docs) -->", "<!-- comm-model:end -->"
WORLDS = (8, 16, 32, 64, 128, 256, 512)


# ----------------------------------------------------------------------------------------------
# the communication model


def param_count(preset: str) -> int:
    """Trainable parameters of the student, counted on the meta device (nothing allocated)."""
    from r2d2.engine.model import R2D2Model, model_preset

    with torch.device("meta"):
        model = R2D2Model(model_preset(preset))
    # the tied MLM decoder shares the word embeddings: parameters() yields it once
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def comm_bytes(
    n: int,
    *,
    b: int,
    d: int,
    L: int,
    img_tokens: int,
    wv: int,
    wt: int,
    params: int,
    teacher: bool = True,
    neg: bool = True,
    gloo: bool = False,
    tok_bytes: int = 4,
) -> dict[str, float]:
    """Bytes each rank sends per step, by term (see the module docstring for the formulas)."""
    if n == 1:
        return dict.fromkeys(
            ("gcpr_gather", "gcpr_ring", "gcpr_eager", "fgr_global", "ddp_grads", "shape_check"),
            0.0,
        )
    rs = 2.0 if gloo else 1.0  # gloo: reduce-scatter = all-reduce + slice
    t = (img_tokens * wv + L * wt) * tok_bytes
    nf = 4 + 3 * teacher + neg
    col = 4 * (nf + neg)  # bytes per column of the statistics (+ int32 index)
    txt_blk = 4 * d + 8 + 4 * d * teacher
    return {
        "gcpr_gather": (
            (n - 1) * b * txt_blk
            + 2 * (n - 1) * b * col
            + (n - 1) * 4
            + rs * (n - 1) * b * (4 * d + 4)
        ),
        "gcpr_ring": (
            (n - 1) * b * txt_blk
            + n * b * col
            + (n - 1) * b * (txt_blk + 12)
            + n * b * (4 * d + 4)
            + (n - 1) * 4
        ),
        "gcpr_eager": (n - 1) * b * (8 * d + 8 + 8 * d * teacher) + rs * (n - 1) * b * 8 * d,
        "fgr_global": (n - 1) * b * ((1 + teacher) * t + L) + rs * (n - 1) * b * t,
        "ddp_grads": 2 * (n - 1) / n * params * 4,
        "shape_check": (n - 1) * 16,
    }


def gathered_memory(
    n: int, *, b: int, d: int, L: int, img_tokens: int, wv: int, wt: int, tok_bytes: int = 4
) -> dict[str, float]:
    """Extra bytes each rank holds for what the collectives bring (activations only)."""
    B = n * b
    return {
        "gcpr_gather": B * (12 * d + 48),
        "gcpr_ring": b * (24 * d + 48),
        "fgr_global": 2 * B * (img_tokens * wv + L * wt) * tok_bytes + B * L,
    }


def model_bytes(
    n: int, *, contrastive: str, gcpr_mode: str, fgr_negatives: str, gloo: bool, **dims
) -> float:
    """Total bytes per rank per step the model predicts for one configuration of the step."""
    c = comm_bytes(n, gloo=gloo, **dims)
    gcpr = c["gcpr_eager"] if contrastive == "eager" else c[f"gcpr_{gcpr_mode}"]
    fgr = c["fgr_global"] if fgr_negatives == "global" else 0.0
    return gcpr + fgr + c["ddp_grads"] + c["shape_check"]


def _dims(preset: str, b: int) -> dict:
    from r2d2.engine.model import model_preset

    cfg = model_preset(preset)
    return dict(
        b=b,
        d=cfg.embed_dim,
        L=cfg.max_text_len,
        img_tokens=cfg.vision.num_patches + 1,
        wv=cfg.vision.width,
        wt=cfg.text.width,
    )


def comm_table(preset: str = "base", b: int = 64, worlds=WORLDS, link_gbs: float = 50.0) -> str:
    """The Markdown table of the model for ``preset`` at local batch ``b``."""
    dims = _dims(preset, b)
    params = param_count(preset)
    gib = 2**30
    lines = [
        f"Preset `{preset}`: b = {b} per GPU, d = {dims['d']}, L = {dims['L']}, "
        f"1+P = {dims['img_tokens']}, Wv = {dims['wv']}, Wt = {dims['wt']}, "
        f"{params / 1e6:.1f} M trainable parameters; NCCL (reduce-scatter in backward), with the "
        f"teacher and FGR's negatives; features and token states fp32 (the residual stream under "
        f"bf16 autocast). GCPR gather / ring = the fused backends' two modes. GiB sent per rank "
        f"per step; ms at {link_gbs:g} GB/s per GPU (a 400 Gb/s NIC); memory = extra GiB held per "
        f"rank for what the collectives bring.",
        "",
        "| GPUs | global batch | GCPR gather | GCPR ring | FGR global | DDP grads | total (gather, FGR global) "
        "| ms @ link | total (ring, FGR local) | ms @ link | mem GCPR gather | mem GCPR ring | mem FGR global |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in worlds:
        c = comm_bytes(n, params=params, **dims)
        m = gathered_memory(n, **dims)
        heavy = c["gcpr_gather"] + c["fgr_global"] + c["ddp_grads"] + c["shape_check"]
        light = c["gcpr_ring"] + c["ddp_grads"] + c["shape_check"]
        lines.append(
            f"| {n} | {n * b} | {c['gcpr_gather'] / gib:.3f} | {c['gcpr_ring'] / gib:.3f} | "
            f"{c['fgr_global'] / gib:.2f} | {c['ddp_grads'] / gib:.2f} | {heavy / gib:.2f} | "
            f"{heavy / (link_gbs * 1e9) * 1e3:.0f} | {light / gib:.2f} | "
            f"{light / (link_gbs * 1e9) * 1e3:.0f} | {m['gcpr_gather'] / gib:.3f} | "
            f"{m['gcpr_ring'] / gib:.4f} | {m['fgr_global'] / gib:.1f} |"
        )
    return "\n".join(lines)


def write_docs(table: str, path: Path = DOCS) -> None:
    """Replace the text between the markers of docs/benchmarks.md with ``table``."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


# ----------------------------------------------------------------------------------------------
# the measured 1..N run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world: int,
    port: int,
    device: str,
    preset: str,
    batch: int,
    steps: int,
    threads: int,
    result_path: str,
    loss: dict,
    warmup: int = 2,
) -> None:
    import torch.distributed as dist
    from bench_step import Step, synthetic_batch
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(threads)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    dev = f"cuda:{rank}" if cuda else "cpu"
    step = Step(preset, "ours", dev, loss=loss)
    # every parameter is used by the default LossConfig, so the trainer's default applies
    step.forward = DDP(step.objective, device_ids=[rank] if cuda else None)
    data = synthetic_batch(step.cfg, batch, dev, seed=rank)
    data["image_ids"] = data["image_ids"] + rank * batch  # globally unique ids
    for _ in range(warmup):
        step.run(data)
    dist.barrier()
    times = []
    for _ in range(steps):  # each step timed alone, so the spread is reported, not only a mean
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step.run(data)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # on the device NCCL needs; reduced in place: per step, the slowest rank sets the pace
    elapsed = torch.tensor(times, dtype=torch.float64, device=dev)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(result_path).write_text(
            json.dumps(
                {"times": elapsed.cpu().tolist(), "contrastive": step.kernel_picks["contrastive"]}
            )
        )
    dist.destroy_process_group()


def measure_world(
    world: int,
    device: str,
    preset: str,
    batch: int,
    steps: int,
    threads: int,
    loss: dict | None = None,
    warmup: int = 2,
) -> tuple[harness.Timing, str]:
    """(step time in ms over ``steps`` steps, each the slowest rank's; the contrastive backend)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t")
        mp.spawn(
            _worker,
            args=(
                world,
                _free_port(),
                device,
                preset,
                batch,
                steps,
                threads,
                out,
                loss or {},
                warmup,
            ),
            nprocs=world,
            join=True,
        )
        res = json.loads(Path(out).read_text())
    ms = sorted(1e3 * t for t in res["times"])
    return (
        harness.Timing(
            harness._quantile(ms, 0.5), harness._quantile(ms, 0.2), harness._quantile(ms, 0.8)
        ),
        res["contrastive"],
    )


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__.splitlines()[0])
    ap.add_argument(
        "--procs",
        type=int,
        nargs="+",
        default=None,
        help="process counts (default: 1 2 on CPU; 1 2 4 .. #GPUs on CUDA)",
    )
    ap.add_argument(
        "--preset",
        default=None,
        help="model for the measured run (default tiny on CPU/--quick, base on CUDA)",
    )
    ap.add_argument("--batch", type=int, default=None, help="local batch of the measured run")
    ap.add_argument("--model-preset", default="base", help="preset of the communication model")
    ap.add_argument("--model-batch", type=int, default=64, help="local batch of the model")
    ap.add_argument("--model-only", action="store_true", help="print the model; measure nothing")
    ap.add_argument(
        "--write-docs", action="store_true", help="write the model table into docs/benchmarks.md"
    )
    ap.add_argument(
        "--gcpr-mode",
        choices=("gather", "ring"),
        default="gather",
        help="loss.gcpr_mode of the measured run (the fused backends' mode)",
    )
    ap.add_argument(
        "--fgr-negatives",
        choices=("global", "local"),
        default="global",
        help="loss.fgr_negatives of the measured run",
    )
    args = ap.parse_args(argv)

    table = comm_table(args.model_preset, args.model_batch)
    print("communication model, bytes sent per rank per step:\n" + table + "\n")
    if args.write_docs:
        write_docs(table)
        print(f"wrote the table into {DOCS}")
    if args.model_only:
        return 0

    cuda = args.device == "cuda"
    ngpu = torch.cuda.device_count() if cuda else 0
    procs = args.procs or ([p for p in (1, 2, 4, 8) if p <= ngpu] if cuda else [1, 2])
    preset = args.preset or ("tiny" if args.quick or not cuda else "base")
    batch = args.batch or (4 if not cuda else 32)
    steps, warmup = (3, 1) if args.quick else (20, 2)
    threads = max(1, (os.cpu_count() or 1) // max(procs)) if not cuda else 1
    loss = {"gcpr_mode": args.gcpr_mode, "fgr_negatives": args.fgr_negatives}
    dims = dict(_dims(preset, batch), params=param_count(preset))
    sink = harness.RowWriter(args.out, baseline=None)
    base = None
    provider = f"ddp-{'nccl' if cuda else 'gloo'}"
    shape = {"preset": preset, "local_batch": batch}
    for n in procs:
        try:
            timing, contrastive = measure_world(
                n, args.device, preset, batch, steps, threads, loss, warmup
            )
        except Exception as e:  # noqa: BLE001  (one world failing must not lose the others)
            sink.add(
                harness.status_row(
                    op="scaling",
                    provider=f"{provider} x{n}",
                    mode="fwd+bwd+opt",
                    shape=shape,
                    status="failed",
                    error=e,
                    device=args.device,
                    procs=n,
                    **loss,
                )
            )
            print(f"procs {n}: failed: {e}", file=sys.stderr)
            continue
        sec = timing.median_ms / 1e3
        sps = n * batch / sec
        base = base or (sps if n == procs[0] else None)
        eff = sps / (n / procs[0] * base) if base else None
        predicted = model_bytes(n, contrastive=contrastive, gloo=not cuda, **loss, **dims)
        sink.add(
            harness.make_row(
                op="scaling",
                provider=f"{provider} x{n}",
                mode="fwd+bwd+opt",
                shape=shape,
                procs=n,
                timing=timing,
                device=args.device,
                samples_per_s=sps,
                efficiency=eff,
                threads_per_proc=None if cuda else threads,
                contrastive=contrastive,
                **loss,
                model_bytes_per_rank=predicted,
                timing_note=f"{steps} steps, each timed on the slowest rank",
            )
        )
        print(
            f"procs {n}: {sec * 1e3:.1f} ms/step, {sps:.1f} samples/s, efficiency "
            f"{'-' if eff is None else format(eff, '.2f')}, model {predicted / 2**20:.1f} MiB "
            f"sent per rank (contrastive {contrastive})" + ("  [CPU]" if not cuda else "")
        )
    if args.out:
        print(f"rows appended to {args.out} as they were measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
