"""Is this tree slower than an earlier commit? The shapes10 demo and the test suite, run from
both trees in one sitting on the same machine (the baseline first, then this one, for each),
so that the ratio is not two machines' or two days' difference.

Each tree is a clean `git archive` of its commit, run with this checkout's virtual environment
(`PYTHONPATH=<tree>/src`: the tree's own package is the one imported; the script checks it).
Each demo starts from a cache folder of its own holding only the tiny teacher (copied from
yours, so neither pays its one-thread pre-training and neither inherits the other's embedding
caches); the test suites make their own caches as on CI. The tests are compared twice: whole
suites (the newer one has more tests), and summed over the tests both trees have (by node id,
from pytest's JUnit XML).

    python benchmarks/against_baseline.py --baseline 53774d1 [--only demo|tests] [--head HEAD] [--repeats 3]

Writes benchmarks/against_baseline.md (and .json). Takes 2 x --repeats demos and two suites: on
the 2-core machines here 20-90 min for the demos (3 to 14 min each, by CPU kind) and 20-45 min
for the suites.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def snapshot(ref: str, into: Path) -> str:
    """A clean copy of `ref`'s files (no build outputs, no runs): its short hash."""
    sha = git("rev-parse", "--short", ref)
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return sha


def env_for(tree: Path, cache: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONWARNINGS": "ignore"}
    if cache is not None:
        env["CLIPDISTILL_CACHE"] = str(cache)
    return env


def check_import(tree: Path) -> None:
    got = subprocess.run([sys.executable, "-c", "import clipdistill; print(clipdistill.__file__)"],
                         env=env_for(tree, None), capture_output=True, text=True, check=True).stdout.strip()
    if not got.startswith(str(tree)):
        sys.exit(f"against_baseline: {tree} imports clipdistill from {got}, not its own src/")


def seeded_cache(work: Path, name: str, teachers: Path) -> Path:
    cache = work / f"cache-{name}"
    if teachers.is_dir():
        shutil.copytree(teachers, cache / "teachers")
    else:
        cache.mkdir()
    return cache


def run_demo(tree: Path, cache: Path, log: Path) -> dict:
    shutil.rmtree(tree / "runs", ignore_errors=True)  # the demo skips experiments whose results it finds
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "clipdistill", "demo"], cwd=tree, env=env_for(tree, cache),
                              stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if proc.returncode:
        sys.exit(f"against_baseline: the demo failed in {tree} (exit {proc.returncode}); see {log}")
    return {"seconds": round(seconds, 1)}


def run_tests(tree: Path, log: Path) -> dict:
    junit = log.with_suffix(".xml")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={junit}"], cwd=tree, env=env_for(tree, None), stdout=f,
                              stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    cases = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        failed = any(child.tag in ("failure", "error") for child in case)
        cases[f"{case.get('classname')}::{case.get('name')}"] = (float(case.get("time", 0)), failed)
    return {"seconds": round(seconds, 1), "exit": proc.returncode, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="the earlier commit (hash, tag or branch)")
    ap.add_argument("--head", default="HEAD", help="the commit to compare (default: this checkout's HEAD)")
    ap.add_argument("--only", choices=["demo", "tests"], help="one of the two comparisons")
    ap.add_argument("--teachers", default=os.path.join(os.environ.get(
        "CLIPDISTILL_CACHE", os.path.expanduser("~/.cache/clipdistill")), "teachers"),
        help="the cached tiny teacher copied into each demo's fresh cache")
    ap.add_argument("--out", default=str(Path(__file__).with_name("against_baseline")))
    ap.add_argument("--repeats", type=int, default=3, help="demo pairs, alternating which tree runs first")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (trees, caches, logs) to read after")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="against-baseline-"))
    trees = {}
    for role, ref in (("baseline", args.baseline), ("head", args.head)):
        trees[role] = (work / role, snapshot(ref, work / role))
        check_import(trees[role][0])
    print(f"baseline {trees['baseline'][1]}, head {trees['head'][1]}, in {work}", flush=True)
    rows, raw = [], {}
    if args.only in (None, "demo"):
        # A shared 2-core machine's speed drifts by 20-30% over minutes (neighbours): one pair
        # can say 0.77x or 1.11x for the same two trees. So: several pairs, alternating which
        # tree goes first (B H, H B, ...), and the median of the per-pair ratios.
        got = {"baseline": [], "head": []}
        for r in range(args.repeats):
            order = list(trees.items()) if r % 2 == 0 else list(reversed(list(trees.items())))
            for role, (tree, sha) in order:
                res = run_demo(tree, seeded_cache(work, f"{role}-{r}", Path(args.teachers)),
                               work / f"demo-{role}-{r}.log")
                got[role].append(res["seconds"])
                print(f"demo {role} ({sha}) #{r + 1}: {res['seconds']} s", flush=True)
        raw["demo"] = got
        ratios = [h / b for b, h in zip(got["baseline"], got["head"])]
        rows.append({"what": f"make demo (shapes10 study), median of {args.repeats} pairs",
                     "baseline s": statistics.median(got["baseline"]), "head s": statistics.median(got["head"]),
                     "head / baseline": round(statistics.median(ratios), 3)})
        if args.repeats > 1:
            rows.append({"what": "make demo, per-pair ratio (min .. max)", "baseline s": "", "head s": "",
                         "head / baseline": f"{min(ratios):.3f} .. {max(ratios):.3f}"})
    if args.only in (None, "tests"):
        got = {}
        for role, (tree, sha) in trees.items():
            got[role] = run_tests(tree, work / f"tests-{role}.log")
            bad = sum(f for _, f in got[role]["cases"].values())
            print(f"tests {role} ({sha}): {got[role]['seconds']} s, {len(got[role]['cases'])} tests, "
                  f"{bad} failed", flush=True)
        b, h = got["baseline"], got["head"]
        common = sorted(set(b["cases"]) & set(h["cases"]))
        rows.append({"what": f"test suite, whole ({len(b['cases'])} vs {len(h['cases'])} tests)",
                     "baseline s": b["seconds"], "head s": h["seconds"],
                     "head / baseline": round(h["seconds"] / b["seconds"], 3)})
        sb = sum(b["cases"][c][0] for c in common)
        sh = sum(h["cases"][c][0] for c in common)
        rows.append({"what": f"test suite, the {len(common)} tests both have (sum of test times)",
                     "baseline s": round(sb, 1), "head s": round(sh, 1), "head / baseline": round(sh / sb, 3)})
        raw["tests"] = {role: {"seconds": g["seconds"], "exit": g["exit"], "failed":
                               sorted(c for c, (_, f) in g["cases"].items() if f)} for role, g in got.items()}
    head = (f"This tree ({trees['head'][1]}) against {trees['baseline'][1]}, one sitting, "
            f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs\n\n")
    md = head + table(rows, ["what", "baseline s", "head s", "head / baseline"])
    print(md)
    Path(args.out + ".md").write_text(md + "\n")
    Path(args.out + ".json").write_text(json.dumps({"baseline": trees["baseline"][1], "head": trees["head"][1],
                                                    "rows": rows, "raw": raw}, indent=1) + "\n")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
