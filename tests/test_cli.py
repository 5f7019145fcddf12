import pytest
from conftest import run_cli

from clipdistill.cli import VERBS


def test_top_level_help_lists_every_verb():
    proc = run_cli("--help")
    for verb in VERBS:
        assert verb in proc.stdout
        assert VERBS.get(verb).summary[:30] in proc.stdout


def test_verb_help_teaches_flags_and_examples():
    proc = run_cli("embed", "--help")
    assert "--teacher" in proc.stdout and "--pretrained" in proc.stdout and "examples:" in proc.stdout
    proc = run_cli("train", "--help")
    for method in ("labels", "kl", "mse", "cosine"):
        assert method in proc.stdout


def test_unknown_flag_exits_2_and_names_it():
    proc = run_cli("embed", "--batchsize", "3", check=False)
    assert proc.returncode == 2
    assert "--batchsize" in proc.stderr


def test_bad_value_exits_2_and_names_the_flag():
    proc = run_cli("embed", "--embed-batch-size", "0", check=False)
    assert proc.returncode == 2
    assert "--embed-batch-size" in proc.stderr and ">= 1" in proc.stderr
    proc = run_cli("embed", "--embed-batch-size", "many", check=False)
    assert proc.returncode == 2 and "expected int" in proc.stderr


def test_unknown_dataset_lists_valid_ones(tmp_path):
    proc = run_cli("embed", "--dataset", "imagenet", "--cache-dir", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "--dataset" in proc.stderr and "shapes10" in proc.stderr and "stl10" in proc.stderr


def test_unknown_verb_exits_2():
    proc = run_cli("distill", check=False)
    assert proc.returncode == 2 and "teacher-eval" in proc.stderr


def test_every_verb_is_a_config_a_run_function_and_a_formatter():
    """The one pattern: each name in the registry loads (imported here as `clipdistill VERB` would)."""
    import dataclasses
    import importlib

    def _load(ref: str):
        module, name = ref.split(":")
        return getattr(importlib.import_module(module, "clipdistill"), name)

    for verb in VERBS:
        v = VERBS.get(verb)
        assert dataclasses.is_dataclass(_load(v.config)), verb
        for ref in (v.run, v.text, v.failures):
            assert ref is None or callable(_load(ref)), (verb, ref)


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_openmp_threads_sleep_when_waiting_unless_the_user_chose(given):
    """OMP_WAIT_POLICY is read once, when torch loads OpenMP: the CLI sets it before any verb can
    import torch (benchmarks/bench_busy.md: 4-12x faster training beside another busy program),
    and leaves a user's own choice alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys\nimport clipdistill.cli as cli\nloaded = 'torch' in sys.modules\n"
            "cli.main(['--version'])\nprint(loaded, os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["False", given or "PASSIVE"]
