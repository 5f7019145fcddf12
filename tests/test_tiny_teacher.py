"""The tiny teacher: a real open_clip CLIP, loaded by name like ViT-B-32, pre-trained here.

Pre-training runs for a handful of steps on a few captions: these tests check the plumbing
(config registration, preprocessing, checkpoint format, caching), not the accuracy, which
/tmp-style measurement scripts and the demo check at full size."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from PIL import Image

from clipdistill.core.errors import ConfigError
from clipdistill.data import shapes10
from clipdistill.data.pixels import normalize_uint8
from clipdistill.data.shapes10 import PROMPT_TEMPLATES as TINY_PROMPT_TEMPLATES
from clipdistill.teacher import tiny
from clipdistill.teacher.tiny import (
    TINY_NAME,
    TinyTeacherConfig,
    ensure_tiny_teacher,
    pretrain_tiny_teacher,
    register_model_configs,
)

SMALL = dict(steps=4, batch_size=16, n_captions=48, warmup_steps=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    stats = pretrain_tiny_teacher(TinyTeacherConfig(**SMALL), path, progress=False)
    return path, stats


def test_register_is_idempotent_and_makes_the_name_known():
    from open_clip import factory

    register_model_configs()
    n_paths = len(factory._MODEL_CONFIG_PATHS)
    register_model_configs()
    assert len(factory._MODEL_CONFIG_PATHS) == n_paths
    assert TINY_NAME in open_clip.list_models()


def test_it_is_a_real_open_clip_model():
    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME)
    tokenizer = open_clip.get_tokenizer(TINY_NAME)
    assert type(model) is open_clip.CLIP
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    model.eval()
    image = Image.fromarray(shapes10.generate("test", 1, 32, seed=0)[0][0])
    with torch.no_grad():
        img = model.encode_image(preprocess(image)[None], normalize=True)
        txt = model.encode_text(tokenizer([t.format("star") for t in TINY_PROMPT_TEMPLATES]), normalize=True)
    assert img.shape == (1, model.text_projection.shape[1]) and txt.shape == (len(TINY_PROMPT_TEMPLATES), img.shape[1])
    assert torch.allclose(img.norm(dim=-1), torch.ones(1))


def test_every_caption_fits_the_context_length():
    register_model_configs()
    tokenizer = open_clip.get_tokenizer(TINY_NAME)
    # every caption form, with the longest words
    words = dict(color=max(shapes10.COLORS, key=len), size="medium", bg="yellow textured", bgkind="textured")
    for template in shapes10._ATTRIBUTE_TEMPLATES + shapes10._PLAIN_TEMPLATES:
        for name in shapes10.CLASSES:
            n_tokens = len(tokenizer.encode(template.format(name=name, **words))) + 2  # sot, eot
            assert n_tokens <= tokenizer.context_length, (template, name, n_tokens)
    _, captions, _ = shapes10.generate_captioned(200, 32, seed=0)
    assert max(len(tokenizer.encode(c)) + 2 for c in captions) <= tokenizer.context_length
    for template in TINY_PROMPT_TEMPLATES:
        for name in shapes10.CLASSES:
            assert len(tokenizer.encode(template.format(name))) + 2 <= tokenizer.context_length


@pytest.mark.parametrize("size", [32, 48])
def test_fast_normalisation_equals_open_clip_preprocess(size):
    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME, force_image_size=size)
    images, _ = shapes10.generate("test", 6, size, seed=1)
    expected = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    pp = model.visual.preprocess_cfg
    got = normalize_uint8(torch.from_numpy(images), pp["mean"], pp["std"])
    assert got.shape == expected.shape == (6, 3, size, size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_pretrain_writes_a_checkpoint_open_clip_loads(checkpoint):
    path, stats = checkpoint
    assert stats["steps"] == SMALL["steps"] and math.isfinite(stats["final_loss"]) and stats["seconds"] > 0
    sidecar = tiny.read_sidecar(path)
    assert sidecar["config"]["steps"] == SMALL["steps"] and sidecar["stats"] == stats
    assert sidecar["classes"] == list(shapes10.CLASSES)
    assert sidecar["prompt_templates"] == list(TINY_PROMPT_TEMPLATES)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files

    from safetensors.torch import load_file

    saved = load_file(str(path))
    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME, pretrained=str(path))
    state = model.state_dict()
    assert set(saved) == set(state)
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    assert sidecar["preprocess"]["mean"] == list(model.visual.preprocess_cfg["mean"])
    # the weights moved away from a fresh init
    fresh = open_clip.create_model(TINY_NAME).state_dict()
    assert not torch.equal(fresh["text_projection"], state["text_projection"])


def test_pretraining_is_bit_identical_whatever_the_callers_thread_count(tmp_path, checkpoint):
    """The config fixes the thread count (another count rounds differently, and gave another
    teacher on a busy machine): the caller's setting changes nothing, and is restored."""
    from safetensors.torch import load_file

    from clipdistill.core.state import weights_sha256

    again = tmp_path / "again.safetensors"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stats = pretrain_tiny_teacher(TinyTeacherConfig(**SMALL), again, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert stats["threads"] == 1 and stats["sha256"] == checkpoint[1]["sha256"]
    assert stats["sha256"] == weights_sha256(again)
    a, b = load_file(str(checkpoint[0])), load_file(str(again))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pretraining_learns(tmp_path):
    """The contrastive loop can fit a small set of pairs: the loss falls far below chance."""
    cfg = TinyTeacherConfig(steps=30, batch_size=32, n_captions=32, warmup_steps=5, lr=5e-3)
    stats = pretrain_tiny_teacher(cfg, tmp_path / "t.safetensors", progress=False)
    assert stats["final_loss"] < 0.5 * math.log(cfg.batch_size)


def test_ensure_trains_once_then_reuses(tmp_path, monkeypatch):
    cfg = TinyTeacherConfig(**dict(SMALL, steps=2))
    calls = []
    real = tiny.pretrain_tiny_teacher

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(tiny, "pretrain_tiny_teacher", counting)
    first = ensure_tiny_teacher(tmp_path, cfg, progress=False)
    mtime = first.stat().st_mtime_ns
    second = ensure_tiny_teacher(tmp_path, cfg, progress=False)
    assert first == second and len(calls) == 1 and first.stat().st_mtime_ns == mtime
    assert first.parent == tmp_path / "teachers"
    assert first.name == f"{TINY_NAME}-32px-{cfg.short_hash()}.safetensors"
    assert first.with_suffix(".json").is_file()
    # and it is usable by name right away
    open_clip.create_model(TINY_NAME, pretrained=str(first))


def test_cache_name_follows_the_config():
    a, b = TinyTeacherConfig(), TinyTeacherConfig(steps=7)
    assert a.short_hash() == TinyTeacherConfig().short_hash()
    assert a.short_hash() != b.short_hash() != TinyTeacherConfig(threads=2).short_hash()
    assert tiny.tiny_teacher_path("/c", a).name.startswith(f"{TINY_NAME}-32px-")


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=64, n_captions=32), dict(size=-1), dict(threads=0)])
def test_config_is_validated(bad):
    with pytest.raises(ConfigError):
        TinyTeacherConfig(**bad)
