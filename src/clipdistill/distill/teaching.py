"""Where the student's targets come from: the teacher once, online, or from cached views.

- `cached`: the teacher's embedding of each plain image, computed once (the embedding cache).
  What the study did. Cheap, but with augmentation the student is taught about a view the
  teacher never saw, and without it the student memorises fixed targets (loss -> 0.02).
- `online`: the teacher runs on every training batch, on exactly the augmented (and mixed)
  pixels the student sees (Beyer et al., CVPR 2022: "consistent teaching"), batched under
  `inference_mode` in the teacher's precision (bf16 on CPUs that have it). Each torchrun
  rank runs its own copy on its own part of the batch.
- `views`: K augmented views per training image are embedded once into a cache (the same
  resumable, checked array as the embedding cache) and each step picks one view per image.
  Costs K teacher passes once instead of one per epoch; mixup then mixes the two views'
  embeddings, an approximation of the teacher on the mixed image.
- `auto`: cached when nothing is augmented (the targets would be identical), else online,
  unless the teacher is slower than the student's own step and fewer views than epochs would
  do: then views. The choice and the measured cost per epoch of each mode are logged.

Each mode is a `Teaching` strategy with one interface: `draw_views` (the batch's augmented
views, from the epoch's generator) and `targets` (the teacher's embeddings of exactly those
views). `choose_teaching` resolves `--teaching` into a `TeachingChoice` (the mode, and what the
auto probe measured), a value the trainer records in its checkpoints; `create_teaching` builds
the strategy for a mode. Nothing here keeps state between two calls.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from ..core.registry import Registry
from ..data.pixels import normalize, to_float
from ..teacher.cache import EmbeddingCache, cache_path
from .augment import AUGMENTATIONS, Augmentation, Mix, identity_views, render, sample_views

if TYPE_CHECKING:  # annotations only; context.py never imports this module
    from .context import RunContext
    from .student_data import Rows
log = logging.getLogger(__name__)

VIEWS_FORMAT = 1  # bump when the view parameters are drawn differently


@dataclasses.dataclass
class Costs:
    """Seconds per image of the teacher (at its side) and of one student training step."""

    teacher: float
    student: float

    def per_epoch(self, n: int, mode: str, views: int, epochs: int) -> float:
        """Average seconds per epoch over the run, the one-time view pass spread over it."""
        if mode == "online":
            return n * (self.student + self.teacher)
        if mode == "views":
            return n * self.student + views * n * self.teacher / epochs
        return n * self.student

    def pick(self, views: int, epochs: int) -> str:
        """online (exact, mixup included) unless the teacher costs more than a student step
        and the K views, embedded once, are fewer than the epochs that reuse them."""
        return "views" if self.teacher > self.student and views < epochs else "online"


@dataclasses.dataclass(frozen=True)
class TeachingChoice:
    """The resolved teaching mode of a run, and what `--teaching auto` measured to pick it
    (None when nothing was measured): recorded in the checkpoints and result.json."""

    mode: str
    costs: Optional[dict] = None


@dataclasses.dataclass(frozen=True)
class Views:
    """The augmented views of one batch: their crop and flip parameters (N, 5; augment.py) and,
    for cached views, which of each image's K embedded views they are."""

    params: torch.Tensor
    index: Optional[np.ndarray] = None


def teacher_pixels(teacher, x: torch.Tensor, views: torch.Tensor, mix: Optional[Mix] = None) -> torch.Tensor:
    """The teacher's input for views of float images in [0, 1]: rendered at its side, mixed,
    normalised its way. Online teaching, the cached views and the cost probe all use it."""
    xt = render(x, views, teacher.image_size)
    if mix is not None:
        xt = mix.apply(xt)
    mean, std = teacher.normalization
    return normalize(xt, mean, std)


# ----------------------------------------------------------------------------- the strategies

class Teaching(abc.ABC):
    """One teaching mode: the batch's views, and the teacher's embeddings of them."""

    mode = ""

    def __init__(self, aug: Augmentation):
        self.aug = aug

    @classmethod
    def build(cls, ctx: "RunContext", aug: Augmentation) -> "Teaching":
        """The strategy for a run, with what it needs made ready first (online: the teacher on
        the run's device; views: their embeddings)."""
        return cls(aug)

    def draw_views(self, rows: "Rows", generator: Optional[torch.Generator]) -> Views:
        """A fresh augmented view of each row, drawn from `generator`."""
        return Views(sample_views(len(rows), self.aug, generator))

    @abc.abstractmethod
    def targets(self, rows: "Rows", pixels: torch.Tensor, views: Views, mix: Optional[Mix],
                cached: torch.Tensor) -> torch.Tensor:
        """The teacher's embeddings of `views` of the rows (mixed as the student's input is).
        `pixels`: the plain float images in [0, 1] on the device; `cached`: the rows' cached
        embeddings of the plain images, on the device."""


TEACHINGS: Registry[type] = Registry("teaching mode", flag="--teaching")


@TEACHINGS.register("cached")
class CachedTeaching(Teaching):
    """The cached embedding of each plain image, whatever view the student is shown."""

    mode = "cached"

    def targets(self, rows, pixels, views, mix, cached):
        return mix.apply(cached) if mix is not None else cached


@TEACHINGS.register("none")
class NoTeacher(CachedTeaching):
    """A method that learns from labels alone: the cached embeddings ride along, unused."""

    mode = "none"


@TEACHINGS.register("online")
class OnlineTeaching(Teaching):
    """The teacher on exactly the pixels the student sees, every step."""

    mode = "online"

    def __init__(self, aug: Augmentation, teacher):
        super().__init__(aug)
        self.teacher = teacher

    @classmethod
    def build(cls, ctx: "RunContext", aug: Augmentation) -> "OnlineTeaching":
        return cls(aug, ctx.outs.teacher.to(ctx.device))

    def targets(self, rows, pixels, views, mix, cached):
        emb = self.teacher.encode_images(teacher_pixels(self.teacher, pixels, views.params, mix))
        return emb.clone()  # out of inference mode: a loss may keep it for backward (mse)


@TEACHINGS.register("views")
class CachedViews(Teaching):
    """K views of each training image embedded once; each step shows one of them."""

    mode = "views"

    def __init__(self, aug: Augmentation, k: int, params: dict[int, torch.Tensor],
                 caches: dict[int, EmbeddingCache]):
        super().__init__(aug)
        self.k = k
        self.params = params  # split index -> (K, N, 5)
        self.caches = caches  # split index -> the K * N embeddings, view-major

    @classmethod
    def build(cls, ctx: "RunContext", aug: Augmentation) -> "CachedViews":
        from ..core.distributed import main_first

        cfg = ctx.cfg
        params: dict[int, torch.Tensor] = {}
        caches: dict[int, EmbeddingCache] = {}

        def fill() -> None:  # rank 0 embeds the views; the others then find them complete
            for s, name in enumerate(ctx.data.names):
                if name not in cfg.data:
                    continue
                params[s] = view_parameters(len(ctx.data.images[s]), cfg.views, aug, cfg.seed, s)
                caches[s] = _fill_views(ctx, aug, s, params[s])

        main_first(ctx.dist, fill, "embedding the teaching views")
        return cls(aug, cfg.views, params, caches)

    def draw_views(self, rows, generator):
        """One cached view per row: which one (drawn from `generator`) and its parameters."""
        k = torch.randint(0, self.k, (len(rows),), generator=generator).numpy()
        out = torch.empty(len(rows), 5)
        for s, pos, r in rows.groups():
            out[pos] = self.params[s][k[pos], r]
        return Views(out, k)

    def targets(self, rows, pixels, views, mix, cached):
        out = None
        for s, pos, r in rows.groups():
            cache = self.caches[s]
            n = cache.count // self.k
            got = np.asarray(cache.embeddings[views.index[pos] * n + r], dtype=np.float32)
            if out is None:
                out = np.empty((len(rows), got.shape[1]), dtype=np.float32)
            out[pos] = got
        emb = torch.from_numpy(out).to(pixels.device)
        return mix.apply(emb) if mix is not None else emb  # mixed: an approximation (see above)


def create_teaching(ctx: "RunContext", mode: str) -> Teaching:
    """The strategy for a resolved mode (for `views`, their cache filled first)."""
    return TEACHINGS.get(mode).build(ctx, AUGMENTATIONS.get(ctx.cfg.augment))


# ----------------------------------------------------------------------------- cached views

def view_parameters(n: int, k: int, aug: Augmentation, seed: int, split_index: int) -> torch.Tensor:
    """(K, N, 5): the views of every image, a pure function of (seed, split, view)."""
    out = torch.empty(k, n, 5)
    for v in range(k):
        g = torch.Generator().manual_seed(((seed * 1_000_003 + split_index) * 1_009 + v) % (2**63 - 1))
        out[v] = sample_views(n, aug, g)
    return out


def _fill_views(ctx: "RunContext", aug: Augmentation, split_index: int, params: torch.Tensor) -> EmbeddingCache:
    """Embed the K views of one training split into its own cache (resumable, checked)."""
    from ..core.locks import exclusive
    from ..core.progress import bar as progress_bar

    cfg, teacher = ctx.cfg, ctx.outs.teacher
    name = ctx.data.names[split_index]
    ds = ctx.outs.datasets[name]
    k, n = params.shape[0], params.shape[1]
    fingerprint = {**ds.fingerprint(), "views": k,
                   # as the manifest reads back (tuples become lists)
                   "augment": json.loads(json.dumps(dataclasses.asdict(aug))),
                   "seed": cfg.seed,
                   "format": VIEWS_FORMAT}
    path = cache_path(cfg.cache_dir, teacher.slug, ds.slug(), f"{name}-views{k}-{aug.name}-seed{cfg.seed}")
    path.mkdir(parents=True, exist_ok=True)
    with exclusive(path / ".lock"):
        cache = EmbeddingCache.open(path, teacher.fingerprint(), fingerprint, k * n, ctx.embed_dim)
        if cache.complete:
            return cache
        log.info("embedding %d augmented views of each of the %d %s images once (%s)", k, n, name, path)
        pixels = ctx.data.images[split_index]
        bs = cfg.embed_batch_size
        bar = progress_bar(total=k * n, initial=cache.done, unit="img", desc=f"teacher views {name}",
                           enabled=cfg.progress)
        pos = cache.done  # every commit point is a batch boundary: resume there
        while pos < k * n:
            v, i = divmod(pos, n)
            end = min(i + bs, n)
            x = to_float(torch.from_numpy(np.ascontiguousarray(pixels[i:end])).to(teacher.device))
            emb = teacher.encode_images(teacher_pixels(teacher, x, params[v, i:end]))
            cache.write(pos, emb.cpu().numpy(), np.ones(end - i, dtype=np.uint8))
            cache.commit(pos + end - i)
            bar.update(end - i)
            pos += end - i
        bar.close()
    return cache


# ----------------------------------------------------------------------------- choosing a mode

def seconds_per_image(fn: Callable[[], object], n: int) -> float:
    """One call of `fn` (on `n` images) after a warm-up call, in seconds per image."""
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n


def measure_costs(ctx: "RunContext", n: int = 32) -> Costs:
    """Time the teacher on `n` training images at its side, and one student step on them
    (forward + backward on a throw-away copy: the real student keeps its state)."""
    import copy

    rows = ctx.train_rows.take(np.arange(min(n, len(ctx.train_rows))))
    imgs, _, _ = ctx.data.gather(rows)
    x = to_float(imgs.to(ctx.device))
    views = identity_views(len(x))
    teacher = ctx.outs.teacher
    xt = teacher_pixels(teacher, x, views)
    model = copy.deepcopy(ctx.student)  # the plain module (not its DDP wrapper)
    xs = ctx.student_pixels(x, views, None)

    def step() -> None:
        with ctx.autocast():
            out = model(xs)
        out.float().sum().backward()

    return Costs(teacher=seconds_per_image(lambda: teacher.encode_images(xt), len(x)),
                 student=seconds_per_image(step, len(x)))


def choose_teaching(ctx: "RunContext") -> TeachingChoice:
    """The teaching mode of a run of `ctx.cfg` on this machine (see the module docstring); auto
    measures and logs the costs it chose by."""
    cfg = ctx.cfg
    if not ctx.method.uses_teacher:
        return TeachingChoice("none")
    augmented = AUGMENTATIONS.get(cfg.augment).name != "none" or cfg.mixup > 0
    if cfg.teaching == "auto":
        return TeachingChoice("cached") if not augmented else _auto(ctx)
    if cfg.teaching == "cached" and augmented and ctx.dist.is_main:
        log.warning("--teaching cached with --augment %s / --mixup %g: the student's targets are the teacher's "
                    "view of the plain image, not of the view it is shown (the study's way; see --teaching)",
                    cfg.augment, cfg.mixup)
    return TeachingChoice(cfg.teaching)


def _auto(ctx: "RunContext") -> TeachingChoice:
    """online, unless the teacher costs more than the student's step and K views < epochs."""
    from ..core.distributed import broadcast_choice

    cfg = ctx.cfg
    choice = costs_record = None
    if ctx.dist.is_main:
        costs = measure_costs(ctx)
        n = len(ctx.train_rows)
        per = {m: costs.per_epoch(n, m, cfg.views, cfg.epochs) for m in ("cached", "online", "views")}
        choice = costs.pick(cfg.views, cfg.epochs)
        log.info("teaching auto -> %s: the teacher takes %.2f ms per image, a student step %.2f ms; seconds per "
                 "epoch of %d images: online %.1f, views %.1f (%d views embedded once, spread over %d epochs), "
                 "cached %.1f (targets of the plain images only)", choice, costs.teacher * 1e3,
                 costs.student * 1e3, n, per["online"], per["views"], cfg.views, cfg.epochs, per["cached"])
        costs_record = {"teacher_ms_per_image": costs.teacher * 1e3, "student_ms_per_image": costs.student * 1e3,
                        **{f"seconds_per_epoch_{m}": v for m, v in per.items()}}
    return TeachingChoice(broadcast_choice(choice, ("online", "views"), ctx.dist, ctx.device), costs_record)
