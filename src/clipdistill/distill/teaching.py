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
"""

from __future__ import annotations

import dataclasses
import logging
import json
import time
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from ..data.pixels import normalize, to_float
from ..teacher.cache import EmbeddingCache, cache_path
from .augment import Augmentation, Mix, identity_views, render, sample_views

if TYPE_CHECKING:  # the trainer builds these objects and imports this module: no run-time import back
    from .trainer import Trainer
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


def teacher_pixels(teacher, x: torch.Tensor, views: torch.Tensor, mix: Optional[Mix] = None) -> torch.Tensor:
    """The teacher's input for views of float images in [0, 1]: rendered at its side, mixed,
    normalised its way. Online teaching, the cached views and the cost probe all use it."""
    xt = render(x, views, teacher.image_size)
    if mix is not None:
        xt = mix.apply(xt)
    mean, std = teacher.normalization
    return normalize(xt, mean, std)


class Teaching:
    """The resolved teaching mode of a run and what it needs at each step."""

    def __init__(self, mode: str, trainer: Optional["Trainer"] = None):
        self.mode = mode
        self.trainer = trainer
        self.view_params: dict[int, torch.Tensor] = {}  # split index -> (K, N, 5)
        self.view_caches: dict[int, EmbeddingCache] = {}
        self._k: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ online
    def encode(self, x: torch.Tensor, views: torch.Tensor, mix: Optional[Mix]) -> torch.Tensor:
        """The teacher's embeddings of the views (float (N, 3, H, W) in [0, 1] sources)."""
        teacher = self.trainer.outs.teacher
        emb = teacher.encode_images(teacher_pixels(teacher, x, views, mix))
        return emb.clone()  # out of inference mode: a loss may keep it for backward (mse)

    # ------------------------------------------------------------------ views
    def draw(self, rows, generator: Optional[torch.Generator]) -> torch.Tensor:
        """One cached view per row (drawn from `generator`): its crop parameters; its
        embedding comes from `embeddings(rows)` right after."""
        k = torch.randint(0, self.trainer.cfg.views, (len(rows),), generator=generator).numpy()
        self._k = k
        out = torch.empty(len(rows), 5)
        for s, pos, r in rows.groups():
            out[pos] = self.view_params[s][k[pos], r]
        return out

    def embeddings(self, rows) -> torch.Tensor:
        k = self._k
        out = None
        for s, pos, r in rows.groups():
            cache = self.view_caches[s]
            n = cache.count // self.trainer.cfg.views
            got = np.asarray(cache.embeddings[k[pos] * n + r], dtype=np.float32)
            if out is None:
                out = np.empty((len(rows), got.shape[1]), dtype=np.float32)
            out[pos] = got
        return torch.from_numpy(out)


def view_parameters(n: int, k: int, aug: Augmentation, seed: int, split_index: int) -> torch.Tensor:
    """(K, N, 5): the views of every image, a pure function of (seed, split, view)."""
    out = torch.empty(k, n, 5)
    for v in range(k):
        g = torch.Generator().manual_seed(((seed * 1_000_003 + split_index) * 1_009 + v) % (2**63 - 1))
        out[v] = sample_views(n, aug, g)
    return out


def _fill_views(t: "Trainer", split_index: int, params: torch.Tensor) -> EmbeddingCache:
    """Embed the K views of one training split into its own cache (resumable, checked)."""
    from tqdm import tqdm

    from ..core.locks import exclusive

    cfg, teacher = t.cfg, t.outs.teacher
    name = t.data.names[split_index]
    ds = t.outs.datasets[name]
    k, n = params.shape[0], params.shape[1]
    fingerprint = {**ds.fingerprint(), "views": k, "augment": json.loads(json.dumps(dataclasses.asdict(t.aug))),  # as the manifest reads back (tuples become lists)
                   "seed": cfg.seed,
                   "format": VIEWS_FORMAT}
    path = cache_path(cfg.cache_dir, teacher.slug, ds.slug(), f"{name}-views{k}-{t.aug.name}-seed{cfg.seed}")
    path.mkdir(parents=True, exist_ok=True)
    with exclusive(path / ".lock"):
        cache = EmbeddingCache.open(path, teacher.fingerprint(), fingerprint, k * n, t.embed_dim)
        if cache.complete:
            return cache
        log.info("embedding %d augmented views of each of the %d %s images once (%s)", k, n, name, path)
        pixels = t.data.images[split_index]
        bs = cfg.embed_batch_size
        bar = tqdm(total=k * n, initial=cache.done, unit="img", desc=f"teacher views {name}",
                   disable=not cfg.progress, dynamic_ncols=True)
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


def seconds_per_image(fn: Callable[[], object], n: int) -> float:
    """One call of `fn` (on `n` images) after a warm-up call, in seconds per image."""
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n


def _measure(t: "Trainer", n: int = 32) -> Costs:
    """Time the teacher on `n` training images at its side, and one student step on them
    (forward + backward on a throw-away copy: the real student keeps its state)."""
    import copy

    from .checkpoint import unwrap

    rows = t.train_rows.take(np.arange(min(n, len(t.train_rows))))
    imgs, _, _ = t.data.gather(rows)
    x = to_float(imgs.to(t.device))
    views = identity_views(len(x))
    teacher = t.outs.teacher
    xt = teacher_pixels(teacher, x, views)
    model = copy.deepcopy(unwrap(t.model))  # the plain module (not its DDP wrapper)
    xs = t.student_pixels(x, views, None)

    def step() -> None:
        with t.autocast():
            out = model(xs)
        out.float().sum().backward()

    return Costs(teacher=seconds_per_image(lambda: teacher.encode_images(xt), len(x)),
                 student=seconds_per_image(step, len(x)))


def resolve_teaching(t: "Trainer") -> Teaching:
    """The teaching mode of this run (see the module docstring), logged with its costs."""
    cfg = t.cfg
    if not t.method.uses_teacher:
        return Teaching("none", t)
    augmented = t.aug.name != "none" or cfg.mixup > 0
    mode = cfg.teaching
    if mode == "auto":
        mode = "cached" if not augmented else _auto(t)
    elif mode == "cached" and augmented and t.dist.is_main:
        log.warning("--teaching cached with --augment %s / --mixup %g: the student's targets are the teacher's "
                    "view of the plain image, not of the view it is shown (the study's way; see --teaching)",
                    cfg.augment, cfg.mixup)
    teaching = Teaching(mode, t)
    if mode == "views":
        _prepare_views(t, teaching)
    return teaching


def _auto(t: "Trainer") -> str:
    """online, unless the teacher costs more than the student's step and K views < epochs."""
    from ..core.distributed import broadcast_choice

    cfg = t.cfg
    choice = None
    if t.dist.is_main:
        costs = _measure(t)
        n = len(t.train_rows)
        per = {m: costs.per_epoch(n, m, cfg.views, cfg.epochs) for m in ("cached", "online", "views")}
        choice = costs.pick(cfg.views, cfg.epochs)
        log.info("teaching auto -> %s: the teacher takes %.2f ms per image, a student step %.2f ms; seconds per "
                 "epoch of %d images: online %.1f, views %.1f (%d views embedded once, spread over %d epochs), "
                 "cached %.1f (targets of the plain images only)", choice, costs.teacher * 1e3,
                 costs.student * 1e3, n, per["online"], per["views"], cfg.views, cfg.epochs, per["cached"])
        t.teaching_costs = {"teacher_ms_per_image": costs.teacher * 1e3, "student_ms_per_image": costs.student * 1e3,
                            **{f"seconds_per_epoch_{m}": v for m, v in per.items()}}
    return broadcast_choice(choice, ("online", "views"), t.dist, t.device)


def _prepare_views(t: "Trainer", teaching: Teaching) -> None:
    from ..core.distributed import main_first

    def fill() -> None:  # rank 0 embeds the views; the others then find them complete
        cfg = t.cfg
        for s, name in enumerate(t.data.names):
            if name not in cfg.data:
                continue
            n = len(t.data.images[s])
            teaching.view_params[s] = view_parameters(n, cfg.views, t.aug, cfg.seed, s)
            teaching.view_caches[s] = _fill_views(t, s, teaching.view_params[s])

    main_first(t.dist, fill, "embedding the teaching views")
