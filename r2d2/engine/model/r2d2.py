"""R2D2: dual encoders for pre-ranking, two cross encoders with ITM heads for ranking.

    image tokens  V = vit(images)                   [B, 1+N, Wv]   global: V[:, 0] (before ln_post)
    text tokens   T = bert(ids, mask)               [B, L, Wt]     global: T[:, 0] ([CLS])
    embeddings    normalize(vision_proj(V[:,0])), normalize(text_proj(T[:,0]))      [B, E]
    text-image    X = text_cross(T | V)             queries: text states, keys: image tokens
    image-text    Y = image_cross(image_cross_proj(V) | T)   queries: projected image tokens
    ITM           itm_head(X[:, 0]), itm_head_i(Y[:, 0])   2-way logits each; score = mean of p(match)
    temperature   t = temp.clamp(min, max), logit scale = 1 / t (the objective also clamps temp in place)

Parameter names follow the official release where that costs nothing; ``hf_io`` maps the official
(``visual_encoder.*``, ``text_encoder.*``, ``text_joint_layer.*``, ...) and HF layouts onto them.
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
from r2d2.engine.model.vit import VisionTransformer

CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME = "config.json", "model.safetensors", "vocab.txt"


class R2D2Model(ModelPlumbing):
    def __init__(self, config: ModelConfig, kernels: K.KernelConfig | None = None, tokenizer=None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        # One KernelConfig object shared by every attention module; set_kernels swaps it everywhere.
        self.kernels = kernels or K.KernelConfig()
        self.tokenizer = tokenizer
        vc, tc = config.vision, config.text
        self.visual = VisionTransformer(vc, self.kernels)
        self.text = TextEncoder(tc, self.kernels)
        self.vision_proj = nn.Linear(vc.width, config.embed_dim)
        self.text_proj = nn.Linear(tc.width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temperature_init)))
        self.text_cross = self.image_cross = self.mlm_head = None
        if config.has_cross:
            self.text_cross = CrossEncoder(tc, config.cross_layers, vc.width, self.kernels)
            self.image_cross_proj = nn.Linear(vc.width, tc.width)
            self.image_cross = CrossEncoder(tc, config.cross_layers, tc.width, self.kernels)
            self.itm_head = nn.Linear(tc.width, 2)
            self.itm_head_i = nn.Linear(tc.width, 2)
            if config.mlm_head:
                self.mlm_head = MLMHead(tc)
                if config.tie_mlm_embeddings:
                    self.mlm_head.decoder.weight = self.text.word_embed.weight
        self.apply(lambda m: _init_weights(m, config.initializer_range))
        self.set_activation_checkpointing(config.activation_checkpointing)

    # ------------------------------------------------------------------ plumbing
    def unsharded_twin(self, kernels: K.KernelConfig | None = None) -> R2D2Model:
        """A new model of this architecture with ordinary parameters (FSDP's export gathers
        the shards into it); the tokenizer is shared."""
        return type(self)(self.config, kernels=kernels or self.kernels, tokenizer=self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.temp.device

    def logit_scale(self) -> torch.Tensor:
        """1 / temperature, the temperature clamped to [temperature_min, temperature_max]."""
        return 1.0 / self.temp.clamp(self.config.temperature_min, self.config.temperature_max)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp the ``temp`` parameter itself into [temperature_min, temperature_max] (ALBEF's
        ``temp.clamp_``). The clamp inside ``logit_scale`` alone has zero gradient outside the
        range, so an optimizer step that overshoots a bound would leave ``temp`` there for good
        while AdamW's momentum keeps pushing it; clamping the value first keeps the gradient
        alive (clamp's gradient passes at the bounds). The pre-training objective calls this at
        the start of every forward. In place and identical on every rank (the temperature is
        replicated under DDP and left unsharded by FSDP2), so the ranks stay in step."""
        self.temp.clamp_(self.config.temperature_min, self.config.temperature_max)

    def _require_cross(self, what: str) -> None:
        if not self.config.has_cross:
            raise RuntimeError(
                f"{what} needs the cross encoders; this model has cross_layers=0 (PRD2)"
            )

    # ------------------------------------------------------------------ encoders
    def image_tokens(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """ViT token states ``[B, 1+N, Wv]``; with ``keep`` (visible patch indices ``[B, K]``, FgD's
        masked student view) only the class token and those patches: ``[B, 1+K, Wv]``."""
        return self.visual(images, keep)

    def text_tokens(self, input_ids, attention_mask=None) -> torch.Tensor:
        """BERT token states ``[B, L, Wt]``."""
        return self.text(input_ids, attention_mask)

    def image_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(tokens[:, 0]).float(), dim=-1)

    def text_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(tokens[:, 0]).float(), dim=-1)

    def check_tokenizer(self) -> None:
        """The attached tokenizer must not produce ids beyond the embedding table."""
        n = getattr(self.tokenizer, "vocab_size", None)
        if n is not None and n > self.config.text.vocab_size:
            raise ValueError(
                f"the attached tokenizer has {n} tokens but text.vocab_size="
                f"{self.config.text.vocab_size}; use a matching vocab or model config"
            )

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError(
                "texts given as strings need a tokenizer: set model.tokenizer = "
                "r2d2.engine.tokenizer.build_tokenizer(...) or pass input_ids"
            )
        self.check_tokenizer()
        enc = self.tokenizer(list(texts))
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _text_inputs(self, texts_or_ids, attention_mask):
        if isinstance(texts_or_ids, (list, tuple)) and all(
            isinstance(t, str) for t in texts_or_ids
        ):
            return self.tokenize(texts_or_ids)
        if attention_mask is None and isinstance(texts_or_ids, torch.Tensor):
            attention_mask = torch.ones_like(texts_or_ids, dtype=torch.bool)
        return texts_or_ids, attention_mask

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> L2-normalised ``[N, embed_dim]`` (fp32)."""
        return self.image_embed(self.image_tokens(images))

    def encode_text(self, texts, attention_mask=None) -> torch.Tensor:
        """token ids ``[N, L]`` (+ mask) or ``list[str]`` -> L2-normalised ``[N, embed_dim]`` (fp32)."""
        ids, mask = self._text_inputs(texts, attention_mask)
        return self.text_embed(self.text_tokens(ids, mask))

    # ------------------------------------------------------------------ cross encoders
    def text_image_states(
        self, text_tokens, text_mask, image_tokens, image_mask=None
    ) -> torch.Tensor:
        """Text-image cross encoder: text states attend to image tokens -> ``[B, L, Wt]``."""
        self._require_cross("text_image_states")
        return self.text_cross(
            text_tokens,
            as_bool_mask(text_mask, text_tokens.shape[:2], "text_mask"),
            image_tokens,
            image_mask,
        )

    def image_text_states(
        self, image_tokens, text_tokens, text_mask, image_mask=None
    ) -> torch.Tensor:
        """Image-text cross encoder: projected image tokens attend to text -> ``[B, 1+N, Wt]``."""
        self._require_cross("image_text_states")
        return self.image_cross(
            self.image_cross_proj(image_tokens),
            image_mask,
            text_tokens,
            as_bool_mask(text_mask, text_tokens.shape[:2], "text_mask"),
        )

    def itm_logits(self, image_tokens, text_tokens, text_mask, image_mask=None):
        """Both heads' 2-way logits for row-wise pairs: ``(text-image [B, 2], image-text [B, 2])``;
        class 1 = match."""
        if image_tokens.shape[0] != text_tokens.shape[0]:
            raise ValueError(
                f"itm_logits pairs rows: {image_tokens.shape[0]} images vs "
                f"{text_tokens.shape[0]} texts"
            )
        x = self.text_image_states(text_tokens, text_mask, image_tokens, image_mask)
        y = self.image_text_states(image_tokens, text_tokens, text_mask, image_mask)
        return self.itm_head(x[:, 0]).float(), self.itm_head_i(y[:, 0]).float()

    def itm_score(self, images, texts, attention_mask=None) -> torch.Tensor:
        """Match probability ``[N]`` of row-wise pairs, the two heads' p(match) averaged."""
        ids, mask = self._text_inputs(texts, attention_mask)
        lt, li = self.itm_logits(self.image_tokens(images), self.text_tokens(ids, mask), mask)
        return (lt.softmax(-1)[:, 1] + li.softmax(-1)[:, 1]) / 2

    def forward(self, images, input_ids, attention_mask=None):
        """Embeddings of both modalities: ``(image_emb [B, E], text_emb [B, E])``."""
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str) -> None:
        """``config.json`` + ``model.safetensors`` (+ ``vocab.txt`` when a tokenizer is attached)."""
        from safetensors.torch import save_model

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump({"model_type": "r2d2", **self.config.to_dict()}, f, indent=2)
        save_model(self, os.path.join(path, WEIGHTS_NAME))  # handles the tied MLM decoder
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_vocab"):
            self.tokenizer.save_vocab(os.path.join(path, VOCAB_NAME))

    @classmethod
    def from_pretrained(cls, path: str, kernels: K.KernelConfig | None = None) -> R2D2Model:
        from safetensors.torch import load_model

        cfg_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(
                f"from_pretrained: {cfg_path} not found (expected a save_pretrained directory)"
            )
        with open(cfg_path) as f:
            d = json.load(f)
        if isinstance(d, dict) and d.get("model_type") == "r2d2-captioner":
            raise ValueError(
                f"{path} holds a captioner (model_type r2d2-captioner), not an R2D2 model: "
                "load it with R2D2Captioner.from_pretrained (r2d2 caption, r2d2 eval caption)"
            )
        d.pop("model_type", None)
        model = cls(ModelConfig.from_dict(d), kernels)
        load_model(model, os.path.join(path, WEIGHTS_NAME))
        vocab = os.path.join(path, VOCAB_NAME)
        if os.path.isfile(vocab):
            from r2d2.engine.tokenizer import build_tokenizer

            model.tokenizer = build_tokenizer(vocab, max_length=model.config.max_text_len)
        return model

    @classmethod
    def from_official(
        cls, path, config: ModelConfig | None = None, kernels=None, strict: bool = False
    ):
        """Build from an official R2D2 release checkpoint (a path or a state dict); see
        ``hf_io.load_official``. The key report is kept on ``model.load_report``."""
        from r2d2.engine.hf_io import load_official

        return load_official(cls, path, config=config, kernels=kernels, strict=strict)


def _init_weights(m: nn.Module, std: float = 0.02) -> None:
    # BERT's init (normal std, zero bias, LN = identity); CLIP's class/position init is in the ViT.
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
