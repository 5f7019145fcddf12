"""Pools a user can trust: odd trees, broken and compressed shards, huge members, unambiguous
names, commas in paths, one make-pool per folder (issue 23, second round).

Every pool here is real: small PNGs, tar shards written with `tarfile`, symbolic links, a FIFO;
the unreadable file and folder are made unreadable for real (a process that is not root reads
them: the test drops its effective uid, since root reads a chmod 000 file)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _png(value: int, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


class TookTooLong(Exception):
    """Not a TimeoutError: that is an OSError, which os.walk would swallow and walk on."""


@contextlib.contextmanager
def _within(seconds: int, what: str):
    """Fail (instead of hanging the suite) when the block takes longer than `seconds`."""
    def on_alarm(signum, frame):
        raise TookTooLong(f"{what} took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _values(ds) -> list[int]:
    return sorted(int(np.asarray(ds.load(i))[0, 0, 0]) for i in range(len(ds)))


# ------------------------------------------------------------------ 1. loops and special files

def test_symlink_loops_are_walked_once_and_special_files_never_read(tmp_path):
    from clipdistill.data.pool import index_pool

    root = tmp_path / "pool"
    (root / "trip").mkdir(parents=True)
    (root / "a.png").write_bytes(_png(10))
    (root / "trip" / "b.png").write_bytes(_png(20))
    (root / "again").symlink_to(".")  # two links to the pool itself: a loop, twice
    (root / "trip" / "up").symlink_to("..")
    elsewhere = tmp_path / "elsewhere"  # a linked folder outside the pool is followed (once)
    elsewhere.mkdir()
    (elsewhere / "c.png").write_bytes(_png(30))
    (root / "linked").symlink_to(elsewhere)
    os.mkfifo(root / "pipe.png")  # opening it would wait for a writer forever
    (root / "zero.png").symlink_to("/dev/zero")  # reading it never ends
    with _within(20, "indexing a pool with link loops, a FIFO and /dev/zero"):
        idx = index_pool([root], tmp_path / "cache")
    assert idx.counts() == {"files": 5, "images": 3, "duplicates": 0, "broken": 2}, idx.broken
    assert sorted(Path(p).name for p in idx.images) == ["a.png", "b.png", "c.png"]
    why = {Path(p).name: m for p, m in idx.broken.items()}
    assert "not a regular file" in why["pipe.png"] and "FIFO" in why["pipe.png"]
    assert "not a regular file" in why["zero.png"] and "device" in why["zero.png"]


# ------------------------------------------------------------------ 2. dangling, unreadable

def test_a_dangling_link_is_a_broken_file_not_a_refused_pool(tmp_path):
    from clipdistill.data.pool import index_pool

    root = tmp_path / "pool"
    root.mkdir()
    (root / "a.png").write_bytes(_png(10))
    (root / "gone.png").symlink_to(tmp_path / "deleted.png")
    (root / "self.png").symlink_to("self.png")  # a link to itself
    idx = index_pool([root], tmp_path / "cache")
    assert idx.counts() == {"files": 3, "images": 1, "duplicates": 0, "broken": 2}
    why = {Path(p).name: m for p, m in idx.broken.items()}
    assert "dangling" in why["gone.png"] and "deleted.png" in why["gone.png"]
    assert "link" in why["self.png"]


_UNREADABLE = r"""
import json, os, sys
sys.path.insert(0, sys.argv[3])
from clipdistill.data.pool import index_pool
root, cache = sys.argv[1], sys.argv[2]
index_pool([os.path.join(root, "warm")])  # loads every module while the files are readable
def as_user(fn):
    if os.geteuid() != 0:
        return fn()
    os.setegid(65534); os.seteuid(65534)
    try:
        return fn()
    finally:
        os.seteuid(0); os.setegid(0)
def index():
    idx = index_pool([os.path.join(root, "pool")], cache)
    return {"counts": idx.counts(), "broken": idx.broken, "images": sorted(idx.images)}
os.chmod(os.path.join(root, "pool", "secret.png"), 0)
os.chmod(os.path.join(root, "pool", "locked"), 0)
first = as_user(index)
os.chmod(os.path.join(root, "pool", "secret.png"), 0o644)
os.chmod(os.path.join(root, "pool", "locked"), 0o755)
print(json.dumps({"first": first, "then": as_user(index)}))
"""


def test_an_unreadable_file_and_folder_are_listed_and_read_once_readable():
    """Made unreadable for real: chmod 000, read by uid 65534 (root reads anything, so the check
    runs in a child that drops its effective uid; as a normal user it needs no uid change)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    from conftest import SYSTEM_TMP

    work = Path(tempfile.mkdtemp(prefix="clipdistill-perm-", dir=SYSTEM_TMP))  # pytest's own folder is 0700
    try:
        work.chmod(0o755)  # uid 65534 must reach it
        for sub in ("warm", "pool", "pool/locked", "cache"):
            (work / sub).mkdir()
        (work / "cache").chmod(0o777)
        (work / "warm" / "w.png").write_bytes(_png(1))
        (work / "pool" / "a.png").write_bytes(_png(10))
        (work / "pool" / "secret.png").write_bytes(_png(20))
        (work / "pool" / "locked" / "b.png").write_bytes(_png(30))
        proc = subprocess.run([sys.executable, "-c", _UNREADABLE, str(work), str(work / "cache"), src],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 and "Operation not permitted" in proc.stderr and "seteuid" in proc.stderr:
            pytest.skip("cannot drop to uid 65534 here (no CAP_SETUID)")
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout)
    finally:
        for p in (work / "pool" / "secret.png", work / "pool" / "locked"):
            with contextlib.suppress(OSError):
                p.chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)
    first, then = got["first"], got["then"]
    assert first["counts"] == {"files": 3, "images": 1, "duplicates": 0, "broken": 2}, first
    why = {Path(p.rstrip("/")).name: m for p, m in first["broken"].items()}
    assert "ermission denied" in why["secret.png"]
    assert "ermission denied" in why["locked"] and "folder" in why["locked"]  # listed, not skipped silently
    # a file that could not be read is read again once it can be (the index does not remember it)
    assert then["counts"] == {"files": 3, "images": 3, "duplicates": 0, "broken": 0}, then


# ------------------------------------------------------------------ 3. a truncated shard

def test_a_truncated_shard_keeps_its_good_members_and_every_count_agrees(tmp_path, random_teacher_file):
    from clipdistill.data.datasets import create_dataset
    from clipdistill.data.pool import index_pool
    from clipdistill.teacher.cache import cache_path
    from clipdistill.teacher.embed import fill_cache
    from clipdistill.teacher.openclip_teacher import create_teacher

    members = [(f"{i:03d}.png", _png(20 * i + 5)) for i in range(6)]
    shard = _tar(tmp_path / "cut.tar", members[:3] + [("003.json", b"{}")] + members[3:])
    with tarfile.open(shard) as tf:
        cut = tf.getmember("004.png").offset_data + 40  # inside member 004's data
    with open(shard, "r+b") as f:
        f.truncate(cut)
    at_boundary = _tar(tmp_path / "short.tar", members[:4])  # cut right after a member: no end marker
    with tarfile.open(at_boundary) as tf:
        end = tf.getmember("002.png").offset_data + 512  # 002's data fits in one block
    with open(at_boundary, "r+b") as f:
        f.truncate(end)

    idx = index_pool([str(shard)], tmp_path / "idx")
    assert idx.counts() == {"files": 5, "images": 4, "duplicates": 0, "broken": 1}, idx.broken
    assert "after member 4" in next(iter(idx.broken)) and "end of data" in next(iter(idx.broken.values()))
    short = index_pool([str(at_boundary)])
    assert short.counts()["images"] == 3 and short.counts()["broken"] == 1, short.broken  # not silently complete

    ds = create_dataset("folder", "unlabeled", "", pools=(str(shard),), cache_dir=str(tmp_path / "c"))
    assert _values(ds) == [5, 25, 45, 65]
    px = ds.pixels(8)
    from clipdistill.data.pixel_store import PixelStore, store_path

    store = PixelStore.load_complete(store_path(tmp_path / "c", ds.slug(), "unlabeled", 8))
    assert store.manifest["skipped"] == 0 and len(store.valid_indices()) == 4 and px.shape[0] == 4
    teacher = create_teacher("tiny-shapes", str(random_teacher_file), "cpu", "fp32", str(tmp_path / "c"))
    cache = fill_cache(teacher, ds, cache_path(tmp_path / "c", teacher.slug, ds.slug(), "unlabeled"), workers=0,
                       progress=False)
    assert cache.manifest["skipped"] == 0 and len(cache.valid_indices()) == idx.counts()["images"] == 4


# ------------------------------------------------------------------ 4. compressed shards, retries

def test_a_gzipped_shard_is_read_like_a_plain_one(tmp_path):
    from clipdistill.data.datasets import create_dataset

    members = [(f"{i}.png", _png(30 * i + 3)) for i in range(4)]
    plain = _tar(tmp_path / "plain.tar", members)
    gz = tmp_path / "zipped.tar"  # a gzipped tar under a .tar name, as downloaders leave them
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    ds = create_dataset("folder", "unlabeled", "", pools=(str(gz),), cache_dir=str(tmp_path / "c"))
    assert len(ds) == 4 and _values(ds) == [3, 33, 63, 93]
    px = ds.pixels(8)
    assert sorted(int(px[i][0, 0, 0]) for i in range(4)) == [3, 33, 63, 93]
    tgz = tmp_path / "more.tgz"
    tgz.write_bytes(gzip.compress(plain.read_bytes()))
    assert len(create_dataset("folder", "unlabeled", "", pools=(str(tgz),))) == 4


def test_a_reader_failure_is_tried_again_and_a_decoding_failure_is_kept(tmp_path, random_teacher_file):
    """A file that vanished after indexing (an unmounted disk) is skipped for now, not for ever:
    once it is back the next run reads it, in the pixel store and the embedding cache. A file
    whose bytes do not decode stays skipped."""
    from clipdistill.data.datasets import create_dataset
    from clipdistill.data.pixel_store import fill_pixel_store
    from clipdistill.data.store import RETRY, SKIPPED
    from clipdistill.teacher.cache import cache_path
    from clipdistill.teacher.embed import fill_cache
    from clipdistill.teacher.openclip_teacher import create_teacher

    root = tmp_path / "pool"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png(40 * i + 7))
    cache_dir = tmp_path / "c"
    teacher = create_teacher("tiny-shapes", str(random_teacher_file), "cpu", "fp32", str(cache_dir))

    def fill():
        ds = create_dataset("folder", "unlabeled", "", pools=(str(root),), cache_dir=str(cache_dir))
        store = fill_pixel_store(ds, cache_dir, 8, workers=0)
        cache = fill_cache(teacher, ds, cache_path(cache_dir, teacher.slug, ds.slug(), "unlabeled"), workers=0,
                           progress=False)
        return ds, store, cache

    ds = create_dataset("folder", "unlabeled", "", pools=(str(root),), cache_dir=str(cache_dir))
    gone = Path(ds.files[1])
    saved = gone.read_bytes()
    gone.unlink()
    store = fill_pixel_store(ds, cache_dir, 8, workers=0)
    cache = fill_cache(teacher, ds, cache_path(cache_dir, teacher.slug, ds.slug(), "unlabeled"), workers=0,
                       progress=False)
    for s in (store, cache):
        assert s.complete and s.manifest["skipped"] == 1 and list(s.valid_indices()) == [0, 2]
        assert int(s.valid[1]) == RETRY and gone.name in json.dumps(s.manifest["retry_items"])
    gone.write_bytes(saved)
    ds, store, cache = fill()
    for s in (store, cache):
        assert s.manifest["skipped"] == 0 and list(s.valid_indices()) == [0, 1, 2], s.manifest
    assert int(store.reader()[1][0, 0, 0]) == int(np.asarray(Image.open(io.BytesIO(saved)))[0, 0, 0])

    # an image whose bytes do not decode (a labelled folder read as it is) stays skipped, for good
    (tmp_path / "lab" / "cats").mkdir(parents=True)
    (tmp_path / "lab" / "cats" / "ok.png").write_bytes(_png(9))
    (tmp_path / "lab" / "cats" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lab = create_dataset("folder", "train", str(tmp_path / "lab"))
    done = fill_cache(teacher, lab, cache_path(cache_dir, teacher.slug, lab.slug(), "train"), workers=0,
                      progress=False)
    assert done.manifest["skipped"] == 1 and int(done.valid[0]) == SKIPPED and not len(done.retry_rows())


# ------------------------------------------------------------------ 5. members over the size limit

def test_a_huge_member_is_listed_without_being_read_into_memory(tmp_path):
    """A 9 MB gzip shard held one 2 GB member and cost 4.7 GB to index. Here: 600 MB of zeros
    (over the 512 MiB limit, 2.7 MB compressed); indexing keeps Python's peak under 40 MB."""
    import tracemalloc

    from clipdistill.data.images import MAX_FILE_BYTES
    from clipdistill.data.pool import index_pool

    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            k = min(len(b), self.left)
            b[:k] = bytes(k)
            self.left -= k
            return k

    big = 600 << 20
    assert big > MAX_FILE_BYTES
    shard = tmp_path / "huge.tar"
    with tarfile.open(shard, "w:gz", compresslevel=1) as tf:
        for name, data in (("small.png", _png(12)),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("big.png")
        info.size = big
        tf.addfile(info, io.BufferedReader(Zeros(big), 1 << 20))
        info = tarfile.TarInfo("after.png")
        data = _png(99)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    assert shard.stat().st_size < 4 << 20
    tracemalloc.start()
    try:
        idx = index_pool([str(shard)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, f"peak {peak / 2**20:.0f} MB"
    assert idx.counts() == {"files": 3, "images": 2, "duplicates": 0, "broken": 1}
    (where, why), = idx.broken.items()
    assert where.endswith("::big.png") and "limit" in why and str(big) in why


# ------------------------------------------------------------------ 6. unambiguous locators

def test_a_file_named_like_a_member_and_repeated_member_names_are_told_apart(tmp_path):
    from clipdistill.data import pool as pool_mod
    from clipdistill.data.pool import PoolDataset, index_path, index_pool

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.tar::y.png").write_bytes(_png(10))  # a file, not a member of photos/a.tar
    _tar(folder / "a.tar", [("y.png", _png(200))])  # (a tar among photos is a file too: not an image)
    shard = _tar(tmp_path / "s.tar", [("y.png", _png(150)), ("z.png", _png(50)), ("z.png", _png(90))])
    roots = [folder, str(shard)]
    idx = index_pool(roots, tmp_path / "c")
    ds = PoolDataset(idx)
    assert _values(ds) == [10, 50, 90, 150]
    assert len({ds.describe(i) for i in range(len(ds))}) == len(ds)  # every image has its own name

    # an index written by an earlier version is not trusted: rebuilt, not reused
    file = index_path(tmp_path / "c", roots)
    old = json.loads(file.read_text())
    assert old["format"] == pool_mod.INDEX_FORMAT >= 3
    for group in old["shards"].values():
        for row in group["rows"]:
            row[3] = "0" * 40  # rows that lie about their content
    old["format"] = 2
    file.write_text(json.dumps(old))
    assert index_pool(roots, tmp_path / "c").fingerprint() == idx.fingerprint()


# ------------------------------------------------------------------ 7. commas inside --pool paths

def test_a_comma_inside_a_pool_path_is_written_with_a_backslash(tmp_path):
    from clipdistill.cli import build_parser
    from clipdistill.data.pool import index_pool

    folder = tmp_path / "trips, 2024"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(10))
    p = build_parser("fit-prompts")
    ns = p.parse_args(["--pool", str(folder).replace(",", "\\,"), "--pool", "x,y"])
    assert ns.pool == [str(folder), "x", "y"]
    assert "\\," in p.format_help()
    assert index_pool(ns.pool[:1]).counts()["images"] == 1
    assert build_parser("make-pool").parse_args(["--out", "o", "--classes", "circle, star"]).classes == ["circle",
                                                                                                         "star"]


# ------------------------------------------------------------------ 8. one make-pool per folder

def test_a_second_make_pool_on_the_same_folder_is_refused(tmp_path):
    from clipdistill.core.locks import LockedError, exclusive
    from clipdistill.data.example_pool import PoolConfig, make_pool

    out = tmp_path / "ex"
    out.mkdir()
    cfg = PoolConfig(out=str(out), images=10, size=16, duplicates=0, broken=0, test_per_class=1, seed=1)
    with exclusive(out / ".lock"):  # what a running make-pool --out ex holds
        with pytest.raises(LockedError, match=f"another make-pool is writing {out}"):
            make_pool(cfg)
    assert not (out / "pool").exists()
    assert make_pool(cfg)["images"] == 10



def test_renaming_a_photo_keeps_each_cache_row_on_its_image(tmp_path, random_teacher_file):
    """Caches are keyed by the pool's content and read by row. The rows were in path order, so a
    rename kept the key and moved the rows: the cached embedding of `a.png` was paired with the
    pixels of `b.png`. Rows are in content order now; a rename changes nothing a cache holds."""
    import torch

    from clipdistill.data.pool import PoolDataset, index_pool
    from clipdistill.teacher.cache import cache_path
    from clipdistill.teacher.embed import fill_cache
    from clipdistill.teacher.openclip_teacher import create_teacher

    pool = tmp_path / "pool"
    pool.mkdir()
    for name, value in (("a.png", 200), ("b.png", 10), ("c.png", 120)):
        (pool / name).write_bytes(_png(value, 32))
    teacher = create_teacher("tiny-shapes", pretrained=str(random_teacher_file), device="cpu", precision="fp32")

    def embedded():
        ds = PoolDataset(index_pool([pool], tmp_path / "cache"))
        path = cache_path(tmp_path / "cache", teacher.slug, ds.slug(), ds.split)
        cache = fill_cache(teacher, ds, path, 8, 0, False, False)
        values = [int(np.asarray(ds.load(i))[0, 0, 0]) for i in range(len(ds))]
        return ds.fingerprint(), values, np.asarray(cache.embeddings[:], np.float32)

    fp, values, _ = embedded()
    (pool / "a.png").rename(pool / "z.png")
    fp2, values2, emb = embedded()
    assert fp2 == fp and values2 == values  # the same image on every row
    by_value = {200: "z.png", 10: "b.png", 120: "c.png"}
    fresh = teacher.encode_images(torch.stack([teacher.preprocess(Image.open(pool / by_value[v]).convert("RGB"))
                                               for v in values2]))
    np.testing.assert_allclose(emb, fresh.numpy(), atol=2e-2)  # each row holds its own image's embedding


def test_a_store_that_cannot_be_written_serves_if_complete_else_names_the_fix(tmp_path, caplog):
    """One policy for the pixel store and the embedding cache (data.store.unwritable): a folder
    that refuses writing (read-only, not ours) serves a complete store as it is, with a warning
    naming the rows it cannot try again; an incomplete one is refused naming --cache-dir; any
    other OSError is not swallowed."""
    import errno

    from clipdistill.core.errors import ClipDistillError
    from clipdistill.data.datasets import create_dataset
    from clipdistill.data.pixel_store import fill_pixel_store
    from clipdistill.data.store import unwritable

    root = tmp_path / "pool"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png(40 * i + 7))
    ds = create_dataset("folder", "unlabeled", "", pools=(str(root),), cache_dir=str(tmp_path / "c"))
    store = fill_pixel_store(ds, tmp_path / "c", 8, workers=0)
    for code in (errno.EROFS, errno.EACCES, errno.EPERM):
        with caplog.at_level("WARNING"):
            assert unwritable(OSError(code, os.strerror(code)), store, "pixel store", store.path) is store
        assert "0 images of the pixel store" in caplog.text
        with pytest.raises(ClipDistillError, match=r"embedding cache .* cannot be written .*writable --cache-dir"):
            unwritable(OSError(code, os.strerror(code)), None, "embedding cache", store.path)
    with pytest.raises(OSError, match="No space"):
        unwritable(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), store, "pixel store", store.path)
