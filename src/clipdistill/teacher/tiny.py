"""The tiny teacher: a real `open_clip.CLIP`, pre-trained here on shapes10 captions.

No weights can be downloaded on the project's machines, so the offline world brings its own
teacher. `tiny-shapes` is an open_clip model config shipped in this package (a small timm
CNN image tower, a small text transformer, open_clip's standard tokenizer). Once
`register_model_configs()` has run, it is used exactly like ViT-B-32:

    model, _, preprocess = open_clip.create_model_and_transforms("tiny-shapes", pretrained=path)
    tokenizer = open_clip.get_tokenizer("tiny-shapes")

Pre-training is CLIP's recipe in miniature: `open_clip.loss.ClipLoss` on (image, caption)
pairs from `shapes10.generate_captioned`, AdamW with warmup and a cosine decay, a learnable
logit scale. It is step-counted, seeded and runs on a fixed number of threads (one): float
sums are added in another order on another thread count, which gave another teacher (and a
demo table several points off on one row: README.md, "The offline world") whenever the
machine was busy. So a config gives a
bit-identical teacher on every machine with the same CPU model, busy or idle;
`ensure_tiny_teacher` caches it under a name that hashes the config, and its sha256 goes
into the sidecar and the demo report.

The image preprocessing is open_clip's default for a config without a pretrained tag (the
OpenAI mean/std, bicubic resize to 32, centre crop). open_clip 3.3 takes mean/std from a
pretrained *tag* or a `local-dir:` folder, never from a model config nor a checkpoint
file, so the teacher is trained with exactly the normalisation any loader will apply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..core.errors import ConfigError, NonFiniteLossError
from ..data.pixels import normalize_uint8

log = logging.getLogger(__name__)

TINY_NAME = "tiny-shapes"
MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


def register_model_configs() -> None:
    """Make the package's model configs (`tiny-shapes`) known to open_clip; idempotent."""
    import open_clip

    if TINY_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class TinyTeacherConfig:
    """How to pre-train `tiny-shapes`. Every field enters the cache name's hash."""

    size: int = 32  # image side, pixels; the model config's image_size is overridden if different
    steps: int = 1400
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    n_captions: int = 20000  # (image, caption) pairs, reused over epochs
    caption_seed: int = 4004  # shapes10.CAPTION_SEED: a seed no evaluation split uses
    seed: int = 0  # weights init and batch order
    threads: int = 1  # torch threads: fixed, since another count rounds differently (another teacher).
    # One thread is barely slower than two on an idle 2-core machine and does not crawl beside a busy
    # process (README.md, "The offline world", has the timings).
    augment: bool = False  # random flips/transposes (the classes are invariant to them): off, as
    # they widen the pose distribution beyond shapes10's roughly upright objects and slow learning

    def __post_init__(self):
        for name in ("size", "steps", "batch_size", "n_captions", "threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"tiny teacher {name}={getattr(self, name)}: must be positive")
        from .options import MAX_IMAGE_SIZE

        if self.size > MAX_IMAGE_SIZE:  # before 20,000 captioned scenes are rendered at that side
            raise ConfigError(f"tiny teacher size={self.size}: at most {MAX_IMAGE_SIZE} px (its scenes are rendered "
                              f"in memory at that side; 32 is the default)")
        if self.batch_size > self.n_captions:
            raise ConfigError(f"tiny teacher batch_size={self.batch_size} > n_captions={self.n_captions}")

    def short_hash(self) -> str:
        """Names the cached checkpoint: the config, the model config and the data version."""
        from ..data import shapes10

        model_cfg = json.loads((MODEL_CONFIG_DIR / f"{TINY_NAME}.json").read_text())
        blob = json.dumps({"cfg": asdict(self), "model_cfg": model_cfg, "data": shapes10.VERSION},
                          sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random element of the square's symmetry group per image ([N, H, W, C] uint8)."""
    n = x.shape[0]
    flips = torch.rand(n, 3, generator=g) < 0.5
    x = torch.where(flips[:, 0, None, None, None], x.flip(1), x)
    x = torch.where(flips[:, 1, None, None, None], x.flip(2), x)
    return torch.where(flips[:, 2, None, None, None], x.transpose(1, 2), x)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # As open_clip_train: no decay on gains, biases (all < 2-D), embeddings, the logit scale.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _adamw(params: list[dict], **kw) -> torch.optim.Optimizer:
    # The fused CPU kernel (torch >= 2.4) is several times faster here (README.md, "The offline
    # world"): the 49408-row token embedding gets a dense gradient every step, and the optimizer
    # step on it would cost as much as the text tower's forward.
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kw)


def _lr_at(step: int, cfg: TinyTeacherConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


def create_tiny_model(size: int = 32):
    """A randomly initialised `tiny-shapes` (model, eval preprocess, tokenizer)."""
    import open_clip

    register_model_configs()
    kw = {} if size == 32 else {"force_image_size": size}
    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights loaded": random init is the point here
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME, **kw)
    finally:
        logging.disable(logging.NOTSET)
    return model, preprocess, open_clip.get_tokenizer(TINY_NAME)


def pretrain_tiny_teacher(cfg: TinyTeacherConfig, out_path: str | os.PathLike, progress: bool = True) -> dict:
    """Pre-train `tiny-shapes` contrastively and write its state dict to `out_path`
    (`.safetensors`, or a torch file otherwise) plus a sidecar `.json` with the config and
    stats. Both are written atomically, sidecar first: the checkpoint's presence means done.
    Returns the stats, with the checkpoint's sha256."""
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save

    from ..core.atomic import write_bytes, write_json
    from ..core.progress import bar as progress_bar
    from ..core.state import tensors_sha256
    from ..data import shapes10

    t0 = time.perf_counter()
    images, captions, _ = shapes10.generate_captioned(cfg.n_captions, cfg.size, cfg.caption_seed)
    gen_seconds = time.perf_counter() - t0
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        model, _, tokenizer = create_tiny_model(cfg.size)
        pp = model.visual.preprocess_cfg
        images_t = torch.from_numpy(images)
        tokens = tokenizer(captions)

        model.train()
        model = model.to(memory_format=torch.channels_last)
        opt = _adamw(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        loss_fn = ClipLoss()
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(cfg.n_captions, generator=g)
        pos = 0
        losses: list[float] = []
        bar = progress_bar(range(cfg.steps), desc=f"pre-train {TINY_NAME}", enabled=progress, unit="step")
        for step in bar:
            if pos + cfg.batch_size > cfg.n_captions:  # new epoch, new order
                order, pos = torch.randperm(cfg.n_captions, generator=g), 0
            idx = order[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            x = images_t[idx]
            if cfg.augment:
                x = _dihedral(x, g)
            x = normalize_uint8(x, pp["mean"], pp["std"]).contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            img_f, txt_f, scale = model(x, tokens[idx])
            loss = loss_fn(img_f, txt_f, scale)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"tiny teacher pre-training diverged at step {step} (loss {loss.item()})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # as CLIP: the temperature never exceeds 100
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", scale=f"{scale.item():.1f}")
        bar.close()
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev_threads)

    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    stats = {
        "steps": cfg.steps,
        "seconds": round(seconds, 2),
        "generate_seconds": round(gen_seconds, 2),
        "final_loss": float(np.mean(losses[-20:])),
        "logit_scale": float(model.logit_scale.exp().item()),
        "threads": cfg.threads,
    }
    out_path = Path(out_path)
    blob = save(state, metadata={"model": TINY_NAME, "config": json.dumps(asdict(cfg))})
    stats["sha256"] = tensors_sha256(state)  # of the weights: the file's bytes vary with header order
    write_json(out_path.with_suffix(".json"), {
        "model": TINY_NAME,
        "config": asdict(cfg),
        "stats": stats,
        "classes": list(shapes10.CLASSES),
        "prompt_templates": list(shapes10.PROMPT_TEMPLATES),
        "preprocess": {k: pp[k] for k in ("size", "mean", "std", "interpolation", "resize_mode")},
        "open_clip": open_clip.__version__,
        "torch": torch.__version__,
    })
    write_bytes(out_path, blob)
    return stats


def tiny_teacher_path(cache_dir: str | os.PathLike, cfg: Optional[TinyTeacherConfig] = None) -> Path:
    cfg = cfg or TinyTeacherConfig()
    return Path(cache_dir) / "teachers" / f"{TINY_NAME}-{cfg.size}px-{cfg.short_hash()}.safetensors"


def save_random_tiny_teacher(path: str | os.PathLike, seed: Optional[int] = None) -> Path:
    """The tiny teacher's architecture with random (seeded) weights as a local checkpoint: what
    tests and benchmarks distil from when the teacher's quality does not matter, only its
    shapes and compute (nothing to pre-train, nothing to download). `seed`: the same weights
    every time (None: torch's current random state)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    register_model_configs()
    path = Path(path)
    if not path.exists():
        if seed is not None:
            torch.manual_seed(seed)
        model = open_clip.create_model("tiny-shapes")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def ensure_tiny_teacher(cache_dir: str | os.PathLike, cfg: Optional[TinyTeacherConfig] = None,
                        progress: bool = True) -> Path:
    """The cached checkpoint for `cfg`, pre-training it on the first call only.

    Two processes racing here both train and the second `os.replace` wins with identical
    content; a killed run leaves only a hidden temp file, never a partial checkpoint."""
    cfg = cfg or TinyTeacherConfig()
    path = tiny_teacher_path(cache_dir, cfg)
    if not path.is_file():
        log.info("tiny-shapes: first use, pre-training the teacher once (1-2 minutes on one CPU core); it is cached "
                 "as %s", path)
        pretrain_tiny_teacher(cfg, path, progress=progress)
    register_model_configs()  # so that the caller can open it by name right away
    return path


def read_sidecar(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The config and stats written beside a checkpoint by `pretrain_tiny_teacher`."""
    from ..core.atomic import read_json

    return read_json(Path(checkpoint).with_suffix(".json"))
