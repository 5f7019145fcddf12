"""`shapes10`: the offline, STL10-like world.

Ten classes of rendered objects, each drawn with a random colour, size, aspect, tilt and
position, on a random background (flat, gradient or textured, plus pixel noise), among
distractor strokes and blobs, some of which cross the object. Nothing about an image but
its outline tells its class, so a classifier must learn shape, not colour or size: a
student trained from scratch on the 1000 labelled `train` images stays far below the tiny
teacher, which, pre-trained on 20000 captioned images, names most test images zero-shot
(README.md, "What `make demo` printed here", has both figures).

Every image is a pure function of `(seed, index)`: its own random generator is seeded
with both, so the first `n` images of a split do not depend on how many are asked for,
and the same scene can be rendered at any resolution. Shapes are drawn with PIL at 2-4x
the target size and box-filtered down (anti-aliasing); backgrounds and noise are numpy.

The splits use distinct seeds, and the captioned set that pre-trains the tiny teacher
uses yet another, so the teacher never sees a test image. Captions are like alt-text:
mostly the object's name alone, sometimes with colour, size and background, and now and
then the wrong name (see `_MISNAMED_AS`).
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ..core.errors import ConfigError
from .protocol import InMemoryDataset

log = logging.getLogger(__name__)

NAME = "shapes10"
# Bump when the rendering changes: it names the cache folder and enters the fingerprint,
# so arrays rendered by an older generator are never mixed with new ones.
VERSION = 1

CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "hourglass", "crescent", "heart",
)  # all start with a consonant, so "a {}" prompts read well for every class


@dataclass(frozen=True)
class SplitSpec:
    n: int
    seed: int


SPLITS: dict[str, SplitSpec] = {
    "train": SplitSpec(n=1000, seed=1001),
    "unlabeled": SplitSpec(n=10000, seed=2002),
    "test": SplitSpec(n=2000, seed=3003),
}
# Captioned pairs for the tiny teacher's contrastive pre-training: a seed of their own.
CAPTION_SEED = 4004

# Named colours (RGB). Each draw jitters the named value so colours vary continuously,
# while the caption can still name them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 40),
    "green": (50, 170, 60),
    "cyan": (40, 200, 215),
    "blue": (40, 80, 220),
    "purple": (130, 50, 180),
    "pink": (240, 130, 190),
    "brown": (130, 80, 40),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}
_COLOR_NAMES = tuple(COLORS)
_COLOR_RGB = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)

_OBJECT_RADIUS = (0.24, 0.44)  # half-extent of the object, as a fraction of the image side
_SIZE_WORDS = ((0.31, "small"), (0.38, "medium"), (1.0, "large"))
_CLUTTER = (0, 4)  # distractors per image: [low, high)
_IN_FRONT = 0.2  # chance that a distractor is drawn over the object
_NOISE = 8.0  # largest pixel-noise sigma (0-255 scale)
_ROTATION = 0.35  # radians: objects stand roughly upright, as in photos
_BG_SHARES = (0.35, 0.35)  # chances of a plain and a gradient background; the rest are textured


# ----------------------------------------------------------------------------- geometry

def _regular(k: int, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(k) / k
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _heart() -> list[np.ndarray]:
    """Two round lobes over a point: a deep notch keeps it a heart even when small."""
    lobe = _regular(24) * 0.52
    tip = np.array([[-0.98, -0.2], [0.98, -0.2], [0.0, 1.0]])
    return [lobe + np.array([-0.47, -0.42]), lobe + np.array([0.47, -0.42]), tip]


def _crescent(k: int = 24, d: float = 0.5, rr: float = 0.85) -> np.ndarray:
    """The unit disc minus a disc of radius `rr` centred at (d, 0)."""
    x = (1 - rr ** 2 + d ** 2) / (2 * d)
    y = math.sqrt(1 - x * x)
    a_out = np.linspace(math.atan2(y, x), 2 * np.pi - math.atan2(y, x), k)
    a_in = np.linspace(2 * np.pi - math.atan2(y, x - d), math.atan2(y, x - d), k)
    outer = np.stack([np.cos(a_out), np.sin(a_out)], 1)
    inner = np.stack([d + rr * np.cos(a_in), rr * np.sin(a_in)], 1)
    p = np.concatenate([outer, inner])
    return p - np.array([p[:, 0].mean() * 0.5, 0])


_W = 0.32  # half-width of the cross arms
# Unit outlines, roughly of equal visual area, centred on the origin, y pointing down; a
# list is a union of polygons drawn in the same colour.
_OUTLINES: dict[str, np.ndarray | list[np.ndarray] | None] = {
    "circle": _regular(48),
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.8,
    "triangle": _regular(3, -np.pi / 2) * 1.05,
    "star": _star(),
    "cross": np.array([[-_W, -1], [_W, -1], [_W, -_W], [1, -_W], [1, _W], [_W, _W], [_W, 1], [-_W, 1],
                       [-_W, _W], [-1, _W], [-1, -_W], [-_W, -_W]], np.float64),
    "ring": None,  # drawn as a thick ellipse outline so the background shows through the hole
    "diamond": np.array([[0, -1], [0.58, 0], [0, 1], [-0.58, 0]], np.float64),
    "hourglass": np.array([[-0.8, -1], [0.8, -1], [0.12, 0], [0.8, 1], [-0.8, 1], [-0.12, 0]], np.float64),
    "crescent": _crescent(),
    "heart": _heart(),
}
assert tuple(_OUTLINES) == CLASSES


def _transform(outline: np.ndarray, cx: float, cy: float, r: float, aspect: float, theta: float) -> list:
    p = outline * np.array([r * aspect, r / aspect])
    c, s = math.cos(theta), math.sin(theta)
    x = p[:, 0] * c - p[:, 1] * s + cx
    y = p[:, 0] * s + p[:, 1] * c + cy
    return list(zip(x.tolist(), y.tolist()))


# ----------------------------------------------------------------------------- one scene

def _jitter(rng: np.random.Generator, rgb: np.ndarray, amount: float = 28.0) -> np.ndarray:
    return np.clip(rgb + rng.normal(0, amount, 3), 0, 255)


def _pick_color(rng: np.random.Generator, avoid: Optional[np.ndarray] = None) -> int:
    """A colour index; with `avoid`, one far enough from it to stay visible (usually)."""
    while True:
        i = int(rng.integers(len(_COLOR_NAMES)))
        if avoid is None or np.abs(_COLOR_RGB[i] - avoid).sum() > 110:
            return i


def _background(rng: np.random.Generator, size: int, base: np.ndarray) -> tuple[np.ndarray, str]:
    """float32 [size, size, 3] background and the word that describes it."""
    kind = rng.random()
    if kind < _BG_SHARES[0]:  # flat
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32), "plain"
    if kind < _BG_SHARES[0] + _BG_SHARES[1]:  # linear gradient towards another colour
        other = _jitter(rng, _COLOR_RGB[_pick_color(rng)], 40)
        a = rng.uniform(0, 2 * np.pi)
        u = np.linspace(-1, 1, size, dtype=np.float32)
        t = np.clip((np.cos(a) * u[None, :] + np.sin(a) * u[:, None]) * 0.6 + 0.5, 0, 1)
        t = t[..., None] * rng.uniform(0.5, 1.0)
        return (base * (1 - t) + other * t).astype(np.float32), "gradient"
    # textured: low-frequency noise, bilinearly upsampled
    k = int(rng.integers(3, 7))
    coarse = np.clip(base + rng.normal(0, rng.uniform(25, 60), (k, k, 3)), 0, 255).astype(np.uint8)
    blot = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return blot, "textured"


@dataclass
class _Scene:
    label: int
    color: str
    bg_color: str
    bg_kind: str
    size_word: str
    image: np.ndarray


def _render(rng: np.random.Generator, size: int, label: int) -> _Scene:
    ss = max(1, min(4, math.ceil(128 / size)))  # supersampling factor
    big = size * ss

    fg_i = _pick_color(rng)
    bg_i = _pick_color(rng, avoid=_COLOR_RGB[fg_i])
    fg = _jitter(rng, _COLOR_RGB[fg_i])
    bg, bg_kind = _background(rng, size, _jitter(rng, _COLOR_RGB[bg_i], 20))

    canvas = Image.fromarray(np.repeat(np.repeat(bg.astype(np.uint8), ss, 0), ss, 1))
    draw = ImageDraw.Draw(canvas)

    # Object pose, in units of the image side.
    r = rng.uniform(*_OBJECT_RADIUS)
    margin = r * 0.75
    cx, cy = rng.uniform(margin, 1 - margin, 2)
    aspect = math.exp(rng.normal(0, 0.08))
    theta = rng.uniform(-_ROTATION, _ROTATION)

    n_clutter = int(rng.integers(*_CLUTTER))
    in_front = rng.random(n_clutter) < _IN_FRONT

    def clutter() -> None:
        col = tuple(int(v) for v in _jitter(rng, _COLOR_RGB[_pick_color(rng)], 30))
        if rng.random() < 0.55:  # a stroke
            x0, y0 = rng.uniform(0, 1, 2)
            ang, ln = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.5)
            x1, y1 = x0 + ln * math.cos(ang), y0 + ln * math.sin(ang)
            width = max(1, round(rng.uniform(0.025, 0.06) * big))
            draw.line([(x0 * big, y0 * big), (x1 * big, y1 * big)], fill=col, width=width)
        else:  # a small blob
            x0, y0 = rng.uniform(0, 1, 2)
            rx, ry = rng.uniform(0.03, 0.09, 2)
            draw.ellipse([(x0 - rx) * big, (y0 - ry) * big, (x0 + rx) * big, (y0 + ry) * big], fill=col)

    for i in range(n_clutter):
        if not in_front[i]:
            clutter()

    fill = tuple(int(v) for v in fg)
    name = CLASSES[label]
    if name == "ring":
        rx, ry = r * aspect * big, r / aspect * big
        c = (cx * big, cy * big)
        width = max(1, round(rng.uniform(0.33, 0.5) * min(rx, ry)))
        draw.ellipse([c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry], outline=fill, width=width)
    else:
        outline = _OUTLINES[name]
        for part in outline if isinstance(outline, list) else [outline]:
            draw.polygon(_transform(part, cx * big, cy * big, r * big, aspect, theta), fill=fill)

    for i in range(n_clutter):
        if in_front[i]:
            clutter()

    if ss > 1:
        canvas = canvas.reduce(ss)
    img = np.asarray(canvas, dtype=np.float32)
    img = img + rng.normal(0, rng.uniform(0, _NOISE), img.shape).astype(np.float32)
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    size_word = next(w for t, w in _SIZE_WORDS if r < t)
    return _Scene(label, _COLOR_NAMES[fg_i], _COLOR_NAMES[bg_i], bg_kind, size_word, img)


def _scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def _balanced_labels(seed: int, n: int) -> np.ndarray:
    """Labels cycling over the classes in a seeded order: splits are balanced to +-1."""
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(len(CLASSES))
    return perm[np.arange(n) % len(CLASSES)]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"shapes10 has no split {split!r}; valid: {', '.join(SPLITS)}")


def generate(split: str, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Render `n` scenes: uint8 images [n, size, size, 3] and int64 labels [n].

    `split` is only checked here (labels are always returned; `Shapes10` hides them for
    `unlabeled`); the seed alone decides the images, and image i depends only on (seed, i).
    """
    check_split(split)
    labels = _balanced_labels(seed, n)
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        images[i] = _render(_scene_rng(seed, i), size, int(labels[i])).image
    return images, labels.astype(np.int64)


# Like web alt-text, many captions name only the object; the rest add what else is seen.
# These plain captions are also the zero-shot prompt templates of the dataset (`{}` is the
# class name), averaged like open_clip's zero-shot classifiers: the teacher is asked in the
# words it learnt from. Every class name starts with a consonant, so "a {}" reads well.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a {}",
    "a photo of a {}.",
    "a drawing of a {}",
    "a {} shape",
)
_PLAIN_TEMPLATES = tuple(t.replace("{}", "{name}") for t in PROMPT_TEMPLATES)
_ATTRIBUTE_TEMPLATES = (
    "a {color} {name}",
    "a {size} {name}",
    "a photo of a {size} {color} {name}",
    "a {color} {name} on a {bg} background",
    "a photo of a {size} {color} {name} on a {bg} background",
    "a drawing of a {color} {name}",
    "a {size} {name} on a {bgkind} background",
    "a {name} shape in {color}",
)
_PLAIN_SHARE = 0.7
# Alt-text is sometimes wrong, and wrong one way: a diamond gets called a square, never the
# reverse. The teacher's text side inherits the bias, its image features much less, so (as
# with real CLIP) a linear probe on its embeddings beats its zero-shot head.
_MISNAMED_AS = {"diamond": "square", "ring": "circle", "cross": "star", "hourglass": "triangle"}
_MISNAMED = 0.2  # chance that a caption of those classes names the other one


def caption(scene: _Scene, rng: np.random.Generator) -> str:
    pool = _PLAIN_TEMPLATES if rng.random() < _PLAIN_SHARE else _ATTRIBUTE_TEMPLATES
    t = pool[int(rng.integers(len(pool)))]
    bg = scene.bg_color if scene.bg_kind == "plain" else f"{scene.bg_color} {scene.bg_kind}"
    name = CLASSES[scene.label]
    if name in _MISNAMED_AS and rng.random() < _MISNAMED:
        name = _MISNAMED_AS[name]
    text = t.format(name=name, color=scene.color, size=scene.size_word, bg=bg,
                    bgkind=scene.bg_kind)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange star"


def generate_captioned(n: int, size: int, seed: int = CAPTION_SEED) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Render `n` scenes with a caption each, e.g. "a photo of a small red star on a blue
    background": the class name plus some of colour, size and background."""
    labels = _balanced_labels(seed, n)
    images = np.empty((n, size, size, 3), np.uint8)
    captions: list[str] = []
    for i in range(n):
        rng = _scene_rng(seed, i)
        scene = _render(rng, size, int(labels[i]))
        images[i] = scene.image
        captions.append(caption(scene, rng))
    return images, captions, labels.astype(np.int64)


# ----------------------------------------------------------------------------- dataset

class Shapes10(InMemoryDataset):
    """A split of shapes10, rendered once into `root/shapes10/v{VERSION}-{size}px/{split}-{n}.npz`.

    Yields `(PIL RGB image, label)`; the label is -1 on the `unlabeled` split. `data` holds
    all pixels (uint8 N x H x W x 3) so a trainer can skip the PIL round trip. The prompts are
    the class names, formatted into `PROMPT_TEMPLATES`."""

    name = NAME

    def __init__(self, root: str | Path, split: str = "train", size: int = 32, n: Optional[int] = None):
        check_split(split)
        if size < 8:
            raise ConfigError(f"shapes10 image size {size} is too small; use 8 or more (32 is the default)")
        self.split = split
        self.size = int(size)
        self.n = int(n) if n is not None else SPLITS[split].n
        if self.n <= 0:
            raise ConfigError(f"shapes10 n={self.n}: must be positive")
        self.seed = SPLITS[split].seed
        self.classes = list(CLASSES)
        self.prompts = list(CLASSES)
        self.templates = list(PROMPT_TEMPLATES)
        self.path = Path(root) / NAME / f"v{VERSION}-{self.size}px" / f"{split}-{self.n}.npz"
        self.data, labels = self._load_or_generate()
        self.hidden_targets = labels  # the true labels, for diagnostics only
        self.targets = np.full_like(labels, -1) if split == "unlabeled" else labels

    def _load_or_generate(self) -> tuple[np.ndarray, np.ndarray]:
        if self.path.is_file():
            try:
                with np.load(self.path) as z:
                    images, labels = z["images"], z["labels"]
                if images.shape == (self.n, self.size, self.size, 3) and labels.shape == (self.n,):
                    return images, labels.astype(np.int64)
                log.warning("%s holds arrays of another shape; generating it again", self.path)
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
                # It is written atomically, so a damaged file was truncated or edited: it is only a
                # cache of a deterministic generator, so it is rebuilt rather than trusted.
                log.warning("%s is damaged (%s: %s); generating it again", self.path, type(e).__name__, e)
        from ..core.atomic import numpy_save

        images, labels = generate(self.split, self.n, self.size, self.seed)
        numpy_save(self.path, images=images, labels=labels)
        return images, labels

    def fingerprint(self) -> dict:
        return {"name": NAME, "version": VERSION, "split": self.split, "size": self.size, "n": self.n,
                "seed": self.seed}

    def slug(self) -> str:
        return f"{NAME}-{self.size}px" + (f"-first{self.n}" if self.n != SPLITS[self.split].n else "")

    def __repr__(self) -> str:
        return f"Shapes10(split={self.split!r}, n={self.n}, size={self.size}, path={str(self.path)!r})"
