"""Which things no prompt names pass as a prompted class, measured on labelled look-alikes.

The held-out pool has no labels, so assess (quality.py) can only say what the images the
*teacher* calls "no prompt" pass as; an image of an unprompted class that the teacher itself
takes for a prompted one (a ring for a circle) hides in that class's row, where no label-free
number can single it out. A user who has a few labelled images of such things puts them in
`--eval DIR/unprompted/<what they are>/`, beside `DIR/test/`. This step answers each of them
with the exported model.onnx exactly as `clipdistill predict` answers (deploy/predict.py's
`classify`, its reject threshold read from the model as `--reject auto` reads it, reject.py's
rule), and asks the teacher the same question (its cosine to the best prompt against the cut
assess found), so the report can say "cross passes as star on 94%, and the teacher itself
calls 90% of them a star": a look-alike the student learnt from the teacher, not its own error.

`unprompted/` is never a split: the folder dataset reads only `train/`, `unlabeled/` and `test/`
(data/datasets.py), the prompts are paired with `test/`'s folders, and training records only
those splits, so images added here re-run this step (keyed by their content) and nothing else.
A folder named as a prompted class (`unprompted/star/` beside `test/star/`) is refused when the
flags are read: images of a prompted class belong in `test/`."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.errors import ConfigError
from ..data.prompts import folder_key
from ..deploy.reject import NONE_LABEL

log = logging.getLogger(__name__)

FOLDER = "unprompted"
FORMAT = 1  # what measure() returns; a result of another format is measured again
NO_PROMPT = "matches no prompt"


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def unprompted_root(eval_dir: Optional[str]) -> Optional[Path]:
    """--eval's unprompted/ folder, or None without one (or without --eval)."""
    if not eval_dir:
        return None
    root = Path(eval_dir) / FOLDER
    return root if root.is_dir() else None


def _files(folder: Path) -> list[Path]:
    """Every visible file under `folder`, sorted, as `predict` lists a folder."""
    from ..deploy.predict import list_images

    return list_images([str(folder)])[0]


def unprompted_folders(eval_dir: Optional[str]) -> list[Path]:
    """The sub-folders of --eval's unprompted/ that hold files (each a row of the table), sorted."""
    root = unprompted_root(eval_dir)
    if root is None:
        return []
    return [d for d in sorted(root.iterdir()) if d.is_dir() and _visible(d) and _files(d)]


def check_unprompted(eval_dir: str, classes: Sequence[str]) -> None:
    """Refuse, when the flags are read (not after training), an unprompted/ that cannot be
    measured: loose files (what are they?) or a folder named as a prompted class, which
    `test/` holds (a case, space or punctuation difference does not make another name)."""
    root = unprompted_root(eval_dir)
    if root is None:
        return
    loose = [p.name for p in sorted(root.iterdir()) if p.is_file() and _visible(p)]
    if loose:
        raise ConfigError(f"--eval {eval_dir}: {root} holds files directly ({', '.join(loose[:3])}"
                          f"{', ...' if len(loose) > 3 else ''}); put images of things no prompt names in "
                          f"{root}/<what they are>/ (a folder per kind, e.g. {root}/ring/)")
    keys = {folder_key(c): c for c in classes}
    clash = [(d.name, keys[folder_key(d.name)]) for d in sorted(root.iterdir())
             if d.is_dir() and _visible(d) and folder_key(d.name) in keys]
    if clash:
        named = ", ".join(f"{FOLDER}/{a}/ has the name of test/{b}/" for a, b in clash)
        raise ConfigError(f"--eval {eval_dir}: {named}, a prompted class; {FOLDER}/ holds images of things no prompt "
                          f"names: move images of a prompted class to test/<class>/, or name the folder for what "
                          f"its images are")


def content_digest(folders: Sequence[Path]) -> Optional[str]:
    """What the folders hold, by content: each file's path under unprompted/ and its bytes (a
    file that cannot be read counts by its error), so an edit, a new image or a renamed folder
    measures again."""
    if not folders:
        return None
    from ..data.images import read_bytes

    h = hashlib.sha1()
    for folder in folders:
        for f in _files(folder):
            try:
                data = hashlib.sha1(read_bytes(f)).hexdigest().encode()
            except OSError as e:
                data = f"unreadable: {e}".encode()
            h.update(os.fsencode(f.relative_to(folder.parent)) + b"|" + data + b"\n")
    return h.hexdigest()


def _teacher_calls(teacher, images: list, text: np.ndarray, cut: float, batch_size: int) -> np.ndarray:
    """Per image: the teacher's class (its closest prompt) where its cosine to it is at least
    `cut`, else -1 (matches no prompt): the call assess calibrated the reject threshold on."""
    import torch

    from ..teacher.curate import cosines

    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([teacher.preprocess(im) for im in images[i:i + batch_size]])
        cos = cosines(teacher.encode_images(x).cpu().numpy(), text)
        out.append(np.where(cos.max(1) >= cut, cos.argmax(1), -1))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def measure(model: str, folders: Sequence[Path], teacher, text: np.ndarray, teacher_classes: Sequence[str],
            cut: float, batch_size: int = 64) -> dict:
    """Each folder's images answered by `model` (an exported ONNX file) as `predict --reject
    auto` answers them, and called by the teacher, as counts per answer and shares of the
    folder; `worst`: the folder and class with the largest share passed (None when none pass)."""
    from ..data.images import UnreadableImage, display_path, open_rgb
    from ..deploy.predict import PredictConfig, classify, open_model

    sess, meta = open_model(model)
    classes = list(meta["classes"])
    if list(teacher_classes) != classes:
        raise ConfigError(f"{model}: its classes ({', '.join(classes)}) are not the prompts' "
                          f"({', '.join(teacher_classes)}); export it again with fit-prompts")
    reject = PredictConfig(model=model).reject_threshold(meta)  # what `predict` uses: --reject auto
    groups, skipped = [], []
    for folder in folders:
        readable, images = [], []
        for f in _files(folder):
            try:
                images.append(open_rgb(f))
                readable.append(f)
            except (UnreadableImage, OSError) as e:  # predict skips it too; it is listed, not counted
                skipped.append({"path": display_path(f), "error": str(e) or type(e).__name__})
        answers = {c: 0 for c in [*classes, NONE_LABEL]}
        calls = {c: 0 for c in [*classes, NO_PROMPT]}
        if readable:
            res = classify(sess, meta, [str(f) for f in readable], top_k=1, batch_size=batch_size, reject=reject)
            for r in res["results"]:
                answers[r["label"]] += 1
            for k in _teacher_calls(teacher, images, text, cut, batch_size):
                calls[classes[k] if k >= 0 else NO_PROMPT] += 1
        n = sum(answers.values())
        groups.append({"name": folder.name, "images": n, "answers": answers, "teacher": calls,
                       "rejected_share": _pct(answers[NONE_LABEL], n),
                       "passed_share": _pct(n - answers[NONE_LABEL], n),
                       "teacher_matches_share": _pct(n - calls[NO_PROMPT], n)})
    for s in skipped:
        log.warning("warning: skipped %s: %s", s["path"], s["error"])
    total = sum(g["images"] for g in groups)
    passed = sum(g["images"] - g["answers"][NONE_LABEL] for g in groups)
    return {"format": FORMAT, "folder": str(folders[0].parent) if folders else None, "model": str(model),
            "reject_threshold": reject, "teacher_similarity_cut": float(cut), "classes": classes,
            "images": total, "passed_share": _pct(passed, total), "groups": groups, "worst": worst(groups, classes),
            "skipped_files": skipped}


def _pct(n: int, of: int) -> Optional[float]:
    return 100.0 * n / of if of else None


def worst(groups: list[dict], classes: Sequence[str]) -> Optional[dict]:
    """The look-alike passed most: the (folder, class) with the largest share of the folder's
    images answered as that class (the larger count first on a tie)."""
    best, rank = None, (0.0, 0)
    for g in groups:
        for c in classes:
            n = g["answers"][c]
            if n and (n / g["images"], n) > rank:
                rank = (n / g["images"], n)
                best = {"name": g["name"], "class": c, "images": n, "of": g["images"],
                        "share": 100.0 * n / g["images"], "teacher_same": g["teacher"][c]}
    return best


def worst_words(u: dict) -> str:
    """The worst look-alike in words, for the console and REPORT.md: "cross passes as star on 94%
    (47 of 50; the teacher calls 45 of them star)"."""
    w = u.get("worst")
    if w is None:
        return f"none of the {u['images']} images passes as a prompted class"
    return (f"{w['name']} passes as {w['class']} on {w['share']:.0f}% ({w['images']} of {w['of']}; the teacher "
            f"itself calls {w['teacher_same']} of them {w['class']})")
