"""A run is more than its training loop (issue 24): `clipdistill eval` reads what the run recorded
and changes nothing it did not measure; the teaching modes, the run's context and the loop
import each other in one direction only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_kwargs

# Runs `clipdistill eval` as a user does, with every image the teacher embeds counted on the way
# (the real encoder runs; the count is written to a file, since the CLI owns stdout).
_EVAL_COUNTING_THE_TEACHER = """
import json, sys
from clipdistill.teacher.openclip_teacher import Teacher
from clipdistill.cli import main

seen = []
real = Teacher.encode_images

def counted(self, images):
    seen.append(int(len(images)))
    return real(self, images)

Teacher.encode_images = counted
rc = main(["eval", "--run", sys.argv[1]])
with open(sys.argv[2], "w") as f:
    json.dump({"rc": rc, "teacher_images": sum(seen)}, f)
sys.exit(rc)
"""


def _cache_files(cache_dir: Path) -> dict:
    """Every file of the cache folder and when it was last written (lock files are opened by
    readers too, so they are left out)."""
    return {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


def _differences(before: dict, after: dict) -> dict:
    return {k: (before.get(k, "<absent>"), after.get(k, "<absent>")) for k in list(before) + list(after)
            if before.get(k, "<absent>") != after.get(k, "<absent>")}


@pytest.mark.parametrize("teaching", ["auto", "views"])
def test_eval_reads_the_run_and_changes_nothing_it_did_not_measure(tmp_path, cache_dir, trained_teacher_file,
                                                                  caplog, monkeypatch, teaching):
    """A run that timed its teacher (`--teaching auto` with augmentation) or embedded views of it:
    `eval` must neither time it again nor embed anything (the run's caches hold what it needs, even
    with the views' cache gone), must report the teaching the run recorded, and must leave
    result.json as it was: on the same machine even the fields eval measures come out equal."""
    from clipdistill.distill.config import TrainConfig
    from clipdistill.distill.evaluate import EvalConfig, evaluate_run
    from clipdistill.distill.train import train
    from clipdistill.teacher.openclip_teacher import Teacher

    run = tmp_path / "run"
    # seed 7: views of its own in the shared cache folder, which this test removes
    cfg = TrainConfig(**train_kwargs(cache_dir, trained_teacher_file, max_images=400, epochs=1, batch_size=32,
                                     method="kl", head="text", data=["train"], augment="rrc", teaching=teaching,
                                     views=2, seed=7, out=str(run)))
    with caplog.at_level("INFO", logger="clipdistill"):
        trained = train(cfg)
    probed = [r.getMessage() for r in caplog.records if "teaching auto" in r.getMessage()]
    if teaching == "auto":  # the run timed its teacher: that is what eval must not do again
        assert probed and trained["teaching"] in ("online", "views") and trained["teaching_costs"]
    else:
        assert trained["teaching"] == "views" and trained["teaching_costs"] is None
        views = list(cache_dir.rglob("*-views2-rrc-seed7"))
        assert views
        for folder in views:  # only the run's way to its targets: eval must not need it
            shutil.rmtree(folder)
    before_bytes = (run / "result.json").read_bytes()
    before = json.loads(before_bytes)
    files = _cache_files(cache_dir)

    # 1. `clipdistill eval`, in a process of its own as a user runs it
    counts = tmp_path / "counts.json"
    proc = subprocess.run([sys.executable, "-c", _EVAL_COUNTING_THE_TEACHER, str(run), str(counts)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(counts.read_text()) == {"rc": 0, "teacher_images": 0}, proc.stderr[-3000:]
    assert "teaching auto" not in proc.stderr and "augmented views" not in proc.stderr, proc.stderr[-3000:]
    after = json.loads((run / "result.json").read_text())
    assert _differences(before, after) == {}
    assert (run / "result.json").read_bytes() == before_bytes
    changed = _differences(files, _cache_files(cache_dir))
    assert changed == {}, f"eval wrote into the cache folder: {sorted(map(str, changed))}"

    # 2. Without result.json, what the run recorded comes from its checkpoint, not from a probe.
    (run / "result.json").unlink()
    seen = []
    real = Teacher.encode_images
    monkeypatch.setattr(Teacher, "encode_images", lambda self, x: seen.append(len(x)) or real(self, x))
    caplog.clear()
    with caplog.at_level("INFO", logger="clipdistill"):
        again = evaluate_run(EvalConfig(run=str(run)))
    assert seen == [] and not [r for r in caplog.records if "teaching auto" in r.getMessage()]
    trained_only = {"train_seconds", "wall_seconds"}  # measured by training alone
    assert _differences({k: v for k, v in before.items() if k not in trained_only}, again) == {}
    assert again["teaching"] == trained["teaching"] and again["teaching_costs"] == trained["teaching_costs"]


def test_no_module_imports_one_that_imports_it_back_not_even_for_type_hints(monkeypatch):
    """tests/test_layout.py finds import cycles among the imports that run; a pair joined only
    by `if TYPE_CHECKING:` imports is a cycle of the design all the same (the trainer and the
    teaching modes were one)."""
    import test_layout

    monkeypatch.setattr(test_layout, "_type_checking_only", lambda tree: set())
    graph = test_layout._graph()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a in graph.get(b, ()) and a != b})
    assert not pairs, "modules that import each other:\n" + "\n".join(f"{a} <-> {b}" for a, b in pairs)
