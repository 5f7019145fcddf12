"""`clipdistill fit-prompts`: prompts + a pool of your images -> a deployable student.

Six stages, each of which writes its result atomically into OUT and is skipped when it is
already there for the same settings, so a killed run continues with the same command at the
stage (and, in training, the epoch) where it stopped:

1. index   the pool: distinct images, duplicates, broken files (data/pool.py)
2. embed   the teacher's embeddings of the pool (and of --eval), its zero-shot accuracy
3. curate  rank the pool per prompt, keep, count, contact sheets (teacher/curate.py)
4. train   the student on the curated rows, the teacher in the loop (distill/)
5. assess  agreement and confusion against the teacher, disagreements, reject threshold (quality.py)
6. export  ONNX (+ INT8) with the sidecar, checked against PyTorch (deploy/export.py)

then, with --eval DIR/unprompted/<what they are>/, one step after them, reused the same way:
lookalikes, what the exported model (as `predict` answers) passes those images as, and what the
teacher calls them (lookalikes.py). It is not a numbered stage: the "[k/6]" lines are what a person
(and benchmarks/kill_anywhere.py) follows, and it only measures what export wrote.

OUT/fit.json records each finished stage; OUT/REPORT.md (report.py) says what to trust, then where
everything is.

A stage's key is what it reads, by content: the flags, the lines of the prompt and template
files, the pool's images (their content hashes) and the --eval images (unprompted/'s by their
content too, for the lookalikes step only: they never train). The same command after an
edit therefore redoes what the edit touches and says what changed — an edited prompts file or
new photos in the pool train a new model (the earlier run is kept in OUT/previous-run) instead of
shipping the old one or refusing with advice the user cannot follow."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..core import atomic
from ..core.config import runtime_fields, to_dict
from ..core.locks import owned_folder
from .config import FitConfig
from .quality import FORMAT as QUALITY_FORMAT
from .report import report

log = logging.getLogger(__name__)

STAGES = ("index", "embed", "curate", "train", "assess", "export")
AFTER = ("lookalikes",)  # steps after the stages, recorded and reused as they are
STATE = "fit.json"


class Stages:
    """Which stages are done (for these settings), how long each took, and what is left."""

    def __init__(self, out: Path, key: dict, progress: bool):
        self.path, self.key, self.progress = out / STATE, key, progress
        saved = atomic.read_json(self.path) if self.path.is_file() else {}
        self.done: dict = saved.get("done", {}) if _result_part(saved.get("key")) == key else {}
        self.reused: set[str] = set()  # stages this call took from an earlier one (their seconds are that one's)
        self.t0 = time.time()

    @staticmethod
    def label(name: str) -> str:
        """"[k/6] name" for a stage, the name alone for a step after them."""
        return f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}" if name in STAGES else name

    def start(self, name: str, estimate: str = "") -> None:
        left = "" if not estimate else f" ({estimate})"
        log.info("%s%s", self.label(name), left)
        self._started = time.time()

    def reuse(self, name: str, *files, same: Optional[dict] = None) -> Optional[dict]:
        """The stage's earlier result if it finished for these settings, its files are there and
        its fields hold the values in `same` (the training it saw, the format it was written in)."""
        done = self.done.get(name)
        if done is not None and all(f and Path(f).exists() for f in files) and \
                all(done.get(k) == v for k, v in (same or {}).items()):
            log.info("%s: done earlier (%s)", self.label(name), self.path)
            self.reused.add(name)
            return done
        return None

    def drop(self, name: str) -> None:
        """Forget a stage's result (its input is gone: no unprompted/ any more)."""
        if self.done.pop(name, None) is not None:
            atomic.write_json(self.path, {"key": self.key, "done": self.done})

    def finish(self, name: str, result: dict, earlier_seconds: Optional[float] = None) -> dict:
        """Record a stage's result; `earlier_seconds`: the stage found its work done by an earlier
        call (train() reusing a finished run), which took that long: the time REPORT.md shows."""
        seconds = round(time.time() - self._started, 2)
        if earlier_seconds is not None:
            seconds = earlier_seconds
            self.reused.add(name)
        self.done[name] = {**result, "seconds": seconds}
        atomic.write_json(self.path, {"key": self.key, "done": self.done})
        return self.done[name]


def _stage_key(cfg: FitConfig) -> dict:
    """The flags that change a result, and what the named files hold (the pool and --eval enter
    through the index and the training run, which compare their images by content)."""
    from ..data.prompts import read_lines

    key = _result_part(to_dict(cfg))
    key["prompt_lines"] = read_lines(cfg.prompts, "--prompts")
    key["template_lines"] = read_lines(cfg.templates, "--templates") if cfg.templates else None
    return key


def _result_part(key):
    """A stage key without FitConfig's runtime fields (a key written before they were all left out
    still matches)."""
    if not isinstance(key, dict):
        return key
    runtime = runtime_fields(FitConfig)
    return {k: v for k, v in key.items() if k not in runtime}


POOL_HASHES = "pool-images.sha1"


def _note_pool_change(out: Path, hashes: list[str]) -> None:
    """Say how the pool changed since the last fit in OUT (images added and removed, by content),
    and remember this one's images for the next (20 bytes an image)."""
    path = out / POOL_HASHES
    now = bytes.fromhex("".join(sorted(hashes)))
    if path.is_file():
        before = path.read_bytes()
        if before == now:
            return
        old = {before[i:i + 20] for i in range(0, len(before), 20)}
        new = {now[i:i + 20] for i in range(0, len(now), 20)}
        log.info("the pool changed since the last fit-prompts in %s: %d images added, %d removed (by content); what "
                 "depends on it is done again", out, len(new - old), len(old - new))
    atomic.write_bytes(path, now)


def _set_aside_stale_run(tcfg, out: Path) -> None:
    """A training run in OUT made from other inputs or flags is not this fit's: it moves to
    OUT/previous-run (replacing an older one) and training starts again, saying why."""
    import shutil

    from ..distill.train import run_differences

    why = run_differences(tcfg)
    if not why:
        return
    run, previous = tcfg.run_dir().path, out / "previous-run"
    log.warning("%s was trained on other inputs or flags (%s); training again on what they are now. The earlier run "
                "is kept in %s until the next change.", run, "; ".join(why[:4]) + ("; ..." if len(why) > 4 else ""),
                previous)
    shutil.rmtree(previous, ignore_errors=True)
    run.rename(previous)


def _student_size(cfg: FitConfig, teacher) -> int:
    return cfg.student_size or min(int(teacher.image_size), 224)


def fit_prompts(cfg: FitConfig) -> dict:
    with owned_folder(cfg.out, "fit-prompts") as out:
        return _fit(cfg, out)


def _fit(cfg: FitConfig, out: Path) -> dict:
    from ..data.pool import index_pool
    from ..distill.train import train
    from ..teacher.curate import best_similarity, curate, save, write_sheets, zero_shot_probs
    from ..teacher.openclip_teacher import create_teacher
    from ..teacher.outputs import prepare_teacher_outputs

    stages = Stages(out, _stage_key(cfg), cfg.progress)
    t_start = time.time()

    stages.start("index")
    idx = index_pool(cfg.pool, cfg.cache_dir, progress=cfg.progress)
    _note_pool_change(out, idx.hashes)
    pool_counts = stages.finish("index", {**idx.counts(), "broken_files": idx.broken,
                                          "duplicate_files": idx.duplicates})
    log.info("pool: %s", idx.summary())

    stages.start("embed", f"{pool_counts['images']} images through {cfg.teacher}")
    teacher = create_teacher(cfg.teacher, cfg.pretrained, cfg.device, cfg.precision, cfg.cache_dir)
    size = _student_size(cfg, teacher)
    tcfg0 = cfg.train_config(size)
    outs = prepare_teacher_outputs(tcfg0, tcfg0, ["unlabeled", "test"], teacher=teacher, progress=cfg.progress,
                                   optional=("test",))
    pool = outs.datasets["unlabeled"]
    cache = outs.caches["unlabeled"]
    text = outs.text_embeddings.numpy()
    zero_shot = None
    if "test" in outs.datasets:
        import torch

        from ..teacher.heads import accuracy

        emb, labels = outs.labelled("test")
        keep = labels >= 0
        with torch.no_grad():  # as teacher-eval measures it
            zero_shot, _ = accuracy(outs.text_head(teacher.logit_scale)(torch.from_numpy(emb[keep])),
                                    torch.from_numpy(labels[keep]), len(outs.classes))
        log.info("teacher zero-shot on %s: %.2f%% (%d images)", cfg.eval, zero_shot, int((labels >= 0).sum()))
    stages.finish("embed", {"teacher": teacher.fingerprint(), "teacher_zero_shot_accuracy": zero_shot,
                            "classes": outs.classes, "prompts": outs.prompts})

    stages.start("curate")
    rows = cache.valid_indices()
    emb = np.asarray(cache.embeddings[rows], dtype=np.float32)
    probs = zero_shot_probs(emb, text, teacher.logit_scale)
    cur = curate(probs, rows, outs.classes, cfg.keep_threshold, cfg.keep_top, cfg.negatives,
                 similarity=best_similarity(emb, text))
    save(cur, cfg.curation_path, pool.fingerprint())
    # Training reads a copy named by its content: a run can never resume on other rows.
    digest = hashlib.sha1(np.asarray(cur.rows, dtype=np.int64).tobytes() + repr(pool.fingerprint()).encode())
    rows_file = out / "curations" / f"{digest.hexdigest()[:12]}.json"
    if not rows_file.is_file():
        save(cur, rows_file, pool.fingerprint())
    sheets = write_sheets(cur, pool, out / "sheets")
    # One sentence for the console and REPORT.md alike (what "matching no prompt" means at this threshold).
    curation = {**cur.counts(), "teacher_call": cur.teacher_call(), "summary": cur.summary()}
    log.info("%s; contact sheets in %s", curation["summary"], out / "sheets")
    stages.finish("curate", {**curation, "sheets": str(out / "sheets")})

    epochs = cfg.epochs_for(len(cur.rows))
    tcfg = cfg.train_config(size, rows=str(rows_file), epochs=epochs)
    stages.start("train", f"{epochs} epochs of {len(cur.rows)} images; the time left is logged after each epoch")
    _set_aside_stale_run(tcfg, out)
    earlier = (stages.done.get("train") or {}).get("seconds")
    res = train(tcfg, teacher=teacher)
    stages.finish("train", {k: res.get(k) for k in ("test_accuracy", "teacher_agreement", "teacher_test_accuracy",
                                                    "best_epoch", "teaching", "teaching_costs", "train_seconds")},
                  earlier_seconds=(earlier or res.get("train_seconds") or 0.0) if res.get("reused") else None)

    # Assessing and exporting are redone after a new training only (train() reused a finished run
    # when its result's epoch is the one they saw).
    fresh = {"best_epoch": res.get("best_epoch"), "train_seconds": res.get("train_seconds")}
    quality = stages.reuse("assess", tcfg.run_dir().path / "calibration.json",
                           same={"trained": fresh, "format": QUALITY_FORMAT})
    if quality is None:
        stages.start("assess")
        quality = stages.finish("assess", {**_assess(tcfg, teacher, out), "trained": fresh})
    exp = stages.reuse("export", out / "model.onnx", (stages.done.get("export") or {}).get("int8") if cfg.int8 else out,
                       same={"trained": fresh})
    if exp is None:
        stages.start("export")
        exp = stages.finish("export", {**_export(cfg, tcfg), "trained": fresh})
    else:  # the model is the one exported earlier; the bundle follows this run's --bundle
        from ..deploy.bundle import write_for

        exp = {**exp, "bundle": write_for(cfg, [Path(exp["onnx"])] + ([Path(exp["int8"])] if exp.get("int8") else []))}

    look = _lookalikes(cfg, stages, teacher, text, outs.classes, quality, exp, fresh)
    summary = {"out": str(out), "pool": pool_counts, "teacher_zero_shot_accuracy": zero_shot,
               "curation": curation, "student": {k: res.get(k) for k in ("test_accuracy", "teacher_agreement",
                                                                            "best_epoch", "teaching")},
               "quality": {**quality, "unprompted": look}, "export": exp, "sheets": [str(p) for p in sheets],
               "seconds": {k: stages.done[k].get("seconds") for k in STAGES + AFTER if k in stages.done},
               "done_earlier": [k for k in STAGES + AFTER if k in stages.reused],
               "wall_seconds": round(time.time() - t_start, 1)}
    atomic.write_json(out / "summary.json", summary)
    atomic.write_text(out / "REPORT.md", report(summary, cfg))
    return summary


def _assess(tcfg, teacher, out: Path) -> dict:
    """The label-free report and the reject threshold, on the held-out pool rows: the run's context
    with its best checkpoint loaded (not a trainer: nothing is timed, the caches hold the teacher's
    outputs)."""
    from ..distill.context import RunContext
    from ..distill.evaluate import read_best
    from ..teacher.curate import best_similarity
    from .quality import assess, disagreement_sheet

    ctx = RunContext(tcfg, teacher=teacher)
    ctx.load_checkpoint(read_best(ctx.run), ctx.run.best)
    s, t, _ = ctx.predict(ctx.val_rows)
    k = ctx.data.names.index("unlabeled")
    rows = ctx.val_rows.row
    text = ctx.outs.text_embeddings.numpy()
    cache = ctx.outs.caches["unlabeled"]
    pool_sim = best_similarity(np.asarray(cache.embeddings[cache.valid_indices()], dtype=np.float32), text)
    q = assess(s.numpy(), np.asarray(ctx.data.emb[k][rows], dtype=np.float32), text, t.numpy(), pool_sim,
               ctx.outs.classes)
    sheet = disagreement_sheet(ctx.outs.datasets["unlabeled"], rows, s.numpy(), t.numpy(), ctx.outs.classes,
                               out / "sheets" / "disagreements.png")
    q["disagreements_sheet"] = str(sheet)
    atomic.write_json(ctx.run.path / "calibration.json", {
        "reject_threshold": q["reject_threshold"], "score": "top softmax probability of the model's output",
        "calibrated_on": f"{q['held_out_images']} held-out pool images, against the teacher's similarity cut "
                         f"{q['teacher_similarity_cut']:.3f}", "balanced_agreement": q["balanced_agreement"]})
    matching = q["agreement_where_teacher_matches"]
    log.info("label-free: the student agrees with the teacher on %s of the %d held-out pool images the teacher "
             "matches to a prompt (%.1f%% of all %d); reject below top probability %.3f (reproduces the teacher's "
             "'none of these' call at %s%% balanced agreement)",
             "-" if matching is None else f"{matching:.1f}%", q["teacher_matching_held_out"], q["agreement"],
             q["held_out_images"], q["reject_threshold"],
             f"{q['balanced_agreement']:.1f}" if q["balanced_agreement"] is not None else "-")
    return q


def _lookalikes(cfg: FitConfig, stages: Stages, teacher, text: np.ndarray, classes: list[str], quality: dict,
                exp: dict, fresh: dict) -> Optional[dict]:
    """The look-alikes in --eval's unprompted/ (lookalikes.py), measured again only when those
    images, the model or the teacher's cut changed; None without any."""
    from .lookalikes import FORMAT, content_digest, measure, unprompted_folders, worst_words

    folders = unprompted_folders(cfg.eval)
    if not folders:
        stages.drop("lookalikes")
        return None
    same = {"trained": fresh, "format": FORMAT, "images_sha1": content_digest(folders),
            **{k: quality[k] for k in ("reject_threshold", "teacher_similarity_cut")}}
    look = stages.reuse("lookalikes", exp["onnx"], same=same)
    if look is None:
        stages.start("lookalikes", f"{len(folders)} folders of unprompted/ through {Path(exp['onnx']).name} and "
                                   f"the teacher")
        look = stages.finish("lookalikes", {**measure(exp["onnx"], folders, teacher, text, classes,
                                                      quality["teacher_similarity_cut"], cfg.embed_batch_size),
                                            **same})
    log.info("look-alikes (%d images of no prompted class in %s): %s; %s of them pass as a class", look["images"],
             look["folder"], worst_words(look),
             "-" if look["passed_share"] is None else f"{look['passed_share']:.0f}%")
    return look


def _export(cfg: FitConfig, tcfg) -> dict:
    from ..deploy.export import ExportConfig, export

    res = export(ExportConfig(run=str(cfg.run_path), out=str(Path(cfg.out) / "model.onnx"), int8=cfg.int8,
                              cache_dir=cfg.cache_dir, max_drop=100.0, bundle=cfg.bundle,
                              bundle_batch=cfg.bundle_batch))
    q = res.get("int8") or {}
    return {"onnx": res["path"], "sidecar": res["sidecar"], "int8": q.get("path"),
            "int8_accuracy": q.get("accuracy_int8"), "fp32_onnx_accuracy": q.get("accuracy_fp32"),
            "int8_agreement_with_fp32": q.get("agreement_with_fp32"),
            "parity_max_abs_diff": res["parity"]["max_abs_diff"], "bundle": res.get("bundle")}
