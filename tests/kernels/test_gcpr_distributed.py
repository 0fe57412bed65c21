"""GCPR through the full model on 2 gloo processes: after DDP-style gradient averaging every
rank's parameter gradients equal those of one process on the concatenated global batch (with
image ids repeated across ranks and TgD teacher targets). FGR's global hard negatives reach
the other rank's samples and backpropagate through the gathered token states. Ranks that
disagree on (b, L) get the same clear error; the in-place temperature clamp works under DDP and
FSDP2."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import r2d2.kernels as K
from r2d2.engine.losses import LossConfig, R2D2ForPretraining
from r2d2.engine.model import ModelConfig, R2D2Model, TextConfig, VisionConfig

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]
WORLD, B_LOCAL = 2, 3


def build(fgr: bool, negatives: str = "global"):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2),
        text=TextConfig(
            vocab_size=61,
            width=32,
            layers=1,
            heads=2,
            intermediate=48,
            max_positions=16,
            dropout=0.0,
        ),
        cross_layers=1,
        embed_dim=16,
        max_text_len=16,
    )
    loss = LossConfig(
        gcpr=True,
        fgr=fgr,
        mlm=False,
        tgd=True,
        fgd=False,
        distill_alpha=0.4,
        fgr_negatives=negatives,
    )
    obj = R2D2ForPretraining(R2D2Model(cfg), loss)
    with torch.no_grad():  # a teacher that differs from the student, identically on every rank
        for p in obj.teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return obj


def global_batch():
    g = torch.Generator().manual_seed(1)
    n = WORLD * B_LOCAL
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 5:] = 0
    return dict(
        images=torch.randn(n, 3, 16, 16, generator=g),
        input_ids=torch.randint(5, 61, (n, 7), generator=g),
        attention_mask=mask,
        image_ids=torch.tensor([0, 1, 2, 2, 0, 5]),
    )  # ids shared across the two ranks


def grads(obj):
    return {k: p.grad.clone() for k, p in obj.model.named_parameters() if p.grad is not None}


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        local = {k: v[sl] for k, v in global_batch().items()}
        obj = build(fgr=False)
        out = obj(local)
        out["loss"].backward()
        g = grads(obj)
        for v in g.values():  # what DDP does: average over ranks
            dist.all_reduce(v)
            v /= WORLD
        torch.save(
            {"g": g, "gcpr": out["gcpr_loss"].detach()}, os.path.join(out_dir, f"gcpr{rank}.pt")
        )

        # FGR with global negatives: indices address the gathered batch of both ranks, and the
        # gathered token states carry gradients back to the rank that owns them.
        seen = []
        real = K.contrastive_loss

        def spy(*a, **kw):
            seen.append(real(*a, **kw))
            return seen[-1]

        K.contrastive_loss = spy
        obj = build(fgr=True)
        out = obj(local)
        out["loss"].backward()
        g = grads(obj)
        for v in g.values():
            dist.all_reduce(v)
            v /= WORLD
        torch.save(
            {
                "g": g,
                "neg_t": seen[0].neg_text_for_image,
                "neg_i": seen[0].neg_image_for_text,
                "loss": out["loss"].detach(),
            },
            os.path.join(out_dir, f"fgr{rank}.pt"),
        )

        # Local negatives: no token-state gather, still a finite loss and gradients.
        obj = build(fgr=True, negatives="local")
        out = obj(local)
        out["loss"].backward()
        ok = (
            all(torch.isfinite(v).all() for v in grads(obj).values()) and out["fgr_loss"].item() > 0
        )
        torch.save(ok, os.path.join(out_dir, f"local{rank}.pt"))

        # Ranks that disagree on (b, L): the same clear error on every rank (no hang), after
        # which the group still works. Local negatives need only the same b.
        res = {}
        short_L = {
            k: (v[:, :6] if k in ("input_ids", "attention_mask") and rank == 1 else v)
            for k, v in local.items()
        }
        short_b = {k: (v[:2] if rank == 1 else v) for k, v in local.items()}
        for name, obj, b in (
            ("L", build(fgr=True), short_L),
            ("b", build(fgr=True), short_b),
            ("b_local", build(fgr=True, negatives="local"), short_b),
        ):
            try:
                obj(b)
                res[name] = None
            except ValueError as e:
                res[name] = str(e)
        out = build(fgr=True, negatives="local")(short_L)
        res["L_local_ok"] = bool(torch.isfinite(out["loss"]))
        torch.save(res, os.path.join(out_dir, f"shapes{rank}.pt"))

        # The in-place temperature clamp under DDP and FSDP2 (a replicated 0-d parameter there):
        # an overshoot comes back into range on every rank and keeps a gradient.
        from r2d2.engine.trainer import shard_fsdp

        temps = {}
        for strategy in ("ddp", "fsdp"):
            obj = build(fgr=False)
            with torch.no_grad():
                obj.model.temp.fill_(0.0009)
            if strategy == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(
                    obj, find_unused_parameters=True
                )
            else:
                replicated = shard_fsdp(obj, torch.device("cpu"))
                assert any(p is obj.model.temp for p in replicated)
                wrapped = obj
            wrapped(local)["loss"].backward()
            temps[strategy] = (
                obj.model.temp.detach().clone(),
                obj.model.temp.grad.clone(),
                type(obj.model.temp).__name__,
            )
        torch.save(temps, os.path.join(out_dir, f"temp{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both ranks' results, spawned once for the module."""
    out = tmp_path_factory.mktemp("gcpr_dist")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out


def test_gcpr_gradients_equal_single_process(runs):
    tmp_path = runs
    ref_obj = build(fgr=False)
    ref = ref_obj(global_batch())
    ref["loss"].backward()
    g_ref = grads(ref_obj)
    ranks = [torch.load(tmp_path / f"gcpr{r}.pt") for r in range(WORLD)]
    torch.testing.assert_close(
        torch.stack([r["gcpr"] for r in ranks]).mean(), ref["gcpr_loss"].detach()
    )
    assert len(g_ref) > 10
    for r in ranks:
        assert set(r["g"]) == set(g_ref)
        for k, v in g_ref.items():
            torch.testing.assert_close(r["g"][k], v, atol=1e-6, rtol=1e-4, msg=k)
    assert any(v.abs().sum() > 0 for v in g_ref.values())


def test_fgr_global_negatives_gradients_equal_single_process(runs, monkeypatch):
    """Same property for GCPR + FGR + TgD, the single process replaying the ranks' negatives."""
    tmp_path = runs
    ranks = [torch.load(tmp_path / f"fgr{r}.pt") for r in range(WORLD)]
    neg_t = torch.cat([r["neg_t"] for r in ranks])
    neg_i = torch.cat([r["neg_i"] for r in ranks])
    ids = global_batch()["image_ids"]
    assert (neg_t >= 0).all() and (ids[neg_t] != ids).all() and (ids[neg_i] != ids).all()
    rows = torch.arange(WORLD * B_LOCAL) // B_LOCAL
    assert (neg_t // B_LOCAL != rows).any() or (neg_i // B_LOCAL != rows).any(), (
        "no cross-rank negative"
    )
    real = K.contrastive_loss

    def replay(*a, **kw):
        res = real(*a, **kw)
        return res._replace(neg_text_for_image=neg_t, neg_image_for_text=neg_i)

    monkeypatch.setattr(K, "contrastive_loss", replay)
    ref_obj = build(fgr=True)
    ref = ref_obj(global_batch())
    ref["loss"].backward()
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), ref["loss"].detach())
    g_ref = grads(ref_obj)
    for r in ranks:
        assert set(r["g"]) == set(g_ref)
        for k, v in g_ref.items():
            torch.testing.assert_close(r["g"][k], v, atol=1e-6, rtol=1e-4, msg=k)


def test_fgr_local_negatives_run(runs):
    assert all(torch.load(runs / f"local{r}.pt") for r in range(WORLD))


def test_ranks_must_agree_on_batch_and_text_length(runs):
    for r in range(WORLD):
        res = torch.load(runs / f"shapes{r}.pt")
        assert "b and the text length L" in res["L"] and "[(3, 7), (3, 6)]" in res["L"]
        assert "same b" in res["b"] and "[(3, 7), (2, 7)]" in res["b"]
        assert "same b" in res["b_local"] and "text length" not in res["b_local"]
        assert res["L_local_ok"]


def test_temperature_clamp_under_ddp_and_fsdp2(runs):
    ranks = [torch.load(runs / f"temp{r}.pt") for r in range(WORLD)]
    for strategy in ("ddp", "fsdp"):
        for t, g, kind in (r[strategy] for r in ranks):
            assert t.item() == pytest.approx(0.001) and g.abs().item() > 0
            assert kind == "Parameter"  # FSDP2 leaves the 0-d temperature unsharded
    # DDP averages the gradient: both ranks hold the same value
    torch.testing.assert_close(ranks[0]["ddp"][1], ranks[1]["ddp"][1])
