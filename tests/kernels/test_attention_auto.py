"""attention ``auto``: one pick per shape class, measured on the first call of the class.

On CPU the measuring logic (r2d2/kernels/autotune.py, attention's classes in
attention/tuning.py) runs on CPU tensors (the tuning's ``device_types`` patched to include "cpu")
with real timings of cheap backends, or with an injected timer and candidate list, so the
selection, the per-class cache, the no_grad/inference_mode handling, failure reporting and the
INFO log line are all checked without a GPU. The GPU test checks that every class is really
measured there, with every runnable candidate running.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from r2d2.kernels import attention, attention_ref, autotune, state_dict
from r2d2.kernels.attention.tuning import MAX_SCORES, call_probe, class_key, class_str
from r2d2.kernels.dispatch import (
    auto_backend,
    load_state_dict,
    resolve,
    triton_importable,
    why_unavailable,
)

# The module, not the function r2d2.kernels.attention that shadows it as a package attribute.
attn_mod = importlib.import_module("r2d2.kernels.attention")
FP32_TOL = dict(atol=2e-5, rtol=2e-5)
needs_triton = pytest.mark.skipif(not triton_importable(), reason="triton not installed")


def _inputs(B, H, Lq, Lk, D, *, dtype=torch.float32, device="cpu", mask="random"):
    """Fresh random leaves and a key mask ("random": last batch row fully padded; "lengths":
    prefix-valid like padded captions; None)."""
    q, k, v = (
        torch.randn(B, H, L, D, device=device).to(dtype).requires_grad_() for L in (Lq, Lk, Lk)
    )
    m = None
    if mask == "random":
        m = torch.rand(B, Lk, device=device) > 0.35
        m[:, 0] = True
        m[-1] = False
    elif mask == "lengths":
        m = torch.arange(Lk, device=device)[None, :] < torch.randint(
            1, Lk + 1, (B, 1), device=device
        )
    return q, k, v, m


def test_auto_on_cpu_is_sdpa_not_interpreter():
    assert auto_backend("attention", "cpu") == "sdpa"
    q, k, v, m = _inputs(2, 2, 7, 9, 8)
    attention(q, k, v, key_padding_mask=m)
    assert attn_mod.auto_picks() == {}  # nothing measured off CUDA


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """auto's CUDA logic (measure per class) on CPU tensors, with no picks before or after."""
    monkeypatch.setattr(attn_mod.TUNING, "device_types", ("cuda", "cpu"))
    monkeypatch.delenv("R2D2_ATTENTION_AUTO", raising=False)
    attn_mod.auto_timings_clear()
    yield
    attn_mod.auto_timings_clear()


@needs_triton
def test_auto_real_timing_works_in_eval_and_inference_mode(auto_on_cpu, monkeypatch):
    # The old defect: the first auto call of a device came from an eval loop, the fwd+bwd timing
    # raised under no_grad for every candidate and "none" was cached for good.
    monkeypatch.setattr(attn_mod.TUNING, "candidates", ("eager", "sdpa"))
    monkeypatch.setattr(autotune, "WARMUP", 0)  # CPU bf16 is slow: one timed call each
    monkeypatch.setattr(autotune, "REPS", (1, 1))
    q, k, v, m = (x.detach() for x in _inputs(2, 2, 7, 19, 32, mask="lengths"))
    rng = torch.get_rng_state()
    with torch.inference_mode():
        ref = auto_backend("attention", "cpu")  # the fwd+bwd reference class
        m = m.clone()  # an inference-mode mask, as an eval loop's would be
        out = attention(q, k, v, key_padding_mask=m)  # a forward-only class
        probe = call_probe(q, k, m, 0.1, grad=True)  # holds an inference-mode mask
        # The fused backends save the mask for backward (an inference tensor refuses that).
        assert attn_mod.TUNING.time("triton", probe) > 0  # dropout + backward, in inference
    with torch.no_grad():
        assert attn_mod.TUNING.time("sdpa", probe) > 0
    assert torch.equal(torch.get_rng_state(), rng)  # measuring draws nothing from the caller
    torch.testing.assert_close(out, attention_ref(q, k, v, m), **FP32_TOL)
    picks = attn_mod.auto_picks()
    assert sorted(picks) == [
        "cpu bf16 Lq<=64 Lk<=64 D<=64 masked fwd+bwd",
        "cpu fp32 Lq<=16 Lk<=32 D<=32 masked fwd",
    ]
    assert picks["cpu bf16 Lq<=64 Lk<=64 D<=64 masked fwd+bwd"].backend == ref
    for p in picks.values():
        assert p.failed == {} and set(p.timings_ms) == {"eager", "sdpa"}, p
        assert p.backend == min(p.timings_ms, key=p.timings_ms.get)


@needs_triton
def test_auto_picks_the_fastest_injected_candidate_per_class(auto_on_cpu, monkeypatch, caplog):
    # Stubbed timings (what runs on a GPU is measured there); the picked backend really runs.
    fake_ms = {
        (True, True): dict(triton=1.0, sdpa=2.0, eager=3.0),  # (masked, grad)
        (True, False): dict(triton=2.0, sdpa=3.0, eager=1.0),
        (False, True): dict(triton=3.0, sdpa=1.0, eager=2.0),
    }
    calls = []

    def timer(b, probe):
        calls.append((b, probe.Lq, probe.grad))
        return fake_ms[(probe.mask is not None, probe.grad)][b]

    monkeypatch.setattr(attn_mod.TUNING, "candidates", ("triton", "sdpa", "eager"))
    monkeypatch.setattr(attn_mod.TUNING, "time", timer)
    ran = []
    for name in ("attention_sdpa", "attention_ref", "_fused"):
        real = getattr(attn_mod, name)
        monkeypatch.setattr(
            attn_mod, name, lambda *a, _r=real, _n=name, **kw: (ran.append(_n), _r(*a, **kw))[1]
        )
    caplog.set_level("INFO", logger="r2d2.kernels")
    _q, k, v, m = _inputs(2, 2, 20, 24, 32, mask="random")
    cases = [  # (Lq, masked, no_grad) -> backend that must run
        ((20, True, False), "_fused"),
        ((30, True, False), "_fused"),  # one class (Lq <= 32)
        ((20, True, True), "attention_ref"),
        ((20, False, False), "attention_sdpa"),
        ((40, True, False), "_fused"),
    ]  # Lq <= 64: a new class
    for (lq, masked, no_grad), want in cases:
        qq = torch.randn(2, 2, lq, 32, requires_grad=True)
        ran.clear()
        with torch.no_grad() if no_grad else torch.enable_grad():
            out = attention(qq, k, v, key_padding_mask=m if masked else None)
        assert ran == [want], (lq, masked, no_grad, ran)
        torch.testing.assert_close(out, attention_ref(qq, k, v, m if masked else None), **FP32_TOL)
    assert [c[1:] for c in calls[::3]] == [(20, True), (20, False), (20, True), (40, True)]
    picks = attn_mod.auto_picks()
    assert {n: p.backend for n, p in picks.items()} == {
        "cpu fp32 Lq<=32 Lk<=32 D<=32 masked fwd+bwd": "triton",
        "cpu fp32 Lq<=32 Lk<=32 D<=32 masked fwd": "eager",
        "cpu fp32 Lq<=32 Lk<=32 D<=32 unmasked fwd+bwd": "sdpa",
        "cpu fp32 Lq<=64 Lk<=32 D<=32 masked fwd+bwd": "triton",
    }
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention auto")]
    assert len(logged) == 4  # once per class
    assert logged[0] == (
        "attention auto: cpu fp32 Lq<=32 Lk<=32 D<=32 masked fwd+bwd -> triton "
        "(triton 1.000 ms, sdpa 2.000 ms, eager 3.000 ms; at B=2 H=2 Lq=20 "
        "Lk=24 D=32)"
    )


def test_auto_failing_candidate_is_reported_never_cached_as_none(auto_on_cpu, monkeypatch, caplog):
    broken = {"sdpa"}

    def timer(b, probe):
        if b in broken:
            raise RuntimeError(f"{b} kernel refused")
        return {"sdpa": 1.0, "eager": 2.0}[b]

    monkeypatch.setattr(attn_mod.TUNING, "candidates", ("sdpa", "eager"))
    monkeypatch.setattr(attn_mod.TUNING, "time", timer)
    q, k, v, m = _inputs(2, 2, 5, 7, 8)
    caplog.set_level("INFO", logger="r2d2.kernels")
    attention(q, k, v, key_padding_mask=m)
    (p,) = attn_mod.auto_picks().values()
    assert p.backend == "eager" and p.failed == {"sdpa": "RuntimeError: sdpa kernel refused"}
    warn = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warn) == 1 and "'sdpa' failed" in warn[0].getMessage()
    assert "sdpa kernel refused" in warn[0].getMessage()
    broken.add("eager")  # every candidate fails: a clear error, and nothing remembered
    with pytest.raises(RuntimeError, match=r"no candidate ran.*sdpa: RuntimeError.*eager: Runt"):
        attention(q, k, v)
    assert len(attn_mod.auto_picks()) == 1
    broken.clear()  # the next call of that class measures again
    attention(q, k, v)
    assert len(attn_mod.auto_picks()) == 2


def test_auto_env_override_and_bounded_measurement(auto_on_cpu, monkeypatch):
    monkeypatch.setattr(attn_mod.TUNING, "time", lambda b, probe: pytest.fail("measured"))
    q, k, v, m = _inputs(2, 2, 5, 7, 8)
    monkeypatch.setenv("R2D2_ATTENTION_AUTO", "eager")
    attention(q, k, v, key_padding_mask=m)
    (p,) = attn_mod.auto_picks().values()
    assert p.backend == "eager" and p.source == "R2D2_ATTENTION_AUTO"
    monkeypatch.setenv("R2D2_ATTENTION_AUTO", "fast")
    with pytest.raises(ValueError, match="R2D2_ATTENTION_AUTO='fast'"):
        attention(q, k, v)  # a new class reads the variable
    # The timed shape: the caller's Lq/Lk/D/H and mask rows, B cut to a bounded number of scores.
    qm = torch.empty(256, 12, 257, 64, device="meta")
    mm = torch.ones(256, 257, dtype=torch.bool)
    probe = call_probe(qm, qm, mm, 0.0, grad=True)
    assert (probe.H, probe.Lq, probe.Lk, probe.D) == (12, 257, 257, 64)
    assert probe.B >= 1 and probe.B * 12 * 257 * 257 <= MAX_SCORES
    assert probe.mask.shape == (probe.B, 257)


@pytest.mark.gpu
def test_gpu_auto_measures_each_class_and_every_candidate_runs():
    # Passes only if each class was really measured (no fallback), every runnable candidate ran
    # without error (an eval-mode first call included) and the fastest was kept.
    attn_mod.auto_timings_clear()
    try:
        with torch.inference_mode():  # the old defect: a fwd+bwd class first timed in eval
            ref_pick = auto_backend("attention", "cuda")  # reference class: bf16 64 masked
        q, k, v, m = _inputs(8, 2, 64, 64, 64, dtype=torch.bfloat16, device="cuda", mask="lengths")
        with torch.inference_mode():
            attention(q.detach(), k.detach(), v.detach(), key_padding_mask=m)
        out = attention(q, k, v, key_padding_mask=m)  # the reference class again: cached
        out.backward(torch.randn_like(out))
        qi = torch.randn(2, 2, 257, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        attention(qi, qi, qi).sum().backward()
        picks = attn_mod.auto_picks()
        assert len(picks) == 3, list(picks)
        runnable = {
            b for b in attn_mod.TUNING.candidates if why_unavailable("attention", b, "cuda") is None
        }
        assert {"triton", "sdpa"} <= runnable
        for name, p in picks.items():
            assert p.source == "measured" and p.failed == {}, (name, p)
            assert set(p.timings_ms) == runnable, (name, p)
            assert p.backend == min(p.timings_ms, key=p.timings_ms.get)
        assert ref_pick in runnable
    finally:
        attn_mod.auto_timings_clear()


def test_auto_first_seen_inside_activation_checkpointing(auto_on_cpu):
    """The base preset checkpoints every block: the first call of a class comes from inside a
    non-reentrant checkpoint's forward, whose saved-tensor hooks and recomputation frames must not
    catch the probe's own backward (every candidate used to fail). Timed on a fresh thread, the
    pick is made, nothing failed, and values and gradients are the reference's."""
    from torch.utils.checkpoint import checkpoint

    q, k, v, m = _inputs(2, 2, 17, 23, 32)

    def block(q, k, v):
        return attention(q, k, v, key_padding_mask=m) * 2

    out = checkpoint(block, q, k, v, use_reentrant=False)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    picks = attn_mod.auto_picks()
    assert len(picks) == 1
    (pick,) = picks.values()
    assert pick.source == "measured" and not pick.failed and pick.backend in pick.timings_ms
    ref = attention_ref(q, k, v, key_padding_mask=m) * 2
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for g, r in zip(grads, torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(g, r, **FP32_TOL)


def test_scale_refuses_a_bool():
    q, k, v, _ = _inputs(1, 1, 5, 5, 8)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        attention(q, k, v, scale=True)


def _fake_pick(backend, Lq=64, dtype=torch.float32, masked=True, source="measured"):
    key = class_key(torch.device("cpu"), dtype, Lq, Lq, 64, masked, False, True)
    autotune.remember(
        "attention", key, autotune.AutoPick(backend, {backend: 1.0}, {}, {}, "", source)
    )
    return class_str(key)


def test_picks_travel_through_export_and_load(auto_on_cpu, monkeypatch):
    a = _fake_pick("eager", Lq=64)
    b = _fake_pick("sdpa", Lq=256, masked=False)
    _fake_pick("eager", Lq=512, source="R2D2_ATTENTION_AUTO")  # the environment's, not saved
    saved = state_dict()["attention"]
    assert [(p["lq"], p["backend"]) for p in saved] == [(64, "eager"), (256, "sdpa")]
    import json

    saved = json.loads(json.dumps(saved))  # what a checkpoint holds
    saved.append(dict(saved[0], backend="xformers", lq=1024))  # cannot run here (not installed)
    saved.append(dict(saved[0], device="cuda", lq=2048))  # another device type
    saved.append({"backend": "eager"})  # a record this version does not read
    attn_mod.auto_timings_clear()
    c = _fake_pick("sdpa", Lq=64)  # already picked here: kept
    assert c == a
    xformers_ok = why_unavailable("attention", "xformers", "cpu") is None
    assert load_state_dict({"attention": saved}, "cpu") == 1 + xformers_ok
    picks = attn_mod.auto_picks()
    assert picks[a].backend == "sdpa" and picks[a].source == "measured"
    assert picks[b].backend == "sdpa" and picks[b].source == "checkpoint"
    # a restored pick is what auto runs for that class, with no measurement
    monkeypatch.setattr(attn_mod.TUNING, "time", lambda b, probe: pytest.fail("measured"))
    q, k, v, _ = _inputs(2, 2, 200, 200, 64, mask=None)
    assert resolve("attention", "auto", q.device, call=(q, k, v, None, 0.0)) == "sdpa"
    attn_mod.auto_timings_clear()
    monkeypatch.setenv("R2D2_ATTENTION_AUTO", "eager")
    assert load_state_dict({"attention": saved}, "cpu") == 0  # the environment decides


@pytest.fixture
def clean_picks(monkeypatch):
    """No picks before or after; CPU calls stay unmeasured (auto is sdpa there)."""
    monkeypatch.delenv("R2D2_ATTENTION_AUTO", raising=False)
    attn_mod.auto_timings_clear()
    yield
    attn_mod.auto_timings_clear()


def test_resumed_run_takes_the_picks_of_its_checkpoint(clean_picks, tmp_path, capsys):
    import os

    # CPU training measures nothing: the pick is injected as if a GPU run had measured it
    from r2d2.cli.train import pretrain

    root = str(Path(__file__).resolve().parents[2])
    args = [
        "--config",
        os.path.join(root, "r2d2", "configs", "tiny.yaml"),
        "--out",
        str(tmp_path / "run"),
        "--train.checkpoint_every=1",
        "--data.batch_size=4",
        "--data.synthetic_size=16",
        "--logging.progress=false",
        "--logging.tensorboard=false",
        "--logging.plot=false",
        "--train.eval_at_end=false",
    ]
    name = _fake_pick("eager", Lq=1024)  # as if measured during the run
    assert pretrain([*args, "--train.max_steps=1"]) == 0
    ck = torch.load(tmp_path / "run" / "checkpoints" / "step_000001.pt", weights_only=False)
    assert any(
        p["lq"] == 1024 and p["backend"] == "eager" for p in ck["extra"]["kernels"]["attention"]
    )
    attn_mod.auto_timings_clear()  # a new process
    assert pretrain([*args, "--train.max_steps=2", "--resume"]) == 0
    assert attn_mod.auto_picks()[name].source == "checkpoint"
    assert "picks taken from the checkpoint" in capsys.readouterr().out
