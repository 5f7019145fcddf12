"""One answer per image, and when it is "none of these".

`answer` gives the top k classes and the label: the top class, or `none of these` when its
probability is under the model's reject threshold. The threshold is calibrated when the model is
made (`otsu`, `calibrate_reject`: the teacher's "matches a prompt" call reproduced on the
student's top probability, the rule `answer` applies), by fit-prompts (fit/quality.py) and by a
re-prompted export (reprompt.py); predict and video apply it. numpy only: it runs on the device."""

from __future__ import annotations

import numpy as np

from ..core.metrics import otsu  # noqa: F401 (one home in core: curation uses it too)

NONE_LABEL = "none of these"


def answer(p: np.ndarray, classes: list[str], k: int, reject: float) -> dict:
    """One image's (or frame's) answer: the top k, and its label: the top class, or
    `none of these` when its probability is under `reject` (0 = never)."""
    order = np.argsort(-p, kind="stable")[:k]
    top = [{"class": classes[i], "prob": float(p[i])} for i in order]
    rejected = bool(reject > 0 and p[order[0]] < reject)
    return {"label": NONE_LABEL if rejected else top[0]["class"], "rejected": rejected, "top": top}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibrate_reject(student_top: np.ndarray, teacher_match: np.ndarray) -> dict:
    """The student's top-probability threshold that best reproduces the teacher's matches."""
    if teacher_match.all() or not teacher_match.any():
        return {"reject_threshold": 0.0, "balanced_agreement": None,
                "why": "the teacher finds every held-out image alike (all match or none): nothing to calibrate on"}
    u = np.unique(student_top)
    pos, neg = teacher_match.sum(), (~teacher_match).sum()
    acc = np.array([0.5 * (((student_top >= t) & teacher_match).sum() / pos + ((student_top < t) & ~teacher_match).sum()
                           / neg) for t in u])
    j = int(np.argmax(acc))
    # between the last value rejected and the first accepted, not on an observed value
    threshold = float((u[j - 1] + u[j]) / 2) if j > 0 else 0.0
    return {"reject_threshold": threshold, "balanced_agreement": float(acc[j] * 100)}
