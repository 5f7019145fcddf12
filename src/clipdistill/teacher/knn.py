"""Exact nearest images per prompt over an embedding cache: the cache *is* the index.

`top_per_prompt` reads the float16 array a chunk of rows at a time (bounded memory: a chunk in
float32, its similarities, and a running top-K per prompt kept with `np.argpartition`), so an
index of millions of rows is searched in the memory of one chunk. The pages it read are handed
back after each chunk (they stay in the kernel's page cache, not in the process's resident set).

`one_per_image` then gives every image to one prompt only: the pairs are taken best similarity
first, an image already given away or a prompt already full skips the pair. That is "an image
wanted by several prompts goes to the one it matches best, and the prompt that lost it takes its
next candidate", and it is exact with a finite candidate list per prompt when each prompt either
filled its N or saw every row (a pair below a full prompt's list could never be taken: the
prompt was full before the pair's turn); `search` widens the lists of the prompts that fall
short and scans again until that holds.

When exact search is too slow: the scan is one pass over the array (N x D x 2 bytes: 1 GB for a
million ViT-B-32 embeddings), dominated by reading it and converting float16 to float32;
benchmarks/bench_search.md measures it (seconds at 1M rows on two cores, flat memory). ann.py
(`search --approximate`) builds a usearch HNSW index from the cache once and asks it instead, with
the same assignment (`widen`); benchmarks/bench_ann.md says where that pays off."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.store import KEPT, release_pages

CHUNK_ROWS = 16384  # 16384 x 512 float32 = 32 MiB per chunk


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _keep_top(sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (similarity, row) pairs of one prompt, ties broken by the lower row: the same
    set whatever order or chunking the rows came in."""
    if len(sims) <= k:
        return sims, rows
    part = np.argpartition(-sims, k - 1)[:k]
    cut = sims[part].min()
    above = np.flatnonzero(sims > cut)
    tied = np.flatnonzero(sims == cut)
    tied = tied[np.argsort(rows[tied], kind="stable")[:k - len(above)]]
    keep = np.concatenate([above, tied])
    return sims[keep], rows[keep]


def _sorted(sims: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((rows, -sims))
    return sims[order], rows[order]


def top_per_prompt(embeddings: np.ndarray, text: np.ndarray, k: int, valid=None, chunk_rows: int = CHUNK_ROWS,
                   progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per prompt (row of `text`), its k most similar rows of `embeddings` by cosine, as
    (similarities, rows) sorted best first. `valid`: the cache's valid array (only KEPT rows count)."""
    from ..core.progress import bar as progress_bar

    t = normalise(text)
    n = len(embeddings)
    best = [(np.empty(0, np.float32), np.empty(0, np.int64)) for _ in range(len(t))]
    bar = progress_bar(total=n, unit="row", desc="search", enabled=progress)
    for a in range(0, n, chunk_rows):
        b = min(n, a + chunk_rows)
        sims = t @ normalise(embeddings[a:b]).T  # (prompts, rows): a prompt's row is contiguous
        rows = np.arange(a, b, dtype=np.int64)
        if valid is not None:
            ok = np.asarray(valid[a:b]) == KEPT
            sims, rows = sims[:, ok], rows[ok]
        for p in range(len(t)):
            s, r = _keep_top(np.concatenate([best[p][0], sims[p]]), np.concatenate([best[p][1], rows]), k)
            best[p] = (s, r)
        release_pages(embeddings)
        bar.update(b - a)
    bar.close()
    return [_sorted(s, r) for s, r in best]


def one_per_image(cands: list[tuple[np.ndarray, np.ndarray]], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """At most `n` items per prompt from each prompt's candidates (similarities, ids), every id to
    one prompt only: pairs taken best first (ties: lower id, then lower prompt)."""
    sims = np.concatenate([s for s, _ in cands]) if cands else np.empty(0, np.float32)
    ids = np.concatenate([r for _, r in cands]) if cands else np.empty(0, np.int64)
    prompt = np.concatenate([np.full(len(s), p, np.int64) for p, (s, _) in enumerate(cands)]) if cands else ids
    order = np.lexsort((prompt, ids, -sims))
    taken, count = set(), np.zeros(len(cands), np.int64)
    picked: list[list[int]] = [[] for _ in cands]
    for i in order:
        p, r = int(prompt[i]), int(ids[i])
        if count[p] >= n or r in taken:
            continue
        taken.add(r)
        count[p] += 1
        picked[p].append(i)
    return [(sims[np.asarray(ix, np.int64)], ids[np.asarray(ix, np.int64)]) for ix in picked]


@dataclass
class Found:
    """Per prompt: the rows given to it, best first, with their cosine similarity."""

    rows: list[np.ndarray]
    similarity: list[np.ndarray]
    passes: int  # scans of the array it took (one unless prompts competed for the same rows)


def widen(ask, prompts: int, n: int, total: int) -> Found:
    """Top-`n` per prompt, each row given to one prompt (`one_per_image`), from candidate lists
    that `ask(prompt_indices, k)` gives (per prompt, up to its k best (similarities, rows), best
    first): a prompt left short while it was asked for fewer than `total` (the rows there are)
    is asked again for twice as many. Exact when `ask` is (module docstring); ann.py asks a graph."""
    k = min(total, n * min(prompts, 4))  # room for the refills of a few competing prompts
    cands = ask(list(range(prompts)), k)
    asked = [k] * prompts
    passes = 1
    while True:
        picked = one_per_image(cands, n)
        short = [p for p, (s, _) in enumerate(picked) if len(s) < n and asked[p] < total]
        if not short:
            return Found([r for _, r in picked], [s for s, _ in picked], passes)
        k = min(total, 2 * k)
        for p, c in zip(short, ask(short, k)):
            cands[p], asked[p] = c, k
        passes += 1


def search(embeddings: np.ndarray, text: np.ndarray, n: int, valid=None, chunk_rows: int = CHUNK_ROWS,
           progress: bool = False) -> Found:
    """Exact top-`n` rows per prompt, each row given to one prompt (module docstring)."""
    total = int((np.asarray(valid) == KEPT).sum()) if valid is not None else len(embeddings)
    return widen(lambda ps, k: top_per_prompt(embeddings, text[ps], k, valid, chunk_rows, progress), len(text), n,
                 total)
