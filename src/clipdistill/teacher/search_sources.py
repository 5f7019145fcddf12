"""Where `clipdistill search` finds images for the prompts: one interface, a registry of sources.

A source answers `find(prompts, n)` with, per prompt, at most `n` results best first, every
image given to one prompt only (the prompt it matches best; the prompt that lost it takes its
next candidate: knn.one_per_image). Each result is a dict with the columns img2dataset reads
(`url`, `caption`) plus `similarity` and the source's own key (`row` in a pool, `id` in a
service's index). `images(results)` gives what the contact sheets show: a PIL image, or None and
why not.

- `local` (`--pool`): a pool of folders or tar shards, embedded with the code path fit-prompts
  uses (teacher/outputs.py: the embedding cache, filled first if it is not yet, and the prompts'
  text embeddings); the cache is the index, searched exactly (knn.py), or with `--approximate`
  through a usearch HNSW graph built once from it (ann.py: usearch runs in a worker process, never
  in this one, which holds torch).
- `service` (`--service URL --index NAME`): a clip-retrieval knn service (knn_service.py); it is
  asked for more candidates than `n` per prompt (`--candidates`) so that a prompt that loses an
  image to another one can take its next, and a prompt still short is asked again for twice as
  many (up to WIDEN_ROUNDS times) while the service's answers are full."""

from __future__ import annotations

import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from ..core.registry import Registry
from .knn import one_per_image

log = logging.getLogger(__name__)

# times a prompt left short by the URL sharing is asked again for twice as many (16x at most)
WIDEN_ROUNDS = 4


class Source(Protocol):
    name: str

    def find(self, prompts: list[str], n: int) -> list[list[dict]]: ...

    def images(self, results: list[dict]) -> list[tuple[Optional[object], str]]: ...

    def counts(self) -> dict: ...


SOURCES: Registry = Registry("search source", "--pool/--service")


@SOURCES.register("local")
class LocalSource:
    name = "local"

    def __init__(self, cfg):
        self.cfg = cfg
        self.dataset = None
        self.passes = 0
        self.graph = None

    def index(self):
        """The pool's embedding cache and the prompts' text embeddings, as fit-prompts makes them."""
        from ..data.options import DataOptions
        from .outputs import prepare_teacher_outputs

        cfg = self.cfg
        data = DataOptions(dataset="folder", pool=list(cfg.pool), prompts=cfg.prompts, templates=cfg.templates)
        outs = prepare_teacher_outputs(cfg, data, ["unlabeled"], progress=cfg.progress)
        self.dataset = outs.datasets["unlabeled"]
        return outs.caches["unlabeled"], outs.text_embeddings.numpy(), outs.prompts

    def find(self, prompts: list[str], n: int) -> list[list[dict]]:
        from . import knn

        cfg = self.cfg
        cache, text, _ = self.index()
        if cfg.approximate:
            from . import ann

            found, self.graph = ann.search(cache, text, n, cfg.chunk_rows, cfg.progress)  # in a worker process
        else:
            found = knn.search(cache.embeddings, text, n, cache.valid, cfg.chunk_rows, cfg.progress)
        self.passes = found.passes
        return [[{"url": self.dataset.describe(int(r)), "caption": "", "similarity": round(float(s), 6),
                  "row": int(r)} for r, s in zip(rows, sims)]
                for rows, sims in zip(found.rows, found.similarity)]

    def images(self, results: list[dict]) -> list[tuple[Optional[object], str]]:
        out = []
        for r in results:
            try:
                out.append((self.dataset.load(r["row"]), ""))
            except OSError as e:  # changed since it was embedded
                out.append((None, f"unreadable: {e}"[:40]))
        return out

    def counts(self) -> dict:
        g = self.graph
        approximate = None if g is None else {"index": str(g.path), "rows": g.rows, "built_seconds": None if
                                              g.build_seconds is None else round(g.build_seconds, 2)}
        return {"pool_images": len(self.dataset) if self.dataset is not None else 0, "scans": self.passes,
                "approximate": approximate}


@SOURCES.register("service")
class ServiceSource:
    name = "service"

    def __init__(self, cfg):
        from .knn_service import KnnService

        self.cfg = cfg
        self.client = KnnService(cfg.service, Path(cfg.out) / "service", cfg.timeout, cfg.retries, cfg.backoff,
                                 cfg.rate_limit)
        self.answered_before = 0
        self.fetched: dict = {}

    def find(self, prompts: list[str], n: int) -> list[list[dict]]:
        from ..core.progress import bar

        asked = [self.cfg.candidates or 2 * n] * len(prompts)
        answers = [self._ask(p, k) for p, k in zip(bar(prompts, desc="ask the service", unit="prompt",
                                                       enabled=self.cfg.progress), asked)]
        picked = _one_per_url(answers, n)
        for _ in range(WIDEN_ROUNDS):
            # a prompt left short after each URL went to the prompt it matches best, whose answer was
            # full (the service had more to give): asked again for twice as many, as the local search
            # refills a prompt's candidate list until the result is exact
            short = [p for p in range(len(prompts)) if len(picked[p]) < n and len(answers[p]) >= asked[p]]
            if not short:
                break
            for p in short:
                asked[p] *= 2
                log.info("%r: %d of %d after sharing URLs with the other prompts; asking for %d",
                         prompts[p], len(picked[p]), n, asked[p])
                answers[p] = self._ask(prompts[p], asked[p])
            picked = _one_per_url(answers, n)
        return picked

    def _ask(self, prompt: str, num_images: int) -> list[dict]:
        from .knn_service import request_body

        c = self.cfg
        results, cached = self.client.query(request_body(
            prompt, c.index, num_images, c.num_result_ids, c.use_mclip, c.deduplicate, c.use_safety_model,
            c.use_violence_detector, c.aesthetic_score, c.aesthetic_weight))
        self.answered_before += cached
        return results

    def images(self, results: list[dict]) -> list[tuple[Optional[object], str]]:
        """The results' images fetched over HTTP (a few at a time), or why not: HTTP errors,
        timeouts, bytes that are not an image, an image already shown (the same bytes)."""
        from ..data.images import open_rgb

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda r: _fetch(r["url"], self.cfg.fetch_timeout), results))
        out = []
        for r, (data, why) in zip(results, got):
            if data is None:
                out.append((None, why))
                continue
            try:
                im = open_rgb(io.BytesIO(data))
            except OSError:
                out.append((None, "not an image"))
                continue
            digest = hashlib.sha1(data).hexdigest()
            if self.fetched.setdefault(digest, r["url"]) != r["url"]:
                out.append((None, "duplicate"))
                continue
            out.append((im, ""))
        return out

    def counts(self) -> dict:
        return {"requests": self.client.requests, "answered_before": self.answered_before,
                "cache": str(self.client.cache_dir)}


def _one_per_url(answers: list[list[dict]], n: int) -> list[list[dict]]:
    """Per prompt its first answer per URL, then every URL to one prompt (knn.one_per_image)."""
    ids: dict[str, int] = {}
    cands, firsts = [], []
    for results in answers:
        first: dict[int, dict] = {}
        for r in results:
            first.setdefault(ids.setdefault(r["url"], len(ids)), r)
        firsts.append(first)
        keys = np.fromiter(first, np.int64, len(first))
        cands.append((np.array([first[k]["similarity"] for k in keys], np.float64), keys))
    picked = one_per_image(cands, n)
    return [[firsts[p][int(k)] for k in keys] for p, (_, keys) in enumerate(picked)]


def _fetch(url: str, timeout: float) -> tuple[Optional[bytes], str]:
    import socket
    import urllib.error
    import urllib.request

    from ..data.images import MAX_FILE_BYTES

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read(MAX_FILE_BYTES + 1)
    except urllib.error.HTTPError as e:
        return None, f"HTTP {e.code}"
    except (socket.timeout, TimeoutError):
        return None, "timeout"
    except urllib.error.URLError as e:
        return None, "timeout" if isinstance(e.reason, (socket.timeout, TimeoutError)) else "unreachable"
    except (OSError, ValueError) as e:  # a reset connection, a URL urllib cannot open
        return None, type(e).__name__
    return (None, "too large") if len(data) > MAX_FILE_BYTES else (data, "")
