"""Curation: which pool images to train on, chosen by the teacher from its cached embeddings.

NVIDIA's clip-distillation project (https://github.com/NVIDIA-AI-IOT/clip-distillation), whose
steps `clipdistill fit-prompts` follows, finds its training images by searching LAION with CLIP
for each prompt. This is the offline equivalent, over a pool already on disk: every pool image
is scored against the prompts (softmax of the scaled cosine similarities, the teacher's zero-shot
probabilities), ranked per prompt, and kept by a probability threshold and/or the top N per
class. Images that match no prompt (below the threshold) are either kept as negatives,
trained on with the teacher's soft targets, which teaches the student what none of the
classes looks like, or dropped. The result is a list of rows of the embedding cache (nothing
is copied), saved with the pool's fingerprint so a changed pool is never curated by an old
list; contact sheets show what was chosen.

The probability threshold cannot say whether an image shows any prompted class at all (a softmax
over the prompts always sums to one; at the default --keep-threshold 0 every image is kept in its
best prompt's class). The teacher's own call for that is its cosine similarity to the best prompt
under a cut found without labels (Otsu's split, fit/quality.py uses the same one): the summary and
the sheets say how many images it puts there, so a sheet full of shapes no prompt names reads as
what it is, not as a broken curation."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ..core import atomic
from ..core.config import check, option
from ..core.errors import ConfigError
from ..core.metrics import otsu

log = logging.getLogger(__name__)

FORMAT = 1
NONE_SHEET = "none"  # sheets/none-top.png: the images matching no prompt; no class's sheet takes its name


@dataclasses.dataclass
class CurateOptions:
    keep_threshold: float = option(0.0, "curation: an image belongs to its best prompt when the teacher's probability "
                                        "for it is at least this (0 = every image belongs to its best prompt)")
    keep_top: int = option(0, "curation: keep at most N images per class, the teacher's most confident (0 = all)")
    negatives: str = option("keep", "curation: images that belong to no prompt (under --keep-threshold, or past "
                                    "--keep-top): keep them as negatives (trained on with the teacher's soft targets: "
                                    "they teach what none of the classes looks like) or drop them",
                            choices=["keep", "drop"])

    def _check_curation(self) -> None:
        check(0.0 <= self.keep_threshold < 1.0, "keep_threshold", "must be in [0, 1)")
        check(self.keep_top >= 0, "keep_top", "must be >= 0 (0 = no limit)")


def cosines(embeddings: np.ndarray, text: np.ndarray) -> np.ndarray:
    """(N, C) cosine similarity of each image embedding to each prompt's text embedding."""
    e = embeddings.astype(np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    t = text.astype(np.float32)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    return e @ t.T


def best_similarity(embeddings: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Each image's cosine similarity to its closest prompt: how much it looks like any of
    them at all (a softmax over the prompts cannot say: it always sums to one)."""
    return cosines(embeddings, text).max(axis=1)


def zero_shot_probs(embeddings: np.ndarray, text: np.ndarray, logit_scale: float) -> np.ndarray:
    """(N, C) softmax over the prompts of the scaled cosine similarities."""
    z = logit_scale * cosines(embeddings, text)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


@dataclasses.dataclass
class Curation:
    rows: np.ndarray  # cache rows to train on, sorted
    candidates: np.ndarray  # the readable rows that were scored
    assigned: np.ndarray  # per candidate: its best prompt's class index
    score: np.ndarray  # per candidate: the teacher's probability for it
    matched: np.ndarray  # per candidate: belongs to its best prompt (threshold and top-N)
    classes: list[str]
    options: dict
    similarity: Optional[np.ndarray] = None  # per candidate: cosine to its best prompt (shown on the sheets)

    @property
    def similarity_cut(self) -> Optional[float]:
        """The teacher's "matches a prompt" cut on `similarity` (None without similarities)."""
        return None if self.similarity is None else otsu(self.similarity)

    def no_prompt(self) -> Optional[np.ndarray]:
        """Per candidate: the teacher says it matches no prompt (cosine under the cut), whatever
        the probability threshold kept; None without similarities."""
        return None if self.similarity is None else self.similarity < self.similarity_cut

    def keeps_every_image(self) -> bool:
        """No threshold and no top-N: each image belongs to its best prompt, however unlike them."""
        return self.options["keep_threshold"] == 0 and not self.options["keep_top"]

    def teacher_call(self) -> Optional[dict]:
        """How many scored images the teacher says match no prompt, for the summary and REPORT.md."""
        none = self.no_prompt()
        if none is None:
            return None
        return {"similarity_cut": self.similarity_cut, "no_prompt": int(none.sum()),
                "no_prompt_share": float(none.mean() * 100) if none.size else float("nan")}

    def counts(self) -> dict:
        per_class = {c: int(((self.assigned == k) & self.matched).sum()) for k, c in enumerate(self.classes)}
        unmatched = int((~self.matched).sum())
        return {"scored": int(len(self.candidates)), "kept": int(len(self.rows)), "per_class": per_class,
                "negatives_kept": unmatched if self.options["negatives"] == "keep" else 0,
                "dropped": 0 if self.options["negatives"] == "keep" else unmatched}

    def summary(self) -> str:
        """One line for the console and REPORT.md. At --keep-threshold 0 "matching no prompt: 0"
        was true of the threshold only, and read as "the pool is all prompted classes"; the line
        says instead that every image was kept and how many of them the teacher says match no prompt."""
        c = self.counts()
        per = ", ".join(f"{k} {v}" for k, v in c["per_class"].items())
        head = f"curated {c['kept']} of {c['scored']} pool images: {per}; "
        call = self.teacher_call()
        said = "" if call is None else (f"by the teacher's cosine to the prompts (cut {call['similarity_cut']:.3f}), "
                                        f"{call['no_prompt']} of them ({call['no_prompt_share']:.0f}%) match no prompt")
        if self.keeps_every_image():
            return head + ("kept every image in its best prompt's class (--keep-threshold 0)"
                           + (f"; {said}, and the classes' edge sheets show them" if said else ""))
        under = (f"under --keep-threshold {self.options['keep_threshold']:g}"
                 + (f" or past --keep-top {self.options['keep_top']}" if self.options["keep_top"] else ""))
        return (head + f"{under}: " + (f"{c['negatives_kept']} kept as negatives" if self.options["negatives"] == "keep"
                                       else f"{c['dropped']} dropped") + (f"; {said}" if said else ""))


def curate(probs: np.ndarray, candidates: np.ndarray, classes: list[str], threshold: float = 0.0, top: int = 0,
           negatives: str = "keep", similarity: Optional[np.ndarray] = None) -> Curation:
    if negatives not in ("keep", "drop"):
        raise ConfigError(f"--negatives {negatives!r}: keep or drop")
    assigned = probs.argmax(axis=1)
    score = probs[np.arange(len(probs)), assigned]
    matched = score >= threshold
    if top:
        for k in range(len(classes)):
            idx = np.flatnonzero((assigned == k) & matched)
            if len(idx) > top:
                order = idx[np.argsort(-score[idx], kind="stable")]
                matched[order[top:]] = False
    keep = np.ones(len(candidates), bool) if negatives == "keep" else matched
    return Curation(rows=np.sort(candidates[keep]), candidates=candidates, assigned=assigned, score=score,
                    matched=matched, classes=list(classes), similarity=similarity,
                    options={"keep_threshold": threshold, "keep_top": top, "negatives": negatives})


def save(cur: Curation, path: str | Path, dataset_fingerprint: dict) -> Path:
    return atomic.write_json(path, {
        "format": FORMAT, "dataset": dataset_fingerprint, "split": "unlabeled", **cur.options,
        "counts": cur.counts(), "classes": cur.classes, "rows": [int(r) for r in cur.rows]})


def load_rows(path: str | Path, dataset_fingerprint: Optional[dict] = None) -> np.ndarray:
    """The curated rows of a saved curation, refused when it was made from another pool."""
    saved = atomic.read_json(path)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or not isinstance(saved.get("rows"), list):
        raise ConfigError(f"--rows {path}: not a curation written by clipdistill (format {FORMAT})")
    if dataset_fingerprint is not None and saved.get("dataset") != dataset_fingerprint:
        raise ConfigError(f"--rows {path}: made from another pool ({saved.get('dataset')}, now {dataset_fingerprint}); "
                          f"curate again (fit-prompts does it when the pool changes)")
    return np.asarray(saved["rows"], dtype=np.int64)


def write_sheets(cur: Curation, dataset, out_dir: str | Path, n: int = 24) -> list[Path]:
    """Per class, two sheets: the teacher's most confident kept images (`CLASS-top.png`) and
    the least confident ones still kept, at the threshold (`CLASS-edge.png`); plus the most
    confident of those matching no prompt (`none-top.png`): where the threshold may be wrong.
    At --keep-threshold 0 nothing is under the threshold, so `none-top.png` shows the images the
    teacher's cosine cut says match no prompt instead, and each edge sheet's title says how many of
    its class's kept images are such: those are the shapes of no prompted class the sheet shows.
    CLASS is the class's name made safe for a file, numbered where two would be the same or one
    would be `none` (data/sheets.py `sheet_stems`); each sheet's title says its class in full."""
    from ..data.sheets import contact_sheet, sheet_stems

    out = Path(out_dir)
    paths = []
    no_prompt = cur.no_prompt()
    every = cur.keeps_every_image() and no_prompt is not None

    def load(rows):
        return [dataset.load(int(r)) for r in rows]

    def cap(i: int, name: bool = False) -> str:  # at most 16 characters: a cell's width (p1.00 s.48)
        sim = f" s{cur.similarity[i]:.2f}".replace("s0.", "s.") if cur.similarity is not None else ""
        return (f"{cur.classes[cur.assigned[i]][:5]} " if name else "") + f"p{cur.score[i]:.2f}{sim}"

    for k, (c, safe) in enumerate(zip(cur.classes, sheet_stems(cur.classes, reserved=[NONE_SHEET]))):
        idx = np.flatnonzero((cur.assigned == k) & cur.matched)
        order = idx[np.argsort(-cur.score[idx], kind="stable")]
        kept = f"{c}: {len(idx)} kept" + (f" ({int(no_prompt[idx].sum())} with s<{cur.similarity_cut:.2f}: no prompt, "
                                          f"kept by --keep-threshold 0)" if every else "")
        for tag, pick in (("top", order[:n]), ("edge", order[::-1][:n][::-1])):
            paths.append(contact_sheet(load(cur.candidates[pick]), [cap(i) for i in pick],
                                       out / f"{safe}-{tag}.png",
                                       title=f"{kept}; {'most' if tag == 'top' else 'least'} confident "
                                             f"(p: teacher probability, s: cosine to the prompt)"))
    if every:  # nothing is under the threshold: show the teacher's own "no prompt" call
        none = np.flatnonzero(no_prompt)
        order = none[np.argsort(-cur.similarity[none], kind="stable")][:n]
        title = (f"matching no prompt by the teacher's cosine (s<{cur.similarity_cut:.2f}): {len(none)}, kept in their "
                 f"best prompt's class (--keep-threshold 0); the closest calls")
    else:
        none = np.flatnonzero(~cur.matched)
        order = none[np.argsort(-cur.score[none], kind="stable")][:n]
        title = f"matching no prompt (under the threshold): {len(none)} ({cur.options['negatives']}); the closest calls"
    paths.append(contact_sheet(load(cur.candidates[order]), [cap(i, name=True) for i in order],
                               out / f"{NONE_SHEET}-top.png", title=title))
    return paths
