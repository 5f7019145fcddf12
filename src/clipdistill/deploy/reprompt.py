"""New classes for an embedding student without retraining (`export --prompts`), and the reject
threshold that goes with them.

An embedding student learnt the teacher's image embedding, so any prompts the teacher can read
are a head for it: `reprompt` rebuilds the text head from the run's teacher's text embeddings of
the new prompts (the prompt file checked as fit-prompts checks its own,
`data.prompts.read_prompt_file`).

The reject threshold the run had (fit-prompts' calibration.json) was measured for the old
prompts, so a new one is calibrated for the new prompts as fit-prompts calibrates its own
(`calibrate_reprompted`): the teacher's cached embeddings of the run's images say which ones
match a new prompt, and the student's top probability on those images gives the threshold that
best reproduces that call. Without those embeddings there is nothing to calibrate on, and a
threshold that reproduces the call barely better than chance would reject good images as often
as others; in both cases the model never answers "none of these", and the record says so, why,
and how to get a threshold."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import ClipDistillError, ConfigError
from ..core.metrics import percent
from ..distill.record import HeadRecord, StudentRecord
from ..teacher.heads import build_head, head_spec
from .inputs import prepare
from .reject import calibrate_reject, otsu, softmax
from .run_images import run_dataset, subset

log = logging.getLogger(__name__)


@dataclasses.dataclass
class NewHead:
    """What `reprompt` makes: the re-headed checkpoint record, and the teacher and text embeddings
    that made it (the reject threshold is calibrated with them)."""

    record: StudentRecord
    spec: dict
    head: nn.Module
    teacher: object
    text: np.ndarray  # (classes, dim), normalised
    cache_dir: str
    prompts: list


def reprompt(record: StudentRecord, prompts: str, cache_dir: str) -> NewHead:
    """An embedding student's checkpoint record with a text head for new prompts: the student
    learnt the teacher's image embedding, so any prompts the teacher can read are a head for it."""
    from ..data.prompts import read_prompt_file
    from ..teacher.openclip_teacher import create_teacher
    from ..teacher.outputs import text_embeddings

    if record.output != "embedding":
        raise ConfigError(f"--prompts: this student learnt class logits ({record.method}), not the teacher's "
                          f"embedding; only an embedding student (--method mse or cosine) can take new prompts. "
                          f"Train one, or distil again with these prompts")
    lines = read_prompt_file(prompts, "--prompts", warn=False)  # warned when the config was made
    tcfg = record.config
    fp = record.teacher or {}
    teacher = create_teacher(tcfg["teacher"], tcfg.get("pretrained"), "cpu", fp.get("precision", "fp32"), cache_dir)
    if fp and teacher.fingerprint() != fp:
        raise ConfigError(f"--prompts: the run's teacher ({fp.get('model')}, {fp.get('weights')}) is not what loads "
                          f"here ({teacher.fingerprint().get('weights')}); give --cache-dir where it is")
    text = text_embeddings(teacher, lines, None, cache_dir)
    if text.shape[1] != record.embed_dim:
        raise ConfigError(f"--prompts: the teacher's text embeddings are {text.shape[1]}-d, the student's "
                          f"{record.embed_dim}-d")
    scale = float((record.head.logit_scale if record.head is not None else None) or teacher.logit_scale)
    spec = head_spec("text", len(lines), record.embed_dim, scale)
    head = build_head(spec, {"text": text})
    new = dataclasses.replace(record, num_classes=len(lines), classes=lines, prompts=lines,
                              head=HeadRecord("text", head.state_dict(), scale))
    log.info("re-prompted: %d classes from %s (%s text embeddings, logit scale %.1f)", len(lines), prompts,
             fp.get("model"), scale)
    return NewHead(new, spec, head, teacher, text.numpy().astype(np.float32), cache_dir, lines)


def _cached_splits(run_cfg: dict, teacher, cache_dir: str) -> dict:
    """split -> (dataset, its complete embedding cache, readable rows) for the run's splits whose
    teacher embeddings are in `cache_dir` (none is computed here: that is `clipdistill embed`'s job)."""
    from ..teacher.cache import EmbeddingCache, cache_path

    cached = {}
    for split in dict.fromkeys([*(run_cfg.get("data") or ["train"]), "test"]):
        try:
            ds = run_dataset(run_cfg, split, cache_dir, run_cfg.get("max_images", 0))
            cache = EmbeddingCache.load(cache_path(cache_dir, teacher.slug, ds.slug(), split), teacher.fingerprint(),
                                        ds.fingerprint())
        except (ClipDistillError, OSError) as e:  # missing, incomplete, damaged or another teacher's
            log.debug("no teacher embeddings of the run's %s split to calibrate on: %s", split, e)
            continue
        cached[split] = (ds, cache, cache.valid_indices())
    return cached


def _never_rejects(why: str, how: str) -> dict:
    return {"reject_threshold": 0.0, "score": "top softmax probability of the model's output",
            "why": f"this model never answers 'none of these': {why}", "how": how}


WEAK_AGREEMENT = 70.0  # balanced agreement (%, 50 = chance) under which a threshold is not shipped


def calibrate_reprompted(module: nn.Module, info: dict, run_cfg: dict, new: NewHead, max_images: int = 512,
                         seed: int = 0) -> dict:
    """The reject threshold for new prompts, found as fit-prompts finds its own (fit/quality.py):
    the teacher's best-prompt cosine similarity over every cached image of the run, split in two
    by Otsu's cut, is its "matches a prompt" call; the threshold on the student's top probability
    that best reproduces that call on up to `max_images` images is the model's. The images are the
    run's test split (never trained on) when it has enough, else its training images (the record
    says which). A threshold that reproduces the call at under WEAK_AGREEMENT balanced agreement
    would reject about as many images of the new classes as of others (a student that learnt the
    teacher loosely): it is not shipped, only named. Without the run's cached embeddings there is
    nothing to calibrate on. Either way the record says the model never rejects, why, and how to
    get a threshold."""
    from ..teacher.curate import best_similarity

    cached = _cached_splits(run_cfg, new.teacher, new.cache_dir)
    if not cached:
        return _never_rejects(
            f"the teacher embeddings of the run's images, which calibrate the threshold for new prompts, are not in "
            f"{new.cache_dir}",
            f"export again with --cache-dir set to where the run was trained ({run_cfg.get('cache_dir')}) or where "
            f"`clipdistill embed` has embedded its splits; or give `clipdistill predict --reject P` a probability "
            f"yourself")
    pool = np.concatenate([best_similarity(np.asarray(c.embeddings[v], dtype=np.float32), new.text)
                           for _, c, v in cached.values()])
    cut = otsu(pool)
    held = ["test"] if "test" in cached and len(cached["test"][2]) >= 50 else list(cached)
    rows = [(s, r) for s in held for r in cached[s][2]]
    pick = [rows[i] for i in subset(len(rows), max_images, seed)]
    emb, pixels = [], []
    for s in held:
        ds, cache, _ = cached[s]
        r = np.asarray([row for split, row in pick if split == s], dtype=np.int64)
        emb.append(np.asarray(cache.embeddings[r], dtype=np.float32))
        pixels.append(ds.pixels(info["trained_size"])[r])
    x = torch.from_numpy(prepare(np.concatenate(pixels), info["input"]))
    with torch.no_grad():
        logits = torch.cat([module(x[i:i + 128]) for i in range(0, len(x), 128)]).numpy()
    match = best_similarity(np.concatenate(emb), new.text) >= cut
    top = softmax(logits.astype(np.float64)).max(1)
    cal = calibrate_reject(top, match)
    where = (f"{len(pick)} images of the run's test split (never trained on)" if held == ["test"] else
             f"{len(pick)} of the run's training images ({', '.join(held)}: the student learnt the teacher on them, so "
             f"the threshold may reject too little)")
    record = {"reject_threshold": cal["reject_threshold"], "score": "top softmax probability of the model's output",
              "calibrated_on": f"{where}, against the teacher's similarity cut {cut:.3f} (Otsu, over {len(pool)} "
                               f"cached images of the run; {percent(match):.0f}% of the images match a "
                               f"prompt)",
              "balanced_agreement": cal["balanced_agreement"], "prompts": list(new.prompts),
              "rejected_share_held_out": percent(top < cal["reject_threshold"])}
    if not cal["reject_threshold"] > 0:
        record.update(_never_rejects(cal.get("why") or "no threshold on its top probability reproduces the teacher's "
                                     "'matches a prompt' call better than accepting every image",
                                     "add a prompt for what else the images show, or give `clipdistill predict "
                                     "--reject P` a probability yourself"))
        return record
    if cal["balanced_agreement"] < WEAK_AGREEMENT:  # a threshold that rejects about as many good images as others
        record.update(_never_rejects(
            f"its top probability follows the teacher's 'matches a new prompt' call at only "
            f"{cal['balanced_agreement']:.1f}% balanced agreement (50% = chance; {WEAK_AGREEMENT:.0f}% wanted), so any "
            f"threshold rejects about as many images of the new classes as of others",
            f"distil longer or on images like these (the student learnt the teacher's embedding too loosely), or use "
            f"the best threshold found anyway with `clipdistill predict --reject {cal['reject_threshold']:.4f}` (it "
            f"rejects {record['rejected_share_held_out']:.0f}% of the images it was calibrated on)"))
        record["weak_threshold"] = cal["reject_threshold"]
        return record
    log.info("reject threshold for the new prompts: top probability %.3f (%s; reproduces the teacher's 'none of "
             "these' call at %.1f%% balanced agreement, rejects %.0f%% of those images)", cal["reject_threshold"],
             record["calibrated_on"], cal["balanced_agreement"], record["rejected_share_held_out"])
    return record

