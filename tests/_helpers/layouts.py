"""Checkpoint layouts written out independently of r2d2.engine.hf_io's mapping tables: the
parameter names of HF BERT and CLIP vision checkpoints and of the official R2D2 release, keyed
by this package's names, and a small model config to map them for."""

from r2d2.engine.model import ModelConfig, TextConfig, VisionConfig


def bert_layer_names(i, cross=False):
    p = f"encoder.layer.{i}."
    names = {
        f"layers.{i}.attn.{x}.{wb}": f"{p}attention.self.{x}.{wb}"
        for x in ("query", "key", "value")
        for wb in ("weight", "bias")
    }
    for wb in ("weight", "bias"):
        names.update(
            {
                f"layers.{i}.attn.out.{wb}": f"{p}attention.output.dense.{wb}",
                f"layers.{i}.attn_ln.{wb}": f"{p}attention.output.LayerNorm.{wb}",
                f"layers.{i}.fc1.{wb}": f"{p}intermediate.dense.{wb}",
                f"layers.{i}.fc2.{wb}": f"{p}output.dense.{wb}",
                f"layers.{i}.mlp_ln.{wb}": f"{p}output.LayerNorm.{wb}",
            }
        )
        if cross:
            names.update(
                {
                    f"layers.{i}.cross.{x}.{wb}": f"{p}crossattention.self.{x}.{wb}"
                    for x in ("query", "key", "value")
                }
            )
            names[f"layers.{i}.cross.out.{wb}"] = f"{p}crossattention.output.dense.{wb}"
            names[f"layers.{i}.cross_ln.{wb}"] = f"{p}crossattention.output.LayerNorm.{wb}"
    return names


def bert_names(layers):
    names = {
        "word_embed.weight": "embeddings.word_embeddings.weight",
        "pos_embed.weight": "embeddings.position_embeddings.weight",
        "type_embed.weight": "embeddings.token_type_embeddings.weight",
        "embed_ln.weight": "embeddings.LayerNorm.weight",
        "embed_ln.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(layers):
        names.update(bert_layer_names(i))
    return names


def clip_names(layers):
    names = {
        "cls_token": "vision_model.embeddings.class_embedding",
        "patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
        "pos_embed": "vision_model.embeddings.position_embedding.weight",
        "ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    }
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for wb in ("weight", "bias"):
            for ours, theirs in (
                ("attn.query", "self_attn.q_proj"),
                ("attn.key", "self_attn.k_proj"),
                ("attn.value", "self_attn.v_proj"),
                ("attn.out", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("fc1", "mlp.fc1"),
                ("fc2", "mlp.fc2"),
            ):
                names[f"blocks.{i}.{ours}.{wb}"] = p + f"{theirs}.{wb}"
    return names


def official_cfg():
    return ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=64, layers=2, heads=1),
        text=TextConfig(
            vocab_size=53,
            width=64,
            layers=2,
            heads=1,
            intermediate=80,
            max_positions=16,
            dropout=0.0,
        ),
        cross_layers=2,
        embed_dim=24,
        max_text_len=16,
        tie_mlm_embeddings=False,
    )


def official_names(cfg):
    names = {f"visual.{k}": f"visual_encoder.{v}" for k, v in clip_names(cfg.vision.layers).items()}
    names.update({f"text.{k}": f"text_encoder.{v}" for k, v in bert_names(cfg.text.layers).items()})
    for i in range(cfg.cross_layers):
        names.update(
            {
                f"text_cross.{k}": f"text_joint_layer.{v}"
                for k, v in bert_layer_names(i, True).items()
            }
        )
        names.update(
            {
                f"image_cross.{k}": f"img_joint_layer.{v}"
                for k, v in bert_layer_names(i, True).items()
            }
        )
    for ours, theirs in (
        ("image_cross_proj", "img_joint_proj"),
        ("vision_proj", "vision_proj"),
        ("text_proj", "text_proj"),
        ("itm_head", "itm_head"),
        ("itm_head_i", "itm_head_i"),
        ("mlm_head.dense", "mlm_head.predictions.transform.dense"),
        ("mlm_head.ln", "mlm_head.predictions.transform.LayerNorm"),
    ):
        names[f"{ours}.weight"], names[f"{ours}.bias"] = f"{theirs}.weight", f"{theirs}.bias"
    names["mlm_head.decoder.weight"] = "mlm_head.predictions.decoder.weight"
    names["mlm_head.decoder.bias"] = "mlm_head.predictions.bias"
    names["temp"] = "temp"
    return names
