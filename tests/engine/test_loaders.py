"""Checkpoint loaders on checkpoints the tests write: HF BERT / CLIP vision directories (with and
without ``transformers``) and the official R2D2 release layout."""

import dataclasses
import json

import pytest
import torch

from _helpers.layouts import bert_names, clip_names, official_cfg, official_names
from r2d2.engine import R2D2Model, from_hf_bert, from_hf_clip_vision
from r2d2.engine.hf_io import infer_official_config

try:
    import transformers
except ImportError:  # optional: only the cross-check against the original models needs it
    transformers = None
needs_tf = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


pytestmark = pytest.mark.usefixtures("one_thread")


BERT_CFG = dict(
    vocab_size=91,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=40,
    max_position_embeddings=24,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    pad_token_id=0,
)
CLIP_CFG = dict(
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=30,
    patch_size=6,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
)


def write_dir(path, config, sd, fmt):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path / "model.safetensors"))
    else:
        torch.save(sd, str(path / "pytorch_model.bin"))
    return str(path)


def random_sd(names, shapes):
    return {theirs: torch.randn(shapes[ours]) for ours, theirs in names.items()}


# ---------------------------------------------------------------------- without transformers
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bert_mapping_loads_every_key(tmp_path, fmt):
    names = bert_names(2)
    shapes = {
        "word_embed.weight": (91, 32),
        "pos_embed.weight": (24, 32),
        "type_embed.weight": (2, 32),
    }
    for k in names:
        if k not in shapes:
            shapes[k] = (
                (40, 32)
                if "fc1.weight" in k
                else (32, 40)
                if "fc2.weight" in k
                else (40,)
                if "fc1.bias" in k
                else (32, 32)
                if k.endswith("weight") and ("attn." in k)
                else (32,)
            )
    sd = random_sd(names, shapes)
    sd["pooler.dense.weight"] = torch.randn(32, 32)
    enc = from_hf_bert(write_dir(tmp_path / fmt, BERT_CFG, sd, fmt))
    own = enc.state_dict()
    assert set(own) == set(names)
    for ours, theirs in names.items():
        assert torch.equal(own[ours], sd[theirs]), ours
    r = enc.load_report
    assert r.missing == [] and r.unexpected == [] and r.unused == ["pooler.dense.weight"]


def test_clip_mapping_loads_every_key(tmp_path):
    names = clip_names(2)
    shapes = {"cls_token": (32,), "patch_embed.weight": (32, 3, 6, 6), "pos_embed": (26, 32)}
    for k in names:
        if k not in shapes:
            shapes[k] = (
                (40, 32)
                if "fc1.weight" in k
                else (32, 40)
                if "fc2.weight" in k
                else (40,)
                if "fc1.bias" in k
                else (32, 32)
                if "attn." in k and k.endswith("weight")
                else (32,)
            )
    sd = random_sd(names, shapes)
    sd["vision_model.post_layernorm.weight"] = torch.randn(32)
    vit = from_hf_clip_vision(write_dir(tmp_path, {"vision_config": CLIP_CFG}, sd, "safetensors"))
    own = vit.state_dict()
    assert set(own) == set(names)
    for ours, theirs in names.items():
        assert torch.equal(own[ours], sd[theirs]), ours
    assert vit.load_report.unused == ["vision_model.post_layernorm.weight"]


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        from_hf_bert(str(tmp_path))
    sd = {"embeddings.word_embeddings.weight": torch.randn(91, 32)}
    d = write_dir(tmp_path / "partial", BERT_CFG, sd, "bin")
    with pytest.raises(ValueError, match="missing"):
        from_hf_bert(d)
    assert from_hf_bert(d, strict=False).load_report.missing
    d = write_dir(tmp_path / "act", {**BERT_CFG, "hidden_act": "relu"}, sd, "bin")
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf_bert(d)
    d = write_dir(
        tmp_path / "shape",
        BERT_CFG,
        {"embeddings.word_embeddings.weight": torch.randn(90, 32)},
        "bin",
    )
    with pytest.raises(ValueError, match=r"word_embed\.weight"):
        from_hf_bert(d)


# ---------------------------------------------------------------------- with transformers
@needs_tf
def test_hf_bert_last_hidden_state_matches(tmp_path):
    hf = transformers.BertModel(transformers.BertConfig(**BERT_CFG)).eval()
    hf.save_pretrained(str(tmp_path))
    enc = from_hf_bert(str(tmp_path)).eval()
    ids = torch.randint(1, 91, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 6:] = 0
    ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = enc(ids, mask)
    keep = mask.bool()  # HF's padded positions carry junk states; the real tokens must match
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=1e-4)


@needs_tf
def test_hf_clip_vision_last_hidden_state_matches(tmp_path):
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_CFG)).eval()
    hf.save_pretrained(str(tmp_path))
    vit = from_hf_clip_vision(str(tmp_path)).eval()
    x = torch.randn(2, 3, 30, 30)
    torch.testing.assert_close(vit(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-4)


@needs_tf
@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForPreTraining"])
def test_hf_bert_accepts_a_save_with_heads(tmp_path, head):
    """hfl/chinese-roberta-wwm-ext is such a save (keys bert.*, cls.*): strict by default, the
    heads are reported as unused and the encoder matches the original."""
    hf = getattr(transformers, head)(transformers.BertConfig(**BERT_CFG)).eval()
    hf.save_pretrained(str(tmp_path))
    enc = from_hf_bert(str(tmp_path)).eval()
    r = enc.load_report
    assert r.missing == [] and r.unexpected == []
    assert any(k.startswith("cls.predictions.") for k in r.unused)
    assert any(k.startswith("cls.seq_relationship.") for k in r.unused) == (
        head == "BertForPreTraining"
    )
    assert all(k.startswith(("cls.", "bert.pooler.")) for k in r.unused)
    ids = torch.randint(1, 91, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[2, 5:] = 0
    ref = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(enc(ids, mask)[keep], ref[keep], atol=1e-5, rtol=1e-4)


@needs_tf
def test_hf_clip_vision_accepts_a_full_clip_model(tmp_path):
    text = dict(
        vocab_size=50,
        hidden_size=24,
        intermediate_size=30,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    hf = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=CLIP_CFG, projection_dim=16)
    ).eval()
    hf.save_pretrained(str(tmp_path))
    vit = from_hf_clip_vision(str(tmp_path)).eval()
    r = vit.load_report
    assert r.missing == [] and r.unexpected == []
    for k in (
        "logit_scale",
        "text_projection.weight",
        "visual_projection.weight",
        "vision_model.post_layernorm.weight",
    ):
        assert k in r.unused
    assert any(k.startswith("text_model.") for k in r.unused)
    x = torch.randn(2, 3, 30, 30)
    # last_hidden_state is before post_layernorm, which R2D2 reads
    torch.testing.assert_close(
        vit(x), hf.vision_model(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-4
    )


# ---------------------------------------------------------------------- official R2D2 layout
def test_from_official_maps_every_key(tmp_path):
    cfg = official_cfg()
    shapes = {k: v.shape for k, v in R2D2Model(cfg).state_dict().items()}
    names = official_names(cfg)
    assert set(names) == set(shapes)  # the test's layout covers our whole model
    sd = {theirs: torch.randn(shapes[ours]) for ours, theirs in names.items()}
    sd["temp"] = torch.tensor(0.05)
    extra = {
        "text_encoder.pooler.dense.weight": torch.randn(64, 64),
        "visual_encoder.vision_model.post_layernorm.weight": torch.randn(64),
        "text_joint_layer.embeddings.word_embeddings.weight": torch.randn(53, 64),
        "text_encoder.embeddings.position_ids": torch.arange(16)[None],
        "queue_something": torch.randn(3),
    }
    path = tmp_path / "r2d2_official.pth"
    torch.save({"model": {"module." + k: v for k, v in {**sd, **extra}.items()}}, str(path))

    m = R2D2Model.from_official(str(path), config=cfg)
    own = m.state_dict()
    for ours, theirs in names.items():
        assert torch.equal(own[ours], sd[theirs]), ours
    r = m.load_report
    assert r.missing == [] and r.unexpected == ["queue_something"]
    assert sorted(r.unused) == sorted(k for k in extra if k != "queue_something")
    assert m.logit_scale().item() == pytest.approx(20.0)
    with pytest.raises(ValueError, match="queue_something"):
        R2D2Model.from_official(str(path), config=cfg, strict=True)

    # without a config the shapes decide (heads = width / 64)
    inferred = infer_official_config({k: v for k, v in sd.items()})
    # the release's BERT dropout (0.1) is not in the weights; everything else is
    assert inferred == dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, dropout=0.1))
    m2 = R2D2Model.from_official(sd)
    bare = {k.replace("visual_encoder.vision_model.", "visual_encoder."): v for k, v in sd.items()}
    assert infer_official_config(bare) == inferred
    assert R2D2Model.from_official(bare, config=cfg).load_report.missing == []
    assert torch.equal(m2.itm_head_i.weight, sd["itm_head_i.weight"])

    del sd["itm_head.bias"]
    assert R2D2Model.from_official(sd, config=cfg).load_report.missing == ["itm_head.bias"]


def test_from_official_with_a_tied_config_loads_the_shared_tensor_once():
    """Our tied model has one tensor for text.word_embed and mlm_head.decoder: the two official
    keys must agree, and only one is loaded (the other is reported as unused)."""
    cfg = dataclasses.replace(official_cfg(), tie_mlm_embeddings=True)
    model = R2D2Model(cfg)
    assert model.mlm_head.decoder.weight is model.text.word_embed.weight
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    names = official_names(cfg)
    sd = {theirs: torch.randn(shapes[ours]) for ours, theirs in names.items()}
    emb = "text_encoder.embeddings.word_embeddings.weight"
    dec = "mlm_head.predictions.decoder.weight"
    sd[dec] = sd[emb].clone()
    m = R2D2Model.from_official(sd, config=cfg)
    assert torch.equal(m.text.word_embed.weight, sd[emb])
    assert m.mlm_head.decoder.weight is m.text.word_embed.weight
    assert (
        m.load_report.missing == []
        and m.load_report.unexpected == []
        and dec in m.load_report.unused
    )
    # an untied checkpoint cannot go into a tied model: a clear error, not a silent overwrite
    sd[dec] = sd[emb] + 0.5
    with pytest.raises(ValueError, match=rf"{emb} and {dec} differ.*tie_mlm_embeddings=False"):
        R2D2Model.from_official(sd, config=cfg)
    untied = R2D2Model.from_official(sd, config=official_cfg())
    assert torch.equal(untied.text.word_embed.weight, sd[emb])
    assert torch.equal(untied.mlm_head.decoder.weight, sd[dec])


def test_release_layout_fits_the_large_released_preset():
    """The released ViT-L model's keys and shapes (built on the meta device: no memory) map onto
    every parameter of model_preset("large-released"), and the inferred config is that preset."""
    from r2d2.engine.hf_io import official_key
    from r2d2.engine.model import model_preset

    cfg = model_preset("large-released")
    with torch.device("meta"):
        ours = R2D2Model(cfg).state_dict()
    names = {o: t for o, t in official_names(cfg).items() if not o.startswith("mlm_head.")}
    assert {official_key(t) for t in names.values()} == set(ours)
    sd = {t: torch.empty(ours[o].shape, device="meta") for o, t in names.items()}
    assert infer_official_config(sd) == dataclasses.replace(cfg, tie_mlm_embeddings=False)


def test_from_official_rejects_other_checkpoints():
    with pytest.raises(ValueError, match="not an official R2D2 checkpoint"):
        R2D2Model.from_official({"foo.weight": torch.randn(2)})


@needs_tf
@pytest.mark.parametrize("preset", ["base", "large"])
def test_preset_encoders_have_the_original_parameter_counts(preset):
    """Built on the meta device (no memory): our ViT / text encoder of each preset have exactly
    the parameters of HF's CLIPVisionModel (less post_layernorm) / BertModel (less the pooler)."""
    from r2d2.engine.model import model_preset

    cfg = model_preset(preset)
    v, t = cfg.vision, cfg.text
    with torch.device("meta"):
        ours = R2D2Model(cfg)
        hf_v = transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(
                hidden_size=v.width,
                intermediate_size=int(v.width * v.mlp_ratio),
                num_hidden_layers=v.layers,
                num_attention_heads=v.heads,
                image_size=v.image_size,
                patch_size=v.patch_size,
            )
        )
        hf_t = transformers.BertModel(
            transformers.BertConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.width,
                num_hidden_layers=t.layers,
                num_attention_heads=t.heads,
                intermediate_size=t.intermediate,
            ),
            add_pooling_layer=False,
        )

    def count(m, skip=""):
        return sum(p.numel() for n, p in m.named_parameters() if not (skip and skip in n))

    assert count(ours.visual) == count(hf_v, "post_layernorm")
    assert count(ours.text) == count(hf_t)


def test_convert_cli_writes_a_folder_that_loads_back(tmp_path, capsys):
    """`r2d2 convert official` (what the CCMB fine-tuning presets' init_from expects): every
    weight arrives, the vocab is attached and checked against the embedding."""
    from r2d2.cli.convert import main as convert

    cfg = official_cfg()
    shapes = {k: v.shape for k, v in R2D2Model(cfg).state_dict().items()}
    sd = {theirs: torch.randn(shapes[ours]) for ours, theirs in official_names(cfg).items()}
    ckpt = tmp_path / "release.pth"
    # the head counts come from the checkpoint's config (shapes cannot tell them)
    torch.save({"model": sd, "config": {"vision": {"heads": 1}, "text": {"heads": 1}}}, str(ckpt))
    vocab = tmp_path / "vocab.txt"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(0x4E00 + i) for i in range(48)]
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    out = tmp_path / "model"
    assert convert(["official", str(ckpt), str(out), "--vocab", str(vocab)]) == 0
    assert "missing 0, unexpected 0" in capsys.readouterr().out
    m = R2D2Model.from_pretrained(str(out))
    assert m.config == infer_official_config(sd)
    for ours, theirs in official_names(cfg).items():
        assert torch.equal(m.state_dict()[ours], sd[theirs]), ours
    assert m.tokenizer is not None and m.tokenizer.vocab_size == 53
    # refusals: a non-empty folder (usage: 2), a vocab that does not fit the embedding (1), a
    # missing file (2)
    assert convert(["official", str(ckpt), str(out)]) == 2
    (tmp_path / "small.txt").write_text("\n".join(tokens[:20]) + "\n", encoding="utf-8")
    assert (
        convert(
            ["official", str(ckpt), str(tmp_path / "m2"), "--vocab", str(tmp_path / "small.txt")]
        )
        == 1
    )
    assert convert(["official", str(tmp_path / "nope.pth"), str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "has 20 tokens but" in err and "no such checkpoint" in err
