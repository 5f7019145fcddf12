"""`clipdistill reproduce` and `clipdistill demo`: run the study's experiments that are
missing, reuse those that are done, resume those that were interrupted, then write the
report. One teacher is loaded at most once, and only if something needs it."""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from pathlib import Path
from typing import Optional

from ..core import atomic
from ..core.config import check, config_diff, default_cache_dir, option, runtime_fields
from .experiments import EXPERIMENTS, SUITES, build_config, select
from .report import record, write_report

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReproduceConfig:
    suite: str = option("shapes10", "stl10 (the study: real teacher and data, GPU advised) or shapes10 (offline)",
                        choices=["stl10", "shapes10"])
    only: list[str] = option(default_factory=list, help="run only these experiments (see `clipdistill experiments`)")
    full: bool = option(False, "every experiment of the study, not the compact selection")
    recipe: bool = option(False, "add the recipe ablation (beyond the study: patience, consistent teaching, mixup, "
                                 "labels, zero labels), with its ablation table")
    seeds: int = option(1, "train every student row with seeds 0..N-1; the report shows mean ± std")
    out: str = option("", "report folder; default runs/reproduce-SUITE", metavar="DIR")
    cache_dir: str = option(default_factory=default_cache_dir, help="datasets, teachers and embeddings",
                            metavar="DIR")
    data_root: Optional[str] = option(None, "dataset files (stl10: the folder holding stl10_binary/)", metavar="DIR")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    epochs: int = option(0, "override every student's epochs (0: the suite's)")
    pretrained: Optional[str] = option(None, "override the suite teacher's weights (a local checkpoint file)",
                                       metavar="TAG|PATH")
    max_images: int = option(0, "use only the first N images of each split (0 = all): quick trials")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        SUITES.get(self.suite)
        for n in self.only:
            EXPERIMENTS.get(n)
        check(self.epochs >= 0, "epochs", "must be >= 0")
        check(self.seeds >= 1, "seeds", "must be >= 1")

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/reproduce-{self.suite}")


@dataclasses.dataclass
class DemoConfig:
    full: bool = option(False, "every row of the study (the text-head rows, the student sizes), not the compact "
                                    "selection")
    out: str = option("runs/demo", "report folder", metavar="DIR")
    cache_dir: str = option(default_factory=default_cache_dir, help="datasets, teachers and embeddings",
                            metavar="DIR")
    epochs: int = option(0, "override every student's epochs (0: the suite's)")
    seeds: int = option(1, "train every student row with seeds 0..N-1 (mean ± std)")
    progress: bool = option(True, "show progress bars")

    def reproduce_config(self) -> ReproduceConfig:
        return ReproduceConfig(suite="shapes10", full=self.full, out=self.out, cache_dir=self.cache_dir,
                               epochs=self.epochs, seeds=self.seeds, progress=self.progress, device="cpu")


# Settings of `reproduce` that change results: every row is built with them and the report
# header names them. (The rows' runtime fields that reproduce has, --device and so on, are passed through too.)
RESULT_OVERRIDES = ("epochs", "max_images", "pretrained")


def _runtime(cfg: ReproduceConfig) -> dict:
    """What every row's config takes from this one: its runtime fields, and the overrides set."""
    from ..distill.config import TrainConfig

    o = {k: getattr(cfg, k) for k in runtime_fields(TrainConfig) if hasattr(cfg, k) and getattr(cfg, k) is not None
         and k != "out"}
    o.update({k: getattr(cfg, k) for k in ("max_images", "pretrained") if getattr(cfg, k)})
    return o


def _student_config(cfg: ReproduceConfig, name: str, seed: int = 0):
    """One seed of one student row; its run folder is OUT/NAME/seedS."""
    extra = {"epochs": cfg.epochs} if cfg.epochs else {}
    return build_config(cfg.suite, name, **_runtime(cfg), out=str(cfg.out_dir() / name / f"seed{seed}"), seed=seed,
                        **extra)


def _teacher_config(cfg: ReproduceConfig, name: str):
    return build_config(cfg.suite, name, **_runtime(cfg), out=str(cfg.out_dir() / "teacher"))


def reproduce(cfg: ReproduceConfig) -> dict:
    from ..distill.train import train
    from ..teacher.evaluate import teacher_eval

    t0 = time.time()
    out = cfg.out_dir()
    exps = select(cfg.suite, cfg.only, cfg.full, cfg.recipe)
    teacher_box: dict = {}

    def teacher(c):
        # Shared across experiments: loaded once, and only when a cache must be filled.
        if "t" not in teacher_box:
            from ..teacher.openclip_teacher import create_teacher

            teacher_box["t"] = create_teacher(c.teacher, c.pretrained, c.device, c.precision, c.cache_dir)
        return teacher_box["t"]

    _preflight(cfg, exps)
    records, teacher_result = [], None
    for i, e in enumerate(exps, 1):
        if e.kind == "student":
            results = []
            for seed in range(cfg.seeds):
                log.info("[%d/%d] %s%s", i, len(exps), e.name, f" (seed {seed})" if cfg.seeds > 1 else "")
                tcfg = _student_config(cfg, e.name, seed)
                results.append(train(tcfg, teacher=None if _finished(tcfg) else teacher(tcfg)))
        else:
            log.info("[%d/%d] %s", i, len(exps), e.name)
            if teacher_result is None:
                ecfg = _teacher_config(cfg, e.name)
                teacher_result = _reuse_teacher_eval(ecfg) or teacher_eval(ecfg, teacher=teacher(ecfg))
            results = [teacher_result]
        records.append(record(e, cfg.suite, results))
    records = _with_other_finished_rows(cfg, exps, records)
    overrides = ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in RESULT_OVERRIDES if getattr(cfg, k))
    header = (f"Made by `clipdistill reproduce --suite {cfg.suite}` on {time.strftime('%Y-%m-%d')} "
              f"({platform.machine()}, {_cpu_name()}); "
              f"{SUITES.get(cfg.suite).description}." +
              (f" **Overridden for this report: {overrides}** (the suite's sizes above do not apply)." if overrides
               else ""))
    provenance = _provenance(cfg, records)
    header += "\n\n" + "\n".join(f"- {k}: {v}" for k, v in provenance.items())
    rep = write_report(records, out, cfg.suite, header)
    log.info("wrote %s, %s and %d plots in %.0f s", out / "RESULTS.md", out / "results.json", len(rep["plots"]),
             time.time() - t0)
    return {"records": records, "markdown": rep["markdown"], "out": str(out), "seconds": time.time() - t0,
            "provenance": provenance}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        platform.processor() or platform.system())
    except OSError:
        return platform.processor() or platform.system()


def _provenance(cfg: ReproduceConfig, records: list[dict]) -> dict:
    """What makes two reports comparable: the teacher's exact weights and the precisions
    the `auto` settings resolved to on this machine."""
    from ..core.state import weights_sha256
    from ..teacher.openclip_teacher import resolve_weights

    c = _teacher_config(cfg, "openclip_text")
    out = {}
    try:
        w = resolve_weights(c.teacher, c.pretrained, c.cache_dir)
        if w.pretrained and Path(w.pretrained).is_file():
            out["teacher weights"] = (f"`{Path(w.pretrained).name}`, sha256 of the weights "
                                      f"`{weights_sha256(w.pretrained)}`")
        else:
            out["teacher weights"] = f"{c.teacher} {w.weights_id}"
    except Exception as e:  # noqa: BLE001 - provenance must never lose a finished report
        out["teacher weights"] = f"unknown ({type(e).__name__})"
    teacher = sorted({r["teacher_precision"] for r in records if r.get("teacher_precision")})
    student = sorted({r["student_precision"] for r in records if r.get("student_precision")})
    out["precision"] = (f"teacher {', '.join(teacher) or '?'} (--precision {c.precision}), student "
                        f"{', '.join(student) or '?'} (--amp auto)")
    return out


def _with_other_finished_rows(cfg: ReproduceConfig, exps, records: list) -> list:
    """`--only` adds rows to a report, it does not erase the others: every other experiment
    of the suite already finished in this folder, with these settings, stays in it."""
    from ..distill.train import finished_result

    done = {e.name for e in exps}
    by_name = {r["name"]: r for r in records}
    for e in select(cfg.suite, full=True, recipe=True):
        if e.name in done:
            continue
        if e.kind == "student":
            results = [r for r in (finished_result(_student_config(cfg, e.name, s)) for s in range(cfg.seeds)) if r]
        else:
            results = [r for r in [_reuse_teacher_eval(_teacher_config(cfg, e.name))] if r]
        if results:
            by_name[e.name] = record(e, cfg.suite, results)
    return [by_name[n] for n in EXPERIMENTS if n in by_name]


def _preflight(cfg: ReproduceConfig, exps) -> None:
    """Say everything that must be downloaded or placed at once, before any work starts."""
    from ..core.errors import MissingResourceError
    from ..data.datasets import create_dataset, default_data_root
    from ..teacher.openclip_teacher import resolve_weights

    if all(e.kind == "student" and all(_finished(_student_config(cfg, e.name, s)) for s in range(cfg.seeds))
           for e in exps):
        return
    c = build_config(cfg.suite, exps[0].name, **_runtime(cfg))
    problems = []
    try:
        create_dataset(c.dataset, "test", c.data_root or default_data_root(c.cache_dir), c.image_size,
                       c.max_images)
    except MissingResourceError as e:
        problems.append(str(e))
    if c.teacher != "tiny-shapes":  # the tiny teacher is made here, not downloaded
        try:
            resolve_weights(c.teacher, c.pretrained, c.cache_dir)
        except MissingResourceError as e:
            problems.append(str(e))
    if problems:
        raise MissingResourceError(f"the {cfg.suite} suite needs files that are not here:\n- " +
                                   "\n- ".join(problems))


def _finished(tcfg) -> bool:
    from ..distill.train import finished_result

    return finished_result(tcfg) is not None


def _reuse_teacher_eval(ecfg) -> Optional[dict]:
    path = Path(ecfg.out) / "teacher_eval.json"
    if not path.exists():
        return None
    res = atomic.read_json(path)
    if config_diff(res.get("config", {}), ecfg):  # the config itself: its own runtime fields, exactly
        return None
    res["path"] = str(path)
    return res


def demo(cfg: DemoConfig) -> dict:
    return reproduce(cfg.reproduce_config())


def list_experiments() -> str:
    lines = []
    for suite in SUITES:
        s = SUITES.get(suite)
        lines.append(f"suite {suite}: {s.description}")
        for name in EXPERIMENTS:
            e = EXPERIMENTS.get(name)
            cfg = build_config(suite, name, progress=False)
            if e.kind == "student":
                what = (f"student {cfg.student}, method {cfg.method}, head {cfg.head}, data {'+'.join(cfg.data)}, "
                        f"epochs {cfg.epochs}, lr {cfg.lr}, logit scale {cfg.logit_scale}, T {cfg.temperature}, "
                        f"augment {cfg.augment}, mixup {cfg.mixup:g}, teaching {cfg.teaching}")
            else:
                what = "teacher " + ("zero-shot (text prompts)" if e.kind == "zero_shot" else "linear probe on train")
            flags = ("demo " if e.demo else "") + ("recipe " if e.recipe else "") + \
                ("beyond-the-study" if e.beyond else "")
            pub = e.published.get(suite)
            lines.append(f"  {name:<44} {what}" + (f"; study: {pub}" if pub is not None else "") +
                         (f" [{flags.strip()}]" if flags.strip() else ""))
    return "\n".join(lines)
