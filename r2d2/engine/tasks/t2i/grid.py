"""Picture grids with the prompt under each row of images.

Chinese prompts are drawn with a CJK font when ``fc-list :lang=zh`` finds one. Without one, the
label under each row is its number (``[1]``, ``[2]``, ...) and the prompts go into a ``.txt``
beside the grid (``<grid>.txt``, one ``[n] prompt`` a line, first line saying why), rather than
boxes of missing glyphs. The ``.txt`` is written in both cases so the prompts can be read back.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from PIL import Image, ImageDraw, ImageFont


@functools.lru_cache(maxsize=1)
def cjk_font_path() -> str | None:
    """A font file that covers Chinese (``fc-list :lang=zh``), or None."""
    if shutil.which("fc-list") is None:
        return None
    try:
        out = subprocess.run(
            ["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    files = [ln.split(":")[0].strip() for ln in out.splitlines() if ln.strip()]
    return next((f for f in sorted(files) if os.path.isfile(f)), None)


def _ascii_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def write_grid(
    images: list[Image.Image],
    prompts: list[str],
    per_prompt: int,
    path: str,
    cell: int = 96,
) -> dict:
    """Write ``path`` (PNG): one row per prompt of its ``per_prompt`` images (prompt-major order,
    each scaled to ``cell`` pixels, nearest neighbour so small images stay sharp) with the prompt
    (or its number) under the row; and ``<path minus .png>.txt`` with the prompts. Returns
    ``{"grid", "prompts_file", "font"}`` (font: the CJK font used, or None)."""
    if len(images) != len(prompts) * per_prompt:
        raise ValueError(
            f"{len(images)} images for {len(prompts)} prompts x {per_prompt} per prompt"
        )
    font_path = cjk_font_path()
    label_h = max(16, cell // 5)
    font = ImageFont.truetype(font_path, label_h - 4) if font_path else _ascii_font(label_h - 4)
    pad = 4
    width = per_prompt * (cell + pad) + pad
    row_h = cell + label_h + pad
    grid = Image.new("RGB", (width, len(prompts) * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(prompts):
        y = pad + r * row_h
        for c in range(per_prompt):
            im = images[r * per_prompt + c].convert("RGB").resize((cell, cell), Image.NEAREST)
            grid.paste(im, (pad + c * (cell + pad), y))
        label = prompt if font_path else f"[{r + 1}]"
        draw.text((pad, y + cell + 1), label, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    txt = os.path.splitext(path)[0] + ".txt"
    with open(txt, "w", encoding="utf-8") as f:
        if font_path:
            f.write(f"# prompts of {os.path.basename(path)}, top to bottom (font: {font_path})\n")
        else:
            f.write(
                f"# prompts of {os.path.basename(path)}, top to bottom: no CJK font on this "
                "machine (fc-list :lang=zh found none), so the grid labels each row [n]\n"
            )
        for r, prompt in enumerate(prompts):
            f.write(f"[{r + 1}] {prompt}\n")
    return {"grid": path, "prompts_file": txt, "font": font_path}
