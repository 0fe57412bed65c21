"""The captioning loss: next-token cross-entropy with label smoothing over the caption tokens.

A batch row is ``[CLS] w1 .. wn [SEP] [PAD]..`` (the trainer's tokenisation). With a prompt
``p1 .. pk`` the decoder reads ``[CLS] p1 .. pk w1 .. wn [SEP]``; logits at position t predict
token t+1 ([CLS] is the BOS, [SEP] the EOS). Scored targets: ``w1 .. wn`` and ``[SEP]``; never
the prompt tokens (they are context, the same in every row), never padding. The loss is the mean
over the scored tokens of the batch (``F.cross_entropy(label_smoothing=...)``).

Truncated captions: the tokenizer cuts a caption longer than ``data.max_text_len`` and still
closes it with [SEP]. That [SEP] is no end of the caption, so it is not scored: the decoder is
never taught to stop where a real caption went on. The loader's tokenisation marks the cut rows
(the batch's ``truncated``); without that mark a row that fills ``data.max_text_len`` counts as
truncated (its [SEP] then goes unscored; raise ``data.max_text_len`` above the longest caption
to have every ending taught).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BATCH_KEYS = ("images", "input_ids", "attention_mask")


class CaptionObjective(nn.Module):
    """``forward(batch) -> {"loss", "caption_loss", "tokens"}``; ``model`` an R2D2Captioner."""

    def __init__(
        self,
        model: nn.Module,
        label_smoothing: float = 0.1,
        prompt_ids: list[int] | tuple = (),
        max_text_len: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = float(label_smoothing)
        self.register_buffer(
            "prompt", torch.tensor(list(prompt_ids), dtype=torch.long), persistent=False
        )
        self.max_text_len = max_text_len

    def truncated(self, batch: dict, lengths: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: the row's caption was cut (its [SEP] is not its end): the batch's
        ``truncated`` (the loader's tokenisation reports it), else every row that fills
        ``max_text_len``."""
        cut = batch.get("truncated")
        if cut is not None:
            return cut.to(device=lengths.device, dtype=torch.bool)
        if self.max_text_len is None:
            return torch.zeros_like(lengths, dtype=torch.bool)
        return lengths >= self.max_text_len

    def inputs_and_targets(self, batch: dict):
        """(ids ``[B, T]``, mask ``[B, T]``, targets ``[B, T-1]``, scored ``[B, T-1]`` bool)."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        lengths = mask.sum(1)
        L = max(int(lengths.max()), 2)
        ids, mask = ids[:, :L], mask[:, :L]
        scored = mask[:, 1:].clone()
        # a truncated row's closing [SEP] (its last real token) is not scored
        cut = self.truncated(batch, lengths)
        if bool(cut.any()):
            rows = cut.nonzero()[:, 0]
            scored[rows, lengths[rows] - 2] = False
        k = self.prompt.numel()
        if k:
            B = ids.shape[0]
            p = self.prompt.to(ids.device)[None].expand(B, k)
            ids = torch.cat([ids[:, :1], p, ids[:, 1:]], 1)
            mask = torch.cat([mask[:, :1], torch.ones_like(p, dtype=torch.bool), mask[:, 1:]], 1)
            # the prompt's own tokens are targets of positions 0..k-1: never scored
            scored = torch.cat([torch.zeros_like(p, dtype=torch.bool), scored], 1)
        return ids, mask, ids[:, 1:], scored

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"CaptionObjective: batch lacks {missing}; needs {list(BATCH_KEYS)}")
        ids, mask, targets, scored = self.inputs_and_targets(batch)
        logits = self.model(batch["images"], ids[:, :-1], mask[:, :-1])
        n = scored.sum()
        loss = F.cross_entropy(
            logits[scored].float(), targets[scored], label_smoothing=self.label_smoothing
        )
        return {"loss": loss, "caption_loss": loss.detach(), "tokens": n.detach().float()}

    def flops_per_sample(self, cfg, image_size: int) -> float:
        """Forward + backward FLOPs of one sample (6 x matmul MACs x 2 / 2: the usual 6 N per
        token for the linear layers, plus the attention score/value products)."""
        from r2d2.engine.model.config import ModelConfig

        mc: ModelConfig = self.model.config
        vc, tc = mc.vision, mc.text
        n_img = (image_size // vc.patch_size) ** 2 + 1
        L = cfg.data.max_text_len + self.prompt.numel() - 1
        hid = round(vc.width * vc.mlp_ratio)
        vit = vc.layers * (n_img * (4 * vc.width**2 + 2 * vc.width * hid) + 2 * n_img**2 * vc.width)
        bert = L * (4 * tc.width**2 + 2 * tc.width * tc.intermediate) + L * L * tc.width
        cross = L * 2 * tc.width**2 + n_img * 2 * vc.width * tc.width + 2 * L * n_img * tc.width
        dec = tc.layers * bert + mc.cross_layers * (bert + cross)
        head = L * (tc.width**2 + tc.width * tc.vocab_size)
        macs = vit + dec + head
        trainable_vit = any(p.requires_grad for p in self.model.visual.parameters())
        return float(2 * macs * 3 if trainable_vit else 2 * (vit + 3 * (dec + head)))
