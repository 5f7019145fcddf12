"""Past one machine's memory: the pixel store (a split decoded once into a uint8 array on disk,
shared by every run, read row by row without holding it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def photo_folder(tmp_path):
    """Two classes of odd-sized photos, a broken JPEG and a text file among them."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(9):
            Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


def _in_memory(ds, size):
    """What the decoder without a store gives (the reference)."""
    ds.store_dir = None
    ds._pixels = None
    return ds.pixels(size)


def _mapped_rss_kb(file) -> int:
    """Resident kB of this process's mappings of `file` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.rstrip().endswith(str(file))
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


def test_pixel_store_equals_decoding_in_memory_and_is_reused(photo_folder, tmp_path):
    from clipdistill.data.datasets import create_dataset
    from clipdistill.data.pixel_store import PixelStore, StoredPixels, store_path

    cache = tmp_path / "cache"
    ds = create_dataset("folder", "train", str(photo_folder), cache_dir=str(cache))
    stored = ds.pixels(24)
    assert isinstance(stored, StoredPixels) and stored.shape == (20, 24, 24, 3)
    path = store_path(cache, ds.slug(), "train", 24)
    store = PixelStore.load_complete(path)
    assert store.manifest["skipped"] == 2 and len(store.valid_indices()) == 18
    assert any("broken.jpg" in s for s in store.manifest["skipped_items"])
    ref = _in_memory(create_dataset("folder", "train", str(photo_folder)), 24)
    np.testing.assert_array_equal(np.asarray(stored), ref)
    rows = np.array([7, 3, 4, 5, 19, 0, 3])  # unsorted, a run of three, a repeat
    np.testing.assert_array_equal(stored[rows], ref[rows])
    np.testing.assert_array_equal(stored[2:6], ref[2:6])
    np.testing.assert_array_equal(stored[11], ref[11])
    # a second run (another process, another dataset object) reads the same store, decoding nothing
    manifest = (path / "manifest.json").read_text()
    again = create_dataset("folder", "train", str(photo_folder), cache_dir=str(cache)).pixels(24)
    assert (path / "manifest.json").read_text() == manifest
    np.testing.assert_array_equal(again[rows], ref[rows])
    # another side is another store
    assert create_dataset("folder", "train", str(photo_folder), cache_dir=str(cache)).pixels(16).shape[1] == 16


def test_an_interrupted_fill_resumes_and_a_damaged_store_is_rebuilt(photo_folder, tmp_path, monkeypatch, caplog):
    from clipdistill.data.datasets import create_dataset
    from clipdistill.data.pixel_store import fill_pixel_store, store_path
    from clipdistill.data.protocol import FileDataset

    cache = tmp_path / "cache"
    real = FileDataset.load

    def dies_at_13(self, i):
        if i == 13:
            raise KeyboardInterrupt  # the process stops mid-fill (a kill between two batches)
        return real(self, i)

    monkeypatch.setattr(FileDataset, "load", dies_at_13)
    ds = create_dataset("folder", "train", str(photo_folder), cache_dir=str(cache))
    with pytest.raises(KeyboardInterrupt):
        fill_pixel_store(ds, cache, 24, workers=0, batch=4)
    path = store_path(cache, ds.slug(), "train", 24)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["done"] == 12 and not manifest["complete"]
    monkeypatch.setattr(FileDataset, "load", real)
    with caplog.at_level("INFO", logger="clipdistill"):
        store = fill_pixel_store(ds, cache, 24, workers=0, batch=4)
    assert any("resuming" in r.getMessage() and "12/20" in r.getMessage() for r in caplog.records)
    # the filler's written pages were handed back as it went: its store is still open for
    # writing, yet none of the array is resident in this process (a 200,000-image fill would
    # otherwise hold 2.5 GB)
    assert store.arrays["pixels"].shape == (20, 24, 24, 3) and _mapped_rss_kb(path / "pixels.npy") == 0
    ref = _in_memory(create_dataset("folder", "train", str(photo_folder)), 24)
    np.testing.assert_array_equal(np.asarray(store.reader()), ref)
    # a truncated array is found on open and rebuilt by the next filler
    with open(path / "pixels.npy", "r+b") as f:
        f.truncate(1000)
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipdistill"):
        again = fill_pixel_store(ds, cache, 24, workers=0)
    assert any("damaged" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(np.asarray(again.reader()), ref)


def test_a_store_of_other_images_is_refused(tmp_path):
    from clipdistill.core.errors import CacheMismatchError
    from clipdistill.data.pixel_store import PixelStore

    owner = {"dataset": {"name": "folder", "files": "abc"}, "resize": "x"}
    PixelStore.open_for_writing(tmp_path / "s", owner, {"count": 3, "size": 8})
    with pytest.raises(CacheMismatchError, match="pixel store .* other images.*files"):
        PixelStore.open_for_writing(tmp_path / "s", {**owner, "dataset": {"name": "folder", "files": "abd"}},
                                    {"count": 3, "size": 8})


def test_a_tar_shard_pool_is_indexed_stored_and_trained_from(tmp_path, cache_dir, trained_teacher_file):
    """make-pool --shards writes WebDataset shards (copies and broken members among them); they
    enter the pool index as folders do, fill the pixel store, and a zero-label run trains on them."""
    from conftest import train_kwargs

    from clipdistill.data.datasets import create_dataset
    from clipdistill.data.example_pool import PoolConfig, make_pool
    from clipdistill.data.pixel_store import StoredPixels
    from clipdistill.data.pool import index_pool
    from clipdistill.distill.config import TrainConfig
    from clipdistill.distill.train import train

    made = make_pool(PoolConfig(out=str(tmp_path / "ex"), images=160, size=32, duplicates=6, broken=3,
                                test_per_class=10, shards=3))
    spec = made["pool"]
    assert spec.endswith("pool-{000..002}.tar") and len(list((tmp_path / "ex" / "shards").glob("*.tar"))) == 3
    idx = index_pool([spec], tmp_path / "idx")
    # the .txt member is metadata, not an image: only the truncated and the empty PNG are broken
    assert idx.counts() == {"files": 160 + 6 + 2, "images": 160, "duplicates": 6, "broken": 2}
    assert all("::" in p and ".tar" in p for p in idx.broken)
    # the same images as the folder form of the same pool, by content
    folders = make_pool(PoolConfig(out=str(tmp_path / "ex-folders"), images=160, size=32, duplicates=6, broken=3,
                                   test_per_class=10))
    assert index_pool([folders["pool"]]).fingerprint() == idx.fingerprint()

    ds = create_dataset("folder", "unlabeled", "", pools=(spec,), cache_dir=str(tmp_path / "c"))
    px = ds.pixels(32)
    assert isinstance(px, StoredPixels) and px.shape == (160, 32, 32, 3)
    np.testing.assert_array_equal(px[7], np.asarray(ds.load(7)))

    res = train(TrainConfig(**train_kwargs(cache_dir, trained_teacher_file, dataset="folder",
                                           data_root=made["eval"], pool=[spec], prompts=made["prompts"],
                                           data=["unlabeled"], head="text", epochs=1, max_images=0,
                                           out=str(tmp_path / "run"))))
    assert res["n_test"] == 40 and 0 <= res["test_accuracy"] <= 100
    assert (cache_dir / "pixels").is_dir()  # the run read its batches from the store


def test_the_pool_index_is_reused_without_reading_and_keeps_odd_names(tmp_path):
    """An unchanged pool is not read again (nor its index rewritten); a non-UTF-8 file name
    survives the index file and is read back; a changed file is hashed again."""
    import os

    from clipdistill.data.pool import PoolDataset, index_path, index_pool

    root = tmp_path / "pool"
    (root / "trip").mkdir(parents=True)
    for value, name in ((33, b"a.png"), (90, b"caf\xe9.png"), (150, b"trip/b\xff.png")):
        Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(
            os.fsdecode(os.path.join(os.fsencode(root), name)), format="PNG")
    first = index_pool([root], tmp_path / "c")
    file = index_path(tmp_path / "c", [root])
    stamp = file.stat().st_mtime_ns
    # other pixels, the same number of bytes and the same mtime: a reused index keeps the old
    # hash (nothing was read)
    a = root / "a.png"
    st = a.stat()
    Image.fromarray(np.full((12, 12, 3), 7, np.uint8)).save(a)
    assert a.stat().st_size == st.st_size
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = index_pool([root], tmp_path / "c")
    assert again.hashes == first.hashes and file.stat().st_mtime_ns == stamp
    ds = PoolDataset(again)
    assert sorted(os.fsencode(f).rsplit(b"/", 1)[-1] for f in ds.files) == [b"a.png", b"b\xff.png", b"caf\xe9.png"]
    assert sorted(int(np.asarray(ds.load(i))[0, 0, 0]) for i in range(len(ds))) == [7, 90, 150]
    # a touched file is read again and the index rewritten
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = index_pool([root], tmp_path / "c")
    assert third.fingerprint() != first.fingerprint() and file.stat().st_mtime_ns != stamp


def _torchrun(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "clipdistill", *args]


def _embed_args(data_root, teacher, cache, n: int) -> list[str]:
    return ["embed", "--pretrained", str(teacher), "--split", "test", "--data-root", str(data_root), "--max-images",
            str(n), "--embed-batch-size", "16", "--workers", "0", "--no-progress", "--cache-dir", str(cache)]


def _rows(cache_root):
    from pathlib import Path

    found = next(Path(cache_root).glob("embeddings/*/*/test/embeddings.npy"))
    return np.load(found).astype(np.float32), np.load(found.with_name("valid.npy"))


def _assert_same_rows(a, b):
    (ea, va), (eb, vb) = a, b
    np.testing.assert_array_equal(va, vb)
    cos = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
    assert cos.min() >= 0.9999, cos.min()


def test_torchrun_ranks_embed_their_own_slices_into_one_cache(tmp_path, data_root, random_teacher_file):
    import os
    import subprocess

    from conftest import run_cli

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_torchrun(*_embed_args(data_root, random_teacher_file, tmp_path / "two", 600)),
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 embedded rows 0-300" in proc.stderr and "rank 1 embedded rows 300-600" in proc.stderr
    assert "from 2 ranks" in proc.stderr
    run_cli(*_embed_args(data_root, random_teacher_file, tmp_path / "one", 600))
    _assert_same_rows(_rows(tmp_path / "two"), _rows(tmp_path / "one"))
    assert not list((tmp_path / "two").glob("embeddings/*/*/test/slices"))  # merged and cleaned up


def _children(pid: int) -> dict[int, dict]:
    """Processes whose parent is `pid`, with their environment."""
    from pathlib import Path

    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                env = dict(kv.split("=", 1) for kv in (p / "environ").read_text().split("\0") if "=" in kv)
                out[int(p.name)] = env
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_a_killed_rank_stops_the_others_and_a_rerun_completes(tmp_path, data_root, random_teacher_file):
    import json
    import os
    import signal
    import subprocess
    import time

    from conftest import run_cli

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = _embed_args(data_root, random_teacher_file, tmp_path / "two", 2000)
    proc = subprocess.Popen(_torchrun(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    victim, deadline = None, time.time() + 300
    while victim is None and time.time() < deadline and proc.poll() is None:
        records = list((tmp_path / "two").glob("embeddings/*/*/test/slices/1-of-2.json"))
        if records and json.loads(records[0].read_text())["done"] >= 1000 + 32:  # rank 1 is two batches in
            ranks = {e.get("RANK"): pid for pid, e in _children(proc.pid).items()}
            victim = ranks.get("1")
        time.sleep(0.1)
    assert victim is not None, "rank 1 never got going"
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60 and proc.returncode != 0
    assert "SIGKILL" in err or "Signals.SIGKILL" in err or "exitcode  : -9" in err, err[-2000:]
    manifest = json.loads(next((tmp_path / "two").glob("embeddings/*/*/test/manifest.json")).read_text())
    assert not manifest["complete"]
    rerun = subprocess.run(_torchrun(*args), capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rank 1 resumes its slice at" in rerun.stderr
    run_cli(*_embed_args(data_root, random_teacher_file, tmp_path / "one", 2000))
    _assert_same_rows(_rows(tmp_path / "two"), _rows(tmp_path / "one"))


def test_a_rank_0_failure_while_preparing_stops_every_rank_with_its_message(tmp_path, cache_dir, data_root):
    """Rank 0 fails while the others wait for its caches: they stop within seconds, not at the
    process group's timeout, and say why."""
    import os
    import subprocess
    import time

    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not a checkpoint at all" * 100)
    t0 = time.time()
    proc = subprocess.run(_torchrun("train", "--pretrained", str(bad), "--data-root", str(data_root), "--epochs",
                                    "1", "--max-images", "200", "--student", "resnet10t", "--no-progress",
                                    "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "run")),
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert "weights.safetensors" in proc.stderr


def test_a_folder_edited_in_place_gets_its_pixel_store_rebuilt(photo_folder, tmp_path, caplog):
    """Same folder, same path, other photos: the store is out of date, rebuilt with a warning
    (it was refused with 'delete that folder', stopping fit-prompts after the user edited --eval)."""
    from clipdistill.data.datasets import create_dataset
    from clipdistill.data.pixel_store import fill_pixel_store

    cache = tmp_path / "cache"
    first = fill_pixel_store(create_dataset("folder", "train", str(photo_folder)), cache, 24, workers=0)
    assert first.count == 20
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(photo_folder / "dogs" / "new.png")
    ds = create_dataset("folder", "train", str(photo_folder))
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipdistill"):
        again = fill_pixel_store(ds, cache, 24, workers=0)
    assert any("out of date" in r.getMessage() for r in caplog.records)
    assert again.path == first.path and again.count == 21
    np.testing.assert_array_equal(np.asarray(again.reader()), _in_memory(create_dataset("folder", "train",
                                                                                        str(photo_folder)), 24))
