"""``r2d2 generate --checkpoint DIR "提示" ["另一个提示" ...] -o out.png [--seed 0 --steps 25
--guidance 3.0 --per-prompt 4 --sampler dpm]``

Samples a text-to-image model trained with ``r2d2 finetune --config t2i_tiny`` (``--checkpoint``:
its ``model/`` folder or the run folder) and writes

    out.png        the grid: one row per prompt, ``--per-prompt`` images each, the prompt under it
                   (its number when the machine has no CJK font: see out.txt)
    out.txt        the prompts, one ``[n] prompt`` a line
    out/NN_K.png   every image on its own (prompt NN, image K), at the model's resolution

The same prompts, seed, steps, guidance and sampler give the same images. Steps, guidance and
sampler default to the model's training config (``t2i.steps``, ``t2i.guidance``,
``t2i.sampler``). An empty prompt ("") samples the unconditional model. Exit status 2 with one
line for bad arguments (no prompt, a missing folder, steps < 1, ...).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from r2d2.cli import check_out_dir, guarded
from r2d2.engine.errors import UsageError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r2d2 generate", description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", nargs="+", help="Chinese prompts, one image row each")
    p.add_argument(
        "--checkpoint", required=True, help="text-to-image model folder (<run>/model) or run"
    )
    p.add_argument("-o", "--out", required=True, help="grid PNG path (e.g. out.png)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's t2i.steps)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--sampler", choices=("ddim", "dpm", "ddpm"), help="default: the model's")
    p.add_argument("--batch-size", type=int, default=32, help="images per sampling batch")
    p.add_argument("--vae", help="latent models: the local VAE folder, if it moved")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Bad arguments, each a one-line :class:`UsageError`, before a model is loaded."""
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"-o {args.out}: the grid is a PNG; give a path ending in .png")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be >= 1")
    if args.guidance is not None and args.guidance < 0:
        raise UsageError(f"--guidance {args.guidance}: must be >= 0 (1 = no guidance)")
    if args.per_prompt < 1:
        raise UsageError(f"--per-prompt {args.per_prompt}: must be >= 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.vae and not os.path.isdir(args.vae):
        raise UsageError(f"--vae {args.vae}: no such folder")


@guarded("r2d2 generate")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    check_args(args)
    from r2d2.engine.tasks.evaluate import _device, resolve_checkpoint
    from r2d2.engine.tasks.t2i.grid import write_grid
    from r2d2.engine.tasks.t2i.model import T2IModel, to_pil

    checkpoint = resolve_checkpoint(args.checkpoint)
    stem = os.path.splitext(args.out)[0]
    check_out_dir(os.path.dirname(os.path.abspath(args.out)), "-o")
    device = _device(args.device)
    model = T2IModel.from_pretrained(checkpoint, vae=args.vae).to(device)
    cfg = model.config.t2i
    steps = args.steps if args.steps is not None else cfg.steps
    if steps > cfg.train_timesteps:
        raise UsageError(f"--steps {steps}: the model was trained with {cfg.train_timesteps}")
    rows = [p for p in args.prompts for _ in range(args.per_prompt)]
    images = to_pil(
        model.sample(
            rows,
            steps=steps,
            guidance=args.guidance,
            seed=args.seed,
            sampler=args.sampler,
            batch_size=args.batch_size,
        )
    )
    info = write_grid(images, args.prompts, args.per_prompt, args.out)
    os.makedirs(stem, exist_ok=True)
    for i, im in enumerate(images):
        im.save(os.path.join(stem, f"{i // args.per_prompt + 1:02d}_{i % args.per_prompt + 1}.png"))
    note = "" if info["font"] else " (no CJK font here: rows are numbered, prompts in the .txt)"
    print(f"wrote {args.out}, {info['prompts_file']} and {len(images)} images in {stem}/{note}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
