"""R2D2Captioner: image captioning with what R2D2 pre-training learned (BLIP-style decoder).

    image tokens  V = vit(images)                                        [B, 1+N, Wv]
    caption       x = embed(ids)   -> text layers (causal self-attention)
                    -> decoder layers (causal self-attention, cross-attention to all of V)
    next token    logits = lm_head(x)      (decoder weight tied to the word embeddings)

Where the weights come from (:meth:`R2D2Captioner.from_r2d2`): the ViT and the text encoder are
R2D2's; the decoder layers are a *copy* of the text-image cross encoder (``text_cross``), whose
layers already have a cross-attention sub-layer over image tokens; the LM head's transform
(dense / LN / bias) is the MLM head's when the checkpoint has one. ``vision_proj`` is kept
(frozen) so that the fine-tuned image encoder still gives R2D2 image embeddings: the evaluation's
nearest-image baseline retrieves with them.

Copy, not share: the captioner holds its own decoder weights initialised from the ITM cross
encoder rather than the cross encoder itself. Captioning fine-tunes without the ITM loss, so a
shared module would keep nothing but a tie to weights nobody trains with the ITM objective any
more; a copy keeps the captioner a self-contained model (its own ``save_pretrained`` folder) and
leaves the R2D2 checkpoint it started from untouched for retrieval and matching.

Decoding runs incrementally with a KV cache (:class:`DecodeState`): per layer, the self-attention
keys/values grow by one row per step and the cross-attention keys/values of the image tokens are
computed once, so a step costs one query row, never the whole prefix again.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from r2d2 import kernels as K
from r2d2.engine.model.bert import CrossEncoder, MLMHead, TextEncoder
from r2d2.engine.model.config import ModelConfig
from r2d2.engine.model.layers import ModelPlumbing, as_bool_mask
from r2d2.engine.model.r2d2 import CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME
from r2d2.engine.model.vit import VisionTransformer

MODEL_TYPE = "r2d2-captioner"


class R2D2Captioner(ModelPlumbing):
    """``forward(images, input_ids, attention_mask) -> logits [B, L, vocab]``: logits at
    position t predict token t+1 from the tokens <= t and the whole image.

    ``config`` is the R2D2 :class:`ModelConfig` (``cross_layers`` decoder layers, which must be
    > 0); ``caption`` the :class:`~r2d2.engine.tasks.caption.config.CaptionConfig` saved with the
    model (the prompt and the default decoding settings)."""

    def __init__(
        self,
        config: ModelConfig,
        caption=None,
        kernels: K.KernelConfig | None = None,
        tokenizer=None,
    ):
        super().__init__()
        from r2d2.engine.tasks.caption.config import CaptionConfig

        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if not config.has_cross:
            raise ValueError(
                "captioning decodes with the text-image cross encoder's layers; this model has "
                "cross_layers=0 (PRD2): use an R2D2 checkpoint with cross encoders"
            )
        self.config = config
        self.caption = caption if caption is not None else CaptionConfig()
        self.kernels = kernels or K.KernelConfig()
        self.tokenizer = tokenizer
        vc, tc = config.vision, config.text
        self.visual = VisionTransformer(vc, self.kernels)
        self.vision_proj = nn.Linear(vc.width, config.embed_dim)
        self.text = TextEncoder(tc, self.kernels)
        self.decoder = CrossEncoder(tc, config.cross_layers, vc.width, self.kernels)
        self.lm_head = MLMHead(tc)
        self.lm_head.decoder.weight = self.text.word_embed.weight  # tied (BERT / BLIP)
        from r2d2.engine.model.r2d2 import _init_weights

        self.apply(lambda m: _init_weights(m, config.initializer_range))
        # only the nearest-image baseline reads it: not trained (and no unused DDP parameter)
        self.vision_proj.requires_grad_(False)
        self.set_activation_checkpointing(config.activation_checkpointing)

    # ------------------------------------------------------------------ plumbing
    def unsharded_twin(self, kernels: K.KernelConfig | None = None) -> R2D2Captioner:
        """A new captioner of this architecture and caption settings with ordinary parameters
        (FSDP's export gathers the shards into it); the tokenizer is shared."""
        return type(self)(
            self.config, self.caption, kernels=kernels or self.kernels, tokenizer=self.tokenizer
        )

    @property
    def device(self) -> torch.device:
        return self.vision_proj.weight.device

    @property
    def layers(self) -> list[nn.Module]:
        """Every decoder-side layer in order: the text layers, then the cross layers."""
        return [*self.text.layers, *self.decoder.layers]

    @classmethod
    def from_r2d2(cls, model: nn.Module, caption=None) -> R2D2Captioner:
        """A captioner initialised from an R2D2 model (its config, kernels and tokenizer): ViT,
        ``vision_proj`` and text encoder as they are, decoder = a copy of ``text_cross``, LM
        head transform = the MLM head's when there is one (else BERT's init)."""
        cap = cls(model.config, caption, model.kernels, getattr(model, "tokenizer", None))
        cap.visual.load_state_dict(model.visual.state_dict())
        cap.vision_proj.load_state_dict(model.vision_proj.state_dict())
        cap.text.load_state_dict(model.text.state_dict())
        cap.decoder.load_state_dict(model.text_cross.state_dict())
        if getattr(model, "mlm_head", None) is not None:
            head = {k: v for k, v in model.mlm_head.state_dict().items() if k != "decoder.weight"}
            cap.lm_head.load_state_dict(head, strict=False)
        return cap.to(next(model.parameters()).device)

    # ------------------------------------------------------------------ encoders
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """ViT token states ``[B, 1+N, Wv]``."""
        return self.visual(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """R2D2 image embeddings ``[B, E]`` (L2-normalised, fp32) of the captioner's ViT."""
        return F.normalize(self.vision_proj(self.visual(images)[:, 0]).float(), dim=-1)

    def embed(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Word + position (``start``, ``start + 1``, ...) + type embeddings -> LN -> dropout."""
        t = self.text
        L = input_ids.shape[1]
        if start + L > t.cfg.max_positions:
            raise ValueError(
                f"caption positions {start}..{start + L - 1} exceed text.max_positions="
                f"{t.cfg.max_positions}"
            )
        pos = torch.arange(start, start + L, device=input_ids.device)
        x = t.word_embed(input_ids) + t.pos_embed(pos)[None] + t.type_embed.weight[0]
        return t.drop(t.embed_ln(x))

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_tokens: torch.Tensor | None,
        image_mask: torch.Tensor | None = None,
        cache: list[dict] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Decoder states ``[B, L, W]`` of the tokens ``input_ids`` at positions ``start...``.
        With ``cache`` (one dict per layer, see :class:`DecodeState`) the earlier positions come
        from the cache and ``image_tokens`` is needed on the first call only."""
        if attention_mask is not None:
            attention_mask = as_bool_mask(attention_mask, tuple(input_ids.shape), "attention_mask")
        x = self.embed(input_ids, start)
        nt = len(self.text.layers)
        for i, layer in enumerate(self.text.layers):
            x = layer(x, attention_mask, causal=True, cache=None if cache is None else cache[i])
        for i, layer in enumerate(self.decoder.layers):
            c = None if cache is None else cache[nt + i]
            x = layer(x, attention_mask, image_tokens, image_mask, causal=True, cache=c)
        return x

    def forward(self, images, input_ids, attention_mask=None) -> torch.Tensor:
        """Next-token logits ``[B, L, vocab]`` (teacher forcing, causal)."""
        x = self.hidden(input_ids, attention_mask, self.image_tokens(images))
        return self.lm_head(x)

    # ------------------------------------------------------------------ text
    def prompt_ids(self, prompt: str | None = None) -> list[int]:
        """[CLS] followed by the prompt's tokens (``caption.prompt`` by default): what every
        caption starts from."""
        tok = self._require_tokenizer()
        prompt = self.caption.prompt if prompt is None else prompt
        ids = prompt_token_ids(tok, prompt)
        return [tok.cls_id, *ids]

    def detokenize(self, ids: list[int]) -> str:
        return detokenize(self._require_tokenizer(), ids)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                "the captioner has no tokenizer: set model.tokenizer = "
                "r2d2.engine.tokenizer.build_tokenizer(...)"
            )
        return self.tokenizer

    @torch.no_grad()
    def generate(self, images: torch.Tensor, options=None, **overrides) -> list[str]:
        """Captions of ``images [B, 3, H, W]`` decoded with ``options`` (a CaptionConfig; default
        the model's own ``caption``; keyword overrides such as ``strategy="greedy"`` win)."""
        from r2d2.engine.tasks.caption.decoding import decode_captions

        return decode_captions(self, images, options, **overrides)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str) -> None:
        """``config.json`` (model_type r2d2-captioner, the R2D2 model config and the caption
        settings) + ``model.safetensors`` (+ ``vocab.txt`` when a tokenizer is attached)."""
        from dataclasses import asdict

        from safetensors.torch import save_model

        os.makedirs(path, exist_ok=True)
        d = {
            "model_type": MODEL_TYPE,
            "model": self.config.to_dict(),
            "caption": asdict(self.caption),
        }
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, ensure_ascii=False)
        save_model(self, os.path.join(path, WEIGHTS_NAME))  # handles the tied LM decoder
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_vocab"):
            self.tokenizer.save_vocab(os.path.join(path, VOCAB_NAME))

    @classmethod
    def from_pretrained(cls, path: str, kernels: K.KernelConfig | None = None) -> R2D2Captioner:
        """A folder written by :meth:`save_pretrained`; an R2D2 ``save_pretrained`` folder (our
        runs, ``r2d2 convert official`` output) gives a captioner initialised from it by
        :meth:`from_r2d2` (not yet fine-tuned)."""
        from safetensors.torch import load_model

        from r2d2.engine.tasks.caption.config import CaptionConfig

        cfg_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(
                f"{cfg_path} not found (expected a save_pretrained folder of a captioner)"
            )
        with open(cfg_path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError(f"{cfg_path}: not a model config")
        if d.get("model_type") != MODEL_TYPE:  # an R2D2 model: start a captioner from it
            from r2d2.engine.model.r2d2 import R2D2Model

            return cls.from_r2d2(R2D2Model.from_pretrained(path, kernels))
        model = cls(
            ModelConfig.from_dict(d["model"]), CaptionConfig(**d.get("caption", {})), kernels
        )
        load_model(model, os.path.join(path, WEIGHTS_NAME))
        vocab = os.path.join(path, VOCAB_NAME)
        if os.path.isfile(vocab):
            from r2d2.engine.tokenizer import build_tokenizer

            model.tokenizer = build_tokenizer(vocab, max_length=model.config.max_text_len)
        return model


class DecodeState:
    """Incremental decoding of a batch of rows (images, or beams of images) with a KV cache.

    ``step(ids [N, T]) -> logits [N, vocab]`` (fp32) of the last new position: the first call
    feeds the prefix ([CLS] + prompt) and projects the image tokens into the cross-attention
    caches; every later call feeds one token per row against the cached keys/values.
    ``reorder(index [N'])`` keeps rows ``index`` of the self-attention caches (beam search); the
    cross-attention caches are selected too, so ``index`` may also repeat rows (one image ->
    several beams)."""

    def __init__(self, model: R2D2Captioner, image_tokens: torch.Tensor) -> None:
        self.model, self.image = model, image_tokens
        self.cache: list[dict] = [{} for _ in model.layers]
        self.length = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.hidden(
            ids, None, self.image if self.length == 0 else None, cache=self.cache, start=self.length
        )
        self.length += ids.shape[1]
        self.image = None
        return self.model.lm_head(x[:, -1]).float()

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.cache:
            for part in layer.values():
                for key in ("k", "v"):
                    if key in part:
                        part[key] = part[key].index_select(0, index)
        if self.image is not None:
            self.image = self.image.index_select(0, index)


# ---------------------------------------------------------------------- tokens <-> text
def prompt_token_ids(tok, prompt: str) -> list[int]:
    """The prompt's word pieces (no [CLS] / [SEP])."""
    if not prompt:
        return []
    enc = tok._tok.encode(prompt, add_special_tokens=False) if hasattr(tok, "_tok") else None
    if enc is None:
        enc = tok.encode(prompt, add_special_tokens=False)
    return list(enc.ids)


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (
        0x4E00 <= o <= 0x9FFF
        or 0x3400 <= o <= 0x4DBF
        or 0x3000 <= o <= 0x303F  # CJK punctuation
        or 0xFF00 <= o <= 0xFFEF  # full-width forms
        or 0xF900 <= o <= 0xFAFF
    )


def detokenize(tok, ids: list[int]) -> str:
    """Word pieces -> text the way Chinese is written: no spaces between CJK characters,
    ``##`` pieces glued to their word, other words separated by one space; special tokens
    dropped."""
    special = set(getattr(tok, "special_ids", ()))
    vocab = tok.vocab
    out = ""
    for i in ids:
        if i in special or not 0 <= i < len(vocab):
            continue
        t = vocab[i]
        if t.startswith("##") and len(t) > 2:
            out += t[2:]
        elif not out or _is_cjk(t[0]) or _is_cjk(out[-1]):
            out += t
        else:
            out += " " + t
    return out
