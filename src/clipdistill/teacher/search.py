"""`clipdistill search`: images for your prompts, before any training — from a pool you have
embedded (`--pool`: exact top-N by cosine over the embedding cache, or with `--approximate` from
a usearch HNSW index built once from it: teacher/ann.py) or from a clip-retrieval knn service
(`--service URL --index NAME`, as NVIDIA-AI-IOT/clip-distillation searches LAION).

Writes into OUT:
- `results.jsonl`: one line per result — `url` (a URL, or a pool file's path), `caption`,
  `similarity`, `prompt`, `class` (the prompt's line number from 0), `rank`, and the source's key
  (`row` of the pool's embedding cache, or the service's `id`); what img2dataset reads
  (`--input_format jsonl --url_col url --caption_col caption`);
- `results.parquet`, the same, when pyarrow is installed;
- `sheets/PROMPT.png`: the top results of each prompt with their similarity, to look at before
  downloading or training (a service's images are fetched for it; those that fail say why);
- `search.json`: the counts, the prompts file and where everything is.

Every image goes to one prompt only, the one it matches best (search_sources.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

from ..core import atomic
from ..core.config import at_least, check, check_fields, option
from .options import TeacherOptions

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SearchConfig(TeacherOptions):
    prompts: str = option("", "text file, one prompt per class (\"a photo of a forklift\")", metavar="FILE")
    per_class: int = option(100, "results per prompt (each image goes to one prompt only)", valid=at_least(1))
    out: str = option("", "folder for results.jsonl, sheets/ and the service's cached answers; default "
                          "runs/search-PROMPTS", metavar="DIR")
    pool: list[str] = option(default_factory=list, help="search a local pool: folders of images or tar shards "
                                                        "('pool-{000..099}.tar'), embedded first if they are not yet "
                                                        "(the same cache fit-prompts uses)", metavar="DIR|SHARDS[,...]")
    service: str = option("", "search a clip-retrieval knn service instead: its URL (e.g. "
                              "https://knn.laion.ai/knn-service)", metavar="URL")
    index: str = option("", "with --service: the index to search (e.g. laion5B-L-14)", metavar="NAME")
    templates: Optional[str] = option(None, "--pool: prompt templates file, one per line with {} (averaged)",
                                      metavar="FILE")
    candidates: int = option(0, "--service: images asked per prompt (its num_images); 0 = 2 x --per-class, so a "
                                "prompt that loses an image to a better-matching one takes its next",
                             valid=at_least(0))
    num_result_ids: int = option(3000, "--service: neighbours the service looks at before its filters",
                                 valid=at_least(1))
    use_mclip: bool = option(False, "--service: multilingual CLIP for the text")
    deduplicate: bool = option(True, "--service: drop near-identical images (by embedding)")
    use_safety_model: bool = option(True, "--service: drop images its safety model flags")
    use_violence_detector: bool = option(True, "--service: drop images its violence detector flags")
    aesthetic_score: Optional[int] = option(None, "--service: favour images of this aesthetic score (0-9)")
    aesthetic_weight: float = option(0.5, "--service: weight of --aesthetic-score, 0-1")
    timeout: float = option(60.0, "--service: seconds to wait for an answer", runtime=True, valid=at_least(0.1))
    retries: int = option(5, "--service: tries again after a 5xx, 429, timeout or lost connection",
                          runtime=True, valid=at_least(0))
    backoff: float = option(1.0, "--service: seconds before the first retry, doubled for each next one",
                            runtime=True, valid=at_least(0))
    rate_limit: float = option(0.0, "--service: at least this many seconds between two requests", runtime=True,
                               valid=at_least(0))
    sheet_images: int = option(24, "images per prompt on its contact sheet (0 = no sheets)", valid=at_least(0))
    fetch_timeout: float = option(10.0, "--service: seconds to fetch one image for the sheets", runtime=True,
                                  valid=at_least(0.1))
    approximate: bool = option(False, "--pool: ask a usearch HNSW index of the embedding cache (built once by "
                                      "the first such search, kept beside the cache; needs clipdistill[ann]) "
                                      "instead of scanning the cache: a fraction of a second per search instead of "
                                      "about 6 s per million images, after a build that costs hundreds of scans, "
                                      "and a few of the exact top may be missed (benchmarks/bench_ann.md)")
    chunk_rows: int = option(16384, "--pool: rows of the embedding cache scored at a time (memory: rows x dim x 4 "
                                    "bytes)", runtime=True, valid=at_least(1))
    progress: bool = option(True, "show progress bars", runtime=True)

    def __post_init__(self) -> None:
        from ..data.prompts import read_prompt_file, read_templates

        self._check_teacher()
        check(bool(self.prompts), "prompts", "give a text file with one prompt per class (--prompts classes.txt)")
        read_prompt_file(self.prompts)
        read_templates(self.templates)
        check(bool(self.pool) != bool(self.service), "pool",
              "give one place to search: --pool DIR (images you have) or --service URL --index NAME (a knn service)")
        if self.pool:
            from ..data.shards import is_shard_spec

            for p in self.pool:
                check(Path(p).is_dir() or is_shard_spec(p), "pool",
                      f"{p} is not a folder or tar shards; give a folder of images or 'pool-{{000..099}}.tar'")
        else:
            check(self.service.startswith(("http://", "https://")), "service",
                  f"{self.service!r} is not an http(s) URL; give the knn endpoint, e.g. https://HOST/knn-service")
            check(bool(self.index), "index", "give the index the service serves (--index laion5B-L-14 on LAION's)")
            check(not self.approximate, "approximate", "--approximate asks an index built from a --pool's embedding "
                  "cache; a --service searches its own index (drop --approximate)")
        check(self.aesthetic_score is None or 0 <= self.aesthetic_score <= 9, "aesthetic_score", "must be 0..9")
        check(0.0 <= self.aesthetic_weight <= 1.0, "aesthetic_weight", "must be in [0, 1]")
        check_fields(self)
        if self.approximate:
            from .ann import require

            require()  # before the pool is embedded: without usearch, one line naming the extra
        if not self.out:
            self.out = str(Path("runs") / f"search-{Path(self.prompts).stem}")

    @property
    def source(self) -> str:
        return "service" if self.service else "local"


def search(cfg: SearchConfig) -> dict:
    from ..core.locks import owned_folder

    with owned_folder(cfg.out, "search") as out:
        return _search(cfg, out)


def _search(cfg: SearchConfig, out: Path) -> dict:
    from ..data.prompts import read_prompt_file
    from .search_sources import SOURCES

    t0 = time.time()
    prompts = read_prompt_file(cfg.prompts, warn=False)
    source = SOURCES.get(cfg.source)(cfg)
    found = source.find(prompts, cfg.per_class)
    rows = [{"url": r["url"], "caption": r["caption"], "similarity": r["similarity"], "prompt": p, "class": k,
             "rank": i, "source": source.name, **{key: r[key] for key in ("row", "id") if key in r}}
            for k, (p, results) in enumerate(zip(prompts, found)) for i, r in enumerate(results)]
    files = write_results(out, rows)
    sheets, shown = write_sheets(source, prompts, found, out / "sheets", cfg.sheet_images)
    per = {p: len(r) for p, r in zip(prompts, found)}
    # prompts: the file, so that `download` can say the fit-prompts command that follows in full
    summary = {"out": str(out), "source": source.name, "prompts": cfg.prompts, "per_class": cfg.per_class,
               "results": len(rows),
               "per_prompt": per, "short": [p for p, c in per.items() if c < cfg.per_class],
               **files, "sheets": [str(s) for s in sheets], "shown": shown,
               **source.counts(), "seconds": round(time.time() - t0, 2)}
    atomic.write_json(out / "search.json", summary)
    return summary


def write_results(out: Path, rows: list[dict]) -> dict:
    """results.jsonl always; results.parquet when pyarrow is installed."""
    jsonl = atomic.write_text(out / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return {"jsonl": str(jsonl), "parquet": None}
    with atomic.replacing(out / "results.parquet") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    return {"jsonl": str(jsonl), "parquet": str(out / "results.parquet")}


def write_sheets(source, prompts: list[str], found: list[list[dict]], folder: Path, n: int
                 ) -> tuple[list[Path], dict]:
    """Per prompt, its top `n` results with their similarity (s); an image that could not be shown
    is a grey cell saying why (HTTP 404, timeout, not an image, duplicate). Also what was shown:
    {images, failed: {why: count}}."""
    import numpy as np

    from ..data.sheets import contact_sheet, sheet_stems

    paths, shown_total, why = [], 0, {}
    if not n:
        return paths, {"images": 0, "failed": why}
    for prompt, stem, results in zip(prompts, sheet_stems(prompts), found):
        top = results[:n]
        shown = source.images(top)
        images = [im if im is not None else np.full((8, 8, 3), 200, np.uint8) for im, _ in shown]
        caps = [f"s{r['similarity']:.3f}" if im is not None else reason
                for r, (im, reason) in zip(top, shown)]
        failed = sum(im is None for im, _ in shown)
        title = f"{prompt}: top {len(top)} of {len(results)} (s: cosine similarity)" + \
            (f"; {failed} could not be shown" if failed else "")
        paths.append(contact_sheet(images, caps, folder / f"{stem}.png", title=title))
        shown_total += len(top) - failed
        for im, w in shown:
            if im is None:
                why[w] = why.get(w, 0) + 1
    return paths, {"images": shown_total, "failed": why}


def text(res: dict, cfg: SearchConfig) -> str:
    lines = [f"{res['results']} results from the {res['source']} search ({res['per_class']} per prompt asked):"]
    for p, c in res["per_prompt"].items():
        lines.append(f"  {c:>6}  {p}")
    if res["short"]:
        lines.append(f"fewer than {res['per_class']} for {len(res['short'])} prompt(s): the "
                     + ("pool holds too few images" if res["source"] == "local" else "service found too few; raise "
                        "--candidates or relax its filters"))
    if res["source"] == "service":
        lines.append(f"requests sent: {res['requests']} ({res['answered_before']} prompt(s) answered before, from "
                     f"{res['cache']})")
    if res.get("approximate"):
        a = res["approximate"]
        how = (f"built now in {a['built_seconds']:.1f} s" if a["built_seconds"] is not None
               else "built by an earlier search")
        lines.append(f"approximate search: the usearch HNSW index of {a['rows']} images {a['index']} ({how}); a "
                     f"result may lack a few of the exact top (drop --approximate for the exact scan)")
    lines.append(f"wrote {res['jsonl']}" + (f" and {res['parquet']}" if res["parquet"] else
                                           " (results.parquet too when pyarrow is installed)"))
    if res["sheets"]:
        failed = ", ".join(f"{v} {k}" for k, v in sorted(res["shown"]["failed"].items()))
        lines.append(f"contact sheets: {Path(res['sheets'][0]).parent}/ ({res['shown']['images']} images"
                     + (f"; not shown: {failed}" if failed else "") + "): look at them before downloading")
    return "\n".join(lines)
