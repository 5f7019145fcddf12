"""The teacher: one wrapper over `open_clip.create_model_and_transforms`.

It takes a model name with a pretrained tag *or a local checkpoint path*, resolves the
weights before open_clip is called (so a machine without network fails in seconds with
the file to place, not after minutes of retries), and runs the encoders in batches under
`inference_mode` in the precision asked for. Its fingerprint (model, weights,
preprocess, precision) names every cache made from its outputs."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.device import dtype_of, precision_of, resolve_device, resolve_precision
from ..core.errors import ConfigError, MissingResourceError
from ..core.network import reachable
from ..core.registry import Registry
from .options import MAX_IMAGE_SIZE

log = logging.getLogger(__name__)

# `--precision auto` keeps bf16 on a CPU only if the embeddings stay this close to fp32's.
BF16_MIN_COSINE = 0.999

# Usual weights per model when --pretrained is not given (the study's teacher first).
DEFAULT_TAGS = {"ViT-B-32": "laion2b_s34b_b79k", "ViT-B-16": "laion2b_s34b_b88k", "ViT-L-14": "laion2b_s32b_b82k"}


@dataclass
class ResolvedWeights:
    """What to hand open_clip as `pretrained`, plus a stable id for fingerprints."""

    pretrained: Optional[str]
    weights_id: str
    slug: str
    preprocess_kwargs: dict


# A teacher entry turns (name, pretrained, cache_dir) into weights. Names not registered
# go to open_clip's own model list.
TEACHERS: Registry[Callable[[str, Optional[str], str], ResolvedWeights]] = Registry("teacher")


def file_id(path: Path) -> str:
    """sha256 of size + first and last MiB: cheap on a 600 MB checkpoint, and it changes
    when the weights are replaced."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _local_weights(name: str, path: str) -> ResolvedWeights:
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingResourceError(f"--pretrained {path}: no such file; give an open_clip checkpoint "
                                   f"(.safetensors, .bin or .pt) or a pretrained tag")
    return ResolvedWeights(str(p), f"file:{file_id(p)}", f"{name}-{p.stem}", {})


@TEACHERS.register("tiny-shapes")
def _tiny_shapes(name: str, pretrained: Optional[str], cache_dir: str) -> ResolvedWeights:
    from .tiny import ensure_tiny_teacher, register_model_configs

    register_model_configs()
    if pretrained:
        return _local_weights(name, pretrained)
    return _local_weights(name, str(ensure_tiny_teacher(cache_dir)))


def _hf_cached(repo_id: str, filenames: Sequence[str]) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache

    for fn in filenames:
        hit = try_to_load_from_cache(repo_id, fn)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _open_clip_weights(name: str, pretrained: Optional[str]) -> ResolvedWeights:
    import open_clip

    if name not in open_clip.list_models():
        raise ConfigError(f"--teacher {name!r} is not an open_clip model; valid names include "
                          f"{', '.join(sorted(DEFAULT_TAGS))}, tiny-shapes (all: python -c \"import open_clip; "
                          f"print(open_clip.list_models())\")")
    tag = pretrained or DEFAULT_TAGS.get(name) or next(iter(open_clip.list_pretrained_tags_by_model(name)), None)
    if tag is None:
        raise ConfigError(f"--pretrained: {name} has no published weights; give a checkpoint file")
    if os.path.sep in tag or tag.endswith((".safetensors", ".bin", ".pt", ".pth")) or Path(tag).is_file():
        return _local_weights(name, tag)
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name))
        raise ConfigError(f"--pretrained {tag!r} is not a tag of {name}; valid: {tags}, or a checkpoint path")
    pre = {"image_mean": cfg.get("mean"), "image_std": cfg.get("std"),
           "image_interpolation": cfg.get("interpolation"), "image_resize_mode": cfg.get("resize_mode")}
    pre = {k: v for k, v in pre.items() if v is not None}
    slug = f"{name}-{tag}"
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        hit = _hf_cached(repo_id, names)
        if hit:
            return ResolvedWeights(hit, f"{name}:{tag}", slug, pre)
        if not reachable("huggingface.co"):
            from huggingface_hub import constants

            raise MissingResourceError(
                f"weights for --teacher {name} --pretrained {tag} are not on this machine and huggingface.co "
                f"cannot be reached. Either copy the Hugging Face cache of repo {repo_id} (file {names[0]}) into "
                f"{constants.HF_HUB_CACHE} (or set HF_HOME), or download {names[0]} from "
                f"https://huggingface.co/{repo_id} and pass --pretrained /path/to/{names[0]}.")
        return ResolvedWeights(tag, f"{name}:{tag}", slug, pre)
    url = cfg.get("url", "")
    local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if local.is_file():
        return ResolvedWeights(str(local), f"{name}:{tag}", slug, pre)
    host = url.split("/")[2] if "://" in url else "openaipublic.azureedge.net"
    if not reachable(host):
        raise MissingResourceError(f"weights for --teacher {name} --pretrained {tag} are not on this machine and "
                                   f"{host} cannot be reached: download {url} elsewhere and place it at {local} "
                                   f"or pass --pretrained /path/to/{os.path.basename(url)}.")
    return ResolvedWeights(tag, f"{name}:{tag}", slug, pre)


def resolve_weights(name: str, pretrained: Optional[str], cache_dir: str) -> ResolvedWeights:
    if name in TEACHERS:
        return TEACHERS.get(name)(name, pretrained, cache_dir)
    return _open_clip_weights(name, pretrained)


class Teacher:
    """An OpenCLIP model used only for inference: image and text embeddings."""

    def __init__(self, name: str, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 weights: ResolvedWeights, device: torch.device, dtype: torch.dtype,
                 logit_scale: Optional[float] = None):
        self.name = name
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.weights = weights
        self.device = device
        self.dtype = dtype
        self._logit_scale = logit_scale

    @property
    def precision(self) -> str:
        return precision_of(self.dtype)

    @property
    def slug(self) -> str:
        return self.weights.slug if self.dtype == torch.float32 else f"{self.weights.slug}-{self.precision}"

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if getattr(self.model, "text_projection", None) is not None \
            else int(self.encode_texts(["x"]).shape[1])

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def to(self, device: torch.device) -> "Teacher":
        """Move to `device` (a torchrun rank's own GPU), keeping the precision."""
        device = torch.device(device)
        if device != self.device:
            self.model.to(device)
            self.device = device
        return self

    @property
    def logit_scale(self) -> float:
        """The scale CLIP learnt for its cosines (ViT-B-32 laion2b: 100, the clamp; tiny-shapes: about 15),
        as the checkpoint holds it: read before the weights are cast, since a bf16 copy of log(15.45)
        is log(15.40), and --logit-scale auto must be the teacher's own number on every machine."""
        if self._logit_scale is not None:
            return self._logit_scale
        return _learnt_scale(self.model)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the teacher's input, read from its own preprocess."""
        for t in getattr(self.preprocess, "transforms", []):
            if type(t).__name__ == "Normalize":
                return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
        return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def fingerprint(self) -> dict:
        return {"model": self.name, "weights": self.weights.weights_id, "preprocess": repr(self.preprocess),
                "precision": self.precision}

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return torch.autocast(self.device.type, enabled=False)

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) image embeddings as float32, like the study caches them."""
        x = images.to(self.device, non_blocking=True)
        if self.device.type != "cuda":
            x = x.to(self.dtype)
        with self._autocast():
            out = self.model.encode_image(x)
        return out.float()

    @torch.inference_mode()
    def encode_texts(self, prompts: Sequence[str], templates: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Normalised text embeddings, one row per prompt. With templates, each prompt is
        formatted into every template and the normalised embeddings are averaged, as
        open_clip's zero-shot classifier does."""
        templates = list(templates) if templates else ["{}"]
        rows = []
        for p in prompts:
            tokens = self.tokenizer([t.format(p) for t in templates]).to(self.device)
            with self._autocast():
                e = self.model.encode_text(tokens).float()
            rows.append(F.normalize(F.normalize(e, dim=-1).mean(0), dim=-1))
        return torch.stack(rows).cpu()


def _learnt_scale(model: torch.nn.Module) -> float:
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().float().exp()) if scale is not None else 100.0


def _bf16_agrees(model: torch.nn.Module, size: int, n: int = 8) -> float:
    """Smallest cosine between fp32 and bf16 image embeddings of `n` rendered shapes10
    scenes (real images, not noise, at the teacher's side and normalisation). The bf16 side runs
    on a copy: casting the model there and back would leave its fp32 weights rounded to bf16."""
    import copy

    from ..data.pixels import normalize_uint8
    from ..data.shapes10 import SPLITS, generate

    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = pp.get("mean", (0.48145466, 0.4578275, 0.40821073))
    std = pp.get("std", (0.26862954, 0.26130258, 0.27577711))
    x = normalize_uint8(torch.from_numpy(generate("test", n, size, SPLITS["test"].seed)[0]), mean, std)
    with torch.inference_mode():
        ref = model.encode_image(x).float()
        low = copy.deepcopy(model.visual).to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    return float(F.cosine_similarity(ref, low, dim=-1).min())


def check_image_size(name: str, size) -> None:
    """ConfigError when a teacher's input side (an int or a (h, w) pair) is over MAX_IMAGE_SIZE."""
    side = max(size) if isinstance(size, (tuple, list)) else size
    if not isinstance(side, int) or not 1 <= side <= MAX_IMAGE_SIZE:
        gb = side * side * 3 * 4 / 1e9 if isinstance(side, int) else float("nan")
        raise ConfigError(f"--teacher {name}: its model config says image_size {size!r}; a teacher's input side must "
                          f"be 1..{MAX_IMAGE_SIZE} px (open_clip's own models read 224 to 512): one image at {side} px "
                          f"is {gb:,.1f} GB of float32 before the model runs. Fix image_size in that model config.")


def _config_image_size(name: str):
    """The image side a registered open_clip model config says, None for a name it does not know
    (asked only of registered names: for an `hf-hub:` name open_clip would go to the network)."""
    import open_clip

    cfg = (open_clip.get_model_config(name) if name in open_clip.list_models() else None) or {}
    return (cfg.get("vision_cfg") or {}).get("image_size")


def _load(name: str, weights: ResolvedWeights):
    """open_clip's model and preprocess; any failure to load the weights is one message."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights.pretrained,
                                                                     **weights.preprocess_kwargs)
    except Exception as e:  # noqa: BLE001 - torch, safetensors, pickle and open_clip each raise their own
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise ConfigError(f"--pretrained {weights.pretrained}: could not load it into {name} "
                          f"({type(e).__name__}: {str(e)[:300]}). Is it an open_clip checkpoint of that "
                          f"architecture (.safetensors, .bin or .pt)?") from None
    return model, preprocess


def create_teacher(name: str = "tiny-shapes", pretrained: Optional[str] = None, device: str = "auto",
                   precision: str = "auto", cache_dir: Optional[str] = None) -> Teacher:
    import open_clip

    from ..core.config import default_cache_dir
    from .tiny import register_model_configs

    register_model_configs()
    configured = _config_image_size(name)
    if configured is not None:  # before the weights are even resolved: nothing big is built
        check_image_size(name, configured)
    cache_dir = cache_dir or default_cache_dir()
    dev = resolve_device(device)
    weights = resolve_weights(name, pretrained, cache_dir)
    model, preprocess = _load(name, weights)
    model.eval()
    size = model.visual.image_size
    check_image_size(name, size)  # what the built model says, should its config have said nothing
    size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def verify(candidate: str) -> bool:
        cos = _bf16_agrees(model, size)
        log.debug("teacher %s: min cosine bf16 vs fp32 = %.5f", name, cos)
        return cos >= BF16_MIN_COSINE

    dtype = dtype_of(resolve_precision(precision, dev, "teacher", verify))
    scale = _learnt_scale(model)  # in fp32, before the cast
    # On CUDA, autocast keeps norms in fp32; elsewhere low precision means low-precision weights.
    model.to(dev, dtype=dtype if dev.type != "cuda" else torch.float32)
    tokenizer = open_clip.get_tokenizer(name)
    return Teacher(name, model, preprocess, tokenizer, weights, dev, dtype, logit_scale=scale)
