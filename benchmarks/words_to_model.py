"""From prompts alone to a model, against a knn service on 127.0.0.1 (issue 26's acceptance; not a
speed benchmark).

Per pool seed: `clipdistill make-pool` (3,000 shapes10 images of ten classes, prompts for four,
a labelled eval folder), then two roads to a model, both with `fit-prompts --epochs E`:

- the pool:  fit-prompts --pool POOL/pool (the user has the photos);
- the words: serve-knn --pool POOL/pool (a service holding the photos; this user has none) ->
  search --service --per-class N -> download (img2dataset, into shards) -> fit-prompts --pool SHARDS.

Every step is the documented command, run as a subprocess of `clipdistill`; the two models are
scored on the same labelled eval folder. Prints the table and writes benchmarks/words_to_model.{md,json}.

    python benchmarks/words_to_model.py [--seeds 0,1] [--epochs 40] [--per-class 300] [--work DIR]
    python benchmarks/words_to_model.py --name NAME --epochs 0 --from-json A.json,B.json   # join runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_kind, table  # noqa: E402

HERE = Path(__file__).parent
CLI = [sys.executable, "-m", "clipdistill.cli"]


def run(*args: str, cache: str | None) -> dict:
    t0 = time.time()
    proc = subprocess.run([*CLI, *args, *(["--cache-dir", cache] if cache else []), "--json"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"clipdistill {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["_seconds"] = round(time.time() - t0, 1)
    return out


def accuracy(fit_out: Path) -> float:
    s = json.loads((fit_out / "summary.json").read_text())
    return s["student"]["test_accuracy"]


def one_seed(seed: int, work: Path, cache: str, epochs: int, per_class: int, images: int) -> dict:
    pool = work / f"pool-{images}-s{seed}"
    if not (pool / "classes.txt").is_file():
        subprocess.run([*CLI, "make-pool", "--out", str(pool), "--seed", str(seed), "--images", str(images)],
                       check=True, capture_output=True)
    prompts, fit = str(pool / "classes.txt"), ["--epochs", str(epochs), "--no-progress"]
    ref_out = work / f"fit-pool-s{seed}"
    ref = run("fit-prompts", "--prompts", prompts, "--pool", str(pool / "pool"), "--eval", str(pool / "eval"),
              "--out", str(ref_out), *fit, cache=cache)
    # the service: serve-knn in the background, its URL read from its first line
    server = subprocess.Popen([*CLI, "serve-knn", "--pool", str(pool / "pool"), "--port", "0", "--cache-dir", cache,
                               "--no-progress", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        where = json.loads(server.stdout.readline())
        found = work / f"search-s{seed}"
        # a search of another service (this run's serve-knn has another port, so other URLs) is a
        # new search, and download rightly refuses new URLs into the old shards: start both afresh
        shutil.rmtree(found, ignore_errors=True)
        s = run("search", "--prompts", prompts, "--service", where["service"], "--index", where["index"],
                "--per-class", str(per_class), "--out", str(found), "--sheet-images", "8", "--no-progress",
                cache=cache)
        d = run("download", "--results", str(found / "results.jsonl"), "--no-progress", cache=None)
    finally:
        server.terminate()
        server.wait()
    words_out = work / f"fit-words-s{seed}"
    words = run("fit-prompts", "--prompts", prompts, "--pool", d["pool"], "--eval", str(pool / "eval"), "--out",
                str(words_out), *fit, cache=cache)
    a_ref, a_words = accuracy(ref_out), accuracy(words_out)
    return {"seed": seed, "pool accuracy": a_ref, "words accuracy": a_words, "difference": round(a_words - a_ref, 2),
            "found": s["results"], "downloaded": d["downloaded"], "failed": d["failed_total"],
            "duplicates": d["duplicates"], "trained on (pool / words)": f"{ref['pool']['images']} / "
            f"{words['pool']['images']}", "seconds (pool / words)": f"{ref['_seconds']} / "
            f"{words['_seconds'] + s['_seconds'] + d['_seconds']:.0f}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--images", type=int, default=3000, help="pool size (make-pool --images)")
    ap.add_argument("--work", default="/tmp/clipdistill-words-to-model")
    ap.add_argument("--name", default="words_to_model", help="writes benchmarks/NAME.{md,json}")
    ap.add_argument("--cache-dir", default=os.environ.get("CLIPDISTILL_CACHE", str(Path.home() / ".cache/clipdistill")))
    ap.add_argument("--from-json", default="",
                    help="comma-separated benchmarks/*.json of earlier runs (same --epochs): join their rows into "
                         "NAME's table without running anything")
    args = ap.parse_args()
    if args.from_json:
        rows = [r for f in args.from_json.split(",") for r in json.loads(Path(f).read_text())]
        args.seeds = ",".join(str(r["seed"]) for r in rows)
    else:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        rows = [one_seed(int(s), work, args.cache_dir, args.epochs, args.per_class, args.images)
                for s in args.seeds.split(",")]
    cols = list(rows[0])
    mean = sum(r["difference"] for r in rows) / len(rows)
    joined = f" (rows of separate runs joined with `--from-json {args.from_json}`)" if args.from_json else ""
    text = "\n".join([
        "# From prompts alone to a model (issue 26's acceptance)", "",
        f"Machine: {machine_kind()}, {os.cpu_count()} cores; "
        f"{time.strftime('%Y-%m-%d')}; `python benchmarks/words_to_model.py --seeds {args.seeds} "
        f"--epochs {args.epochs} --per-class {args.per_class} --images {args.images}`{joined}.", "",
        "Per pool seed, two models from the same example pool (`make-pool --seed S`), scored on its labelled eval "
        "folder: `fit-prompts --pool` on the whole pool, and the words-only road (`serve-knn` over the pool on "
        "127.0.0.1 -> `search --service` -> `download` -> `fit-prompts` on the shards), each with "
        f"`--epochs {args.epochs}`" + (" (0: fit-prompts' default, epochs for about 4,000 optimizer steps whatever "
                                      "the pool's size)" if args.epochs == 0 else "") +
        ". Accuracy in %; the difference is words - pool.", "",
        table(rows, cols), "",
        f"Mean difference over {len(rows)} seed(s): {mean:+.2f} points. LAION's public service was not reached "
        "from here (no internet): the service is `clipdistill serve-knn`, the same protocol."])
    print(text)
    (HERE / f"{args.name}.md").write_text(text + "\n")
    (HERE / f"{args.name}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
