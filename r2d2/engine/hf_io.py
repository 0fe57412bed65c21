"""Checkpoint loaders: Hugging Face BERT / CLIP vision directories and the official R2D2 release.

Key layouts mapped onto ours (see r2d2/engine/model):
    HF BERT   embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm,
              encoder.layer.N.{attention.self.{query,key,value}, attention.output.{dense,LayerNorm},
              crossattention.*, intermediate.dense, output.{dense,LayerNorm}}   (optional "bert.")
    HF CLIP   vision_model.embeddings.{class_embedding, patch_embedding, position_embedding},
              vision_model.pre_layrnorm, vision_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj,
              layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}; post_layernorm is unused (R2D2 reads
              the states before it)
    unused    whatever a standard save carries beyond the encoder: BERT pooler, cls.predictions.*
              (BertForMaskedLM), cls.seq_relationship.* (BertForPreTraining); a CLIPModel's
              text_model.*, text_projection, visual_projection, logit_scale
    official  visual_encoder.* (HF CLIPVisionModel), text_encoder.* (HF BertModel),
              text_joint_layer.* / img_joint_layer.* (BERT with cross-attention, 6 layers),
              img_joint_proj, vision_proj, text_proj, itm_head, itm_head_i, temp, mlm_head.*;
              with a tied config the MLM decoder weight must equal the word embeddings and is
              loaded once
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch

from r2d2.engine.model.bert import TextEncoder
from r2d2.engine.model.config import ModelConfig, TextConfig, VisionConfig
from r2d2.engine.model.vit import VisionTransformer

log = logging.getLogger("r2d2.hf_io")

_BERT_LAYER = [
    (r"attention\.self\.(query|key|value)\.", r"attn.\1."),
    (r"attention\.output\.dense\.", "attn.out."),
    (r"attention\.output\.LayerNorm\.", "attn_ln."),
    (r"crossattention\.self\.(query|key|value)\.", r"cross.\1."),
    (r"crossattention\.output\.dense\.", "cross.out."),
    (r"crossattention\.output\.LayerNorm\.", "cross_ln."),
    (r"intermediate\.dense\.", "fc1."),
    (r"output\.dense\.", "fc2."),
    (r"output\.LayerNorm\.", "mlp_ln."),
]
_BERT_EMBED = {
    "embeddings.word_embeddings.weight": "word_embed.weight",
    "embeddings.position_embeddings.weight": "pos_embed.weight",
    "embeddings.token_type_embeddings.weight": "type_embed.weight",
    "embeddings.LayerNorm.weight": "embed_ln.weight",
    "embeddings.LayerNorm.bias": "embed_ln.bias",
}
_CLIP_LAYER = [
    (r"self_attn\.q_proj\.", "attn.query."),
    (r"self_attn\.k_proj\.", "attn.key."),
    (r"self_attn\.v_proj\.", "attn.value."),
    (r"self_attn\.out_proj\.", "attn.out."),
    (r"layer_norm1\.", "ln_1."),
    (r"layer_norm2\.", "ln_2."),
    (r"mlp\.fc1\.", "fc1."),
    (r"mlp\.fc2\.", "fc2."),
]
_CLIP_EMBED = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.patch_embedding.weight": "patch_embed.weight",
    "embeddings.position_embedding.weight": "pos_embed",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
}
# Present in the source layouts but unused by design, per loader: R2D2 reads the ViT states
# before post_layernorm and the [CLS] state without a pooler; the standard HF directories also
# carry the heads of the model they were saved from (BertForMaskedLM / BertForPreTraining:
# cls.predictions.*, cls.seq_relationship.*; a full CLIPModel: the text tower, both projections
# and logit_scale), which have no counterpart in an encoder. The official joint layers take
# states, not token embeddings.
_UNUSED_BERT = re.compile(r"(^|\.)(pooler|position_ids)(\.|$)|^cls\.")
_UNUSED_CLIP = re.compile(
    r"(^|\.)(post_layernorm|position_ids)(\.|$)"
    r"|^(text_model|text_projection|visual_projection)\.|^logit_scale$"
)
_UNUSED_OFFICIAL = re.compile(
    r"(^|\.)(pooler|post_layernorm|position_ids)(\.|$)"
    r"|^(text_joint_layer|img_joint_layer)\.embeddings\."
)


def _sub_layer(rest: str, rules) -> str | None:
    for pat, rep in rules:
        m = re.match(pat, rest)
        if m:
            return m.expand(rep) + rest[m.end() :]
    return None


def bert_key(k: str, prefix: str = "layers") -> str | None:
    """HF BERT key -> our TextEncoder/CrossEncoder key; None when it has no counterpart."""
    k = (
        k.removeprefix("bert.")
        .replace("LayerNorm.gamma", "LayerNorm.weight")
        .replace("LayerNorm.beta", "LayerNorm.bias")
    )
    if k in _BERT_EMBED:
        return _BERT_EMBED[k]
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)$", k)
    if m:
        tail = _sub_layer(m.group(2), _BERT_LAYER)
        return None if tail is None else f"{prefix}.{m.group(1)}.{tail}"
    return None


def clip_vision_key(k: str) -> str | None:
    """HF CLIP vision key -> our VisionTransformer key; None when it has no counterpart."""
    k = k.removeprefix("vision_model.")
    if k in _CLIP_EMBED:
        return _CLIP_EMBED[k]
    m = re.match(r"encoder\.layers\.(\d+)\.(.*)$", k)
    if m:
        tail = _sub_layer(m.group(2), _CLIP_LAYER)
        return None if tail is None else f"blocks.{m.group(1)}.{tail}"
    return None


@dataclass
class LoadReport:
    """What a checkpoint load did: our keys left at init, source keys not used."""

    missing: list = field(default_factory=list)
    """parameters of ours that the checkpoint did not provide"""
    unexpected: list = field(default_factory=list)
    """checkpoint keys with no counterpart in our model"""
    unused: list = field(default_factory=list)
    """checkpoint keys skipped by design: pooler, post_layernorm, position_ids, the heads of a
    BertForMaskedLM / BertForPreTraining save, a CLIPModel's text tower / projections /
    logit_scale, the official joint layers' embeddings, a tied duplicate"""


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A state dict from a dict, a file (.safetensors / torch pickle) or a HF directory
    (model.safetensors or pytorch_model.bin); unwraps {"model": ...} / {"state_dict": ...}.
    Files are read as data only (safetensors, or ``torch.load(weights_only=True)``): one that
    needs a pickled class or function is refused (``UnsafeCheckpointError``, one line), and
    nothing in it runs."""
    return read_checkpoint_file(path)[0]


def read_checkpoint_file(path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state dict, the checkpoint's own config or None)`` (see :func:`read_state_dict`); the
    config is a top-level ``"config"`` mapping in the file, or a HF directory's config.json."""
    from r2d2.engine.checkpoint import CorruptCheckpointError, safe_load

    config = None
    if isinstance(path, dict):
        sd = path
    else:
        path = os.fspath(path)
        if os.path.isdir(path):
            for name in ("model.safetensors", "pytorch_model.bin"):
                if os.path.isfile(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        if os.path.basename(path) in ("model.safetensors", "pytorch_model.bin") and os.path.isfile(
            os.path.join(os.path.dirname(path), "config.json")
        ):
            try:
                config = _load_config(os.path.dirname(path))
            except (OSError, ValueError):
                config = None
        if path.endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                sd = load_file(path)
            except SafetensorError as e:
                raise CorruptCheckpointError(f"{path}: not a safetensors file ({e})") from None
        else:
            sd = safe_load(path)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    if isinstance(sd.get("config"), dict):
        config = sd["config"]
    for wrap in ("model", "state_dict", "module"):
        if isinstance(sd.get(wrap), dict):
            sd = sd[wrap]
    return {k.removeprefix("module."): v for k, v in sd.items()}, config


def _load_config(path: str) -> dict:
    p = os.path.join(path, "config.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    with open(p) as f:
        return json.load(f)


def _assign(
    module: torch.nn.Module,
    mapped: dict[str, torch.Tensor],
    report: LoadReport,
    sources: dict[str, str] | None = None,
) -> None:
    """Copy mapped tensors into ``module`` with shape checks; missing keys go to ``report``.

    Tied parameters appear under several of our names (the MLM decoder and the word
    embeddings); when the checkpoint provides more than one of them, the tensors must be equal
    (otherwise the checkpoint is untied and loading one would silently drop the other) and only
    the first is loaded, the others listed as unused."""
    sources = sources or {}
    own = module.state_dict()
    for k, v in mapped.items():
        if k not in own:
            report.unexpected.append(sources.get(k, k))
        elif own[k].shape != v.shape:
            raise ValueError(
                f"checkpoint tensor for {k} has shape {tuple(v.shape)}, our model "
                f"expects {tuple(own[k].shape)} (wrong config?)"
            )
    params = dict(module.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    load = {}
    for k, v in mapped.items():
        if k not in own:
            continue
        p = params.get(k)
        if p is not None and id(p) in first:
            k0 = first[id(p)]
            if not torch.equal(mapped[k0].to(v.dtype), v):
                diff = (mapped[k0].double() - v.double()).abs().max().item()
                raise ValueError(
                    f"{sources.get(k0, k0)} and {sources.get(k, k)} differ (max |diff| = {diff:.3g}) "
                    f"but our model ties {k0} and {k} into one tensor: the checkpoint is untied; "
                    "build the model with tie_mlm_embeddings=False (as the inferred config does)"
                )
            report.unused.append(sources.get(k, k))
            continue
        if p is not None:
            first[id(p)] = k
        load[k] = v
    module.load_state_dict(load, strict=False)
    loaded = {id(params.get(k)) for k in mapped}
    for k, p in module.named_parameters(remove_duplicate=False):
        if k not in mapped and id(p) not in loaded:
            report.missing.append(k)


def _map(
    sd, fn, unused: re.Pattern, report: LoadReport
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Checkpoint keys -> ours; returns (our key -> tensor, our key -> checkpoint key)."""
    out, sources = {}, {}
    for k, v in sd.items():
        ours = fn(k)
        if ours is not None:
            out[ours], sources[ours] = v, k
        elif unused.search(k):
            report.unused.append(k)
        else:
            report.unexpected.append(k)
    return out, sources


def _finish(module, report: LoadReport, strict: bool, what: str):
    if report.missing or report.unexpected:
        msg = f"{what}: missing {report.missing}, unexpected {report.unexpected}"
        if strict:
            raise ValueError(msg)
        log.warning(msg)
    module.load_report = report
    return module


def from_hf_bert(path: str, kernels=None, strict: bool = True) -> TextEncoder:
    """Our ``TextEncoder`` from a HF ``BertModel`` directory, or a ``BertForMaskedLM`` /
    ``BertForPreTraining`` save (the layout of ``hfl/chinese-roberta-wwm-ext``: keys under
    ``bert.``, heads ``cls.*`` listed in ``load_report.unused``); ``enc(input_ids,
    attention_mask)`` equals HF's ``last_hidden_state``. ``strict`` raises on missing or
    unexpected keys (never on the unused heads)."""
    c = _load_config(path)
    if c.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: hidden_act={c['hidden_act']!r}; only 'gelu' (BERT) is supported")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: only absolute position embeddings are supported")
    tc = TextConfig(
        vocab_size=c["vocab_size"],
        width=c["hidden_size"],
        layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        intermediate=c["intermediate_size"],
        max_positions=c["max_position_embeddings"],
        type_vocab_size=c.get("type_vocab_size", 2),
        layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        dropout=c.get("hidden_dropout_prob", 0.1),
        pad_id=c.get("pad_token_id") or 0,
    )
    enc = TextEncoder(tc, kernels)
    report = LoadReport()
    mapped, sources = _map(read_state_dict(path), bert_key, _UNUSED_BERT, report)
    _assign(enc, mapped, report, sources)
    return _finish(enc, report, strict, f"from_hf_bert({path})")


def from_hf_clip_vision(path: str, kernels=None, strict: bool = True) -> VisionTransformer:
    """Our ``VisionTransformer`` from a HF ``CLIPVisionModel`` or full ``CLIPModel`` directory
    (the text tower, ``text_projection``, ``visual_projection`` and ``logit_scale`` are listed in
    ``load_report.unused``); ``vit(pixel_values)`` equals HF's ``last_hidden_state``. ``strict``
    raises on missing or unexpected keys."""
    c = _load_config(path)
    c = c.get("vision_config", c)
    act = c.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"{path}: hidden_act={act!r}; only 'quick_gelu' (CLIP) is supported")
    vc = VisionConfig(
        image_size=c.get("image_size", 224),
        patch_size=c.get("patch_size", 32),
        width=c.get("hidden_size", 768),
        layers=c.get("num_hidden_layers", 12),
        heads=c.get("num_attention_heads", 12),
        mlp_ratio=c.get("intermediate_size", 3072) / c.get("hidden_size", 768),
        layer_norm_eps=c.get("layer_norm_eps", 1e-5),
        dropout=c.get("attention_dropout", 0.0),
    )
    vit = VisionTransformer(vc, kernels)
    report = LoadReport()
    mapped, sources = _map(read_state_dict(path), clip_vision_key, _UNUSED_CLIP, report)
    _assign(vit, mapped, report, sources)
    return _finish(vit, report, strict, f"from_hf_clip_vision({path})")


# ---------------------------------------------------------------------- official R2D2
_OFFICIAL_PLAIN = {
    "img_joint_proj.": "image_cross_proj.",
    "vision_proj.": "vision_proj.",
    "text_proj.": "text_proj.",
    "itm_head.": "itm_head.",
    "itm_head_i.": "itm_head_i.",
    "mlm_head.predictions.transform.dense.": "mlm_head.dense.",
    "mlm_head.predictions.transform.LayerNorm.": "mlm_head.ln.",
    "mlm_head.predictions.decoder.": "mlm_head.decoder.",
}


def official_key(k: str) -> str | None:
    """Official R2D2 key -> our R2D2Model key; None when it has no counterpart."""
    if k == "temp":
        return "temp"
    if k == "mlm_head.predictions.bias":
        return "mlm_head.decoder.bias"
    for src, dst in _OFFICIAL_PLAIN.items():
        if k.startswith(src):
            return dst + k[len(src) :]
    if k.startswith("visual_encoder."):
        t = clip_vision_key(k[len("visual_encoder.") :])
        return None if t is None else "visual." + t
    if k.startswith("text_encoder."):
        t = bert_key(k[len("text_encoder.") :])
        return None if t is None else "text." + t
    for src, dst in (("text_joint_layer.", "text_cross."), ("img_joint_layer.", "image_cross.")):
        if k.startswith(src) and not k.startswith(src + "embeddings."):
            t = bert_key(k[len(src) :])
            return None if t is None else dst + t
    return None


def _count(sd, pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def official_heads(config: dict | None) -> tuple[int, int] | None:
    """``(vision heads, text heads)`` from a checkpoint's own config, or None when it does not say
    both: the weights' shapes cannot tell the head count (a 1024-wide encoder may have 16 heads
    of 64 or 8 of 128; every tensor has the same shape). Read from r2d2's layout (``vision.heads``,
    ``text.heads``, also under ``model``) or Hugging Face's (``vision_config`` / ``text_config``
    ``.num_attention_heads``)."""
    if not isinstance(config, dict):
        return None
    for c in (config, config.get("model"), config.get("model_config")):
        if not isinstance(c, dict):
            continue
        found = []
        for ours, hf in (("vision", "vision_config"), ("text", "text_config")):
            a, b = c.get(ours), c.get(hf)
            n = a.get("heads") if isinstance(a, dict) else None
            n = (
                n
                if n is not None
                else (b.get("num_attention_heads") if isinstance(b, dict) else None)
            )
            found.append(n)
        if all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in found):
            return found[0], found[1]
    return None


def infer_official_config(
    sd: dict[str, torch.Tensor], heads: tuple[int, int] | None = None
) -> ModelConfig:
    """A ModelConfig from an official checkpoint's shapes. ``heads`` = (vision, text) head counts,
    which shapes cannot tell: pass them (:func:`official_heads` of the checkpoint's config);
    without, heads = width / 64 (ViT's and BERT's size), a guess that ``r2d2 convert`` does not
    make (it requires ``--preset`` or a config that says)."""
    # CLIPVisionModel's keys carry "vision_model."; accept a bare vision transformer too.
    v = (
        "visual_encoder.vision_model."
        if any(k.startswith("visual_encoder.vision_model.") for k in sd)
        else "visual_encoder."
    )
    t = "text_encoder."
    try:
        width = sd[v + "embeddings.class_embedding"].numel()
        patch = sd[v + "embeddings.patch_embedding.weight"].shape[-1]
        npos = sd[v + "embeddings.position_embedding.weight"].shape[0]
        vocab, tw = sd[t + "embeddings.word_embeddings.weight"].shape
        inter = sd[t + "encoder.layer.0.intermediate.dense.weight"].shape[0]
        v_inter = sd[v + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        embed = sd["vision_proj.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an official R2D2 checkpoint: key {e} missing") from None
    vh, th = heads if heads is not None else (max(1, width // 64), max(1, tw // 64))
    for what, w, h in (("vision", width, vh), ("text", tw, th)):
        if w % h:
            raise ValueError(
                f"the checkpoint's config says {h} {what} attention heads, which do not "
                f"divide its width {w}"
            )
    vc = VisionConfig(
        image_size=math.isqrt(npos - 1) * patch,
        patch_size=patch,
        width=width,
        layers=_count(sd, re.escape(v) + r"encoder\.layers\.(\d+)\."),
        heads=vh,
        mlp_ratio=v_inter / width,
    )
    tc = TextConfig(
        vocab_size=vocab,
        width=tw,
        layers=_count(sd, r"text_encoder\.encoder\.layer\.(\d+)\."),
        heads=th,
        intermediate=inter,
        max_positions=sd[t + "embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd[t + "embeddings.token_type_embeddings.weight"].shape[0],
    )
    has_mlm = any(k.startswith("mlm_head.") for k in sd)
    return ModelConfig(
        vision=vc,
        text=tc,
        embed_dim=embed,
        max_text_len=min(64, tc.max_positions),
        cross_layers=_count(sd, r"text_joint_layer\.encoder\.layer\.(\d+)\."),
        mlm_head=has_mlm,
        tie_mlm_embeddings=False,
    )


def load_official(cls, path, config: ModelConfig | None = None, kernels=None, strict: bool = False):
    """Build ``cls`` (R2D2Model) from an official R2D2 checkpoint; ``model.load_report`` lists
    missing / unexpected / unused keys (``strict`` raises on missing or unexpected). Without
    ``config`` the shapes decide, the head counts coming from the checkpoint's own config when it
    has one (:func:`official_heads`), else width / 64."""
    sd, own = read_checkpoint_file(path)
    model = cls(config or infer_official_config(sd, official_heads(own)), kernels)
    report = LoadReport()
    mapped, sources = _map(sd, official_key, _UNUSED_OFFICIAL, report)
    _assign(model, mapped, report, sources)
    return _finish(model, report, strict, "from_official")
