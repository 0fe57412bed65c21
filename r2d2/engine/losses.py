"""R2D2 pre-training objectives: GCPR, FGR, MLM, TgD (EMA teacher targets), FgD (masked-input
feature distillation); ``R2D2ForPretraining(model, LossConfig(...))(batch)`` returns every term.

Per rank, local batch b, global batch B (gathered over ``group``), embeddings normalised:

  gcpr_loss   r2d2.kernels.contrastive_loss(I, T, 1/temp, image_ids, teacher feats, alpha,
              mode=gcpr_mode): the multi-positive soft-target CE of i2t and t2i over the global
              batch; with TgD the targets are (1 - alpha) * hard + alpha * softmax(teacher
              similarity * s).
  fgr_loss    ITM through both cross encoders on 3b pairs r: b positives (y_r = 1), b (image,
              hard-negative text), b (hard-negative image, text) (y_r = 0); negatives come from
              the same contrastive pass (sampled from softmax of the global similarity, same id
              excluded); a pair whose negative does not exist has weight 0. Per head, with the
              class weights w_r = [1, 2][y_r] of the official code (times that validity):
                  CE_w = sum_r w_r CE(onehot(y_r), student_r) / sum_r w_r
              fgr_loss = the two heads' mean of CE_w, times (1 - alpha) with TgD.
  tgd_fgr_loss (TgD) alpha * the two heads' mean of
                  KL_w = sum_r w_r KL(p_teacher_r || p_student_r) / sum_r w_r
              (r2d2.kernels.distill_kl per row, the same weights). Since KL = soft-CE - H(teacher),
              fgr_loss + tgd_fgr_loss = sum_r w_r CE(q_r, student_r) / sum_r w_r - alpha * (a
              teacher-only constant), q_r = (1 - alpha) onehot(y_r) + alpha p_teacher_r: exactly
              the gradient of the class-weighted soft-target CE with the mixed targets (with
              tgd_weight = 1), and the hard-only loss at alpha = 0.
  mlm_loss    BERT MLM (15 %, 80/10/10) through the text-image cross encoder attending to the image.
  fgd_loss    the student encodes a masked view: exactly round(fgd_image_mask_ratio * N) patches
              per image are dropped before the ViT blocks (MAE-style, ``keep`` indices: the
              student never sees them and pays only for the rest), and each real text token is
              replaced by [MASK] with probability fgd_text_mask_ratio. Its token states are pulled
              to the teacher's states of the full inputs at the same positions, 1 - cos averaged
              over the image's class token + kept patches and over the caption's valid tokens
              (masked ones included), the two modalities averaged; ``fgd_features="global"``: the
              projected, normalised embeddings (class token / [CLS]) instead.
  loss        = sum of weight * term over the terms switched on.

Every forward first clamps the temperature parameter in place into its range (ALBEF's
``temp.clamp_``; see ``R2D2Model.clamp_temperature_``), so it can never sit beyond a bound where
``logit_scale()``'s clamp would zero its gradient.

Distributed: the GCPR gathers need the same b on every rank, and global hard negatives
(``fgr_negatives="global"``) also gather the text token states, which need the same text length
L. Each step one all-gather of (b, L) (two ints) checks this on every rank, so a mismatch is the
same clear error everywhere instead of a hang or a corrupt gather. Global negatives on other
ranks need their token states: the image and text token states and masks are all-gathered with
gradients. Per rank that holds world * b * ((1 + N) * Wv + L * Wt) extra activations (base,
224 px, L = 64, b = 32, world = 8: 256 * (197 + 64) * 768 * 4 B ~ 205 MB fp32; the same again for
the teacher under TgD, without a graph) and costs one all-gather forward and one all-reduce
backward. ``"local"`` samples the negatives among the rank's own batch (no gather; a second,
b x b, similarity pass).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from r2d2 import kernels as K
from r2d2.dist import dist_info, gather
from r2d2.engine.model import R2D2Model
from r2d2.engine.model.vit import select_tokens
from r2d2.engine.validate import ConfigError, boolean, choice, in_range, is_int, numbers, positive

TERMS = ("gcpr", "fgr", "mlm", "tgd", "fgd")
GCPR_MODES = ("gather", "ring")  # r2d2.kernels.contrastive_loss(mode=...)


@dataclass
class LossConfig:
    """Which objectives run and how. The defaults are the full objective of the framework
    figure: GCPR + FGR + MLM + TgD + FgD.

    The paper's ablation ladder (pre-ranking only -> + ranking -> + TgD -> + FgD) never names
    MLM, although its full model trains it. Our reading: MLM trains the text-image cross
    encoder, so it arrives with the cross encoders, in the "+ ranking" row; the last row is
    then the full objective. Each row adds one switch (configs/ablation_*.yaml, on ``tiny``):

      row                 gcpr  fgr   mlm   tgd   fgd   config
      pre-ranking only    on    off   off   off   off   ablation_1_pre_ranking.yaml (prd2-tiny)
      + ranking (+ MLM)   on    on    on    off   off   ablation_2_ranking.yaml
      + TgD               on    on    on    on    off   ablation_3_tgd.yaml
      + FgD (full)        on    on    on    on    on    ablation_4_fgd.yaml (= the defaults)

    For "+ ranking" without MLM set ``mlm=False`` as well. PRD2 (dual encoders only) is
    ``fgr=False, mlm=False, tgd=True, fgd=False`` (GCPR + TgD; configs/prd2.yaml).

    No teacher feature queue: TgD's GCPR soft targets are the teacher's softmax over the
    *gathered global batch* (B columns, every rank's samples), not over a MoCo/ALBEF-style queue
    of past features. The paper describes global (all-gathered) contrast, not a queue (a queue
    appears only in a reading note of the digest), the official release has no pre-training code
    to settle it, and the global batch is what scales R2D2's negatives: at B = 4096+ the targets
    already span thousands of columns, all computed by the current teacher, while a queue would
    add stale columns outside the fused kernel's one pass (and its O(b + B) memory bound)."""

    gcpr: bool = True
    """global contrastive pre-ranking (ITC over the gathered global batch)"""
    fgr: bool = True
    """fine-grained ranking: ITM with hard negatives through both cross encoders"""
    mlm: bool = True
    """masked language modelling on the text-image cross encoder"""
    tgd: bool = True
    """target-guided distillation: EMA-teacher soft targets for GCPR and FGR"""
    fgd: bool = True
    """feature-guided distillation: masked-input student states pulled to the teacher's"""
    gcpr_weight: float = 1.0
    """weight of gcpr_loss in the total"""
    fgr_weight: float = 1.0
    """weight of fgr_loss in the total"""
    mlm_weight: float = 1.0
    """weight of mlm_loss in the total"""
    tgd_weight: float = 1.0
    """weight of tgd_fgr_loss (the FGR distillation term; GCPR's TgD lives inside gcpr_loss)"""
    fgd_weight: float = 1.0
    """weight of fgd_loss in the total"""
    distill_alpha: float = 0.4
    """TgD mixing: target = (1 - alpha) * hard + alpha * teacher"""
    ema_momentum: float = 0.995
    """teacher <- m * teacher + (1 - m) * student after each optimizer step"""
    fgr_class_weights: list = field(default_factory=lambda: [1.0, 2.0])
    """ITM cross-entropy class weights [negative, positive] (official: [1, 2])"""
    gcpr_mode: str = "gather"
    """how the fused GCPR backends (r2d2.kernels.contrastive_loss ``mode``) see the other ranks'
    features: 'gather' all-gathers them, 'ring' passes them round a ring of isend/irecv with
    O(b d) memory; both are exact, and the eager backend always gathers"""
    fgr_negatives: str = "global"
    """'global': hard negatives from the whole gathered batch (gathers token states with grad;
    every rank must then have the same b and text length L, checked each step); 'local': from
    this rank's batch only"""
    mlm_probability: float = 0.15
    """fraction of real (non-special) text tokens chosen for MLM"""
    mlm_mask_frac: float = 0.8
    """of the chosen tokens, fraction replaced by [MASK]"""
    mlm_random_frac: float = 0.1
    """of the chosen tokens, fraction replaced by a random token (the rest stay unchanged)"""
    fgd_image_mask_ratio: float = 0.25
    """fraction of image patches dropped from the FgD student's input: exactly
    round(ratio * N) per image, chosen uniformly (MAE-style: they never enter the ViT blocks)"""
    fgd_text_mask_ratio: float = 0.15
    """probability that a real (non-special) text token is replaced by [MASK] in the FgD
    student view"""
    fgd_features: str = "tokens"
    """'tokens': per-token encoder states; 'global': the projected, normalised embeddings"""
    mask_token_id: int = 4
    """[MASK] id when the model has no tokenizer attached (project vocab: 4; RoBERTa-wwm: 103)"""
    special_token_ids: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """ids never chosen for MLM/FgD masking when no tokenizer is attached (project vocab)"""
    seed: int = 0
    """seed of the negative sampling and masking streams (offset by step and rank)"""

    def __post_init__(self) -> None:
        boolean("loss", self, *TERMS)
        positive("loss", self, *(f"{n}_weight" for n in TERMS), allow_zero=True)
        in_range(
            "loss",
            self,
            "distill_alpha",
            "mlm_probability",
            "mlm_mask_frac",
            "mlm_random_frac",
            "fgd_image_mask_ratio",
            "fgd_text_mask_ratio",
        )
        in_range("loss", self, "ema_momentum", hi_open=True)
        if self.mlm_mask_frac + self.mlm_random_frac > 1.0:
            raise ConfigError(
                "loss.mlm_mask_frac + loss.mlm_random_frac must be <= 1, got "
                f"{self.mlm_mask_frac} + {self.mlm_random_frac}"
            )
        numbers(
            "loss", "fgr_class_weights", self.fgr_class_weights, 2, "[neg, pos], two numbers > 0"
        )
        if not all(w > 0 for w in self.fgr_class_weights):
            raise ConfigError(
                f"loss.fgr_class_weights={self.fgr_class_weights!r} must be [neg, pos], "
                "two numbers > 0"
            )
        ids = self.special_token_ids
        if not isinstance(ids, (list, tuple)) or not all(is_int(i) and i >= 0 for i in ids):
            raise ConfigError(
                f"loss.special_token_ids={ids!r} must be a list of token ids (ints >= 0)"
            )
        positive("loss", self, "mask_token_id", allow_zero=True, integer=True)
        choice("loss", "gcpr_mode", self.gcpr_mode, GCPR_MODES)
        choice("loss", "fgr_negatives", self.fgr_negatives, ("global", "local"))
        choice("loss", "fgd_features", self.fgd_features, ("tokens", "global"))
        if not any(getattr(self, n) for n in ("gcpr", "fgr", "mlm", "fgd")):
            raise ConfigError(
                "loss: every objective is off; switch on at least one of gcpr, fgr, mlm, fgd"
            )
        if self.fgr and not self.gcpr:
            raise ConfigError(
                "loss.fgr needs loss.gcpr: its hard negatives come from the GCPR similarity"
            )

    @property
    def needs_teacher(self) -> bool:
        return self.tgd or self.fgd


# ---------------------------------------------------------------------- pure loss functions
def weighted_itm_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(logits, labels, weight=class_weights)`` (sum of w[y] CE / sum of w[y]),
    with rows where ``valid`` is False left out (pairs whose negative does not exist)."""
    w = class_weights.to(logits.device, torch.float32)[labels]
    if valid is not None:
        w = w * valid.float()
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


def weighted_itm_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``sum_r w[y_r] KL(softmax(teacher_r) || softmax(student_r)) / sum_r w[y_r]``: the
    per-row KL (``r2d2.kernels.distill_kl``) with ``weighted_itm_ce``'s weights, so that
    ``(1 - a) * weighted_itm_ce + a * weighted_itm_kl`` has the gradient of the weighted CE with
    soft targets ``(1 - a) onehot(y) + a p_teacher``. Rows where ``valid`` is False count 0."""
    w = class_weights.to(student_logits.device, torch.float32)[labels]
    if valid is not None:
        w = w * valid.float()
    kl = K.distill_kl(student_logits, teacher_logits, reduction="none", backend=backend)
    return (w * kl.float()).sum() / w.sum().clamp_min(1e-12)


def mask_tokens(
    input_ids,
    attention_mask,
    probability,
    special_ids,
    mask_id,
    vocab_size,
    mask_frac=0.8,
    random_frac=0.1,
    generator=None,
):
    """BERT masking: choose each real, non-special token with ``probability``; of those replace
    ``mask_frac`` by ``mask_id``, ``random_frac`` by a random id, keep the rest. Returns
    ``(masked_ids, labels)`` with labels -100 where not chosen."""
    dev = input_ids.device
    rand = lambda: torch.rand(input_ids.shape, generator=generator, device="cpu").to(dev)  # noqa: E731
    eligible = attention_mask.bool() & ~torch.isin(
        input_ids, torch.tensor(list(special_ids), device=dev)
    )
    chosen = eligible & (rand() < probability)
    u = rand()
    to_mask = chosen & (u < mask_frac)
    to_rand = chosen & (u >= mask_frac) & (u < mask_frac + random_frac)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator).to(dev)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(to_rand, random_ids, out)
    return out, torch.where(chosen, input_ids, torch.full_like(input_ids, -100))


def cosine_distill(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None = None):
    """Mean over valid rows/tokens of ``1 - cos(student, teacher)`` (teacher detached)."""
    cos = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)
    if valid is None:
        return (1 - cos).mean()
    v = valid.float()
    return ((1 - cos) * v).sum() / v.sum().clamp_min(1.0)


def sample_local_negatives(sim, ids, generator=None):
    """One column per row of the local ``[b, b]`` similarity logits, drawn from its softmax over
    the columns of another id; -1 when none."""
    same = ids[:, None] == ids[None, :]
    p = torch.softmax(sim.detach().float().masked_fill(same, float("-inf")), 1)
    none = same.all(1)
    p = torch.where(none[:, None], torch.ones_like(p), p)
    idx = torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).to(sim.device)
    return torch.where(none, torch.full_like(idx, -1), idx)


# ---------------------------------------------------------------------- the objective module
def _sync_host_step(module: R2D2ForPretraining, incompatible_keys) -> None:
    module._step = int(module.step)  # once per load (resume), not once per step


class R2D2ForPretraining(nn.Module):
    """Student ``model`` + EMA ``teacher`` (None when TgD and FgD are off) + every objective.

    Optimise ``obj.model.parameters()`` (the teacher never requires grad); call ``obj.ema_update()``
    after each optimizer step."""

    def __init__(self, model: R2D2Model, config: LossConfig | None = None, group=None):
        super().__init__()
        config = config or LossConfig()
        if not isinstance(model, R2D2Model):
            raise TypeError(f"model must be an R2D2Model, got {type(model).__name__}")
        if not isinstance(config, LossConfig):
            raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
        if (config.fgr or config.mlm) and not model.config.has_cross:
            raise ValueError(
                "loss.fgr / loss.mlm need the cross encoders, but the model has "
                "cross_layers=0 (prd2): set fgr=False and mlm=False"
            )
        if config.mlm and model.mlm_head is None:
            raise ValueError("loss.mlm=True but the model was built with mlm_head=False")
        self.model, self.config, self.group = model, config, group
        self.teacher = None
        if config.needs_teacher:
            self.teacher = copy.deepcopy(model)
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        # Steps taken in training mode; saved with the objective so a resumed run draws the
        # same negatives and masks. ``_step`` is its host copy: reading the buffer every step
        # would be a GPU->CPU sync (and a torch.compile graph break) per step, so the copy is
        # advanced beside it and refreshed only when a state dict is loaded.
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=True)
        self._step = 0
        self.register_load_state_dict_post_hook(_sync_host_step)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # deterministic targets: no dropout in the teacher
        return self

    @property
    def kernels(self) -> K.KernelConfig:
        return self.model.kernels

    @torch.no_grad()
    def ema_update(self) -> None:
        """teacher = m * teacher + (1 - m) * student (parameters; buffers copied)."""
        if self.teacher is None:
            return
        m = self.config.ema_momentum
        t_params = list(self.teacher.parameters())
        s_params = list(self.model.parameters())
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - m)
        for tb, sb in zip(self.teacher.buffers(), self.model.buffers()):
            tb.copy_(sb)

    def _special(self):
        tok = self.model.tokenizer
        if tok is not None and hasattr(tok, "mask_id"):
            self.model.check_tokenizer()
            return tok.special_ids, tok.mask_id
        return self.config.special_token_ids, self.config.mask_token_id

    def _generator(self, stream: int) -> torch.Generator:
        rank, _ = dist_info(self.group)
        seed = ((self.config.seed * 1_000_003 + self._step) * 131 + rank) * 17 + stream
        return torch.Generator().manual_seed(seed)

    def _check_batch(self, batch):
        for k in ("images", "input_ids", "attention_mask"):
            if k not in batch:
                raise KeyError(
                    f"batch lacks {k!r}; expected images, input_ids, attention_mask, image_ids"
                )
        b = batch["images"].shape[0]
        if batch["input_ids"].shape[0] != b:
            raise ValueError(f"batch: {b} images but {batch['input_ids'].shape[0]} texts")
        ids = batch.get("image_ids")
        if ids is not None and (ids.dim() != 1 or ids.shape[0] != b or ids.is_floating_point()):
            raise ValueError(
                f"batch['image_ids'] must be an integer tensor [b={b}], got "
                f"{tuple(ids.shape)} {ids.dtype}"
            )

    def _check_ranks_agree(self, b: int, L: int, device: torch.device) -> None:
        """Same b on every rank (the GCPR gathers) and, with global FGR negatives, the same L
        (the token-state gathers). Runs on every rank at every step whenever GCPR is on (a
        config-level condition, identical on all ranks), so it cannot deadlock; every rank sees
        every shape and raises the same error."""
        cfg = self.config
        _, world = dist_info(self.group)
        if world == 1 or not cfg.gcpr:
            return
        dev = device if "nccl" in str(dist.get_backend(self.group)) else torch.device("cpu")
        mine = torch.tensor([b, L], dtype=torch.long, device=dev)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=self.group)
        shapes = [tuple(int(x) for x in p.tolist()) for p in parts]
        need_L = cfg.fgr and cfg.fgr_negatives == "global"
        if len({bs for bs, _ in shapes}) > 1 or (need_L and len({n for _, n in shapes}) > 1):
            what = "b and the text length L" if need_L else "b"
            why = (
                (
                    " (fgr_negatives='global' gathers the text token states; "
                    "fgr_negatives='local' lifts the L condition)"
                )
                if need_L
                else ""
            )
            raise ValueError(
                f"loss: every rank must bring the same {what}{why}; per-rank (b, L): "
                f"{shapes}. Give every rank the same batch size and pad texts to a "
                "fixed length (data.max_text_len)"
            )

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        self._check_batch(batch)
        cfg, model = self.config, self.model
        images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"].bool()
        image_ids = batch.get("image_ids")
        self._check_ranks_agree(ids.shape[0], ids.shape[1], images.device)
        model.clamp_temperature_()
        out: dict[str, torch.Tensor] = {}

        V = model.image_tokens(images)
        T = model.text_tokens(ids, mask)
        img_emb, txt_emb = model.image_embed(V), model.text_embed(T)
        s = model.logit_scale()

        tV = tT = None
        if self.teacher is not None:
            with torch.no_grad():
                tV, tT = self.teacher.image_tokens(images), self.teacher.text_tokens(ids, mask)

        neg_t = neg_i = None
        if cfg.gcpr:
            kw = {}
            if cfg.tgd:
                kw = dict(
                    teacher_image_feat=self.teacher.image_embed(tV).to(img_emb.dtype),
                    teacher_text_feat=self.teacher.text_embed(tT).to(txt_emb.dtype),
                    distill_alpha=cfg.distill_alpha,
                )
            res = K.contrastive_loss(
                img_emb,
                txt_emb,
                s,
                image_ids=image_ids,
                group=self.group,
                backend=self.kernels.contrastive,
                mode=cfg.gcpr_mode,
                return_negatives=cfg.fgr,
                check_ranks=False,  # checked above
                seed=cfg.seed * 1_000_003 + self._step if cfg.fgr else None,
                **kw,
            )
            if cfg.fgr:
                out["gcpr_loss"], neg_t, neg_i = (
                    res.loss,
                    res.neg_text_for_image,
                    res.neg_image_for_text,
                )
            else:
                out["gcpr_loss"] = res
        if cfg.fgr:
            out.update(self._fgr(V, T, mask, tV, tT, img_emb, txt_emb, s, image_ids, neg_t, neg_i))
        if cfg.mlm:
            out["mlm_loss"] = self._mlm(V, ids, mask)
        if cfg.fgd:
            out["fgd_loss"] = self._fgd(images, ids, mask, tV, tT)

        total = 0.0
        for name, val in out.items():
            term = "tgd" if name.startswith("tgd") else name.split("_")[0]
            total = total + getattr(cfg, f"{term}_weight") * val
        out["loss"] = total
        if self.training:
            self.step += 1
            self._step += 1
        return out

    # -------------------------------------------------------------- FGR (+ its TgD term)
    def _fgr(self, V, T, mask, tV, tT, img_emb, txt_emb, s, image_ids, neg_t, neg_i):
        cfg, model = self.config, self.model
        b = V.shape[0]
        _rank, world = dist_info(self.group)
        if cfg.fgr_negatives == "local" and world > 1:
            ids_l = image_ids if image_ids is not None else torch.arange(b, device=V.device)
            g = self._generator(1)
            neg_t = sample_local_negatives(s.detach() * img_emb @ txt_emb.t(), ids_l, g)
            neg_i = sample_local_negatives(s.detach() * txt_emb @ img_emb.t(), ids_l, g)
            pool_V, pool_T, pool_m, pool_tV, pool_tT = V, T, mask, tV, tT
        else:  # global indices; world == 1 makes them local
            pool_V, pool_T = gather(V, self.group), gather(T, self.group)
            pool_m = gather(mask, self.group, with_grad=False)
            pool_tV = gather(tV, self.group, with_grad=False) if tV is not None else None
            pool_tT = gather(tT, self.group, with_grad=False) if tT is not None else None
        valid_t, valid_i = neg_t >= 0, neg_i >= 0
        nt, ni = neg_t.clamp_min(0), neg_i.clamp_min(0)

        def pairs(Vs, Ts, pV, pT):
            # rows: b positives, b (image, negative text), b (negative image, text)
            return (
                torch.cat([Vs, Vs, pV[ni]]),
                torch.cat([Ts, pT[nt], Ts]),
                torch.cat([mask, pool_m[nt], mask]),
            )

        pv, pt, pm = pairs(V, T, pool_V, pool_T)
        lt, li = model.itm_logits(pv, pt, pm)
        labels = torch.cat(
            [torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]
        ).to(V.device)
        valid = torch.cat([torch.ones_like(valid_t), valid_t, valid_i])
        cw = torch.tensor(cfg.fgr_class_weights)
        hard = (weighted_itm_ce(lt, labels, cw, valid) + weighted_itm_ce(li, labels, cw, valid)) / 2
        out = {}
        if cfg.tgd:
            a = cfg.distill_alpha
            with torch.no_grad():
                tv, tt, _ = pairs(tV, tT, pool_tV, pool_tT)
                tlt, tli = self.teacher.itm_logits(tv, tt, pm)
            be = self.kernels.distill_kl
            kl = (
                weighted_itm_kl(lt, tlt, labels, cw, valid, be)
                + weighted_itm_kl(li, tli, labels, cw, valid, be)
            ) / 2
            out["fgr_loss"], out["tgd_fgr_loss"] = (1 - a) * hard, a * kl
        else:
            out["fgr_loss"] = hard
        return out

    # -------------------------------------------------------------- MLM
    def _mlm(self, V, ids, mask):
        model = self.model
        special, mask_id = self._special()
        cfg = self.config
        masked, labels = mask_tokens(
            ids,
            mask,
            cfg.mlm_probability,
            special,
            mask_id,
            model.config.text.vocab_size,
            cfg.mlm_mask_frac,
            cfg.mlm_random_frac,
            self._generator(2),
        )
        Tm = model.text_tokens(masked, mask)
        X = model.text_image_states(Tm, mask, V)
        sel = labels != -100
        if not sel.any():  # nothing drawn (tiny batch): a zero that keeps the graph connected
            return model.mlm_head(X[:, :1]).sum() * 0.0
        logits = model.mlm_head(X[sel])
        return F.cross_entropy(logits.float(), labels[sel])

    # -------------------------------------------------------------- FgD
    def fgd_view(self, images, ids, mask):
        """The FgD student's inputs for this step: ``(keep [B, K] visible patch indices (CPU) or
        None when nothing is dropped, masked input_ids)``; reproducible from the step and rank."""
        cfg, model = self.config, self.model
        special, mask_id = self._special()
        g = self._generator(3)
        n = model.config.vision.num_patches
        n_drop = min(n, round(cfg.fgd_image_mask_ratio * n))
        keep = None
        if n_drop:
            order = torch.rand(images.shape[0], n, generator=g).argsort(1)
            keep = order[:, n_drop:].sort(1).values
        ids_m, _ = mask_tokens(
            ids,
            mask,
            cfg.fgd_text_mask_ratio,
            special,
            mask_id,
            model.config.text.vocab_size,
            1.0,
            0.0,
            g,
        )
        return keep, ids_m

    def _fgd(self, images, ids, mask, tV, tT):
        model = self.model
        keep, ids_m = self.fgd_view(images, ids, mask)
        sV, sT = model.image_tokens(images, keep), model.text_tokens(ids_m, mask)
        if keep is not None:
            tV = select_tokens(tV, keep)  # the teacher's states at the positions the student kept
        if self.config.fgd_features == "global":
            return (
                cosine_distill(model.image_embed(sV), self.teacher.image_embed(tV))
                + cosine_distill(model.text_embed(sT), self.teacher.text_embed(tT))
            ) / 2
        return (cosine_distill(sV, tV) + cosine_distill(sT, tT, mask)) / 2
