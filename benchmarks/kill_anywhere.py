"""SIGKILL a fit-prompts run at many moments, run the same command again, and compare with a run
that was never killed (not a speed benchmark: issue 23's acceptance).

A kill can land anywhere: while the pool is indexed, while the teacher embeds it, while the
pixel store is filled by DataLoader workers, mid-epoch, while the ONNX file or its INT8 twin is
written. After each kill this checks what a user would meet: no process of the killed run left
alive (its workers included), no lock held under the run's folders, and then that the same
command, run again, finishes with the same model (every ONNX initializer bit for bit), the same
sidecar and the same REPORT.md (its timing line aside) as the uninterrupted run.

Kill points are placed by the stages the reference run went through: for each stage (and the
pixel-store fill inside training) a few fractions of its measured length after the line that
starts it, so that every stage is hit however fast the machine is. Two uninterrupted runs come
first: if they differ, the comparison could not mean anything, and the script says so.

    python benchmarks/kill_anywhere.py [--points 24] [--images 600] [--size 48] [--epochs 3] [--work DIR]

Writes benchmarks/kill_anywhere.{md,json}. Takes about half an hour on two cores.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

MARK = "CLIPDISTILL_KILL_ANYWHERE"
# (name, the line that starts it); a stage ends where the next one starts (the last at exit)
STAGES = [("index", r"\[1/6\] index"), ("embed", r"\[2/6\] embed"), ("curate", r"\[3/6\] curate"),
          ("train", r"\[4/6\] train"), ("assess", r"\[5/6\] assess"), ("export", r"\[6/6\] export")]
FILL_END = r"wrote .*/pixels/.* images at \d+ px"  # the pixel store is filled at the start of training


def _reader(proc: subprocess.Popen, lines: list, t0: float) -> None:
    for line in proc.stderr:
        lines.append((time.monotonic() - t0, line.rstrip("\n")))


def run(cmd: list[str], env: dict, trigger: str | None = None, delay: float = 0.0, log: Path | None = None) -> dict:
    """Run `cmd`; with `trigger`, SIGKILL its main process `delay` s after the first stderr line
    matching it (the children are left to die by themselves, as after a real kill)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list = []
    reader = threading.Thread(target=_reader, args=(proc, lines, t0), daemon=True)
    reader.start()
    killed_at = None
    if trigger is not None:
        pat = re.compile(trigger)
        while proc.poll() is None and not any(pat.search(ln) for _, ln in list(lines)):
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.monotonic() - t0
    rc = proc.wait()
    reader.join(timeout=10)
    if log is not None:
        log.write_text("\n".join(f"{t:8.2f} {ln}" for t, ln in lines) + "\n")
    return {"rc": rc, "seconds": time.monotonic() - t0, "killed_at": killed_at, "lines": lines}


def spans(lines: list, total: float) -> dict:
    """Stage -> (start, end) seconds in a run's log, and the pixel-store fill inside training."""
    starts = []
    for name, pat in STAGES:
        t = next((t for t, ln in lines if re.search(pat, ln)), None)
        if t is not None:
            starts.append((name, t))
    out = {name: (t, starts[i + 1][1] if i + 1 < len(starts) else total) for i, (name, t) in enumerate(starts)}
    fill = next((t for t, ln in lines if re.search(FILL_END, ln)), None)
    if "train" in out and fill is not None:
        out["pixel-fill"] = (out["train"][0], fill)
    return out


def stage_at(lines: list, t: float) -> str:
    """The stage a run was in at `t` s, by the lines it had written by then; in training before
    the pixel store's "wrote" line, the fill."""
    seen = [ln for tt, ln in lines if tt <= t]
    started = [name for name, pat in STAGES if any(re.search(pat, ln) for ln in seen)]
    if not started:
        return "start-up"
    if started[-1] == "train" and not any(re.search(FILL_END, ln) for ln in seen):
        return "train: pixel-store fill"
    return started[-1]


def pixel_stores(cache: Path) -> str:
    """The pixel stores in `cache` after a kill: how many, and how many are complete."""
    found = list(cache.glob("pixels/**/manifest.json")) if cache.exists() else []
    done = 0
    for m in found:
        try:
            done += bool(json.loads(m.read_text()).get("complete"))
        except (OSError, ValueError):
            pass
    return f"{done}/{len(found)} complete" if found else "none"


def plan(points: int, sp: dict) -> list[tuple[str, str, float]]:
    """(stage, trigger, delay) for `points` kills: two in every stage and three in the fill, the
    rest spread over the stages by their length."""
    anchors = {name: pat for name, pat in STAGES}
    anchors["pixel-fill"] = anchors["train"]
    names = [n for n in sp if n in anchors]
    base = {n: (3 if n in ("pixel-fill", "export") else 2) for n in names}
    left = max(0, points - sum(base.values()))
    total = sum(b - a for a, b in sp.values()) or 1.0
    for n in sorted(names, key=lambda n: -(sp[n][1] - sp[n][0])):
        extra = round(left * (sp[n][1] - sp[n][0]) / total)
        base[n] += extra
    while sum(base.values()) > max(points, 2 * len(names)):
        base[max(base, key=base.get)] -= 1
    out = []
    for n in names:
        a, b = sp[n]
        k = base[n]
        out += [(n, anchors[n], (b - a) * (i + 0.5) / k) for i in range(k)]
    return out


def leftovers(trial: str) -> list[int]:
    """Pids of live processes started by this trial (they carry its mark in their environment)."""
    found = []
    needle = f"{MARK}={trial}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(d.name))
        except OSError:
            continue
    return found


def held_locks(*folders: Path) -> list[str]:
    held = []
    for folder in folders:
        for p in folder.rglob("*lock"):
            if not p.is_file():
                continue
            fd = os.open(p, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                held.append(str(p))
            finally:
                os.close(fd)
    return held


def outcome(out: Path) -> dict:
    """What a run produced, in a form to compare: the model's initializers (hashed), the sidecar
    without its timings, REPORT.md without its timing line."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    res = {}
    for name in ("model.onnx", "model.int8.onnx"):
        p = out / name
        if p.is_file():
            m = onnx.load(str(p))
            h = hashlib.sha256()
            for init in sorted(m.graph.initializer, key=lambda i: i.name):
                h.update(init.name.encode() + numpy_helper.to_array(init).tobytes())
            res[name] = h.hexdigest()
    meta = json.loads((out / "model.json").read_text()) if (out / "model.json").is_file() else {}
    res["model.json"] = json.dumps(_drop_times(meta), sort_keys=True)
    rep = (out / "REPORT.md").read_text() if (out / "REPORT.md").is_file() else ""
    res["REPORT.md"] = "\n".join(ln for ln in rep.splitlines() if not ln.startswith("- time:"))
    return res


def _drop_times(obj):
    if isinstance(obj, dict):
        return {k: _drop_times(v) for k, v in obj.items() if "second" not in k and k not in ("created", "wall")}
    if isinstance(obj, list):
        return [_drop_times(v) for v in obj]
    return obj


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=24, help="kills (at least two per stage)")
    ap.add_argument("--images", type=int, default=600, help="example pool size")
    ap.add_argument("--size", type=int, default=48, help="example pool image side")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", default=None, help="keep everything here (default: a temporary folder)")
    ap.add_argument("--pretrained", default=None, help="a tiny-shapes checkpoint (default: pre-train one, ~2 min)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("kill_anywhere")), help="table: OUT.md, OUT.json")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="kill-anywhere-"))
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "clipdistill"]
    teacher = args.pretrained
    if teacher is None:
        from clipdistill.teacher.tiny import ensure_tiny_teacher

        teacher = str(ensure_tiny_teacher(work / "teacher-cache"))
    pool = work / "pool"
    if not (pool / "classes.txt").is_file():
        subprocess.run(py + ["make-pool", "--out", str(pool), "--images", str(args.images), "--size", str(args.size)],
                       check=True, stdout=subprocess.DEVNULL)
    out, cache = work / "run" / "out", work / "run" / "cache"
    cmd = py + ["fit-prompts", "--prompts", str(pool / "classes.txt"), "--pool", str(pool / "pool"), "--eval",
                str(pool / "eval"), "--out", str(out), "--cache-dir", str(cache), "--pretrained", teacher,
                "--epochs", str(args.epochs), "--teaching", "online", "--no-progress"]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    def fresh() -> None:
        shutil.rmtree(work / "run", ignore_errors=True)

    def env(trial: str) -> dict:
        return {**os.environ, MARK: trial, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}

    refs = []
    for r in range(2):
        fresh()
        res = run(cmd, env(f"ref{r}"), log=logs / f"ref{r}.log")
        if res["rc"] != 0:
            print(f"the uninterrupted run failed (rc {res['rc']}); see {logs / f'ref{r}.log'}")
            return 1
        refs.append((res, outcome(out)))
        print(f"reference run {r + 1}: {res['seconds']:.0f} s")
    ref_res, ref = refs[0]
    deterministic = refs[0][1] == refs[1][1]
    if not deterministic:
        diff = [k for k in ref if refs[1][1].get(k) != ref[k]]
        print(f"two uninterrupted runs differ ({', '.join(diff)}): kills cannot be compared with them")
    sp = spans(ref_res["lines"], ref_res["seconds"])
    print("stages of the reference run (s): " + ", ".join(f"{n} {a:.1f}-{b:.1f}" for n, (a, b) in sp.items()))

    rows = []
    for i, (stage, trigger, delay) in enumerate(plan(args.points, sp)):
        fresh()
        trial = f"k{i}"
        killed = run(cmd, env(trial), trigger=trigger, delay=delay, log=logs / f"{trial}-killed.log")
        time.sleep(1.0)  # a worker told to die with its parent gets a moment, as a user's next command would
        alive = leftovers(trial)
        locks = held_locks(out, cache) if out.exists() else []
        for pid in alive:  # do not let a leftover spoil the next trial
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        where = stage_at(killed["lines"], killed["killed_at"]) if killed["killed_at"] is not None else "(finished)"
        stores = pixel_stores(cache)
        again = run(cmd, env(trial + "r"), log=logs / f"{trial}-rerun.log")
        got = outcome(out) if again["rc"] == 0 else {}
        same = {k: got.get(k) == v for k, v in ref.items()}
        rows.append({"point": i + 1, "planned": f"{stage} +{delay:.1f} s",
                     "killed at": f"{killed['killed_at']:.1f} s" if killed["killed_at"] is not None else "-",
                     "stage": where, "pixel stores": stores, "live processes left": len(alive),
                     "locks held": len(locks),
                     "rerun": f"rc {again['rc']}, {again['seconds']:.0f} s",
                     "same model": "yes" if same.get("model.onnx") and same.get("model.int8.onnx", True) else "NO",
                     "same sidecar": "yes" if same.get("model.json") else "NO",
                     "same REPORT": "yes" if same.get("REPORT.md") else "NO",
                     "_detail": {"alive": alive, "locks": locks, "same": same}})
        r = rows[-1]
        print(f"{r['point']:>2} {r['planned']:<22} killed {r['killed at']:>8} in {r['stage']:<24} "
              f"(pixel stores {r['pixel stores']}) left "
              f"{r['live processes left']} proc, {r['locks held']} locks; rerun {r['rerun']}; model {r['same model']}, "
              f"sidecar {r['same sidecar']}, REPORT {r['same REPORT']}", flush=True)

    cols = ["point", "planned", "killed at", "stage", "pixel stores", "live processes left", "locks held", "rerun",
            "same model", "same sidecar", "same REPORT"]
    ok = all(r["live processes left"] == 0 and r["locks held"] == 0 and r["same model"] == "yes" and
             r["same sidecar"] == "yes" and r["same REPORT"] == "yes" for r in rows)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    head = (f"# SIGKILL anywhere in fit-prompts, then the same command\n\n"
            f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({cpu}); example pool of {args.images} images at "
            f"{args.size} px, `--epochs {args.epochs} --teaching online`; reference run {ref_res['seconds']:.0f} s; "
            f"two uninterrupted runs {'identical' if deterministic else 'DIFFERENT'}. "
            f"`python benchmarks/kill_anywhere.py --points {args.points} --images {args.images} --size {args.size} "
            f"--epochs {args.epochs}`\n\n"
            f"Stages of the reference run (s): " + ", ".join(f"{n} {a:.1f}-{b:.1f}" for n, (a, b) in sp.items()) +
            f"\n\n{len(rows)} kills: " + ("every one left no process and no lock, and the rerun gave the same model, "
                                           "sidecar and REPORT." if ok else "SOME FAILED (rows marked NO or non-zero).")
            + "\n\n")
    text = head + table(rows, cols) + "\n"
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"deterministic": deterministic, "spans": sp, "rows": rows,
                                                    "args": vars(args)}, indent=2) + "\n")
    print("\n" + text)
    return 0 if ok and deterministic else 1


if __name__ == "__main__":
    sys.exit(main())
