"""Contact sheets: a grid of images with a caption under each, as one PNG.

What the teacher kept for a class, what sits at the threshold, where the student and the
teacher disagree: people judge these faster by looking than by reading scores. Pillow only.

One sheet file per class and kind, named after the class (`sheet_stems`): a name is kept to
letters, digits, `-` and `_`, so two classes can come out the same (`a cat` / `a_cat`, `c++` /
`c--`, names past 60 characters, `Cat` / `cat` on a case-insensitive disk, emoji), and a class
called `none` would be the sheet of the images matching no prompt. Such a name gets its class
number after a `.`, which no cleaned name contains: sheets never overwrite each other."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core import atomic


def _clean(name: str, limit: int = 60) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:limit]


def sheet_stems(names: Sequence[str], reserved: Sequence[str] = ("none",)) -> list[str]:
    """A file-name stem per class, unique even on a case-insensitive disk, never one of
    `reserved`, and stable: the class's cleaned name, or that plus `.N` (its 1-based number)
    when the cleaned name is empty, reserved or taken by an earlier class."""
    taken = {r.casefold() for r in reserved}
    stems = []
    for i, name in enumerate(names, 1):
        stem = _clean(name)
        if not stem or stem.casefold() in taken:
            stem = f"{stem}.{i}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


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
