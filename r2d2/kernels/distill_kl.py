"""Distillation KL (placeholder for the foundation op; the full op lands with its kernels)."""

from __future__ import annotations

import torch

from r2d2.kernels.dispatch import OpSpec, register_op, resolve


def distill_kl_ref(student_logits, teacher_logits, temperature=1.0, reduction="batchmean"):
    t = temperature
    s = torch.log_softmax(student_logits.float() / t, -1)
    p = torch.softmax(teacher_logits.detach().float() / t, -1)
    kl = (p * (torch.log(p.clamp_min(1e-30)) - s)).sum(-1) * t * t
    kl = kl.reshape(-1)
    return kl.mean() if reduction == "batchmean" else kl


SPEC = register_op(OpSpec(name="distill_kl", backends=("eager",)))


def distill_kl(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean",
               backend="auto"):
    resolve("distill_kl", backend, student_logits.device)
    return distill_kl_ref(student_logits, teacher_logits, temperature, reduction)
