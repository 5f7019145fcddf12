"""RESULTS.md, results.json and one bar chart per question, from results on disk.

Every number here is read from a run's `result.json` (or `teacher_eval.json`); the
study's published figures appear only in their own column. A row trained over several seeds
shows mean ± standard deviation (sample std) with every seed's value in results.json, and
plots get error bars; a difference smaller than the seeds' spread is said to be so."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

from ..core import atomic
from .experiments import EXPERIMENTS, QUESTIONS, Experiment

# One seed on 2,000 test images: the binomial standard error of an accuracy near 90% is about
# 0.7 points, so a single-seed difference under this is not read as a finding.
SINGLE_SEED_NOISE = 1.0


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def accuracy_cell(r: dict) -> str:
    if r.get("test_accuracy_std") is not None:
        return f"{r['test_accuracy']:.2f} ± {r['test_accuracy_std']:.2f}"
    return _fmt(r["test_accuracy"])


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
        if q.key == "recipe":
            lines += ablation_table(records, rows) + [""]
        cols = ["Experiment Name", "Student Model", "Teacher Model", "Data Used", "Method", "Test Accuracy", "Seeds",
                "Teacher Agreement", "Train Seconds"] + (["Study (published)"] if show_published else [])
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            cells = [r["name"] + (" *" if r.get("beyond") else ""), r["student"], r["teacher"], r["data"], r["method"],
                     accuracy_cell(r), str(len(r.get("seeds") or [])) if r["student"] != "-" else "-",
                     _fmt(r.get("teacher_agreement")), _fmt(r.get("train_seconds"), 1)]
            if show_published:
                cells.append(_fmt(r.get("published")))
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
        plots[q.key] = _plot(rows, q.title, out / f"plot_{q.key}")
        lines += [f"![{q.key}](plot_{q.key}.svg)", ""]
    if any(r.get("beyond") for r in records):
        lines += ["`*` beyond the study: not one of its rows.", ""]
    if any(len(r.get("seeds") or []) == 1 for r in records if r["student"] != "-"):
        lines += [f"Rows with one seed: a difference under about {SINGLE_SEED_NOISE:g} point is within what another "
                  f"seed gives (`reproduce --seeds 3` measures the spread).", ""]
    text = "\n".join(lines)
    atomic.write_text(out / "RESULTS.md", text)
    return {"markdown": text, "plots": plots}


def ablation_table(records: list[dict], rows: list[dict]) -> list[str]:
    """Which change bought what: each recipe step against the row it names (`compare_to`:
    the step before it, the first against the study's best row), with a verdict the seeds'
    spread supports; a row that compares to nothing (the zero-label one) has no gain."""
    by_name = {r["name"]: r for r in records}
    lines = ["| Step | Change | Test accuracy | Gain over the step above |", "|---|---|---|---|"]
    base = by_name.get(EXPERIMENTS.get(rows[0]["name"]).compare_to) if rows else None
    if base is not None:
        lines.append(f"| {base['name']} | the study's best row (its settings, this suite's size) | "
                     f"{accuracy_cell(base)} | - |")
    for r in rows:
        e = EXPERIMENTS.get(r["name"])
        ref = by_name.get(e.compare_to)
        lines.append(f"| {r['name']} | {e.change} | {accuracy_cell(r)} | {_gain(ref, r) if ref else '-'} |")
    return lines


def _gain(a: dict, b: dict) -> str:
    d = b["test_accuracy"] - a["test_accuracy"]
    sa, sb = a.get("test_accuracy_std"), b.get("test_accuracy_std")
    if sa is not None and sb is not None:
        noise = math.sqrt((sa ** 2 + sb ** 2) / 2)
        verdict = "" if abs(d) > 2 * noise else " (within the seeds' spread)"
    else:
        verdict = "" if abs(d) > SINGLE_SEED_NOISE else " (one seed: within noise)"
    return f"{d:+.2f}{verdict}"


def _plot(rows: list[dict], title: str, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    acc = [r["test_accuracy"] if r["test_accuracy"] is not None else 0.0 for r in rows]
    err = [r.get("test_accuracy_std") or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(rows) + 1), 3.6))
    bars = ax.bar(range(len(rows)), acc, yerr=err if any(err) else None, capsize=4, color="#4c72b0",
                  label="clipdistill" + (" (mean ± std over seeds)" if any(err) else ""))
    pub = [r.get("published") for r in rows]
    if any(p is not None for p in pub):
        ax.scatter([i for i, p in enumerate(pub) if p is not None], [p for p in pub if p is not None], marker="_",
                   s=600, color="#c44e52", label="study (published)", zorder=3)
    if any(p is not None for p in pub) or any(err):
        ax.legend(loc="lower right", fontsize=8)
    for b, a, e in zip(bars, acc, err):
        ax.text(b.get_x() + b.get_width() / 2, a + e + 1, f"{a:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title[:90], fontsize=9)
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


def record(e: Experiment, suite: str, results: list[dict]) -> dict:
    """One results.json record from a row's results (one per seed for students; a run's
    result.json, or the teacher-eval JSON for teacher rows)."""
    result = results[0]
    if e.kind == "student":
        acc, acc_std = _mean_std([r["test_accuracy"] for r in results])
        agree, _ = _mean_std([r["teacher_agreement"] for r in results])
        secs, _ = _mean_std([r.get("train_seconds") for r in results])
        method = result["method"] + ("" if result["method"] == "labels" else f" ({result['head']} head)")
        return {"name": e.name, "question": e.question, "student": result["student"], "teacher": e.teacher_label,
                "data": result["data"], "method": method, "test_accuracy": acc, "test_accuracy_std": acc_std,
                "test_accuracy_per_seed": [r["test_accuracy"] for r in results],
                "seeds": [r.get("seed", 0) for r in results], "teacher_agreement": agree, "train_seconds": secs,
                "run_dirs": [r["run_dir"] for r in results], "run_dir": result["run_dir"],
                "published": e.published.get(suite), "beyond": e.beyond,
                "teaching": result.get("teaching"), "teacher_precision": result.get("teacher_precision"),
                "student_precision": result.get("student_precision")}
    key = "zero_shot_accuracy" if e.kind == "zero_shot" else "linear_probe_accuracy"
    return {"name": e.name, "question": e.question, "student": "-", "teacher": e.teacher_label,
            "data": "train" if e.kind == "linear_probe" else "-",
            "method": "text prompts" if e.kind == "zero_shot" else "linear probe",
            "test_accuracy": result[key], "test_accuracy_std": None, "teacher_agreement": None,
            "train_seconds": None, "run_dir": str(Path(result["path"]).parent), "published": e.published.get(suite),
            "beyond": e.beyond, "teacher_precision": (result.get("teacher") or {}).get("precision")}
