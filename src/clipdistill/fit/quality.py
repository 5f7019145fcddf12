"""How good is the student, without a single label, and when should it say "none of these"?

Measured on the held-out pool images (the rows that picked `best`, never trained on):
- agreement with the teacher, and the confusion matrix of the student's classes against the
  teacher's (where they disagree is where to look), with a contact sheet of disagreements;
- a reject threshold. Pools and cameras show things no prompt describes. The teacher tells
  them apart by its cosine similarity to the best prompt (a softmax over the prompts cannot:
  it always sums to one). Its "matches a prompt" call is that similarity above a cut found
  without labels, Otsu's split of the pool's similarities into two groups. The student's
  threshold on its own top probability (what `predict` sees in the model's output) is then the
  one that best reproduces the teacher's call on the held-out images (balanced accuracy).

Agreement over every held-out image mixes in the images that match no prompt, where the teacher's
"class" is only the least unlike prompt: the number to trust is the agreement where the teacher
matches a prompt. Where the two part, and what the reject threshold lets through, is one table
(`answers_by_teacher_call`): the teacher's class (or "matches no prompt") against the model's
answer as `predict` gives it (a class, or "none of these"). Its last row is the open-set picture
without labels: which images of no prompted class pass as which class (a look-alike class takes
most of them). The top confused pairs come from the confusion where the teacher matches a prompt."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.metrics import agreement, percent
from ..deploy.reject import NONE_LABEL, calibrate_reject, otsu, softmax
from ..teacher.curate import best_similarity

log = logging.getLogger(__name__)

FORMAT = 2  # what assess() returns; an earlier one (fewer fields) is assessed again, not reported from
NO_PROMPT = "matches no prompt"


def assess(student_logits: np.ndarray, teacher_emb: np.ndarray, text_emb: np.ndarray, teacher_logits: np.ndarray,
           pool_similarity: np.ndarray, classes: list[str]) -> dict:
    """Everything above from arrays: the student's logits and the teacher's embeddings and
    logits on the held-out rows, the prompts' text embeddings, and the teacher's best-prompt
    cosine similarity on the whole pool (to place the cut)."""
    s_pred, t_pred = student_logits.argmax(1), teacher_logits.argmax(1)
    c = len(classes)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (t_pred, s_pred), 1)
    cut = otsu(pool_similarity)
    sim = best_similarity(teacher_emb, text_emb)
    match = sim >= cut
    matched = np.zeros((c, c), dtype=np.int64)
    np.add.at(matched, (t_pred[match], s_pred[match]), 1)
    top = softmax(student_logits.astype(np.float64)).max(1)
    reject = calibrate_reject(top, match)
    answers = answers_by_teacher_call(s_pred, top >= reject["reject_threshold"], t_pred, match, classes)
    return {
        "format": FORMAT,
        "held_out_images": int(len(s_pred)),
        "teacher_matching_held_out": int(match.sum()),
        "agreement_where_teacher_matches": agreement(s_pred[match], t_pred[match]) if match.any() else None,
        "agreement": agreement(s_pred, t_pred),
        "confusion_vs_teacher": {"rows": "teacher's class", "columns": "student's class", "classes": classes,
                                 "counts": confusion.tolist()},
        "confusion_where_teacher_matches": {"rows": "teacher's class", "columns": "student's class",
                                            "classes": classes, "counts": matched.tolist()},
        "top_confusions": top_confusions(matched, classes),
        "teacher_similarity_cut": cut,
        "pool_matching_share": percent(pool_similarity >= cut),
        **reject,
        "rejected_share_held_out": percent(top < reject["reject_threshold"]),
        "answers_by_teacher_call": answers,
    }


def answers_by_teacher_call(s_pred: np.ndarray, accepted: np.ndarray, t_pred: np.ndarray, match: np.ndarray,
                            classes: list[str]) -> dict:
    """Counts of the held-out images by the teacher's call (rows: its class where it matches a
    prompt, then "matches no prompt") and the model's answer (columns: a class it accepts, then
    "none of these"): each row's last cell is that group's reject share, the last row says what
    images of no prompted class pass as."""
    c = len(classes)
    rows = np.where(match, t_pred, c)
    cols = np.where(accepted, s_pred, c)
    counts = np.zeros((c + 1, c + 1), dtype=np.int64)
    np.add.at(counts, (rows, cols), 1)
    return {"rows": [*classes, NO_PROMPT], "columns": [*classes, NONE_LABEL], "counts": counts.tolist()}


def top_confusions(confusion: np.ndarray, classes: list[str], n: int = 3) -> list[dict]:
    """The `n` largest off-diagonal cells (the teacher's class -> the student's), with the size
    of the teacher's class, largest first."""
    m = np.asarray(confusion)
    off = m - np.diag(np.diag(m))
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = [divmod(int(k), len(classes)) for k in order]
    return [{"teacher": classes[i], "student": classes[j], "images": int(off[i, j]), "of": int(m[i].sum())}
            for i, j in pairs if off[i, j] > 0]


def disagreement_sheet(dataset, rows: np.ndarray, student_logits: np.ndarray, teacher_logits: np.ndarray,
                       classes: list[str], path: Path, n: int = 32) -> Optional[Path]:
    """The held-out images where the student and the teacher disagree, the teacher's most
    confident first (captions: teacher -> student)."""
    from ..data.sheets import contact_sheet

    s_pred, t_pred = student_logits.argmax(1), teacher_logits.argmax(1)
    t_top = softmax(teacher_logits.astype(np.float64)).max(1)
    idx = np.flatnonzero(s_pred != t_pred)
    idx = idx[np.argsort(-t_top[idx], kind="stable")][:n]
    return contact_sheet([dataset.load(int(rows[i])) for i in idx],
                         [f"{classes[t_pred[i]][:7]}>{classes[s_pred[i]][:7]}" for i in idx], path,
                         title=f"student disagrees with the teacher on {int((s_pred != t_pred).sum())} of "
                               f"{len(s_pred)} held-out pool images (teacher > student)")
