"""Pre-training objectives against hand-computed tiny cases; TgD, FgD, EMA, negatives, config."""

import math

import pytest
import torch
import torch.nn.functional as F

import r2d2.kernels as K
from r2d2.engine.losses import (
    LossConfig,
    R2D2ForPretraining,
    cosine_distill,
    mask_tokens,
    sample_local_negatives,
    weighted_itm_ce,
    weighted_itm_kl,
)
from r2d2.engine.model import ModelConfig, R2D2Model, TextConfig, VisionConfig

OFF = dict(gcpr=True, fgr=False, mlm=False, tgd=False, fgd=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed=0, cross_layers=1) -> R2D2Model:
    torch.manual_seed(seed)
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
        cross_layers=cross_layers,
        embed_dim=16,
        max_text_len=16,
    )
    return R2D2Model(cfg)


def make_batch(b=5, L=6, ids=(0, 1, 1, 2, 3)):
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1, 3:] = 0
    mask[-1, 4:] = 0
    return dict(
        images=torch.randn(b, 3, 16, 16),
        input_ids=torch.randint(5, 61, (b, L)),
        attention_mask=mask,
        image_ids=torch.tensor(ids[:b]),
    )


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
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(distill_alpha=1.5), "distill_alpha"),
        (dict(ema_momentum=1.0), "ema_momentum"),
        (dict(fgr_weight=-1), "fgr_weight"),
        (dict(fgr_class_weights=[1.0]), "fgr_class_weights"),
        (dict(fgr_negatives="ring"), "fgr_negatives"),
        (dict(gcpr_mode="allgather"), "gcpr_mode"),
        (dict(mlm_mask_frac=0.95, mlm_random_frac=0.1), "mlm_mask_frac"),
        (dict(fgd_features="pixels"), "fgd_features"),
        (dict(gcpr=False, fgr=True), "needs loss.gcpr"),
        (dict(gcpr=False, fgr=False, mlm=False, fgd=False), "every objective is off"),
        (dict(tgd=1), "loss.tgd"),
    ],
)
def test_loss_config_errors_name_the_field(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LossConfig(**bad)


def test_defaults_are_the_papers():
    c = LossConfig()
    assert (c.distill_alpha, c.ema_momentum, c.mlm_probability, c.fgr_class_weights) == (
        0.4,
        0.995,
        0.15,
        [1.0, 2.0],
    )
    assert (c.mlm_mask_frac, c.mlm_random_frac) == (0.8, 0.1)


def test_ablation_flags_select_terms_and_teacher():
    m = small_model()
    batch = make_batch()
    rows = [
        (dict(OFF), {"gcpr_loss"}, False),
        ({**OFF, "fgr": True}, {"gcpr_loss", "fgr_loss"}, False),
        ({**OFF, "fgr": True, "tgd": True}, {"gcpr_loss", "fgr_loss", "tgd_fgr_loss"}, True),
        (
            {**OFF, "fgr": True, "tgd": True, "fgd": True},
            {"gcpr_loss", "fgr_loss", "tgd_fgr_loss", "fgd_loss"},
            True,
        ),
        ({**OFF, "mlm": True}, {"gcpr_loss", "mlm_loss"}, False),
    ]
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
    perturb(obj.teacher)  # a teacher that differs from the student
    batch = make_batch()
    out = obj(batch)
    x = (batch["images"], batch["input_ids"], batch["attention_mask"])
    I, T = m.encode_image(x[0]).detach().double(), m.encode_text(*x[1:]).detach().double()
    tI, tT = obj.teacher.encode_image(x[0]).double(), obj.teacher.encode_text(*x[1:]).double()
    ids = batch["image_ids"].tolist()
    expect = hand_gcpr(I, T, m.logit_scale().item(), ids, tI, tT, 0.4)
    assert out["gcpr_loss"].item() == pytest.approx(expect, rel=1e-5)
    assert abs(expect - hand_gcpr(I, T, m.logit_scale().item(), ids)) > 1e-3  # the teacher matters


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
            lg = m.itm_logits(V[vi : vi + 1], T[ti : ti + 1], mask[ti : ti + 1])[head][0].double()
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
        assert len(pairs) == 5  # no negative exists: only the positives count


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_fgr_tgd_is_the_class_weighted_soft_target_ce(monkeypatch, alpha):
    """fgr_loss + tgd_fgr_loss = sum_r w_r CE((1 - a) onehot(y_r) + a p_teacher_r, student_r) /
    sum_r w_r - a * (the same weighted mean of the teacher's entropy), per head, heads averaged,
    w = [1, 2][y]: its value and its gradient, pair by pair, at a = 0 (the hard loss) and 0.4."""
    m = small_model().eval()
    seen = _capture_negatives(monkeypatch)
    obj = R2D2ForPretraining(
        m, LossConfig(**{**OFF, "fgr": True, "tgd": True}, distill_alpha=alpha)
    ).eval()
    perturb(obj.teacher, 1.0)
    with torch.no_grad():  # a teacher whose ITM probabilities differ clearly
        obj.teacher.itm_head.bias.add_(torch.tensor([0.8, -0.8]))
        obj.teacher.itm_head_i.bias.add_(torch.tensor([-0.6, 0.6]))
    batch = make_batch()
    out = obj(batch)
    nt, ni = seen[-1].neg_text_for_image, seen[-1].neg_image_for_text
    got = out["fgr_loss"] + out["tgd_fgr_loss"]
    m.zero_grad()
    got.backward()
    g_obj = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    imgs, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    V, T = m.image_tokens(imgs), m.text_tokens(ids, mask)
    with torch.no_grad():
        tV, tT = obj.teacher.image_tokens(imgs), obj.teacher.text_tokens(ids, mask)
    pairs = (
        [(i, i, 1) for i in range(5)]
        + [(i, int(nt[i]), 0) for i in range(5)]
        + [(int(ni[j]), j, 0) for j in range(5)]
    )
    soft_ce, entropy, kl_terms = 0.0, 0.0, 0.0
    for head in (0, 1):
        num, ent, kl, den = 0.0, 0.0, 0.0, 0.0
        for vi, ti, y in pairs:
            st = m.itm_logits(V[vi : vi + 1], T[ti : ti + 1], mask[ti : ti + 1])[head][0].double()
            with torch.no_grad():
                te = obj.teacher.itm_logits(tV[vi : vi + 1], tT[ti : ti + 1], mask[ti : ti + 1])[
                    head
                ][0].double()
            pt = te.softmax(-1)
            q = (1 - alpha) * F.one_hot(torch.tensor(y), 2).double() + alpha * pt
            w = (1.0, 2.0)[y]
            num = num + w * -(q * st.log_softmax(-1)).sum()
            ent += w * -(pt * pt.log()).sum().item()
            kl += w * (pt * (pt.log() - st.log_softmax(-1))).sum().item()
            den += w
        soft_ce = soft_ce + num / den / 2
        entropy += ent / den / 2
        kl_terms += kl / den / 2
    assert got.item() == pytest.approx(soft_ce.item() - alpha * entropy, rel=1e-5)
    assert out["tgd_fgr_loss"].item() == pytest.approx(alpha * kl_terms, rel=1e-5, abs=1e-8)
    if alpha:
        assert out["tgd_fgr_loss"].item() > 1e-2  # the teacher is far enough to matter
    else:
        assert out["tgd_fgr_loss"].item() == 0.0
    m.zero_grad()
    soft_ce.backward()
    g_hand = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    assert set(g_hand) == set(g_obj) and len(g_hand) > 10
    for k, v in g_hand.items():
        torch.testing.assert_close(g_obj[k], v.to(g_obj[k].dtype), atol=1e-6, rtol=1e-4, msg=k)


def test_weighted_itm_kl_hand_case():
    s = torch.tensor([[0.2, 1.0], [1.5, -0.5], [0.0, 0.3]])
    t = torch.tensor([[1.0, -1.0], [0.5, 0.5], [-2.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    w = torch.tensor([1.0, 2.0])
    kl = [
        (t[i].softmax(0) * (t[i].log_softmax(0) - s[i].log_softmax(0))).sum().item()
        for i in range(3)
    ]
    assert weighted_itm_kl(s, t, labels, w, backend="eager").item() == pytest.approx(
        (2 * kl[0] + kl[1] + kl[2]) / 4, rel=1e-6
    )
    valid = torch.tensor([True, False, True])
    assert weighted_itm_kl(s, t, labels, w, valid, backend="eager").item() == pytest.approx(
        (2 * kl[0] + kl[2]) / 3, rel=1e-6
    )


def test_fgr_never_samples_a_positive(monkeypatch):
    m = small_model()
    seen = _capture_negatives(monkeypatch)
    obj = R2D2ForPretraining(m, LossConfig(**{**OFF, "fgr": True}))
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    for _step in range(6):
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
    torch.testing.assert_close(
        weighted_itm_ce(logits, labels, w), F.cross_entropy(logits, labels, weight=w)
    )
    valid = torch.tensor([True, True, False])
    assert weighted_itm_ce(logits, labels, w, valid).item() == pytest.approx(
        (2 * ce[0] + ce[1]) / 3, rel=1e-6
    )


# ---------------------------------------------------------------------- MLM
def test_mask_tokens_follows_bert_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 100))
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[:, 80:] = 0
    out, labels = mask_tokens(ids, mask, 0.15, (0, 1, 2, 3, 4), 4, 1000, generator=g)
    chosen = labels != -100
    assert not chosen[:, 80:].any() and not chosen[:, 0].any()  # never padding or specials
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
    masked, labels = mask_tokens(
        batch["input_ids"],
        batch["attention_mask"],
        0.5,
        cfg.special_token_ids,
        cfg.mask_token_id,
        61,
        0.8,
        0.1,
        obj._generator(2),
    )  # step 0
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
    assert cosine_distill(s, t).item() == pytest.approx(((1 - 2**-0.5) + 2) / 2)
    assert cosine_distill(s, t, valid).item() == pytest.approx(1 - 2**-0.5)


def test_fgd_is_zero_without_masking_and_trains_only_the_student():
    m = small_model()
    obj = R2D2ForPretraining(
        m, LossConfig(**{**OFF, "fgd": True}, fgd_image_mask_ratio=0.0, fgd_text_mask_ratio=0.0)
    )
    assert obj(make_batch())["fgd_loss"].item() == pytest.approx(0.0, abs=1e-5)
    obj = R2D2ForPretraining(
        m, LossConfig(**{**OFF, "fgd": True}, fgd_image_mask_ratio=0.5, fgd_text_mask_ratio=0.5)
    )
    out = obj(make_batch())
    assert out["fgd_loss"].item() > 1e-3
    out["fgd_loss"].backward()
    assert m.visual.blocks[0].fc1.weight.grad.abs().sum() > 0
    assert m.text.layers[0].fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())


def fgd_model(seed=0) -> R2D2Model:
    """8 x 8 = 64 patches of 4 px, so that mask ratios are visible."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=4, width=32, layers=2, heads=2),
        text=TextConfig(
            vocab_size=61,
            width=32,
            layers=1,
            heads=2,
            intermediate=48,
            max_positions=40,
            dropout=0.0,
        ),
        cross_layers=1,
        embed_dim=16,
        max_text_len=40,
    )
    return R2D2Model(cfg)


def fgd_batch(b=6, L=40):
    ids = torch.randint(5, 61, (b, L))
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(b, L, dtype=torch.long)
    for r, n in enumerate((40, 31, 40, 12, 25, 40)[:b]):
        ids[r, n - 1] = 3  # [SEP]
        mask[r, n:] = 0
    return dict(
        images=torch.randn(b, 3, 32, 32),
        input_ids=ids,
        attention_mask=mask,
        image_ids=torch.arange(b),
    )


def one_minus_cos(a, b):
    a, b = a.double(), b.double()
    return 1 - (a * b).sum() / (a.square().sum().sqrt() * b.square().sum().sqrt())


def test_fgd_masked_view_by_hand():
    """Which patches (and so which pixels) and which tokens the FgD student sees, and the loss."""
    m = fgd_model()
    obj = R2D2ForPretraining(
        m, LossConfig(**{**OFF, "fgd": True}, fgd_image_mask_ratio=0.25, fgd_text_mask_ratio=0.5)
    ).eval()  # eval: the step stays 0
    perturb(obj.teacher)
    batch = fgd_batch()
    imgs, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    keep, ids_m = obj.fgd_view(imgs, ids, mask)

    # image: exactly 64 - round(0.25 * 64) = 48 distinct patches kept per image, in patch order
    assert keep.shape == (6, 48) and keep.dtype == torch.long
    for r in range(6):
        assert (
            keep[r].tolist() == sorted(set(keep[r].tolist()))
            and 0 <= keep[r].min() <= keep[r].max() < 64
        )
    assert len({tuple(k.tolist()) for k in keep}) == 6  # a fresh draw per image
    # patch k covers pixels [4 (k // 8), +4) x [4 (k % 8), +4): noise there changes nothing the
    # student computes when k is dropped, and changes the state of patch k when it is kept
    sV = m.image_tokens(imgs, keep)
    assert sV.shape == (6, 1 + 48, 32)
    dropped = [sorted(set(range(64)) - set(keep[r].tolist())) for r in range(6)]
    noisy = imgs.clone()
    for r in range(6):
        for k in dropped[r]:
            noisy[r, :, 4 * (k // 8) : 4 * (k // 8) + 4, 4 * (k % 8) : 4 * (k % 8) + 4] = (
                torch.randn(3, 4, 4)
            )
    torch.testing.assert_close(m.image_tokens(noisy, keep), sV)
    k = int(keep[0, 5])
    poked = imgs.clone()
    poked[0, :, 4 * (k // 8) : 4 * (k // 8) + 4, 4 * (k % 8) : 4 * (k % 8) + 4] += 1.0
    assert not torch.allclose(m.image_tokens(poked, keep)[0, 1 + 5], sV[0, 1 + 5])

    # text: only real, non-special tokens change, and only to [MASK]; about half of them
    changed = ids_m != ids
    assert (ids_m[changed] == 4).all()
    assert (
        not changed[mask == 0].any()
        and not changed[:, 0].any()
        and not (changed & (ids == 3)).any()
    )
    real = (mask == 1) & (ids != 2) & (ids != 3)
    assert 0.35 < changed.sum().item() / real.sum().item() < 0.65

    # the loss, token by token: image rows = class token + the kept patches at their positions
    out = obj(batch)
    sT = m.text_tokens(ids_m, mask)
    with torch.no_grad():
        tV, tT = obj.teacher.image_tokens(imgs), obj.teacher.text_tokens(ids, mask)
    img_terms = [one_minus_cos(sV[r, 0], tV[r, 0]).item() for r in range(6)]
    img_terms += [
        one_minus_cos(sV[r, 1 + j], tV[r, 1 + int(keep[r, j])]).item()
        for r in range(6)
        for j in range(48)
    ]
    txt_terms = [
        one_minus_cos(sT[r, c], tT[r, c]).item() for r in range(6) for c in range(40) if mask[r, c]
    ]
    expect = (sum(img_terms) / len(img_terms) + sum(txt_terms) / len(txt_terms)) / 2
    assert out["fgd_loss"].item() == pytest.approx(expect, rel=1e-5)


def test_vit_drops_exactly_the_patches_attention_masking_would_hide():
    """Dropping tokens (the cheap path FgD takes) gives the kept tokens the states they get in
    the full sequence when the dropped ones are masked out of attention as keys."""
    m = fgd_model().eval()
    imgs = torch.randn(3, 3, 32, 32)
    keep = torch.stack([torch.randperm(64)[:40].sort().values for _ in range(3)])
    vis = torch.zeros(3, 64, dtype=torch.bool).scatter_(1, keep, True)
    x = m.visual.ln_pre(m.visual.embed(imgs))
    key_mask = torch.cat([torch.ones(3, 1, dtype=torch.bool), vis], 1)
    for blk in m.visual.blocks:
        x = blk(x, key_mask)
    rows = torch.cat([torch.zeros(3, 1, dtype=torch.long), 1 + keep], 1)
    torch.testing.assert_close(
        m.image_tokens(imgs, keep),
        x.gather(1, rows[..., None].expand(-1, -1, 32)),
        atol=1e-5,
        rtol=1e-5,
    )
    all_idx = torch.arange(64).expand(3, 64)
    torch.testing.assert_close(m.image_tokens(imgs, all_idx), m.image_tokens(imgs))
    for bad, match in ((vis, "integer tensor"), (keep[:2], "B=3"), (keep + 30, r"\[0, 64\)")):
        with pytest.raises(ValueError, match=match):
            m.image_tokens(imgs, bad)


def test_fgd_global_features():
    m = fgd_model()
    obj = R2D2ForPretraining(
        m, LossConfig(**{**OFF, "fgd": True}, fgd_features="global", fgd_image_mask_ratio=0.5)
    ).eval()
    perturb(obj.teacher)
    batch = fgd_batch()
    imgs, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    keep, ids_m = obj.fgd_view(imgs, ids, mask)
    assert keep.shape == (6, 32)
    v = obj(batch)["fgd_loss"].item()
    t = obj.teacher
    with torch.no_grad():
        s_img = m.vision_proj(m.image_tokens(imgs, keep)[:, 0])
        s_txt = m.text_proj(m.text_tokens(ids_m, mask)[:, 0])
        t_img = t.vision_proj(t.image_tokens(imgs)[:, 0])
        t_txt = t.text_proj(t.text_tokens(ids, mask)[:, 0])
    img = sum(one_minus_cos(s_img[r], t_img[r]).item() for r in range(6)) / 6
    txt = sum(one_minus_cos(s_txt[r], t_txt[r]).item() for r in range(6)) / 6
    assert v == pytest.approx((img + txt) / 2, rel=1e-5)
    assert img > 1e-3


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


# ---------------------------------------------------------------------- temperature and GCPR mode
@pytest.mark.parametrize("start, bound", [(0.0009, 0.001), (-0.2, 0.001), (0.7, 0.5)])
def test_temperature_pushed_out_of_range_is_clamped_and_keeps_its_gradient(start, bound):
    """An optimizer step that overshoots a bound (AdamW's momentum does) must not strand temp
    where logit_scale()'s clamp has zero gradient: the objective clamps the value first."""
    m = small_model(cross_layers=0)
    obj = R2D2ForPretraining(m, LossConfig(**OFF))
    batch = make_batch()
    with torch.no_grad():
        m.temp.fill_(start)  # an overshoot
    out = obj(batch)
    assert m.temp.item() == pytest.approx(bound, rel=1e-6)  # back in range, in place
    assert m.logit_scale().item() == pytest.approx(1 / bound, rel=1e-5)
    out["loss"].backward()
    assert m.temp.grad is not None and m.temp.grad.abs().item() > 0  # the parameter is alive
    with torch.no_grad():
        m.temp.fill_(0.1)
    obj(batch)
    assert m.temp.item() == pytest.approx(0.1)  # inside the range nothing changes


@pytest.mark.parametrize("mode", ["gather", "ring"])
def test_gcpr_mode_reaches_the_kernel(monkeypatch, mode):
    calls = []
    real = K.contrastive_loss

    def spy(*a, **kw):
        calls.append(kw.get("mode"))
        return real(*a, **kw)

    monkeypatch.setattr(K, "contrastive_loss", spy)
    obj = R2D2ForPretraining(small_model(), LossConfig(**{**OFF, "fgr": True}, gcpr_mode=mode))
    obj(make_batch())
    assert calls == [mode]
    assert LossConfig().gcpr_mode == "gather"
