"""`clipdistill download`: the images a search found, fetched into WebDataset shards by img2dataset
(the field's downloader: threads, retries, resizing, a status per URL), so that `fit-prompts
--pool 'OUT/{00000..00003}.tar'` trains on them as they are.

img2dataset does the fetching; this module gives it the search's results, reads back what it
recorded and says it in our terms: found / downloaded / failed (by reason) / duplicate. Nothing
is fatal per URL: a 404, a timeout, bytes that are not an image are counted and the rest goes on.
A duplicate (the same bytes under two URLs: mirrors, reposts) is counted from the sha256
img2dataset records of each download; the pool reader embeds it once (data/pool.py), so it is
kept in the shards and costs only its bytes.

Results of a local search (`search --pool`) hold file paths, not URLs: they are given to
img2dataset as file:// URLs, which pulls the few thousand images that matter out of a large
archive into compact shards. Killed, the same command continues: img2dataset's incremental mode
keeps the shards it finished (each has its _stats.json) and fetches only the others."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from ..core import atomic
from ..core.config import at_least, check, check_fields, option
from ..core.errors import ClipDistillError

log = logging.getLogger(__name__)

# the columns of `clipdistill search`'s results.jsonl kept beside each image (its .json member)
KEPT_COLUMNS = ("prompt", "class", "similarity", "rank", "source")


@dataclasses.dataclass
class DownloadConfig:
    results: str = option("", "the URL list: results.jsonl of `clipdistill search` (or any JSONL with a url column, "
                              "caption optional)", metavar="FILE")
    out: str = option("", "folder for the shards (00000.tar, ...) and counts/download.json; default: shards/ beside "
                          "--results", metavar="DIR")
    image_size: int = option(256, "larger images are resized so their shorter side is this many pixels (smaller "
                                  "ones are kept as they are); the student's own transforms crop later",
                             valid=at_least(8))
    processes: int = option(1, "img2dataset processes (each downloads whole shards)", runtime=True,
                            valid=at_least(1))
    threads: int = option(16, "downloads at a time per process", runtime=True, valid=at_least(1))
    timeout: int = option(10, "seconds to wait for one image", runtime=True, valid=at_least(1))
    retries: int = option(2, "tries again after a failed download", runtime=True, valid=at_least(0))
    shard_size: int = option(10000, "images per shard", valid=at_least(1))
    progress: bool = option(True, "show img2dataset's progress", runtime=True)

    def __post_init__(self) -> None:
        check(bool(self.results), "results", "give the URL list: --results runs/search-classes/results.jsonl "
                                             "(written by `clipdistill search`)")
        check(Path(self.results).is_file(), "results", f"{self.results} is not a file; run `clipdistill search` "
                                                       "first, it writes OUT/results.jsonl")
        check(Path(self.results).suffix == ".jsonl", "results",
              f"{self.results}: give the .jsonl file (one JSON object per line with a url column)")
        check_fields(self)
        if not self.out:
            self.out = str(Path(self.results).parent / "shards")


def read_results(path: str | Path) -> list[dict]:
    """The rows, each with a `url`; a path (a local search's result) becomes a file:// URL."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ClipDistillError(f"{path}:{i}: not a JSON line ({e.msg}); give search's results.jsonl") from None
        if not isinstance(row, dict) or not isinstance(row.get("url"), str) or not row["url"]:
            raise ClipDistillError(f"{path}:{i}: no url column; each line needs {{\"url\": ..., \"caption\": ...}}")
        row["url"] = _fetchable(row["url"], f"{path}:{i}")
        rows.append(row)
    if not rows:
        raise ClipDistillError(f"{path} holds no results; did the search find nothing? (see its search.json)")
    return rows


def search_prompts(results: str | Path) -> Optional[str]:
    """The prompts file of the search that wrote `results` (its search.json, beside it), for the
    fit-prompts command `text` says next; None when there is none to read (another tool's list, a
    search folder older than the field)."""
    path = Path(results).parent / "search.json"
    try:
        prompts = atomic.read_json(path).get("prompts") if path.is_file() else None
    except (ClipDistillError, AttributeError, OSError) as e:  # unreadable, or not an object
        log.debug("%s does not say the prompts file (%s)", path, e)
        return None
    return prompts if isinstance(prompts, str) and prompts else None


def _fetchable(url: str, where: str) -> str:
    """http(s) as it is; a local file path (a search over a folder pool) as a file:// URL; nothing
    else: a list must not make us read this machine's files under another scheme."""
    if url.lower().startswith(("http://", "https://")):
        return url
    if "://" in url:
        raise ClipDistillError(f"{where}: {url[:80]}: only http(s) URLs and local file paths are downloaded")
    if "::" in url:
        raise ClipDistillError(f"{where}: {url[:80]} is a member of a tar shard (a search over shards): its images "
                               "are on disk already; give the shards to fit-prompts as --pool (each image goes to "
                               "its best prompt there too), or search a folder pool to download from")
    return Path(url).resolve().as_uri()


def download(cfg: DownloadConfig) -> dict:
    from ..core.locks import owned_folder

    with owned_folder(cfg.out, "download") as out:
        return _download(cfg, out)


def _download(cfg: DownloadConfig, out: Path) -> dict:
    t0 = time.time()
    rows = read_results(cfg.results)
    columns = [c for c in KEPT_COLUMNS if any(c in r for r in rows)]
    # img2dataset reads its list from a file: ours, with file:// URLs, written beside the shards
    # (its name is not one img2dataset's incremental mode takes for a shard)
    listing = "".join(json.dumps({"url": r["url"], "caption": str(r.get("caption") or ""),
                                  **{c: r.get(c) for c in columns}}, ensure_ascii=False) + "\n" for r in rows)
    _same_list_or_refuse(out, hashlib.sha256(f"{cfg.image_size} {cfg.shard_size}\n{listing}".encode()).hexdigest(),
                         cfg)
    url_list = atomic.write_text(out / "urls.jsonl", listing)
    _run_img2dataset(cfg, url_list, out, columns)
    summary = {"out": str(out), "results": cfg.results, "found": len(rows), **count(out),
               "seconds": round(time.time() - t0, 1)}
    # URLs of a shard img2dataset gave up on are in neither count
    summary["not_attempted"] = max(0, len(rows) - summary["downloaded"] - summary["failed_total"])
    summary["pool"] = shard_spec(summary["shards"])
    summary["prompts"] = search_prompts(cfg.results)
    # not in OUT itself: img2dataset's incremental mode takes every OUT/*.json for a finished shard
    atomic.write_json(out / "counts" / "download.json", summary)
    return summary


def _same_list_or_refuse(out: Path, digest: str, cfg: DownloadConfig) -> None:
    """img2dataset's incremental mode takes a shard number it finished for done, whatever the list
    now holds: shards of another list (edited results, another --image-size) would be kept silently."""
    mark = out / "counts" / "input.json"
    if mark.is_file():
        before = atomic.read_json(mark).get("sha256")
        if before != digest:
            raise ClipDistillError(f"{out} holds shards of another URL list (or --image-size/--shard-size); "
                                   f"give a new --out, or delete {out} to download {cfg.results} again")
    else:
        atomic.write_json(mark, {"sha256": digest, "results": cfg.results})


def _run_img2dataset(cfg: DownloadConfig, url_list: Path, out: Path, columns: list[str]) -> None:
    # albumentations (imported by img2dataset) asks PyPI for a newer version at import unless told not to
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as img2dataset_download

    # its tqdm bar only on a terminal: in a log, its '\r' frames are one line of garbage; its
    # per-shard lines stay
    quiet = not (cfg.progress and sys.stderr.isatty())
    with _quiet_bar(quiet), _stdout_to_stderr(), _workers_temp_folder(out / "counts"):
        img2dataset_download(
            url_list=str(url_list), input_format="jsonl", url_col="url", caption_col="caption",
            save_additional_columns=columns or None, output_format="webdataset", output_folder=str(out),
            image_size=cfg.image_size, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg",
            processes_count=cfg.processes, thread_count=cfg.threads, timeout=cfg.timeout, retries=cfg.retries,
            number_sample_per_shard=cfg.shard_size, incremental_mode="incremental", distributor="multiprocessing",
            enable_wandb=False, extract_exif=False, compute_hash="sha256")


@contextlib.contextmanager
def _workers_temp_folder(parent: Path):
    """img2dataset's worker processes (spawned) import wandb, which makes two temporary folders at
    import and, a worker ending with os._exit, never removes them: every download left them in /tmp.
    The workers' TMPDIR is a scratch folder of ours, removed after (by the next run if killed)."""
    before = os.environ.get("TMPDIR")
    with atomic.temporary_folder(parent, "workers-tmp") as folder:
        os.environ["TMPDIR"] = str(folder)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = before


@contextlib.contextmanager
def _quiet_bar(quiet: bool):
    """img2dataset's one bar (its distributor's, in this process) switched off for the block."""
    import functools

    from img2dataset import distributor

    bar = distributor.tqdm
    if quiet:
        distributor.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        distributor.tqdm = bar


@contextlib.contextmanager
def _stdout_to_stderr():
    """Python's and the file descriptor's stdout (img2dataset's worker processes inherit fd 1) go
    to stderr, and come back after."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def failure_reason(message: str) -> str:
    """img2dataset's error text, grouped the way a person reads a tally (HTTP code, timeout, not
    an image, ...)."""
    m = re.search(r"HTTP Error (\d+)", message)
    if m:
        return f"HTTP {m.group(1)}"
    low = message.lower()
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if "cannot identify image" in low or "image decoding failed" in low or "decod" in low:
        return "not an image"
    if "x-robots-tag" in low:
        return "refused by the site (X-Robots-Tag)"
    if "urlopen error" in low or "connection" in low:
        return "unreachable"
    return message.split(":")[0][:60] or "unknown"


def count(out: Path) -> dict:
    """What img2dataset recorded, in our terms: per shard its _stats.json (successes, failures with
    their messages) and its .parquet (each download's status and sha256: duplicates)."""
    import pyarrow.parquet as pq

    shards = sorted(out.glob("[0-9]*.tar"))
    stats = [atomic.read_json(p) for p in sorted(out.glob("[0-9]*_stats.json"))]
    failed: Counter = Counter()
    for s in stats:
        for message, n in s.get("status_dict", {}).items():
            if message != "success":
                failed[failure_reason(message)] += n
    seen, duplicates = set(), 0
    for p in sorted(out.glob("[0-9]*.parquet")):
        t = pq.read_table(p, columns=["status", "sha256"]).to_pylist()
        for r in t:
            if r["status"] == "success" and r["sha256"]:
                duplicates += r["sha256"] in seen
                seen.add(r["sha256"])
    downloaded = sum(s.get("successes", 0) for s in stats)
    return {"downloaded": downloaded, "duplicates": duplicates, "distinct": downloaded - duplicates,
            "failed": dict(failed.most_common()), "failed_total": sum(failed.values()),
            "shards": [str(p) for p in shards]}


def shard_spec(shards: list[str]) -> str:
    """What --pool takes for them: a brace pattern for consecutive numbers, else a comma list (a
    shard img2dataset gave up on leaves a gap that a pattern would name)."""
    if len(shards) <= 1:
        return shards[0] if shards else ""
    first, last = Path(shards[0]), Path(shards[-1])
    if [int(Path(p).stem) for p in shards] != list(range(int(first.stem), int(last.stem) + 1)):
        return ",".join(shards)
    return str(first.parent / f"{{{first.stem}..{last.stem}}}.tar")


def text(res: dict, cfg: DownloadConfig) -> str:
    lines = [f"found {res['found']} URLs in {res['results']}",
             f"downloaded {res['downloaded']} ({res['distinct']} distinct, {res['duplicates']} duplicate: the same "
             "bytes as an earlier one, embedded once)",
             f"failed {res['failed_total']}" + (": " + ", ".join(f"{v} {k}" for k, v in res["failed"].items())
                                                if res["failed"] else "")]
    if res.get("not_attempted"):
        lines.append(f"not attempted {res['not_attempted']}: a shard img2dataset gave up on (run the same command "
                     "again to try it)")
    if res["shards"]:
        lines.append(f"wrote {len(res['shards'])} shard(s): {res['pool']} ({res['seconds']} s)")
        prompts = shlex.quote(res["prompts"]) if res.get("prompts") else "PROMPTS"  # PROMPTS: no search.json
        lines.append(f"next: clipdistill fit-prompts --prompts {prompts} --pool '{res['pool']}' --out runs/fit")
    else:
        lines.append("no shard was written: every download failed (look at the reasons above)")
    return "\n".join(lines)
