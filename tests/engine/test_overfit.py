"""A tiny R2D2 overfits 8 pairs on a CPU: the loss falls and in-batch retrieval reaches 100 %."""

import pytest
import torch

from r2d2.engine.losses import LossConfig, R2D2ForPretraining
from r2d2.engine.model import R2D2Model, model_preset

B = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def pairs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 21185, (B, 12), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(B, 12, dtype=torch.long)
    mask[3, 7:] = 0  # a padded caption
    mask[5, 4:] = 0
    return dict(
        images=torch.randn(B, 3, 32, 32, generator=g),
        input_ids=ids,
        attention_mask=mask,
        image_ids=torch.arange(B),
    )


def train(loss_cfg, steps, lr):
    torch.manual_seed(0)
    model = R2D2Model(model_preset("tiny"))
    obj = R2D2ForPretraining(model, loss_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batch, history = pairs(), []
    for _ in range(steps):
        out = obj(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        obj.ema_update()
        history.append({k: v.item() for k, v in out.items()})
    return model.eval(), batch, history


@torch.no_grad()
def in_batch_recall(model, batch):
    sim = (
        model.encode_image(batch["images"])
        @ model.encode_text(batch["input_ids"], batch["attention_mask"]).t()
    )
    target = torch.arange(B)
    return (sim.argmax(1) == target).float().mean().item(), (
        sim.argmax(0) == target
    ).float().mean().item()


def test_overfit_gcpr_fast():
    cfg = LossConfig(fgr=False, mlm=False, tgd=False, fgd=False)
    model, batch, hist = train(cfg, steps=60, lr=1e-3)
    assert hist[-1]["loss"] < 0.1 * hist[0]["loss"]
    assert in_batch_recall(model, batch) == (1.0, 1.0)


def test_overfit_full_objective():
    """GCPR + FGR + MLM + TgD + FgD together (about 25 s on one core)."""
    model, batch, hist = train(LossConfig(), steps=100, lr=2e-3)
    first, last = hist[0], hist[-1]
    assert last["loss"] < 0.6 * first["loss"]
    assert last["mlm_loss"] < 0.5 * first["mlm_loss"]
    assert last["gcpr_loss"] < first["gcpr_loss"] - 0.3
    assert in_batch_recall(model, batch) == (1.0, 1.0)


@pytest.mark.slow
def test_overfit_itm_learns_the_pairs():
    """The cross encoders learn to tell the 8 true pairs from the 56 wrong ones (~30 s)."""
    cfg = LossConfig(mlm=False, tgd=False, fgd=False)
    model, batch, hist = train(cfg, steps=200, lr=1e-3)
    assert min(h["fgr_loss"] for h in hist[-50:]) < 0.6 * hist[0]["fgr_loss"]
    with torch.no_grad():
        i = torch.arange(B).repeat_interleave(B)
        t = torch.arange(B).repeat(B)
        p = model.itm_score(
            batch["images"][i], batch["input_ids"][t], batch["attention_mask"][t]
        ).view(B, B)
    diag = p.diagonal()
    off = p[~torch.eye(B, dtype=torch.bool)]
    assert diag.mean() > off.mean() + 0.3
    assert in_batch_recall(model, batch) == (1.0, 1.0)
