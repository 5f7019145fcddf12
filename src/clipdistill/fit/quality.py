"""How good is the student, without a single label, and when should it say "none of these"?

Measured on the held-out pool images (the rows that picked `best`, never trained on):
- agreement with the teacher, and the confusion matrix of the student's classes against the
  teacher's (where they disagree is where to look), with a contact sheet of disagreements;
- a reject threshold. Pools and cameras show things no prompt describes. The teacher tells
  them apart by its cosine similarity to the best prompt (a softmax over the prompts cannot:
  it always sums to one). Its "matches a prompt" call is that similarity above a cut found
  without labels, Otsu's split of the pool's similarities into two groups. The student's
  threshold on its own top probability (what `predict` sees in the model's output) is then the
  one that best reproduces the teacher's call on the held-out images (balanced accuracy)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.metrics import agreement, percent
from ..deploy.reject import calibrate_reject, otsu, softmax
from ..teacher.curate import best_similarity

log = logging.getLogger(__name__)


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
    top = softmax(student_logits.astype(np.float64)).max(1)
    reject = calibrate_reject(top, match)
    return {
        "held_out_images": int(len(s_pred)),
        "agreement": agreement(s_pred, t_pred),
        "agreement_where_teacher_matches": agreement(s_pred[match], t_pred[match]) if match.any() else None,
        "confusion_vs_teacher": {"rows": "teacher's class", "columns": "student's class", "classes": classes,
                                 "counts": confusion.tolist()},
        "teacher_similarity_cut": cut,
        "pool_matching_share": percent(pool_similarity >= cut),
        **reject,
        "rejected_share_held_out": percent(top < reject["reject_threshold"]),
    }


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
