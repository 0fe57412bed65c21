"""R2D2Model: configs, shapes and masks of every module, kernel hooks, checkpointing, save/load."""

import dataclasses

import pytest
import torch
import yaml

import r2d2.kernels as K
from r2d2.engine.model import (
    PRESETS,
    ModelConfig,
    R2D2Model,
    TextConfig,
    VisionConfig,
    model_preset,
)
from r2d2.engine.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**kw) -> ModelConfig:
    vision = VisionConfig(image_size=24, patch_size=8, width=32, layers=2, heads=2)
    text = TextConfig(
        vocab_size=97, width=48, layers=2, heads=3, intermediate=64, max_positions=20, dropout=0.0
    )
    return ModelConfig(
        **{**dict(vision=vision, text=text, cross_layers=2, embed_dim=16, max_text_len=20), **kw}
    )


def text_batch(b=3, L=7, vocab=97):
    ids = torch.randint(5, vocab, (b, L))
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1 % b, 4:] = 0  # padded rows
    mask[2 % b, 2:] = 0
    return ids, mask


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip_through_dict_and_yaml(name):
    cfg = model_preset(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert cfg.has_cross == (not name.startswith("prd2"))


def test_released_vit_l_preset_pairs_vit_l_with_the_base_text_encoder():
    rel, base, large = model_preset("large-released"), model_preset("base"), model_preset("large")
    assert rel.vision == large.vision and rel.text == base.text
    assert (rel.cross_layers, rel.embed_dim, rel.mlm_head) == (6, 768, False)
    with torch.device("meta"):
        m = R2D2Model(rel)
    assert m.text_cross.layers[0].attn.query.weight.shape == (768, 768)  # cross hidden 768
    assert m.text_cross.layers[0].cross.key.weight.shape == (768, 1024)  # keys: ViT-L tokens
    assert m.image_cross_proj.weight.shape == (768, 1024) and m.mlm_head is None


def test_preset_shapes_match_the_paper():
    base, large = model_preset("base"), model_preset("large")
    assert (base.vision.width, base.vision.layers, base.vision.patch_size) == (768, 12, 16)
    assert (
        large.vision.width,
        large.vision.layers,
        large.vision.heads,
        large.vision.patch_size,
    ) == (1024, 24, 16, 14)
    assert (base.text.vocab_size, base.text.width, base.cross_layers, base.embed_dim) == (
        21128,
        768,
        6,
        768,
    )
    assert base.temperature_init == 0.07 and (base.temperature_min, base.temperature_max) == (
        0.001,
        0.5,
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(vision=dict(image_size=30, patch_size=8)), "multiple of vision.patch_size"),
        (dict(vision=dict(width=30, heads=4)), "vision.heads"),
        (dict(text=dict(dropout=1.5)), "text.dropout"),
        (dict(cross_layers=-1), "cross_layers"),
        (dict(temperature_init=0.9), "temperature"),
        (dict(embed_dim=0), "embed_dim"),
        (dict(bogus=1), "unknown field 'bogus'"),
        (dict(text=dict(nope=1)), "unknown field 'nope'"),
    ],
)
def test_config_errors_name_the_field(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ModelConfig.from_dict({**model_preset("tiny").to_dict(), **bad})


def test_prd2_drops_the_mlm_head():
    m = R2D2Model(small_cfg(cross_layers=0))
    assert m.text_cross is None and m.mlm_head is None and not m.config.mlm_head
    with pytest.raises(RuntimeError, match="cross_layers=0"):
        m.itm_score(torch.randn(2, 3, 24, 24), *text_batch(2))


# ---------------------------------------------------------------------- shapes and masks
def test_shapes_of_every_module():
    m = R2D2Model(small_cfg()).eval()
    imgs = torch.randn(3, 3, 24, 24)
    ids, mask = text_batch()
    V, T = m.image_tokens(imgs), m.text_tokens(ids, mask)
    assert V.shape == (3, 1 + 9, 32) and T.shape == (3, 7, 48)
    assert m.text_image_states(T, mask, V).shape == (3, 7, 48)
    assert m.image_text_states(V, T, mask).shape == (3, 10, 48)
    lt, li = m.itm_logits(V, T, mask)
    assert lt.shape == li.shape == (3, 2)
    assert m.mlm_head(T).shape == (3, 7, 97)
    ei, et = m.encode_image(imgs), m.encode_text(ids, mask)
    assert ei.shape == et.shape == (3, 16)
    torch.testing.assert_close(ei.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(et.norm(dim=-1), torch.ones(3))
    p = m.itm_score(imgs, ids, mask)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    torch.testing.assert_close(p, (lt.softmax(-1)[:, 1] + li.softmax(-1)[:, 1]) / 2)


def test_global_image_feature_is_the_class_token_before_any_post_ln():
    m = R2D2Model(small_cfg()).eval()
    imgs = torch.randn(2, 3, 24, 24)
    V = m.image_tokens(imgs)
    expect = torch.nn.functional.normalize(m.vision_proj(V[:, 0]), dim=-1)
    torch.testing.assert_close(m.encode_image(imgs), expect)
    assert not any("ln_post" in k for k in m.state_dict())


def test_padded_text_tokens_change_nothing():
    m = R2D2Model(small_cfg()).eval()
    imgs = torch.randn(3, 3, 24, 24)
    ids, mask = text_batch()
    ids2 = torch.where(mask.bool(), ids, torch.randint(5, 97, ids.shape))  # new junk under padding
    T, T2 = m.text_tokens(ids, mask), m.text_tokens(ids2, mask)
    keep = mask.bool()
    torch.testing.assert_close(T[keep], T2[keep])
    V = m.image_tokens(imgs)
    torch.testing.assert_close(m.image_text_states(V, T, mask), m.image_text_states(V, T2, mask))
    torch.testing.assert_close(
        m.text_image_states(T, mask, V)[keep], m.text_image_states(T2, mask, V)[keep]
    )
    # a shorter padded row equals the same text encoded alone without padding
    alone = m.text_tokens(ids[1:2, :4], mask[1:2, :4])
    torch.testing.assert_close(T[1:2, :4], alone, atol=1e-5, rtol=1e-5)


def test_vit_keep_drops_the_other_patches():
    m = R2D2Model(small_cfg()).eval()
    imgs = torch.randn(2, 3, 24, 24)
    keep = torch.tensor([[0, 1, 2, 3, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])  # 4 / 0 dropped
    imgs2 = imgs.clone()
    imgs2[0, :, 8:16, 8:16] = torch.randn(3, 8, 8)  # patch 4 of image 0
    imgs2[1, :, 0:8, 0:8] = torch.randn(3, 8, 8)  # patch 0 of image 1
    a, b = m.image_tokens(imgs, keep), m.image_tokens(imgs2, keep)
    assert a.shape == (2, 1 + 8, 32)
    torch.testing.assert_close(a, b)  # the dropped pixels are never seen
    assert not torch.allclose(m.image_tokens(imgs)[0, 0], m.image_tokens(imgs2)[0, 0])


def test_bad_inputs_name_the_argument():
    m = R2D2Model(small_cfg())
    ids, mask = text_batch()
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 24, 24\]"):
        m.encode_image(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m.encode_text(ids, mask[:, :3])
    with pytest.raises(ValueError, match="input_ids"):
        m.encode_text(torch.randn(3, 7))
    with pytest.raises(ValueError, match="tokenizer"):
        m.encode_text(["无分词器"])
    with pytest.raises(ValueError, match="pairs rows"):
        m.itm_score(torch.randn(2, 3, 24, 24), ids, mask)
    m.tokenizer = build_tokenizer()  # 21185 tokens for a 97-token embedding table
    with pytest.raises(ValueError, match=r"text\.vocab_size=97"):
        m.encode_text(["猫"])


def test_strings_with_an_attached_tokenizer():
    tok = build_tokenizer(max_length=12)
    cfg = model_preset("tiny")
    m = R2D2Model(cfg, tokenizer=tok).eval()
    texts = ["一只黑猫", "两只狗 in the park"]
    enc = tok(texts)
    torch.testing.assert_close(
        m.encode_text(texts), m.encode_text(enc["input_ids"], enc["attention_mask"])
    )
    assert m.itm_score(torch.randn(2, 3, 32, 32), texts).shape == (2,)


# ---------------------------------------------------------------------- kernel hooks
def test_attention_goes_through_the_kernel_dispatcher_with_the_configured_backend(monkeypatch):
    calls = []
    real = K.attention

    def spy(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw["backend"], kw["key_padding_mask"] is None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(K, "attention", spy)
    m = R2D2Model(small_cfg(), kernels=K.KernelConfig(attention="eager")).eval()
    ids, mask = text_batch()
    m.itm_score(torch.randn(3, 3, 24, 24), ids, mask)
    # vit 2 + text 2 + 2 cross encoders x 2 layers x (self + cross)
    assert len(calls) == 2 + 2 + 8 and {c[2] for c in calls} == {"eager"}
    assert calls[2][0] == (3, 3, 7, 16)  # text self-attention: [B, H, L, D]
    m.set_kernels(K.KernelConfig(attention="sdpa"))
    calls.clear()
    m.encode_text(ids, mask)
    assert {c[2] for c in calls} == {"sdpa"} and not any(c[3] for c in calls)


def test_activation_checkpointing_keeps_outputs_and_grads():
    torch.manual_seed(1)
    m = R2D2Model(small_cfg())
    imgs, (ids, mask) = torch.randn(3, 3, 24, 24), text_batch()

    def grads():
        m.zero_grad()
        lt, li = m.itm_logits(m.image_tokens(imgs), m.text_tokens(ids, mask), mask)
        (lt.sum() + li.square().sum() + m.encode_image(imgs).sum()).backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    g0 = grads()
    m.set_activation_checkpointing(True)
    g1 = grads()
    assert len(g0) == len(g1) > 50
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)


def test_clamp_temperature_in_place():
    m = R2D2Model(small_cfg())
    for start, expect in ((1e-5, 0.001), (0.9, 0.5), (0.2, 0.2)):
        with torch.no_grad():
            m.temp.fill_(start)
        m.clamp_temperature_()
        assert (
            m.temp.item() == pytest.approx(expect) and m.temp.requires_grad and m.temp.grad is None
        )


def test_temperature_is_clamped():
    m = R2D2Model(small_cfg())
    assert m.logit_scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        m.temp.fill_(2.0)
    assert m.logit_scale().item() == pytest.approx(2.0)
    with torch.no_grad():
        m.temp.fill_(1e-6)
    assert m.logit_scale().item() == pytest.approx(1000.0)


def test_mlm_decoder_is_tied_and_survives_save_load(tmp_path):
    tok = build_tokenizer(max_length=12)
    m = R2D2Model(model_preset("tiny"), tokenizer=tok).eval()
    assert m.mlm_head.decoder.weight is m.text.word_embed.weight
    m.save_pretrained(str(tmp_path))
    m2 = R2D2Model.from_pretrained(str(tmp_path)).eval()
    assert m2.config == m.config and m2.tokenizer.vocab == tok.vocab
    assert m2.mlm_head.decoder.weight is m2.text.word_embed.weight
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.itm_score(imgs, ["猫", "狗"]), m2.itm_score(imgs, ["猫", "狗"]))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        R2D2Model.from_pretrained(str(tmp_path / "nope"))


def test_tiny_preset_is_small():
    m = R2D2Model(model_preset("tiny"))
    n = sum(p.numel() for p in m.parameters())
    assert n < 3_000_000
    assert dataclasses.asdict(m.config)["vision"]["image_size"] == 32


# ---------------------------------------------------------------------- retrieval
def test_retrieve_reranks_only_the_top_k():
    from r2d2.engine import retrieve

    m = R2D2Model(small_cfg()).eval()
    imgs = torch.randn(5, 3, 24, 24)
    ids, mask = text_batch(7)
    out = retrieve(m, imgs, ids, mask, top_k=3, batch_size=2)
    sim = m.encode_image(imgs) @ m.encode_text(ids, mask).t()
    torch.testing.assert_close(out["sim_i2t"], sim)
    assert out["i2t"].shape == (5, 7) and out["t2i"].shape == (7, 5)
    assert out["i2t_indices"].shape == out["pre_i2t"].shape == (5, 3)
    assert out["t2i_indices"].shape == out["pre_t2i"].shape == (7, 3)
    for i in range(5):
        top = set(out["pre_i2t"][i].tolist())
        assert top == set(torch.topk(sim[i], 3).indices.tolist())
        assert set(out["i2t_indices"][i].tolist()) == top  # re-ranking permutes the top k
        for j in range(7):
            if j in top:  # (p_ti + p_it) / 2 + cosine
                p = m.itm_score(imgs[i : i + 1], ids[j : j + 1], mask[j : j + 1])
                assert out["i2t"][i, j].item() == pytest.approx((p + sim[i, j]).item(), abs=1e-5)
            else:
                assert out["i2t"][i, j].item() == pytest.approx(sim[i, j].item() - 2.0, abs=1e-6)
    for j in range(7):
        assert set(out["t2i_indices"][j].tolist()) == set(torch.topk(sim[:, j], 3).indices.tolist())
    with pytest.raises(ValueError, match="top_k"):
        retrieve(m, imgs, ids, mask, top_k=0)


def test_retrieve_with_strings_and_prd2():
    from r2d2.engine import retrieve

    tok = build_tokenizer(max_length=12)
    cfg = model_preset("prd2-tiny")
    m = R2D2Model(cfg, tokenizer=tok)
    out = retrieve(m, torch.randn(3, 3, 32, 32), ["猫", "狗", "鸟", "鱼"], top_k=2)
    assert m.training  # retrieve restores the mode it found
    torch.testing.assert_close(out["i2t"], out["sim_i2t"])
    assert out["i2t_indices"].shape == (3, 2)
