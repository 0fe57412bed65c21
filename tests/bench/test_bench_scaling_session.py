"""The scaling benchmark's communication model (against the bytes the loss really sends) and the
GPU session script's plan, phases, budget and exit codes, on CPU (split from
test_bench_harness.py, which covers the harness, the report, bench_step and ``r2d2 bench``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "r2d2" / "bench"
from r2d2.bench import harness  # noqa: E402


def _row(provider, median):
    t = harness.Timing(median, median * 0.9, median * 1.1)
    return harness.make_row(
        op="toy", provider=provider, mode="fwd", shape={"n": 8}, timing=t, device="cpu"
    )


# ---------------------------------------------------------------------------------- scaling


def test_comm_model_formulas():
    from r2d2.bench import bench_scaling as bs

    dims = dict(b=4, d=8, L=5, img_tokens=10, wv=6, wt=6, params=1000)
    assert all(v == 0 for v in bs.comm_bytes(1, **dims).values())  # one rank sends nothing
    c8, c16 = bs.comm_bytes(8, **dims), bs.comm_bytes(16, **dims)
    # every GCPR and FGR term is a per-rank block sent N - 1 times (the ring's state N times)
    for k in ("gcpr_gather", "gcpr_eager", "fgr_global"):
        assert c16[k] / c8[k] == pytest.approx(15 / 7)
    assert c8["ddp_grads"] == pytest.approx(2 * 7 / 8 * 1000 * 4)
    # gather mode: the text block and its ids gathered, images stay local; O(B) statistics
    # (8 fp32 fields + an int32 index per column, all-reduced); text gradients reduce-scattered
    b, d = 4, 8
    assert c8["gcpr_gather"] == 7 * b * (8 * d + 8) + 2 * 7 * b * 36 + 7 * 4 + 7 * b * (4 * d + 4)
    assert c8["gcpr_eager"] == 7 * b * (16 * d + 8) + 7 * b * 8 * d
    assert c8["gcpr_gather"] < c8["gcpr_eager"]
    no_teacher = bs.comm_bytes(8, teacher=False, **dims)
    assert c8["gcpr_gather"] - no_teacher["gcpr_gather"] == 7 * b * 4 * d + 2 * 7 * b * 3 * 4
    # gloo has no reduce-scatter: r2d2.dist all-reduces, twice the backward bytes
    gloo = bs.comm_bytes(8, gloo=True, **dims)
    assert gloo["gcpr_gather"] - c8["gcpr_gather"] == 7 * b * (4 * d + 4)
    t = (10 * 6 + 5 * 6) * 4
    assert c8["fgr_global"] == 7 * 4 * (2 * t + 5) + 7 * 4 * t
    m8, m16 = (
        bs.gathered_memory(8, **{k: v for k, v in dims.items() if k != "params"}),
        bs.gathered_memory(16, **{k: v for k, v in dims.items() if k != "params"}),
    )
    assert m8["gcpr_ring"] == m16["gcpr_ring"] and m16["gcpr_gather"] == 2 * m8["gcpr_gather"]


def test_docs_table_is_the_scripts_output():
    """docs/benchmarks.md carries the model's table as bench_scaling.py computes it."""
    from r2d2.bench import bench_scaling as bs

    text = bs.DOCS.read_text()
    body = text.split(bs.BEGIN, 1)[1].split(bs.END, 1)[0].strip()
    assert body == bs.comm_table().strip(), (
        "docs/benchmarks.md is stale: run python benchmarks/bench_scaling.py --model-only --write-docs"
    )


B_LOCAL, D_FEAT, WORLD = 2, 8, 3


def _count_worker(rank, world, port, out_dir):
    """Run the contrastive loss (forward + backward) per backend/mode, counting what each rank
    sends with the ring formulas the model uses (all_gather (N-1) s, all_reduce 2 (N-1)/N S,
    P2P the tensor)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from r2d2.kernels import contrastive as C
    from r2d2.kernels.contrastive import distributed as CD
    from r2d2.kernels.dispatch import why_unavailable

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sent = [0.0]
    orig = {n: getattr(dist, n) for n in ("all_gather", "all_reduce", "batch_isend_irecv")}

    def nbytes(t):
        return t.numel() * t.element_size()

    def all_gather(parts, t, *a, **k):
        sent[0] += (world - 1) * nbytes(t)
        return orig["all_gather"](parts, t, *a, **k)

    def all_reduce(t, *a, **k):
        sent[0] += 2 * (world - 1) / world * nbytes(t)
        return orig["all_reduce"](t, *a, **k)

    def batch_isend_irecv(ops):
        sent[0] += sum(nbytes(o.tensor) for o in ops if "isend" in getattr(o.op, "__name__", ""))
        return orig["batch_isend_irecv"](ops)

    dist.all_gather, dist.all_reduce, dist.batch_isend_irecv = (
        all_gather,
        all_reduce,
        batch_isend_irecv,
    )
    g = torch.Generator().manual_seed(rank)
    res = {}
    try:
        for backend, mode in (("eager", "gather"), ("triton", "gather"), ("triton", "ring")):
            if why_unavailable("contrastive", backend, "cpu") is not None:
                continue
            img, txt, ti, tt = (
                F.normalize(torch.randn(B_LOCAL, D_FEAT, generator=g), dim=1) for _ in range(4)
            )
            img.requires_grad_()
            txt.requires_grad_()
            s = torch.tensor(20.0, requires_grad=True)
            sent[0] = 0.0
            out = C.contrastive_loss(
                img,
                txt,
                s,
                image_ids=torch.arange(B_LOCAL) + rank * B_LOCAL,
                teacher_image_feat=ti,
                teacher_text_feat=tt,
                distill_alpha=0.4,
                backend=backend,
                mode=mode,
                return_negatives=True,
                seed=3,
                check_ranks=False,
            )  # as the objective calls it (it checks b itself)
            out.loss.backward()
            res[f"{backend}-{mode}"] = sent[0]
        res["batched_p2p"] = CD._BATCH_P2P
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_comm_model_matches_the_bytes_the_loss_sends(tmp_path):
    """Three gloo ranks: the model's GCPR terms equal what the contrastive loss sends."""
    import torch.multiprocessing as mp

    from r2d2.bench import bench_scaling as bs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_count_worker, args=(WORLD, port, str(tmp_path)), nprocs=WORLD, join=True)
    from r2d2.kernels.dispatch import why_unavailable

    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    dims = dict(b=B_LOCAL, d=D_FEAT, L=1, img_tokens=1, wv=1, wt=1, params=0)
    model = bs.comm_bytes(WORLD, gloo=True, **dims)
    fused = why_unavailable("contrastive", "triton", "cpu") is None
    for r in got:
        assert r["eager-gather"] == pytest.approx(model["gcpr_eager"])
        if fused:  # the Triton interpreter runs the fused backends' communication on CPU
            assert r["batched_p2p"], "ring fell back to plain isend: its bytes were not counted"
            assert r["triton-gather"] == pytest.approx(model["gcpr_gather"])
            assert r["triton-ring"] == pytest.approx(model["gcpr_ring"])


# ---------------------------------------------------------------------------------- gpu_session.sh

SESSION = ROOT / "scripts" / "gpu_session.sh"


def _session(tmp_path, *args, env=None, timeout=240):
    e = dict(os.environ, PYTHON=sys.executable)
    e.update(env or {})
    return subprocess.run(
        ["bash", str(SESSION), *args, "--out", str(tmp_path)],
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def test_session_plan_fits_one_device_call(tmp_path):
    """--dry-run: the phases in priority order, each capped, the caps adding up to at most the
    budget, and the budget inside one 600 s command and (with a machine start of up to three
    minutes and the idle minute after it) inside the session's 15 device minutes."""
    p = _session(tmp_path, "--dry-run")
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if " cap " in ln]
    names = [ln.split()[0] for ln in lines]
    assert names == [
        "env",
        "build",
        "doctor",
        "gpu_kernels",
        "step",
        "kernels_distill_kl",
        "kernels_contrastive",
        "kernels_attention",
        "max_batch",
        "gpu_rest",
        "report",
    ]
    caps = [int(ln.split(" cap ")[1].split("s")[0]) for ln in lines]
    budget = int(p.stdout.split("budget ")[-1].split("s")[0])
    assert (
        sum(caps) <= budget <= 540
    )  # every phase gets its cap; the 600 s command limit, with room
    assert budget + 180 + 60 <= 15 * 60
    assert f"caps of the planned phases: {sum(caps)}s" in p.stdout
    assert (
        "step_compile        (only with --phases step_compile)" in p.stdout
    )  # opt-in: minutes of inductor
    assert "--max-batch-budget" in p.stdout and "--batch-max" in p.stdout
    # the documented call: one command under the tool's 600 s limit, carrying the wheels
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    call = doc.split("run(command=")[1].split(")")[0]
    assert "timeout_s=" in call and int(call.split("timeout_s=")[1].split(",")[0]) <= 600
    assert 'carry=[".whl"]' in call
    # the same plan runs when only the phases named are asked for (a rerun)
    p = _session(tmp_path, "--dry-run", "--phases", "build,step_compile,report")
    assert [ln.split()[0] for ln in p.stdout.splitlines() if " cap " in ln] == [
        "build",
        "step_compile",
        "report",
    ]


def test_session_python_falls_back_to_the_checkouts_venv(tmp_path):
    """Without $PYTHON the session uses .venv/bin/python when it imports torch, else python3."""
    e = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    p = subprocess.run(
        ["bash", str(SESSION), "--dry-run", "--out", str(tmp_path)],
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    venv = ROOT / ".venv" / "bin" / "python"
    doctor = next(ln for ln in p.stdout.splitlines() if ln.startswith("doctor"))
    ok = venv.is_file() and subprocess.run([str(venv), "-c", "import torch"]).returncode == 0
    assert doctor.endswith(f"{venv if ok else 'python3'} -m r2d2 doctor"), doctor


def test_session_cpu_phases_results_and_exit_codes(tmp_path):
    """--cpu on a seeded rows file: the report phase renders the layout; a phase over its cap
    times out (exit 1, summary says so); a phase that cannot get its minimum is skipped (exit 3)."""
    stem = time.strftime("%Y-%m-%d", time.gmtime()) + "_cpu"
    harness.write_rows(
        harness.add_ratios([_row("eager", 2.0), _row("ours", 1.0)]), tmp_path / f"{stem}.jsonl"
    )
    p = _session(tmp_path, "--cpu", "--phases", "report")
    assert p.returncode == 0, p.stdout + p.stderr
    for suffix in (".jsonl", ".md", ".png"):
        assert (tmp_path / f"{stem}{suffix}").is_file(), suffix
    summary = (tmp_path / "session.md").read_text()
    assert "| report | ok | 0 |" in summary and (tmp_path / "logs.tar.gz").is_file()
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back
    slow = tmp_path / "slowpy"  # a python that takes 30 s to start: past a 1 s cap
    slow.write_text(f'#!/bin/sh\nsleep 30\nexec {sys.executable} "$@"\n')
    slow.chmod(0o755)
    p = _session(
        tmp_path,
        "--cpu",
        "--phases",
        "report",
        env={"PYTHON": str(slow), "R2D2_SESSION_CAP_REPORT": "1", "R2D2_SESSION_MIN_REPORT": "1"},
    )
    assert (
        p.returncode == 1 and "| report | timeout | 124 |" in (tmp_path / "session.md").read_text()
    )
    p = _session(tmp_path, "--cpu", "--phases", "step", "--budget", "30")
    assert p.returncode == 3 and "skipped (budget)" in (tmp_path / "session.md").read_text()


@pytest.mark.slow
def test_session_cpu_end_to_end(tmp_path):
    """Every phase of the CPU mode for real (tiny settings): rows from each bench phase."""
    p = _session(tmp_path, "--cpu", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    stem = time.strftime("%Y-%m-%d", time.gmtime()) + "_cpu"
    rows = harness.read_rows([tmp_path / f"{stem}.jsonl"])
    assert {r["op"] for r in rows} >= {"train_step", "distill_kl", "max_batch"}
    assert len({r["run_id"] for r in rows}) == 1
    assert (
        (tmp_path / "gpu_kernels.xml").is_file()
        and (tmp_path / "gpu_rest.xml").is_file()
        and (tmp_path / f"{stem}.png").is_file()
    )
