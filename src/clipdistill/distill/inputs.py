"""What a run was made from, by content: the lines of its prompt and template files, the rows
it trained on, and the fingerprints of its datasets' images.

A run's config names files (`--prompts classes.txt`, `--rows CURATION.json`, `--data-root DIR`);
the same names can hold other content tomorrow. Comparing configs alone let an edited prompts
file or a pool with new photos reuse ("already complete") or resume a run made from the old
ones, and ship the old model. So every run records these `inputs` beside its config (in its
checkpoints and result.json), and a run is only resumed or reused when they are the same now.

Datasets whose images follow from the config alone (shapes10, STL10) are compared by config;
folders and pools, whose images live in files, by their fingerprints (a listing, or the content
hashes of a pool), which are cheap to take again (the pool index is cached)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from ..data.prompts import read_lines

UNRECORDED = "the run was made by a clipdistill that did not record what its inputs held"


def splits_of(cfg) -> list[str]:
    """The splits a run of `cfg` reads: its training splits and test (and train, for the probe)."""
    if cfg.dataset != "folder":
        return list(dict.fromkeys(["train"] + list(cfg.data) + ["test"]))
    return list(dict.fromkeys(list(cfg.data) + ["test"]))


def rows_digest(path: str) -> Optional[str]:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest() if path else None


def _lines(path: Optional[str], flag: str) -> Optional[list[str]]:
    return read_lines(path, flag) if path else None


def recorded(cfg, datasets: dict) -> dict:
    """The inputs of a run of `cfg` over these opened datasets (split -> dataset)."""
    return {"prompt_lines": _lines(cfg.prompts, "--prompts"), "template_lines": _lines(cfg.templates, "--templates"),
            "rows_sha1": rows_digest(cfg.rows),
            "datasets": {s: ds.fingerprint() for s, ds in datasets.items()}}


def current(cfg) -> dict:
    """The inputs a run of `cfg` would be made from now, without loading the teacher; the
    datasets only where their images live in files (folders and pools)."""
    datasets = {}
    if cfg.dataset == "folder":
        from ..core.errors import MissingSplitError

        for s in splits_of(cfg):
            try:
                datasets[s] = cfg.open_split(s, cfg.cache_dir)
            except MissingSplitError:
                pass
    return recorded(cfg, datasets)


def differences(then: Optional[dict], now: dict) -> list[str]:
    """What differs between a run's recorded inputs and today's, in words a user can act on.
    Datasets are compared where both sides have them."""
    if not isinstance(then, dict):
        return [UNRECORDED]
    out = []
    for key, flag in (("prompt_lines", "--prompts"), ("template_lines", "--templates")):
        a, b = then.get(key), now.get(key)
        if a != b:
            out.append(f"{flag}: the file's lines changed since the run ({_change(a, b)})")
    if then.get("rows_sha1") != now.get("rows_sha1"):
        out.append("--rows: the curated rows changed since the run (the pool or the curation changed)")
    a, b = then.get("datasets") or {}, now.get("datasets") or {}
    for s in sorted(set(a) & set(b)):
        if a[s] != b[s]:
            out.append(f"the {s} split's images changed since the run ({_dataset_change(a[s], b[s])})")
    return out


def _change(a: Optional[list], b: Optional[list]) -> str:
    if a is None or b is None:
        return "none then" if a is None else "none now"
    gone, new = [x for x in a if x not in b], [x for x in b if x not in a]
    if not gone and not new:
        return "the same lines in another order: " + ", ".join(repr(x) for x in b)
    parts = ([f"removed {', '.join(map(repr, gone[:3]))}"] if gone else []) + \
            ([f"added {', '.join(map(repr, new[:3]))}"] if new else [])
    return "; ".join(parts)


def _dataset_change(a: dict, b: dict) -> str:
    n_a, n_b = a.get("n"), b.get("n")
    what = "a pool" if a.get("name") == "pool" else (a.get("path") or a.get("name"))
    if n_a != n_b:
        return f"{what}: {n_a} images then, {n_b} now"
    return f"{what}: as many images ({n_a}), but files were edited, renamed or replaced"
