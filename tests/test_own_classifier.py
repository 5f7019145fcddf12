"""Your own classifier with zero labels: pools, curation, fit-prompts, reject, re-prompting, video.

Small sizes throughout; the accuracy of the recipe is measured by
benchmarks/fit_prompts_ablation.py (README, "Your own classifier"), not here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_plain_log
from PIL import Image

from clipdistill.data.example_pool import PoolConfig, make_pool


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pool")
    make_pool(PoolConfig(out=str(out), images=400, size=32, duplicates=12, broken=3, test_per_class=15,
                         unprompted_per_class=10))
    return out


def test_pool_nested_dedup_and_broken_counted(small_pool, tmp_path):
    from clipdistill.data.datasets import create_dataset
    from clipdistill.data.pool import index_path, index_pool

    idx = index_pool([small_pool / "pool"], tmp_path)
    assert idx.counts() == {"files": 400 + 12 + 3, "images": 400, "duplicates": 12, "broken": 3}
    assert all("copies" in p for p in idx.duplicates)  # the copy is the duplicate, the original stays
    assert sorted(Path(p).name.split("_")[2].split(".")[0] for p in idx.broken) == ["empty", "text", "truncated"]
    assert index_path(tmp_path, [small_pool / "pool"]).is_file()
    # nested folders (months, bursts) are never classes: the prompts name them
    ds = create_dataset("folder", "unlabeled", "", pools=(str(small_pool / "pool"),), cache_dir=str(tmp_path))
    assert len(ds) == 400 and ds.classes == [] and (ds.targets == -1).all()
    assert any("burst" in str(f) for f in ds.files)
    # the fingerprint is the content: a renamed photo keeps every cache, an edited one does not
    before = ds.fingerprint()
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(small_pool / "pool", moved)
    first = sorted((moved / "2024-01").glob("img_*.png"))[0]
    first.rename(first.with_name("renamed.png"))
    assert create_dataset("folder", "unlabeled", "", pools=(str(moved),)).fingerprint() == before
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(first.with_name("renamed.png"))
    assert create_dataset("folder", "unlabeled", "", pools=(str(moved),)).fingerprint() != before


def test_curation_threshold_top_negatives_and_sheets(tmp_path):
    from clipdistill.data.protocol import InMemoryDataset
    from clipdistill.teacher.curate import curate, load_rows, save, write_sheets

    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.2, 0.8], [0.1, 0.9], [0.5, 0.5], [0.97, 0.03]])
    rows = np.array([0, 2, 3, 5, 6, 7])  # readable cache rows (1 and 4 were broken)
    cur = curate(probs, rows, ["cat", "dog"], threshold=0.7, top=0, negatives="drop")
    assert cur.counts() == {"scored": 6, "kept": 4, "per_class": {"cat": 2, "dog": 2}, "negatives_kept": 0,
                            "dropped": 2}
    assert cur.rows.tolist() == [0, 3, 5, 7]
    top1 = curate(probs, rows, ["cat", "dog"], threshold=0.7, top=1, negatives="keep")
    assert top1.counts()["per_class"] == {"cat": 1, "dog": 1} and top1.counts()["negatives_kept"] == 4
    assert top1.rows.tolist() == rows.tolist()  # negatives kept: every row trains
    assert 7 in top1.rows[top1.matched] and 5 in top1.rows[top1.matched]  # the most confident of each class

    class Tiny(InMemoryDataset):
        name, split, classes, prompts = "tiny", "unlabeled", ["cat", "dog"], ["a cat", "a dog"]

        def __init__(self):
            self.data = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
            self.targets = np.full(8, -1)

        def fingerprint(self):
            return {"name": "tiny"}

        def slug(self):
            return "tiny"

    paths = write_sheets(cur, Tiny(), tmp_path / "sheets", n=4)
    assert sorted(p.name for p in paths) == ["cat-edge.png", "cat-top.png", "dog-edge.png", "dog-top.png",
                                            "none-top.png"]
    with Image.open(paths[0]) as im:
        assert im.size[0] > 4 * 96  # a real grid
    save(cur, tmp_path / "c.json", {"name": "tiny"})
    assert load_rows(tmp_path / "c.json", {"name": "tiny"}).tolist() == [0, 3, 5, 7]
    with pytest.raises(Exception, match="another pool"):
        load_rows(tmp_path / "c.json", {"name": "other"})


def test_reject_threshold_calibration():
    from clipdistill.deploy.reject import calibrate_reject, otsu

    rng = np.random.default_rng(0)
    sims = np.concatenate([rng.normal(0.3, 0.03, 500), rng.normal(0.7, 0.03, 300)])
    cut = otsu(sims)
    assert 0.4 < cut < 0.6
    match = np.r_[np.zeros(50, bool), np.ones(50, bool)]
    top = np.r_[rng.uniform(0.3, 0.6, 50), rng.uniform(0.7, 1.0, 50)]
    r = calibrate_reject(top, match)
    assert 0.6 <= r["reject_threshold"] <= 0.7 and r["balanced_agreement"] == 100.0
    assert calibrate_reject(top, np.ones(100, bool))["reject_threshold"] == 0.0  # nothing to calibrate on


@pytest.fixture(scope="module")
def fitted(small_pool, cache_dir, trained_teacher_file, tmp_path_factory) -> dict:
    from clipdistill.cli import main

    out = tmp_path_factory.mktemp("fit") / "fit"
    args = ["fit-prompts", "--prompts", str(small_pool / "classes.txt"), "--pool", str(small_pool / "pool"),
            "--eval", str(small_pool / "eval" / "test"), "--out", str(out), "--pretrained", str(trained_teacher_file),
            "--cache-dir", str(cache_dir), "--epochs", "3", "--batch-size", "32", "--no-progress", "--json"]
    return {"args": args, "out": out, "rc": main(args)}


def test_fit_prompts_writes_everything_and_counts(fitted, capsys):
    assert fitted["rc"] == 0
    out = fitted["out"]
    s = json.loads((out / "summary.json").read_text())
    assert {k: s["pool"][k] for k in ("files", "images", "duplicates", "broken")} == \
        {"files": 415, "images": 400, "duplicates": 12, "broken": 3}
    assert len(s["pool"]["broken_files"]) == 3 and len(s["pool"]["duplicate_files"]) == 12
    assert s["teacher_zero_shot_accuracy"] > 80  # the tiny teacher knows these four shapes
    assert s["curation"]["kept"] == 400 and sum(s["curation"]["per_class"].values()) == 400
    for c in ("circle", "crescent", "heart", "star"):
        assert (out / "sheets" / f"{c}-top.png").is_file() and (out / "sheets" / f"{c}-edge.png").is_file()
    assert (out / "sheets" / "disagreements.png").is_file()
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["circle", "crescent", "heart", "star"]  # test/'s folders name the prompts' classes
    assert meta["prompts"] == ["a circle", "a crescent", "a heart", "a star"]
    assert 0 <= meta["reject_threshold"] < 1 and meta["reject_calibration"]["score"]
    assert (out / "model.int8.onnx").is_file()
    # the deployment bundle (issue 25): both files, and DeepStream thresholds at the calibrated reject threshold
    from clipdistill.deploy.bundle import check_bundle
    from clipdistill.deploy.targets.deepstream import read_config

    assert s["export"]["bundle"] == str(out / "model.bundle")
    assert json.loads((out / "model.bundle" / "manifest.json").read_text())["models"] == ["model.onnx",
                                                                                         "model.int8.onnx"]
    ds = read_config(out / "model.bundle" / "deepstream" / "config_infer_primary_clipdistill.txt")
    assert float(ds["classifier-threshold"]) == pytest.approx(meta["reject_threshold"], abs=1e-6)
    assert check_bundle(out / "model.bundle")["passed"]
    q = s["quality"]
    assert np.asarray(q["confusion_vs_teacher"]["counts"]).sum() == q["held_out_images"] == 40
    report = (out / "REPORT.md").read_text()
    assert "12 duplicates" in report and "3 broken" in report
    # a second call finds the training done: same numbers, no epoch trained again
    from clipdistill.cli import main

    result = (out / "run" / "result.json").read_text()
    metrics = (out / "run" / "metrics.jsonl").read_text()
    assert main(fitted["args"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["student"] == s["student"] and again["curation"] == s["curation"]
    assert (out / "run" / "result.json").read_text() == result
    assert (out / "run" / "metrics.jsonl").read_text() == metrics
    # and says so: the training's time is the earlier call's, not this call's second
    assert again["seconds"]["train"] == s["seconds"]["train"] > 0
    assert "train" in again["done_earlier"] and "train" not in s["done_earlier"]
    assert f"train {s['seconds']['train']:.0f} s (done by an earlier call)" in (out / "REPORT.md").read_text()


def _markdown_rows(text: str, first_cell: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header starts with `first_cell`, by their first cell."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_cell} |"))
    rows = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_fit_prompts_report_says_what_to_trust(fitted):
    """Issue 27: REPORT.md leads with the agreement where the teacher matches a prompt, then the
    one over every held-out image; the reject share per group, what passes as which class and the
    confused pairs agree with summary.json; at --keep-threshold 0 it says every image was kept and
    how many the teacher says match no prompt (not "matching no prompt: 0")."""
    out = fitted["out"]
    s = json.loads((out / "summary.json").read_text())
    q, cur = s["quality"], s["curation"]
    report = (out / "REPORT.md").read_text()
    trust = report.split("## What to trust", 1)[1].split("## The run", 1)[0]
    first = next(ln for ln in trust.splitlines() if ln.startswith("- "))
    assert first.startswith(f"- **agreement with the teacher where it matches a prompt: "
                            f"{q['agreement_where_teacher_matches']:.2f}%** of {q['teacher_matching_held_out']} ")
    assert trust.index(first) < trust.index(f"agreement over all 40 held-out pool images: {q['agreement']:.2f}%")

    # the table: a row per class and one for "matches no prompt", as summary.json counts them
    a = q["answers_by_teacher_call"]
    classes = ["circle", "crescent", "heart", "star"]
    assert a["rows"] == classes + ["matches no prompt"] and a["columns"] == classes + ["none of these"]
    counts = np.asarray(a["counts"])
    assert counts.sum() == q["held_out_images"] == 40
    assert counts[:-1].sum() == q["teacher_matching_held_out"] > 0 and counts[-1].sum() == 40 - counts[:-1].sum()
    assert counts[:, -1].sum() == pytest.approx(q["rejected_share_held_out"] * 40 / 100)
    # accepted answers are a part of the student's top class (the confusion where the teacher matches)
    matched = np.asarray(q["confusion_where_teacher_matches"]["counts"])
    assert (matched.sum(1) == counts[:-1].sum(1)).all() and (counts[:-1, :-1] <= matched).all()
    assert 100 * np.trace(matched) / matched.sum() == pytest.approx(q["agreement_where_teacher_matches"])
    rows = _markdown_rows(report, "the teacher's call")
    assert list(rows) == a["rows"]
    for name, row in zip(a["rows"], counts):
        assert int(rows[name][0]) == row.sum()
        assert [int(c.split(" ")[0]) for c in rows[name][1:]] == row.tolist()
    n_none = int(counts[-1].sum())
    assert (f"of the held-out pool images; {counts[-1, -1]} of {n_none} " in trust
            and f"{counts[:-1, -1].sum()} of {q['teacher_matching_held_out']} " in trust)
    assert f"images matching no prompt that still pass as a class: {n_none - counts[-1, -1]} of {n_none}" in trust
    for k in np.flatnonzero(counts[-1, :-1]):  # each class the no-prompt images pass as, with its count
        assert f"{classes[k]} {counts[-1, k]} of {n_none}" in trust
    # the confused pairs: the largest off-diagonal cells where the teacher matches a prompt
    off = matched - np.diag(np.diag(matched))
    pairs = q["top_confusions"]
    assert [p["images"] for p in pairs] == sorted(off[off > 0].tolist(), reverse=True)[:3]
    for p in pairs:
        assert off[classes.index(p["teacher"]), classes.index(p["student"])] == p["images"]
        assert f"{p['teacher']} -> {p['student']} {p['images']} of {p['of']}" in trust

    # --keep-threshold 0 kept every image; the teacher's cut (the one assess uses) says how many match no prompt
    call = cur["teacher_call"]
    assert call["similarity_cut"] == pytest.approx(q["teacher_similarity_cut"])
    assert call["no_prompt_share"] == pytest.approx(100 - q["pool_matching_share"])
    assert call["no_prompt"] == round(cur["scored"] * call["no_prompt_share"] / 100) > 0
    assert cur["summary"] in report and "kept every image in its best prompt's class (--keep-threshold 0)" in report
    assert f"{call['no_prompt']} of them ({call['no_prompt_share']:.0f}%) match no prompt" in report
    assert "matching no prompt: 0" not in report
    # none-top.png shows those images (the threshold put none there): a full grid, not "(none)"
    with Image.open(out / "sheets" / "none-top.png") as im:
        assert im.size[1] == 18 + -(-min(24, call["no_prompt"]) // 8) * (96 + 14 + 4) + 4  # rows of 8 (data/sheets.py)


UNPROMPTED = ["cross", "diamond", "hourglass", "ring", "square", "triangle"]  # shapes10's classes no prompt names


def test_fit_prompts_says_what_unprompted_images_pass_as(fitted, small_pool, capsys):
    """--eval's unprompted/<what they are>/: make-pool writes the six unprompted classes there (never
    in test/); fit-prompts answers them with model.onnx as `clipdistill predict` does (the calibrated
    threshold), and REPORT.md's table, led by the worst look-alike, holds the same counts."""
    from clipdistill.cli import main
    from clipdistill.fit.lookalikes import worst_words

    root = small_pool / "eval" / "unprompted"
    assert sorted(d.name for d in root.iterdir()) == UNPROMPTED
    assert all(len(list((root / c).glob("*.png"))) == 10 for c in UNPROMPTED)
    assert sorted(d.name for d in (small_pool / "eval" / "test").iterdir()) == ["circle", "crescent", "heart", "star"]
    assert sorted(json.loads((small_pool / "truth.json").read_text())["unprompted"]) == UNPROMPTED
    out = fitted["out"]
    s = json.loads((out / "summary.json").read_text())
    u, meta = s["quality"]["unprompted"], json.loads((out / "model.json").read_text())
    classes = meta["classes"]
    assert [g["name"] for g in u["groups"]] == UNPROMPTED and u["images"] == 60 and u["classes"] == classes
    assert u["reject_threshold"] == pytest.approx(meta["reject_threshold"])
    for g in u["groups"]:  # every image answered once by the model, called once by the teacher
        assert sum(g["answers"].values()) == sum(g["teacher"].values()) == g["images"] == 10
    # the same answers as `clipdistill predict --reject auto` on those folders
    capsys.readouterr()
    assert main(["predict", "--model", str(out / "model.onnx"), str(root), "--json", "--top-k", "1"]) == 0
    said = json.loads(capsys.readouterr().out.splitlines()[0])
    assert said["reject_threshold"] == pytest.approx(meta["reject_threshold"]) and len(said["results"]) == 60
    for g in u["groups"]:
        labels = [r["label"] for r in said["results"] if Path(r["path"]).parent.name == g["name"]]
        assert {c: labels.count(c) for c in g["answers"]} == g["answers"]
        assert g["rejected_share"] == pytest.approx(100 * labels.count("none of these") / 10)
    # the worst look-alike: the largest share of a folder passed as one class
    shares = [(g["answers"][c] / g["images"], g["name"], c) for g in u["groups"] for c in classes]
    top = max(shares, key=lambda t: t[0])
    report = (out / "REPORT.md").read_text()
    assert f"**{worst_words(u)}**" in report
    if top[0]:
        assert u["worst"]["share"] == pytest.approx(100 * top[0]) and u["worst"]["class"] in classes
        assert worst_words(u).startswith(f"{u['worst']['name']} passes as {u['worst']['class']} on "
                                         f"{u['worst']['share']:.0f}% ")
    else:  # every one of them answered "none of these"
        assert u["worst"] is None and worst_words(u) == "none of the 60 images passes as a prompted class"
    trust = report.split("## What to trust", 1)[1]
    assert "in that class's row of the table; the labelled ones in --eval's unprompted/ single them out: " \
           + worst_words(u) in trust and "no label-free number" not in trust
    rows = _markdown_rows(report, "images of no prompted class")
    assert list(rows) == UNPROMPTED
    for g in u["groups"]:
        cells = rows[g["name"]]
        assert int(cells[0]) == g["images"]
        assert [int(c.split(" ")[0]) for c in cells[1:-1]] == [g["answers"][c] for c in [*classes, "none of these"]]
        assert int(cells[-1].split(" ")[0]) == g["images"] - g["teacher"]["matches no prompt"]
        assert sum(int(c.split(" ")[0]) for c in cells[1:-1]) == len(list((root / g["name"]).glob("*.png")))


def test_unprompted_edits_measure_again_without_training(fitted, small_pool, capsys):
    """Images added to unprompted/ change the table and nothing trains (metrics.jsonl as it was);
    without unprompted/ there is no table and the report says no number singles look-alikes out;
    a folder named as a prompted class is refused before anything runs."""
    import shutil

    from clipdistill.cli import main

    out, root = fitted["out"], small_pool / "eval" / "unprompted"
    aside = small_pool / "unprompted-aside"
    metrics = (out / "run" / "metrics.jsonl").read_text()
    before = json.loads((out / "summary.json").read_text())["quality"]["unprompted"]
    added = [root / "cross" / f"added_{i}.png" for i in range(3)]
    try:
        for i, f in enumerate(added):
            shutil.copy(sorted((small_pool / "eval" / "test" / "star").glob("*.png"))[i], f)
        assert main(fitted["args"]) == 0
        s = json.loads((out / "summary.json").read_text())
        u = s["quality"]["unprompted"]
        cross = next(g for g in u["groups"] if g["name"] == "cross")
        assert cross["images"] == 13 and u["images"] == 63 and u != before
        assert _markdown_rows((out / "REPORT.md").read_text(), "images of no prompted class")["cross"][0] == "13"
        assert "train" in s["done_earlier"] and "assess" in s["done_earlier"] and "lookalikes" not in s["done_earlier"]
        assert (out / "run" / "metrics.jsonl").read_text() == metrics

        (root / "Star").mkdir()
        shutil.copy(added[0], root / "Star" / "x.png")
        with pytest.raises(SystemExit) as e:
            main(fitted["args"])
        assert e.value.code == 2 and "--eval" in (err := capsys.readouterr().err)
        assert "unprompted/Star/ has the name of test/star/, a prompted class" in err
        shutil.rmtree(root / "Star")

        root.rename(aside)
        assert main(fitted["args"]) == 0
        s = json.loads((out / "summary.json").read_text())
        report = (out / "REPORT.md").read_text()
        assert s["quality"]["unprompted"] is None and "lookalikes" not in s["seconds"]
        assert "images of no prompted class" not in report and "unprompted/" not in report
        assert "where no label-free number can single them out: look at the class's sheets" in report
        assert (out / "run" / "metrics.jsonl").read_text() == metrics
    finally:  # the module's pool and fit as they were, for the tests after this one
        shutil.rmtree(root / "Star", ignore_errors=True)
        if aside.is_dir():
            aside.rename(root)
        for f in added:
            f.unlink(missing_ok=True)
        assert main(fitted["args"]) == 0
    assert json.loads((out / "summary.json").read_text())["quality"]["unprompted"]["groups"] == before["groups"]


def test_fit_prompts_without_labels_at_all(small_pool, cache_dir, trained_teacher_file, tmp_path, capsys):
    """No --eval: nothing is labelled anywhere; the run reports agreement only, INT8 is gated on
    how many predictions change."""
    from clipdistill.cli import main

    out = tmp_path / "fit"
    assert main(["fit-prompts", "--prompts", str(small_pool / "classes.txt"), "--pool", str(small_pool / "pool"),
                 "--out", str(out), "--pretrained", str(trained_teacher_file), "--cache-dir", str(cache_dir),
                 "--epochs", "1", "--batch-size", "32"]) == 0  # progress on, stderr no terminal: plain lines
    said = capsys.readouterr()
    report = said.out
    assert_plain_log(said.err, epochs=1)
    assert "teacher zero-shot on --eval: -" in report and "test accuracy -" in report
    s = json.loads((out / "summary.json").read_text())
    assert s["teacher_zero_shot_accuracy"] is None and s["quality"]["held_out_images"] == 40
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["a circle", "a crescent", "a heart", "a star"]  # no folders: the prompts name them
    q = json.loads((out / "model.int8.json").read_text())["quantization"]
    assert "no labels" in q["eval_split"] and q["accuracy_drop"] == pytest.approx(100 - q["agreement_with_fp32"])


def test_fit_prompts_after_an_edit_trains_the_new_model(small_pool, cache_dir, trained_teacher_file, tmp_path,
                                                       capsys):
    """The same command after editing the prompts file, then after adding photos to the pool: each
    time the model is trained again on what the files hold now and says what changed (it shipped the
    old model for edited prompts, and refused new photos with "use the same flags")."""
    import shutil

    from clipdistill.cli import main

    pool, prompts, out = tmp_path / "pool", tmp_path / "classes.txt", tmp_path / "fit"
    shutil.copytree(small_pool / "pool", pool)
    shutil.copy(small_pool / "classes.txt", prompts)
    args = ["fit-prompts", "--prompts", str(prompts), "--pool", str(pool), "--out", str(out), "--pretrained",
            str(trained_teacher_file), "--cache-dir", str(cache_dir), "--epochs", "1", "--batch-size", "32",
            "--no-int8", "--no-progress"]
    assert main(args) == 0
    first = json.loads((out / "run" / "result.json").read_text())
    capsys.readouterr()

    prompts.write_text("a round circle\na crescent\na heart\na star\n")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "--prompts: the file's lines changed since the run (removed 'a circle'; added 'a round circle')" in err
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"][0] == meta["prompts"][0] == "a round circle"
    assert (out / "previous-run" / "result.json").read_text() == json.dumps(first, indent=2, sort_keys=True) + "\n"

    new = pool / "2025-01"
    new.mkdir()
    for i, src in enumerate(sorted((small_pool / "eval" / "test").rglob("*.png"))[:60]):
        shutil.copy(src, new / f"new_{i}.png")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "60 images added, 0 removed" in err and "Use the same flags" not in err
    s = json.loads((out / "summary.json").read_text())
    assert s["pool"]["images"] == 460 and s["curation"]["scored"] == 460
    again = json.loads((out / "run" / "result.json").read_text())
    assert again["inputs"]["datasets"]["unlabeled"]["n"] == 460


def test_predict_rejects_below_the_threshold(fitted, small_pool):
    from clipdistill.deploy.predict import predict

    model = str(fitted["out"] / "model.onnx")
    imgs = [str(small_pool / "eval" / "test")]
    every = predict(model, imgs, top_k=2, reject=0.0)["results"]
    assert len(every) == 60 and not any(r["rejected"] for r in every)
    none = predict(model, imgs, top_k=2, reject=0.999999)["results"]
    assert all(r["rejected"] and r["label"] == "none of these" for r in none)
    assert [r["top"] for r in none] == [r["top"] for r in every]  # the scores are unchanged


def test_video_predict_matches_the_frames_as_images(fitted, small_pool, tmp_path, capsys):
    import cv2

    from clipdistill.cli import main
    from clipdistill.deploy.predict import predict

    files = sorted((small_pool / "eval" / "test").rglob("*.png"))[::6]
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 32))
    for f in files:
        w.write(cv2.cvtColor(np.asarray(Image.open(f).convert("RGB")), cv2.COLOR_RGB2BGR))
    w.release()
    # the frames as OpenCV decodes them, saved losslessly: predict on images must agree
    cap, decoded = cv2.VideoCapture(str(video)), []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        p = tmp_path / "frames" / f"{len(decoded):03d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).save(p)
        decoded.append(p)
    assert len(decoded) == len(files)
    model = str(fitted["out"] / "model.onnx")
    expected = [r["top"][0]["class"] for r in predict(model, [str(tmp_path / "frames")], reject=0.0)["results"]]
    capsys.readouterr()
    annotated = tmp_path / "annotated.mp4"
    assert main(["predict", "--model", model, str(video), "--json", "--reject", "off", "--top-k", "2",
                 "--annotate", str(annotated), "--batch-size", "4"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [ln["frame"] for ln in lines] == list(range(len(files)))
    assert [ln["top"][0]["class"] for ln in lines] == expected
    assert abs(lines[1]["time"] - 0.2) < 1e-6
    check = cv2.VideoCapture(str(annotated))
    assert int(check.get(cv2.CAP_PROP_FRAME_COUNT)) == len(files)


def test_reprompting_an_embedding_student(embedding_run, trained_run, cache_dir, tmp_path):
    """An mse student learnt the teacher's embedding: prompts it never saw become its head."""
    from clipdistill.core.errors import ConfigError
    from clipdistill.data.shapes10 import CLASSES, generate
    from clipdistill.deploy.export import ExportConfig, export
    from clipdistill.deploy.predict import predict

    new = ["ring", "cross", "heart"]
    prompts = tmp_path / "new.txt"
    prompts.write_text("".join(f"a {c}\n" for c in new))
    res = export(ExportConfig(run=str(embedding_run), prompts=str(prompts), cache_dir=str(cache_dir)))
    assert res["path"].endswith("model-new.onnx") and res["info"]["classes"] == [f"a {c}" for c in new]
    # a reject threshold calibrated for the new prompts (tests/test_deploy_trust.py)
    assert res["info"]["reject_calibration"]["prompts"] == [f"a {c}" for c in new]
    images, labels = generate("test", 300, 32, 3003)
    keep = np.isin(labels, [CLASSES.index(c) for c in new])
    folder = tmp_path / "imgs"
    folder.mkdir()
    truth = {}
    for i in np.flatnonzero(keep):
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
        truth[f"{i:04d}.png"] = f"a {CLASSES[labels[i]]}"
    got = predict(res["path"], [str(folder)])["results"]
    acc = np.mean([r["top"][0]["class"] == truth[os.path.basename(r["path"])] for r in got])
    assert acc > 0.7, acc  # chance: 1/3
    # a student that learnt class logits (here: from labels) cannot take new prompts, and says why
    with pytest.raises(ConfigError, match="embedding"):
        export(ExportConfig(run=str(trained_run), prompts=str(prompts), cache_dir=str(cache_dir)))


def test_fit_prompts_bad_input_names_the_flag(small_pool, tmp_path, capsys):
    from clipdistill.cli import main

    base = ["fit-prompts", "--prompts", str(small_pool / "classes.txt"), "--out", str(tmp_path / "o")]
    for extra, flag in ((["--pool", str(tmp_path / "nope")], "--pool"),
                        (["--pool", str(small_pool / "pool"), "--eval", str(small_pool)], "--eval"),
                        (["--pool", str(small_pool / "pool"), "--keep-threshold", "1.5"], "--keep-threshold")):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2 and flag in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(base + ["--pool", str(tmp_path / "empty")])
    assert "no files in it" in capsys.readouterr().err
