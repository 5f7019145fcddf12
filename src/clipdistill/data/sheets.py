"""Contact sheets: a grid of images with a caption under each, as one PNG.

What the teacher kept for a class, what sits at the threshold, where the student and the
teacher disagree: people judge these faster by looking than by reading scores. Pillow only."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core import atomic


def contact_sheet(images: Sequence, captions: Sequence[str], path: str | os.PathLike, title: str = "",
                  cols: int = 8, cell: int = 96) -> Path:
    """Write `images` (PIL images or uint8 HxWx3 arrays) in a grid of `cols` columns, each
    scaled to `cell` pixels with its caption below, under a title line. An empty list gives
    a sheet that says so, so a class with nothing kept still has its file."""
    from PIL import Image, ImageDraw

    n = len(images)
    rows = max(1, -(-n // cols))
    pad, text_h, title_h = 4, 14, 18 if title else 0
    width = cols * (cell + pad) + pad
    height = title_h + rows * (cell + text_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 3), title, fill=(0, 0, 0))
    if not n:
        draw.text((pad, title_h + cell // 2), "(none)", fill=(120, 120, 120))
    for k, (im, cap) in enumerate(zip(images, captions)):
        if isinstance(im, np.ndarray):
            im = Image.fromarray(im)
        im = im.convert("RGB").resize((cell, cell), Image.BILINEAR)
        x = pad + (k % cols) * (cell + pad)
        y = title_h + pad + (k // cols) * (cell + text_h + pad)
        sheet.paste(im, (x, y))
        draw.text((x, y + cell + 1), str(cap)[: max(4, cell // 6)], fill=(0, 0, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic.write_bytes(path, buf.getvalue())
