"""shapes10, the offline world: deterministic, balanced, cached once, honest about splits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipdistill.core.errors import ConfigError
from clipdistill.data import shapes10
from clipdistill.data.shapes10 import CAPTION_SEED, CLASSES, SPLITS, Shapes10, generate, generate_captioned


def test_classes_read_well_in_prompts():
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10
    # "a {}" prompts are grammatical for every class
    assert all(c[0] not in "aeiou" and c.isalpha() and c.islower() for c in CLASSES)


def test_split_seeds_are_distinct_from_each_other_and_from_captions():
    seeds = [s.seed for s in SPLITS.values()] + [CAPTION_SEED]
    assert len(set(seeds)) == len(seeds)
    assert set(SPLITS) == {"train", "unlabeled", "test"}
    assert SPLITS["unlabeled"].n > SPLITS["train"].n


def test_generate_shapes_dtypes_and_balanced_labels():
    images, labels = generate("train", 40, 32, seed=7)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (40,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(CLASSES)
    assert np.bincount(labels, minlength=10).tolist() == [4] * 10
    # real pictures, not blank canvases
    assert images.reshape(40, -1).std(1).min() > 5


def test_generate_is_deterministic_and_seed_dependent():
    a, la = generate("train", 12, 32, seed=11)
    b, lb = generate("train", 12, 32, seed=11)
    c, _ = generate("train", 12, 32, seed=12)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert (a != c).any(axis=(1, 2, 3)).all()  # every image differs


def test_image_i_depends_only_on_seed_and_i():
    small, ls = generate("test", 5, 32, seed=3)
    big, lb = generate("test", 25, 32, seed=3)
    np.testing.assert_array_equal(small, big[:5])
    np.testing.assert_array_equal(ls, lb[:5])


def test_splits_render_different_images():
    train, _ = generate("train", 8, 32, SPLITS["train"].seed)
    test, _ = generate("test", 8, 32, SPLITS["test"].seed)
    assert (train != test).any(axis=(1, 2, 3)).all()


def test_other_resolutions():
    images, _ = generate("train", 3, 64, seed=1)
    assert images.shape == (3, 64, 64, 3)


def test_generate_rejects_unknown_split():
    with pytest.raises(ConfigError, match="train, unlabeled, test"):
        generate("val", 3, 32, seed=0)


def test_captions_name_the_class_and_its_attributes():
    images, captions, labels = generate_captioned(60, 32, seed=5)
    assert images.shape == (60, 32, 32, 3) and len(captions) == 60
    for text, label in zip(captions, labels):
        words = text.rstrip(".").split()
        name = CLASSES[label]
        assert name in words or shapes10._MISNAMED_AS.get(name) in words, text
        assert not any(f" a {v}" in f" {text}" for v in "aeiou"), text  # "an orange star"
    # many captions say more than the class name
    with_colour = sum(any(c in t.split() for c in shapes10.COLORS) for t in captions)
    assert with_colour > 5
    assert len(set(captions)) > 30
    again = generate_captioned(60, 32, seed=5)
    assert again[1] == captions
    np.testing.assert_array_equal(again[0], images)


def test_captions_are_mostly_right_and_wrong_only_one_way():
    _, captions, labels = generate_captioned(2000, 8, seed=9)
    named = [next(w for w in c.rstrip(".").split() if w in CLASSES) for c in captions]
    right = np.mean([CLASSES[label] == n for label, n in zip(labels, named)])
    assert 0.85 < right < 1.0
    for label, n in zip(labels, named):
        if CLASSES[label] != n:
            assert shapes10._MISNAMED_AS[CLASSES[label]] == n
    # the classes others are mistaken for are always named right
    for label, n in zip(labels, named):
        if CLASSES[label] in shapes10._MISNAMED_AS.values():
            assert CLASSES[label] == n


def test_dataset_yields_pil_images_and_labels(tmp_path):
    ds = Shapes10(tmp_path, split="train", size=32, n=30)
    assert len(ds) == 30
    assert ds.classes == list(CLASSES)
    assert ds.data.shape == (30, 32, 32, 3) and ds.data.dtype == np.uint8
    assert ds.targets.dtype == np.int64 and set(ds.targets.tolist()) <= set(range(10))
    image, label = ds[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert label == int(ds.targets[3]) and isinstance(label, int)
    np.testing.assert_array_equal(np.asarray(image), ds.data[3])
    assert ds.path == tmp_path / "shapes10" / "v1-32px" / "train-30.npz" and ds.path.is_file()
    assert ds.fingerprint() == {"name": "shapes10", "version": shapes10.VERSION, "split": "train", "size": 32,
                                "n": 30, "seed": SPLITS["train"].seed}
    # the dataset renders the split's own seed
    expected, _ = generate("train", 30, 32, SPLITS["train"].seed)
    np.testing.assert_array_equal(ds.data, expected)


def test_default_n_is_the_split_size(tmp_path, monkeypatch):
    monkeypatch.setitem(SPLITS, "test", shapes10.SplitSpec(n=12, seed=SPLITS["test"].seed))
    assert len(Shapes10(tmp_path, split="test")) == 12


def test_unlabeled_split_hides_labels(tmp_path):
    ds = Shapes10(tmp_path, split="unlabeled", n=20)
    assert (ds.targets == -1).all()
    assert ds[0][1] == -1
    assert set(ds.hidden_targets.tolist()) <= set(range(10))


def test_npz_cache_is_reused(tmp_path, monkeypatch):
    first = Shapes10(tmp_path, split="test", n=10)
    mtime = first.path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("regenerated although the cache exists")

    monkeypatch.setattr(shapes10, "generate", boom)
    second = Shapes10(tmp_path, split="test", n=10)
    np.testing.assert_array_equal(first.data, second.data)
    np.testing.assert_array_equal(first.targets, second.targets)
    assert second.path.stat().st_mtime_ns == mtime
    assert [p.name for p in first.path.parent.iterdir()] == ["test-10.npz"]  # no temp files left


def test_sizes_and_counts_get_their_own_cache(tmp_path):
    a = Shapes10(tmp_path, split="train", n=10, size=32)
    b = Shapes10(tmp_path, split="train", n=10, size=40)
    assert a.path != b.path and b.data.shape == (10, 40, 40, 3)


def test_unknown_split_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        Shapes10(tmp_path, split="validation")
    assert "validation" in str(e.value)
    for name in SPLITS:
        assert name in str(e.value)


def test_is_a_torch_dataset(tmp_path):
    import torch.utils.data

    ds = Shapes10(tmp_path, split="train", n=10)
    assert isinstance(ds, torch.utils.data.Dataset)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=lambda b: b)
    assert sum(len(b) for b in loader) == 10
