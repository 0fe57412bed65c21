"""Pre-training objectives against hand-computed tiny cases; TgD, FgD, EMA, negatives, config."""

import math

import pytest
import torch
import torch.nn.functional as F

import r2d2.kernels as K
from r2d2.engine.losses import (LossConfig, R2D2ForPretraining, cosine_distill, mask_tokens,
                                sample_local_negatives, weighted_itm_ce)
from r2d2.engine.model import ModelConfig, R2D2Model, TextConfig, VisionConfig

OFF = dict(gcpr=True, fgr=False, mlm=False, tgd=False, fgd=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed=0, cross_layers=1) -> R2D2Model:
    torch.manual_seed(seed)
    cfg = ModelConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2),
                      text=TextConfig(vocab_size=61, width=32, layers=1, heads=2, intermediate=48,
                                      max_positions=16, dropout=0.0),
                      cross_layers=cross_layers, embed_dim=16, max_text_len=16)
    return R2D2Model(cfg)


def make_batch(b=5, L=6, ids=(0, 1, 1, 2, 3)):
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1, 3:] = 0
    mask[-1, 4:] = 0
    return dict(images=torch.randn(b, 3, 16, 16), input_ids=torch.randint(5, 61, (b, L)),
                attention_mask=mask, image_ids=torch.tensor(ids[:b]))


def perturb(module, scale=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0))


def hand_gcpr(I, T, s, ids, tI=None, tT=None, alpha=0.0):
    """Row-by-row soft-target cross entropy, both directions."""
    b = len(ids)
    total = 0.0
    for a, bb, ta, tb in ((I, T, tI, tT), (T, I, tT, tI)):
        for r in range(b):
            logits = [s * float(a[r] @ bb[c]) for c in range(b)]
            lse = math.log(sum(math.exp(x) for x in logits))
            npos = sum(int(ids[c] == ids[r]) for c in range(b))
            tgt = [float(ids[c] == ids[r]) / npos for c in range(b)]
            if alpha:
                tl = [s * float(ta[r] @ tb[c]) for c in range(b)]
                z = sum(math.exp(x) for x in tl)
                tgt = [(1 - alpha) * h + alpha * math.exp(x) / z for h, x in zip(tgt, tl)]
            total += -sum(t * (x - lse) for t, x in zip(tgt, logits)) / b
    return total / 2


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("bad, match", [
    (dict(distill_alpha=1.5), "distill_alpha"),
    (dict(ema_momentum=1.0), "ema_momentum"),
    (dict(fgr_weight=-1), "fgr_weight"),
    (dict(fgr_class_weights=[1.0]), "fgr_class_weights"),
    (dict(fgr_negatives="ring"), "fgr_negatives"),
    (dict(mlm_mask_frac=0.95, mlm_random_frac=0.1), "mlm_mask_frac"),
    (dict(fgd_features="pixels"), "fgd_features"),
    (dict(gcpr=False, fgr=True), "needs loss.gcpr"),
    (dict(gcpr=False, fgr=False, mlm=False, fgd=False), "every objective is off"),
    (dict(tgd=1), "loss.tgd"),
])
def test_loss_config_errors_name_the_field(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LossConfig(**bad)


def test_defaults_are_the_papers():
    c = LossConfig()
    assert (c.distill_alpha, c.ema_momentum, c.mlm_probability, c.fgr_class_weights) == (0.4, 0.995, 0.15, [1.0, 2.0])
    assert (c.mlm_mask_frac, c.mlm_random_frac) == (0.8, 0.1)


def test_ablation_flags_select_terms_and_teacher():
    m = small_model()
    batch = make_batch()
    rows = [(dict(OFF), {"gcpr_loss"}, False),
            ({**OFF, "fgr": True}, {"gcpr_loss", "fgr_loss"}, False),
            ({**OFF, "fgr": True, "tgd": True}, {"gcpr_loss", "fgr_loss", "tgd_fgr_loss"}, True),
            ({**OFF, "fgr": True, "tgd": True, "fgd": True}, {"gcpr_loss", "fgr_loss", "tgd_fgr_loss", "fgd_loss"}, True),
            ({**OFF, "mlm": True}, {"gcpr_loss", "mlm_loss"}, False)]
    for flags, keys, teacher in rows:
        obj = R2D2ForPretraining(m, LossConfig(**flags))
        out = obj(batch)
        assert set(out) == keys | {"loss"}, flags
        assert (obj.teacher is not None) == teacher
        assert all(torch.isfinite(v) for v in out.values())


def test_total_is_the_weighted_sum():
    w = dict(gcpr_weight=2.0, fgr_weight=0.5, mlm_weight=3.0, tgd_weight=1.5, fgd_weight=0.25)
    obj = R2D2ForPretraining(small_model(), LossConfig(**w))
    out = obj(make_batch())
    expect = sum(w[f"{k.split('_')[0]}_weight"] * out[k] for k in out if k != "loss")
    torch.testing.assert_close(out["loss"], expect)


def test_prd2_needs_fgr_and_mlm_off():
    m = small_model(cross_layers=0)
    with pytest.raises(ValueError, match="cross_layers=0"):
        R2D2ForPretraining(m, LossConfig())
    obj = R2D2ForPretraining(m, LossConfig(fgr=False, mlm=False, fgd=False))
    assert set(obj(make_batch())) == {"gcpr_loss", "loss"}


def test_bad_batch_names_the_key():
    obj = R2D2ForPretraining(small_model(), LossConfig(**OFF))
    b = make_batch()
    with pytest.raises(KeyError, match="images"):
        obj({k: v for k, v in b.items() if k != "images"})
    with pytest.raises(ValueError, match="image_ids"):
        obj({**b, "image_ids": torch.zeros(4, dtype=torch.long)})


# ---------------------------------------------------------------------- GCPR and its TgD
@pytest.mark.parametrize("ids", [(0, 1, 2, 3, 4), (0, 1, 1, 2, 1), (7, 7, 7, 7, 7)])
def test_gcpr_matches_hand_computation_with_repeated_ids(ids):
    m = small_model()
    obj = R2D2ForPretraining(m, LossConfig(**OFF))
    batch = make_batch(ids=ids)
    out = obj(batch)
    I = m.encode_image(batch["images"]).detach()
    T = m.encode_text(batch["input_ids"], batch["attention_mask"]).detach()
    expect = hand_gcpr(I.double(), T.double(), m.logit_scale().item(), ids)
    assert out["gcpr_loss"].item() == pytest.approx(expect, rel=1e-5)


def test_gcpr_tgd_targets_mix_teacher_softmax():
    m = small_model()
    obj = R2D2ForPretraining(m, LossConfig(**{**OFF, "tgd": True}, distill_alpha=0.4))
    perturb(obj.teacher)           # a teacher that differs from the student
    batch = make_batch()
    out = obj(batch)
    x = (batch["images"], batch["input_ids"], batch["attention_mask"])
    I, T = m.encode_image(x[0]).detach().double(), m.encode_text(*x[1:]).detach().double()
    tI, tT = obj.teacher.encode_image(x[0]).double(), obj.teacher.encode_text(*x[1:]).double()
    ids = batch["image_ids"].tolist()
    expect = hand_gcpr(I, T, m.logit_scale().item(), ids, tI, tT, 0.4)
    assert out["gcpr_loss"].item() == pytest.approx(expect, rel=1e-5)
    assert abs(expect - hand_gcpr(I, T, m.logit_scale().item(), ids)) > 1e-3   # the teacher matters


def test_tgd_with_alpha_zero_equals_the_plain_losses():
    m = small_model()
    batch = make_batch()
    plain = R2D2ForPretraining(m, LossConfig(**{**OFF, "fgr": True}))(batch)
    obj = R2D2ForPretraining(m, LossConfig(**{**OFF, "fgr": True, "tgd": True}, distill_alpha=0.0))
    perturb(obj.teacher)
    tgd = obj(batch)
    torch.testing.assert_close(tgd["gcpr_loss"], plain["gcpr_loss"])
    torch.testing.assert_close(tgd["fgr_loss"], plain["fgr_loss"])
    assert tgd["tgd_fgr_loss"].item() == 0.0


# ---------------------------------------------------------------------- FGR
def _capture_negatives(monkeypatch):
    seen = []
    real = K.contrastive_loss

    def spy(*a, **kw):
        res = real(*a, **kw)
        seen.append(res)
        return res

    monkeypatch.setattr(K, "contrastive_loss", spy)
    return seen


def hand_fgr(m, batch, neg_t, neg_i, w=(1.0, 2.0)):
    """Per-pair ITM logits (one pair per call), weighted CE per head, heads averaged; also the
    per-pair logits for the distillation check."""
    V = m.image_tokens(batch["images"])
    T = m.text_tokens(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"]
    b = len(V)
    pairs = [(i, i, 1) for i in range(b)]
    pairs += [(i, int(neg_t[i]), 0) for i in range(b) if neg_t[i] >= 0]
    pairs += [(int(neg_i[j]), j, 0) for j in range(b) if neg_i[j] >= 0]
    losses, logits = [], []
    for head in (0, 1):
        num = den = 0.0
        for vi, ti, y in pairs:
            lg = m.itm_logits(V[vi:vi + 1], T[ti:ti + 1], mask[ti:ti + 1])[head][0].double()
            logits.append(lg)
            num += w[y] * -(lg.log_softmax(-1)[y]).item()
            den += w[y]
        losses.append(num / den)
    return sum(losses) / 2, pairs


@pytest.mark.parametrize("ids", [(0, 1, 2, 3, 4), (0, 1, 1, 2, 3), (5, 5, 5, 5, 5)])
def test_fgr_matches_hand_computation(monkeypatch, ids):
    m = small_model().eval()
    seen = _capture_negatives(monkeypatch)
    obj = R2D2ForPretraining(m, LossConfig(**{**OFF, "fgr": True})).eval()
    batch = make_batch(ids=ids)
    out = obj(batch)
    res = seen[-1]
    expect, pairs = hand_fgr(m, batch, res.neg_text_for_image, res.neg_image_for_text)
    assert out["fgr_loss"].item() == pytest.approx(expect, rel=1e-4)
    if len(set(ids)) == 1:
        assert len(pairs) == 5   # no negative exists: only the positives count


def test_fgr_tgd_is_alpha_kl_to_teacher_itm(monkeypatch):
    m = small_model().eval()
    seen = _capture_negatives(monkeypatch)
    obj = R2D2ForPretraining(m, LossConfig(**{**OFF, "fgr": True, "tgd": True}, distill_alpha=0.4)).eval()
    perturb(obj.teacher)
    batch = make_batch()
    out = obj(batch)
    nt, ni = seen[-1].neg_text_for_image, seen[-1].neg_image_for_text
    hard, pairs = hand_fgr(m, batch, nt, ni)
    assert out["fgr_loss"].item() == pytest.approx(0.6 * hard, rel=1e-4)
    x = (batch["images"], batch["input_ids"], batch["attention_mask"])
    kl = 0.0
    for head in (0, 1):
        tot = 0.0
        for vi, ti, _ in pairs:
            args = [(x[0][vi:vi + 1],), (x[1][ti:ti + 1], x[2][ti:ti + 1])]
            s = m.itm_logits(m.image_tokens(*args[0]), m.text_tokens(*args[1]), args[1][1])[head][0]
            t = obj.teacher.itm_logits(obj.teacher.image_tokens(*args[0]), obj.teacher.text_tokens(*args[1]),
                                       args[1][1])[head][0]
            pt = t.double().softmax(-1)
            tot += (pt * (pt.log() - s.double().log_softmax(-1))).sum().item()
        kl += tot / len(pairs) / 2
    assert out["tgd_fgr_loss"].item() == pytest.approx(0.4 * kl, rel=1e-4, abs=1e-7)


def test_fgr_never_samples_a_positive(monkeypatch):
    m = small_model()
    seen = _capture_negatives(monkeypatch)
    obj = R2D2ForPretraining(m, LossConfig(**{**OFF, "fgr": True}))
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    for step in range(6):
        obj(make_batch(b=8, ids=tuple(ids.tolist())))
    assert len(seen) == 6
    for res in seen:
        for neg in (res.neg_text_for_image, res.neg_image_for_text):
            assert (neg >= 0).all() and (ids[neg] != ids).all()
    # the step counter reseeds the sampler: not every step draws the same negatives
    assert len({tuple(r.neg_text_for_image.tolist()) for r in seen}) > 1


def test_local_negative_sampler():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    sim = torch.randn(6, 6)
    for _ in range(20):
        neg = sample_local_negatives(sim, ids, g)
        assert (ids[neg] != ids).all()
    assert (sample_local_negatives(sim[:2, :2], ids[:2], g) == -1).all()
    # a dominant logit is drawn almost always: it is softmax sampling, not uniform
    sim = torch.zeros(3, 3)
    sim[0, 2] = 20.0
    draws = [sample_local_negatives(sim, torch.arange(3), g)[0].item() for _ in range(20)]
    assert draws.count(2) == 20


def test_weighted_itm_ce_hand_case():
    logits = torch.tensor([[0.2, 1.0], [1.5, -0.5], [0.0, 0.3]])
    labels = torch.tensor([1, 0, 0])
    w = torch.tensor([1.0, 2.0])
    ce = [-(torch.log_softmax(logits[i], 0)[labels[i]]).item() for i in range(3)]
    expect = (2 * ce[0] + ce[1] + ce[2]) / 4
    assert weighted_itm_ce(logits, labels, w).item() == pytest.approx(expect, rel=1e-6)
    torch.testing.assert_close(weighted_itm_ce(logits, labels, w), F.cross_entropy(logits, labels, weight=w))
    valid = torch.tensor([True, True, False])
    assert weighted_itm_ce(logits, labels, w, valid).item() == pytest.approx((2 * ce[0] + ce[1]) / 3, rel=1e-6)


# ---------------------------------------------------------------------- MLM
def test_mask_tokens_follows_bert_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 100))
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[:, 80:] = 0
    out, labels = mask_tokens(ids, mask, 0.15, (0, 1, 2, 3, 4), 4, 1000, generator=g)
    chosen = labels != -100
    assert not chosen[:, 80:].any() and not chosen[:, 0].any()      # never padding or specials
    frac = chosen.sum().item() / (64 * 78)
    assert 0.13 < frac < 0.17
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(out[~chosen], ids[~chosen])
    n = chosen.sum().item()
    as_mask = (out[chosen] == 4).sum().item() / n
    unchanged = (out[chosen] == ids[chosen]).sum().item() / n
    assert 0.76 < as_mask < 0.84 and 0.07 < unchanged < 0.14


def test_mlm_matches_hand_computation():
    m = small_model().eval()
    obj = R2D2ForPretraining(m, LossConfig(**{**OFF, "mlm": True}, mlm_probability=0.5)).eval()
    batch = make_batch()
    cfg = obj.config
    masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], 0.5, cfg.special_token_ids,
                                 cfg.mask_token_id, 61, 0.8, 0.1, obj._generator(2))  # step 0
    out = obj(batch)
    assert (labels != -100).sum() > 3
    mask = batch["attention_mask"]
    X = m.text_image_states(m.text_tokens(masked, mask), mask, m.image_tokens(batch["images"]))
    terms = []
    for r, c in (labels != -100).nonzero().tolist():
        lp = m.mlm_head(X[r, c]).double().log_softmax(-1)
        terms.append(-lp[labels[r, c]].item())
    assert out["mlm_loss"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


# ---------------------------------------------------------------------- FgD
def test_cosine_distill_hand_case():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, -1.0]]])
    valid = torch.tensor([[True, False]])
    assert cosine_distill(s, t).item() == pytest.approx(((1 - 2 ** -0.5) + 2) / 2)
    assert cosine_distill(s, t, valid).item() == pytest.approx(1 - 2 ** -0.5)


def test_fgd_is_zero_without_masking_and_trains_only_the_student():
    m = small_model()
    obj = R2D2ForPretraining(m, LossConfig(**{**OFF, "fgd": True}, fgd_image_mask_ratio=0.0,
                                           fgd_text_mask_ratio=0.0))
    assert obj(make_batch())["fgd_loss"].item() == pytest.approx(0.0, abs=1e-5)
    obj = R2D2ForPretraining(m, LossConfig(**{**OFF, "fgd": True}, fgd_image_mask_ratio=0.5,
                                           fgd_text_mask_ratio=0.5))
    out = obj(make_batch())
    assert out["fgd_loss"].item() > 1e-3
    out["fgd_loss"].backward()
    assert m.visual.blocks[0].fc1.weight.grad.abs().sum() > 0
    assert m.text.layers[0].fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())


def test_fgd_global_features():
    obj = R2D2ForPretraining(small_model(), LossConfig(**{**OFF, "fgd": True}, fgd_features="global",
                                                       fgd_image_mask_ratio=0.5))
    v = obj(make_batch())["fgd_loss"]
    assert 0 < v.item() < 2


# ---------------------------------------------------------------------- EMA teacher
def test_ema_update_is_exact_and_teacher_gets_no_grad():
    m = small_model()
    obj = R2D2ForPretraining(m, LossConfig(ema_momentum=0.9))
    for a, b in zip(obj.teacher.parameters(), m.parameters()):
        assert torch.equal(a, b) and a is not b and not a.requires_grad
    out = obj(make_batch())
    out["loss"].backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    before = [p.detach().clone() for p in obj.teacher.parameters()]
    perturb(m, 1.0)
    obj.ema_update()
    for t0, t, s in zip(before, obj.teacher.parameters(), m.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    assert obj.teacher.mlm_head.decoder.weight is obj.teacher.text.word_embed.weight
    obj.train()
    assert obj.model.training and not obj.teacher.training


def test_step_counter_survives_a_state_dict_round_trip():
    # The sampling streams are seeded by the step; a resumed objective must continue the count
    # (its host copy is refreshed by the load, not re-read from the buffer every step).
    batch = make_batch()
    a = R2D2ForPretraining(small_model(), LossConfig(mlm=False)).train()
    for _ in range(3):
        a(batch)
    assert int(a.step) == a._step == 3
    b = R2D2ForPretraining(small_model(seed=1), LossConfig(mlm=False)).train()
    b.load_state_dict(a.state_dict())
    assert b._step == 3
    torch.manual_seed(5)
    la = a(batch)
    torch.manual_seed(5)
    lb = b(batch)
    for k in la:
        torch.testing.assert_close(lb[k], la[k], msg=k)
    a.eval()(batch)
    assert a._step == int(a.step) == 4  # eval forwards do not count
