"""The analytic step FLOPs (r2d2.engine.flops) against torch's FlopCounterMode on the real objective.

FlopCounterMode counts the matmuls (linear, conv, bmm, the eager attention's products) that a
forward + backward of ``R2D2ForPretraining`` actually dispatches, so a pass the formula forgets
(FgD's re-encoding, the teacher's ITM cross encoders, image_cross_proj, ...) shows as a
mismatch. Attention and the losses run their eager backends: fused kernels are invisible to the
counter. The formula counts what the objective calls, so the match is exact given the number of
MLM tokens (a random draw, read off the MLM head's input).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from r2d2.engine import flops
from r2d2.engine.losses import LossConfig, R2D2ForPretraining
from r2d2.engine.model import R2D2Model, model_preset
from r2d2.engine.model.config import ModelConfig, TextConfig, VisionConfig
from r2d2.kernels import KernelConfig

EAGER = dict(attention="eager", contrastive="eager", distill_kl="eager")
REL = 1e-6  # the count is exact: anything above rounding is a missing or extra pass


def _batch(cfg, b: int, device, g: torch.Generator) -> dict:
    L, size = cfg.max_text_len, cfg.vision.image_size
    lengths = torch.randint(max(2, L // 2), L + 1, (b,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, cfg.text.vocab_size, (b, L), generator=g)  # no special ids
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    return {
        "images": torch.randn(b, 3, size, size, generator=g).to(device),
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "image_ids": (torch.arange(b) // 2).to(device),
    }  # repeated ids: multi-positive


def _count(cfg: ModelConfig, loss: LossConfig, b: int, device="cpu") -> tuple[float, float, dict]:
    """(counted FLOPs of one forward + backward, MLM tokens per sample, the batch)."""
    g = torch.Generator().manual_seed(1234)
    with torch.device(device):
        model = R2D2Model(cfg, KernelConfig(**EAGER))
        obj = R2D2ForPretraining(model, loss)
    seen = []
    if model.mlm_head is not None:
        model.mlm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    batch = _batch(cfg, b, device, g)
    with FlopCounterMode(display=False) as fc:
        obj(batch)["loss"].backward()
    return float(fc.get_total_flops()), sum(seen) / b, batch


def _analytic(cfg, loss, b, mlm_tokens=None):
    shape = flops.shape_from_config(cfg, cfg.max_text_len)
    return flops.objective_flops(shape, loss, global_batch=b, mlm_tokens=mlm_tokens)


def _uneven() -> ModelConfig:
    """Widths and ratios that differ everywhere (a swapped Wv / Wt or MLP ratio shows)."""
    return ModelConfig(
        vision=VisionConfig(
            image_size=24, patch_size=6, width=48, layers=2, heads=4, mlp_ratio=3.0
        ),
        text=TextConfig(
            vocab_size=301,
            width=64,
            layers=3,
            heads=4,
            intermediate=160,
            max_positions=32,
            dropout=0.0,
        ),
        cross_layers=2,
        embed_dim=40,
        max_text_len=13,
    )


FLAGS = {
    "all": {},
    "no_tgd": dict(tgd=False),
    "no_fgd": dict(fgd=False),
    "no_teacher": dict(tgd=False, fgd=False),
    "no_fgr": dict(fgr=False),
    "fgd_global_no_mlm": dict(mlm=False, fgd_features="global"),
    "mlm_fgd_only": dict(gcpr=False, fgr=False, tgd=False),
    "gcpr_only": dict(fgr=False, mlm=False, tgd=False, fgd=False),
}


# each count costs seconds (FlopCounterMode intercepts every op); the rest run with -m slow
# all terms; the encoders' first pass forward-only (no GCPR/FGR); FgD global features without
# MLM. The other combinations (and the uneven model's) run with the slow suite.
FAST = ("all", "mlm_fgd_only", "fgd_global_no_mlm")


def _flag_params(names, fast=FAST):
    return [pytest.param(n, id=n, marks=() if n in fast else pytest.mark.slow) for n in names]


@pytest.mark.parametrize("flags", _flag_params(FLAGS))
def test_tiny_objective_matches_flop_counter(flags):
    cfg, loss, b = model_preset("tiny"), LossConfig(**FLAGS[flags]), 6
    counted, mlm_tokens, batch = _count(cfg, loss, b)
    want = _analytic(cfg, loss, b, mlm_tokens if loss.mlm else None)
    assert want["total"] * b == pytest.approx(counted, rel=REL), want
    if loss.mlm:
        assert mlm_tokens > 0  # the MLM head really ran on drawn tokens
        # without the exact draw, mlm_probability x the real tokens is close (a binomial draw)
        frac = batch["attention_mask"].float().mean().item()
        shape = flops.shape_from_config(cfg, cfg.max_text_len)
        est = flops.objective_flops(shape, loss, global_batch=b, text_valid_frac=frac)["total"]
        assert est * b == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize(
    "flags", _flag_params(["all", "no_teacher", "fgd_global_no_mlm"], ("all",))
)
def test_uneven_widths_match_flop_counter(flags):
    cfg, loss, b = _uneven(), LossConfig(**FLAGS[flags]), 5
    counted, mlm_tokens, _ = _count(cfg, loss, b)
    want = _analytic(cfg, loss, b, mlm_tokens if loss.mlm else None)
    assert want["total"] * b == pytest.approx(counted, rel=REL), want


def test_prd2_without_cross_encoders():
    cfg = model_preset("prd2-tiny")
    loss = LossConfig(fgr=False, mlm=False)  # TgD and FgD stay on: the teacher exists
    counted, _, _ = _count(cfg, loss, 4)
    want = _analytic(cfg, loss, 4)
    assert want["fgr"] == want["mlm"] == 0.0
    assert want["total"] * 4 == pytest.approx(counted, rel=REL)
    with pytest.raises(ValueError, match="cross encoders"):
        _analytic(cfg, LossConfig(), 4)  # fgr/mlm on a model without cross encoders


def test_base_on_meta_matches_flop_counter():
    """The base preset at full size on the meta device (nothing allocated, shapes only). The
    objective's data-dependent steps (MLM's token selection, TgD's row filter) cannot run on
    meta, so this covers GCPR + FGR + FgD with the teacher's encoders; the tiny cases cover MLM
    and TgD."""
    cfg, loss, b = model_preset("base"), LossConfig(mlm=False, tgd=False), 4
    counted, _, _ = _count(cfg, loss, b, device="meta")
    want = _analytic(cfg, loss, b)
    assert want["total"] * b == pytest.approx(counted, rel=REL)
    assert (
        1e11 < want["total"] < 1e13
    )  # ViT-B/16 + BERT-base + cross encoders, ~0.58 TFLOP a sample


def test_terms_follow_flags_and_legacy_entry():
    shape = flops.shape_from_config(model_preset("base"), 64)
    full = flops.objective_flops(shape, None, global_batch=256)
    assert full["total"] == pytest.approx(sum(v for k, v in full.items() if k != "total"))
    assert all(full[k] > 0 for k in ("student_encoders", "gcpr", "fgr", "mlm", "fgd", "teacher"))
    bare = flops.objective_flops(shape, LossConfig(tgd=False, fgd=False), global_batch=256)
    assert bare["teacher"] == bare["fgd"] == 0 and bare["fgr"] < full["fgr"]
    # the contrastive term grows with the global batch (the B x B similarity), nothing else does
    big = flops.objective_flops(shape, None, global_batch=512)
    assert big["gcpr"] - full["gcpr"] == pytest.approx(16 * 256 * shape.embed_dim)
    assert big["fgr"] == full["fgr"]
    # local negatives on several ranks add a detached b x b similarity per direction
    local = LossConfig(fgr_negatives="local")
    assert flops.objective_flops(shape, local, global_batch=256, world=4)["fgr"] - full[
        "fgr"
    ] == pytest.approx(4 * 64 * shape.embed_dim)
    # the legacy entry: the full objective with a teacher, no TgD/FgD without
    assert flops.r2d2_flops_per_sample(shape, global_batch=256) == pytest.approx(full["total"])
    no_t = flops.shape_from_config(model_preset("base"), 64, teacher=False)
    assert flops.r2d2_flops_per_sample(no_t, global_batch=256) == pytest.approx(bare["total"])
    cfg = model_preset("base")
    assert flops.flops_per_sample(cfg, text_len=64, global_batch=256) == pytest.approx(
        full["total"]
    )
