"""OUT/REPORT.md: what a person needs before trusting the model, then where everything is.

Written from summary.json's numbers only (nothing is computed twice), in the order a person asks:
how often does it give the teacher's answer on images of my classes (the agreement where the
teacher matches a prompt, first and named as such; over every held-out image second, since that
one counts images of no prompted class, where the teacher's "class" is only the least unlike
prompt), how often does it say "none of these" and what passes anyway, which classes it mixes up.
The pool has no labels: "matches no prompt" is the teacher's call (its cosine to the best prompt
under a cut found without labels), and the report says so rather than pass it off as the truth.
Labelled images of things no prompt names (--eval's unprompted/, lookalikes.py) are the one place
where what passes as a class is known per kind of thing: their table follows, led by the worst."""

from __future__ import annotations

from pathlib import Path

from ..deploy.reject import NONE_LABEL
from .config import FitConfig
from .lookalikes import NO_PROMPT, worst_words


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{v:.2f}%"


def _share(n: int, of: int) -> str:
    return f"{n} of {of} ({100 * n / of:.0f}%)" if of else f"{n} of 0"


def trust_lines(q: dict) -> list[str]:
    """The agreements, the reject share per group, what passes as a class, the confused pairs."""
    a = q["answers_by_teacher_call"]
    counts, classes = a["counts"], a["columns"][:-1]
    prompted, none_row = counts[:-1], counts[-1]
    n_match, n_none = q["teacher_matching_held_out"], sum(none_row)
    rejected_match = sum(r[-1] for r in prompted)
    cut = q["teacher_similarity_cut"]
    balanced = q["balanced_agreement"]
    passing = sorted(((n, c) for c, n in zip(classes, none_row[:-1]) if n), reverse=True)
    pairs = ", ".join(f"{p['teacher']} -> {p['student']} {_share(p['images'], p['of'])}" for p in q["top_confusions"])
    u = q.get("unprompted")
    hidden = ("row of the table, where no label-free number can single them out: look at the class's sheets"
              if u is None else f"row of the table; the labelled ones in --eval's unprompted/ single them out: "
                                f"{worst_words(u)} (table below)")
    return [
        f"- **agreement with the teacher where it matches a prompt: {_pct(q['agreement_where_teacher_matches'])}** "
        f"of {n_match} held-out pool images (the teacher's cosine to its best prompt at least {cut:.3f}): how often "
        f"the model gives the teacher's class on images of your classes",
        f"- agreement over all {q['held_out_images']} held-out pool images: {_pct(q['agreement'])}; it also counts the "
        f"{n_none} that match no prompt, where the teacher's class is only the least unlike prompt",
        f"- \"none of these\" below top probability {q['reject_threshold']:.3f} "
        + (f"(reproduces the teacher's call at {balanced:.1f}% balanced agreement)" if balanced is not None
           else f"(never: {q.get('why', 'nothing to calibrate on')})")
        + f": {_pct(q['rejected_share_held_out'])} of the held-out pool images; {_share(none_row[-1], n_none)} of "
          f"those matching no prompt, {_share(rejected_match, n_match)} of those matching one",
        f"- images matching no prompt that still pass as a class: {_share(n_none - none_row[-1], n_none)}"
        + (": as " + ", ".join(f"{c} {_share(n, n_none)}" for n, c in passing) if passing else "")
        + "; look-alikes the teacher itself takes for a prompted class (a ring for a circle) are in that class's "
        + hidden,
        "- confused most (the teacher's class -> the student's, where the teacher matches a prompt): "
        + (pairs or "none"),
    ]


def eval_line(s: dict) -> str:
    """The labelled --eval images' numbers, or that there were none."""
    st, zero_shot = s["student"], s["teacher_zero_shot_accuracy"]
    if zero_shot is None:
        return ("- no --eval: test accuracy -, teacher zero-shot on --eval: - (nothing is labelled; the agreements "
                "above are what there is)")
    return (f"- labelled --eval images: test accuracy {_pct(st['test_accuracy'])}; teacher zero-shot on --eval: "
            f"{_pct(zero_shot)}; the student agrees with the teacher on {_pct(st['teacher_agreement'])} of them")


def answers_table(q: dict) -> list[str]:
    """answers_by_teacher_call as Markdown: each cell images (share of its row)."""
    a = q["answers_by_teacher_call"]
    lines = ["| the teacher's call | images | " + " | ".join(a["columns"]) + " |",
             "|---" * (len(a["columns"]) + 2) + "|"]
    for name, row in zip(a["rows"], a["counts"]):
        n = sum(row)
        cells = " | ".join(f"{v} ({100 * v / n:.0f}%)" if n and v else "0" for v in row)
        lines.append(f"| {name} | {n} | {cells} |")
    return lines + ["", f"Held-out pool images (never trained on). Rows: the teacher's class where its cosine to the "
                        f"best prompt is at least {q['teacher_similarity_cut']:.3f}, else \"matches no prompt\" (the "
                        f"pool has no labels: that is the teacher's call). Columns: the model's answer as `predict` "
                        f"gives it, with the reject threshold. The diagonal is agreement; the last column, rejected. "
                        f"The last row: what the images the teacher calls no prompt pass as; an image of an "
                        f"unprompted class that the teacher matches to a prompt counts in that prompt's row."]


def unprompted_table(u: dict) -> list[str]:
    """--eval's unprompted/ folders as Markdown, led by the worst look-alike: each folder's images
    answered by the model as `predict` answers (a class, or "none of these"), then the teacher's
    own call on them; each cell images (share of the folder)."""
    classes = u["classes"]

    def cell(v: int, n: int) -> str:
        return f"{v} ({100 * v / n:.0f}%)" if n and v else "0"

    lines = [f"Images of no prompted class (--eval's unprompted/): **{worst_words(u)}**; "
             f"{_pct(u['passed_share'])} of all {u['images']} there pass as a class.", "",
             "| images of no prompted class | images | " + " | ".join(classes) + f" | {NONE_LABEL} | "
             "the teacher matches a prompt |", "|---" * (len(classes) + 4) + "|"]
    for g in u["groups"]:
        n, calls = g["images"], g["teacher"]
        called = ", ".join(f"{c} {calls[c]}" for c in sorted(classes, key=lambda c: -calls[c]) if calls[c])
        lines.append(f"| {g['name']} | {n} | " + " | ".join(cell(g["answers"][c], n) for c in [*classes, NONE_LABEL])
                     + f" | {cell(n - calls[NO_PROMPT], n)}" + (f": {called}" if called else "") + " |")
    return lines + ["", f"Labelled images in {u['folder']}/<what they are>/ (never trained on), answered by "
                        f"{u['model']} as `predict` answers them (\"{NONE_LABEL}\" below top probability "
                        f"{u['reject_threshold']:.3f}). The last column is the teacher's own call on them (its "
                        f"cosine to the best prompt at least {u['teacher_similarity_cut']:.3f}), by class. A folder "
                        f"the teacher itself takes for a class is its look-alike, which the student learnt from it: "
                        f"a more specific prompt helps, not more training; one the teacher turns away but the "
                        f"model passes is the student's own error."]


def report(s: dict, cfg: FitConfig) -> str:
    p, c, st, q, e = s["pool"], s["curation"], s["student"], s["quality"], s["export"]
    lines = [
        f"# fit-prompts: {cfg.prompts}", "", "## What to trust", "", *trust_lines(q),
        eval_line(s),
        "", *answers_table(q), "", *([*unprompted_table(q["unprompted"]), ""] if q.get("unprompted") else []),
        "## The run", "",
        f"- pool: {p['files']} files, {p['images']} distinct images, {p['duplicates']} duplicates, "
        f"{p['broken']} broken (listed in fit.json)",
        f"- {c['summary']}; contact sheets: {Path(cfg.out) / 'sheets'}",
        f"- student: {cfg.student}, {cfg.method}, teaching {st['teaching']}, best epoch {st['best_epoch']}; "
        f"disagreements with the teacher: {q['disagreements_sheet']}",
        f"- model: {e['onnx']} (sidecar {e['sidecar']}); INT8: {e['int8'] or '-'} "
        f"(test accuracy {_pct(e['int8_accuracy'])}, fp32 ONNX {_pct(e['fp32_onnx_accuracy'])})",
        "- time: " + ", ".join(f"{k} {v:.0f} s" + (" (done by an earlier call)" if k in s.get("done_earlier", [])
                                                    else "") for k, v in s["seconds"].items() if v is not None)
        + f"; wall {s['wall_seconds']:.0f} s (this call)", "",
        f"Predict: `clipdistill predict --model {e['onnx']} IMAGES_OR_VIDEO`",
    ]
    return "\n".join(lines) + "\n"
