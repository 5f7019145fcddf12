"""`search --approximate` (teacher/ann.py, which runs teacher/ann_worker.py as a process): a usearch
HNSW index of an embedding cache, against exact search (knn.py) on synthetic clustered embeddings
in a real cache: its recall, the index built once and reused, built again when the cache changes,
two searches building it once, unreadable rows never returned, the worker's failures said in one
message. (The CLI's --approximate on a real embedded pool: tests/test_search.py.)

usearch is never imported in this process: with it loaded, torch.jit.script and torch's ONNX
export spin (the pytest process hung collecting tests/test_compress.py). Every test goes through
the worker; what must look at the index file with usearch itself does so in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from clipdistill.data.store import KEPT, RETRY, SKIPPED
from clipdistill.teacher import ann, knn  # neither imports usearch (the worker does)
from clipdistill.teacher.cache import EmbeddingCache

ROWS, DIM, CLUSTERS = 20000, 64, 20
# the recall the tests hold the graph to (the share of exact search's rows it returns); measured 1.0
# on these clusters, benchmarks/bench_ann.md measures it at 100k and more rows
RECALL = 0.98

needs_usearch = pytest.mark.skipif(importlib.util.find_spec("usearch") is None,
                                   reason="usearch is not installed (pip install 'clipdistill[ann]')")


def make_cache(folder: Path, rows: int, dim: int, seed: int = 0) -> tuple[EmbeddingCache, np.ndarray]:
    """A complete embedding cache of clustered float16 rows (every 13th unreadable), and the
    clusters' centres (where prompts are put)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim))
    emb = (centres[rng.integers(0, CLUSTERS, rows)] + 0.8 * rng.standard_normal((rows, dim))).astype(np.float16)
    valid = np.full(rows, KEPT, np.uint8)
    valid[::13] = SKIPPED
    cache = EmbeddingCache.open(folder, {"model": "synthetic"}, {"name": f"clusters-{seed}"}, rows, dim)
    cache.write(0, emb, valid)
    cache.commit(rows)
    return cache, centres


def prompts_near(centres: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (centres[:count] + 0.5 * rng.standard_normal((count, centres.shape[1]))).astype(np.float32)


def recall(found: knn.Found, exact: knn.Found) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / max(1, len(b))
                          for a, b in zip(found.rows, exact.rows)]))


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True)
def _usearch_stays_out_of_this_process():
    yield
    assert "usearch" not in sys.modules, "usearch was imported in the pytest process (it makes torch spin)"


def test_the_worker_loads_no_torch_and_the_searching_side_no_usearch():
    """The worker's imports, usearch's included, leave torch out; ann.py (imported where the teacher
    runs) leaves usearch out."""
    worker = _python("import json, sys\nfrom clipdistill.teacher import ann_worker\n"
                     "try:\n    ann_worker._index_class()  # usearch itself, when installed\n"
                     "except ModuleNotFoundError:\n    pass\n"
                     "heavy = ('torch', 'open_clip', 'timm', 'usearch')\n"
                     "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))")
    assert worker.returncode == 0, worker.stderr
    assert json.loads(worker.stdout) == (["usearch"] if importlib.util.find_spec("usearch") else [])
    side = _python("import sys\nimport clipdistill.teacher.ann, clipdistill.teacher.search_sources\n"
                   "print('usearch' in sys.modules)")
    assert side.returncode == 0 and side.stdout.strip() == "False", side.stderr


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> dict:
    """20k rows; the exact top 5 of prompt 0 are made unreadable (RETRY) after the fact, so a graph
    that indexed them would return them."""
    if importlib.util.find_spec("usearch") is None:
        pytest.skip("usearch is not installed (pip install 'clipdistill[ann]')")
    folder = tmp_path_factory.mktemp("ann") / "cache"
    cache, centres = make_cache(folder, ROWS, DIM)
    text = prompts_near(centres, 8)
    top = knn.top_per_prompt(cache.embeddings, text[:1], 5, cache.valid)[0][1]
    cache.write_scattered(top, np.full(len(top), RETRY, np.uint8), embeddings=np.asarray(cache.embeddings[top]))
    cache.commit(ROWS, [(int(r), "gone", True) for r in top])
    graph = ann.open_index(cache)
    return {"cache": cache, "centres": centres, "text": text, "graph": graph, "hidden": top}


def test_approximate_search_recalls_exact_search(clustered):
    cache, text, built = clustered["cache"], clustered["text"], clustered["graph"]
    valid = np.asarray(cache.valid)
    assert built.build_seconds is not None and built.rows == int((valid == KEPT).sum())
    found, graph = ann.search(cache, text, 50)
    assert graph.path == built.path and graph.build_seconds is None  # the graph open_index built
    assert 0 < graph.worker_seconds < graph.wall_seconds
    exact = knn.search(cache.embeddings, text, 50, cache.valid)
    assert [len(r) for r in found.rows] == [50] * len(text)
    assert recall(found, exact) >= RECALL
    given = np.concatenate(found.rows)
    assert len(given) == len(set(given.tolist()))  # each image to one prompt
    assert (valid[given] == KEPT).all() and not set(clustered["hidden"].tolist()) & set(given.tolist())
    # similarities: the cosine exact search computes (float32 from the cache), best first ...
    sims = knn.normalise(np.asarray(cache.embeddings, np.float32)) @ knn.normalise(text).T
    for p, (rows, s) in enumerate(zip(found.rows, found.similarity)):
        np.testing.assert_allclose(s, sims[rows, p], atol=1e-5)
        assert (np.diff(s) <= 1e-7).all()
    # ... which usearch's cosine distance is 1 minus (its own float16 arithmetic: close, not equal);
    # the file is a usearch index as usearch itself reads it (in a process of its own)
    q = knn.normalise(text[:1]).astype(np.float32)
    out = _python(f"import json, numpy as np\nfrom usearch.index import Index\n"
                  f"index = Index.restore({str(graph.path)!r}, view=True)\n"
                  f"m = index.search(np.array({q.tolist()!r}, np.float32), count=10)\n"
                  f"print(json.dumps([m.keys.astype(int).tolist(), m.distances.astype(float).tolist()]))")
    assert out.returncode == 0, out.stderr
    keys, distances = json.loads(out.stdout)
    assert len(keys) == 10
    np.testing.assert_allclose(1 - np.array(distances), sims[np.array(keys), 0], atol=2e-3)


def test_competing_prompts_widen_the_graphs_lists(clustered):
    """Prompts that all want the same rows: asked again for more (as exact search does), all full."""
    cache = clustered["cache"]
    text = np.repeat(clustered["text"][1:2], 5, axis=0)
    found, _ = ann.search(cache, text, 300)
    exact = knn.search(cache.embeddings, text, 300, cache.valid)
    assert found.passes > 1 and [len(r) for r in found.rows] == [300] * 5
    assert recall(found, exact) >= RECALL
    given = np.concatenate(found.rows)
    assert len(given) == len(set(given.tolist()))


@needs_usearch
def test_index_is_built_once_then_reused_and_built_again_when_the_cache_changes(tmp_path, capfd):
    cache, centres = make_cache(tmp_path / "cache", 3000, 32, seed=2)
    text = prompts_near(centres, 3)
    first = ann.open_index(cache)
    assert first.build_seconds is not None and first.path.parent == cache.path
    stamp = first.path.stat().st_mtime_ns
    found, again = ann.search(EmbeddingCache.load(cache.path), text, 10)  # another search, the cache read-only
    assert again.build_seconds is None and again.path == first.path and first.path.stat().st_mtime_ns == stamp
    # written atomically: no temporary left beside it
    assert not [p for p in cache.path.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    # a row becomes unreadable: another key, built again, the stale index deleted, the row never returned
    row = int(found.rows[0][0])
    cache.write_scattered(np.array([row]), np.array([SKIPPED], np.uint8),
                          embeddings=np.asarray(cache.embeddings[[row]]))
    cache.commit(3000)
    found, changed = ann.search(cache, text, 10)
    assert changed.build_seconds is not None and changed.path != first.path and not first.path.exists()
    assert changed.rows == first.rows - 1
    assert row not in {int(r) for rows in found.rows for r in rows}
    # a damaged index file is built again, with a warning (the worker's, on the shared stderr)
    with open(changed.path, "r+b") as f:
        f.truncate(os.path.getsize(changed.path) // 2)
    capfd.readouterr()
    rebuilt = ann.open_index(cache)
    assert rebuilt.build_seconds is not None and "building it again" in capfd.readouterr().err
    # a pool smaller than the prompts ask for: every readable row handed out once (the exact scan)
    few, _ = ann.search(cache, text, 2000)
    assert sorted(int(r) for rows in few.rows for r in rows) == np.flatnonzero(np.asarray(cache.valid) == KEPT).tolist()


@needs_usearch
def test_two_searches_at_once_build_the_index_once(tmp_path):
    """Two worker processes on a cache with no index: the lock lets one build it; the other waits
    and opens it."""
    cache, centres = make_cache(tmp_path / "cache", 4000, 32, seed=3)
    text = prompts_near(centres, 2)
    graphs, errors = [None, None], []

    def one(i: int) -> None:
        try:
            graphs[i] = ann.search(cache, text, 10)[1]
        except Exception as e:  # noqa: BLE001 - said by the assert below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and all(graphs), errors
    assert sorted(g.build_seconds is None for g in graphs) == [False, True]
    assert graphs[0].path == graphs[1].path and list(cache.path.glob("ann-*.usearch")) == [graphs[0].path]


def test_the_workers_failures_come_back_as_one_message(tmp_path, monkeypatch):
    """No usearch in the worker: ModuleNotFoundError naming it (the CLI turns it into the `ann`
    extra's install command); a cache gone: what failed and the way out; a worker killed: how."""
    cache, centres = make_cache(tmp_path / "cache", 500, 16, seed=4)
    text = prompts_near(centres, 2)
    without = ("import sys\nsys.modules['usearch'] = sys.modules['usearch.index'] = None  # as if not installed\n"
               "from clipdistill.teacher.ann_worker import main\nsys.exit(main(sys.argv[1:]))")
    monkeypatch.setattr(ann, "COMMAND", [sys.executable, "-c", without])
    with pytest.raises(ModuleNotFoundError) as e:
        ann.search(cache, text, 5)
    assert e.value.name == "usearch" and "approximate index" in str(e.value)
    monkeypatch.undo()

    gone = EmbeddingCache.load(cache.path)
    (cache.path / "manifest.json").rename(tmp_path / "manifest.json")
    with pytest.raises(ann.ApproximateSearchError, match="drop --approximate") as e:
        ann.search(gone, text, 5)
    assert str(cache.path) in str(e.value) and "MissingResourceError" in str(e.value)
    assert "Traceback" not in str(e.value)

    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(ann, "COMMAND", [sys.executable, "-c", killed])
    with pytest.raises(ann.ApproximateSearchError, match="killed by signal 9"):
        ann.search(gone, text, 5)
