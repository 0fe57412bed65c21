"""Text-to-image evaluation on held-out pairs, shared by the end-of-run evaluation of
``r2d2 finetune`` (``train.task=t2i``) and ``r2d2 eval t2i``.

Three image sets are scored against the same prompts, in one run, by the same R2D2 evaluator:

    generated        the generator's images for the held-out prompts (its EMA weights)
    unconditional    the same generator, same seeds, sampled with the empty prompt (the null
                     condition): what the images would score if the prompt were ignored
    real             the held-out images of those prompts: the evaluator's ceiling

Each gets R-precision (see :mod:`.metrics`), the mean ITM score, and on synthetic prompts the
attribute agreement and palette-background accuracy. FID and Inception score need local Inception
weights (``t2i.inception_weights``) and torch-fidelity; otherwise they are reported as skipped,
with the reason, in the JSON and on stdout.

Writes ``<out>/t2i_eval.json``, ``<out>/grid.png`` (+ ``grid.txt``) and ``<out>/samples/*.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import torch

from r2d2.engine.data.transforms import eval_transform, to_tensor
from r2d2.engine.tasks.t2i.config import T2IConfig
from r2d2.engine.tasks.t2i.grid import write_grid
from r2d2.engine.tasks.t2i.metrics import (
    attribute_agreement,
    candidate_sets,
    palette_background_accuracy,
    r_precision,
)
from r2d2.engine.tasks.t2i.model import T2IModel, to_pil

REPORT_NAME = "t2i_eval.json"


def held_out_prompts(records, n: int) -> tuple[list[str], list[str], list[str]]:
    """``(prompts, image keys, pool)``: the first ``n`` distinct captions of the held-out records
    with the image of each one's first record, and every distinct held-out caption (the
    R-precision candidate pool), in order of first appearance."""
    first: dict[str, str] = {}
    for r in records:
        text = r.text.strip()
        if text and text not in first:
            first[text] = r.image
    pool = list(first)
    prompts = pool[:n]
    return prompts, [first[p] for p in prompts], pool


def _encode_images(evaluator, images: list, batch: int = 64) -> torch.Tensor:
    """PIL images -> the evaluator's L2-normalised image embeddings, through its eval transform."""
    tf = eval_transform(evaluator.config.vision.image_size)
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([tf(im) for im in images[i : i + batch]]).to(evaluator.device)
        out.append(evaluator.encode_image(x).cpu())
    return torch.cat(out)


def _itm(evaluator, images: list, prompts: list[str], tokenize, batch: int = 64) -> float | None:
    if not evaluator.config.has_cross:
        return None
    tf = eval_transform(evaluator.config.vision.image_size)
    scores = []
    for i in range(0, len(images), batch):
        x = torch.stack([tf(im) for im in images[i : i + batch]]).to(evaluator.device)
        ids, mask = tokenize(prompts[i : i + batch])
        scores.append(evaluator.itm_score(x, ids.to(x.device), mask.to(x.device)).cpu())
    return float(torch.cat(scores).mean())


def fid_and_is(gen_dir: str, real_dir: str, weights: str | None, device: torch.device) -> dict:
    """FID (generated vs real) and Inception score (generated) with torch-fidelity and a local
    Inception weights file, or ``{"skipped": reason}``."""
    if not weights:
        return {
            "skipped": "no Inception weights given (t2i.inception_weights=<local "
            "pt_inception-2015-12-05 .pth>); nothing is downloaded"
        }
    if not os.path.isfile(weights):
        return {"skipped": f"t2i.inception_weights={weights!r}: no such file"}
    try:
        import torch_fidelity
    except ImportError as e:
        return {
            "skipped": f"torch-fidelity is not importable ({e}); it needs torchvision, which "
            "this project does not install (pip install torch-fidelity torchvision matching "
            "your torch)"
        }
    m = torch_fidelity.calculate_metrics(
        input1=gen_dir,
        input2=real_dir,
        fid=True,
        isc=True,
        cuda=device.type == "cuda",
        verbose=False,
        feature_extractor_weights_path=weights,
    )
    return {
        "fid": float(m["frechet_inception_distance"]),
        "inception_score": float(m["inception_score_mean"]),
        "inception_score_std": float(m["inception_score_std"]),
    }


def evaluate_t2i(
    generator: T2IModel,
    evaluator,
    records,
    cfg: T2IConfig,
    tokenize: Callable,
    load_image: Callable,
    out: str,
    say: Callable[[str], None] = print,
) -> dict:
    """Generate for the held-out prompts of ``records``, score the three image sets (module
    docstring) with ``evaluator`` (an R2D2Model), write the report, grid and samples into
    ``out``; returns the report. ``tokenize`` is the evaluator's ``texts -> (ids, mask)``,
    ``load_image`` a held-out key -> PIL image at the generator's resolution."""
    prompts, keys, pool = held_out_prompts(records, cfg.eval_prompts)
    if not prompts:
        raise ValueError("no held-out prompt to generate for")
    t0 = time.time()
    gen = generator.sample(prompts, batch_size=cfg.eval_batch_size)
    unc = generator.sample([""] * len(prompts), batch_size=cfg.eval_batch_size)
    t_gen = time.time() - t0
    real = [load_image(k).convert("RGB") for k in keys]
    sets = {"generated": to_pil(gen), "unconditional": to_pil(unc), "real": real}
    real_t = torch.stack([to_tensor(im) for im in real])
    pixels = {"generated": gen, "unconditional": unc, "real": real_t}
    with torch.no_grad():
        ids, mask = tokenize(pool)
        text_emb = evaluator.encode_text(ids.to(evaluator.device), mask.to(evaluator.device)).cpu()
        index = {p: i for i, p in enumerate(pool)}
        cands = candidate_sets(
            [index[p] for p in prompts], len(pool), cfg.eval_candidates, cfg.seed
        )
        results = {}
        for name, ims in sets.items():
            rp, chance, top = r_precision(_encode_images(evaluator, ims), text_emb, cands)
            results[name] = {
                "r_precision": 100 * rp,
                "itm_score": _itm(evaluator, ims, prompts, tokenize),
                "attributes_top1": attribute_agreement(prompts, pool, cands, top),
                "palette_background_acc": palette_background_accuracy(pixels[name], prompts),
            }
    n_cand = [len(c) for c in cands]
    report = {
        "evaluation": "text-to-image on held-out prompts",
        "n_prompts": len(prompts),
        "pool": len(pool),
        "candidates_per_image": n_cand[0] if len(set(n_cand)) == 1 else n_cand,
        "chance_r_precision": 100 * chance,
        "sampler": {
            "kind": cfg.sampler,
            "steps": cfg.steps,
            "guidance": cfg.guidance,
            "seed": cfg.seed,
        },
        "seconds_sampling": t_gen,
        **results,
    }
    os.makedirs(out, exist_ok=True)
    samples = os.path.join(out, "samples")
    os.makedirs(samples, exist_ok=True)
    for i, im in enumerate(sets["generated"]):
        im.save(os.path.join(samples, f"{i:03d}.png"))
    for i, im in enumerate(sets["unconditional"][: cfg.grid_prompts]):
        im.save(os.path.join(samples, f"uncond_{i:03d}.png"))
    k, per = min(cfg.grid_prompts, len(prompts)), cfg.grid_per_prompt
    grid_prompts = prompts[:k]
    grid_imgs = generator.generate(grid_prompts, per_prompt=per, batch_size=cfg.eval_batch_size)
    report["grid"] = write_grid(grid_imgs, grid_prompts, per, os.path.join(out, "grid.png"))
    fid_dirs = (os.path.join(out, "fid", "generated"), os.path.join(out, "fid", "real"))
    if cfg.inception_weights:
        for d, ims in zip(fid_dirs, (sets["generated"], real)):
            os.makedirs(d, exist_ok=True)
            for i, im in enumerate(ims):
                im.save(os.path.join(d, f"{i:04d}.png"))
    report["fid_is"] = fid_and_is(*fid_dirs, cfg.inception_weights, evaluator.device)
    report["config"] = dataclasses.asdict(cfg)
    with open(os.path.join(out, REPORT_NAME), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2)
    for line in summary_lines(report):
        say(line)
    return report


def summary_lines(report: dict) -> list[str]:
    """The printed summary: one line per image set, then FID/IS (or why skipped)."""
    lines = [
        f"text-to-image on {report['n_prompts']} held-out prompts, R-precision among "
        f"{report['candidates_per_image']} candidates (chance {report['chance_r_precision']:.1f}%)"
        f", {report['sampler']['kind']} {report['sampler']['steps']} steps, guidance "
        f"{report['sampler']['guidance']}:"
    ]
    for name in ("generated", "unconditional", "real"):
        r = report[name]
        line = f"  {name:<13} R-precision {r['r_precision']:5.1f}%"
        if r["itm_score"] is not None:
            line += f"  ITM {r['itm_score']:.3f}"
        a = r["attributes_top1"]
        if a:
            line += "  top-1 agrees on " + ", ".join(
                f"{k} {100 * v['top1']:.0f}% (chance {100 * v['chance']:.0f}%)"
                for k, v in a.items()
            )
        if r["palette_background_acc"] is not None:
            line += f"  palette bg {100 * r['palette_background_acc']:.0f}% (chance 12%)"
        lines.append(line)
    f = report["fid_is"]
    if "skipped" in f:
        lines.append(f"  FID / Inception score skipped: {f['skipped']}")
    else:
        lines.append(
            f"  FID {f['fid']:.2f}  Inception score {f['inception_score']:.2f} "
            f"(+- {f['inception_score_std']:.2f})"
        )
    lines.append(f"  grid: {report['grid']['grid']} (prompts: {report['grid']['prompts_file']})")
    return lines


SAMPLING_FIELDS = (
    "sampler",
    "steps",
    "guidance",
    "seed",
    "eval_prompts",
    "eval_candidates",
    "eval_batch_size",
    "grid_prompts",
    "grid_per_prompt",
    "evaluator",
    "inception_weights",
)
"""The ``t2i`` fields ``r2d2 eval t2i`` takes from its config; the rest are the checkpoint's."""


def run_eval(cfg, checkpoint: str, device: torch.device) -> dict:
    """``r2d2 eval t2i``: the generator of ``checkpoint`` sampled with the eval config's ``t2i``
    sampling fields on the held-out split of ``cfg.data``, scored by ``t2i.evaluator`` (else the
    generator's own R2D2 model); writes into ``cfg.out``."""
    from r2d2.engine.data.synthetic import open_image
    from r2d2.engine.data.transforms import resize_center_crop
    from r2d2.engine.errors import UsageError
    from r2d2.engine.model import R2D2Model
    from r2d2.engine.tasks.evaluate import EvalError, _read, drop_undecodable, make_tokenize

    ev = cfg.t2i.evaluator
    if ev and not os.path.isfile(os.path.join(ev, "config.json")):
        raise UsageError(f"--r2d2 / t2i.evaluator={ev!r}: no R2D2 save_pretrained folder there")
    generator = T2IModel.from_pretrained(checkpoint).to(device).eval()
    over = {k: getattr(cfg.t2i, k) for k in SAMPLING_FIELDS}
    generator.config.t2i = dataclasses.replace(generator.config.t2i, **over)
    evaluator = R2D2Model.from_pretrained(ev).to(device).eval() if ev else generator.r2d2
    tokenize = make_tokenize(evaluator, cfg.data, checkpoint)
    size = generator.config.image_size
    canvas = max(64, size)

    def load(key: str):
        return resize_center_crop(open_image(key, canvas), size)

    read, _, _ = _read(cfg)
    records = [r for r in read.records if r.label != 0]
    records = records[: cfg.data.limit] if cfg.data.limit else records
    if cfg.data.check_images:
        read, records, _ = drop_undecodable(read, records, None, load)
    if not records:
        raise EvalError(
            f"{cfg.data.path or 'synthetic'}: no usable held-out pair (skipped {read.skipped}: "
            f"{dict(read.reasons)})"
        )
    report = evaluate_t2i(
        generator, evaluator, records, generator.config.t2i, tokenize, load, cfg.out
    )
    report.update(
        checkpoint=checkpoint,
        evaluator=ev or os.path.join(checkpoint, "r2d2"),
        skipped=read.skipped,
        skip_reasons=dict(read.reasons),
    )
    with open(os.path.join(cfg.out, REPORT_NAME), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2)
    return report
