"""RESULTS.md, results.json and one bar chart per question, from results on disk.

Every number here is read from a run's `result.json` (or `teacher_eval.json`); the
study's published figures appear only in their own column."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..core import atomic
from .experiments import QUESTIONS, Experiment


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_report(records: list[dict], out: Path, suite: str, header: str = "") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "results.json", records)
    show_published = any(r.get("published") is not None for r in records)
    lines = [f"# clipdistill results: suite `{suite}`", ""]
    if header:
        lines += [header, ""]
    plots = {}
    for q in QUESTIONS:
        rows = [r for r in records if r["question"] == q.key]
        if not rows:
            continue
        lines += [f"## {q.title}", ""]
        cols = ["Experiment Name", "Student Model", "Teacher Model", "Data Used", "Method", "Test Accuracy",
                "Teacher Agreement", "Train Seconds"] + (["Study (published)"] if show_published else [])
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            cells = [r["name"] + (" *" if r.get("beyond") else ""), r["student"], r["teacher"], r["data"], r["method"],
                     _fmt(r["test_accuracy"]), _fmt(r.get("teacher_agreement")), _fmt(r.get("train_seconds"), 1)]
            if show_published:
                cells.append(_fmt(r.get("published")))
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
        plots[q.key] = _plot(rows, q.title, out / f"plot_{q.key}")
        lines += [f"![{q.key}](plot_{q.key}.svg)", ""]
    if any(r.get("beyond") for r in records):
        lines += ["`*` beyond the study: not one of its rows.", ""]
    text = "\n".join(lines)
    atomic.write_text(out / "RESULTS.md", text)
    return {"markdown": text, "plots": plots}


def _plot(rows: list[dict], title: str, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    acc = [r["test_accuracy"] if r["test_accuracy"] is not None else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(rows) + 1), 3.6))
    bars = ax.bar(range(len(rows)), acc, color="#4c72b0", label="clipdistill")
    pub = [r.get("published") for r in rows]
    if any(p is not None for p in pub):
        ax.scatter([i for i, p in enumerate(pub) if p is not None], [p for p in pub if p is not None], marker="_",
                   s=600, color="#c44e52", label="study (published)", zorder=3)
        ax.legend(loc="lower right", fontsize=8)
    for b, a in zip(bars, acc):
        ax.text(b.get_x() + b.get_width() / 2, a + 1, f"{a:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        p = stem.with_suffix(f".{ext}")
        tmp = p.with_name(f".{p.name}.tmp.{ext}")
        fig.savefig(tmp)
        tmp.replace(p)
        paths.append(str(p))
    plt.close(fig)
    return paths


def record(e: Experiment, suite: str, result: dict) -> dict:
    """One results.json record; `result` is a run's result.json or the teacher-eval JSON."""
    if e.kind == "student":
        return {"name": e.name, "question": e.question, "student": result["student"], "teacher": e.teacher_label,
                "data": result["data"], "method": result["method"] + f" ({result['head']} head)",
                "test_accuracy": result["test_accuracy"], "teacher_agreement": result["teacher_agreement"],
                "train_seconds": result.get("train_seconds"), "run_dir": result["run_dir"],
                "published": e.published.get(suite), "beyond": e.beyond, "seed": result.get("seed"),
                "teacher_precision": result.get("teacher_precision"),
                "student_precision": result.get("student_precision")}
    key = "zero_shot_accuracy" if e.kind == "zero_shot" else "linear_probe_accuracy"
    return {"name": e.name, "question": e.question, "student": "-", "teacher": e.teacher_label,
            "data": "train" if e.kind == "linear_probe" else "-",
            "method": "text prompts" if e.kind == "zero_shot" else "linear probe",
            "test_accuracy": result[key], "teacher_agreement": None, "train_seconds": None,
            "run_dir": str(Path(result["path"]).parent), "published": e.published.get(suite), "beyond": e.beyond,
            "teacher_precision": (result.get("teacher") or {}).get("precision")}
