"""The embedding cache: resume after SIGKILL, refusal of foreign caches, skipped files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from clipdistill.core.errors import CacheMismatchError
from clipdistill.teacher.cache import EmbeddingCache
from clipdistill.teacher.embed import EmbedConfig, embed


def _outputs(dataset, cache: EmbeddingCache, split: str = "train"):
    """Teacher outputs holding only this split's dataset and cache: all `labelled` reads."""
    from clipdistill.teacher.outputs import TeacherOutputs

    return TeacherOutputs(teacher=None, classes=list(dataset.classes), prompts=[], templates=None,
                          datasets={split: dataset}, caches={split: cache})


def _class_folders(root: Path, per_class: int, size: tuple[int, int], rng) -> Path:
    """cats/ and dogs/ of random photos (height x width `size`): a labelled folder dataset."""
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _manifest(cache_root: Path) -> Path | None:
    found = list(cache_root.glob("embeddings/*/shapes10-32px*/unlabeled/manifest.json"))
    return found[0] if found else None


def test_embed_resumes_after_sigkill_and_equals_uninterrupted_run(tmp_path, data_root, random_teacher_file):
    # 1,200 images (75 batches): long enough to be killed after five, short enough to embed twice more
    args = ["embed", "--pretrained", str(random_teacher_file), "--split", "unlabeled", "--data-root", str(data_root),
            "--embed-batch-size", "16", "--workers", "0", "--no-progress", "--max-images", "1200"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "clipdistill", *args, "--cache-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline:
        mf = _manifest(killed)
        if mf is not None:
            try:
                m = json.loads(mf.read_text())
            except (json.JSONDecodeError, FileNotFoundError):
                m = {"done": 0, "complete": False}
            if m["done"] >= 16 * 5:
                done = m["done"]
                break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    m = json.loads(_manifest(killed).read_text())
    assert 0 < done and not m["complete"], "the run finished before it could be killed; make it longer"

    resumed = run_cli(*args, "--cache-dir", str(killed))
    assert "resuming" in resumed.stderr
    m = json.loads(_manifest(killed).read_text())
    assert m["complete"] and m["done"] == m["count"]

    run_cli(*args, "--cache-dir", str(tmp_path / "clean"))
    a = np.load(_manifest(killed).parent / "embeddings.npy")
    b = np.load(_manifest(tmp_path / "clean").parent / "embeddings.npy")
    assert a.shape == b.shape and a.dtype == np.float16
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(np.float32)).sum(1).min() > 0  # no row left unwritten


def test_second_run_reuses_the_cache(tmp_path, data_root, random_teacher_file, caplog):
    cfg = EmbedConfig(pretrained=str(random_teacher_file), split="test", data_root=str(data_root),
                      cache_dir=str(tmp_path), progress=False)
    first = embed(cfg)
    stamp = (first.path / "embeddings.npy").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO", logger="clipdistill"):
        second = embed(cfg)
    msgs = [r.getMessage() for r in caplog.records]
    assert second.complete and "already complete" in msgs[0]
    assert (second.path / "embeddings.npy").stat().st_mtime_ns == stamp
    assert set(first.manifest) >= {"count", "dim", "complete", "skipped", "teacher", "dataset"}


def test_foreign_teacher_cache_is_refused(tmp_path, data_root, random_teacher_file):

    cfg = EmbedConfig(pretrained=str(random_teacher_file), split="test", data_root=str(data_root),
                      cache_dir=str(tmp_path / "c"), progress=False)
    embed(cfg)
    # Same file name (so the same cache folder), other weights: a retrained teacher.
    other = tmp_path / "other" / random_teacher_file.name
    other.parent.mkdir()
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in open_clip.create_model("tiny-shapes").state_dict().items()}, str(other))
    proc = run_cli("embed", "--pretrained", str(other), "--split", "test", "--data-root", str(data_root),
                   "--cache-dir", str(tmp_path / "c"), "--no-progress", check=False)
    assert proc.returncode == 1
    assert "another teacher" in proc.stderr and "--overwrite" in proc.stderr and "weights" in proc.stderr
    with pytest.raises(CacheMismatchError):
        embed(EmbedConfig(**{**cfg.__dict__, "pretrained": str(other)}))
    # --overwrite rebuilds it
    rebuilt = embed(EmbedConfig(**{**cfg.__dict__, "pretrained": str(other), "overwrite": True}))
    assert rebuilt.complete


def test_foreign_preprocess_is_refused(tmp_path, data_root, random_teacher_file):
    path = tmp_path / "cache"
    EmbeddingCache.open(path, {"model": "m", "preprocess": "Resize(224)"}, {"name": "d"}, 4, 8)
    with pytest.raises(CacheMismatchError, match="preprocess"):
        EmbeddingCache.open(path, {"model": "m", "preprocess": "Resize(96)"}, {"name": "d"}, 4, 8)


def test_folder_with_corrupt_and_non_image_files(tmp_path, random_teacher_file):
    root = _class_folders(tmp_path / "imgs", 5, (40, 50), np.random.default_rng(0))
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "dogs" / "notes.txt").write_text("not an image")
    cfg = EmbedConfig(dataset="folder", data_root=str(root), split="train", pretrained=str(random_teacher_file),
                      cache_dir=str(tmp_path / "cache"), progress=False, embed_batch_size=4, workers=0)
    cache = embed(cfg)
    assert cache.complete and cache.count == 12
    assert cache.manifest["skipped"] == 2
    assert any("broken.jpg" in s for s in cache.manifest["skipped_items"])
    assert any("notes.txt" in s for s in cache.manifest["skipped_items"])
    assert len(cache.valid_indices()) == 10

    from clipdistill.data.datasets import create_dataset

    # What the probe and the teacher's evaluation read: the readable rows, joined to their labels.
    ds = create_dataset("folder", "train", str(root))
    loaded = EmbeddingCache.load(cache.path)
    emb, labels = _outputs(ds, loaded).labelled("train")
    assert len(emb) == len(labels) == 10
    assert set(labels.tolist()) <= {0, 1} and emb.shape == (10, cache.dim) and emb.dtype == np.float32
    image, label = ds[int(loaded.valid_indices()[0])]
    assert label == labels[0] and image.size == (50, 40)


def test_a_loaded_cache_is_read_through_a_memmap(tmp_path, data_root, random_teacher_file):
    cfg = EmbedConfig(pretrained=str(random_teacher_file), split="test", data_root=str(data_root),
                      cache_dir=str(tmp_path), progress=False)
    cache = EmbeddingCache.load(embed(cfg).path)
    assert isinstance(cache.embeddings, np.memmap)
    from clipdistill.data.datasets import create_dataset

    emb, labels = _outputs(create_dataset("shapes10", "test", str(data_root)), cache, "test").labelled("test")
    np.testing.assert_array_equal(emb[7], cache.embeddings[7].astype(np.float32))
    assert 0 <= labels[7] < 10


def test_incomplete_cache_is_not_loaded(tmp_path):
    path = tmp_path / "c"
    EmbeddingCache.open(path, {"model": "m"}, {"name": "d"}, 4, 8)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        EmbeddingCache.load(path)


def test_folder_splits_never_fall_back_to_training_images_and_share_train_classes(tmp_path):
    from clipdistill.core.errors import ConfigError
    from clipdistill.data.datasets import create_dataset

    def img(path):  # distinct pixels per file: identical files would be one image of a pool
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), len(list(tmp_path.rglob("*.png"))), dtype=np.uint8)).save(path)

    single = tmp_path / "single"
    img(single / "cat" / "0.png")
    assert create_dataset("folder", "train", str(single)).classes == ["cat"]
    with pytest.raises(ConfigError, match="no test/ folder"):  # test is never the training images
        create_dataset("folder", "test", str(single))

    root = tmp_path / "split"
    for c in ("cat", "dog", "fox"):
        img(root / "train" / c / "0.png")
    img(root / "test" / "cat" / "0.png")
    img(root / "test" / "fox" / "0.png")
    img(root / "unlabeled" / "a.png")
    test = create_dataset("folder", "test", str(root))
    assert test.classes == ["cat", "dog", "fox"] and list(test.targets) == [0, 2]  # fox keeps its train label
    unl = create_dataset("folder", "unlabeled", str(root))
    assert unl.classes == ["cat", "dog", "fox"] and list(unl.targets) == [-1]
    img(root / "test" / "wolf" / "0.png")
    with pytest.raises(ConfigError, match="wolf"):
        create_dataset("folder", "test", str(root))
    # a pool kept in folders by date: its sub-folders are never classes, hidden ones are skipped
    img(root / "unlabeled" / "2024-05" / "b.png")
    img(root / "unlabeled" / "2024-06" / "day2" / "c.png")
    img(root / "unlabeled" / ".thumbnails" / "d.png")
    unl = create_dataset("folder", "unlabeled", str(root))
    assert unl.classes == ["cat", "dog", "fox"] and list(unl.targets) == [-1, -1, -1]
    assert sorted(p.name for p in unl.files) == ["a.png", "b.png", "c.png"]
    pool = tmp_path / "pool"  # no labelled split at all: the prompts will name the classes
    img(pool / "unlabeled" / "batch1" / "0.png")
    img(pool / "unlabeled" / "batch2" / "0.png")
    assert create_dataset("folder", "unlabeled", str(pool)).classes == []
    (tmp_path / "only_train" / "train" / "cat").mkdir(parents=True)
    img(tmp_path / "only_train" / "train" / "cat" / "0.png")
    with pytest.raises(ConfigError, match="no unlabeled/ folder"):
        create_dataset("folder", "unlabeled", str(tmp_path / "only_train"))


def test_two_fillers_of_one_cache_take_turns(tmp_path, data_root, random_teacher_file):
    """Two jobs (or torchrun ranks) embedding into one cache folder at once: one fills it,
    the other finds it complete; the result equals a single run."""
    args = [sys.executable, "-m", "clipdistill", "embed", "--pretrained", str(random_teacher_file), "--split", "test",
            "--data-root", str(data_root), "--max-images", "400", "--embed-batch-size", "16", "--workers", "0",
            "--no-progress", "--cache-dir", str(tmp_path / "shared")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("already complete" in err for _, err in outs) == 1
    run_cli("embed", *args[args.index("--pretrained"):-1], str(tmp_path / "single"))
    found = [next((tmp_path / d).glob("embeddings/*/*/test/embeddings.npy")) for d in ("shared", "single")]
    assert np.array_equal(np.load(found[0]), np.load(found[1]))


def test_a_folder_edited_in_place_is_embedded_again_not_refused(tmp_path, random_teacher_file, caplog):
    """A user who adds photos to their --eval folder (or makes it again at the same path) gets
    the new images embedded, with a warning saying why; it used to be refused with 'delete that
    folder' on every later command, and before that, nothing may reuse the old rows."""
    rng = np.random.default_rng(0)
    root = _class_folders(tmp_path / "eval", 3, (32, 32), rng)
    cfg = EmbedConfig(dataset="folder", data_root=str(root), split="train", pretrained=str(random_teacher_file),
                      cache_dir=str(tmp_path / "cache"), progress=False, embed_batch_size=4, workers=0)
    first = embed(cfg)
    assert first.count == 6
    old_rows = np.asarray(first.embeddings).copy()
    # the same folder, new content: a photo replaced, one added
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "cats" / "0.png")
    os.utime(root / "cats" / "0.png", (time.time() + 5, time.time() + 5))
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "dogs" / "3.png")

    from clipdistill.data.datasets import create_dataset
    from clipdistill.data.store import CacheStaleError

    ds = create_dataset("folder", "train", str(root))
    with pytest.raises(CacheStaleError, match="out of date.*listing_sha1.*rebuilt"):
        EmbeddingCache.load(first.path, first.manifest["teacher"], ds.fingerprint(), len(ds), first.dim)
    with caplog.at_level("WARNING", logger="clipdistill"):
        again = embed(cfg)
    assert any("out of date" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert again.path == first.path and again.complete and again.count == 7
    assert again.manifest["dataset"] == ds.fingerprint()
    # every row is the edited folder's, as a cache made from scratch has it; the replaced photo's changed
    fresh = embed(EmbedConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "fresh")}))
    np.testing.assert_array_equal(np.asarray(again.embeddings), np.asarray(fresh.embeddings))
    assert not np.array_equal(np.asarray(again.embeddings[0]), old_rows[0])
    # another teacher is still someone else's cache, refused as before
    with pytest.raises(CacheMismatchError):
        EmbeddingCache.open(first.path, {**first.manifest["teacher"], "model": "other"}, ds.fingerprint(), 7,
                            first.dim)
